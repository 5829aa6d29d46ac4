//! The real model behind the paged scheduler: greedy replies are the same whatever the worker does to fit them
//! (prefix caching, chunked prefill, preemption for memory, any batch), and vLLM's metric names are exported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use camelid_model::{BlockStore, ChatMessage, SamplingParams};
use camelid_worker::engine::BLOCK_SIZE;
use camelid_worker::{Event, GenParams, Input, ModelArgs, WorkerConfig, WorkerError, WorkerHandle};
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
    answer_with(handle, question, None).await.unwrap()
}

/// The greedy reply to `question` from the base model or a LoRA adapter, or the error that refused it.
async fn answer_with(
    handle: &WorkerHandle,
    question: &str,
    adapter: Option<&str>,
) -> Result<String, WorkerError> {
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
        adapter: adapter.map(str::to_string),
    };
    let mut generation = handle.generate(Input::Chat(messages), params).await?;
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            Event::Chunk { text: t, .. } => text.push_str(&t),
            Event::Finished { .. } => return Ok(text),
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

/// A LoRA adapter over the served model with random, non-zero `B` (a trained adapter's), written as PEFT files.
fn write_adapter(config: &camelid_model::Config, dir: &std::path::Path, modules: &[&str], seed: i64) {
    use camelid_model::lora::{LoraAdapter, LoraConfig};
    let modules: Vec<String> = modules.iter().map(|m| m.to_string()).collect();
    let lora = LoraConfig::new(8, 16.0, 0.0, &modules, false).unwrap();
    let fresh = LoraAdapter::init(lora.clone(), config, seed, tch::Device::Cpu).unwrap();
    let weights = fresh
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.randn_like() * 0.02))
        .collect();
    let adapter = LoraAdapter::from_tensors(lora, config, weights, dir).unwrap();
    adapter.write_peft(dir, "SmolLM2-135M-Instruct").unwrap();
}

/// Many adapters over one base: a batch mixing the base and adapters gives each request its own greedy reply, an
/// adapter loads and unloads while requests run (none is lost), the least recently requested is evicted beyond
/// `max_loras`, and a hostile adapter path is refused with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_share_the_batch_with_the_base_and_come_and_go_under_load() {
    let root = std::env::current_dir().unwrap().join("../../target/worker-lora");
    let _ = std::fs::remove_dir_all(&root);
    let config = model_args().load().unwrap().config().clone();
    write_adapter(&config, &root.join("sql"), &["all-linear"], 1);
    write_adapter(&config, &root.join("poet"), &["q_proj", "v_proj", "down_proj"], 2);
    write_adapter(&config, &root.join("chef"), &["gate_proj", "up_proj"], 3);
    let handle = start(WorkerConfig {
        lora_modules: vec![("sql".into(), root.join("sql"))],
        max_loras: 2,
        ..WorkerConfig::default()
    })
    .await;
    handle.load_adapter("poet", &root.join("poet")).await.unwrap();
    let names: Vec<String> = handle.adapters().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["poet", "sql"]);

    let asks = [
        (QUESTIONS[0], None),
        (QUESTIONS[0], Some("sql")),
        (QUESTIONS[1], Some("poet")),
        (QUESTIONS[1], None),
    ];
    let mut solo = Vec::new();
    for (q, adapter) in asks {
        solo.push(answer_with(&handle, q, adapter).await.unwrap());
    }
    assert_ne!(solo[0], solo[1], "the sql adapter changes the reply");
    assert_ne!(solo[2], solo[3], "the poet adapter changes the reply");
    let tasks: Vec<_> = asks
        .iter()
        .map(|&(q, adapter)| {
            let handle = handle.clone();
            tokio::spawn(async move { answer_with(&handle, q, adapter).await })
        })
        .collect();
    // While they run: sql is unloaded (its running request keeps the weights it started with) and chef loads.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while handle.in_flight() < asks.len() || handle.load().0 + handle.load().1 < asks.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the requests were never all admitted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let text = handle.metrics().encode();
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:lora_requests_info{"))
        .unwrap_or_default();
    assert!(
        line.contains("poet") && line.contains("sql"),
        "vLLM's adapter gauge: {line:?}"
    );
    handle.unload_adapter("sql").await.unwrap();
    handle.load_adapter("chef", &root.join("chef")).await.unwrap();
    for ((task, want), (q, adapter)) in tasks.into_iter().zip(&solo).zip(asks) {
        assert_eq!(
            &task.await.unwrap().unwrap(),
            want,
            "{q:?} with {adapter:?}: batched differs from alone"
        );
    }
    let err = answer_with(&handle, QUESTIONS[0], Some("sql")).await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::InvalidRequest {
                code: "model_not_found",
                ..
            }
        ),
        "{err}"
    );
    // Beyond max_loras (2) the least recently requested leaves: poet was just asked for, so chef goes.
    answer_with(&handle, QUESTIONS[2], Some("poet")).await.unwrap();
    handle.load_adapter("sql-v2", &root.join("sql")).await.unwrap();
    let names: Vec<String> = handle.adapters().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["poet", "sql-v2"]);
    handle.unload_adapter("poet").await.unwrap();
    assert!(handle.unload_adapter("poet").await.is_err());
    for hostile in ["/etc", "/dev/zero", "../../../../etc/passwd"] {
        let err = handle
            .load_adapter("evil", std::path::Path::new(hostile))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WorkerError::InvalidRequest {
                    param: Some("lora_path"),
                    ..
                }
            ),
            "{hostile}: {err}"
        );
    }
    assert_eq!(handle.adapters().len(), 1);
    let text = handle.metrics().encode();
    assert!(
        text.contains("vllm:lora_requests_info{") && text.contains("max_lora=\"2\""),
        "{text}"
    );
}
