//! The cloneable [`WorkerHandle`]: admission control (a semaphore sized to the batch plus the queue), commands to
//! the engine thread over a bounded channel, and each request's event stream back. The types it exchanges with the
//! engine are the engine's ([`crate::engine`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use camelid_model::LoadedModel;
use std::path::Path;

use camelid_model::lora::LoraAdapter;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::adapters::{AdapterInfo, check_name};

use crate::engine::{self, Command, Event, GenParams, Input, ModelInfo, Shared, Submission, WorkerConfig};
use crate::error::WorkerError;
use crate::metrics::Metrics;

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

/// A running request: its prompt's token ids and the events that follow `Started`.
#[derive(Debug)]
pub struct Generation {
    pub prompt: Vec<u32>,
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
        let shared = Arc::new(Shared::new(metrics));
        let handle = Self {
            shared: shared.clone(),
            commands,
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        std::thread::Builder::new()
            .name("camelid-engine".into())
            .spawn(move || engine::load_and_run(config, shared, receiver, load))?;
        Ok(handle)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The LoRA adapters this worker serves over its base model, by name.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.shared
            .adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads and checks a PEFT adapter directory (on a blocking thread), then serves it as `name`, replacing an
    /// adapter of that name; beyond `max_loras` the least recently requested adapter is evicted.
    pub async fn load_adapter(&self, name: &str, path: &Path) -> Result<(), WorkerError> {
        check_name(name)?;
        self.info()?;
        let base = self.shared.base.get().cloned().ok_or(WorkerError::NotReady)?;
        let source = path.to_path_buf();
        let read = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || LoraAdapter::read_peft(&source, &base, tch::Device::Cpu))
        };
        let adapter =
            read.await
                .map_err(|_| WorkerError::ShuttingDown)?
                .map_err(|e| WorkerError::InvalidRequest {
                    message: format!("LoRA adapter {name:?}: {e}"),
                    code: "invalid_adapter",
                    param: Some("lora_path"),
                })?;
        let (reply, done) = oneshot::channel();
        let command = Command::LoadAdapter {
            name: name.to_string(),
            source,
            adapter: Box::new(adapter),
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| WorkerError::ShuttingDown)?;
        done.await.map_err(|_| WorkerError::ShuttingDown)
    }

    /// Stops serving adapter `name`; requests already running with it finish.
    pub async fn unload_adapter(&self, name: &str) -> Result<(), WorkerError> {
        let (reply, done) = oneshot::channel();
        let command = Command::UnloadAdapter {
            name: name.to_string(),
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| WorkerError::ShuttingDown)?;
        done.await.map_err(|_| WorkerError::ShuttingDown)?
    }

    /// The model's facts once it is loaded.
    pub fn info(&self) -> Result<ModelInfo, WorkerError> {
        self.shared.info()
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn wait_ready(&self) -> Result<ModelInfo, WorkerError> {
        self.shared.loaded().await;
        self.info()
    }

    /// Ready to serve: the model is loaded and the worker is not draining.
    pub fn is_ready(&self) -> bool {
        self.shared.info().is_ok() && !self.shared.is_draining()
    }

    /// Starts a graceful shutdown: readiness turns false and new requests are refused as [`WorkerError::Draining`]
    /// (a caller sends them elsewhere), while the running ones go on.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.metrics.ready.set(0);
    }

    /// Ends every running and waiting request with [`Event::Interrupted`] (the drain's grace period is over).
    pub async fn interrupt_all(&self) {
        let _ = self.commands.send(Command::Interrupt).await;
    }

    /// Requests admitted and not yet ended (holding an admission permit).
    pub fn in_flight(&self) -> usize {
        self.capacity - self.admission.available_permits()
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
        if self.shared.is_draining() {
            return Err(WorkerError::Draining);
        }
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
            Some(Event::Started { prompt }) => Ok(Generation {
                prompt,
                events: receiver,
            }),
            Some(Event::Failed(e)) => Err(e),
            Some(_) | None => Err(WorkerError::ShuttingDown),
        }
    }
}
