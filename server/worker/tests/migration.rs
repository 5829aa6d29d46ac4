//! Two real `camelid-worker` processes behind the gateway, the official `openai` client streaming
//! (`tests/python/openai_stream.py`): the worker serving the stream is killed (SIGKILL) or terminated (SIGTERM, it
//! drains) mid-answer, and the client's stream completes with exactly the text and usage of an uninterrupted run,
//! greedy and seeded-sampled alike. Then the drill: many concurrent streams while workers are killed and
//! restarted over and over, with no failed request and every answer equal to its solo answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Worker, body_json, fetch, free_port};
use serde_json::{Value, json};

mod common;

const PROMPT: &str = "Tell me a long story about a llama who learns to fly.";

/// Each test runs two workers; run together, four would share two cores and time out.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The whole answer (text, finish reason, completion tokens) of one uninterrupted request.
fn solo(api: u16, prompt: &str, max_tokens: u32, sampling: &Value) -> (String, String, u64) {
    let mut body = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "ignore_eos": true});
    for (k, v) in sampling.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, raw) = fetch(api, "POST", "/v1/chat/completions", &body.to_string()).expect("an answer");
    assert_eq!(status, 200, "{raw}");
    let v = body_json(&raw);
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// Streams through the openai client and calls `mid` once the first piece of text has arrived (output moderation
/// releases text a window at a time, so that is a third of the way in); the whole answer.
fn stream_with(api: u16, sampling: &[&str], mid: impl FnOnce()) -> (String, String, u64) {
    let mut child = Command::new(camelid_test_support::python())
        .arg(camelid_test_support::workspace().join("tests/python/openai_stream.py"))
        .args(["--base-url", &format!("http://127.0.0.1:{api}/v1")])
        .args(["--prompt", PROMPT, "--max-tokens", "64"])
        .args(sampling)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tests/python/openai_stream.py");
    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut mid = Some(mid);
    let mut done = None;
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        seen.push(line.clone());
        if line == "chunk 1"
            && let Some(mid) = mid.take()
        {
            mid();
        }
        if let Some(json) = line.strip_prefix("done ") {
            done = Some(serde_json::from_str::<Value>(json).unwrap());
        }
    }
    assert!(child.wait().unwrap().success(), "the openai client raised");
    assert!(mid.is_none(), "the stream ended before any text: {seen:?}");
    let done = done.expect("the script's result");
    (
        done["text"].as_str().unwrap().to_string(),
        done["finish"].as_str().unwrap().to_string(),
        done["usage"]["completion"].as_u64().unwrap(),
    )
}

