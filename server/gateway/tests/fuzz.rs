//! Thousands of random and malformed requests (mutated bodies, wrong types, deep nesting, bad UTF-8, garbage
//! headers and keys, odd methods and paths) against a gateway with keys and moderation: every answer is a 2xx or
//! a 4xx with OpenAI's error shape, nothing panics, and the gateway is healthy afterwards. Seeded, so a failure
//! reproduces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Body;
use axum::http::{HeaderValue, Request};
use common::{gateway, sha, test_dir};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tower::ServiceExt;

const CASES: usize = 10_000;

fn seeds() -> Vec<Value> {
    vec![
        json!({"model": "smol", "messages": [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "temperature": 0.7, "top_p": 0.9,
            "max_tokens": 16, "stop": ["\n"], "stream": true, "stream_options": {"include_usage": true}, "seed": 1}),
        json!({"model": "smol", "prompt": "once upon", "max_tokens": 8, "logprobs": null, "echo": false}),
        json!({"input": ["fine", {"type": "text", "text": "kill"}], "model": "default"}),
    ]
}

fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!([-1e308, 1e308, -0.0, 0.5, 2.0, -1.0, 4294967296.0][rng.random_range(0..7)]),
        4 => Value::String(random_text(rng, 40)),
        5 => Value::String(
            ["user", "assistant", "system", "tool", "", "text", "image_url"][rng.random_range(0..7)].into(),
        ),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| (random_text(rng, 8), random_value(rng, depth + 1)))
                .collect(),
        ),
    }
}

fn random_text(rng: &mut StdRng, max: usize) -> String {
    let alphabet = [
        'a', 'Z', ' ', '\n', '"', '\\', '{', '}', 'é', '😀', '\u{0}', '\u{200B}', 'k', 'i', 'l',
    ];
    (0..rng.random_range(0..max))
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

/// Replaces a random value somewhere inside `v`.
fn mutate_value(rng: &mut StdRng, v: &mut Value) {
    match v {
        Value::Object(map) if !map.is_empty() && rng.random_bool(0.8) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            if rng.random_bool(0.15) {
                map.remove(key);
            } else {
                mutate_value(rng, map.get_mut(key).unwrap());
            }
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.8) => {
            let i = rng.random_range(0..items.len());
            mutate_value(rng, &mut items[i]);
        }
        _ => *v = random_value(rng, 0),
    }
}

fn random_body(rng: &mut StdRng, seeds: &[Value]) -> Vec<u8> {
    let mut v = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(0..4) {
        mutate_value(rng, &mut v);
    }
    let mut bytes = serde_json::to_vec(&v).unwrap();
    match rng.random_range(0..10) {
        0 if !bytes.is_empty() => bytes.truncate(rng.random_range(0..bytes.len())),
        1 if !bytes.is_empty() => {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        2 => bytes = b"[".repeat(rng.random_range(1..5000)),
        3 => bytes = (0..rng.random_range(0..200)).map(|_| rng.random()).collect(),
        4 => bytes.extend_from_slice(b" trailing"),
        5 if rng.random_bool(0.2) => bytes.resize(70_000, b' '),
        _ => {}
    }
    bytes
}

fn random_header(rng: &mut StdRng) -> HeaderValue {
    let candidates: [&[u8]; 8] = [
        b"Bearer sk-fuzz",
        b"Bearer sk-wrong",
        b"bearer",
        b"Basic dXNlcjpwYXNz",
        b"Bearer \xff\xfe\xfd",
        b"",
        b"Bearer sk-fuzz sk-fuzz",
        b"Token sk-fuzz",
    ];
    let mut bytes = candidates[rng.random_range(0..candidates.len())].to_vec();
    if rng.random_bool(0.1) {
        bytes.extend(std::iter::repeat_n(b'A', rng.random_range(0..10_000)));
    }
    HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static("x"))
}

#[tokio::test]
async fn random_and_malformed_requests_get_only_4xx_in_openais_shape() {
    let dir = test_dir("fuzz");
    let yaml = format!(
        r#"
limits: {{max_body_bytes: 65536}}
moderation:
  providers:
    rules: {{type: rules, categories: {{violence: [kill, "re:k[i1]+l+"]}}}}
  profiles:
    default: {{input: [rules], output: [rules]}}
  default_profile: default
keys:
  - {{name: fuzz, sha256: {}, requests_per_minute: 100000}}
"#,
        sha("sk-fuzz")
    );
    let (_, app, _) = gateway(&dir, &yaml);
    let seeds = seeds();
    let mut rng = StdRng::seed_from_u64(0x0ca3_e11d);
    let routes = [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/moderations"),
        ("GET", "/v1/models"),
    ];
    let odd = [
        ("PUT", "/v1/chat/completions"),
        ("POST", "/v1/nope"),
        ("DELETE", "/"),
        ("GET", "/v1/moderations"),
    ];
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..CASES {
        let (method, path) = if rng.random_bool(0.9) {
            routes[rng.random_range(0..routes.len())]
        } else {
            odd[rng.random_range(0..odd.len())]
        };
        let mut request = Request::builder().method(method).uri(path);
        if rng.random_bool(0.7) {
            request = request.header("authorization", "Bearer sk-fuzz");
        } else if rng.random_bool(0.9) {
            request = request.header("authorization", random_header(&mut rng));
        }
        if rng.random_bool(0.7) {
            let ct = [
                "application/json",
                "text/plain",
                "application/json; charset=latin1",
                "multipart/form-data; boundary=x",
            ];
            request = request.header("content-type", ct[rng.random_range(0..ct.len())].as_bytes());
        }
        let body = random_body(&mut rng, &seeds);
        let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            (200..300).contains(&status) || (400..500).contains(&status),
            "case {case}: {method} {path} {shown:?} → {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if status >= 400 {
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("case {case}: {status} body is not JSON ({e}): {bytes:?}"));
            let e = &v["error"];
            assert!(
                e["message"].is_string() && e["type"].is_string() && e.get("code").is_some(),
                "case {case}: not OpenAI's error shape: {v}"
            );
        }
    }
    eprintln!("statuses over {CASES} cases: {statuses:?}");
    assert!(
        statuses.keys().any(|s| *s == 401) && statuses.keys().any(|s| *s == 400),
        "{statuses:?}"
    );
    let ok = |path: &'static str, body: &'static str| {
        let app = app.clone();
        async move {
            let request = Request::builder()
                .method(if body.is_empty() { "GET" } else { "POST" })
                .uri(path)
                .header("authorization", "Bearer sk-fuzz")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            app.oneshot(request).await.unwrap().status().as_u16()
        }
    };
    assert_eq!(ok("/healthz", "").await, 200);
    assert_eq!(ok("/v1/moderations", r#"{"input": "still here"}"#).await, 200);
}
