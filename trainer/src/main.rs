//! `camelid-trainer`: prepare data and fine-tune a LLaMA-family model (see `docs/design.md` for the exit codes and
//! the `/progress` contract the operator relies on).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use camelid_contracts::TrainerSettings;
use camelid_contracts::exit;
use camelid_trainer::TrainError;
use camelid_trainer::config::{Device, TrainConfig};
use camelid_trainer::launch::{self, Plan};
use camelid_trainer::progress::{self, Phase, Reporter};
use camelid_trainer::torchrun::DistEnv;
use camelid_trainer::train::{self, Outcome, Resume, RunOptions};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "camelid-trainer", version, args_override_self = true)]
#[command(about = "Vicuna-style fine-tuning with exact checkpoint-resume")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Clean, split and tokenize a dataset; writes data_report.json and samples.jsonl into --output.
    Prepare(Settings),
    /// Fine-tune; exits 0 when exported, 75 after a stop checkpoint, 2 on bad input.
    Train {
        #[command(flatten)]
        settings: Settings,
        /// `auto` (newest complete checkpoint, if any), `never`, or a checkpoint folder.
        #[arg(long, default_value = "auto")]
        resume: String,
        /// Serve GET /progress and /metrics here (HOST:PORT); under `launch`, local rank 0 serves them.
        #[arg(long)]
        progress_addr: Option<String>,
        /// Checkpoint and exit with 75 after step N, as on a termination notice (for drills and tests).
        #[arg(long)]
        stop_at_step: Option<u64>,
    },
    /// Start N ranks of `train` on this machine as one gang (torchrun's environment: RANK, WORLD_SIZE,
    /// MASTER_ADDR, ...); e.g. `launch --nproc 2 -- train --data d.json --output out`.
    Launch {
        /// Ranks to start here.
        #[arg(long)]
        nproc: usize,
        /// Rendezvous port on rank 0's host (default: MASTER_PORT, else 29500).
        #[arg(long)]
        master_port: Option<u16>,
        /// After a rank fails, how long the others get to exit on their own before they are killed.
        #[arg(long, default_value = "30")]
        grace_seconds: u64,
        /// `train` and its flags.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// Every training setting: a flag overrides the config file, which overrides Vicuna's defaults.
#[derive(Args)]
struct Settings {
    /// YAML or JSON file with any of the settings below (camelCase: `maxLength`, `learningRate`, ...).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: TrainerSettings,
}

impl Settings {
    fn resolve(&self) -> Result<TrainConfig, TrainError> {
        let file = match &self.config {
            Some(path) => TrainConfig::read_file(path).map_err(TrainError::Config)?,
            None => TrainerSettings::default(),
        };
        TrainConfig::from_settings(&[&file, &self.flags]).map_err(TrainError::Config)
    }
}

fn prepare(settings: &Settings) -> Result<(), TrainError> {
    let cfg = settings.resolve()?;
    cfg.validate().map_err(TrainError::Config)?;
    let data = cfg
        .data
        .as_ref()
        .ok_or_else(|| TrainError::Config("--data is required".into()))?;
    let output = cfg
        .output
        .as_ref()
        .ok_or_else(|| TrainError::Config("--output is required".into()))?;
    let model_path = match &cfg.model {
        Some(p) => p.clone(),
        None => camelid_model::default_model_path()?,
    };
    let (model, _) = train::load_model(
        &TrainConfig {
            device: Device::Cpu,
            ..cfg.clone()
        },
        &model_path,
        0,
    )?;
    let (samples, report) = train::prepare_data(&cfg, data, &model)?;
    let io = |path: PathBuf| move |source| TrainError::Io { path, source };
    std::fs::create_dir_all(output).map_err(io(output.clone()))?;
    let report_path = output.join("data_report.json");
    let report_text = serde_json::to_string_pretty(&report)
        .map_err(|e| TrainError::Config(format!("the data report is not JSON: {e}")))?;
    std::fs::write(&report_path, &report_text).map_err(io(report_path.clone()))?;
    let samples_path = output.join("samples.jsonl");
    let lines: String = samples
        .iter()
        .map(|s| {
            serde_json::json!({"id": s.id, "tokens": s.ids.len(), "trainable_tokens": s.trainable_tokens(),
                               "ids": s.ids, "labels": s.labels})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&samples_path, lines).map_err(io(samples_path.clone()))?;
    println!("{report_text}");
    eprintln!("wrote {} and {}", report_path.display(), samples_path.display());
    Ok(())
}

fn run_train(
    settings: &Settings,
    resume: &str,
    progress_addr: Option<&str>,
    stop_at_step: Option<u64>,
) -> anyhow::Result<i32> {
    let cfg = settings.resolve()?;
    let stop_requested = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        // A second signal while the checkpoint is being written ends the process at once.
        signal_hook::flag::register_conditional_shutdown(signal, exit::FAILED, stop_requested.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, stop_requested.clone()).context("installing signal handlers")?;
    }
    let reporter = Arc::new(Reporter::default());
    let dist = DistEnv::from_vars(|k| std::env::var(k).ok())?;
    // Several ranks in one pod share its address: the pod's first rank serves the progress.
    let serves_progress = dist.as_ref().is_none_or(|d| d.local_rank == 0);
    if let Some(addr) = progress_addr.filter(|_| serves_progress) {
        let bound = progress::serve(addr, reporter.clone()).map_err(TrainError::Config)?;
        tracing::info!(%bound, "serving /progress and /metrics");
    }
    let resume = match resume {
        "auto" => Resume::Auto,
        "never" => Resume::Never,
        path => Resume::Path(PathBuf::from(path)),
    };
    let opts = RunOptions {
        resume,
        stop_at_step,
        stop_requested,
        reporter: reporter.clone(),
        dist,
    };
    match train::train(&cfg, &opts) {
        Ok(Outcome::Finished { steps, export }) => {
            tracing::info!(steps, export = %export.display(), "finished");
            Ok(0)
        }
        Ok(Outcome::Stopped { step, checkpoint }) => {
            tracing::warn!(step, checkpoint = %checkpoint.display(), "stopped after a complete checkpoint; \
                rerun with --resume auto to continue (exit code {})", exit::STOPPED);
            Ok(exit::STOPPED)
        }
        Err(e) => {
            reporter.update(|p| p.phase = Phase::Failed);
            Err(e.into())
        }
    }
}

fn run_launch(
    nproc: usize,
    master_port: Option<u16>,
    grace_seconds: u64,
    command: &[String],
) -> anyhow::Result<i32> {
    if command.first().map(String::as_str) != Some("train") {
        return Err(TrainError::Config(format!(
            "launch starts `train` ranks: expected `-- train ...`, got `-- {}`",
            command.join(" ")
        ))
        .into());
    }
    let plan = Plan::from_vars(nproc, master_port, |k| std::env::var(k).ok()).map_err(TrainError::Config)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let program = std::env::current_exe().context("finding camelid-trainer's own path")?;
    Ok(launch::run(
        &plan,
        &program,
        command,
        &stop,
        std::time::Duration::from_secs(grace_seconds),
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = camelid_telemetry::init("camelid-trainer", &cli.telemetry);
    let result = match &cli.command {
        Command::Prepare(settings) => prepare(settings).map(|()| 0).map_err(anyhow::Error::from),
        Command::Train {
            settings,
            resume,
            progress_addr,
            stop_at_step,
        } => run_train(settings, resume, progress_addr.as_deref(), *stop_at_step),
        Command::Launch {
            nproc,
            master_port,
            grace_seconds,
            command,
        } => run_launch(*nproc, *master_port, *grace_seconds, command),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let code = e
                .downcast_ref::<TrainError>()
                .map_or(exit::FAILED, TrainError::exit_code);
            let category = e
                .downcast_ref::<TrainError>()
                .map_or("internal", TrainError::category);
            eprintln!("error: {e:#}");
            tracing::debug!(category, "exiting with {code}");
            ExitCode::from(code as u8)
        }
    }
}
