//! The scheduler as a state machine: budgets, chunks, blocks, preemption and prefix sharing, step by step.

use super::*;

fn scheduler(max_batch: usize, num_blocks: usize, max_step_tokens: usize) -> Scheduler {
    Scheduler::new(config(max_batch, num_blocks, max_step_tokens))
}

fn config(max_batch: usize, num_blocks: usize, max_step_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch,
        num_blocks,
        block_size: 4,
        max_step_tokens,
        prefix_caching: true,
    }
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i * 7 + seed).collect()
}

fn chunk(id: SeqId, start: usize, len: usize) -> Chunk {
    Chunk { id, start, len }
}

/// One step, and what the engine does after it.
fn advance(s: &mut Scheduler) -> Step {
    let step = s.next_step();
    generate(s, &step);
    step
}

/// What the engine does after a step: every sequence whose computation reached its last token gets one more.
fn generate(s: &mut Scheduler, step: &Step) {
    let ends: Vec<SeqId> = step
        .prefill
        .iter()
        .filter(|c| c.start + c.len == s.tokens(c.id).len())
        .map(|c| c.id)
        .chain(step.decode.iter().copied())
        .collect();
    for id in ends {
        s.push_token(id, 1000 + id as u32);
    }
}

#[test]
fn sequences_join_between_steps_and_leave_when_done() {
    let mut s = scheduler(8, 100, 1000);
    s.enqueue(1, prompt(10, 0), 50, 0).unwrap();
    let step = advance(&mut s);
    assert_eq!(step.prefill, [chunk(1, 0, 10)]);
    s.enqueue(2, prompt(5, 1), 50, 0).unwrap();
    let step = advance(&mut s);
    // The arrival is prefilled in the step that decodes the running sequence.
    assert_eq!(
        (step.decode.as_slice(), step.prefill.as_slice()),
        (&[1][..], &[chunk(2, 0, 5)][..])
    );
    assert!(s.remove(1) && s.remove(2));
    assert!(s.is_idle());
    assert_eq!(s.blocks().usage(), 0.0, "every block is back");
    assert!(s.next_step().is_empty());
}

#[test]
fn the_batch_never_exceeds_max_batch() {
    let mut s = scheduler(2, 100, 1000);
    for id in 1..=4 {
        s.enqueue(id, prompt(3, id as u32), 10, 0).unwrap();
    }
    let step = advance(&mut s);
    assert_eq!(step.prefill.len(), 2);
    let step = advance(&mut s);
    assert_eq!(step.decode, [1, 2]);
    assert_eq!(s.waiting(), 2);
    s.remove(2);
    let step = s.next_step();
    assert_eq!(
        (step.decode.as_slice(), step.prefill.as_slice()),
        (&[1][..], &[chunk(3, 0, 3)][..])
    );
}

#[test]
fn a_long_prompt_is_chunked_and_never_stalls_running_streams() {
    let mut s = scheduler(8, 1000, 64);
    s.enqueue(1, prompt(5, 0), 100, 0).unwrap();
    advance(&mut s);
    s.enqueue(2, prompt(300, 1), 400, 0).unwrap();
    // Every step decodes sequence 1 and gives the long prompt what is left of the budget: 63 tokens.
    let mut done = 0;
    let mut steps = 0;
    while done < 300 {
        let step = advance(&mut s);
        assert_eq!(step.decode, [1], "the running stream decodes every step");
        let c = step.prefill[0];
        assert_eq!((c.id, c.start), (2, done));
        assert!(c.len <= 63);
        done += c.len;
        steps += 1;
    }
    assert_eq!(steps, 5, "300 tokens in chunks of 63");
    assert_eq!(s.next_step().decode, [1, 2], "then both decode");
}

