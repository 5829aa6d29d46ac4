//! The real model behind the paged scheduler: greedy replies are the same whatever the worker does to fit them
//! (prefix caching, chunked prefill, preemption for memory, any batch), and vLLM's metric names are exported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use camelid_model::{BlockStore, ChatMessage, SamplingParams};
use camelid_worker::engine::BLOCK_SIZE;
use camelid_worker::{Event, GenParams, Input, ModelArgs, WorkerConfig, WorkerHandle};
use tch::Kind;

const SYSTEM: &str = "You are a careful assistant. Answer in one or two plain sentences, without lists, and \
                      never mention that you are an AI model.";

const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Where do penguins live?",
];

/// Prompts are 46 to 49 tokens, so each sequence grows to 6 blocks of 16 positions: any two running together need
/// more than the squeezed store's 8 (even sharing the system prompt's 2 full blocks), and the second is always
/// admitted while the first still holds 4 or fewer, so a preemption happens whatever the arrival timing.
const MAX_TOKENS: usize = 40;

fn model_args() -> ModelArgs {
    ModelArgs {
        model: None,
        dtype: None,
        device: camelid_worker::load::DeviceArg::Cpu,
        template: None,
    }
}

async fn start(config: WorkerConfig) -> WorkerHandle {
    let model = model_args();
    let handle = WorkerHandle::start(config, move || Ok(model.load()?)).unwrap();
    handle.wait_ready().await.expect("the model loads");
    handle
}

async fn answer(handle: &WorkerHandle, question: &str) -> String {
    let messages = vec![
        ChatMessage {
            role: "system".into(),
            content: SYSTEM.into(),
        },
        ChatMessage {
            role: "user".into(),
            content: question.into(),
        },
    ];
    let params = GenParams {
        max_tokens: Some(MAX_TOKENS),
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: vec![],
        ignore_eos: true,
        cache_salt: String::new(),
    };
    let mut generation = handle.generate(Input::Chat(messages), params).await.unwrap();
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Chunk { text: t, .. } => text.push_str(&t),
            Event::Finished { .. } => return text,
            Event::Failed(e) => panic!("{question}: {e}"),
            Event::Interrupted => panic!("{question}: interrupted"),
            Event::Started { .. } => {}
        }
    }
    panic!("{question}: the stream ended without finishing")
}

fn metric(handle: &WorkerHandle, name: &str) -> f64 {
    let text = handle.metrics().encode();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not exported:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_replies_survive_prefix_caching_chunking_and_preemption() {
    // Reference: each question alone, whole prompts, no prefix cache.
    let plain = start(WorkerConfig {
        prefix_caching: false,
        max_step_tokens: 4096,
        ..WorkerConfig::default()
    })
    .await;
    let mut solo = Vec::new();
    for q in QUESTIONS {
        solo.push(answer(&plain, q).await);
    }
    drop(plain);

    // Squeezed: 16-token steps (every prompt is chunked), a store of 8 blocks (see MAX_TOKENS: running sequences
    // are preempted and recomputed), and the shared system prompt cached.
    let info = model_args().load().unwrap();
    let c = info.config();
    let block_bytes = BlockStore::block_bytes(
        c.num_layers,
        BLOCK_SIZE,
        [c.num_kv_heads, c.head_dim],
        Kind::Float,
    );
    drop(info);
    let squeezed = start(WorkerConfig {
        kv_budget_bytes: 8 * block_bytes,
        max_step_tokens: 16,
        ..WorkerConfig::default()
    })
    .await;
    for round in 0..2 {
        let tasks: Vec<_> = QUESTIONS
            .iter()
            .map(|q| {
                let handle = squeezed.clone();
                tokio::spawn(async move { answer(&handle, q).await })
            })
            .collect();
        let mut together = Vec::new();
        for task in tasks {
            together.push(task.await.unwrap());
        }
        for ((q, a), b) in QUESTIONS.iter().zip(&solo).zip(&together) {
            assert_eq!(a, b, "round {round}: {q:?} differs from its solo reply");
        }
    }
    assert!(
        metric(&squeezed, "vllm:num_preemptions_total") > 0.0,
        "the store was too small not to preempt"
    );
    let (queries, hits) = (
        metric(&squeezed, "vllm:prefix_cache_queries_total"),
        metric(&squeezed, "vllm:prefix_cache_hits_total"),
    );
    assert!(hits > 0.0 && hits < queries, "hits {hits} of {queries}");
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ] {
        let _ = metric(&squeezed, name);
    }
    assert_eq!(
        metric(&squeezed, "vllm:generation_tokens_total"),
        (2 * QUESTIONS.len() * MAX_TOKENS) as f64
    );
}
