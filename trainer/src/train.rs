//! The `train` command: data → model → steps → checkpoints → export, with resume and the spot-notice path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use camelid_model::{ChatTemplate, LoadOptions, LoadedModel};
use tch::{Device, Kind, Tensor};

use crate::backend::Backend;
use crate::batching::Batcher;
use crate::checkpoint;
use crate::config::{Device as DeviceSetting, ExportDtype, Precision, TrainConfig, hash_file, hash_json};
use crate::data::{self, CleanOptions};
use crate::dataset::{self, Sample};
use crate::dist::{Comm, DistEnv};
use crate::engine::Engine;
use crate::error::TrainError;
use crate::fsdp::ShardedEngine;
use crate::optim::{AdamW, AdamWConfig, cosine_lr};
use crate::progress::{LastCheckpoint, Phase, Reporter};
use crate::run::Run;

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint in the checkpoint directory, if any.
    Auto,
    Never,
    Path(PathBuf),
}

/// What the caller asked besides the settings that shape the math.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub resume: Resume,
    pub stop_at_step: Option<u64>,
    /// Set by SIGTERM/SIGUSR1: finish the micro-batch in flight, checkpoint, stop.
    pub stop_requested: Arc<AtomicBool>,
    pub reporter: Arc<Reporter>,
    /// This process's place in a gang of several (`None`: it trains alone).
    pub dist: Option<DistEnv>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Trained every step and exported the model.
    Finished { steps: u64, export: PathBuf },
    /// Stopped after writing a complete checkpoint (signal or `--stop-at-step`).
    Stopped { step: u64, checkpoint: PathBuf },
}

/// The data, cleaned and tokenized for `model`, with the report of everything dropped or changed.
pub fn prepare_data(
    cfg: &TrainConfig,
    data_path: &Path,
    model: &LoadedModel,
) -> Result<(Vec<Sample>, serde_json::Value), TrainError> {
    let conversations = data::read_conversations(data_path)?;
    let (kept, cleaning) = data::clean(
        conversations,
        &CleanOptions {
            min_turn_chars: cfg.min_turn_chars,
            blocklist: cfg.blocklist.clone(),
        },
    );
    let (samples, tokens) = dataset::tokenize(&kept, model, cfg.max_length)?;
    let report = serde_json::json!({"file": data_path, "cleaning": cleaning, "tokenization": tokens});
    if samples.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no trainable samples are left after cleaning and tokenization (report: {report})",
            data_path.display()
        )));
    }
    Ok((samples, report))
}

/// Loads the model as f32 masters on the chosen device (CUDA device `cuda_index` for a GPU: a rank's
/// `LOCAL_RANK`) with the chosen template.
pub fn load_model(
    cfg: &TrainConfig,
    path: &Path,
    cuda_index: usize,
) -> Result<(LoadedModel, Kind), TrainError> {
    let device = match cfg.device {
        DeviceSetting::Cpu => Device::Cpu,
        DeviceSetting::Cuda if !tch::Cuda::is_available() => {
            return Err(TrainError::Config(
                "--device cuda, but no CUDA device is available".into(),
            ));
        }
        DeviceSetting::Cuda => Device::Cuda(cuda_index),
        DeviceSetting::Auto if tch::Cuda::is_available() => Device::Cuda(cuda_index),
        DeviceSetting::Auto => Device::Cpu,
    };
    let compute = match (cfg.precision, device) {
        (Precision::F32, _) | (Precision::Auto, Device::Cpu) => Kind::Float,
        _ => Kind::BFloat16,
    };
    let mut model = camelid_model::load(
        path,
        LoadOptions {
            dtype: Kind::Float,
            device,
        },
    )?;
    if let Some(name) = &cfg.template {
        let template = ChatTemplate::named(name)
            .ok_or_else(|| TrainError::Config(format!("unknown template {name:?}")))?;
        model.set_template(template);
    }
    Ok((model, compute))
}

fn required<'a>(v: &'a Option<PathBuf>, flag: &str) -> Result<&'a PathBuf, TrainError> {
    v.as_ref()
        .ok_or_else(|| TrainError::Config(format!("{flag} is required")))
}

/// One line per step in `metrics.jsonl` (kept in step order across resumes).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub trainable_tokens: u64,
    pub epoch: f64,
    pub seconds: f64,
    /// Seconds this rank spent in collectives during the step (several ranks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

