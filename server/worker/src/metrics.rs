//! The worker's Prometheus metrics, defined once; label values come from fixed sets.
//!
//! Ours are prefixed `camelid_worker_`. Beside them the worker exports vLLM's own names (`vllm:...`, labelled
//! `model_name` as vLLM does), so autoscalers and routers written for vLLM (KEDA recipes, the Gateway API
//! Inference Extension's endpoint pickers) work on camelid workers unchanged.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `stop`, `length`, `cancelled` or an error category.
    pub outcome: &'static str,
}

/// vLLM's one label: the served model's name (one per worker).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model_name: String,
}

/// vLLM's `vllm:lora_requests_info` labels: the adapters of the running and of the waiting requests
/// (comma-separated names) and the most adapters a step may hold. Only the current set is exported (one series).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoraLabels {
    pub running_lora_adapters: String,
    pub waiting_lora_adapters: String,
    pub max_lora: String,
}

type Hist = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// Buckets of the latency histograms, ours and vLLM's alike: time to first token, between tokens, and per request.
fn ttft() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn itl() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 12))
}

fn e2e() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// The metrics a vLLM server exports that autoscalers and routers read, under vLLM's names.
#[derive(Debug)]
pub struct VllmMetrics {
    pub num_requests_running: Family<ModelLabel, Gauge>,
    pub num_requests_waiting: Family<ModelLabel, Gauge>,
    pub kv_cache_usage_perc: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    pub time_to_first_token: Hist,
    pub inter_token_latency: Hist,
    pub e2e_request_latency: Hist,
    pub prompt_tokens: Family<ModelLabel, Counter>,
    pub generation_tokens: Family<ModelLabel, Counter>,
    pub prefix_cache_queries: Family<ModelLabel, Counter>,
    pub prefix_cache_hits: Family<ModelLabel, Counter>,
    pub num_preemptions: Family<ModelLabel, Counter>,
    pub lora_requests_info: Family<LoraLabels, Gauge<f64, AtomicU64>>,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub ready: Gauge,
    pub queue_length: Gauge,
    pub running_sequences: Gauge,
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub preemptions: Counter,
    pub e2e_latency: Histogram,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub batch_size: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub requests: Family<OutcomeLabels, Counter>,
    pub vllm: VllmMetrics,
    vllm_registry: Registry,
    model: std::sync::OnceLock<ModelLabel>,
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
            kv_cache_usage: Gauge::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            preemptions: Counter::default(),
            e2e_latency: e2e(),
            time_to_first_token: ttft(),
            time_per_output_token: itl(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            requests: Family::default(),
            vllm: VllmMetrics::new(),
            vllm_registry: Registry::default(),
            model: std::sync::OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "ready",
            "1 once the model is loaded; 0 again while draining",
            m.ready.clone(),
        );
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
            "kv_cache_usage",
            "Share of KV blocks held by running sequences, 0 to 1",
            m.kv_cache_usage.clone(),
        );
        registry.register(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed)",
            m.prefix_cache_hits.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted for KV memory (recomputed later)",
            m.preemptions.clone(),
        );
        registry.register(
            "e2e_request_latency_seconds",
            "From receipt to the last token",
            m.e2e_latency.clone(),
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
        let vllm_registry = vllm_registry(&m.vllm);
        Self {
            registry,
            vllm_registry,
            ..m
        }
    }

    /// Names the served model (vLLM's `model_name` label); set once, when it is loaded.
    pub fn set_model_name(&self, name: &str) {
        let _ = self.model.set(ModelLabel {
            model_name: name.to_string(),
        });
    }

    /// The served model's label (empty until it is named).
    pub fn model(&self) -> &ModelLabel {
        static NONE: std::sync::OnceLock<ModelLabel> = std::sync::OnceLock::new();
        self.model.get().unwrap_or_else(|| {
            NONE.get_or_init(|| ModelLabel {
                model_name: String::new(),
            })
        })
    }

    pub fn count(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A request's prompt, admitted.
    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.inc_by(n);
        self.vllm.prompt_tokens.get_or_create(self.model()).inc_by(n);
    }

    /// A token generated `since` the request arrived (its first) or its previous token.
    pub fn token(&self, first: bool, since: f64) {
        self.generated_tokens.inc();
        self.vllm.generation_tokens.get_or_create(self.model()).inc();
        if first {
            self.time_to_first_token.observe(since);
            self.vllm
                .time_to_first_token
                .get_or_create(self.model())
                .observe(since);
        } else {
            self.time_per_output_token.observe(since);
            self.vllm
                .inter_token_latency
                .get_or_create(self.model())
                .observe(since);
        }
    }

    /// A request finished `seconds` after it arrived.
    pub fn finished(&self, seconds: f64) {
        self.e2e_latency.observe(seconds);
        self.vllm
            .e2e_request_latency
            .get_or_create(self.model())
            .observe(seconds);
    }

    /// The batch's state after a step.
    pub fn batch(&self, running: usize, waiting: usize, kv_usage: f64) {
        self.running_sequences.set(running as i64);
        self.queue_length.set(waiting as i64);
        self.kv_cache_usage.set(kv_usage);
        let v = &self.vllm;
        v.num_requests_running
            .get_or_create(self.model())
            .set(running as i64);
        v.num_requests_waiting
            .get_or_create(self.model())
            .set(waiting as i64);
        v.kv_cache_usage_perc.get_or_create(self.model()).set(kv_usage);
    }

    /// Prefix-cache lookups and hits (tokens) and preemptions since the last call.
    pub fn cache(&self, queries: u64, hits: u64, preemptions: u64) {
        self.prefix_cache_queries.inc_by(queries);
        self.prefix_cache_hits.inc_by(hits);
        self.preemptions.inc_by(preemptions);
        let v = &self.vllm;
        v.prefix_cache_queries.get_or_create(self.model()).inc_by(queries);
        v.prefix_cache_hits.get_or_create(self.model()).inc_by(hits);
        v.num_preemptions.get_or_create(self.model()).inc_by(preemptions);
    }

    /// The adapters of the running and waiting requests (names, sorted and without repeats) after a step, as vLLM
    /// exports them: one series whose labels list them and whose value is the Unix time they were set.
    pub fn lora(&self, running: &[&str], waiting: &[&str], max_lora: usize) {
        let labels = LoraLabels {
            running_lora_adapters: running.join(","),
            waiting_lora_adapters: waiting.join(","),
            max_lora: max_lora.to_string(),
        };
        let family = &self.vllm.lora_requests_info;
        if family.get(&labels).is_some() {
            return;
        }
        family.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        family.get_or_create(&labels).set(now);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.vllm_registry);
        out
    }
}

