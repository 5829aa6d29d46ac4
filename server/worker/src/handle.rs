//! The cloneable [`WorkerHandle`]: admission control (a semaphore sized to the batch plus the queue), commands to
//! the engine thread over a bounded channel, and each request's event stream back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use camelid_model::{ChatMessage, FinishReason, LoadedModel, SamplingParams};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::error::WorkerError;
use crate::metrics::Metrics;
use crate::scheduler::{SchedulerConfig, SeqId};

/// How a worker batches and how much it admits.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The model name clients use.
    pub name: String,
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch; more are turned away as overloaded.
    pub max_waiting: usize,
    /// KV cache memory all running sequences may reserve together.
    pub kv_budget_bytes: usize,
    /// Prompt tokens prefilled per engine step.
    pub max_prefill_tokens: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            max_batch: 32,
            max_waiting: 256,
            kv_budget_bytes: 8 << 30,
            max_prefill_tokens: 4096,
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
}

#[derive(Debug, Clone)]
pub struct GenParams {
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// What the engine tells a request, in order: `Started` (or `Failed`), `Chunk`s, then `Finished` (or `Failed`).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        prompt_tokens: usize,
    },
    Chunk {
        text: String,
        /// Tokens generated since the previous chunk (text can be held back over several tokens).
        tokens: usize,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(WorkerError),
}

pub(crate) struct Submission {
    pub id: SeqId,
    pub input: Input,
    pub params: GenParams,
    pub events: mpsc::UnboundedSender<Event>,
    pub permit: OwnedSemaphorePermit,
    pub received: Instant,
}

pub(crate) enum Command {
    Submit(Box<Submission>),
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

#[derive(Debug, Clone)]
enum State {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    state: watch::Sender<State>,
}

/// Sends requests to the engine; cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    admission: Arc<Semaphore>,
    capacity: usize,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A running request: its prompt length and the events that follow `Started`.
#[derive(Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl WorkerHandle {
    /// Starts the engine thread, which first runs `load` (the handle answers `NotReady` meanwhile).
    pub fn start(
        config: WorkerConfig,
        load: impl FnOnce() -> anyhow::Result<LoadedModel> + Send + 'static,
    ) -> std::io::Result<Self> {
        let capacity = config.max_batch + config.max_waiting;
        let (commands, receiver) = mpsc::channel(capacity.max(1));
        let metrics = Arc::new(Metrics::new());
        let (state, _) = watch::channel(State::Loading);
        let shared = Arc::new(Shared { metrics, state });
        let handle = Self {
            shared: shared.clone(),
            commands,
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        std::thread::Builder::new()
            .name("camelid-engine".into())
            .spawn(move || engine_thread(config, shared, receiver, load))?;
        Ok(handle)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The model's facts once it is loaded.
    pub fn info(&self) -> Result<ModelInfo, WorkerError> {
        match &*self.shared.state.borrow() {
            State::Loading => Err(WorkerError::NotReady),
            State::Ready(info) => Ok(info.clone()),
            State::Failed(e) => Err(WorkerError::LoadFailed(e.clone())),
        }
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn wait_ready(&self) -> Result<ModelInfo, WorkerError> {
        let mut rx = self.shared.state.subscribe();
        let _ = rx.wait_for(|s| !matches!(s, State::Loading)).await;
        self.info()
    }

    /// Sequences running and waiting, as the engine last published them in its gauges.
    pub fn load(&self) -> (usize, usize) {
        let m = &self.shared.metrics;
        let count = |g: i64| usize::try_from(g).unwrap_or(0);
        (count(m.running_sequences.get()), count(m.queue_length.get()))
    }

    /// Admits a request and waits until the engine has tokenized and queued it.
    pub async fn generate(&self, input: Input, params: GenParams) -> Result<Generation, WorkerError> {
        self.info()?;
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkerError::Overloaded {
                capacity: self.capacity,
            })?;
        let (events, mut receiver) = mpsc::unbounded_channel();
        let submission = Submission {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            input,
            params,
            events,
            permit,
            received: Instant::now(),
        };
        self.commands
            .try_send(Command::Submit(Box::new(submission)))
            .map_err(|_| WorkerError::ShuttingDown)?;
        match receiver.recv().await {
            Some(Event::Started { prompt_tokens }) => Ok(Generation {
                prompt_tokens,
                events: receiver,
            }),
            Some(Event::Failed(e)) => Err(e),
            Some(_) | None => Err(WorkerError::ShuttingDown),
        }
    }
}

fn engine_thread(
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
    let kv_kind_bytes = if loaded.model.device() == tch::Device::Cpu {
        4
    } else {
        loaded.model.kind().elt_size_in_bytes()
    };
    let bytes_per_position = 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_kind_bytes;
    let kv_budget_tokens = config.kv_budget_bytes / bytes_per_position.max(1);
    let scheduler = SchedulerConfig {
        max_batch: config.max_batch,
        kv_budget_tokens,
        max_prefill_tokens: config.max_prefill_tokens,
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
        model = %info.name, source = %info.source, context = info.context_length, kv_budget_tokens,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "model loaded; worker ready"
    );
    shared.metrics.ready.set(1);
    shared.state.send_replace(State::Ready(info));
    crate::engine::run(&loaded, shared, commands, scheduler);
}
