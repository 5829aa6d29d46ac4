//! The gateway's HTTP side under attack: slow clients (headers or a body dribbled) and too many connections on
//! real loopback sockets, the admin endpoints kept off the API, token limits a client cannot talk down (against a
//! fake worker that reports what it used), namespaced ChatModel names, `/v1/models` filtered by key, the hold
//! queue shared per key, and browsers used as weapons (CSRF, DNS rebinding).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use camelid_gateway::discovery::ModelRule;
use camelid_proto::v1::{self, generate_response};
use common::{EventStream, call, gateway, post_chat, sha, test_dir};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEAD: &str = "127.0.0.1:1";

/// Sends `request` on a fresh connection and returns the status line's code (0 when none came).
async fn raw(port: u16, request: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return 0;
    };
    if s.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// Opens a connection, writes `start`, then one more `drip` every 50 ms until the server closes it. Returns how
/// long the connection lived and what the server sent.
async fn dribble(port: u16, start: String, drip: &'static [u8]) -> (Duration, String) {
    let began = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(start.as_bytes()).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            n = s.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                if s.write_all(drip).await.is_err() {
                    break;
                }
            }
        }
        assert!(began.elapsed() < Duration::from_secs(20), "never closed");
    }
    (began.elapsed(), String::from_utf8_lossy(&got).into_owned())
}

async fn serve(yaml: &str, name: &str) -> (u16, camelid_gateway::AppState) {
    let dir = test_dir(name);
    let (state, _, _) = gateway(&dir, yaml);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(camelid_gateway::serve(
        state.clone(),
        listener,
        std::future::pending(),
    ));
    (port, state)
}