#[test]
fn several_arrivals_share_one_step_and_the_head_is_never_overtaken() {
    let mut s = scheduler(8, 6, 1000);
    s.enqueue(1, prompt(6, 0), 10, 0).unwrap(); // 2 blocks
    s.enqueue(2, prompt(6, 1), 10, 0).unwrap(); // 2 blocks
    s.enqueue(3, prompt(12, 2), 16, 0).unwrap(); // 3 blocks: does not fit beside 1 and 2
    s.enqueue(4, prompt(2, 3), 10, 0).unwrap(); // 1 block: would fit, must not overtake 3
    let step = advance(&mut s);
    assert_eq!(step.prefill.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(s.waiting(), 2);
    s.remove(1);
    s.remove(2);
    let step = s.next_step();
    assert_eq!(step.prefill.iter().map(|c| c.id).collect::<Vec<_>>(), [3, 4]);
}

#[test]
fn a_request_larger_than_the_store_is_rejected_up_front() {
    let mut s = scheduler(8, 10, 1000);
    assert_eq!(
        s.enqueue(1, prompt(10, 0), 41, 0),
        Err(Rejected::ExceedsBudget {
            tokens: 41,
            capacity: 40
        })
    );
    assert!(s.is_idle());
}

#[test]
fn running_out_of_blocks_preempts_the_youngest_which_later_recomputes() {
    // 4 blocks of 4: two sequences of 7 prompt tokens take 2 blocks each; the first to cross position 8 needs a
    // fifth block.
    let mut s = scheduler(8, 4, 1000);
    s.enqueue(1, prompt(7, 0), 16, 0).unwrap();
    s.enqueue(2, prompt(7, 1), 16, 0).unwrap();
    let step = advance(&mut s);
    assert_eq!(step.prefill.len(), 2);
    // Position 7 fits in block 2 of each; tokens 9 need a new block.
    let step = advance(&mut s);
    assert_eq!(step.decode, [1, 2]);
    let step = advance(&mut s);
    assert_eq!(step.preempted, [2], "the youngest gives way");
    assert_eq!(step.decode, [1]);
    assert_eq!(s.preemptions(), 1);
    assert_eq!((s.running(), s.waiting()), (1, 1));
    // Once 1 finishes, 2 comes back: its first full block is still cached, so it recomputes the rest only.
    s.remove(1);
    let step = s.next_step();
    let tokens = s.tokens(2).len();
    assert_eq!(tokens, 9, "the prompt and both generated tokens");
    assert_eq!(
        step.prefill,
        [chunk(2, 4, 5)],
        "one cached block, five tokens recomputed"
    );
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = scheduler(8, 100, 1000);
    let system: Vec<u32> = prompt(12, 9);
    let with_question = |q: u32| system.iter().copied().chain([q, q + 1]).collect::<Vec<u32>>();
    s.enqueue(1, with_question(500), 30, 0).unwrap();
    let step = advance(&mut s);
    assert_eq!(step.prefill, [chunk(1, 0, 14)]);
    s.next_step(); // registers 1's full blocks
    s.enqueue(2, with_question(600), 30, 0).unwrap();
    let step = s.next_step();
    assert_eq!(
        step.prefill,
        [chunk(2, 12, 2)],
        "three cached blocks of the system prompt"
    );
    assert_eq!(
        &s.block_table(2)[..3],
        &s.block_table(1)[..3],
        "the same physical blocks"
    );
    assert_eq!(
        (s.blocks().queries, s.blocks().hits),
        (28, 12),
        "1's 14 tokens and 2's 14, 12 found"
    );
    // Another tenant does not share them.
    s.enqueue(3, with_question(700), 30, 7).unwrap();
    let step = s.next_step();
    assert!(step.prefill.contains(&chunk(3, 0, 14)));
}

#[test]
fn a_failed_step_caches_nothing() {
    let mut s = scheduler(8, 100, 1000);
    s.enqueue(1, prompt(9, 0), 30, 0).unwrap();
    let _ = s.next_step();
    assert!(s.abort(1), "the model step failed");
    s.enqueue(2, prompt(9, 0), 30, 0).unwrap();
    assert_eq!(
        s.next_step().prefill,
        [chunk(2, 0, 9)],
        "nothing of 1's was cached"
    );
}

#[test]
fn cancelling_frees_the_slot_whether_waiting_or_running() {
    let mut s = scheduler(1, 100, 1000);
    s.enqueue(1, prompt(5, 0), 10, 0).unwrap();
    s.enqueue(2, prompt(5, 1), 10, 0).unwrap();
    assert_eq!(s.next_step().prefill, [chunk(1, 0, 5)]);
    assert!(s.remove(2), "a waiting sequence can be cancelled");
    assert!(s.remove(1), "a running sequence can be cancelled");
    assert!(!s.remove(1), "twice is a no-op");
    assert!(s.is_idle());
    s.enqueue(3, prompt(5, 2), 10, 0).unwrap();
    assert_eq!(s.next_step().prefill, [chunk(3, 0, 5)]);
}

#[test]
fn without_prefix_caching_every_prompt_is_computed_whole() {
    let mut s = Scheduler::new(SchedulerConfig {
        prefix_caching: false,
        ..config(8, 100, 1000)
    });
    s.enqueue(1, prompt(9, 0), 30, 0).unwrap();
    advance(&mut s);
    s.remove(1);
    s.enqueue(2, prompt(9, 0), 30, 0).unwrap();
    assert_eq!(s.next_step().prefill, [chunk(2, 0, 9)]);
    assert_eq!(s.blocks().hits, 0);
}

#[test]
fn a_sequence_preempted_before_its_decode_ran_caches_no_block_it_did_not_fill() {
    // Blocks of 4. Sequence 1: 7 prompt tokens and one generated; its planned decode would fill position 7, the
    // last of its second block.
    let mut s = scheduler(8, 10, 1000);
    s.enqueue(1, prompt(7, 0), 12, 0).unwrap();
    advance(&mut s);
    let mut step = s.next_step();
    assert_eq!(step.decode, [1]);
    // Preempted before that step ran (another sequence needed its blocks).
    s.preempt(1, &mut step);
    assert!(step.decode.is_empty() && s.block_table(1).is_empty());
    // A request with the same 8 tokens and more finds the first block cached, not the second: position 7 was
    // never computed.
    let same_start: Vec<u32> = s.tokens(1).iter().copied().chain([5]).collect();
    assert_eq!(same_start.len(), 9);
    s.remove(1);
    s.enqueue(3, same_start, 20, 0).unwrap();
    assert_eq!(s.next_step().prefill, [chunk(3, 4, 5)]);
}
