//! Generations that outlive their worker, against scripted fake workers that fail in exactly the ways real ones do:
//! a stream that breaks mid-answer, a worker that drains (`Interrupted`), one that dies after its last token but
//! before `Finished`, none ready for a while, and one that always dies. The client sees one stream with each piece
//! of text once, exact usage, and the continuation carries the prompt and the tokens as ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use camelid_proto::v1::{self, generate_response::Event};
use common::{EventStream, gateway, post_chat, test_dir};

/// What a fake worker does with one call: the events it sends, then it ends the stream (without `Finished` unless
/// the script has one, which is how a dead worker's stream looks to the gateway).
type Script = Arc<dyn Fn(&v1::GenerateRequest) -> Vec<Event> + Send + Sync>;

#[derive(Clone)]
struct Fake {
    script: Script,
    asked: Arc<Mutex<Vec<v1::GenerateRequest>>>,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl v1::worker_server::Worker for Fake {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let request = request.into_inner();
        let events = (self.script)(&request);
        self.asked.lock().unwrap().push(request);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for e in events {
                let item = match e {
                    Event::Interrupted(i) if i.reason == MODEL_ERROR => {
                        Err(tonic::Status::internal("the model failed"))
                    }
                    e => Ok(v1::GenerateResponse { event: Some(e) }),
                };
                let _ = tx.send(item).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn health(
        &self,
        _: tonic::Request<v1::HealthRequest>,
    ) -> Result<tonic::Response<v1::HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::HealthResponse {
            ready: self.ready.load(std::sync::atomic::Ordering::Relaxed),
            running: 0,
            waiting: 0,
        }))
    }

    async fn model_info(
        &self,
        _: tonic::Request<v1::ModelInfoRequest>,
    ) -> Result<tonic::Response<v1::ModelInfoResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn load_adapter(
        &self,
        _: tonic::Request<v1::LoadAdapterRequest>,
    ) -> Result<tonic::Response<v1::LoadAdapterResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn unload_adapter(
        &self,
        _: tonic::Request<v1::UnloadAdapterRequest>,
    ) -> Result<tonic::Response<v1::UnloadAdapterResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
}

async fn fake(script: impl Fn(&v1::GenerateRequest) -> Vec<Event> + Send + Sync + 'static) -> (Fake, String) {
    fake_with(Arc::new(true.into()), script).await
}

/// A fake whose `Health` answers `ready`.
async fn fake_with(
    ready: Arc<std::sync::atomic::AtomicBool>,
    script: impl Fn(&v1::GenerateRequest) -> Vec<Event> + Send + Sync + 'static,
) -> (Fake, String) {
    let worker = Fake {
        script: Arc::new(script),
        asked: Arc::default(),
        ready,
    };
    let addr = common::serve_fake_worker(worker.clone()).await;
    (worker, addr)
}

const PROMPT: [u32; 3] = [5, 6, 7];

fn started() -> Event {
    Event::Started(v1::Started {
        prompt_tokens: PROMPT.len() as u32,
        prompt_token_ids: PROMPT.to_vec(),
    })
}

fn chunk(text: &str, ids: &[u32]) -> Event {
    Event::Chunk(v1::Chunk {
        text: text.into(),
        tokens: ids.len() as u32,
        token_ids: ids.to_vec(),
    })
}

fn finished(completion: u32) -> Event {
    Event::Finished(v1::Finished {
        reason: v1::FinishReason::Stop as i32,
        prompt_tokens: PROMPT.len() as u32,
        completion_tokens: completion,
    })
}

/// Where a script puts [`model_error`], the fake ends the stream with `INTERNAL` (the worker failed the generation).
const MODEL_ERROR: i32 = -1;

fn model_error() -> Event {
    Event::Interrupted(v1::Interrupted { reason: MODEL_ERROR })
}

fn interrupted() -> Event {
    Event::Interrupted(v1::Interrupted {
        reason: v1::InterruptReason::Draining as i32,
    })
}