/// The bounded load test: 200 connections dribbling headers and 50 dribbling a body, while normal requests keep
/// being answered; the server closes every slow one within its timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_while_others_are_served() {
    let yaml = format!(
        "models: {{smol: [\"{DEAD}\"]}}\nserver: {{header_timeout_ms: 700}}\nlimits: {{body_timeout_ms: 700}}\n"
    );
    let (port, _) = serve(&yaml, "slowloris").await;
    let mut slow = Vec::new();
    for i in 0..200 {
        let start = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow-{i}: ");
        slow.push(tokio::spawn(dribble(port, start, b"a")));
    }
    for _ in 0..50 {
        let start =
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                     Content-Length: 100000\r\n\r\n{\"model\": \""
                .to_string();
        slow.push(tokio::spawn(dribble(port, start, b"x")));
    }
    // Meanwhile: normal requests are answered, promptly.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let began = Instant::now();
        assert_eq!(raw(port, HEALTHZ).await, 200);
        assert!(began.elapsed() < Duration::from_secs(1), "{:?}", began.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut bodies_cut = 0;
    for (i, task) in slow.into_iter().enumerate() {
        let (lived, got) = task.await.unwrap();
        assert!(
            lived < Duration::from_millis(3000),
            "slow connection {i} lived {lived:?}"
        );
        if i >= 200 {
            assert!(got.starts_with("HTTP/1.1 408"), "body dribbler {i}: {got}");
            assert!(got.contains("request_timeout"), "{got}");
            bodies_cut += 1;
        }
    }
    assert_eq!(bodies_cut, 50);
    assert_eq!(raw(port, HEALTHZ).await, 200);
}

/// Connections over `max_connections` are answered 503 at once instead of waiting in the backlog; once the idle
/// ones are cut, new ones are served again.
#[tokio::test]
async fn connections_over_the_limit_are_refused_at_once() {
    let yaml =
        format!("models: {{smol: [\"{DEAD}\"]}}\nserver: {{header_timeout_ms: 600, max_connections: 20}}\n");
    let (port, _) = serve(&yaml, "max-connections").await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let began = Instant::now();
    assert_eq!(raw(port, HEALTHZ).await, 503);
    assert!(began.elapsed() < Duration::from_millis(500));
    // The idle connections are closed by the header timeout (which is also the keep-alive idle timeout).
    for mut s in idle {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("an idle connection was not closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(raw(port, HEALTHZ).await, 200);
}

#[tokio::test]
async fn metrics_and_load_are_only_on_the_admin_port() {
    let dir = test_dir("admin-port");
    let (state, app, config) = gateway(&dir, &format!("models: {{smol: [\"{DEAD}\"]}}\n"));
    assert_eq!(
        config.admin_listen.port(),
        camelid_contracts::names::GATEWAY_ADMIN_PORT
    );
    assert!(config.admin_listen.ip().is_loopback(), "loopback unless told");
    for path in ["/metrics", camelid_contracts::load::PATH] {
        let r = call(&app, "GET", path, None, "").await;
        assert_eq!(r.status, 404, "{path} on the API port: {}", r.text);
        assert!(!r.text.contains("smol") && !r.text.contains(DEAD), "{}", r.text);
    }
    let r = post_chat(&app, None, &common::chat("smol", "hi", 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let admin = camelid_gateway::handlers::admin_app(state);
    let r = call(&admin, "GET", "/metrics", None, "").await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("camelid_gateway_requests"), "{}", r.text);
    let r = call(&admin, "GET", camelid_contracts::load::PATH, None, "").await;
    assert_eq!(r.status, 200);
    assert!(r.json()["models"]["smol"].is_object(), "{}", r.text);
    assert_eq!(
        call(&admin, "POST", "/v1/chat/completions", None, "{}")
            .await
            .status,
        404
    );
}

/// A fake worker: records each request, answers `Started` with what a byte-level tokenizer would count for the
/// prompt under ChatML (each byte a token, 5 per message, 25 for the default system prompt: the worst case of
/// SmolLM2's real counts), waits for the test's go, then generates exactly `max_tokens` tokens (or to the end of
/// an 8,192-token context when asked for no limit, as the worker does).
#[derive(Clone)]
struct FakeWorker {
    asked: Arc<Mutex<Vec<v1::GenerateRequest>>>,
    go: Arc<tokio::sync::Semaphore>,
}

fn prompt_tokens(request: &v1::GenerateRequest) -> u32 {
    match &request.input {
        Some(v1::generate_request::Input::Chat(c)) => {
            25 + c.messages.iter().map(|m| 5 + m.content.len() as u32).sum::<u32>()
        }
        Some(v1::generate_request::Input::Prompt(p)) => p.len() as u32,
        None => 0,
    }
}

#[tonic::async_trait]
impl v1::worker_server::Worker for FakeWorker {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        let request = request.into_inner();
        let prompt = prompt_tokens(&request);
        let completion = match request.max_tokens {
            0 => 8192 - prompt,
            n => n,
        };
        self.asked.lock().unwrap().push(request);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let go = self.go.clone();
        tokio::spawn(async move {
            let event = |e| Ok(v1::GenerateResponse { event: Some(e) });
            let _ = tx
                .send(event(generate_response::Event::Started(v1::Started {
                    prompt_tokens: prompt,
                    prompt_token_ids: vec![1; prompt as usize],
                })))
                .await;
            go.acquire().await.unwrap().forget();
            let _ = tx
                .send(event(generate_response::Event::Chunk(v1::Chunk {
                    text: "ok".into(),
                    tokens: completion,
                    token_ids: vec![2; completion as usize],
                })))
                .await;
            let _ = tx
                .send(event(generate_response::Event::Finished(v1::Finished {
                    reason: v1::FinishReason::Length as i32,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                })))
                .await;
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
            ready: true,
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

async fn start_fake_worker() -> (FakeWorker, String) {
    let worker = FakeWorker {
        asked: Arc::default(),
        go: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let addr = common::serve_fake_worker(worker.clone()).await;
    (worker, addr)
}

/// The attacks of the issue: 500 empty messages (charged 1 token, used 2,525), 400 emoji (charged 101, used
/// 1,230), and a request without `max_tokens` (charged 264 while the worker generated to the end of the
/// context). Each is now reserved at least what the worker reports it used, settled at exactly that, and the
/// worker is never asked for more than the key's default cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_reserve_a_true_bound_and_settle_with_the_workers_count() {
    let (worker, addr) = start_fake_worker().await;
    let yaml = format!(
        "models: {{smol: [\"{addr}\"]}}\nprobe_interval_ms: 100\nkeys:\n  - {{name: t, sha256: {}, \
         tokens_per_minute: 20000, default_max_tokens: 64}}\n",
        sha("sk-t")
    );
    let dir = test_dir("token-accounting");
    let (state, app, _) = gateway(&dir, &yaml);
    let key = state
        .policy
        .current()
        .keys
        .authenticate(Some(b"Bearer sk-t"))
        .unwrap();
    let bucket = key.token_bucket().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.router.has_ready("smol") {
        assert!(Instant::now() < deadline, "the fake worker never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = 20000.0 / 60.0;
    let empty: Vec<_> = (0..500).map(|_| json!({"role": "user", "content": ""})).collect();
    let emoji = vec![json!({"role": "user", "content": "😀".repeat(400)})];
    let hi = vec![json!({"role": "user", "content": "hi"})];
    let cases = [
        (
            "500 empty messages",
            json!({"model": "smol", "messages": empty, "max_tokens": 16}),
            16,
        ),
        (
            "400 emoji",
            json!({"model": "smol", "messages": emoji, "max_tokens": 16}),
            16,
        ),
        ("no max_tokens", json!({"model": "smol", "messages": hi}), 64),
        (
            "no max_tokens, streamed",
            json!({"model": "smol", "messages": hi, "stream": true}),
            64,
        ),
    ];
    for (i, (name, body, cap)) in cases.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = bucket.available();
        let began = Instant::now();
        let app2 = app.clone();
        let body = body.to_string();
        let reply = tokio::spawn(async move { post_chat(&app2, Some("sk-t"), &body).await });
        while worker.asked.lock().unwrap().len() <= i {
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "{name}: never reached the worker"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let asked = worker.asked.lock().unwrap()[i].clone();
        let used = f64::from(prompt_tokens(&asked) + asked.max_tokens);
        let reserved = before - bucket.available() + rate * began.elapsed().as_secs_f64();
        assert!(reserved >= used, "{name}: reserved {reserved}, used {used}");
        assert_eq!(asked.max_tokens, cap, "{name}: the worker is asked for the cap");
        if i == 0 {
            // While 500 empty messages hold their reservation, a request that would not fit waits its turn.
            let big =
                json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
            let r = post_chat(&app, Some("sk-t"), &big.to_string()).await;
            assert_eq!(r.outcome(), (429, "rate_limit_exceeded".into()), "{}", r.text);
            assert!(r.headers.contains_key("retry-after"));
        }
        worker.go.add_permits(1);
        let r = reply.await.unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text);
        let charged = before - bucket.available();
        let slack = rate * began.elapsed().as_secs_f64() + 1.0;
        assert!(
            (charged - used).abs() <= slack,
            "{name}: charged {charged}, used {used} (slack {slack})"
        );
    }
}

#[tokio::test]
async fn chatmodels_are_namespaced_listed_by_key_and_share_the_hold_queue() {
    let dir = test_dir("namespaced");
    let yaml = format!(
        "models:\n  a/smol: [\"{DEAD}\"]\n  b/smol: [\"{DEAD}\"]\n  c/cold: [\"{DEAD}\"]\n\
         hold: {{timeout_ms: 3000, max_requests: 10, max_requests_per_key: 2}}\n\
         keys:\n  - {{name: alice, sha256: {}}}\n  - {{name: mallory, sha256: {}}}\n",
        sha("sk-alice"),
        sha("sk-mallory")
    );
    let (state, app, _) = gateway(&dir, &yaml);
    {
        // What discovery would write for three ChatModels: a's allows only alice.
        let mut rules = state.rules.write().unwrap();
        let only_alice = ModelRule {
            allowed_keys: vec!["alice".into()],
            ..ModelRule::default()
        };
        rules.insert("a/smol".into(), only_alice);
        rules.insert("b/smol".into(), ModelRule::default());
        rules.insert("c/cold".into(), ModelRule::default());
    }
    // The attack: b's tenant named its model like a's. The bare name is refused, never routed to either.
    let r = post_chat(&app, Some("sk-alice"), &common::chat("smol", "hi", 5)).await;
    assert_eq!(r.outcome(), (400, "model_ambiguous".into()), "{}", r.text);
    let r = post_chat(&app, Some("sk-mallory"), &common::chat("a/smol", "hi", 5)).await;
    assert_eq!(r.outcome(), (403, "model_not_allowed".into()), "{}", r.text);
    // /v1/models lists only what the key may use, by the id that resolves to it.
    let ids = |key| {
        let app = app.clone();
        async move {
            let r = call(&app, "GET", "/v1/models", Some(key), "").await;
            let mut ids: Vec<String> = r.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(ids("sk-mallory").await, ["b/smol", "cold"]);
    assert_eq!(ids("sk-alice").await, ["a/smol", "b/smol", "cold"]);
    // The hold queue: mallory may hold 2 requests for a cold model; the third is refused at once, and alice's
    // request still waits its turn.
    let hold = |key: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { post_chat(&app, Some(key), &common::chat("cold", "hi", 5)).await })
    };
    let held = [hold("sk-mallory"), hold("sk-mallory")];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post_chat(&app, Some("sk-mallory"), &common::chat("cold", "hi", 5)).await;
    assert_eq!(r.outcome(), (503, "too_many_waiting".into()), "{}", r.text);
    assert!(r.text.contains("this API key"), "{}", r.text);
    let alice = hold("sk-alice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!alice.is_finished(), "alice's request is held, not refused");
    for h in held {
        assert_eq!(h.await.unwrap().outcome(), (503, "model_starting".into()));
    }
    assert_eq!(alice.await.unwrap().outcome(), (503, "model_starting".into()));
}

/// CSRF and DNS rebinding against an anonymous loopback gateway, end to end through the router.
#[tokio::test]
async fn cross_site_requests_are_refused_without_keys_on_loopback() {
    let dir = test_dir("csrf");
    let (_, app, _) = gateway(&dir, &format!("models: {{smol: [\"{DEAD}\"]}}\n"));
    let send = |content_type: &'static str, host: &'static str| {
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            let request = axum::http::Request::post("/v1/chat/completions")
                .header("content-type", content_type)
                .header("host", host)
                .body(axum::body::Body::from(common::chat("smol", "hi", 5)))
                .unwrap();
            app.oneshot(request).await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send("text/plain", "localhost:8000").await, 415);
    assert_eq!(send("application/json", "evil.example").await, 403);
    assert_eq!(
        send("application/json", "localhost:8000").await,
        503,
        "let through to routing"
    );
}
