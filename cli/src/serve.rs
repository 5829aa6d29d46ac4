//! `camelid serve`: a worker and the gateway in one process, for local use. The worker serves gRPC on a loopback
//! port of its own and the gateway routes to it, so this runs exactly the code paths of a deployment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use camelid_gateway::GatewayConfig;
use camelid_worker::grpc::{bind, serve_grpc};
use camelid_worker::http::http_router;
use camelid_worker::load::default_served_name;
use camelid_worker::{ModelArgs, WorkerConfig, WorkerHandle};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = camelid_contracts::names::GATEWAY_PORT)]
    port: u16,
    /// Port on the loopback address for `/metrics`, `/internal/load`, the probes and the worker's own
    /// `/worker/metrics`, kept off the API port (default: a free port, printed at start).
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
    /// The model name clients use (default: the model's file or directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences running together; the KV blocks bound them further.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Compute every prompt whole instead of reusing the KV blocks of prefixes seen before.
    #[arg(long)]
    no_prefix_caching: bool,
    /// The gateway's YAML config (moderation, API keys, limits; its `models` and `listen` are ignored), reloaded
    /// when it changes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve without API keys on a non-loopback address.
    #[arg(long)]
    allow_anonymous: bool,
    /// No moderation at all. Without it (and without a config's `moderation`), the built-in profile `builtin`
    /// moderates input and output.
    #[arg(long)]
    no_moderation: bool,
}

type Failed = (anyhow::Error, u8);

pub fn run(args: &ServeArgs) -> Result<(), Failed> {
    let runtime = tokio::runtime::Runtime::new().map_err(|e| (e.into(), 1))?;
    runtime.block_on(serve(args))
}

async fn serve(args: &ServeArgs) -> Result<(), Failed> {
    let user = |e: anyhow::Error| (e, 2u8);
    let path = args.model.path().map_err(|e| user(e.into()))?;
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_served_name(&path));
    let config = WorkerConfig {
        name: name.clone(),
        max_batch: args.max_batch.max(1),
        prefix_caching: !args.no_prefix_caching,
        ..WorkerConfig::default()
    };
    let model = args.model.clone();
    let handle = WorkerHandle::start(config, move || Ok(model.load()?)).map_err(|e| (e.into(), 1))?;
    handle.wait_ready().await.map_err(|e| user(e.into()))?;
    let grpc = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| (e.into(), 1))?;
    let grpc_addr = grpc.local_addr().map_err(|e| (e.into(), 1))?;
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    // The worker's port is on loopback but open to every local user: it serves only this process's gateway, which
    // alone knows the random secret its token derives from.
    let secret = camelid_gateway::keys::new_key().0;
    let token = camelid_contracts::worker_auth::token_for(secret.as_bytes(), &name);
    let worker_secret =
        camelid_gateway::routing::WorkerSecret::new(&secret).map_err(|e| (anyhow::anyhow!(e), 1))?;
    let worker = tokio::spawn(serve_grpc(handle.clone(), grpc, Some(token), async {
        let _ = worker_stopped.await;
    }));

    let listen = SocketAddr::new(args.host, args.port);
    let backend = format!("{name}={grpc_addr}");
    let (allow, no_moderation) = (args.allow_anonymous, args.no_moderation);
    // The served model and address replace whatever the file says, at start and on every reload.
    let overrides: camelid_gateway::reload::Overrides = Arc::new(move |config: &mut GatewayConfig| {
        config.listen = listen;
        config.endpoints.clear();
        config.allow_anonymous |= allow;
        config.worker_secret = worker_secret.clone();
        if no_moderation {
            config.policy.moderation = camelid_gateway::policy::ModerationSpec::off();
        }
        config.add_backend_flag(&backend)
    });
    let mut gateway = match &args.config {
        Some(path) => GatewayConfig::from_file(path).map_err(|e| user(e.into()))?,
        None => GatewayConfig::default(),
    };
    overrides(&mut gateway).map_err(|e| (e.into(), 1))?;
    let state = camelid_gateway::state(&gateway).map_err(|e| user(e.into()))?;
    let has_keys = !state.policy.current().keys.is_empty();
    if let Some(warning) = camelid_gateway::anonymous_check(listen, has_keys, gateway.allow_anonymous)
        .map_err(|e| user(anyhow::anyhow!(e)))?
    {
        eprintln!("camelid serve: warning: {warning}");
    }
    state.router.probe_all().await;
    if let Some(path) = &args.config {
        camelid_gateway::reload::spawn(
            path.clone(),
            overrides,
            state.clone(),
            gateway.clone(),
            Duration::from_secs(1),
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| user(anyhow::anyhow!("binding {listen}: {e}")))?;
    let admin_listen = SocketAddr::from(([127, 0, 0, 1], args.admin_port));
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .map_err(|e| user(anyhow::anyhow!("binding the admin address {admin_listen}: {e}")))?;
    let admin_addr = admin.local_addr().map_err(|e| (e.into(), 1))?;
    let limits = state.server;
    let api = camelid_gateway::app(state.clone());
    let admin_app = camelid_gateway::handlers::admin_app(state).nest("/worker", http_router(handle));
    eprintln!(
        "camelid serve: model `{name}` at http://{listen}/v1 (metrics at http://{admin_addr}/metrics, the \
         worker's at /worker/metrics); Ctrl-C stops"
    );
    camelid_gateway::serve::serve_api_and_admin(
        (api, listener),
        (admin_app, admin),
        limits,
        camelid_telemetry::shutdown_signal(),
    )
    .await
    .map_err(|e| (e.into(), 1))?;
    let _ = stop_worker.send(());
    let _ = worker.await;
    Ok(())
}
