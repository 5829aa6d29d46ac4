//! What a running trainer reports: `GET /progress` (JSON, the operator's contract), `GET /metrics` (Prometheus)
//! and `GET /healthz` on `--progress-addr`, served from a background thread.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use camelid_contracts::progress::{LastCheckpoint, Phase, Progress, ShardMemory};

/// The trainer's Prometheus metrics, defined once.
#[derive(Debug, Default)]
pub struct Metrics {
    pub step: Gauge,
    pub total_steps: Gauge,
    pub loss: Gauge<f64, AtomicU64>,
    pub learning_rate: Gauge<f64, AtomicU64>,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    pub grad_norm: Gauge<f64, AtomicU64>,
    pub tokens: Counter,
    pub checkpoints: Counter,
    pub last_checkpoint_step: Gauge,
}

impl Metrics {
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("camelid_trainer");
        r.register("step", "Optimizer steps completed", self.step.clone());
        r.register(
            "total_steps",
            "Optimizer steps in the run",
            self.total_steps.clone(),
        );
        r.register(
            "loss",
            "Mean loss per trainable token of the last step",
            self.loss.clone(),
        );
        r.register(
            "learning_rate",
            "Learning rate of the last step",
            self.learning_rate.clone(),
        );
        r.register(
            "tokens_per_second",
            "Training tokens per second",
            self.tokens_per_second.clone(),
        );
        r.register(
            "grad_norm",
            "Gradient norm before clipping",
            self.grad_norm.clone(),
        );
        r.register("tokens", "Training tokens processed", self.tokens.clone());
        r.register("checkpoints", "Checkpoints written", self.checkpoints.clone());
        r.register(
            "last_checkpoint_step",
            "Step of the last complete checkpoint",
            self.last_checkpoint_step.clone(),
        );
        r
    }
}

/// Shared between the training loop and the server.
#[derive(Debug, Default)]
pub struct Reporter {
    progress: Mutex<Progress>,
    pub metrics: Metrics,
}

impl Reporter {
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.metrics.registry()).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves the reporter on `addr` from a background thread; returns the bound address (`:0` picks a port).
pub fn serve(addr: &str, reporter: Arc<Reporter>) -> Result<std::net::SocketAddr, String> {
    let server = tiny_http::Server::http(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("{addr} is not an IP address"))?;
    std::thread::Builder::new()
        .name("progress-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let json = "application/json";
                let (status, body, content_type) = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, camelid_contracts::progress::PATH) => {
                        match serde_json::to_string(&reporter.snapshot()) {
                            Ok(body) => (200, body, json),
                            // Cannot happen for this document today; if it ever does, a 500 that says why beats an empty 200.
                            Err(e) => (500, serde_json::json!({"error": e.to_string()}).to_string(), json),
                        }
                    }
                    (tiny_http::Method::Get, "/metrics") => (
                        200,
                        reporter.metrics_text(),
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    (tiny_http::Method::Get, "/healthz") => (200, "ok".to_string(), "text/plain"),
                    _ => (404, r#"{"error":"not found"}"#.to_string(), json),
                };
                let mut response = tiny_http::Response::from_string(body).with_status_code(status);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", content_type) {
                    response = response.with_header(h);
                }
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("cannot start the progress server: {e}"))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn progress_and_metrics_follow_the_contract() {
        let reporter = Arc::new(Reporter::default());
        let addr = serve("127.0.0.1:0", reporter.clone()).unwrap();
        let (_, body) = get(addr, "/progress");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["phase"], "loading");
        assert!(v["last_checkpoint"].is_null() && v["loss"].is_null());

        reporter.update(|p| {
            p.phase = Phase::Training;
            p.step = 3;
            p.total_steps = 10;
            p.epoch = 0.3;
            p.loss = Some(1.5);
            p.learning_rate = 2e-5;
            p.tokens_per_second = 120.0;
            p.eta_seconds = Some(70.0);
            p.last_checkpoint = Some(LastCheckpoint {
                step: 2,
                time: "2026-11-26T18:00:00Z".into(),
            });
        });
        reporter.metrics.step.set(3);
        let (head, body) = get(addr, "/progress");
        assert!(head.contains("application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = [
            "phase",
            "step",
            "total_steps",
            "epoch",
            "loss",
            "learning_rate",
            "tokens_per_second",
            "last_checkpoint",
            "eta_seconds",
        ];
        expected.sort();
        assert_eq!(keys, expected);
        assert_eq!(v["phase"], "training");
        assert_eq!(
            v["last_checkpoint"],
            serde_json::json!({"step": 2, "time": "2026-11-26T18:00:00Z"})
        );

        let (_, metrics) = get(addr, "/metrics");
        assert!(metrics.contains("camelid_trainer_step 3"), "{metrics}");
        assert!(get(addr, "/nope").0.contains("404"));
    }
}