/// Keeps the records of steps `<= step` (a resume redoes the later ones) and opens the file for appending.
fn open_step_log(path: &Path, step: u64) -> Result<std::fs::File, TrainError> {
    let io = |e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(io)?;
        let kept: String = text
            .lines()
            .filter(|l| serde_json::from_str::<StepRecord>(l).is_ok_and(|r| r.step <= step))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(io)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)
}

fn progress_bar(step: u64, total: u64) -> String {
    const WIDTH: u64 = 24;
    let filled = (step * WIDTH).checked_div(total).unwrap_or(WIDTH).min(WIDTH);
    format!(
        "[{}{}] ",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

/// Writes `value` as pretty JSON into `path`.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Joins the gang, if any, and picks the engine: the whole model in this process, or this rank's shards.
fn setup_engine(
    cfg: &TrainConfig,
    opts: &RunOptions,
    model: &mut LoadedModel,
    compute_kind: Kind,
) -> Result<(Backend, Comm), TrainError> {
    let Some(dist) = &opts.dist else {
        let engine = Engine::new(&model.model, compute_kind, cfg.activation_checkpointing)?;
        return Ok((Backend::Single(Box::new(engine)), Comm::default()));
    };
    let group = std::rc::Rc::new(dist.connect(model.model.device())?);
    if cfg.activation_checkpointing != crate::config::Checkpointing::Full {
        tracing::info!(
            "sharded training recomputes every layer in backward (full activation checkpointing) whatever \
             --activation-checkpointing says: that is what lets a layer's gathered weights be freed between its \
             forward and its backward (the results are the same)"
        );
    }
    let engine = ShardedEngine::new(&mut model.model, compute_kind, group.clone())?;
    Ok((Backend::Sharded(engine), Comm { group: Some(group) }))
}

/// Runs `train` to the end (export) or to a stop (checkpoint written). With [`RunOptions::dist`], every rank of
/// the gang runs this together: rank 0 alone writes the data report, the metrics log and the export.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<Outcome, TrainError> {
    cfg.validate().map_err(TrainError::Config)?;
    let model_path = match &cfg.model {
        Some(p) => p.clone(),
        None => camelid_model::default_model_path()?,
    };
    let data_path = required(&cfg.data, "--data")?;
    let output = required(&cfg.output, "--output")?.clone();
    let checkpoint_dir = cfg
        .checkpoint_dir
        .clone()
        .unwrap_or_else(|| output.join("checkpoints"));
    std::fs::create_dir_all(&output).map_err(|e| TrainError::Io {
        path: output.clone(),
        source: e,
    })?;
    let data_sha = hash_file(data_path).map_err(|source| crate::data::DataError::Io {
        path: data_path.clone(),
        source,
    })?;

    let cuda_index = opts.dist.as_ref().map_or(0, |d| d.local_rank);
    let (mut model, compute_kind) = load_model(cfg, &model_path, cuda_index)?;
    let (samples, report) = prepare_data(cfg, data_path, &model)?;
    let (engine, comm) = setup_engine(cfg, opts, &mut model, compute_kind)?;
    let leader = comm.is_leader();
    let report_path = output.join("data_report.json");
    if leader {
        write_json(&report_path, &report)?;
    }
    tracing::info!(
        samples = samples.len(),
        report = %report_path.display(),
        dropped = %report["cleaning"]["dropped"],
        truncated = %report["tokenization"]["truncated_exchanges"],
        "data ready"
    );

    let batcher = Batcher::new(&samples, cfg.micro_batch, cfg.seed, cfg.group_by_length);
    let per_epoch = batcher.batches_per_epoch() as u64;
    let g = (cfg.grad_accum * comm.world()) as u64;
    let (total_steps, total_micro) = match cfg.max_steps {
        Some(n) => (n, n * g),
        None => {
            let micro = ((cfg.epochs * per_epoch as f64).ceil() as u64).max(1);
            (micro.div_ceil(g), micro)
        }
    };
    let mut identity = cfg.identity(&data_sha);
    identity["model"] = model.config().to_hf_json();
    if comm.world() > 1 {
        identity["world_size"] = serde_json::json!(comm.world());
    }
    let config_hash = hash_json(&identity);
    let optimizer = AdamW::new(
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
        engine.masters(),
    )?;
    if let Backend::Sharded(sharded) = &engine {
        let mut memory = sharded.memory();
        memory.optimizer_state_bytes = (optimizer.exp_avg.iter().chain(&optimizer.exp_avg_sq))
            .map(|t| t.numel() as u64 * 4)
            .sum();
        tracing::info!(?memory, "holding this rank's shards");
        opts.reporter.update(|p| p.shards = Some(memory));
        let ranks_dir = output.join("ranks");
        std::fs::create_dir_all(&ranks_dir).map_err(|e| TrainError::Io {
            path: ranks_dir.clone(),
            source: e,
        })?;
        write_json(&ranks_dir.join(format!("rank-{:05}.json", comm.rank())), &memory)?;
    }
    let mut run = Run {
        cfg,
        model,
        engine,
        optimizer,
        comm,
        samples,
        batcher,
        total_micro,
        identity,
        config_hash,
        checkpoint_dir,
        output: output.clone(),
        opts,
        epoch_cache: None,
    };

    let found = match &opts.resume {
        Resume::Never => None,
        Resume::Auto => checkpoint::latest(&run.checkpoint_dir)?,
        Resume::Path(p) => Some((p.clone(), checkpoint::verify(p).map_err(TrainError::ResumeFrom)?)),
    };
    // Every rank verifies on its own; they must have found the same checkpoint.
    let key = found
        .as_ref()
        .map_or(-1.0, |(_, m)| (m.step * 1_000_000 + m.micro_step) as f64);
    if run.comm.sum(&[key])?[0] != key * run.comm.world() as f64 {
        return Err(TrainError::Config(format!(
            "the ranks do not see the same newest complete checkpoint under {} (this rank: {:?}); is the \
             checkpoint directory shared by every rank?",
            run.checkpoint_dir.display(),
            found.as_ref().map(|(dir, _)| dir)
        )));
    }
    let (mut step, mut micro, mut partial) = (0, 0, (0.0, 0));
    if let Some((dir, manifest)) = found {
        (step, micro, partial) = run.restore(&dir, &manifest)?;
        tracing::info!(checkpoint = %dir.display(), step, micro_step = micro, "resuming");
        opts.reporter.update(|p| {
            p.last_checkpoint = Some(LastCheckpoint {
                step,
                time: manifest.created.clone(),
            });
        });
    } else if opts.resume == Resume::Auto {
        tracing::info!(dir = %run.checkpoint_dir.display(), "no complete checkpoint; starting from step 0");
    }
    let metrics = &opts.reporter.metrics;
    metrics.total_steps.set(total_steps as i64);
    metrics.step.set(step as i64);
    opts.reporter.update(|p| {
        p.phase = Phase::Training;
        p.step = step;
        p.total_steps = total_steps;
    });
    let metrics_path = output.join("metrics.jsonl");
    let mut step_log = if leader {
        Some(open_step_log(&metrics_path, step)?)
    } else {
        None
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut mean_step_seconds: Option<f64> = None;
    let (rank, world) = (run.comm.rank() as u64, run.comm.world() as u64);

    while step < total_steps {
        let started = Instant::now();
        let range = run.step_range(step);
        let scale = 1.0 / run.trainable_at(range.clone()).max(1) as f64;
        let mut tokens = 0;
        // The step's summed loss stays on the device until the step ends (no host sync per micro-batch).
        let mut loss_sum = Tensor::f_from_slice(&[partial.0])?
            .f_to_device(run.model.model.device())?
            .f_squeeze()?;
        // Each round, every rank takes one micro-batch (the last round of a step may leave some without).
        let mut position = range.start + micro;
        while position < range.end {
            let mine = position + rank;
            let batch = if mine < range.end {
                Some(run.micro_batch_at(mine)?)
            } else {
                None
            };
            let loss = run
                .engine
                .micro_step(&mut run.model.model, batch.as_ref(), scale)?;
            loss_sum = loss_sum.f_add(&loss)?;
            tokens += batch.as_ref().map_or(0, |b| b.tokens);
            let next = (position + world).min(range.end);
            partial.1 += run.trainable_at(position..next);
            micro = next - range.start;
            position = next;
            let stop = run.comm.any(opts.stop_requested.load(Ordering::SeqCst))?;
            if stop && position < range.end {
                tracing::warn!(step, micro_step = micro, "stop requested: checkpointing mid-step");
                partial.0 = run.comm.sum(&[f64::try_from(&loss_sum)?])?[0];
                let dir = run.save(step, micro, partial)?;
                opts.reporter.update(|p| p.phase = Phase::Stopped);
                return Ok(Outcome::Stopped {
                    step,
                    checkpoint: dir,
                });
            }
        }
        let update_started = Instant::now();
        let grad_norm = run.engine.clip_grad_norm(cfg.max_grad_norm)?;
        let lr = cosine_lr(cfg.learning_rate, step, total_steps, cfg.warmup_ratio);
        run.optimizer.step(run.engine.masters(), run.engine.grads(), lr)?;
        run.engine.finish_step(&run.model.model)?;
        tracing::debug!(
            seconds = update_started.elapsed().as_secs_f64(),
            "clip and optimizer update"
        );
        let sums = run.comm.sum(&[f64::try_from(&loss_sum)?, tokens as f64])?;
        let (loss_total, tokens) = (sums[0], sums[1] as usize);
        let loss = loss_total / partial.1.max(1) as f64;
        let record = StepRecord {
            step: step + 1,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens,
            trainable_tokens: partial.1,
            epoch: range.end as f64 / per_epoch as f64,
            seconds: started.elapsed().as_secs_f64(),
            comm_seconds: run.engine.take_comm_time().map(|d| d.as_secs_f64()),
        };
        step += 1;
        micro = 0;
        partial = (0.0, 0);
        let seconds = record.seconds.max(1e-9);
        let mean = mean_step_seconds.map_or(seconds, |m| 0.8 * m + 0.2 * seconds);
        mean_step_seconds = Some(mean);
        let tokens_per_second = tokens as f64 / seconds;
        let eta = mean * (total_steps - step) as f64;
        if let (Some(log), Ok(line)) = (step_log.as_mut(), serde_json::to_string(&record)) {
            std::io::Write::write_all(log, format!("{line}\n").as_bytes()).map_err(|e| TrainError::Io {
                path: metrics_path.clone(),
                source: e,
            })?;
        }
        metrics.step.set(step as i64);
        metrics.loss.set(loss);
        metrics.learning_rate.set(lr);
        metrics.grad_norm.set(grad_norm);
        metrics.tokens_per_second.set(tokens_per_second);
        metrics.tokens.inc_by(tokens as u64);
        opts.reporter.update(|p| {
            p.step = step;
            p.epoch = record.epoch;
            p.loss = Some(loss);
            p.learning_rate = lr;
            p.tokens_per_second = tokens_per_second;
            p.eta_seconds = Some(eta);
        });
        tracing::info!(
            "{}step {step}/{total_steps} loss {loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3} \
             tokens/s {tokens_per_second:.0} epoch {:.2} eta {eta:.0}s{}",
            if tty {
                progress_bar(step, total_steps)
            } else {
                String::new()
            },
            record.epoch,
            record
                .comm_seconds
                .map_or(String::new(), |c| format!(" comm {c:.3}s")),
        );
        let stop =
            run.comm.any(opts.stop_requested.load(Ordering::SeqCst))? || opts.stop_at_step == Some(step);
        // The final step is checkpointed too (an export cut short resumes from it), unless no checkpoint is to be
        // kept after the export anyway.
        let last = step == total_steps && cfg.checkpoint_keep > 0;
        if stop || step % cfg.checkpoint_interval_steps == 0 || last {
            let dir = run.save(step, 0, (0.0, 0))?;
            if stop {
                opts.reporter.update(|p| p.phase = Phase::Stopped);
                return Ok(Outcome::Stopped {
                    step,
                    checkpoint: dir,
                });
            }
        }
    }
    opts.reporter.update(|p| p.phase = Phase::Exporting);
    let export_kind = if cfg.export_dtype == ExportDtype::Bf16 {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    run.engine.prepare_export(&mut run.model.model, export_kind)?;
    if leader {
        camelid_model::export_hf_dir(&run.model, &run.output, export_kind)?;
        tracing::info!(output = %run.output.display(), "exported");
    }
    run.comm.barrier()?;
    if cfg.checkpoint_keep == 0 && leader {
        for dir in checkpoint::list(&run.checkpoint_dir)? {
            std::fs::remove_dir_all(&dir).map_err(|e| TrainError::Io {
                path: dir.clone(),
                source: e,
            })?;
        }
    }
    opts.reporter.update(|p| {
        p.phase = Phase::Finished;
        p.eta_seconds = Some(0.0);
    });
    Ok(Outcome::Finished {
        steps: step,
        export: run.output,
    })
}
