//! Shared by the gateway's integration tests: a gateway built from a YAML config file, and calls into it.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use camelid_gateway::AppState;
use camelid_gateway::GatewayConfig;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A fresh folder under the target dir for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The hex SHA-256 of a key, as a config stores it.
pub fn sha(key: &str) -> String {
    hex::encode(camelid_gateway::keys::hash_key(key))
}

/// A gateway from `yaml` (written to `dir/gateway.yaml`); its state and the app.
pub fn gateway(dir: &std::path::Path, yaml: &str) -> (AppState, axum::Router, GatewayConfig) {
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = GatewayConfig::from_file(&path).unwrap();
    let state = camelid_gateway::state(&config).unwrap();
    let app = camelid_gateway::app(state.clone());
    (state, app, config)
}

/// The stream a fake worker's `Generate` answers with.
pub type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<camelid_proto::v1::GenerateResponse, tonic::Status>> + Send>,
>;

/// Serves `worker` (a fake `camelid.worker.v1.Worker`) on a free loopback port for as long as the runtime runs;
/// its address.
pub async fn serve_fake_worker<W: camelid_proto::v1::worker_server::Worker>(worker: W) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(camelid_proto::v1::worker_server::WorkerServer::new(worker))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Status and error code of an error reply.
    pub fn outcome(&self) -> (u16, String) {
        (self.status.as_u16(), self.error_code())
    }

    /// The OpenAI error's `code`, asserting the error shape.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "not an OpenAI error: {}",
            self.text
        );
        e["code"].as_str().unwrap_or_default().to_string()
    }
}

pub async fn call(app: &axum::Router, method: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn post_chat(app: &axum::Router, key: Option<&str>, body: &str) -> Reply {
    call(app, "POST", "/v1/chat/completions", key, body).await
}

pub fn chat(model: &str, content: &str, max_tokens: u32) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        "max_tokens": max_tokens,
    })
    .to_string()
}
