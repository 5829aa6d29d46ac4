//! The engine thread's loop once the model is loaded: admits submissions into the [`Scheduler`], runs each step
//! it plans (prompt chunks and decoded tokens, one model step) over caches in the shared [`BlockStore`], samples, and
//! streams each sequence's text to its caller.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use camelid_model::cpu_gemv::{DecodePool, with_decode_pool};
use camelid_model::generate::TorchThreads;
use camelid_model::lora::LoraAdapter;
use camelid_model::stream::TokenTextStream;
use camelid_model::{FinishReason, KvCache, LoadedModel, Sampler, SharedBlocks};
use tch::{Device, Tensor};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::adapters::AdapterRegistry;
use crate::engine::{Command, Event, Input, Shared, Submission};
use crate::error::WorkerError;
use crate::scheduler::{Chunk, Rejected, Scheduler, SchedulerConfig, SeqId};

struct Sequence {
    prompt: Vec<u32>,
    /// None until it first runs, and again after a preemption.
    cache: Option<KvCache>,
    sampler: Sampler,
    text: TokenTextStream,
    events: mpsc::UnboundedSender<Event>,
    /// Tokens generated since the last chunk was sent.
    unsent: Vec<u32>,
    submitted: Instant,
    last_token_at: Option<Instant>,
    /// The LoRA adapter it runs with and its name (None: the base model).
    adapter: Option<(String, Rc<LoraAdapter>)>,
    _permit: OwnedSemaphorePermit,
}

impl Sequence {
    /// Drops the sequence, releasing its admission permit, and keeps only the channel for its last event.
    fn close(self) -> mpsc::UnboundedSender<Event> {
        self.events
    }
}

/// Runs until every handle is gone and no sequence is left.
pub(crate) fn run(
    loaded: &LoadedModel,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    config: SchedulerConfig,
    store: SharedBlocks,
    adapters: AdapterRegistry,
) {
    if loaded.model.device() == Device::Cpu {
        with_decode_pool(|pool| {
            Engine::new(loaded, Some(pool), shared, config, store, adapters).run(commands)
        });
    } else {
        Engine::new(loaded, None, shared, config, store, adapters).run(commands);
    }
}

/// A request made ready to queue.
struct Prepared {
    prompt: Vec<u32>,
    sampler: Sampler,
    text: TokenTextStream,
    /// The most positions the sequence may take.
    max_total: usize,
    /// Set when a continuation's replayed tokens already ended the generation.
    ended: Option<FinishReason>,
}

