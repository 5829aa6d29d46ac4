//! The `train` command: data → model → steps → checkpoints → export, with resume and the spot-notice path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use camelid_model::{ChatTemplate, LoadOptions, LoadedModel};
use tch::{Device, Kind, Tensor};

use crate::batching::{Batcher, collate};
use crate::checkpoint::{self, Manifest, State};
use crate::config::{DeviceChoice, Precision, TrainConfig, differences, hash_file, hash_json};
use crate::data::{self, CleanOptions};
use crate::dataset::{self, Sample};
use crate::engine::Engine;
use crate::error::TrainError;
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, cosine_lr};
use crate::progress::{LastCheckpoint, Phase, Reporter};

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
    let (samples, tokens) = dataset::tokenize(&kept, model, cfg.seq_len)?;
    let report = serde_json::json!({"file": data_path, "cleaning": cleaning, "tokenization": tokens});
    if samples.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: no trainable samples are left after cleaning and tokenization (report: {report})",
            data_path.display()
        )));
    }
    Ok((samples, report))
}

/// Loads the model as f32 masters on the chosen device with the chosen template.
pub fn load_model(cfg: &TrainConfig, path: &Path) -> Result<(LoadedModel, Kind), TrainError> {
    let device = match cfg.device {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda if !tch::Cuda::is_available() => {
            return Err(TrainError::Config(
                "--device cuda, but no CUDA device is available".into(),
            ));
        }
        DeviceChoice::Cuda => Device::Cuda(0),
        DeviceChoice::Auto => Device::cuda_if_available(),
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

fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Everything the loop carries between steps.
struct Run<'a> {
    cfg: &'a TrainConfig,
    model: LoadedModel,
    engine: Engine,
    optimizer: AdamW,
    samples: Vec<Sample>,
    batcher: Batcher,
    total_micro: u64,
    identity: serde_json::Value,
    config_hash: String,
    checkpoint_dir: PathBuf,
    output: PathBuf,
    opts: &'a RunOptions,
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

impl Run<'_> {
    /// The sample indices of micro-batch `position` of the endless sequence of epochs (each epoch's order is
    /// computed once, when the run enters it).
    fn batch_at(&mut self, position: u64) -> &[usize] {
        let per_epoch = self.batcher.batches_per_epoch() as u64;
        let (epoch, index) = (position / per_epoch, (position % per_epoch) as usize);
        if self.epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch_cache = Some((epoch, self.batcher.epoch(epoch)));
        }
        self.epoch_cache
            .as_ref()
            .map_or(&[], |(_, batches)| &batches[index])
    }

    fn micro_batch_at(&mut self, position: u64) -> Result<crate::batching::MicroBatch, TrainError> {
        let indices = self.batch_at(position).to_vec();
        let rows: Vec<&Sample> = indices.iter().map(|&i| &self.samples[i]).collect();
        let pad = self
            .model
            .config()
            .pad_token_id
            .or(self.model.eos_token_ids.first().copied())
            .unwrap_or(0);
        Ok(collate(&rows, pad, self.model.model.device())?)
    }

    fn step_range(&self, step: u64) -> std::ops::Range<u64> {
        let g = self.cfg.grad_accum as u64;
        step * g..((step + 1) * g).min(self.total_micro)
    }

    /// Trainable tokens in the whole of optimizer step `step`: the loss is averaged over all of them.
    fn trainable_in_step(&mut self, step: u64) -> usize {
        let mut total = 0;
        for position in self.step_range(step) {
            let indices = self.batch_at(position).to_vec();
            total += indices
                .iter()
                .map(|&i| self.samples[i].trainable_tokens())
                .sum::<usize>();
        }
        total.max(1)
    }

    fn save(&self, step: u64, micro_step: u64, partial: (f64, u64)) -> Result<PathBuf, TrainError> {
        self.opts.reporter.update(|p| p.phase = Phase::Checkpointing);
        let params: Vec<(String, Tensor)> = self
            .engine
            .names
            .iter()
            .cloned()
            .zip(self.engine.masters.iter().map(Tensor::shallow_clone))
            .collect();
        let mut optimizer = Vec::with_capacity(params.len() * 2);
        for (i, name) in self.engine.names.iter().enumerate() {
            optimizer.push((
                format!("exp_avg.{name}"),
                self.optimizer.exp_avg[i].shallow_clone(),
            ));
            optimizer.push((
                format!("exp_avg_sq.{name}"),
                self.optimizer.exp_avg_sq[i].shallow_clone(),
            ));
        }
        let mut files = vec![
            ("model.safetensors".to_string(), params),
            ("optimizer.safetensors".to_string(), optimizer),
        ];
        if micro_step > 0 {
            let grads = self
                .engine
                .names
                .iter()
                .cloned()
                .zip(self.engine.grads.iter().map(Tensor::shallow_clone))
                .collect();
            files.push(("gradients.safetensors".to_string(), grads));
        }
        let position = step * self.cfg.grad_accum as u64 + micro_step;
        let manifest = Manifest {
            format_version: 1,
            step,
            micro_step,
            data_position: position,
            data_seed: self.cfg.seed,
            epoch: position / self.batcher.batches_per_epoch() as u64,
            optimizer_step: self.optimizer.step,
            optimizer: self.optimizer.config,
            partial_loss_sum: partial.0,
            partial_tokens: partial.1,
            config_hash: self.config_hash.clone(),
            config: self.identity.clone(),
            created: rfc3339_now(),
            files: Default::default(),
        };
        let started = Instant::now();
        let dir = checkpoint::write(&self.checkpoint_dir, State { manifest, files })?;
        checkpoint::prune(&self.checkpoint_dir, self.cfg.keep_checkpoints)?;
        tracing::info!(
            checkpoint = %dir.display(), step, micro_step, seconds = started.elapsed().as_secs_f64(),
            "checkpoint written"
        );
        self.opts.reporter.metrics.checkpoints.inc();
        self.opts.reporter.metrics.last_checkpoint_step.set(step as i64);
        self.opts.reporter.update(|p| {
            p.phase = Phase::Training;
            p.last_checkpoint = Some(LastCheckpoint {
                step,
                time: rfc3339_now(),
            });
        });
        Ok(dir)
    }

    /// Loads a verified checkpoint; returns (step, micro_step, partial loss/tokens).
    fn restore(&mut self, dir: &Path, manifest: &Manifest) -> Result<(u64, u64, (f64, u64)), TrainError> {
        if manifest.config_hash != self.config_hash {
            return Err(checkpoint::CheckpointError::ConfigMismatch {
                path: dir.to_path_buf(),
                found: manifest.config_hash.clone(),
                expected: self.config_hash.clone(),
                hint: format!(
                    "changed: {}; resume with the same settings and data, or use --resume never",
                    differences(&manifest.config, &self.identity).join("; ")
                ),
            }
            .into());
        }
        let names = &self.engine.names;
        let masters: Vec<(String, &Tensor)> = names.iter().cloned().zip(&self.engine.masters).collect();
        load_named(dir, "model.safetensors", &masters)?;
        let mut moments: Vec<(String, &Tensor)> = Vec::with_capacity(names.len() * 2);
        for (i, name) in names.iter().enumerate() {
            moments.push((format!("exp_avg.{name}"), &self.optimizer.exp_avg[i]));
            moments.push((format!("exp_avg_sq.{name}"), &self.optimizer.exp_avg_sq[i]));
        }
        load_named(dir, "optimizer.safetensors", &moments)?;
        if manifest.micro_step > 0 {
            let grads: Vec<(String, &Tensor)> = names.iter().cloned().zip(&self.engine.grads).collect();
            load_named(dir, "gradients.safetensors", &grads)?;
        }
        self.optimizer.step = manifest.optimizer_step;
        self.engine.refresh_compute_copy(&self.model.model)?;
        Ok((
            manifest.step,
            manifest.micro_step,
            (manifest.partial_loss_sum, manifest.partial_tokens),
        ))
    }
}

