//! The generation loop for one sequence: prefill, then decode token by token with the KV cache, streaming text.

use std::time::{Duration, Instant};

use crate::cpu_gemv::DecodePool;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use crate::sampling::{Sampler, SamplingParams};
use crate::stream::TokenTextStream;
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub eos_token_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Completion {
    /// Decode speed after the first token (tokens/s).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let steps = self.token_ids.len().saturating_sub(1);
        if steps == 0 || self.decode_time.is_zero() {
            0.0
        } else {
            steps as f64 / self.decode_time.as_secs_f64()
        }
    }
}

/// Sets libtorch's intra-op thread count and restores the previous one when dropped.
pub struct TorchThreads(i32);

impl TorchThreads {
    pub fn set(n: i32) -> Self {
        let previous = tch::get_num_threads();
        tch::set_num_threads(n);
        Self(previous)
    }
}

impl Drop for TorchThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// Generates a completion; `on_text` receives each piece of text as soon as it is final and returns false to cancel.
pub fn generate<'m>(
    model: &'m Llama,
    tokenizer: &Tokenizer,
    request: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Completion> {
    let context = model.config().max_position_embeddings;
    let prompt_tokens = request.prompt_ids.len();
    if prompt_tokens == 0 {
        return Err(ModelError::InvalidRequest("the prompt is empty".into()));
    }
    if prompt_tokens >= context {
        return Err(ModelError::ContextOverflow {
            prompt_tokens,
            context,
        });
    }
    if request.max_tokens == 0 {
        return Err(ModelError::InvalidRequest("max_tokens must be at least 1".into()));
    }
    let _span = tracing::debug_span!("generate", prompt_tokens, max_tokens = request.max_tokens).entered();
    let mut sampler = Sampler::new(request.sampling.clone())?;
    let max_new = request.max_tokens.min(context - prompt_tokens);
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache();
    let mut prefill_time = std::time::Duration::ZERO;
    let mut decode_start = Instant::now();

    let decode = |ids: &[u32]| tokenizer.decode(ids, true);
    let mut stream = TokenTextStream::new(&request.stop, request.eos_token_ids.clone(), max_new);
    let mut text = String::new();
    let mut decode_loop = |pool: Option<&DecodePool<'m>>| -> Result<FinishReason> {
        // The prompt runs on the pool too when the model's matrices are quantized blocks: libtorch would
        // dequantize every matrix, and the worker, which prefills on the pool, would compute other numbers.
        let start = Instant::now();
        let mut logits = model.forward_last_in(&request.prompt_ids, &mut cache, pool)?;
        prefill_time = start.elapsed();
        decode_start = Instant::now();
        loop {
            let mut values = Vec::<f32>::try_from(&logits.f_to_device(tch::Device::Cpu)?)?;
            let next = sampler.sample(&mut values, &request.prompt_ids, stream.generated());
            let pushed = stream.push(next, decode)?;
            if !pushed.text.is_empty() {
                text.push_str(&pushed.text);
                if !on_text(&pushed.text) {
                    return Ok(FinishReason::Cancelled);
                }
            }
            if let Some(reason) = pushed.finished {
                return Ok(reason);
            }
            logits = model.forward_last_in(&[next], &mut cache, pool)?;
        }
    };
    let finish_reason = if model.device() == tch::Device::Cpu {
        // Single-token CPU decoding runs its matrix-vector products on a DecodePool; libtorch's OpenMP workers
        // would only spin between them and take those cores, so libtorch runs single-threaded meanwhile.
        let _threads = TorchThreads::set(1);
        crate::cpu_gemv::with_decode_pool(|pool| decode_loop(Some(pool)))?
    } else {
        decode_loop(None)?
    };
    let token_ids = stream.generated().to_vec();
    Ok(Completion {
        text,
        token_ids,
        finish_reason,
        prompt_tokens,
        prefill_time,
        decode_time: decode_start.elapsed(),
    })
}
