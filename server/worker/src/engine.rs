//! The engine: the types a handle and the engine thread exchange (a request's [`Input`] and [`GenParams`], the
//! [`Event`]s back, the [`Command`]s in), the worker's [`WorkerConfig`] and the loaded model's [`ModelInfo`], and the
//! engine thread itself, which loads the model, owns it, runs the [`Scheduler`]'s steps (prefill of joining
//! sequences, then one batched decode step of the running ones) and streams each sequence's text to its caller.
//! It knows nothing of [`crate::WorkerHandle`]: the handle depends on the engine, not the reverse.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use camelid_model::{BlockStore, ChatMessage, FinishReason, LoadedModel, SamplingParams};
use tch::{Device, Kind};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use crate::error::WorkerError;
use crate::metrics::Metrics;
use crate::running::run;
use crate::scheduler::{SchedulerConfig, SeqId};

/// How a worker batches and how much it admits.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The model name clients use.
    pub name: String,
    /// Most sequences running together (the KV blocks bound them further).
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch; more are turned away as overloaded.
    pub max_waiting: usize,
    /// The KV block store's size. On the CPU its memory is committed only as blocks are first written.
    pub kv_budget_bytes: usize,
    /// Tokens computed per engine step, decodes and prompt chunks together: a long prompt is prefilled in
    /// chunks of what is left, so running streams keep their pace.
    pub max_step_tokens: usize,
    /// Reuse the KV blocks of prompt prefixes computed before (shared system prompts, the earlier turns of a
    /// chat).
    pub prefix_caching: bool,
    /// LoRA adapters served from the start, `(name, PEFT directory)` (vLLM's `--lora-modules`).
    pub lora_modules: Vec<(String, std::path::PathBuf)>,
    /// Most LoRA adapters kept loaded; loading one more evicts the least recently requested.
    pub max_loras: usize,
}

/// Positions per KV block (vLLM's default too).
pub const BLOCK_SIZE: usize = 16;

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            max_batch: 256,
            max_waiting: 256,
            kv_budget_bytes: 8 << 30,
            max_step_tokens: 512,
            prefix_caching: true,
            lora_modules: Vec::new(),
            max_loras: 8,
        }
    }
}

/// What a request asks the model for.
#[derive(Debug, Clone)]
pub enum Input {
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text (completions).
    Prompt(String),
    /// A generation another worker began: its prompt's ids, and the ids it generated that reached the client.
    Continue { prompt: Vec<u32>, generated: Vec<u32> },
}

#[derive(Debug, Clone)]
pub struct GenParams {
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Requests share cached prompt prefixes only with requests of the same salt (the gateway sends the
    /// tenant), so one tenant cannot time another's prompts.
    pub cache_salt: String,
    /// The LoRA adapter the request asked for by name (None: the base model).
    pub adapter: Option<String>,
}

/// What the engine tells a request, in order: `Started` (or `Failed`), `Chunk`s, then `Finished` (or `Failed`, or
/// `Interrupted` when the worker drained before the end).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        /// The prompt's token ids (a caller continues the generation elsewhere with them).
        prompt: Vec<u32>,
    },
    Chunk {
        text: String,
        /// The tokens generated since the previous chunk (text can be held back over several tokens).
        token_ids: Vec<u32>,
    },
    /// The worker's drain deadline passed before the end: the text sent so far is final; continue elsewhere.
    Interrupted,
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(WorkerError),
}

/// A request the handle admitted, on its way to the engine thread.
pub(crate) struct Submission {
    pub id: SeqId,
    pub input: Input,
    pub params: GenParams,
    pub events: mpsc::UnboundedSender<Event>,
    pub permit: OwnedSemaphorePermit,
    pub received: Instant,
}

/// What a handle sends the engine thread.
pub(crate) enum Command {
    Submit(Box<Submission>),
    /// Serve an adapter (read and checked by the handle) under a name.
    LoadAdapter {
        name: String,
        source: std::path::PathBuf,
        adapter: Box<camelid_model::lora::LoraAdapter>,
        reply: tokio::sync::oneshot::Sender<()>,
    },
    UnloadAdapter {
        name: String,
        reply: tokio::sync::oneshot::Sender<Result<(), WorkerError>>,
    },
    /// End every sequence now with [`Event::Interrupted`] (the drain deadline passed).
    Interrupt,
}

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub source: String,
    pub context_length: usize,
    pub template: String,
    pub dtype: String,
    pub device: String,
    pub max_batch: usize,
}

