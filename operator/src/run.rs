//! `camelid-operator run`: the FineTuneJob and ChatModel controllers, their health and metrics endpoints, leader election and
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::routing::get;
use kube::Client;

use crate::chatmodel;
use crate::chatmodel::load::Gateways;
use crate::finetunejob::controller::{self, Context};
use crate::metrics::Metrics;
use crate::settings::Settings;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The operator's own namespace (its lease and the GPU prices ConfigMap live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "camelid-system")]
    pub namespace: String,
    /// The ConfigMap of GPU prices (`<gpuType>.spot` and `<gpuType>.on-demand`, dollars per GPU-hour).
    #[arg(long)]
    pub gpu_prices: Option<String>,
    #[arg(long, default_value_t = Settings::default().trainer_image)]
    pub trainer_image: String,
    #[arg(long, default_value_t = Settings::default().fetch_image)]
    pub fetch_image: String,
    #[arg(long, default_value_t = Settings::default().worker_image)]
    pub worker_image: String,
    /// The image of FineTuneJobs' evaluation pods when their `evaluation.image` is unset (default: the worker
    /// image, which has the `camelid` command).
    #[arg(long)]
    pub eval_image: Option<String>,
    /// The gateway Service in the operator's namespace: its pods report each model's load.
    #[arg(long, default_value = "camelid-gateway")]
    pub gateway_service: String,
    /// Seconds between autoscaling decisions for each ChatModel.
    #[arg(long, default_value_t = 5)]
    pub autoscale_seconds: u64,
    /// Seconds a trainer has to write its termination checkpoint.
    #[arg(long, default_value_t = 180)]
    pub termination_grace_seconds: i64,
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Reconcile only while holding the `camelid-operator` Lease.
    #[arg(long)]
    pub leader_election: bool,
    /// Image prefixes a spec's `image` (FineTuneJob, its evaluation, ChatModel) may start with, comma-separated
    /// (the operator's own `--*-image`s are always allowed). A prefix not ending in `/`, `:` or `@` is a whole
    /// repository.
    #[arg(long, value_delimiter = ',', default_value = "ghcr.io/camelid-dev/")]
    pub allowed_image_prefixes: Vec<String>,
    /// PriorityClasses a FineTuneJob's `priorityClassName` may name, comma-separated (default: none).
    #[arg(long, value_delimiter = ',')]
    pub allowed_priority_classes: Vec<String>,
    /// Taint keys a spec's `spot.tolerations` may tolerate, comma-separated; `*` allows any (default: the spot
    /// pools' and GPU nodes' taints the operator itself tolerates).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cloud.google.com/gke-spot,kubernetes.azure.com/scalesetpriority,nvidia.com/gpu"
    )]
    pub allowed_toleration_keys: Vec<String>,
    /// Allow `http://` model URIs (in-cluster mirrors, tests); otherwise only `https://`.
    #[arg(long)]
    pub allow_http_model_uris: bool,
    /// The most bytes a model download may have (a spec's `maxBytes` may only lower it).
    #[arg(long, default_value_t = crate::policy::DEFAULT_MAX_MODEL_BYTES)]
    pub max_model_bytes: u64,
    /// The trainers' `/progress` port (tests point it elsewhere).
    #[arg(long, default_value_t = 8090, hide = true)]
    pub progress_port: u16,
    /// Seconds between reads of a running job's progress.
    #[arg(long, default_value_t = 15)]
    pub progress_poll_seconds: u64,
    /// The install's secret for workers' tokens: from the environment (CAMELID_WORKER_SECRET), never a flag.
    #[arg(skip)]
    pub worker_secret: Option<camelid_contracts::worker_auth::InstallSecret>,
}

impl Default for RunArgs {
    /// `camelid-operator run` with no flags: the command line's own defaults, so they are written once.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: RunArgs,
        }
        <Command as clap::Parser>::try_parse_from(["run"])
            .map(|c| c.args)
            .unwrap_or_else(|e| e.exit())
    }
}

impl RunArgs {
    /// The policy the flags describe (empty items, as `--allowed-priority-classes=` gives, dropped).
    pub fn policy(&self) -> crate::policy::Policy {
        let list = |items: &[String]| -> Vec<String> {
            items
                .iter()
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect()
        };
        crate::policy::Policy {
            image_prefixes: list(&self.allowed_image_prefixes),
            priority_classes: list(&self.allowed_priority_classes),
            toleration_keys: list(&self.allowed_toleration_keys),
            allow_http_uris: self.allow_http_model_uris,
            max_model_bytes: self.max_model_bytes,
        }
    }
}

pub async fn run(args: RunArgs, client: Client) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let settings = Settings {
        trainer_image: args.trainer_image.clone(),
        fetch_image: args.fetch_image.clone(),
        termination_grace_seconds: args.termination_grace_seconds,
        worker_image: args.worker_image.clone(),
        eval_image: args
            .eval_image
            .clone()
            .unwrap_or_else(|| args.worker_image.clone()),
        policy: args.policy(),
        worker_secret: args.worker_secret.clone(),
    };
    if settings.worker_secret.is_none() {
        tracing::warn!(
            "no {}: ChatModels' workers run without authentication (any pod that reaches them may use them)",
            camelid_contracts::worker_auth::SECRET_ENV
        );
    }
    let prices = args.gpu_prices.clone().map(|name| (args.namespace.clone(), name));
    let gateways = Gateways::new(args.namespace.clone(), args.gateway_service.clone())
        .context("building the HTTP client that reads the gateways' load")?;
    let mut serving =
        chatmodel::controller::Context::new(client.clone(), settings.clone(), gateways, metrics.clone());
    serving.period = std::time::Duration::from_secs(args.autoscale_seconds.max(1));
    let mut ctx = Context::new(client.clone(), settings, prices, metrics.clone())
        .context("building the HTTP client that reads the trainers' progress")?;
    ctx.progress_port = args.progress_port;
    ctx.poll = std::time::Duration::from_secs(args.progress_poll_seconds.max(1));
    let m = metrics.clone();
    let metrics_app = axum::Router::new().route("/metrics", get(move || async move { m.encode() }));
    let health_app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    let health_listener = tokio::net::TcpListener::bind(args.health_addr).await?;
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    tokio::spawn(async move { axum::serve(health_listener, health_app).await });
    let identity =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("camelid-operator-{}", std::process::id()));
    let lost = if args.leader_election {
        let since =
            crate::lease::acquire(client.clone(), &args.namespace, "camelid-operator", &identity).await?;
        let hold = crate::lease::hold(
            client.clone(),
            args.namespace.clone(),
            "camelid-operator".into(),
            identity,
            since,
        );
        Some(tokio::spawn(hold))
    } else {
        None
    };
    let shutdown = camelid_telemetry::shutdown_signal();
    // Both controllers stop together: gracefully on a signal (reconciles in flight finish).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stopping = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    tracing::info!("camelid-operator reconciling FineTuneJobs and ChatModels");
    let controllers = async {
        tokio::join!(
            controller::run(Arc::new(ctx), stopping()),
            chatmodel::controller::run(Arc::new(serving), stopping()),
        );
    };
    match lost {
        None => controllers.await,
        // Leadership lost: the controllers are dropped at once, reconciles in flight included, rather than
        // finishing them while another replica may already lead; the process exits and is restarted as a
        // standby.
        Some(lost) => tokio::select! {
            () = controllers => {}
            _ = lost => anyhow::bail!("lost the camelid-operator lease: stopped reconciling"),
        },
    }
    Ok(())
}
