//! camelid's OpenAI-compatible gateway (no libtorch): `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/v1/moderations`, a chat page at `/`, health and metrics, routing each request to the least-busy ready worker
//! of its model over gRPC.
//!
//! The request pipeline ([`api`]): authenticate ([`keys`]) → read the body (size-limited) → parse ([`openai`] wire
//! types) → validate ([`validate::Validated`], errors naming the field) → model permission and rate limits →
//! input moderation ([`moderation`]) → route ([`routing`]) → respond or stream ([`respond`], with output
//! moderation). [`error::ApiError`] is the one place errors become OpenAI-shaped responses. The keys and
//! moderation in force ([`policy`]) are reloaded when the config file changes ([`reload`]).

pub mod api;
pub mod config;
pub mod discovery;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod moderation;
pub mod moderations;
pub mod openai;
pub mod policy;
pub mod reload;
pub mod respond;
pub mod routing;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{ConfigError, GatewayConfig};

/// The chat page served at `/`: plain HTML and JavaScript, no build step.
pub const CHAT_PAGE: &str = include_str!("chat.html");

/// Builds the gateway's state for `config` and starts following its endpoints. Fails, naming the field, when the
/// keys or moderation are invalid.
pub fn state(config: &GatewayConfig) -> Result<api::AppState, ConfigError> {
    state_with(config, None)
}

/// Like [`state`], also routing to the endpoints `discovered` keeps (ChatModels in a cluster, see
/// [`discovery::spawn`]) and following the rules in `rules`.
pub fn state_with(
    config: &GatewayConfig,
    discovered: Option<(Arc<routing::StaticEndpoints>, discovery::ModelRules)>,
) -> Result<api::AppState, ConfigError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let endpoints = Arc::new(routing::StaticEndpoints::new(config.endpoints.clone()));
    let (router, rules) = match &discovered {
        Some((found, rules)) => {
            let merged = routing::merge(&[endpoints.as_ref(), found.as_ref()]);
            let router = routing::Router::start(&merged, metrics.clone(), config.probe_interval);
            (router, rules.clone())
        }
        None => (
            routing::Router::start(endpoints.as_ref(), metrics.clone(), config.probe_interval),
            discovery::ModelRules::default(),
        ),
    };
    let policy =
        policy::Policy::build(&config.policy, &router, None).map_err(|message| ConfigError::Invalid {
            path: config.shown_source(),
            message,
        })?;
    Ok(api::AppState {
        router,
        endpoints,
        metrics,
        policy: Arc::new(policy::PolicyCell::new(policy)),
        limits: config.limits,
        hold: config.hold,
        rules,
        created: api::unix_now(),
    })
}

/// Whether the gateway may serve on `listen` without keys: on loopback it may (with a warning), elsewhere only
/// when `allow_anonymous` is set. The `Ok` value is the warning to print.
pub fn anonymous_check(
    listen: SocketAddr,
    has_keys: bool,
    allow_anonymous: bool,
) -> Result<Option<String>, String> {
    if has_keys {
        return Ok(None);
    }
    if listen.ip().is_loopback() || allow_anonymous {
        return Ok(Some(format!(
            "no API keys configured: serving anyone who can reach {listen} (configure `keys` to require them)"
        )));
    }
    Err(format!(
        "refusing to serve without API keys on {listen}, which is not a loopback address: configure `keys` (or \
         `keys_file`) or pass --allow-anonymous"
    ))
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    state: api::AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
