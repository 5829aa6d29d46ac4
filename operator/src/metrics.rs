//! The operator's Prometheus metrics, defined once; labels are bounded (error categories).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub category: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// `ScaledUp`, `ScaledDown` or `ScaledToZero`.
    pub direction: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    scale_decisions: Family<ScaleLabels, Counter>,
    registry: Registry,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    errors: Family<ErrorLabels, Counter>,
    preemptions: Counter,
    worker_preemptions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("camelid_operator");
        let reconciles = Counter::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let errors = Family::<ErrorLabels, Counter>::default();
        let preemptions = Counter::default();
        let worker_preemptions = Counter::default();
        let scale_decisions = Family::<ScaleLabels, Counter>::default();
        registry.register(
            "scale_decisions",
            "ChatModel replica changes by direction",
            scale_decisions.clone(),
        );
        registry.register(
            "reconciles",
            "FineTuneJob and ChatModel reconciles",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles by category",
            errors.clone(),
        );
        registry.register(
            "preemptions",
            "Preemptions handled (gang restarts)",
            preemptions.clone(),
        );
        registry.register(
            "worker_preemptions",
            "ChatModel workers that got a termination notice",
            worker_preemptions.clone(),
        );
        Self {
            scale_decisions,
            registry,
            reconciles,
            reconcile_seconds,
            errors,
            preemptions,
            worker_preemptions,
        }
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn reconcile_error(&self, category: &'static str) {
        self.errors.get_or_create(&ErrorLabels { category }).inc();
    }

    pub fn scaled(&self, direction: &'static str) {
        self.scale_decisions
            .get_or_create(&ScaleLabels { direction })
            .inc();
    }

    pub fn preempted(&self) {
        self.preemptions.inc();
    }

    pub fn worker_preempted(&self) {
        self.worker_preemptions.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
