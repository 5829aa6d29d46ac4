//! The `train` command: data → model → steps → checkpoints → export, with resume and the spot-notice path.
//!
//! [`train`] runs the phases in order, each in its own place: `prepare` checks the settings, loads the model and
//! the data and joins the gang; `run` sets up the state the loop carries and resumes it from a checkpoint (and
//! saves and restores it); `steps` runs the step loop with its checkpoints and reports; `export` (here) writes the
//! trained model and cleans up.

mod prepare;
mod run;
mod steps;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tch::Kind;

pub use self::prepare::{load_model, prepare_data};
use self::run::Run;
use self::steps::LoopEnd;
pub use self::steps::StepRecord;
use crate::checkpoint;
use crate::config::{ExportDtype, TrainConfig};
use crate::error::TrainError;
use crate::progress::{Phase, Reporter};
use crate::torchrun::DistEnv;

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

/// Runs `train` to the end (export) or to a stop (checkpoint written). With [`RunOptions::dist`], every rank of
/// the gang runs this together: rank 0 alone writes the data report, the metrics log and the export.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<Outcome, TrainError> {
    let prepared = prepare::prepare(cfg, opts)?;
    let mut run = Run::set_up(cfg, opts, prepared)?;
    let start = run.resume()?;
    match steps::train_steps(&mut run, start)? {
        LoopEnd::Stopped { step, checkpoint } => Ok(Outcome::Stopped { step, checkpoint }),
        LoopEnd::Done { steps } => export(run, steps),
    }
}

/// The last phase: makes the model whole and writes it (rank 0) in the export dtype, removes the checkpoints when
/// none is to be kept, and reports the run finished.
fn export(mut run: Run<'_>, steps: u64) -> Result<Outcome, TrainError> {
    let (cfg, opts) = (run.cfg, run.opts);
    let leader = run.comm.is_leader();
    opts.reporter.update(|p| p.phase = Phase::Exporting);
    let export_kind = if cfg.export_dtype == ExportDtype::Bf16 {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    run.engine.prepare_export(&mut run.model.model, export_kind)?;
    if let Some(adapter) = run.engine.adapter() {
        if leader {
            export_lora(cfg, &mut run.model, adapter, &run.output, export_kind)?;
        }
    } else if leader {
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
        steps,
        export: run.output,
    })
}

/// A LoRA run's export: the adapter in PEFT's layout in `output`, and with `loraMerge` the base with the adapter
/// merged in as a full HF directory in `output/merged`.
fn export_lora(
    cfg: &TrainConfig,
    model: &mut camelid_model::LoadedModel,
    adapter: &camelid_model::lora::LoraAdapter,
    output: &Path,
    kind: Kind,
) -> Result<(), TrainError> {
    adapter.write_peft(output, &model.source.display().to_string())?;
    tracing::info!(output = %output.display(), mb = adapter.weight_bytes() as f64 / 1e6, "adapter exported");
    if cfg.lora_merge {
        model.model.detach_lora();
        model.model.merge_lora(adapter)?;
        let merged = output.join("merged");
        camelid_model::export_hf_dir(model, &merged, kind)?;
        tracing::info!(output = %merged.display(), "merged model exported");
    }
    Ok(())
}

/// Writes `value` as pretty JSON into `path`.
fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(path, text).map_err(io)
}