fn migrations(admin: u16, cause: &str) -> f64 {
    let (_, body) = fetch(admin, "GET", "/metrics", "").unwrap();
    body.lines()
        .filter(|l| {
            l.starts_with("camelid_gateway_migrations_total") && l.contains(&format!("cause=\"{cause}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// The index of the worker running a stream now.
fn serving(workers: &[Worker]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(i) = workers.iter().position(|w| w.running() == 1) {
            return i;
        }
        assert!(Instant::now() < deadline, "no worker runs the stream");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_stream_survives_its_worker_killed_or_drained_mid_answer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let drain_now = ["--drain-seconds", "0"];
    let mut workers = vec![
        Worker::start_with(free_port(), free_port(), None, &drain_now),
        Worker::start_with(free_port(), free_port(), None, &drain_now),
    ];
    let (_runtime, gw) = common::Gateway::over(&workers.iter().collect::<Vec<_>>());
    let greedy = json!({"temperature": 0});
    let expected = solo(gw.api, PROMPT, 64, &greedy);

    // SIGKILL: the stream breaks; the gateway continues it on the other worker.
    let victim = Mutex::new(None);
    let got = stream_with(gw.api, &["--ignore-eos"], || {
        let i = serving(&workers);
        *victim.lock().unwrap() = Some(i);
        workers[i].kill();
    });
    assert_eq!(
        got, expected,
        "killed mid-stream: the same text, finish and usage"
    );
    assert_eq!(migrations(gw.admin, "worker_lost"), 1.0);
    let i = victim.into_inner().unwrap().unwrap();
    let (grpc, http) = (workers[i].grpc, workers[i].http);
    workers[i] = Worker::start_with(grpc, http, None, &drain_now);

    // SIGTERM with no grace left: the worker interrupts the stream and exits; it continues elsewhere. Sampled
    // with a seed, so the continuation must draw exactly what the first worker would have.
    let sampled = json!({"temperature": 0.9, "top_p": 0.95, "seed": 7});
    let expected = solo(gw.api, PROMPT, 64, &sampled);
    let term = Mutex::new(None);
    let got = stream_with(
        gw.api,
        &[
            "--ignore-eos",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            "7",
        ],
        || {
            let i = serving(&workers);
            workers[i].terminate();
            *term.lock().unwrap() = Some(i);
        },
    );
    assert_eq!(got, expected, "drained mid-stream, sampled: the same text");
    assert_eq!(migrations(gw.admin, "draining"), 1.0);
    let i = term.into_inner().unwrap().unwrap();
    let exit = workers[i].wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "a drained worker exits cleanly: {exit:?}"
    );
}

/// Many concurrent streams while a script kills or terminates a worker and restarts it, again and again:
/// `CAMELID_DRILL=STREAMSxKILLS` (default 12x4 in `make test`; the drill is 64x20).
#[test]
fn drill_streams_survive_workers_killed_and_restarted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (streams, kills) = std::env::var("CAMELID_DRILL")
        .ok()
        .and_then(|v| {
            let (s, k) = v.split_once('x')?;
            Some((s.parse().ok()?, k.parse().ok()?))
        })
        .unwrap_or((12usize, 4usize));
    let drain_now = ["--drain-seconds", "0"];
    let workers: Vec<Worker> = (0..2)
        .map(|_| Worker::start_with(free_port(), free_port(), None, &drain_now))
        .collect();
    // A kill every few seconds, far more often than any cluster loses workers, while an answer takes tens of
    // seconds on two shared cores: one stream may lose its worker at every kill, so the limit is the kills.
    let limits = camelid_gateway::routing::MigrationLimits {
        max_per_request: kills as u32 + 1,
        ..Default::default()
    };
    let (_runtime, gw) = common::Gateway::over_with(&workers.iter().collect::<Vec<_>>(), limits);
    let prompts = [
        "Name three colors.",
        "Write two sentences about llamas.",
        "What do bees make, and how?",
        "Describe the sea in a few words.",
    ];
    let greedy = json!({"temperature": 0});
    let expected: Vec<String> = prompts.iter().map(|p| solo(gw.api, p, 24, &greedy).0).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..streams)
        .map(|c| {
            let (stop, done, failed, latencies) =
                (stop.clone(), done.clone(), failed.clone(), latencies.clone());
            let (prompt, want) = (prompts[c % prompts.len()], expected[c % prompts.len()].clone());
            let api = gw.api;
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    match streamed_text(api, prompt) {
                        Ok(text) if text == want => {
                            done.fetch_add(1, Ordering::Relaxed);
                            latencies.lock().unwrap().push(began.elapsed());
                        }
                        Ok(text) => failed
                            .lock()
                            .unwrap()
                            .push(format!("{prompt}: got {text:?}, want {want:?}")),
                        Err(e) => failed.lock().unwrap().push(format!("{prompt}: {e}")),
                    }
                }
            })
        })
        .collect();

    let mut workers = workers;
    let began = Instant::now();
    if kills == 0 {
        // The baseline: the same load for a minute with no worker lost.
        std::thread::sleep(Duration::from_secs(60));
    }
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(1500));
        let i = k % 2;
        let (grpc, http) = (workers[i].grpc, workers[i].http);
        if k % 3 == 2 {
            workers[i].terminate();
            let _ = workers[i].wait_exit(Duration::from_secs(10));
        }
        workers[i].kill();
        workers[i] = Worker::start_with(grpc, http, None, &drain_now);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
    };
    eprintln!(
        "drill: {streams} streams, {kills} kills in {:.0} s: {} answers, {} failed; migrations: {} lost, {} \
         drained; latency p50 {:?}, p99 {:?}, max {:?}",
        began.elapsed().as_secs_f64(),
        done.load(Ordering::Relaxed),
        failed.len(),
        migrations(gw.admin, "worker_lost"),
        migrations(gw.admin, "draining"),
        pct(0.5),
        pct(0.99),
        latencies.last()
    );
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    assert!(
        done.load(Ordering::Relaxed) >= streams,
        "every client finished answers"
    );
    assert!(kills == 0 || migrations(gw.admin, "worker_lost") + migrations(gw.admin, "draining") >= 1.0);
}

/// The text of one streamed greedy answer, or why it failed (an HTTP error, an error event, no `[DONE]`).
fn streamed_text(api: u16, prompt: &str) -> Result<String, String> {
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
        "ignore_eos": true, "temperature": 0, "stream": true});
    let stream =
        common::request(api, "POST", "/v1/chat/completions", &body.to_string()).ok_or("could not connect")?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut ended = false;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.starts_with("HTTP/1.1 ") && !line.contains(" 200 ") {
            return Err(line);
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            ended = true;
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v.get("error").is_some() {
            return Err(data.to_string());
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    if ended {
        Ok(text)
    } else {
        Err("the stream ended without [DONE]".into())
    }
}
