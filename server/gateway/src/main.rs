//! `camelid-gateway`: the OpenAI-compatible HTTP front of camelid's workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use camelid_gateway::GatewayConfig;
use camelid_gateway::guardrails::Guardrails;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "camelid-gateway",
    version,
    about = "OpenAI-compatible gateway for camelid workers"
)]
struct Cli {
    /// A YAML config file (`listen`, `models: {NAME: [ADDR...]}`, `limits`, `probe_interval_ms`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve HTTP on (overrides the config file; default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A model and its workers' gRPC addresses: NAME=HOST:PORT[,HOST:PORT...] (repeatable).
    #[arg(long)]
    backend: Vec<String>,
    /// How often workers are health-checked (milliseconds).
    #[arg(long)]
    probe_interval_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAMELID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match &cli.config {
        Some(path) => match GatewayConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(&e, 2),
        },
        None => GatewayConfig::default(),
    };
    for flag in &cli.backend {
        if let Err(e) = config.add_backend_flag(flag) {
            return fail(&e, 2);
        }
    }
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(ms) = cli.probe_interval_ms {
        config.probe_interval = std::time::Duration::from_millis(ms.max(50));
    }
    if config.endpoints.is_empty() {
        return fail(
            &"no models configured: pass --backend NAME=ADDR or --config FILE",
            2,
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e, 1),
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("binding {}: {e}", config.listen), 2),
        };
        let state = camelid_gateway::state(&config, Guardrails::default());
        state.router.probe_all().await;
        tracing::info!(listen = %config.listen, models = ?config.endpoints.keys().collect::<Vec<_>>(), "gateway listening");
        match camelid_gateway::serve(state, listener, camelid_gateway::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        }
    })
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
