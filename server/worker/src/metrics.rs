//! The worker's Prometheus metrics, defined once; label values come from fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `stop`, `length`, `cancelled` or an error category.
    pub outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub ready: Gauge,
    pub queue_length: Gauge,
    pub running_sequences: Gauge,
    pub kv_cache_bytes: Gauge,
    pub kv_reserved_tokens: Gauge,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub batch_size: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub requests: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("camelid_worker");
        let m = Self {
            ready: Gauge::default(),
            queue_length: Gauge::default(),
            running_sequences: Gauge::default(),
            kv_cache_bytes: Gauge::default(),
            kv_reserved_tokens: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            time_per_output_token: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register("ready", "1 once the model is loaded", m.ready.clone());
        registry.register(
            "queue_length",
            "Requests waiting to join the batch",
            m.queue_length.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running_sequences.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "Bytes held by KV caches",
            m.kv_cache_bytes.clone(),
        );
        registry.register(
            "kv_reserved_tokens",
            "KV positions reserved by running sequences",
            m.kv_reserved_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From receipt to the first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Between consecutive generated tokens of a sequence",
            m.time_per_output_token.clone(),
        );
        registry.register("batch_size", "Sequences per decode step", m.batch_size.clone());
        registry.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated (rate() gives tokens/s)",
            m.generated_tokens.clone(),
        );
        registry.register("requests", "Finished requests by outcome", m.requests.clone());
        Self { registry, ..m }
    }

    pub fn count(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
