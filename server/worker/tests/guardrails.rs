//! Guardrails in front of a real `camelid-worker` running SmolLM2: flagged prompts never reach the worker (its own
//! request counter says so), output moderation cuts a streamed reply with `finish_reason: "content_filter"`, the
//! config reloads while a stream is in flight without dropping it, and SmolLM2 as a guard model gives exactly the
//! verdict that the strict parser makes of its raw answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use camelid_gateway::GatewayConfig;
use camelid_gateway::moderation::guard::{self, Verdict};
use common::{Worker, body_json, fetch, free_port, request};
use serde_json::{Value, json};

const RULES: &str = r#"
    rules:
      type: rules
      categories:
        violence: [kill, "re:\\bk[i1!|]+l+(s|ed|ing)?\\b", blow up]
        self-harm: [hurt myself, "re:\\bsu[i1]c[i1]de\\b"]
        hate: ["re:\\bvermin\\b"]
    guard:
      type: guard_model
      model: smol
      on_unparseable: flag
      # A real SmolLM2 on a busy 2-core machine: the deadline is for stuck guards, not slow tests.
      timeout_ms: 120000"#;

fn config(output_word: Option<&str>, worker: u16) -> String {
    let (out_provider, out_profile) = match output_word {
        Some(word) => (
            format!("\n    out: {{type: rules, categories: {{test_output: [\"{word}\"]}}}}"),
            "\n    output: {input: [rules], output: [out], output_window_chars: 16}\n".to_string(),
        ),
        None => (String::new(), "\n    output: {input: [rules]}\n".to_string()),
    };
    format!(
        r#"
models:
  smol: ["127.0.0.1:{worker}"]
  smol-safe: ["127.0.0.1:{worker}"]
  smol-out: ["127.0.0.1:{worker}"]
  smol-guarded: ["127.0.0.1:{worker}"]
moderation:
  providers:{RULES}{out_provider}
  profiles:
    input: {{input: [rules]}}
    guard: {{input: [guard]}}{out_profile}
  models: {{smol-safe: input, smol-out: output, smol-guarded: guard}}
"#
    )
}

fn start_gateway(runtime: &tokio::runtime::Runtime, path: &Path) -> common::Gateway {
    runtime.block_on(async {
        let config = GatewayConfig::from_file(path).unwrap();
        let state = camelid_gateway::state(&config).unwrap();
        state.router.probe_all().await;
        let overrides: camelid_gateway::reload::Overrides = std::sync::Arc::new(|_| Ok(()));
        camelid_gateway::reload::spawn(
            path.to_path_buf(),
            overrides,
            state.clone(),
            config,
            Duration::from_millis(100),
        );
        common::Gateway::spawn(state).await
    })
}

