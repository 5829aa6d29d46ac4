//! Prefix-aware choice of a worker: a conversation's turns (and requests sharing a long prompt prefix) go to the
//! worker that has their prefix's KV blocks cached, unless that worker is busier than the rest.
//!
//! Consistent hashing with bounded load: the workers are ranked for the request's key by rendezvous hashing
//! (each worker scores `hash(key, worker)`, highest first), and the first whose load is within `1 + EPSILON`
//! times the average (counting this request) takes it. A worker joining or leaving moves only the keys it
//! wins or held, and a hot key spills over to the next-ranked worker instead of piling up. Some worker is always
//! within the bound (the least loaded is at most the average), so a request always finds one.

use std::hash::{Hash, Hasher};

use crate::validate::{Input, Validated};

/// How far above the average load a key's preferred worker may be and still take it.
const EPSILON: f64 = 0.25;

/// The prompt characters that name a prefix: the part that is the same over a conversation's turns, short
/// enough to hash quickly.
const PREFIX_CHARS: usize = 2048;

/// The routing key of a request: its tenant (prefix caches are per tenant), its model, and the beginning of its
/// conversation (the system prompt and first user turn, which every later turn resends) or of its prompt.
pub fn prefix_key(request: &Validated) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    request.cache_salt.hash(&mut h);
    request.model.hash(&mut h);
    request.adapter.hash(&mut h);
    let mut budget = PREFIX_CHARS;
    let mut take = |text: &str, h: &mut std::collections::hash_map::DefaultHasher| {
        let part: String = text.chars().take(budget).collect();
        budget -= part.chars().count();
        part.hash(h);
    };
    match &request.input {
        Input::Chat(messages) => {
            let first_user = messages.iter().position(|(role, _)| role == "user").unwrap_or(0);
            for (role, content) in messages.iter().take(first_user + 1) {
                role.hash(&mut h);
                take(content, &mut h);
            }
        }
        Input::Prompt(prompt) => take(prompt, &mut h),
    }
    h.finish()
}

fn score(key: u64, worker: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    worker.hash(&mut h);
    h.finish()
}

/// The index of the worker to take a request of `key`, among candidates given as `(address, requests in
/// flight)`; None when there are none.
pub fn choose(key: u64, candidates: &[(&str, usize)]) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    let total: usize = candidates.iter().map(|(_, load)| load).sum();
    let bound = ((total + 1) as f64 / candidates.len() as f64 * (1.0 + EPSILON)).ceil() as usize;
    let mut ranked: Vec<usize> = (0..candidates.len()).collect();
    ranked.sort_by_key(|&i| std::cmp::Reverse(score(key, candidates[i].0)));
    ranked.into_iter().find(|&i| candidates[i].1 < bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKERS: [&str; 4] = [
        "10.0.0.1:50051",
        "10.0.0.2:50051",
        "10.0.0.3:50051",
        "10.0.0.4:50051",
    ];

    fn idle(workers: &[&'static str]) -> Vec<(&'static str, usize)> {
        workers.iter().map(|w| (*w, 0)).collect()
    }

    #[test]
    fn a_key_keeps_its_worker_and_keys_spread_over_all() {
        let mut per_worker = [0; 4];
        for key in 0..400u64 {
            let first = choose(key, &idle(&WORKERS)).unwrap();
            assert_eq!(
                choose(key, &idle(&WORKERS)),
                Some(first),
                "the same key, the same worker"
            );
            per_worker[first] += 1;
        }
        assert!(per_worker.iter().all(|&n| n > 60), "spread: {per_worker:?}");
    }

    #[test]
    fn a_worker_leaving_moves_only_its_own_keys() {
        let three = &WORKERS[..3];
        for key in 0..400u64 {
            let before = WORKERS[choose(key, &idle(&WORKERS)).unwrap()];
            let after = three[choose(key, &idle(three)).unwrap()];
            if before != WORKERS[3] {
                assert_eq!(before, after, "key {key} moved though its worker stayed");
            }
        }
    }

    #[test]
    fn a_busy_preferred_worker_spills_to_the_next_and_load_stays_bounded() {
        let key = 7;
        let preferred = choose(key, &idle(&WORKERS)).unwrap();
        let mut loads = idle(&WORKERS);
        loads[preferred].1 = 5;
        let other = choose(key, &loads).unwrap();
        assert_ne!(other, preferred, "5 in flight against an average of 1.5");
        // One hot key alone: requests pile on no worker beyond the bound.
        let mut loads = idle(&WORKERS);
        for _ in 0..40 {
            let i = choose(key, &loads).unwrap();
            loads[i].1 += 1;
        }
        assert!(loads.iter().all(|(_, l)| *l <= 13), "{loads:?}");
    }

    #[test]
    fn every_turn_of_a_conversation_has_the_key_of_its_first() {
        let chat = |turns: &[(&str, &str)], salt: &str| Validated {
            api: crate::validate::Api::Chat,
            model: "ns/smol".into(),
            input: Input::Chat(
                turns
                    .iter()
                    .map(|(r, c)| (r.to_string(), c.to_string()))
                    .collect(),
            ),
            params: crate::validate::Params::greedy(None),
            stream: true,
            include_usage: false,
            cache_salt: salt.into(),
            adapter: String::new(),
        };
        let first = [("system", "Be brief."), ("user", "Tell me about llamas.")];
        let third = [
            ("system", "Be brief."),
            ("user", "Tell me about llamas."),
            ("assistant", "They are camelids."),
            ("user", "And alpacas?"),
        ];
        assert_eq!(prefix_key(&chat(&first, "k")), prefix_key(&chat(&third, "k")));
        assert_ne!(
            prefix_key(&chat(&first, "k")),
            prefix_key(&chat(&first, "other-key"))
        );
        let other = [("system", "Be brief."), ("user", "Tell me about camels.")];
        assert_ne!(prefix_key(&chat(&first, "k")), prefix_key(&chat(&other, "k")));
    }
}