/// Whether the model is loaded yet.
#[derive(Debug, Clone)]
enum State {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

/// What the engine thread and every handle share: the metrics, the model's load state and whether the worker
/// drains.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    state: watch::Sender<State>,
    pub draining: AtomicBool,
    /// The base model's shape once loaded (adapters are checked against it before they reach the engine).
    pub base: std::sync::OnceLock<camelid_model::Config>,
    /// The adapters the engine serves, as it last published them.
    pub adapters: std::sync::Mutex<Vec<crate::adapters::AdapterInfo>>,
}

impl Shared {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        let (state, _) = watch::channel(State::Loading);
        Self {
            metrics,
            state,
            draining: AtomicBool::new(false),
            base: std::sync::OnceLock::new(),
            adapters: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The model's facts once it is loaded.
    pub(crate) fn info(&self) -> Result<ModelInfo, WorkerError> {
        match &*self.state.borrow() {
            State::Loading => Err(WorkerError::NotReady),
            State::Ready(info) => Ok(info.clone()),
            State::Failed(e) => Err(WorkerError::LoadFailed(e.clone())),
        }
    }

    pub(crate) fn publish_adapters(&self, list: Vec<crate::adapters::AdapterInfo>) {
        *self
            .adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = list;
    }

    /// Waits until the model is loaded (or failed to load).
    pub(crate) async fn loaded(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| !matches!(s, State::Loading)).await;
    }
}

/// The engine thread's body: loads the model with `load` (publishing the failure, or the model's facts once
/// loaded), sizes the scheduler's KV budget for it, then runs until every handle is gone.
pub(crate) fn load_and_run(
    config: WorkerConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    load: impl FnOnce() -> anyhow::Result<LoadedModel>,
) {
    let started = Instant::now();
    let loaded = match load() {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "loading the model failed");
            shared.state.send_replace(State::Failed(format!("{e:#}")));
            return;
        }
    };
    let c = loaded.config();
    let device = loaded.model.device();
    // On the CPU attention runs in f32 whatever the weights' dtype (see `Llama::attention_kind`).
    let kv_kind = if device == Device::Cpu {
        Kind::Float
    } else {
        loaded.model.kind()
    };
    let block_bytes =
        BlockStore::block_bytes(c.num_layers, BLOCK_SIZE, [c.num_kv_heads, c.head_dim], kv_kind);
    let num_blocks = (config.kv_budget_bytes / block_bytes.max(1)).max(1);
    let store = BlockStore::new(
        c.num_layers,
        num_blocks,
        BLOCK_SIZE,
        [c.num_kv_heads, c.head_dim],
        (kv_kind, device),
    );
    let store = match store {
        Ok(store) => Arc::new(Mutex::new(store)),
        Err(e) => {
            tracing::error!(error = %e, "allocating the KV block store failed");
            shared
                .state
                .send_replace(State::Failed(format!("allocating the KV block store: {e}")));
            return;
        }
    };
    let scheduler = SchedulerConfig {
        max_batch: config.max_batch,
        num_blocks,
        block_size: BLOCK_SIZE,
        max_step_tokens: config.max_step_tokens,
        prefix_caching: config.prefix_caching,
    };
    let info = ModelInfo {
        name: config.name.clone(),
        source: loaded.source.display().to_string(),
        context_length: c.max_position_embeddings,
        template: loaded.template.name().to_string(),
        dtype: format!("{:?}", loaded.model.kind()),
        device: format!("{:?}", loaded.model.device()),
        max_batch: config.max_batch,
    };
    tracing::info!(
        model = %info.name, source = %info.source, context = info.context_length, kv_blocks = num_blocks,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "model loaded; worker ready"
    );
    let _ = shared.base.set(c.clone());
    let mut adapters = crate::adapters::AdapterRegistry::new(config.max_loras);
    for (name, path) in &config.lora_modules {
        match camelid_model::lora::LoraAdapter::read_peft(path, c, Device::Cpu) {
            Ok(adapter) => adapters.insert(name, path, adapter),
            Err(e) => {
                let message = format!("--lora-modules {name}={}: {e}", path.display());
                tracing::error!(error = %message, "loading a LoRA adapter failed");
                shared.state.send_replace(State::Failed(message));
                return;
            }
        }
    }
    shared.publish_adapters(adapters.list());
    shared.metrics.set_model_name(&info.name);
    shared.metrics.ready.set(1);
    shared.state.send_replace(State::Ready(info));
    run(&loaded, shared, commands, scheduler, store, adapters);
}
