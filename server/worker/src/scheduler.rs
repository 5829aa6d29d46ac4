//! The continuous-batching state machine, free of any model so it can be tested directly.
//!
//! Sequences wait in FIFO order and join the running batch between decode steps while there is room: fewer than
//! `max_batch` running, their KV reservation within the budget, and this step's prefill tokens within
//! `max_prefill_tokens` (so one step never stalls running sequences behind a pile of long prompts). A sequence
//! reserves its whole worst case (prompt + max new tokens) when it joins, so a running sequence can never run out
//! of KV memory and nothing is ever preempted. The head of the queue is never overtaken: a large request waits for
//! room rather than starving behind small ones.

use std::collections::{HashMap, VecDeque};

/// A sequence's id within one worker.
pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// KV cache positions all running sequences may reserve together.
    pub kv_budget_tokens: usize,
    /// Prompt tokens prefilled in one step (the first joining sequence is always allowed).
    pub max_prefill_tokens: usize,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    id: SeqId,
    prompt_tokens: usize,
    reserve_tokens: usize,
}

/// What to run in one engine step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Sequences joining now: prefill them (their first token comes from the prefill).
    pub prefill: Vec<SeqId>,
    /// Sequences that were already running: one decode step each, batched.
    pub decode: Vec<SeqId>,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

/// Why a sequence cannot be queued at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Its reservation is larger than the whole KV budget: it could never run on this worker.
    ExceedsBudget { reserve_tokens: usize, budget: usize },
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<SeqId>,
    reservations: HashMap<SeqId, usize>,
    reserved: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reservations: HashMap::new(),
            reserved: 0,
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a sequence that needs `prompt_tokens` of prefill and at most `reserve_tokens` KV positions.
    pub fn enqueue(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        reserve_tokens: usize,
    ) -> Result<(), Rejected> {
        if reserve_tokens > self.config.kv_budget_tokens {
            return Err(Rejected::ExceedsBudget {
                reserve_tokens,
                budget: self.config.kv_budget_tokens,
            });
        }
        self.waiting.push_back(Waiting {
            id,
            prompt_tokens,
            reserve_tokens,
        });
        Ok(())
    }

    /// Removes a sequence wherever it is (finished, cancelled or failed) and frees its reservation. Returns false
    /// when the id is unknown.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(pos) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(pos);
            return true;
        }
        let Some(pos) = self.running.iter().position(|&r| r == id) else {
            return false;
        };
        self.running.remove(pos);
        self.reserved -= self.reservations.remove(&id).unwrap_or(0);
        true
    }

    /// Decides the next step: admits waiting sequences that fit, and decodes everything already running.
    pub fn next_step(&mut self) -> Step {
        let decode = self.running.clone();
        let mut prefill = Vec::new();
        let mut prefill_tokens = 0;
        while let Some(head) = self.waiting.front().copied() {
            let room_in_batch = self.running.len() < self.config.max_batch;
            let room_in_kv = self.reserved + head.reserve_tokens <= self.config.kv_budget_tokens;
            let room_in_step =
                prefill.is_empty() || prefill_tokens + head.prompt_tokens <= self.config.max_prefill_tokens;
            if !(room_in_batch && room_in_kv && room_in_step) {
                break;
            }
            self.waiting.pop_front();
            self.running.push(head.id);
            self.reservations.insert(head.id, head.reserve_tokens);
            self.reserved += head.reserve_tokens;
            prefill_tokens += head.prompt_tokens;
            prefill.push(head.id);
        }
        Step { prefill, decode }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// KV positions reserved by running sequences.
    pub fn reserved_tokens(&self) -> usize {
        self.reserved
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_batch: usize, kv_budget_tokens: usize, max_prefill_tokens: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_batch,
            kv_budget_tokens,
            max_prefill_tokens,
        })
    }

    fn step(prefill: &[SeqId], decode: &[SeqId]) -> Step {
        Step {
            prefill: prefill.to_vec(),
            decode: decode.to_vec(),
        }
    }

    #[test]
    fn sequences_join_between_steps_and_leave_when_done() {
        let mut s = scheduler(8, 1000, 1000);
        s.enqueue(1, 10, 50).unwrap();
        assert_eq!(s.next_step(), step(&[1], &[]));
        assert_eq!(s.next_step(), step(&[], &[1]));
        s.enqueue(2, 10, 50).unwrap();
        s.enqueue(3, 10, 50).unwrap();
        // New arrivals are prefilled in the same step that decodes the running sequence.
        assert_eq!(s.next_step(), step(&[2, 3], &[1]));
        assert!(s.remove(1));
        assert_eq!(s.next_step(), step(&[], &[2, 3]));
        assert!(s.remove(2) && s.remove(3));
        assert!(s.is_idle());
        assert_eq!(s.reserved_tokens(), 0);
        assert!(s.next_step().is_empty());
    }

    #[test]
    fn the_batch_never_exceeds_max_batch() {
        let mut s = scheduler(2, 1000, 1000);
        for id in 1..=4 {
            s.enqueue(id, 5, 10).unwrap();
        }
        assert_eq!(s.next_step(), step(&[1, 2], &[]));
        assert_eq!(s.next_step(), step(&[], &[1, 2]));
        assert_eq!(s.waiting(), 2);
        s.remove(2);
        assert_eq!(s.next_step(), step(&[3], &[1]));
    }

    #[test]
    fn kv_budget_holds_back_the_queue_head_without_overtaking() {
        let mut s = scheduler(8, 100, 1000);
        s.enqueue(1, 10, 60).unwrap();
        s.enqueue(2, 10, 60).unwrap();
        s.enqueue(3, 10, 10).unwrap();
        // 2 does not fit next to 1; 3 would, but must not overtake 2.
        assert_eq!(s.next_step(), step(&[1], &[]));
        assert_eq!(s.next_step(), step(&[], &[1]));
        assert_eq!(s.reserved_tokens(), 60);
        s.remove(1);
        assert_eq!(s.next_step(), step(&[2, 3], &[]));
        assert_eq!(s.reserved_tokens(), 70);
    }

    #[test]
    fn a_request_larger_than_the_budget_is_rejected_up_front() {
        let mut s = scheduler(8, 100, 1000);
        assert_eq!(
            s.enqueue(1, 10, 101),
            Err(Rejected::ExceedsBudget {
                reserve_tokens: 101,
                budget: 100
            })
        );
        assert!(s.is_idle());
    }

    #[test]
    fn prefill_per_step_is_bounded_but_a_long_prompt_still_runs() {
        let mut s = scheduler(8, 10_000, 100);
        s.enqueue(1, 500, 600).unwrap();
        s.enqueue(2, 60, 100).unwrap();
        s.enqueue(3, 60, 100).unwrap();
        assert_eq!(s.next_step(), step(&[1], &[]));
        assert_eq!(s.next_step(), step(&[2], &[1]));
        assert_eq!(s.next_step(), step(&[3], &[1, 2]));
    }

    #[test]
    fn cancelling_frees_the_slot_whether_waiting_or_running() {
        let mut s = scheduler(1, 1000, 1000);
        s.enqueue(1, 5, 10).unwrap();
        s.enqueue(2, 5, 10).unwrap();
        assert_eq!(s.next_step(), step(&[1], &[]));
        assert!(s.remove(2), "a waiting sequence can be cancelled");
        assert!(s.remove(1), "a running sequence can be cancelled");
        assert!(!s.remove(1), "twice is a no-op");
        assert!(s.is_idle());
        s.enqueue(3, 5, 10).unwrap();
        assert_eq!(s.next_step(), step(&[3], &[]));
    }
}
