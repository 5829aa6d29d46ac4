//! `camelid-worker`: serves one model over gRPC (port 50051) with metrics on port 9090 (`camelid_contracts::names`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use camelid_contracts::{names, worker_auth};
use camelid_worker::grpc::{bind, serve_grpc};
use camelid_worker::http::http_router;
use camelid_worker::load::default_served_name;
use camelid_worker::{ModelArgs, WorkerConfig, WorkerHandle};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "camelid-worker",
    version,
    about = "Serve one model over gRPC with continuous batching"
)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,
    /// The model name clients use (default: the model's file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// gRPC address.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], names::WORKER_GRPC_PORT)))]
    listen: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], names::WORKER_HTTP_PORT)))]
    metrics_addr: SocketAddr,
    /// On SIGTERM, keep generating for up to this many seconds (admitting nothing new, readiness false), then end
    /// what is left with an `Interrupted` event, which the gateway continues on another worker. Keep it under the
    /// pod's termination grace period.
    #[arg(long, default_value_t = 20)]
    drain_seconds: u64,
    /// Serve gRPC callers without a token on a non-loopback address. Without this, a worker listening beyond
    /// loopback needs its token in the environment variable CAMELID_WORKER_TOKEN (the operator sets it).
    #[arg(long)]
    allow_unauthenticated: bool,
    #[command(flatten)]
    batching: BatchingArgs,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

#[derive(clap::Args)]
struct BatchingArgs {
    /// Most sequences running together; the KV blocks bound them further.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Requests that may wait for the batch; more get a retryable "overloaded" error.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// The KV block store (MiB). On the CPU its memory is committed only as blocks are first written.
    #[arg(long, default_value_t = 8192)]
    kv_budget_mib: usize,
    /// Tokens computed per step, decodes and prompt chunks together, so long prompts do not stall running
    /// streams.
    #[arg(long, default_value_t = 512)]
    max_step_tokens: usize,
    /// Compute every prompt whole instead of reusing the KV blocks of prefixes seen before.
    #[arg(long)]
    no_prefix_caching: bool,
    /// A LoRA adapter to serve from the start, `NAME=PEFT_DIR` (repeatable; vLLM's flag). Clients ask for it by
    /// NAME in `model`; more load at run time through the gateway.
    #[arg(long, value_parser = camelid_worker::adapters::parse_module)]
    lora_modules: Vec<(String, std::path::PathBuf)>,
    /// Most LoRA adapters kept loaded; loading another evicts the least recently requested.
    #[arg(long, default_value_t = 8)]
    max_loras: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = camelid_telemetry::init("camelid-worker", &cli.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), (anyhow::Error, u8)> {
    let user = |e: anyhow::Error| (e, 2u8);
    let token = std::env::var(worker_auth::TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    if let Some(warning) = open_check(cli.listen, token.is_some(), cli.allow_unauthenticated).map_err(user)? {
        tracing::warn!("{warning}");
    }
    let path = cli.model.path().map_err(|e| user(e.into()))?;
    let config = WorkerConfig {
        name: cli
            .served_model_name
            .unwrap_or_else(|| default_served_name(&path)),
        max_batch: cli.batching.max_batch.max(1),
        max_waiting: cli.batching.max_waiting,
        kv_budget_bytes: cli.batching.kv_budget_mib << 20,
        max_step_tokens: cli.batching.max_step_tokens.max(1),
        prefix_caching: !cli.batching.no_prefix_caching,
        lora_modules: cli.batching.lora_modules,
        max_loras: cli.batching.max_loras.max(1),
    };
    let model = cli.model.clone();
    let handle = WorkerHandle::start(config, move || Ok(model.load()?)).map_err(|e| (e.into(), 1))?;
    let grpc = bind(cli.listen).await.map_err(|e| user(e.into()))?;
    let http = bind(cli.metrics_addr).await.map_err(|e| user(e.into()))?;
    tracing::info!(grpc = %cli.listen, metrics = %cli.metrics_addr, "listening; loading the model");
    let router = http_router(handle.clone());
    tokio::spawn(async move { axum::serve(http, router).await });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_grpc(handle.clone(), grpc, token, async {
        let _ = stop_rx.await;
    }));
    // A model that fails to load is a configuration error: exit so the pod restarts or the user sees it.
    handle.wait_ready().await.map_err(|e| user(anyhow::anyhow!(e)))?;
    camelid_telemetry::shutdown_signal().await;
    drain(&handle, Duration::from_secs(cli.drain_seconds)).await;
    let _ = stop_tx.send(());
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((e.into(), 1)),
        Err(e) => Err((e.into(), 1)),
    }
}

/// Stops admitting, lets running requests go on for up to `grace`, then interrupts the rest (their callers
/// continue them elsewhere).
async fn drain(handle: &WorkerHandle, grace: Duration) {
    let in_flight = handle.in_flight();
    tracing::info!(
        in_flight,
        grace_seconds = grace.as_secs(),
        "draining: admitting nothing new"
    );
    handle.drain();
    let deadline = tokio::time::Instant::now() + grace;
    while handle.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = handle.in_flight();
    if left > 0 {
        tracing::warn!(
            left,
            "drain deadline: interrupting the rest for other workers to continue"
        );
        handle.interrupt_all().await;
        // The interrupted streams end at once; give their last events a moment to leave.
        let flush = tokio::time::Instant::now() + Duration::from_secs(2);
        while handle.in_flight() > 0 && tokio::time::Instant::now() < flush {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether the worker may serve gRPC on `listen` without a token: on loopback it may (with a warning), elsewhere
/// only when told to. The `Ok` value is the warning to log.
fn open_check(listen: SocketAddr, has_token: bool, allow: bool) -> anyhow::Result<Option<String>> {
    if has_token {
        return Ok(None);
    }
    if listen.ip().is_loopback() || allow {
        return Ok(Some(format!(
            "no {}: serving gRPC to anyone who can reach {listen}",
            worker_auth::TOKEN_ENV
        )));
    }
    anyhow::bail!(
        "refusing to serve gRPC on {listen} without a token: set {} (the operator does) or pass \
         --allow-unauthenticated",
        worker_auth::TOKEN_ENV
    )
}
