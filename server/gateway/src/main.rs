//! `camelid-gateway`: the OpenAI-compatible HTTP front of camelid's workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use camelid_gateway::{ConfigError, GatewayConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "camelid-gateway",
    version,
    about = "OpenAI-compatible gateway for camelid workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML config file: `listen`, `models`, `adapters`, `limits`, `probe_interval_ms`, `moderation`, `keys`,
    /// `keys_file`, `allow_anonymous`. Reloaded when it (or a file it names) changes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve HTTP on (overrides the config file; default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address to serve `/metrics`, `/internal/load` and the probes on, apart from the API (overrides the
    /// config file's `admin_listen`; default 127.0.0.1:9091; in a cluster 0.0.0.0:9091, for the operator).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// A model and its workers' gRPC addresses: NAME=HOST:PORT[,HOST:PORT...] (repeatable).
    #[arg(long)]
    backend: Vec<String>,
    /// How often workers are health-checked (milliseconds).
    #[arg(long)]
    probe_interval_ms: Option<u64>,
    /// Serve without API keys on a non-loopback address.
    #[arg(long)]
    allow_anonymous: bool,
    /// No moderation at all, whatever the config says (without this, a config without `moderation` gets the
    /// built-in profile `builtin`).
    #[arg(long)]
    no_moderation: bool,
    /// How often the config file is checked for changes (milliseconds; 0: never).
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Serve the cluster's ChatModels: route to their ready workers (EndpointSlices), follow their moderation
    /// profile and allowed keys. Uses the in-cluster service account, or KUBECONFIG.
    #[arg(long)]
    discover_chatmodels: bool,
    /// Only ChatModels in this namespace (default: all namespaces).
    #[arg(long, requires = "discover_chatmodels")]
    watch_namespace: Option<String>,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Prints a new random API key and the `keys` entry that stores its hash (the key itself is never stored).
    NewKey {
        /// Who the key is for (shown in logs and metrics instead of the key).
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::NewKey { name }) = &cli.command {
        let (key, hash) = camelid_gateway::keys::new_key();
        println!("key (give it to {name}; it is not shown again): {key}");
        println!("entry for `keys`:\n- name: {name}\n  sha256: {hash}");
        return ExitCode::SUCCESS;
    }
    let _telemetry = camelid_telemetry::init("camelid-gateway", &cli.telemetry);
    let backends = cli.backend.clone();
    let (listen, probe, allow) = (cli.listen, cli.probe_interval_ms, cli.allow_anonymous);
    let no_moderation = cli.no_moderation;
    let admin_listen = cli.admin_listen;
    let worker_secret = match camelid_gateway::routing::WorkerSecret::from_env() {
        Ok(secret) => secret,
        Err(e) => return fail(&e, 2),
    };
    let overrides: camelid_gateway::reload::Overrides = Arc::new(move |config: &mut GatewayConfig| {
        for flag in &backends {
            config.add_backend_flag(flag)?;
        }
        if let Some(listen) = listen {
            config.listen = listen;
        }
        if let Some(admin) = admin_listen {
            config.admin_listen = admin;
        }
        if let Some(ms) = probe {
            config.probe_interval = Duration::from_millis(ms.max(50));
        }
        config.allow_anonymous |= allow;
        config.worker_secret = worker_secret.clone();
        if no_moderation {
            config.policy.moderation = camelid_gateway::policy::ModerationSpec::off();
        }
        Ok::<(), ConfigError>(())
    });
    let mut config = match &cli.config {
        Some(path) => match GatewayConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => return fail(&e, 2),
        },
        None => GatewayConfig::default(),
    };
    if let Err(e) = overrides(&mut config) {
        return fail(&e, 2);
    }
    if config.endpoints.is_empty() && !cli.discover_chatmodels {
        return fail(
            &"no models configured: pass --backend NAME=ADDR, --config FILE or --discover-chatmodels",
            2,
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e, 1),
    };
    runtime.block_on(async move {
        let discovered = if cli.discover_chatmodels {
            let client = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => return fail(&format!("--discover-chatmodels: no Kubernetes client: {e}"), 2),
            };
            let found = Arc::new(camelid_gateway::routing::StaticEndpoints::new(Default::default()));
            let rules = camelid_gateway::discovery::ModelRules::default();
            camelid_gateway::discovery::spawn(
                client,
                cli.watch_namespace.clone(),
                found.clone(),
                rules.clone(),
            );
            Some((found, rules))
        } else {
            None
        };
        let state = match camelid_gateway::state_with(&config, discovered) {
            Ok(state) => state,
            Err(e) => return fail(&e, 2),
        };
        let has_keys = !state.policy.current().keys.is_empty();
        match camelid_gateway::anonymous_check(config.listen, has_keys, config.allow_anonymous) {
            Ok(Some(warning)) => tracing::warn!("{warning}"),
            Ok(None) => {}
            Err(e) => return fail(&e, 2),
        }
        if config.admin_listen == config.listen {
            return fail(
                &format!("`admin_listen` must differ from `listen` ({})", config.listen),
                2,
            );
        }
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("binding {}: {e}", config.listen), 2),
        };
        let admin = match tokio::net::TcpListener::bind(config.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    &format!("binding the admin address {}: {e}", config.admin_listen),
                    2,
                );
            }
        };
        state.router.probe_all().await;
        if let (Some(path), true) = (&cli.config, cli.reload_interval_ms > 0) {
            let interval = Duration::from_millis(cli.reload_interval_ms.max(100));
            camelid_gateway::reload::spawn(path.clone(), overrides, state.clone(), config.clone(), interval);
        }
        tracing::info!(listen = %config.listen, admin = %config.admin_listen,
            models = ?config.endpoints.keys().collect::<Vec<_>>(), "gateway listening");
        let limits = state.server;
        let served = camelid_gateway::serve::serve_api_and_admin(
            (camelid_gateway::app(state.clone()), listener),
            (camelid_gateway::handlers::admin_app(state), admin),
            limits,
            camelid_telemetry::shutdown_signal(),
        )
        .await;
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e, 1),
        }
    })
}

fn fail(e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
