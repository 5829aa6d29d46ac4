//! The continuous-batching state machine, free of any model so it can be tested directly.
//!
//! Each step has a token budget. Running sequences come first: every decoding sequence (one token to compute)
//! takes one, and sequences still in their prompt take chunks of what is left (chunked prefill), so a long prompt
//! never stalls running streams and several arrivals are prefilled in the same step. Then waiting sequences join
//! in FIFO order (the head is never overtaken) while the batch has room, the budget has tokens and the free
//! blocks cover the rest of the prompt. A joining sequence first takes the cached blocks of its longest cached
//! prefix ([`BlockManager::take_prefix`]) and computes only the rest.
//!
//! KV memory is blocks, taken as positions are computed, not reserved for the worst case at admission. When a
//! running sequence needs a block and none is left, the most recently admitted sequence is preempted: its blocks
//! are released (their full blocks stay cached) and it goes back to the head of the queue, to recompute its
//! prompt and everything it generated so far, mostly from the cache. A running request is never failed for
//! memory.

use std::collections::{HashMap, VecDeque};

use crate::blocks::{BlockId, BlockManager};

/// A sequence's id within one worker.
pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running together.
    pub max_batch: usize,
    /// KV blocks in the worker's store.
    pub num_blocks: usize,
    /// Positions a block holds.
    pub block_size: usize,
    /// Tokens computed in one step, decodes and prefill chunks together (the first chunk of a step is always
    /// allowed at least one token).
    pub max_step_tokens: usize,
    /// Reuse the blocks of cached prompt prefixes.
    pub prefix_caching: bool,
}

/// What a step computes for a sequence still in its prompt: `tokens[start..start + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
}

/// What to run in one engine step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Prompt chunks; one whose end is the sequence's last token gives its next token.
    pub prefill: Vec<Chunk>,
    /// Sequences with one token to compute: one batched decode step, each giving its next token.
    pub decode: Vec<SeqId>,
    /// Sequences preempted for memory: their caches are gone; they recompute when they run again.
    pub preempted: Vec<SeqId>,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

/// Why a sequence cannot be queued at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Its prompt plus its longest answer needs more positions than the whole store holds.
    ExceedsBudget { tokens: usize, capacity: usize },
}

#[derive(Debug)]
struct Seq {
    /// The prompt and every token generated so far: all need keys and values before the next token.
    tokens: Vec<u32>,
    /// Positions whose keys and values are in `blocks` (or planned by the step under way).
    computed: usize,
    blocks: Vec<BlockId>,
    /// Leading blocks registered in the prefix cache.
    registered: usize,
    /// Tenant separation of the prefix cache.
    salt: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the last is preempted first.
    running: Vec<SeqId>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            blocks: BlockManager::new(config.num_blocks, config.block_size),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a sequence whose prompt is `tokens` and which may grow to `max_total` positions.
    pub fn enqueue(
        &mut self,
        id: SeqId,
        tokens: Vec<u32>,
        max_total: usize,
        salt: u64,
    ) -> Result<(), Rejected> {
        let capacity = self.config.num_blocks * self.blocks.block_size();
        if max_total > capacity || tokens.is_empty() {
            return Err(Rejected::ExceedsBudget {
                tokens: max_total,
                capacity,
            });
        }
        let seq = Seq {
            tokens,
            computed: 0,
            blocks: Vec::new(),
            registered: 0,
            salt,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(())
    }

    /// A token the sequence generated: the next step computes its keys and values.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// The sequence's tokens (prompt and generated).
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    /// The sequence's block table.
    pub fn block_table(&self, id: SeqId) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Removes a sequence that finished or was cancelled between steps: its computed full blocks stay cached.
    /// False when the id is unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        self.register(id);
        self.drop_seq(id)
    }