/// Copies the tensors of `file` into `targets` (same names, same shapes, nothing missing or extra).
fn load_named(dir: &Path, file: &str, targets: &[(String, &Tensor)]) -> Result<(), TrainError> {
    let invalid = |detail: String| checkpoint::CheckpointError::Invalid {
        path: dir.join(file),
        detail,
    };
    let mut tensors: std::collections::HashMap<String, Tensor> =
        checkpoint::read_tensors(dir, file)?.into_iter().collect();
    for (name, target) in targets {
        let t = tensors
            .remove(name)
            .ok_or_else(|| invalid(format!("tensor {name} is missing")))?;
        if t.size() != target.size() {
            return Err(invalid(format!(
                "tensor {name} has shape {:?}, the model {:?}",
                t.size(),
                target.size()
            ))
            .into());
        }
        tch::no_grad(|| target.shallow_clone().f_copy_(&t))?;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(invalid(format!("unexpected tensor {extra}")).into());
    }
    Ok(())
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

/// Runs `train` to the end (export) or to a stop (checkpoint written).
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

    let (model, compute_kind) = load_model(cfg, &model_path)?;
    let (samples, report) = prepare_data(cfg, data_path, &model)?;
    let report_path = output.join("data_report.json");
    std::fs::write(
        &report_path,
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .map_err(|e| TrainError::Io {
        path: report_path.clone(),
        source: e,
    })?;
    tracing::info!(
        samples = samples.len(),
        report = %report_path.display(),
        dropped = %report["cleaning"]["dropped"],
        truncated = %report["tokenization"]["truncated_exchanges"],
        "data ready"
    );

    let batcher = Batcher::new(&samples, cfg.micro_batch, cfg.seed, cfg.group_by_length);
    let per_epoch = batcher.batches_per_epoch() as u64;
    let g = cfg.grad_accum as u64;
    let (total_steps, total_micro) = match cfg.max_steps {
        Some(n) => (n, n * g),
        None => {
            let micro = ((cfg.epochs * per_epoch as f64).ceil() as u64).max(1);
            (micro.div_ceil(g), micro)
        }
    };
    let mut identity = cfg.identity(&data_sha);
    identity["model"] = model.config().to_hf_json();
    let config_hash = hash_json(&identity);
    let engine = Engine::new(&model.model, compute_kind, cfg.activation_checkpointing)?;
    let optimizer = AdamW::new(
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
        &engine.masters,
    )?;
    let mut run = Run {
        cfg,
        model,
        engine,
        optimizer,
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
    let mut step_log = open_step_log(&output.join("metrics.jsonl"), step)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut mean_step_seconds: Option<f64> = None;

    while step < total_steps {
        let started = Instant::now();
        let range = run.step_range(step);
        let scale = 1.0 / run.trainable_in_step(step) as f64;
        let mut tokens = 0;
        // The step's summed loss stays on the device until the step ends (no host sync per micro-batch).
        let mut loss_sum = Tensor::f_from_slice(&[partial.0])?
            .f_to_device(run.model.model.device())?
            .f_squeeze()?;
        for position in range.start + micro..range.end {
            let batch = run.micro_batch_at(position)?;
            loss_sum = loss_sum.f_add(&run.engine.micro_step(&run.model.model, &batch, scale)?)?;
            partial.1 += batch.trainable as u64;
            tokens += batch.tokens;
            micro += 1;
            if opts.stop_requested.load(Ordering::SeqCst) && position + 1 < range.end {
                tracing::warn!(step, micro_step = micro, "stop requested: checkpointing mid-step");
                partial.0 = f64::try_from(&loss_sum)?;
                let dir = run.save(step, micro, partial)?;
                opts.reporter.update(|p| p.phase = Phase::Stopped);
                return Ok(Outcome::Stopped {
                    step,
                    checkpoint: dir,
                });
            }
        }
        let update_started = Instant::now();
        let grad_norm = clip_grad_norm(&run.engine.grads, cfg.max_grad_norm)?;
        let lr = cosine_lr(cfg.lr, step, total_steps, cfg.warmup_ratio);
        run.optimizer.step(&run.engine.masters, &run.engine.grads, lr)?;
        run.engine.finish_step(&run.model.model)?;
        tracing::debug!(
            seconds = update_started.elapsed().as_secs_f64(),
            "clip and optimizer update"
        );
        let loss = f64::try_from(&loss_sum)? / partial.1.max(1) as f64;
        let record = StepRecord {
            step: step + 1,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens,
            trainable_tokens: partial.1,
            epoch: range.end as f64 / per_epoch as f64,
            seconds: started.elapsed().as_secs_f64(),
        };
        step += 1;
        micro = 0;
        partial = (0.0, 0);
        let seconds = record.seconds.max(1e-9);
        let mean = mean_step_seconds.map_or(seconds, |m| 0.8 * m + 0.2 * seconds);
        mean_step_seconds = Some(mean);
        let tokens_per_second = tokens as f64 / seconds;
        let eta = mean * (total_steps - step) as f64;
        if let Ok(line) = serde_json::to_string(&record) {
            std::io::Write::write_all(&mut step_log, format!("{line}\n").as_bytes()).map_err(|e| {
                TrainError::Io {
                    path: output.join("metrics.jsonl"),
                    source: e,
                }
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
             tokens/s {tokens_per_second:.0} epoch {:.2} eta {eta:.0}s",
            if tty {
                progress_bar(step, total_steps)
            } else {
                String::new()
            },
            record.epoch,
        );
        let stop = opts.stop_requested.load(Ordering::SeqCst) || opts.stop_at_step == Some(step);
        // The final step is checkpointed too (an export cut short resumes from it), unless no checkpoint is to be
        // kept after the export anyway.
        let last = step == total_steps && cfg.keep_checkpoints > 0;
        if stop || step % cfg.checkpoint_every == 0 || last {
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
    let export_kind = if cfg.export_dtype == "bf16" {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    camelid_model::export_hf_dir(&run.model, &run.output, export_kind)?;
    tracing::info!(output = %run.output.display(), "exported");
    if cfg.keep_checkpoints == 0 {
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
