//! `camelid-operator`: prints camelid's CRDs (`crds`); the controllers land with the FineTuneJob issue.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "camelid-operator", version, about = "camelid's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the FineTuneJob and ChatModel CRDs as YAML, or writes one file each into `--out`.
    Crds {
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crds { out } => match write_crds(out.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
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
