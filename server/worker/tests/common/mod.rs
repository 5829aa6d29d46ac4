//! Shared by the worker's integration tests: real `camelid-worker` processes and raw HTTP calls.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

pub use camelid_test_support::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn request(port: u16, method: &str, path: &str, body: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    Some(s)
}

/// Status and raw text of a whole response.
pub fn fetch(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = request(port, method, path, body)?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out))
}

pub struct Worker {
    child: Child,
    pub grpc: u16,
    pub http: u16,
}

impl Worker {
    pub fn start(grpc: u16, http: u16) -> Self {
        Self::start_with_token(grpc, http, None)
    }

    /// A worker that serves only gRPC callers presenting `token` (see `camelid_contracts::worker_auth`).
    pub fn start_with_token(grpc: u16, http: u16, token: Option<&str>) -> Self {
        Self::start_with(grpc, http, token, &[])
    }

    /// A worker with `args` added to its command line.
    pub fn start_with(grpc: u16, http: u16, token: Option<&str>, args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_camelid-worker"));
        command
            .args(["--served-model-name", "smol", "--max-batch", "4"])
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{http}")])
            .env("CAMELID_LOG", "warn")
            .env_remove(camelid_contracts::worker_auth::TOKEN_ENV)
            .stdout(Stdio::null());
        if let Some(token) = token {
            command.env(camelid_contracts::worker_auth::TOKEN_ENV, token);
        }
        let child = command.spawn().expect("start camelid-worker");
        let mut w = Self { child, grpc, http };
        let deadline = Instant::now() + Duration::from_secs(120);
        while fetch(http, "GET", "/readyz", "").map(|r| r.0) != Some(200) {
            assert!(
                w.child.try_wait().unwrap().is_none(),
                "camelid-worker exited early"
            );
            assert!(Instant::now() < deadline, "worker not ready after 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        w
    }

    pub fn running(&self) -> u32 {
        let (_, body) = fetch(self.http, "GET", "/metrics", "").unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix("camelid_worker_running_sequences "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (what Kubernetes sends a pod that is deleted or whose node goes away).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The JSON body of a whole (non-chunked) response.
pub fn body_json(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"))
}

impl Worker {
    /// Requests the worker has finished, whatever their outcome.
    pub fn finished_requests(&self) -> u64 {
        let (_, body) = fetch(self.http, "GET", "/metrics", "").unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with("camelid_worker_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
            .sum()
    }
}

/// A gateway serving inside a test's runtime: its API port and its admin port (`/metrics`, `/internal/load`),
/// which are apart as in a deployment.
#[derive(Debug, Clone, Copy)]
pub struct Gateway {
    pub api: u16,
    pub admin: u16,
}

impl Gateway {
    /// A gateway over `workers` (model `smol`, probed every 200 ms) in a runtime of its own, which it lives as long
    /// as.
    pub fn over(workers: &[&Worker]) -> (tokio::runtime::Runtime, Self) {
        Self::over_with(workers, camelid_gateway::routing::MigrationLimits::default())
    }

    /// [`Gateway::over`] with `migration`'s limits.
    pub fn over_with(
        workers: &[&Worker],
        migration: camelid_gateway::routing::MigrationLimits,
    ) -> (tokio::runtime::Runtime, Self) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let gateway = runtime.block_on(async {
            let mut config = camelid_gateway::GatewayConfig {
                probe_interval: Duration::from_millis(200),
                migration,
                ..camelid_gateway::GatewayConfig::default()
            };
            let addrs: Vec<String> = workers.iter().map(|w| format!("127.0.0.1:{}", w.grpc)).collect();
            config
                .add_backend_flag(&format!("smol={}", addrs.join(",")))
                .unwrap();
            let state = camelid_gateway::state(&config).unwrap();
            state.router.probe_all().await;
            Self::spawn(state).await
        });
        (runtime, gateway)
    }

    /// Serves `state`'s API and admin endpoints on free loopback ports for as long as the runtime runs.
    pub async fn spawn(state: camelid_gateway::AppState) -> Self {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ports = Self {
            api: api.local_addr().unwrap().port(),
            admin: admin.local_addr().unwrap().port(),
        };
        tokio::spawn(camelid_gateway::serve::serve_admin(
            state.clone(),
            admin,
            std::future::pending(),
        ));
        tokio::spawn(camelid_gateway::serve(state, api, std::future::pending()));
        ports
    }
}
