//! Shared by the tests that run the operator against the in-memory API server.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use camelid_memory_apiserver::MemoryApiServer;
use kube::Client;
use serde_json::Value;

pub const NS: &str = "default";

/// A kube client of `server`, with `default` (`NS`) as its namespace.
pub fn client(server: &MemoryApiServer) -> Client {
    server.client().unwrap()
}

/// Waits up to 30 s for `check`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP server answering `GET route` with a JSON document the test sets (a trainer's `/progress`, a gateway's
/// `/internal/load`).
pub async fn json_server(route: &str, initial: Value) -> (u16, Arc<Mutex<Value>>) {
    let doc = Arc::new(Mutex::new(initial));
    let d = doc.clone();
    let app = axum::Router::new().route(
        route,
        axum::routing::get(move || {
            let d = d.clone();
            async move { axum::Json(d.lock().unwrap().clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, doc)
}
