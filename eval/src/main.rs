//! `camelid-eval`: `camelid eval` as a binary of its own, without libtorch, for machines that only call
//! endpoints (a CI job, the evaluation Job's gate container).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "camelid-eval",
    version,
    about = "Judge-model evaluation against OpenAI-compatible endpoints"
)]
struct Cli {
    #[command(flatten)]
    eval: camelid_eval::cli::EvalArgs,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = camelid_telemetry::init("camelid-eval", &cli.telemetry);
    match camelid_eval::cli::run(cli.eval) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("camelid-eval: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
