//! Shared by the tests that run against a real control plane (`camelid-k8s-harness`): waiting, local processes of
//! camelid's own binaries, and kubectl reads.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use camelid_k8s_harness::ControlPlane;
use serde_json::Value;

/// Polls `check` every 200 ms until it holds, or panics after `seconds` naming `what`.
pub fn wait_until(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {seconds} s waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl get <args> -o json`, parsed; `Value::Null` when it does not exist.
pub fn get(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json", "--ignore-not-found"]);
    let out = cp
        .kubectl(&["get"].iter().chain(all.iter()).copied().collect::<Vec<_>>())
        .unwrap();
    if out.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&out).unwrap()
    }
}

/// The names of `kubectl get <args>`'s items.
pub fn names(cp: &ControlPlane, args: &[&str]) -> Vec<String> {
    get(cp, args)["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Applies `doc` (JSON or YAML) with kubectl as the administrator; kubectl's whole output.
pub fn apply(cp: &ControlPlane, doc: &str, extra: &[&str]) -> std::process::Output {
    let path = cp.dir().join(format!("apply-{}.yaml", unique()));
    std::fs::write(&path, doc).unwrap();
    let file = path.display().to_string();
    let mut args = vec!["apply", "-f", file.as_str()];
    args.extend(extra);
    cp.kubectl_output(&args).unwrap()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// One of camelid's binaries running as a local process, its output in a log file; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, dir: &Path, command: &mut Command) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a node loss or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "--- {} log ({}):\n{}",
                self.name,
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.kill();
    }
}

/// The operator as a local process, acting with the credentials in `kubeconfig`.
pub fn operator(cp: &ControlPlane, name: &str, kubeconfig: &Path, extra: &[&str]) -> Daemon {
    let mut c = Command::new(env!("CARGO_BIN_EXE_camelid-operator"));
    c.env("KUBECONFIG", kubeconfig)
        .env("CAMELID_LOG", "info,kube=warn")
        .env("POD_NAME", name)
        .args([
            "run",
            "--namespace",
            "camelid-system",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--health-addr", "127.0.0.1:0"])
        .args(extra);
    Daemon::start(name, cp.dir(), &mut c)
}

/// The path of another workspace binary (the gateway's). `cargo test --workspace` builds every workspace binary
/// before it runs any test; a narrower run builds it here. (Not always: `cargo build -p` alone unifies features
/// differently and would rebuild kube and the gateway.)
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let target = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let path = target.join(bin);
    if !path.is_file() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p {package} --bin {bin}");
    }
    path
}

/// The rows of a plain `kubectl get` table, as (column, value) pairs: columns are cut at the header's word starts,
/// since values such as `100/400 (25%)` hold spaces.
pub fn table(text: &str) -> Vec<Vec<(String, String)>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            starts.push(i);
        }
        previous = c;
    }
    let cell = |line: &str, i: usize| -> String {
        let end = starts.get(i + 1).copied().unwrap_or(usize::MAX).min(line.len());
        line.get(starts[i].min(line.len())..end)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    lines
        .map(|line| {
            (0..starts.len())
                .map(|i| (cell(header, i), cell(line, i)))
                .collect()
        })
        .collect()
}
