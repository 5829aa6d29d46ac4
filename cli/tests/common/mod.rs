//! Shared by the `camelid serve` tests: the project's Python, ports, and a server that is killed on drop.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unused_imports)]

pub use camelid_test_support::{free_port, python, workspace};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A plain HTTP GET; returns the status code, or None while nothing listens.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `camelid serve` on the default model with `extra` arguments and waits until it is ready.
pub fn serve(extra: &[&str]) -> (Server, u16, PathBuf) {
    let model = camelid_model::default_model_path().expect("the default model (make test installs it)");
    let port = free_port();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_camelid"))
            .args(["serve", "--port", &port.to_string(), "--model"])
            .arg(&model)
            .args(extra)
            .env("CAMELID_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start camelid serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while http_status(port, "/readyz") != Some(200) {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "camelid serve exited early"
        );
        assert!(Instant::now() < deadline, "camelid serve not ready after 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port, model)
}
