//! Token accounting for `tokens_per_minute`: an upper bound of a request's tokens reserved at admission, settled
//! with the worker's real count at the end.
//!
//! The gateway has no tokenizer, so the prompt is bounded rather than estimated: every token of a byte-level BPE
//! (GPT-2 style, SmolLM2, LLaMA 3) covers at least one byte of the text, and a SentencePiece tokenizer with byte
//! fallback (LLaMA 1 and 2) emits at most one token per byte plus one for its dummy prefix. So a message costs at
//! most its UTF-8 bytes plus one, plus what the chat template wraps it in ([`MESSAGE_OVERHEAD_TOKENS`]), plus the
//! template's fixed text (a default system prompt, BOS, the generation prompt: [`PROMPT_OVERHEAD_TOKENS`]). An
//! empty message, an emoji or a CJK character can no longer count less than it uses. The generation is bounded by
//! `max_tokens`, which the gateway always sends (an absent one becomes the key's default). The reservation is
//! an upper bound, so a client pays at most for what it asked; [`Charge`] gives back the difference once the
//! worker reports what it used.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::validate::Input;

/// Tokens a chat template may add around one message (role markers, separators, the end-of-turn token). ChatML
/// adds 5 (`<|im_start|>`, the role, `\n`, `<|im_end|>`, `\n`), LLaMA 3 about 5, `[INST]` templates about 10;
/// 32 leaves room for templates written into a model file.
pub const MESSAGE_OVERHEAD_TOKENS: u32 = 32;

/// Tokens a chat template may add once per prompt: BOS, the generation prompt, a default system prompt (FastChat
/// `vicuna_v1.1`'s is 31 tokens, LLaMA 3.1's date header about 25).
pub const PROMPT_OVERHEAD_TOKENS: u32 = 256;

/// An upper bound of the prompt's tokens under any byte-level BPE or byte-fallback SentencePiece tokenizer and a
/// template within the overheads above.
pub fn prompt_bound(input: &Input) -> u32 {
    let one = |text: &str| {
        u32::try_from(text.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1 + MESSAGE_OVERHEAD_TOKENS)
    };
    let body = match input {
        Input::Chat(messages) => messages
            .iter()
            .fold(0u32, |sum, (_, content)| sum.saturating_add(one(content))),
        Input::Prompt(prompt) => one(prompt),
    };
    body.saturating_add(PROMPT_OVERHEAD_TOKENS)
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// More than the bucket ever holds: this request can never fit.
    Never,
    /// Enough will be back after this wait.
    Later(Duration),
}

