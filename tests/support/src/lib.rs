//! What camelid's tests share, so that each helper has one copy: the repository root, the project `.venv`'s
//! Python (the reference implementations the tests compare against), free ports, truncated files, and [`k8s`], a
//! real Kubernetes control plane. Dev-only: no shipped crate depends on it.

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

/// Cuts the file at `path` to half its length, as a writer killed mid-write or a full disk leaves it: the attack
/// the checkpoint tests make on a checkpoint's files, in the unit tests and the resume tests alike.
pub fn truncate_half(path: &Path) {
    let len = std::fs::metadata(path).expect("the file to truncate").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncating the file");
}

/// A loopback port that is free now and that no other call in this process has handed out. The ports come from
/// below the kernel's ephemeral range (`ip_local_port_range`): a port the kernel picks for `:0` is one it may also
/// pick for any outgoing connection a moment later (Gloo, gRPC and HTTP clients of tests running in parallel open
/// many), and a server then fails to listen on it with EADDRINUSE.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_start().clamp(2048, 65535);
    let (low, span) = (1024_u32, u32::from(below) - 1024);
    // Start at a place of this process's own, so consecutive test binaries do not retry the same ports.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {below}")
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|p| *p >= 1024 && *p < ephemeral_start()));
        assert!(std::net::TcpListener::bind(("127.0.0.1", ports[0])).is_ok());
    }
}