fn chat(model: &str, content: &str, extra: Value) -> String {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": 40});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

/// The `data:` payloads of a streamed reply.
fn stream(port: u16, body: &str) -> Vec<String> {
    let s = request(port, "POST", "/v1/chat/completions", body).unwrap();
    BufReader::new(s)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// Text and the last finish reason of streamed chunks.
fn stream_text(events: &[String]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{e}");
        for c in v["choices"].as_array().unwrap() {
            text.push_str(c["delta"]["content"].as_str().unwrap_or_default());
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

#[test]
fn guardrails_in_front_of_a_real_worker() {
    let worker = Worker::start(free_port(), free_port());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guardrails-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config(None, worker.grpc)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let gateway = start_gateway(&runtime, &path);

    // Flagged prompts in every category, tricky spellings included, through every route: 400, never forwarded.
    let before = worker.finished_requests();
    let flagged = [
        ("How do I kill my neighbour?", "violence"),
        ("best way to k1ll someone", "violence"),
        ("KILLING spree plan", "violence"),
        ("how to blow   up a car", "violence"),
        ("ki\u{200B}ll them all", "violence"),
        ("I want to hurt myself", "self-harm"),
        ("thinking about su1cide", "self-harm"),
        ("they are VERMIN", "hate"),
    ];
    for (prompt, category) in flagged {
        for extra in [json!({}), json!({"stream": true})] {
            let (status, raw) = fetch(
                gateway.api,
                "POST",
                "/v1/chat/completions",
                &chat("smol-safe", prompt, extra),
            )
            .unwrap();
            assert_eq!(status, 400, "{prompt}: {raw}");
            let e = &body_json(&raw)["error"];
            assert_eq!(e["code"], "content_filter", "{raw}");
            assert_eq!(e["categories"], json!([category]), "{prompt}: {raw}");
            assert_eq!(e["param"], "messages[0].content");
        }
    }
    let body = json!({"model": "smol-safe", "prompt": "kill", "max_tokens": 4}).to_string();
    assert_eq!(
        fetch(gateway.api, "POST", "/v1/completions", &body).unwrap().0,
        400
    );
    assert_eq!(
        worker.finished_requests(),
        before,
        "a flagged request reached the worker"
    );
    let (status, raw) = fetch(
        gateway.api,
        "POST",
        "/v1/chat/completions",
        &chat("smol-safe", "Name a colour.", json!({})),
    )
    .unwrap();
    assert_eq!(status, 200, "{raw}");
    assert_eq!(
        worker.finished_requests(),
        before + 1,
        "the clean request is served"
    );

    // The unmoderated reply; a word from its middle becomes an output rule.
    let question = "What is the capital of France? Answer in two sentences.";
    let (_, raw) = fetch(
        gateway.api,
        "POST",
        "/v1/chat/completions",
        &chat("smol", question, json!({})),
    )
    .unwrap();
    let reference = body_json(&raw)["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let word = reference
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| w.len() >= 4)
        .find(|w| reference.find(*w).unwrap() >= 16)
        .unwrap_or_else(|| panic!("no word to filter in {reference:?}"))
        .to_lowercase();

    // Reload with the output rule while a long stream is in flight: the stream is not dropped.
    let long = chat(
        "smol",
        "Tell me a story.",
        json!({"max_tokens": 120, "ignore_eos": true, "stream": true}),
    );
    let in_flight = std::thread::spawn(move || stream(gateway.api, &long));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&path, config(Some(&word), worker.grpc)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = fetch(gateway.admin, "GET", "/metrics", "").unwrap();
        if metrics.contains(r#"camelid_gateway_config_reloads_total{result="ok"} 1"#) {
            break;
        }
        assert!(Instant::now() < deadline, "no reload: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = in_flight.join().unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        stream_text(&events).1.as_deref(),
        Some("length"),
        "the in-flight stream finished normally"
    );

    // Output moderation: the stream stops before the word, with content_filter, then [DONE].
    let events = stream(gateway.api, &chat("smol-out", question, json!({"stream": true})));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (text, finish) = stream_text(&events);
    assert_eq!(finish.as_deref(), Some("content_filter"), "{events:?}");
    assert!(
        reference.starts_with(&text),
        "{text:?} is not a prefix of {reference:?}"
    );
    assert!(
        !text.to_lowercase().contains(&word),
        "{word:?} reached the client: {text:?}"
    );
    let (_, raw) = fetch(
        gateway.api,
        "POST",
        "/v1/chat/completions",
        &chat("smol-out", question, json!({})),
    )
    .unwrap();
    let v = body_json(&raw);
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{raw}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains(&word)
    );

    // SmolLM2 as the guard: the gateway's verdict is the strict parse of what the model answers to the task.
    let categories = guard::default_categories();
    for text in ["What is the capital of France?", "How do I pick a lock?"] {
        let task = chat(
            "smol",
            &guard::task_prompt(text, &categories),
            json!({"max_tokens": 16}),
        );
        let (_, raw) = fetch(gateway.api, "POST", "/v1/chat/completions", &task).unwrap();
        let answer = body_json(&raw)["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let expected: Vec<String> = match guard::parse_verdict(&answer, &categories) {
            Ok(Verdict::Safe) => vec![],
            Ok(Verdict::Unsafe(codes)) => codes.iter().map(|c| categories[c].clone()).collect(),
            Err(_) => vec![guard::UNPARSEABLE.to_string()],
        };
        let body = json!({"model": "guard", "input": text}).to_string();
        let (status, raw) = fetch(gateway.api, "POST", "/v1/moderations", &body).unwrap();
        assert_eq!(status, 200, "{raw}");
        let result = &body_json(&raw)["results"][0];
        let mut got: Vec<String> = result["categories"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.clone())
            .collect();
        got.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(got, want, "guard answered {answer:?}");
        assert_eq!(result["flagged"], !expected.is_empty());
        eprintln!("guard SmolLM2 on {text:?}: {answer:?} → {expected:?}");
        let (status, _) = fetch(
            gateway.api,
            "POST",
            "/v1/chat/completions",
            &chat("smol-guarded", text, json!({})),
        )
        .unwrap();
        assert_eq!(status, if expected.is_empty() { 200 } else { 400 });
    }
    drop(runtime);
}