impl VllmMetrics {
    fn new() -> Self {
        Self {
            num_requests_running: Family::default(),
            num_requests_waiting: Family::default(),
            kv_cache_usage_perc: Family::default(),
            time_to_first_token: Family::new_with_constructor(ttft),
            inter_token_latency: Family::new_with_constructor(itl),
            e2e_request_latency: Family::new_with_constructor(e2e),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            prefix_cache_queries: Family::default(),
            prefix_cache_hits: Family::default(),
            num_preemptions: Family::default(),
            lora_requests_info: Family::default(),
        }
    }
}

/// The vLLM names, unprefixed (a registry prefix would join with `_`, and vLLM's is `vllm:`).
fn vllm_registry(v: &VllmMetrics) -> Registry {
    let mut r = Registry::default();
    r.register(
        "vllm:num_requests_running",
        "Requests in the running batch",
        v.num_requests_running.clone(),
    );
    r.register(
        "vllm:num_requests_waiting",
        "Requests waiting to run",
        v.num_requests_waiting.clone(),
    );
    r.register(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage: 1 means 100 percent",
        v.kv_cache_usage_perc.clone(),
    );
    r.register(
        "vllm:time_to_first_token_seconds",
        "Time to first token",
        v.time_to_first_token.clone(),
    );
    r.register(
        "vllm:inter_token_latency_seconds",
        "Time between consecutive tokens",
        v.inter_token_latency.clone(),
    );
    r.register(
        "vllm:e2e_request_latency_seconds",
        "End-to-end request latency",
        v.e2e_request_latency.clone(),
    );
    r.register(
        "vllm:prompt_tokens",
        "Prefill tokens processed",
        v.prompt_tokens.clone(),
    );
    r.register(
        "vllm:generation_tokens",
        "Generation tokens processed",
        v.generation_tokens.clone(),
    );
    r.register(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in queried tokens",
        v.prefix_cache_queries.clone(),
    );
    r.register(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in cached tokens",
        v.prefix_cache_hits.clone(),
    );
    r.register(
        "vllm:num_preemptions",
        "Cumulative preemptions",
        v.num_preemptions.clone(),
    );
    r.register(
        "vllm:lora_requests_info",
        "Running and waiting LoRA adapters (value: the time of the last change)",
        v.lora_requests_info.clone(),
    );
    r
}
