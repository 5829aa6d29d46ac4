//! What camelid's tests share, so that each helper has one copy: the repository root, the project `.venv`'s
//! Python (the reference implementations the tests compare against), free ports, and [`k8s`], a real Kubernetes
//! control plane. Dev-only: no shipped crate depends on it.

#![allow(
    clippy::expect_used,
    reason = "test support: a broken machine ends the test with a clear message"
)]

pub mod k8s;

use std::path::{Path, PathBuf};

/// The repository root (this crate lives in `tests/support`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The project `.venv`'s Python (`CAMELID_PYTHON` overrides it); panics with the fix when it is missing.
pub fn python() -> PathBuf {
    let p = std::env::var_os("CAMELID_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `make test` (it creates the project .venv)",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}
