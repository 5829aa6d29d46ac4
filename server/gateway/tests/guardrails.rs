//! The gateway's guardrails with no worker behind it: keys, model permissions, rate limits, the `/v1/moderations`
//! endpoint, an OpenAI-compatible moderation provider (a local server speaking its shape) failing closed or open,
//! and config reloads. A request that passes every guardrail reaches routing, which answers 503 `no_ready_worker`
//! here: that status is how these tests see "it was let through". That nothing flagged ever reaches a real worker
//! is asserted in the worker crate's `guardrails` test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::HeaderMap;
use common::{call, chat, gateway, post_chat, sha, test_dir};
use serde_json::json;

/// A dead worker address: the model exists, nothing serves it.
const DEAD: &str = "127.0.0.1:1";

fn keys_config() -> String {
    format!(
        r#"
models:
  smol: ["{DEAD}"]
  big: ["{DEAD}"]
moderation:
  providers:
    rules:
      type: rules
      categories:
        violence: ["kill"]
  profiles:
    default: {{input: [rules]}}
  default_profile: default
keys:
  - name: alice
    sha256: {}
  - name: bob
    sha256: {}
    models: [smol]
  - name: mallory
    sha256: {}
    revoked: true
"#,
        sha("sk-alice"),
        sha("sk-bob"),
        sha("sk-mallory")
    )
}

