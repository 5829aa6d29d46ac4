//! Two real `camelid-worker` processes behind the gateway: a worker killed mid-stream is ejected while its stream
//! goes on on the other worker, requests go to the other worker, and it is re-admitted once it is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{Worker, fetch, free_port, request};

mod common;

fn backend_healthy(admin: u16, grpc: u16) -> Option<bool> {
    let (_, body) = fetch(admin, "GET", "/metrics", "")?;
    let needle = format!("endpoint=\"127.0.0.1:{grpc}\"");
    let line = body
        .lines()
        .find(|l| l.starts_with("camelid_gateway_backend_healthy") && l.contains(&needle))?;
    Some(line.trim().ends_with(" 1"))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const CHAT: &str = r#"{"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}],
    "temperature": 0, "max_tokens": 12}"#;

#[test]
fn a_worker_killed_mid_stream_fails_cleanly_and_traffic_moves_to_the_other() {
    let mut workers = [
        Worker::start(free_port(), free_port()),
        Worker::start(free_port(), free_port()),
    ];
    let (runtime, gateway) = common::Gateway::over(&workers.iter().collect::<Vec<_>>());

    // A long stream; find the worker running it once tokens flow, and kill it.
    let body = r#"{"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 4000, "ignore_eos": true, "stream": true}"#;
    let stream = request(gateway.api, "POST", "/v1/chat/completions", body).unwrap();
    let mut lines = BufReader::new(stream)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data: "));
    for _ in 0..4 {
        let line = lines.next().expect("stream data");
        assert!(line.contains("chat.completion.chunk"), "{line}");
    }
    let victim = workers
        .iter()
        .position(|w| w.running() == 1)
        .expect("one worker runs the stream");
    workers[victim].kill();
    // The stream goes on: the gateway continues it on the other worker (`migration.rs` checks the text).
    for _ in 0..4 {
        let line = lines.next().expect("the stream goes on after its worker died");
        assert!(line.contains("chat.completion.chunk"), "{line}");
    }
    assert_eq!(workers[1 - victim].running(), 1, "the other worker runs it now");
    drop(lines);

    // The dead worker is ejected and every new request is served by the other one.
    assert_eq!(backend_healthy(gateway.admin, workers[victim].grpc), Some(false));
    for _ in 0..4 {
        let (status, body) = fetch(gateway.api, "POST", "/v1/chat/completions", CHAT).unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // Back on the same address, it is probed and re-admitted.
    let (grpc, http) = (workers[victim].grpc, workers[victim].http);
    workers[victim] = Worker::start(grpc, http);
    wait_for("the restarted worker is re-admitted", || {
        backend_healthy(gateway.admin, grpc) == Some(true)
    });

    // A worker that dies before the gateway notices: requests that have not started go to the other one.
    let other = 1 - victim;
    workers[other].kill();
    for _ in 0..4 {
        let (status, body) = fetch(gateway.api, "POST", "/v1/chat/completions", CHAT).unwrap();
        assert_eq!(status, 200, "{body}");
    }
    wait_for("the dead worker is ejected", || {
        backend_healthy(gateway.admin, workers[other].grpc) == Some(false)
    });

    // With none left: 503 in OpenAI's shape, with Retry-After.
    workers[victim].kill();
    wait_for("both ejected", || {
        backend_healthy(gateway.admin, grpc) == Some(false)
    });
    let (status, body) = fetch(gateway.api, "POST", "/v1/chat/completions", CHAT).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("retry-after") && body.contains(r#""code":"no_ready_worker""#),
        "{body}"
    );
    drop(runtime);
}
