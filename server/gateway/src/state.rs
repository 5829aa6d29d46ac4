//! The gateway's shared state, [`AppState`], and how it is built from a [`GatewayConfig`]: the router over the
//! configured (and, in a cluster, discovered) endpoints, the metrics, the keys and moderation in force, and the
//! limits. Kept out of the handlers so that the handlers, the reloader and the binaries all depend on it, and it on
//! none of them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{ConfigError, GatewayConfig};
use crate::discovery::ModelRules;
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyCell};
use crate::routing::{self, HoldLimits, Router, StaticEndpoints};
use crate::serve::ServerLimits;
use crate::validate::Limits;

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub router: Arc<Router>,
    /// The configured endpoints the router follows (a reload sends new ones).
    pub endpoints: Arc<StaticEndpoints>,
    pub metrics: Arc<Metrics>,
    /// Keys and moderation; replaced whole when the config file changes.
    pub policy: Arc<PolicyCell>,
    pub limits: Limits,
    /// The connection limits the serve loop applies.
    pub server: ServerLimits,
    /// Whether the API is served on a loopback address (then, without keys, only loopback `Host`s are answered).
    pub loopback: bool,
    /// How requests wait for a model with no ready worker.
    pub hold: HoldLimits,
    /// Most held requests of one key.
    pub hold_per_key: usize,
    /// What ChatModels ask besides routing (their moderation profile and keys); empty outside a cluster.
    pub rules: ModelRules,
    pub created: u64,
}

/// Builds the gateway's state for `config` and starts following its endpoints. Fails, naming the field, when the
/// keys or moderation are invalid.
pub fn state(config: &GatewayConfig) -> Result<AppState, ConfigError> {
    state_with(config, None)
}

/// Like [`state`], also routing to the endpoints `discovered` keeps (ChatModels in a cluster, see
/// [`crate::discovery::spawn`]) and following the rules in `rules`.
pub fn state_with(
    config: &GatewayConfig,
    discovered: Option<(Arc<StaticEndpoints>, ModelRules)>,
) -> Result<AppState, ConfigError> {
    let metrics = Arc::new(Metrics::new());
    let endpoints = Arc::new(StaticEndpoints::new(config.endpoints.clone()));
    let (router, rules) = match &discovered {
        Some((found, rules)) => {
            let merged = routing::merge(&[endpoints.as_ref(), found.as_ref()]);
            let router = Router::start(
                &merged,
                metrics.clone(),
                config.probe_interval,
                config.worker_secret.clone(),
            );
            (router, rules.clone())
        }
        None => (
            Router::start(
                endpoints.as_ref(),
                metrics.clone(),
                config.probe_interval,
                config.worker_secret.clone(),
            ),
            ModelRules::default(),
        ),
    };
    router.set_migration_limits(config.migration);
    router.set_adapter_sources(config.adapters.clone());
    let found = rules.clone();
    router.follow_adapter_sources(routing::adapters::SourceReader(Box::new(move || {
        found
            .read()
            .map(|rules| {
                rules
                    .iter()
                    .filter(|(_, rule)| !rule.adapters.is_empty())
                    .map(|(model, rule)| (model.clone(), rule.adapters.clone()))
                    .collect()
            })
            .unwrap_or_default()
    })));
    let policy = Policy::build(&config.policy, &router, None).map_err(|message| ConfigError::Invalid {
        path: config.shown_source(),
        message,
    })?;
    Ok(AppState {
        router,
        endpoints,
        metrics,
        policy: Arc::new(PolicyCell::new(policy)),
        limits: config.limits,
        server: config.server,
        loopback: config.listen.ip().is_loopback(),
        hold: config.hold,
        hold_per_key: config.hold_per_key,
        rules,
        created: unix_now(),
    })
}

/// Seconds since the Unix epoch, for the `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
