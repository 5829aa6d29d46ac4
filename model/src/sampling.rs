//! Turning logits into the next token: penalties, temperature, top-k, top-p, and a seeded random choice.
//!
//! This works on a plain `Vec<f32>` of one position's logits, so it is exact, cheap to test, and the same on CPU
//! and GPU.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// How to choose tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// HF-style multiplicative penalty on tokens already in the context (1.0 disables).
    pub repetition_penalty: f64,
    /// OpenAI-style additive penalties on tokens already generated.
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects values no sampler can honour, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ModelError::InvalidRequest(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-6
    }
}

/// A sampler with its own random stream; one per sequence, so a seed reproduces a completion, and a completion
/// continued from any position (see [`Sampler::sample`]).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the penalties in place: the repetition penalty to every token of `prompt` and `generated`, the
    /// presence/frequency penalties to the completion so far (`generated`) only.
    pub fn apply_penalties(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            let rp = p.repetition_penalty as f32;
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l < 0.0 { *l * rp } else { *l / rp };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty as f32 + p.frequency_penalty as f32 * n as f32;
                }
            }
        }
    }

    /// Picks the next token from one position's logits.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> u32 {
        self.apply_penalties(logits, prompt, generated);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature as f32;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = if self.params.top_k == 0 {
            logits.len()
        } else {
            self.params.top_k.min(logits.len())
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let max = logits[order[0] as usize] * inv_t;
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&t| (logits[t as usize] * inv_t - max).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    cumulative += p;
                    cumulative >= self.params.top_p as f32
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        // The draw for the n-th generated token is word n of the seed's stream, whatever came before: a
        // generation continued on another worker from its first n tokens draws exactly what this one would have.
        self.rng.set_word_pos(generated.len() as u128);
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return order[i];
            }
            r -= p;
        }
        order[probs.len() - 1]
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        let s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        let mut logits = [4.0, -4.0, 1.0];
        s.apply_penalties(&mut logits, &[0, 1, 1], &[]);
        assert_eq!(logits, [2.0, -8.0, 1.0]);
        // Generated tokens count as context too, once each however often they repeat.
        let mut logits = [4.0, -4.0, 1.0];
        s.apply_penalties(&mut logits, &[0], &[1, 1]);
        assert_eq!(logits, [2.0, -8.0, 1.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let s = sampler(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        });
        let mut logits = [1.0, 1.0, 1.0];
        s.apply_penalties(&mut logits, &[2, 2, 2], &[0, 0, 1]);
        assert_eq!(logits, [0.0, 0.25, 1.0]);
    }

    #[test]
    fn same_seed_same_choices_and_top_k_limits_support() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let logits = [1.0f32, 0.9, 0.8, 0.7, 5.0];
        let (mut a, mut b) = (sampler(params.clone()), sampler(params));
        let picks = |s: &mut Sampler| {
            let mut generated = Vec::new();
            for _ in 0..200 {
                let t = s.sample(&mut logits.clone(), &[], &generated);
                generated.push(t);
            }
            generated
        };
        let (picks_a, picks_b) = (picks(&mut a), picks(&mut b));
        assert_eq!(picks_a, picks_b);
        assert!(picks_a.iter().all(|&t| t == 4 || t == 0));
        assert!(picks_a.contains(&0), "top-2 keeps the runner-up reachable");
    }

    #[test]
    fn a_seeded_sampler_continued_from_any_position_draws_what_the_first_would_have() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let mut first = sampler(params.clone());
        let mut generated = Vec::new();
        for _ in 0..40 {
            let t = first.sample(&mut logits.clone(), &[], &generated);
            generated.push(t);
        }
        for at in [0, 1, 17, 39] {
            // A fresh sampler (another worker) given the first `at` tokens.
            let mut second = sampler(params.clone());
            let mut continued = generated[..at].to_vec();
            while continued.len() < generated.len() {
                let t = second.sample(&mut logits.clone(), &[], &continued);
                continued.push(t);
            }
            assert_eq!(continued, generated, "continued from token {at}");
        }
        assert!(
            generated.iter().collect::<std::collections::HashSet<_>>().len() > 3,
            "it samples"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // softmax of [10, 0, 0, ...] puts > 0.99 on token 0: top_p 0.9 must always pick it.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = sampler(params);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0, 0.0], &[], &[]), 0);
        }
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        for (params, field) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: 3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
        ] {
            assert!(Sampler::new(params).unwrap_err().to_string().contains(field));
        }
    }
}