/// A bucket of `per_minute` tokens refilled continuously (a minute's worth of burst), that can take tokens back
/// and run into debt (a request that used more than it reserved, which a true bound makes impossible, is still
/// charged in full).
#[derive(Debug)]
pub struct TokenBucket {
    per_minute: u32,
    /// Tokens available (negative: debt) and when that was computed.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(per_minute: NonZeroU32) -> Self {
        Self {
            per_minute: per_minute.get(),
            state: Mutex::new((f64::from(per_minute.get()), Instant::now())),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Runs `f` on the refilled level.
    fn with<T>(&self, f: impl FnOnce(&mut f64) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let cap = f64::from(self.per_minute);
        let refill = now.duration_since(state.1).as_secs_f64() * cap / 60.0;
        state.0 = (state.0 + refill).min(cap);
        state.1 = now;
        f(&mut state.0)
    }

    /// Takes `n` tokens, or says when they will be there.
    pub fn take(&self, n: u32) -> Result<(), Refused> {
        if n > self.per_minute {
            return Err(Refused::Never);
        }
        let rate = f64::from(self.per_minute) / 60.0;
        self.with(|level| {
            let want = f64::from(n);
            if *level >= want {
                *level -= want;
                Ok(())
            } else {
                Err(Refused::Later(Duration::from_secs_f64((want - *level) / rate)))
            }
        })
    }

    /// Gives `n` tokens back (never above a full bucket).
    pub fn give_back(&self, n: u32) {
        let cap = f64::from(self.per_minute);
        self.with(|level| *level = (*level + f64::from(n)).min(cap));
    }

    /// Takes `n` more tokens unconditionally (into debt if need be).
    pub fn charge(&self, n: u32) {
        self.with(|level| *level -= f64::from(n));
    }

    /// Tokens available now (for tests and logs).
    pub fn available(&self) -> f64 {
        self.with(|level| *level)
    }
}

/// Tokens reserved for one request; dropping it settles the reservation with the tokens the worker reported
/// (prompt plus generated, as far as they are known: nothing before a worker started the request).
#[derive(Debug)]
pub struct Charge {
    bucket: Arc<TokenBucket>,
    reserved: u32,
    used: AtomicU32,
}

impl Charge {
    pub fn new(bucket: Arc<TokenBucket>, reserved: u32) -> Self {
        Self {
            bucket,
            reserved,
            used: AtomicU32::new(0),
        }
    }

    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Records the tokens used so far (the latest report replaces the earlier ones).
    pub fn set_used(&self, tokens: usize) {
        self.used
            .store(u32::try_from(tokens).unwrap_or(u32::MAX), Ordering::Relaxed);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let used = self.used.load(Ordering::Relaxed);
        if used < self.reserved {
            self.bucket.give_back(self.reserved - used);
        } else if used > self.reserved {
            tracing::warn!(
                reserved = self.reserved,
                used,
                "a request used more tokens than its bound; charged in full"
            );
            self.bucket.charge(used - self.reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &[(&str, &str)]) -> Input {
        Input::Chat(
            messages
                .iter()
                .map(|(r, c)| (r.to_string(), c.to_string()))
                .collect(),
        )
    }

    #[test]
    fn empty_messages_emoji_and_cjk_count_at_least_their_bytes() {
        // The attacks of the issue: 500 empty messages used 2,525 tokens, 400 emoji 1,230.
        let empty = chat(&vec![("user", ""); 500]);
        assert!(prompt_bound(&empty) >= 2525, "{}", prompt_bound(&empty));
        let emoji = chat(&[("user", &"😀".repeat(400))]);
        assert!(prompt_bound(&emoji) >= 1230 && prompt_bound(&emoji) >= 1600);
        let cjk = chat(&[("user", &"你好".repeat(100))]);
        assert!(prompt_bound(&cjk) >= 600);
        assert_eq!(
            prompt_bound(&Input::Prompt("abcd".into())),
            4 + 1 + MESSAGE_OVERHEAD_TOKENS + PROMPT_OVERHEAD_TOKENS
        );
    }

    #[test]
    fn huge_inputs_saturate_instead_of_wrapping() {
        let big = "x".repeat(1 << 16);
        let many = chat(&vec![("user", big.as_str()); 70_000]);
        assert_eq!(prompt_bound(&many), u32::MAX);
    }

    #[test]
    fn a_charge_gives_back_what_was_not_used_and_takes_what_was() {
        let bucket = Arc::new(TokenBucket::new(NonZeroU32::new(1000).unwrap()));
        assert_eq!(bucket.take(1001), Err(Refused::Never));
        bucket.take(900).unwrap();
        assert!(matches!(bucket.take(200), Err(Refused::Later(w)) if w > Duration::from_secs(5)));
        let charge = Charge::new(bucket.clone(), 900);
        charge.set_used(300);
        drop(charge);
        let level = bucket.available();
        assert!((700.0..710.0).contains(&level), "{level}");
        bucket.take(700).unwrap();
        let over = Charge::new(bucket.clone(), 0);
        over.set_used(500);
        drop(over);
        assert!(
            bucket.available() < -400.0,
            "debt is kept: {}",
            bucket.available()
        );
    }
}