    /// Removes a sequence whose step failed: its blocks hold nothing trustworthy and are not cached.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.drop_seq(id)
    }

    fn drop_seq(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.blocks.release(&seq.blocks);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        true
    }

    /// Registers the sequence's computed full blocks in the prefix cache (its last step succeeded).
    fn register(&mut self, id: SeqId) {
        if !self.config.prefix_caching {
            return;
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.registered =
                self.blocks
                    .register(seq.salt, &seq.tokens, &seq.blocks, seq.computed, seq.registered);
        }
    }

    /// Decides the next step (see the module's doc). Called between steps: the previous step succeeded for every
    /// sequence still here.
    pub fn next_step(&mut self) -> Step {
        for id in self.running.clone() {
            self.register(id);
        }
        let mut step = Step::default();
        let mut budget = self.config.max_step_tokens.max(1);
        // Decodes first (they are what streams wait for), then the chunks of prompts under way.
        let order: Vec<SeqId> = {
            let pending = |id: &SeqId| self.seqs.get(id).map_or(0, |s| s.tokens.len() - s.computed);
            let (decode, prefill): (Vec<SeqId>, Vec<SeqId>) =
                self.running.iter().partition(|id| pending(id) == 1);
            decode.into_iter().chain(prefill).collect()
        };
        for id in order {
            if !self.running.contains(&id) || budget == 0 {
                continue;
            }
            let pending = self.seqs[&id].tokens.len() - self.seqs[&id].computed;
            if pending == 0 {
                continue;
            }
            let len = pending.min(budget);
            if self.grow(id, len, &mut step) {
                budget -= len;
                self.plan(id, len, &mut step);
            }
        }
        while budget > 0 && self.running.len() < self.config.max_batch {
            let Some(len) = self.admit_head(budget) else { break };
            budget -= len;
            let id = self.running[self.running.len() - 1];
            self.plan(id, len, &mut step);
        }
        step
    }

    /// Adds `len` tokens of `id` to the step and counts them as computed.
    fn plan(&mut self, id: SeqId, len: usize, step: &mut Step) {
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        if seq.tokens.len() - seq.computed == 1 {
            step.decode.push(id);
        } else {
            step.prefill.push(Chunk {
                id,
                start: seq.computed,
                len,
            });
        }
        seq.computed += len;
    }

    /// Gives `id` the blocks for `len` more positions, preempting the most recently admitted sequences when none
    /// are free. False when `id` itself had to be preempted.
    fn grow(&mut self, id: SeqId, len: usize, step: &mut Step) -> bool {
        while !self.take_blocks(id, len) {
            let Some(&victim) = self.running.last() else {
                return false;
            };
            self.preempt(victim, step);
            if victim == id {
                return false;
            }
        }
        true
    }

    /// Gives `id` free blocks until it has room for `len` more positions; false when they ran out first (it keeps
    /// those it got).
    fn take_blocks(&mut self, id: SeqId, len: usize) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        while seq.blocks.len() < self.blocks.blocks_for(seq.computed + len) {
            match self.blocks.allocate() {
                Some(block) => seq.blocks.push(block),
                None => return false,
            }
        }
        true
    }

    /// Sends a running sequence back to the head of the queue, releasing its blocks (computed full blocks stay
    /// cached, so its recomputation mostly hits).
    fn preempt(&mut self, id: SeqId, step: &mut Step) {
        self.running.retain(|&r| r != id);
        if let Some(pos) = step.decode.iter().position(|&d| d == id) {
            // Planned in this step: its last position is not computed after all, so no block it completes may
            // be cached.
            step.decode.remove(pos);
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.computed -= 1;
            }
        }
        if let Some(pos) = step.prefill.iter().position(|c| c.id == id) {
            // Planned in this step: not computed after all.
            let chunk = step.prefill.remove(pos);
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.computed = chunk.start;
            }
        }
        self.register(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.blocks.release(&seq.blocks);
            seq.blocks.clear();
            seq.computed = 0;
            seq.registered = 0;
        }
        self.waiting.push_front(id);
        step.preempted.push(id);
        self.preemptions += 1;
    }

    /// Admits the queue's head if its prompt's remaining blocks are free: takes its cached prefix and the blocks
    /// of its first chunk, and returns that chunk's length.
    fn admit_head(&mut self, budget: usize) -> Option<usize> {
        let &id = self.waiting.front()?;
        let seq = self.seqs.get_mut(&id)?;
        let prefix = self.blocks.take_prefix(seq.salt, &seq.tokens);
        let computed = prefix.len() * self.blocks.block_size();
        let rest = self.blocks.blocks_for(seq.tokens.len()) - prefix.len();
        // A few blocks stay free for running sequences to grow into, so admission does not cause preemption.
        let reserve = self.running.len().min(self.config.num_blocks / 16);
        if self.blocks.available() < rest + reserve {
            self.blocks.release(&prefix);
            return None;
        }
        self.blocks.record_lookup(seq.tokens.len(), computed);
        let len = (seq.tokens.len() - computed).min(budget);
        seq.blocks = prefix;
        seq.computed = computed;
        seq.registered = seq.blocks.len();
        if !self.take_blocks(id, len) {
            // Not reached (the free blocks cover the whole rest of the prompt, checked above); if it were, the
            // head waits, holding nothing.
            if let Some(seq) = self.seqs.get_mut(&id) {
                self.blocks.release(&std::mem::take(&mut seq.blocks));
                seq.computed = 0;
            }
            return None;
        }
        self.waiting.pop_front();
        self.running.push(id);
        Some(len)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The block manager (usage and prefix-cache counters).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
