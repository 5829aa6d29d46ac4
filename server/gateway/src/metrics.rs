//! The gateway's Prometheus metrics, defined once. Label values are bounded: models are the configured ones (any
//! other name is counted as `unknown`), routes and statuses a fixed set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub model: String,
    pub route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub model: String,
    pub endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModerationLabels {
    pub provider: String,
    pub direction: &'static str,
    /// `passed`, `flagged`, `unavailable` or `unparseable`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    pub provider: String,
    pub direction: &'static str,
    pub category: String,
}

/// Requests refused by keys and limits, by reason (the error category) and key name (`none` when anonymous or
/// unknown).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub key: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub model: String,
    /// `draining`, `worker_lost` or `worker_error`.
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub time_to_first_token: Family<ModelLabels, Histogram>,
    pub in_flight: Family<ModelLabels, Gauge>,
    /// Requests waiting for a ChatModel with no ready worker (scaled to zero, or starting).
    pub held: Family<ModelLabels, Gauge>,
    pub backend_healthy: Family<BackendLabels, Gauge>,
    pub moderation_checks: Family<ModerationLabels, Counter>,
    pub moderation_seconds: Family<ProviderLabels, Histogram>,
    pub moderation_flags: Family<FlagLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub migrations: Family<MigrationLabels, Counter>,
    pub migration_seconds: Family<ModelLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("camelid_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let time_to_first_token = Family::<ModelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let in_flight = Family::<ModelLabels, Gauge>::default();
        let held = Family::<ModelLabels, Gauge>::default();
        let backend_healthy = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "requests",
            "Requests by model, route and HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From receipt to the last byte (streams: to [DONE])",
            latency.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From receipt to the first generated text",
            time_to_first_token.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being served, per model",
            in_flight.clone(),
        );
        registry.register(
            "held_requests",
            "Requests waiting for a worker of a ChatModel (at zero replicas, or while one starts)",
            held.clone(),
        );
        registry.register(
            "backend_healthy",
            "1 while a worker endpoint gets traffic",
            backend_healthy.clone(),
        );
        let moderation_checks = Family::<ModerationLabels, Counter>::default();
        let moderation_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00001, 4.0, 12))
        });
        let moderation_flags = Family::<FlagLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let migrations = Family::<MigrationLabels, Counter>::default();
        let migration_seconds = Family::<ModelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "migrations",
            "Generations continued on another worker, by model and cause (draining, worker_lost, worker_error)",
            migrations.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "From a worker's stop to another worker's Started, waiting for a ready one included",
            migration_seconds.clone(),
        );
        registry.register(
            "moderation_checks",
            "Texts checked, by provider, direction (input/output) and outcome",
            moderation_checks.clone(),
        );
        registry.register(
            "moderation_duration_seconds",
            "Time a provider took for one request's texts",
            moderation_seconds.clone(),
        );
        registry.register(
            "moderation_flags",
            "Flagged texts by provider, direction and category",
            moderation_flags.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused by keys, model permissions and rate limits",
            refusals.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result (ok, error)",
            config_reloads.clone(),
        );
        Self {
            moderation_checks,
            moderation_seconds,
            moderation_flags,
            refusals,
            config_reloads,
            migrations,
            migration_seconds,
            registry,
            requests,
            latency,
            time_to_first_token,
            in_flight,
            held,
            backend_healthy,
        }
    }

    pub fn set_backend_health(&self, model: &str, endpoint: &str, healthy: bool) {
        self.backend_healthy
            .get_or_create(&BackendLabels {
                model: model.to_string(),
                endpoint: endpoint.to_string(),
            })
            .set(i64::from(healthy));
    }

    /// Drops a worker endpoint's series once it is gone, so that `/metrics` does not list every address a model
    /// ever had (a scaled, rescheduled model would otherwise grow it without bound).
    pub fn forget_backend(&self, model: &str, endpoint: &str) {
        self.backend_healthy.remove(&BackendLabels {
            model: model.to_string(),
            endpoint: endpoint.to_string(),
        });
    }

    /// Counts a generation moved to another worker after `seconds`.
    pub fn count_migration(&self, labels: &MigrationLabels, seconds: f64) {
        self.migrations.get_or_create(labels).inc();
        self.migration_seconds
            .get_or_create(&ModelLabels {
                model: labels.model.clone(),
            })
            .observe(seconds);
    }

    pub fn count_flag(&self, provider: &str, direction: &'static str, category: &str) {
        self.moderation_flags
            .get_or_create(&FlagLabels {
                provider: provider.to_string(),
                direction,
                category: category.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