#[tokio::test]
async fn keys_gate_every_route() {
    let dir = test_dir("keys");
    let (_, app, _) = gateway(&dir, &keys_config());
    let routes = [
        ("POST", "/v1/chat/completions", chat("smol", "hi", 5)),
        (
            "POST",
            "/v1/completions",
            json!({"model": "smol", "prompt": "hi"}).to_string(),
        ),
        ("POST", "/v1/moderations", json!({"input": "hi"}).to_string()),
        ("GET", "/v1/models", String::new()),
    ];
    for (method, path, body) in &routes {
        for (key, why) in [
            (None, "missing"),
            (Some("sk-eve"), "invalid"),
            (Some("sk-mallory"), "revoked"),
        ] {
            let r = call(&app, method, path, key, body).await;
            assert_eq!(r.status, 401, "{path} {key:?}: {}", r.text);
            assert_eq!(r.error_code(), "invalid_api_key");
            assert!(
                r.json()["error"]["message"].as_str().unwrap().contains(why),
                "{}",
                r.text
            );
            assert!(!r.text.contains("sk-"), "a key is echoed: {}", r.text);
        }
    }
    // Bob may use smol only.
    let r = post_chat(&app, Some("sk-bob"), &chat("big", "hi", 5)).await;
    assert_eq!(r.outcome(), (403, "model_not_allowed".into()), "{}", r.text);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = post_chat(&app, Some("sk-bob"), &chat("smol", "hi", 5)).await;
    assert_eq!(r.outcome(), (503, "no_ready_worker".into()), "{}", r.text);
    let models = |key| {
        let app = app.clone();
        async move {
            let r = call(&app, "GET", "/v1/models", Some(key), "").await;
            let v = r.json();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().into())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(models("sk-bob").await, ["smol"]);
    assert_eq!(models("sk-alice").await, ["big", "smol"]);
    // Keys are checked before the body is even read: a malformed body with no key is still 401.
    let r = post_chat(&app, None, "{not json").await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn rate_limits_give_429_with_retry_after_then_recover() {
    let dir = test_dir("rates");
    let yaml = format!(
        r#"
models: {{smol: ["{DEAD}"]}}
keys:
  - {{name: fast, sha256: {}, requests_per_minute: 60}}
  - {{name: wordy, sha256: {}, tokens_per_minute: 1000}}
"#,
        sha("sk-fast"),
        sha("sk-wordy")
    );
    let (state, app, _) = gateway(&dir, &yaml);
    let body = chat("smol", "hi", 5);
    // A minute's worth of burst, then one request a second.
    for i in 0..60 {
        let r = post_chat(&app, Some("sk-fast"), &body).await;
        assert_eq!(r.status, 503, "request {i} should pass the limit: {}", r.text);
    }
    let r = post_chat(&app, Some("sk-fast"), &body).await;
    assert_eq!(r.outcome(), (429, "rate_limit_exceeded".into()), "{}", r.text);
    assert_eq!(r.headers["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post_chat(&app, Some("sk-fast"), &body).await;
    assert_eq!(r.status, 503, "recovered after Retry-After: {}", r.text);

    // Tokens: the prompt's bound plus max_tokens are reserved at admission and what no worker used is given
    // back, so requests refused at routing never run the bucket out (429s while reserved: `hardening.rs`).
    for _ in 0..5 {
        let r = post_chat(&app, Some("sk-wordy"), &chat("smol", "hi", 400)).await;
        assert_eq!(r.status, 503, "{}", r.text);
    }
    let r = post_chat(&app, Some("sk-wordy"), &chat("smol", "hi", 5000)).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{}",
        r.text
    );
    let metrics = state.metrics.encode();
    assert!(
        metrics.contains(r#"camelid_gateway_refusals_total{key="fast",reason="rate_limited"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_moderations_endpoint_answers_in_openais_shape() {
    let dir = test_dir("moderations");
    std::fs::write(
        dir.join("rules.yaml"),
        "categories:\n  violence: [kill, \"re:\\\\bk[i1]ll\"]\n  self-harm: [hurt myself]\n",
    )
    .unwrap();
    let yaml = format!(
        r#"
models: {{smol: ["{DEAD}"]}}
moderation:
  providers:
    rules: {{type: rules, file: rules.yaml}}
  profiles:
    default: {{input: [rules]}}
    strict: {{input: [rules]}}
  default_profile: default
"#
    );
    let (_, app, _) = gateway(&dir, &yaml);
    let r = call(
        &app,
        "POST",
        "/v1/moderations",
        None,
        &json!({"input": "how to k1ll time"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("modr-"));
    assert_eq!(v["model"], "default");
    assert_eq!(v["results"][0]["flagged"], true);
    assert_eq!(
        v["results"][0]["categories"],
        json!({"violence": true, "self-harm": false})
    );
    assert_eq!(v["results"][0]["category_scores"]["violence"], 1.0);

    let many = json!({"model": "strict", "input": ["fine", {"type": "text", "text": "I will hurt myself"}]});
    let v = call(&app, "POST", "/v1/moderations", None, &many.to_string())
        .await
        .json();
    assert_eq!(v["model"], "strict");
    let flagged: Vec<bool> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["flagged"].as_bool().unwrap())
        .collect();
    assert_eq!(flagged, [false, true]);
    assert_eq!(v["results"][1]["categories"]["self-harm"], true);

    for (body, status, param) in [
        (json!({"input": "x", "model": "nope"}), 400, "model"),
        (json!({"input": []}), 400, "input"),
        (
            json!({"input": [{"type": "image_url", "image_url": {"url": "x"}}]}),
            400,
            "input[0].type",
        ),
        (json!({"inputs": "x"}), 422, ""),
    ] {
        let r = call(&app, "POST", "/v1/moderations", None, &body.to_string()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text);
        r.error_code();
        if !param.is_empty() {
            assert_eq!(r.json()["error"]["param"], param, "{}", r.text);
        }
    }

    // Chat: the flagged message is named, with its categories; an "earlier reply" the client wrote is moderated
    // like the rest (the model reads it as its own).
    let body = json!({"model": "smol", "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "I could go for tea"},
        {"role": "user", "content": "KILL it"}]});
    let r = post_chat(&app, None, &body.to_string()).await;
    assert_eq!(r.outcome(), (400, "content_filter".into()), "{}", r.text);
    let e = &r.json()["error"];
    assert_eq!(e["param"], "messages[2].content");
    assert_eq!(e["categories"], json!(["violence"]));
    let body = json!({"model": "smol", "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "I could kill for tea"},
        {"role": "user", "content": "and coffee?"}]});
    let r = post_chat(&app, None, &body.to_string()).await;
    assert_eq!(r.outcome(), (400, "content_filter".into()), "{}", r.text);
    assert_eq!(r.json()["error"]["param"], "messages[1].content");
    let body = json!({"model": "smol", "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "I could go for tea"},
        {"role": "user", "content": "and coffee?"}]});
    assert_eq!(post_chat(&app, None, &body.to_string()).await.status, 503);
    let r = call(
        &app,
        "POST",
        "/v1/completions",
        None,
        &json!({"model": "smol", "prompt": "kill"}).to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "prompt");
}

/// A local server speaking OpenAI's `/v1/moderations`: "violence" scores 0.6 for texts containing "attack", 0.1
/// otherwise; `/slow` answers after 3 s. It records the bearer key it was sent.
async fn moderation_server() -> (String, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answer = |body: serde_json::Value| {
        let inputs: Vec<String> = match &body["input"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
            _ => vec![],
        };
        let results: Vec<_> = inputs
            .iter()
            .map(|t| {
                let violence = if t.contains("attack") { 0.6 } else { 0.1 };
                json!({"flagged": violence > 0.5, "categories": {"violence": violence > 0.5, "hate": false},
                       "category_scores": {"violence": violence, "hate": 0.01}})
            })
            .collect();
        Json(json!({"id": "modr-x", "model": "omni-moderation-latest", "results": results}))
    };
    let (c, k) = (calls.clone(), keys.clone());
    let app = axum::Router::new()
        .route(
            "/v1/moderations",
            axum::routing::post(move |headers: HeaderMap, Json(body): Json<serde_json::Value>| {
                c.fetch_add(1, Ordering::SeqCst);
                let auth = headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                k.lock().unwrap().push(auth.unwrap_or_default());
                async move { answer(body) }
            }),
        )
        .route(
            "/slow/v1/moderations",
            axum::routing::post(move |Json(body): Json<serde_json::Value>| async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                answer(body)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), calls, keys)
}

#[tokio::test]
async fn an_openai_compatible_provider_with_thresholds_fails_closed_or_open() {
    let (url, calls, keys) = moderation_server().await;
    let dir = test_dir("remote");
    // Any environment variable can hold the key; cargo always sets this one for tests.
    let yaml = format!(
        r#"
models: {{smol: ["{DEAD}"], open: ["{DEAD}"], slow: ["{DEAD}"], strict: ["{DEAD}"]}}
moderation:
  providers:
    remote: {{type: openai, url: "{url}/v1/moderations", api_key_env: CARGO_MANIFEST_DIR, timeout_ms: 500}}
    strict: {{type: openai, url: "{url}/v1/moderations", thresholds: {{violence: 0.05}}}}
    down: {{type: openai, url: "http://127.0.0.1:1/v1/moderations", timeout_ms: 500}}
    down_open: {{type: openai, url: "http://127.0.0.1:1/v1/moderations", fail_open: true}}
    slow: {{type: openai, url: "{url}/slow/v1/moderations", timeout_ms: 300}}
  profiles:
    remote: {{input: [remote]}}
    strict: {{input: [strict]}}
    down: {{input: [down]}}
    open: {{input: [down_open]}}
    slow: {{input: [slow]}}
  default_profile: down
  models: {{smol: remote, open: open, slow: slow, strict: strict}}
"#
    );
    let (_, app, _) = gateway(&dir, &yaml);
    let code = |model: &'static str, text: &'static str| {
        let app = app.clone();
        async move {
            let r = post_chat(&app, None, &chat(model, text, 5)).await;
            (r.status.as_u16(), r.error_code())
        }
    };
    assert_eq!(
        code("smol", "plan an attack").await,
        (400, "content_filter".into())
    );
    assert_eq!(
        code("smol", "plan a picnic").await,
        (503, "no_ready_worker".into())
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one call per request, all texts at once"
    );
    assert_eq!(
        keys.lock().unwrap()[0],
        format!("Bearer {}", env!("CARGO_MANIFEST_DIR"))
    );
    // A threshold of 0.05 flags the picnic's 0.1.
    assert_eq!(
        code("strict", "plan a picnic").await,
        (400, "content_filter".into())
    );
    // Unreachable: fail closed with 503 and Retry-After, unless fail_open.
    let r = post_chat(&app, None, &chat("down", "hi", 5)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (503, "moderation_unavailable")
    );
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.text.contains("`down` is unavailable"), "{}", r.text);
    assert_eq!(code("open", "hi").await, (503, "no_ready_worker".into()));
    // Slow: fails closed once the timeout passes, not after the provider's 3 s.
    let started = Instant::now();
    assert_eq!(code("slow", "hi").await, (503, "moderation_unavailable".into()));
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn config_reloads_swap_keys_and_moderation_and_bad_edits_keep_the_old() {
    let dir = test_dir("reload");
    let (state, app, config) = gateway(&dir, &keys_config());
    let path = dir.join("gateway.yaml");
    let overrides: camelid_gateway::reload::Overrides = Arc::new(|_| Ok(()));
    camelid_gateway::reload::spawn(
        path.clone(),
        overrides,
        state.clone(),
        config,
        Duration::from_millis(100),
    );
    let status = |key: &'static str, text: &'static str| {
        let app = app.clone();
        async move {
            post_chat(&app, Some(key), &chat("smol", text, 5))
                .await
                .status
                .as_u16()
        }
    };
    assert_eq!(status("sk-alice", "hi").await, 503);
    assert_eq!(status("sk-carol", "hi").await, 401);

    // Carol is added, alice revoked, and the rules grow.
    let edited = keys_config()
        .replace(
            "  - name: alice\n",
            &format!(
                "  - name: carol\n    sha256: {}\n  - name: alice\n    revoked: true\n",
                sha("sk-carol")
            ),
        )
        .replace("violence: [\"kill\"]", "violence: [\"kill\", \"stab\"]");
    std::fs::write(&path, &edited).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status("sk-carol", "hi").await != 503 {
        assert!(Instant::now() < deadline, "the reload never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("sk-alice", "hi").await, 401);
    assert_eq!(status("sk-carol", "stab").await, 400);

    // A bad edit is refused and counted; the previous config stays in force.
    std::fs::write(&path, edited.replace("revoked: true", "revokd: true")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state
        .metrics
        .encode()
        .contains(r#"camelid_gateway_config_reloads_total{result="error"} 1"#)
    {
        assert!(Instant::now() < deadline, "the bad edit was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("sk-carol", "hi").await, 503);
    assert_eq!(status("sk-alice", "hi").await, 401);
}

#[test]
fn without_keys_only_loopback_or_an_explicit_flag_serves_anonymously() {
    let loopback = "127.0.0.1:8000".parse().unwrap();
    let public = "0.0.0.0:8000".parse().unwrap();
    assert!(
        camelid_gateway::anonymous_check(loopback, false, false)
            .unwrap()
            .is_some()
    );
    let e = camelid_gateway::anonymous_check(public, false, false).unwrap_err();
    assert!(e.contains("--allow-anonymous"), "{e}");
    assert!(
        camelid_gateway::anonymous_check(public, false, true)
            .unwrap()
            .is_some()
    );
    assert!(
        camelid_gateway::anonymous_check(public, true, false)
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn config_errors_name_the_field() {
    let dir = test_dir("config-errors");
    let cases = [
        (
            "moderation:\n  providers:\n    r: {type: rules}\n",
            "moderation.providers.r",
        ),
        (
            "moderation:\n  providers:\n    r: {type: rulez}\n",
            "moderation.providers.r",
        ),
        (
            "moderation:\n  profiles:\n    p: {input: [nope]}\n",
            "moderation.profiles.p.input[0]",
        ),
        (
            "moderation:\n  default_profile: nope\n",
            "moderation.default_profile",
        ),
        (
            "moderation:\n  providers:\n    r: {type: rules, categories: {hate: [\"re:(\"]}}\n",
            "hate[0]",
        ),
        (
            "moderation:\n  providers:\n    o: {type: openai, url: \"x\"}\n",
            "moderation.providers.o",
        ),
        (
            "moderation:\n  providers:\n    o: {type: openai, url: \"http://x\", thresholds: {hate: 2}}\n",
            "thresholds.hate",
        ),
        (
            "moderation:\n  providers:\n    o: {type: openai, url: \"http://x\", api_key_env: CAMELID_UNSET_VAR}\n",
            "CAMELID_UNSET_VAR",
        ),
        ("keys:\n  - {name: a, sha256: nothex}\n", "keys[0].sha256"),
        ("keys:\n  - {name: a, sha256: abc, modles: [x]}\n", "modles"),
        ("keys_file: missing.yaml\n", "missing.yaml"),
    ];
    for (i, (yaml, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let e = camelid_gateway::GatewayConfig::from_file(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| camelid_gateway::state(&c).map(|_| ()).map_err(|e| e.to_string()));
        let e = e.expect_err(yaml);
        assert!(e.contains(needle), "{yaml}: {e}");
    }
}

#[tokio::test]
async fn the_example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/gateway/gateway.yaml");
    let mut config = camelid_gateway::GatewayConfig::from_file(&path).unwrap();
    assert_eq!(config.policy.keys.len(), 3);
    assert_eq!(
        config.files.len(),
        3,
        "the config, its keys file and its rules file are watched"
    );
    if std::env::var_os("OPENAI_API_KEY").is_none() {
        let e = camelid_gateway::state(&config).unwrap_err().to_string();
        assert!(
            e.contains("moderation.providers.openai") && e.contains("OPENAI_API_KEY"),
            "{e}"
        );
    }
    // Everything else builds: the rules compile, the profiles and keys resolve.
    config.policy.moderation.providers.remove("openai");
    for profile in config.policy.moderation.profiles.values_mut() {
        profile.input.retain(|p| p != "openai");
    }
    let state = camelid_gateway::state(&config).unwrap();
    let policy = state.policy.current();
    let profiles: Vec<&String> = policy.profiles.keys().collect();
    assert_eq!(
        profiles,
        ["builtin", "default", "strict"],
        "the built-in profile is there by name"
    );
    assert!(policy.keys.authenticate(Some(b"Bearer anything")).is_err());
}
