//! `camelid-operator`: `run` reconciles FineTuneJobs; `crds` prints camelid's CRDs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "camelid-operator", version, about = "camelid's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the controllers against the cluster in the environment (in-cluster config or KUBECONFIG).
    Run(Box<camelid_operator::run::RunArgs>),
    /// Prints the FineTuneJob and ChatModel CRDs as YAML, or writes one file each into `--out`.
    Crds {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let _telemetry = camelid_telemetry::init("camelid-operator", &cli.telemetry);
            run(*args)
        }
        Command::Crds { out } => match write_crds(out.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(mut args: camelid_operator::run::RunArgs) -> ExitCode {
    args.worker_secret = match camelid_contracts::worker_auth::InstallSecret::from_env() {
        Ok(secret) => secret,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let client = kube::Client::try_default().await?;
        camelid_operator::run::run(args, client).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_crds(out: Option<&std::path::Path>) -> anyhow::Result<()> {
    match out {
        None => print!("{}", camelid_operator::crdgen::crds_yaml()?),
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            for (name, yaml) in camelid_operator::crdgen::crd_files()? {
                std::fs::write(dir.join(&name), yaml)?;
                eprintln!("wrote {}", dir.join(name).display());
            }
        }
    }
    Ok(())
}
