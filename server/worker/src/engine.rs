//! The engine: the types a handle and the engine thread exchange (a request's [`Input`] and [`GenParams`], the
//! [`Event`]s back, the [`Command`]s in), the worker's [`WorkerConfig`] and the loaded model's [`ModelInfo`], and the
//! engine thread itself, which loads the model, owns it, runs the [`Scheduler`]'s steps (prefill of joining
//! sequences, then one batched decode step of the running ones) and streams each sequence's text to its caller.
//! It knows nothing of [`crate::WorkerHandle`]: the handle depends on the engine, not the reverse.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use camelid_model::cpu_gemv::{DecodePool, with_decode_pool};
use camelid_model::generate::TorchThreads;
use camelid_model::stream::TokenTextStream;
use camelid_model::{ChatMessage, FinishReason, KvCache, LoadedModel, Sampler, SamplingParams};
use tch::{Device, Tensor};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use crate::error::WorkerError;
use crate::metrics::Metrics;
use crate::scheduler::{Rejected, Scheduler, SchedulerConfig, SeqId};

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

/// What the engine thread and every handle share: the metrics and the model's load state.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    state: watch::Sender<State>,
}

impl Shared {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        let (state, _) = watch::channel(State::Loading);
        Self { metrics, state }
    }

    /// The model's facts once it is loaded.
    pub(crate) fn info(&self) -> Result<ModelInfo, WorkerError> {
        match &*self.state.borrow() {
            State::Loading => Err(WorkerError::NotReady),
            State::Ready(info) => Ok(info.clone()),
            State::Failed(e) => Err(WorkerError::LoadFailed(e.clone())),
        }
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
    let kv_kind_bytes = if loaded.model.device() == Device::Cpu {
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
    run(&loaded, shared, commands, scheduler);
}

/// The largest decode batch that runs on the CPU decode kernel. Up to its row limit it is at least as fast as
/// libtorch's GEMM (`model/examples/batch_step.rs`), and it gives each sequence the same bits alone or batched,
/// so a greedy reply does not depend on what else the worker is serving.
const KERNEL_MAX_BATCH: usize = camelid_model::cpu_gemv::MAX_ROWS;

struct Sequence {
    prompt: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    text: TokenTextStream,
    events: mpsc::UnboundedSender<Event>,
    last_token: u32,
    /// Tokens generated since the last chunk was sent.
    unsent_tokens: usize,
    submitted: Instant,
    last_token_at: Option<Instant>,
    _permit: OwnedSemaphorePermit,
}

/// Runs until every handle is gone and no sequence is left.
fn run(
    loaded: &LoadedModel,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    config: SchedulerConfig,
) {
    if loaded.model.device() == Device::Cpu {
        with_decode_pool(|pool| Engine::new(loaded, Some(pool), shared, config).run(commands));
    } else {
        Engine::new(loaded, None, shared, config).run(commands);
    }
}

struct Engine<'p, 'm> {
    loaded: &'m LoadedModel,
    pool: Option<&'p DecodePool<'m>>,
    shared: Arc<Shared>,
    scheduler: Scheduler,
    sequences: HashMap<SeqId, Sequence>,
    torch_threads: i32,
}

impl<'p, 'm> Engine<'p, 'm> {
    fn new(
        loaded: &'m LoadedModel,
        pool: Option<&'p DecodePool<'m>>,
        shared: Arc<Shared>,
        config: SchedulerConfig,
    ) -> Self {
        let scheduler = Scheduler::new(config);
        Self {
            loaded,
            pool,
            shared,
            scheduler,
            sequences: HashMap::new(),
            torch_threads: tch::get_num_threads(),
        }
    }

    fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let _guard = tch::no_grad_guard();
        loop {
            if self.scheduler.is_idle() {
                match commands.blocking_recv() {
                    Some(command) => self.handle(command),
                    None => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            self.drop_cancelled();
            self.step();
            self.publish_gauges();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(submission) => self.admit(*submission),
        }
    }

    /// Tokenizes and queues a request, answering `Started` or the reason it cannot run.
    fn admit(&mut self, s: Submission) {
        match self.prepare(&s) {
            Ok((prompt, cache, sampler, text, reserve)) => {
                if let Err(Rejected::ExceedsBudget { budget, .. }) =
                    self.scheduler.enqueue(s.id, prompt.len(), reserve)
                {
                    let e = WorkerError::InvalidRequest {
                        message: format!(
                            "the prompt ({} tokens) plus max_tokens needs {reserve} KV positions, more than this \
                             worker's KV budget of {budget}; lower max_tokens",
                            prompt.len()
                        ),
                        code: "context_length_exceeded",
                        param: Some("max_tokens"),
                    };
                    self.reject(&s, e);
                    return;
                }
                self.shared.metrics.prompt_tokens.inc_by(prompt.len() as u64);
                let _ = s.events.send(Event::Started {
                    prompt_tokens: prompt.len(),
                });
                self.sequences.insert(
                    s.id,
                    Sequence {
                        last_token: 0,
                        unsent_tokens: 0,
                        prompt,
                        cache,
                        sampler,
                        text,
                        events: s.events,
                        submitted: s.received,
                        last_token_at: None,
                        _permit: s.permit,
                    },
                );
            }
            Err(e) => self.reject(&s, e),
        }
    }

    fn reject(&self, s: &Submission, e: WorkerError) {
        self.shared.metrics.count(e.category());
        let _ = s.events.send(Event::Failed(e));
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        s: &Submission,
    ) -> Result<(Vec<u32>, KvCache, Sampler, TokenTextStream, usize), WorkerError> {
        let loaded = self.loaded;
        let (prompt, field) = match &s.input {
            Input::Chat(messages) => (loaded.chat_prompt(messages), "messages"),
            Input::Prompt(text) => (loaded.text_prompt(text), "prompt"),
        };
        let prompt = prompt.map_err(|e| WorkerError::from_model(e, field))?;
        let context = loaded.config().max_position_embeddings;
        if prompt.is_empty() {
            return Err(WorkerError::invalid("the prompt is empty", Some(field)));
        }
        if prompt.len() >= context {
            return Err(WorkerError::from_model(
                camelid_model::ModelError::ContextOverflow {
                    prompt_tokens: prompt.len(),
                    context,
                },
                field,
            ));
        }
        let room = context - prompt.len();
        let max_new = match s.params.max_tokens {
            Some(0) => {
                return Err(WorkerError::invalid(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ));
            }
            Some(n) => n.min(room),
            None => room,
        };
        let sampler =
            Sampler::new(s.params.sampling.clone()).map_err(|e| WorkerError::from_model(e, "sampling"))?;
        let eos = if s.params.ignore_eos {
            vec![]
        } else {
            loaded.eos_token_ids.clone()
        };
        let reserve = prompt.len() + max_new;
        let cache = KvCache::new(loaded.config().num_layers, reserve);
        let text = TokenTextStream::new(&s.params.stop, eos, max_new);
        Ok((prompt, cache, sampler, text, reserve))
    }

    /// Sequences whose caller went away leave at once.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id, "cancelled");
        }
    }

    fn finish(&mut self, id: SeqId, outcome: &'static str) {
        self.forget(id);
        self.shared.metrics.count(outcome);
    }

    /// Drops a sequence that is done (and counted).
    fn forget(&mut self, id: SeqId) {
        self.scheduler.remove(id);
        self.sequences.remove(&id);
    }

    fn fail(&mut self, ids: &[SeqId], e: &WorkerError) {
        tracing::error!(error = %e, sequences = ids.len(), "model step failed");
        for &id in ids {
            if let Some(seq) = self.sequences.get(&id) {
                let _ = seq.events.send(Event::Failed(e.clone()));
            }
            self.finish(id, e.category());
        }
    }

    fn step(&mut self) {
        let step = self.scheduler.next_step();
        for id in step.prefill {
            let Some(seq) = self.sequences.get_mut(&id) else {
                continue;
            };
            let _threads = TorchThreads::set(self.torch_threads);
            let logits = self.loaded.model.forward_last(&seq.prompt, &mut seq.cache);
            match logits.and_then(|l| Ok(Vec::<f32>::try_from(&l.f_to_device(Device::Cpu)?)?)) {
                Ok(mut values) => self.accept(id, &mut values),
                Err(e) => self.fail(&[id], &WorkerError::Model(e.to_string())),
            }
        }
        if step.decode.is_empty() {
            return;
        }
        self.shared.metrics.batch_size.observe(step.decode.len() as f64);
        match self.decode(&step.decode) {
            Ok(rows) => {
                for (id, mut row) in rows {
                    self.accept(id, &mut row);
                }
            }
            Err(e) => self.fail(&step.decode, &WorkerError::Model(e.to_string())),
        }
    }

    /// One decode step for `ids`; returns each sequence's next-token logits.
    fn decode(&mut self, ids: &[SeqId]) -> camelid_model::Result<Vec<(SeqId, Vec<f32>)>> {
        // Taken out of the map for the step so that each cache can be borrowed mutably alongside the others.
        let mut batch: Vec<(SeqId, Sequence)> = ids
            .iter()
            .filter_map(|id| self.sequences.remove_entry(id))
            .collect();
        let logits = self.forward_batch(&mut batch);
        let ids: Vec<SeqId> = batch.iter().map(|(id, _)| *id).collect();
        self.sequences.extend(batch);
        let values = Vec::<f32>::try_from(&logits?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
        let vocab = values.len() / ids.len().max(1);
        Ok(ids
            .into_iter()
            .zip(values.chunks(vocab).map(<[f32]>::to_vec))
            .collect())
    }

    fn forward_batch(&self, batch: &mut [(SeqId, Sequence)]) -> camelid_model::Result<Tensor> {
        let model = &self.loaded.model;
        let tokens: Vec<u32> = batch.iter().map(|(_, s)| s.last_token).collect();
        // On CPU the decode kernel reads each weight once for the whole batch, with libtorch single-threaded
        // meanwhile (see `generate`); batches beyond its row limit go to libtorch's multi-threaded GEMM.
        let pool = self.pool.filter(|_| batch.len() <= KERNEL_MAX_BATCH);
        let _threads = match pool {
            Some(_) => TorchThreads::set(1),
            None => TorchThreads::set(self.torch_threads),
        };
        if let [(_, seq)] = &mut *batch {
            return Ok(model
                .forward_last_in(&tokens, &mut seq.cache, pool)?
                .f_unsqueeze(0)?);
        }
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|(_, s)| &mut s.cache).collect();
        model.decode_step(&tokens, &mut caches, pool)
    }

    /// Samples the next token of `id` from `logits` and streams what it produced.
    fn accept(&mut self, id: SeqId, logits: &mut [f32]) {
        let tokenizer = &self.loaded.tokenizer;
        let metrics = &self.shared.metrics;
        let Some(seq) = self.sequences.get_mut(&id) else {
            return;
        };
        let next = seq.sampler.sample(logits, &seq.prompt, seq.text.generated());
        let now = Instant::now();
        match seq.last_token_at {
            None => metrics
                .time_to_first_token
                .observe(now.duration_since(seq.submitted).as_secs_f64()),
            Some(previous) => metrics
                .time_per_output_token
                .observe(now.duration_since(previous).as_secs_f64()),
        }
        seq.last_token_at = Some(now);
        seq.last_token = next;
        metrics.generated_tokens.inc();
        let pushed = match seq.text.push(next, |ids| tokenizer.decode(ids, true)) {
            Ok(pushed) => pushed,
            Err(e) => {
                self.fail(&[id], &WorkerError::Model(e.to_string()));
                return;
            }
        };
        seq.unsent_tokens += 1;
        let delivered = pushed.text.is_empty()
            || seq
                .events
                .send(Event::Chunk {
                    text: pushed.text,
                    tokens: std::mem::take(&mut seq.unsent_tokens),
                })
                .is_ok();
        if !delivered {
            self.finish(id, "cancelled");
            return;
        }
        if let Some(reason) = pushed.finished {
            // Counted before the client can see the end, so the metrics never lag behind an answer.
            metrics.count(match reason {
                FinishReason::Length => "length",
                _ => "stop",
            });
            let _ = seq.events.send(Event::Finished {
                reason,
                prompt_tokens: seq.prompt.len(),
                completion_tokens: seq.text.generated().len(),
            });
            self.forget(id);
        }
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        m.queue_length.set(self.scheduler.waiting() as i64);
        m.running_sequences.set(self.scheduler.running() as i64);
        m.kv_reserved_tokens.set(self.scheduler.reserved_tokens() as i64);
        m.kv_cache_bytes
            .set(self.sequences.values().map(|s| s.cache.bytes()).sum::<usize>() as i64);
    }
}