/// A worker that answers a continuation as a real one would: from the tokens it was given, the rest of
/// "Hello world" (ids 10..=13), then `Finished` with the usage of the whole generation.
fn continues(r: &v1::GenerateRequest) -> Vec<Event> {
    let all: [(&str, u32); 4] = [("Hel", 10), ("lo", 11), (" wor", 12), ("ld", 13)];
    let have = r.continuation.as_ref().map_or(0, |c| c.generated_token_ids.len());
    let mut events = vec![started()];
    for (text, id) in &all[have..] {
        events.push(chunk(text, &[*id]));
    }
    events.push(finished(4));
    events
}

fn yaml(addrs: &[&str], extra: &str) -> String {
    format!(
        "models: {{smol: [{}]}}\nprobe_interval_ms: 100\nmoderation: none\n{extra}",
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

const STREAM: &str = r#"{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": true,
    "stream_options": {"include_usage": true}, "temperature": 0.7}"#;

/// The `data:` payloads of an SSE body.
fn events(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The streamed text, the finish reason and the usage's completion tokens.
fn streamed(text: &str) -> (String, Option<String>, Option<u64>) {
    let events = events(text);
    let content = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish = events
        .iter()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str().map(String::from));
    let usage = events
        .iter()
        .find_map(|e| e["usage"]["completion_tokens"].as_u64());
    for e in &events {
        assert!(e.get("error").is_none(), "an error reached the client: {text}");
    }
    (content, finish, usage)
}

fn metric(state: &camelid_gateway::AppState, prefix: &str) -> f64 {
    let text = state.metrics.encode();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two workers, the first scripted by `first`, the second continuing. Only the first is ready until it is called;
/// then it is down (as a dead or draining worker's probe says) and the second is up.
async fn pair(
    name: &str,
    first: impl Fn(&v1::GenerateRequest) -> Vec<Event> + Send + Sync + 'static,
    extra: &str,
) -> (Fake, Fake, camelid_gateway::AppState, axum::Router) {
    let (b, b_addr) = fake(continues).await;
    b.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    let a_ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (down, up) = (a_ready.clone(), b.ready.clone());
    let (a, a_addr) = fake_with(a_ready, move |r| {
        down.store(false, std::sync::atomic::Ordering::Relaxed);
        up.store(true, std::sync::atomic::Ordering::Relaxed);
        first(r)
    })
    .await;
    let (state, app, _) = gateway(&test_dir(name), &yaml(&[&a_addr, &b_addr], extra));
    state.router.probe_all().await;
    (a, b, state, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_mid_answer_continues_on_another_worker_from_the_ids_it_sent() {
    let (a, b, state, app) = pair(
        "migrate-broken",
        |_| vec![started(), chunk("Hel", &[10]), chunk("lo", &[11])],
        "",
    )
    .await;
    let reply = post_chat(&app, None, STREAM).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        streamed(&reply.text),
        ("Hello world".into(), Some("stop".into()), Some(4))
    );
    let first = a.asked.lock().unwrap()[0].clone();
    let seed = first.sampling.unwrap().seed;
    assert!(
        seed.is_some(),
        "a sampled request without a seed gets one, so it can continue exactly"
    );
    let asked = b.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    let c = asked[0].continuation.clone().expect("a continuation");
    assert_eq!(
        (c.prompt_token_ids, c.generated_token_ids),
        (PROMPT.to_vec(), vec![10, 11])
    );
    assert!(asked[0].input.is_none(), "nothing is re-tokenized");
    assert_eq!(asked[0].sampling.unwrap().seed, seed, "the same sampler");
    assert_eq!(metric(&state, "camelid_gateway_migrations_total{"), 1.0);
    assert!(state.metrics.encode().contains("cause=\"worker_lost\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_its_stream_over_and_is_not_asked_again() {
    let (a, b, state, app) = pair(
        "migrate-drain",
        |_| vec![started(), chunk("Hel", &[10]), interrupted()],
        "",
    )
    .await;
    let reply = post_chat(&app, None, STREAM).await;
    assert_eq!(streamed(&reply.text).0, "Hello world");
    assert!(state.metrics.encode().contains("cause=\"draining\""));
    let reply = post_chat(&app, None, STREAM).await;
    assert_eq!(streamed(&reply.text).0, "Hello world");
    assert_eq!(a.asked.lock().unwrap().len(), 1);
    assert_eq!(b.asked.lock().unwrap().len(), 2);
}

/// The worker sent its last token's text and died before `Finished`: the continuation has nothing left to
/// generate, and the client sees the text once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_lost_after_its_last_token_duplicates_nothing() {
    let (_a, b, _state, app) = pair(
        "migrate-last",
        |_| vec![started(), chunk("Hello", &[10, 11]), chunk(" world", &[12, 13])],
        "",
    )
    .await;
    let reply = post_chat(&app, None, STREAM).await;
    assert_eq!(
        streamed(&reply.text),
        ("Hello world".into(), Some("stop".into()), Some(4))
    );
    let c = b.asked.lock().unwrap()[0].continuation.clone().unwrap();
    assert_eq!(c.generated_token_ids, vec![10, 11, 12, 13]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_migrates_too() {
    let (_a, _b, _state, app) = pair("migrate-whole", |_| vec![started(), chunk("Hel", &[10])], "").await;
    let body = r#"{"model": "smol", "messages": [{"role": "user", "content": "hi"}]}"#;
    let reply = post_chat(&app, None, body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let v = reply.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(v["usage"]["completion_tokens"], 4);
}

/// No worker is ready when the stream breaks: it waits (the client's connection stays open) until one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_waits_for_a_ready_worker() {
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let down = ready.clone();
    // The only worker: its first stream breaks and it goes down (a pod restarting); once back, it continues.
    let (a, a_addr) = fake(move |r| {
        if r.continuation.is_some() {
            return continues(r);
        }
        down.store(false, std::sync::atomic::Ordering::Relaxed);
        vec![started(), chunk("Hel", &[10])]
    })
    .await;
    let (state, app, _) = gateway(&test_dir("migrate-wait"), &yaml(&[&a_addr], ""));
    state.router.probe_all().await;
    let flag = a.ready.clone();
    tokio::spawn(async move {
        while ready.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        flag.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(700)).await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let began = std::time::Instant::now();
    let reply = post_chat(&app, None, STREAM).await;
    assert!(
        began.elapsed() >= Duration::from_millis(600),
        "it waited for the worker"
    );
    assert_eq!(streamed(&reply.text).0, "Hello world");
    assert_eq!(a.asked.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_keeps_losing_its_worker_ends_with_an_error_at_the_limit() {
    let (a, a_addr) = fake(|_| vec![started(), chunk("x", &[10])]).await;
    let (b, b_addr) = fake(|_| vec![started(), chunk("y", &[11])]).await;
    let (state, app, _) = gateway(
        &test_dir("migrate-limit"),
        &yaml(
            &[&a_addr, &b_addr],
            "migration: {max_per_request: 2, wait_ms: 2000}\n",
        ),
    );
    state.router.probe_all().await;
    // Each broken worker is ejected and its probe (every 100 ms) brings it back for the next migration.
    let reply = post_chat(&app, None, STREAM).await;
    let events = events(&reply.text);
    let error = events
        .iter()
        .find(|e| e.get("error").is_some())
        .expect("an error event");
    assert_eq!(error["error"]["code"], "worker_failed");
    let asked = a.asked.lock().unwrap().len() + b.asked.lock().unwrap().len();
    assert_eq!(asked, 3, "the first call and two migrations");
    assert!(reply.text.trim_end().ends_with("data: [DONE]"));
}

/// A worker that fails the generation itself (`INTERNAL`) is still up and ready: the continuation goes to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_a_worker_failed_continues_on_another_worker() {
    let script = |r: &v1::GenerateRequest| {
        if r.continuation.is_some() {
            return continues(r);
        }
        vec![started(), chunk("Hel", &[10]), model_error()]
    };
    let (a, a_addr) = fake(script).await;
    let (b, b_addr) = fake(script).await;
    let (state, app, _) = gateway(&test_dir("migrate-error"), &yaml(&[&a_addr, &b_addr], ""));
    state.router.probe_all().await;
    let reply = post_chat(&app, None, STREAM).await;
    assert_eq!(streamed(&reply.text).0, "Hello world");
    let (a, b) = (a.asked.lock().unwrap().clone(), b.asked.lock().unwrap().clone());
    assert_eq!(
        (a.len(), b.len()),
        (1, 1),
        "one call each: the failing worker is not asked again"
    );
    assert_ne!(a[0].continuation.is_some(), b[0].continuation.is_some());
    assert!(state.metrics.encode().contains("cause=\"worker_error\""));
}