/// The outcome label of a finished request.
fn outcome_of(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// The prefix-cache salt of a request's tenant.
fn salt_of(cache_salt: &str) -> u64 {
    // A fixed-key hash: two tenants colliding would only share prefixes of exactly equal tokens, which is still
    // correct; the salt is about timing, not content.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cache_salt.hash(&mut h);
    h.finish()
}

struct Engine<'p, 'm> {
    loaded: &'m LoadedModel,
    pool: Option<&'p DecodePool<'m>>,
    shared: Arc<Shared>,
    scheduler: Scheduler,
    store: SharedBlocks,
    sequences: HashMap<SeqId, Sequence>,
    adapters: AdapterRegistry,
    torch_threads: i32,
    /// Counters already published (the scheduler's are totals).
    published: (u64, u64, u64),
}

impl<'p, 'm> Engine<'p, 'm> {
    fn new(
        loaded: &'m LoadedModel,
        pool: Option<&'p DecodePool<'m>>,
        shared: Arc<Shared>,
        config: SchedulerConfig,
        store: SharedBlocks,
        adapters: AdapterRegistry,
    ) -> Self {
        Self {
            adapters,
            loaded,
            pool,
            shared,
            scheduler: Scheduler::new(config),
            store,
            sequences: HashMap::new(),
            torch_threads: tch::get_num_threads(),
            published: (0, 0, 0),
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
            self.publish();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(submission) => self.admit(*submission),
            Command::Interrupt => self.interrupt_all(),
            Command::LoadAdapter {
                name,
                source,
                adapter,
                reply,
            } => {
                self.adapters.insert(&name, &source, *adapter);
                self.shared.publish_adapters(self.adapters.list());
                let _ = reply.send(());
            }
            Command::UnloadAdapter { name, reply } => {
                let result = self.adapters.remove(&name);
                self.shared.publish_adapters(self.adapters.list());
                let _ = reply.send(result);
            }
        }
    }

    /// Ends every sequence with [`Event::Interrupted`]: the text each has sent is final, and its caller continues
    /// it on another worker.
    fn interrupt_all(&mut self) {
        let ids: Vec<SeqId> = self.sequences.keys().copied().collect();
        for id in ids {
            self.finish(id, Some(Event::Interrupted), "interrupted");
        }
    }

    /// Tokenizes and queues a request, answering `Started` or the reason it cannot run.
    fn admit(&mut self, s: Submission) {
        let adapter = match s
            .params
            .adapter
            .as_deref()
            .map(|name| self.adapters.resolve(name))
        {
            None => None,
            Some(Ok(adapter)) => Some(adapter),
            Some(Err(e)) => return self.reject(&s, e),
        };
        let Prepared {
            prompt,
            sampler,
            text,
            max_total,
            ended,
        } = match self.prepare(&s) {
            Ok(prepared) => prepared,
            Err(e) => return self.reject(&s, e),
        };
        if let Some(reason) = ended {
            // A continuation of a generation that had already ended (its worker failed before saying so).
            let _ = s.events.send(Event::Started {
                prompt: prompt.clone(),
            });
            self.shared.metrics.count(outcome_of(reason));
            let _ = s.events.send(Event::Finished {
                reason,
                prompt_tokens: prompt.len(),
                completion_tokens: text.generated().len(),
            });
            return;
        }
        // An adapter's keys and values differ from the base's: prefixes are shared only within one adapter load.
        let salt = match &adapter {
            None => salt_of(&s.params.cache_salt),
            Some(a) => salt_of(&format!("{}\0lora:{}", s.params.cache_salt, a.generation)),
        };
        // A continuation computes its replayed tokens like prompt tokens.
        let tokens = [prompt.as_slice(), text.generated()].concat();
        if let Err(Rejected::ExceedsBudget { capacity, .. }) =
            self.scheduler.enqueue(s.id, tokens, max_total, salt)
        {
            let e = WorkerError::InvalidRequest {
                message: format!(
                    "the prompt ({} tokens) plus max_tokens needs {max_total} KV positions, more than this worker's \
                     KV store of {capacity}; lower max_tokens",
                    prompt.len()
                ),
                code: "context_length_exceeded",
                param: Some("max_tokens"),
            };
            return self.reject(&s, e);
        }
        self.shared.metrics.add_prompt_tokens(prompt.len() as u64);
        let _ = s.events.send(Event::Started {
            prompt: prompt.clone(),
        });
        let sequence = Sequence {
            prompt,
            cache: None,
            sampler,
            text,
            events: s.events,
            unsent: Vec::new(),
            submitted: s.received,
            last_token_at: None,
            adapter: s.params.adapter.clone().zip(adapter.map(|a| a.weights)),
            _permit: s.permit,
        };
        self.sequences.insert(s.id, sequence);
    }

    fn reject(&self, s: &Submission, e: WorkerError) {
        self.shared.metrics.count(e.category());
        let _ = s.events.send(Event::Failed(e));
    }

    /// The prompt's tokens, the sampler, the text stream (with a continuation's tokens replayed) and the most
    /// positions the sequence may take.
    fn prepare(&self, s: &Submission) -> Result<Prepared, WorkerError> {
        let loaded = self.loaded;
        let (prompt, field) = match &s.input {
            Input::Chat(messages) => (loaded.chat_prompt(messages), "messages"),
            Input::Prompt(text) => (loaded.text_prompt(text), "prompt"),
            Input::Continue { prompt, generated } => {
                self.check_ids(prompt, "continuation.prompt_token_ids")?;
                self.check_ids(generated, "continuation.generated_token_ids")?;
                (Ok(prompt.clone()), "continuation.prompt_token_ids")
            }
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
        let mut text = TokenTextStream::new(&s.params.stop, eos, max_new);
        let mut ended = None;
        if let Input::Continue { generated, .. } = &s.input {
            ended = text
                .replay(generated, |ids| loaded.tokenizer.decode(ids, true))
                .map_err(|e| WorkerError::from_model(e, "continuation.generated_token_ids"))?;
        }
        let max_total = prompt.len() + max_new;
        Ok(Prepared {
            prompt,
            sampler,
            text,
            max_total,
            ended,
        })
    }

    /// Refuses token ids outside the model's vocabulary (a continuation comes from the network).
    fn check_ids(&self, ids: &[u32], field: &'static str) -> Result<(), WorkerError> {
        let vocab = self.loaded.config().vocab_size;
        match ids.iter().position(|&id| id as usize >= vocab) {
            Some(i) => Err(WorkerError::invalid(
                format!("token {i} ({}) is outside the vocabulary of {vocab}", ids[i]),
                Some(field),
            )),
            None => Ok(()),
        }
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
            self.finish(id, None, "cancelled");
        }
    }

    /// Drops a sequence that is done (its blocks stay cached) and counts it.
    /// Ends a sequence. Its admission permit is released before its last event is sent, so a caller that has seen
    /// the end never finds the request still counted in flight.
    fn finish(&mut self, id: SeqId, last: Option<Event>, outcome: &'static str) {
        self.scheduler.remove(id);
        self.shared.metrics.count(outcome);
        let events = self.sequences.remove(&id).map(Sequence::close);
        if let (Some(events), Some(event)) = (events, last) {
            let _ = events.send(event);
        }
    }

    /// Fails sequences whose step failed; their blocks are not cached.
    fn fail(&mut self, ids: &[SeqId], e: &WorkerError) {
        tracing::error!(error = %e, sequences = ids.len(), "model step failed");
        for &id in ids {
            if let Some(events) = self.sequences.remove(&id).map(Sequence::close) {
                let _ = events.send(Event::Failed(e.clone()));
            }
            self.scheduler.abort(id);
            self.shared.metrics.count(e.category());
        }
    }

    fn step(&mut self) {
        let step = self.scheduler.next_step();
        for id in &step.preempted {
            if let Some(seq) = self.sequences.get_mut(id) {
                seq.cache = None;
            }
        }
        // Every prompt chunk and every decoded token of the step, with whether its logits give a next token.
        let mut runs: Vec<(SeqId, Vec<u32>, bool)> = Vec::new();
        for chunk in step.prefill {
            if let Some(run) = self.chunk_run(chunk) {
                runs.push(run);
            }
        }
        for &id in &step.decode {
            let filled = self.scheduler.tokens(id).len() - 1;
            let last = self.scheduler.tokens(id)[filled];
            let _ = self.cache_for(id, filled);
            runs.push((id, vec![last], true));
        }
        if runs.is_empty() {
            return;
        }
        if !step.decode.is_empty() {
            self.shared.metrics.batch_size.observe(step.decode.len() as f64);
        }
        match self.forward(&runs) {
            Ok(rows) => {
                for ((id, _, gives_next), mut row) in runs.into_iter().zip(rows) {
                    if gives_next {
                        self.accept(id, &mut row);
                    }
                }
            }
            Err(e) => {
                let ids: Vec<SeqId> = runs.iter().map(|(id, _, _)| *id).collect();
                self.fail(&ids, &WorkerError::Model(e.to_string()));
            }
        }
    }

    /// The sequence's cache, created over its block table when it first runs (after any cached prefix), with
    /// the table as the scheduler has grown it.
    fn cache_for(&mut self, id: SeqId, filled: usize) -> Option<&mut KvCache> {
        let table = self.scheduler.block_table(id);
        let store = &self.store;
        let seq = self.sequences.get_mut(&id)?;
        let cache = seq
            .cache
            .get_or_insert_with(|| KvCache::paged(store.clone(), table.to_vec(), filled));
        cache.set_blocks(table);
        Some(cache)
    }

    /// A prompt chunk's tokens, and whether it ends the prompt (its logits give the first token); None when the
    /// sequence is gone or its cache disagrees with the chunk (it is failed then).
    fn chunk_run(&mut self, chunk: Chunk) -> Option<(SeqId, Vec<u32>, bool)> {
        let all = self.scheduler.tokens(chunk.id);
        let last = chunk.start + chunk.len == all.len();
        let tokens = all[chunk.start..chunk.start + chunk.len].to_vec();
        let cache = self.cache_for(chunk.id, chunk.start)?;
        if cache.len() != chunk.start {
            let e = WorkerError::Model(format!("cache at {} for a chunk at {}", cache.len(), chunk.start));
            self.fail(&[chunk.id], &e);
            return None;
        }
        Some((chunk.id, tokens, last))
    }

    /// One model step over `runs` (prompt chunks and decoded tokens, one pass over the weights on the CPU);
    /// returns each run's next-token logits, in order.
    fn forward(&mut self, runs: &[(SeqId, Vec<u32>, bool)]) -> camelid_model::Result<Vec<Vec<f32>>> {
        // Taken out of the map for the step so that each cache can be borrowed mutably alongside the others.
        let mut batch: Vec<(SeqId, Sequence)> = runs
            .iter()
            .filter_map(|(id, _, _)| self.sequences.remove_entry(id))
            .collect();
        let tokens: Vec<&[u32]> = runs.iter().map(|(_, t, _)| t.as_slice()).collect();
        let logits = self.forward_batch(&tokens, &mut batch);
        self.sequences.extend(batch);
        let values = Vec::<f32>::try_from(&logits?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
        let vocab = values.len() / runs.len().max(1);
        Ok(values.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
    }

    fn forward_batch(
        &self,
        tokens: &[&[u32]],
        batch: &mut [(SeqId, Sequence)],
    ) -> camelid_model::Result<Tensor> {
        // On CPU the step runs on the pool's kernel, libtorch single-threaded meanwhile (see `generate`).
        let _threads = match self.pool {
            Some(_) => TorchThreads::set(1),
            None => TorchThreads::set(self.torch_threads),
        };
        let held: Vec<Option<Rc<LoraAdapter>>> = batch
            .iter()
            .map(|(_, s)| s.adapter.as_ref().map(|(_, a)| a.clone()))
            .collect();
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().filter_map(|(_, s)| s.cache.as_mut()).collect();
        if caches.len() != tokens.len() {
            return Err(camelid_model::ModelError::InvalidRequest(
                "a sequence of the step has no cache".into(),
            ));
        }
        let adapters: Vec<Option<&LoraAdapter>> = held.iter().map(Option::as_deref).collect();
        self.loaded
            .model
            .forward_step_adapted(tokens, &mut caches, self.pool, &adapters)
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
        let since = seq.last_token_at.unwrap_or(seq.submitted);
        metrics.token(
            seq.last_token_at.is_none(),
            now.duration_since(since).as_secs_f64(),
        );
        seq.last_token_at = Some(now);
        let pushed = match seq.text.push(next, |ids| tokenizer.decode(ids, true)) {
            Ok(pushed) => pushed,
            Err(e) => return self.fail(&[id], &WorkerError::Model(e.to_string())),
        };
        seq.unsent.push(next);
        let delivered = pushed.text.is_empty()
            || seq
                .events
                .send(Event::Chunk {
                    text: pushed.text,
                    token_ids: std::mem::take(&mut seq.unsent),
                })
                .is_ok();
        if !delivered {
            return self.finish(id, None, "cancelled");
        }
        let Some(reason) = pushed.finished else {
            self.scheduler.push_token(id, next);
            return;
        };
        // Counted before the client can see the end, so the metrics never lag behind an answer.
        metrics.count(outcome_of(reason));
        metrics.finished(now.duration_since(seq.submitted).as_secs_f64());
        let end = Event::Finished {
            reason,
            prompt_tokens: seq.prompt.len(),
            completion_tokens: seq.text.generated().len(),
        };
        self.scheduler.remove(id);
        if let Some(events) = self.sequences.remove(&id).map(Sequence::close) {
            let _ = events.send(end);
        }
    }

    fn publish(&mut self) {
        let m = &self.shared.metrics;
        let blocks = self.scheduler.blocks();
        m.batch(self.scheduler.running(), self.scheduler.waiting(), blocks.usage());
        let now = (blocks.queries, blocks.hits, self.scheduler.preemptions());
        let (q, h, p) = self.published;
        m.cache(now.0 - q, now.1 - h, now.2 - p);
        self.published = now;
        // Sequences not yet started (or preempted) hold no cache: they are the waiting ones.
        let (mut running, mut waiting) = (Vec::new(), Vec::new());
        for s in self.sequences.values() {
            if let Some((name, _)) = &s.adapter {
                let list = if s.cache.is_some() {
                    &mut running
                } else {
                    &mut waiting
                };
                list.push(name.as_str());
            }
        }
        for list in [&mut running, &mut waiting] {
            list.sort_unstable();
            list.dedup();
        }
        m.lora(&running, &waiting, self.adapters.max_loaded());
    }
}
