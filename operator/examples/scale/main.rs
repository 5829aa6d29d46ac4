//! Benchmark: 1,000 FineTuneJobs reconciled by the real `camelid-operator run` process (pointed at the API server
//! by a kubeconfig): the time until every job has its first attempt's children, the operator's reconcile latency
//! p50/p99 (from its own histogram), its resident memory, and the API server's request rate. Against the
//! in-memory API server, or with `--real` against Kubernetes' own (etcd, kube-apiserver, controller-manager,
//! scheduler and kwok from `tools/k8s-bins.sh`), where the Job controller also makes every Job's pods.
//!
//!     cargo build --release -p camelid-operator --bins --examples
//!     target/release/examples/scale [--real] [JOBS]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use camelid_memory_apiserver::MemoryApiServer;
use camelid_memory_apiserver::store::{Key, Resource};
use camelid_test_support::free_port;
use serde_json::json;

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A percentile of a Prometheus histogram (linear within the bucket).
fn percentile(metrics: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let target = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= target {
            if le.is_infinite() {
                return prev.0;
            }
            let frac = if count > prev.1 {
                (target - prev.1) / (count - prev.1)
            } else {
                1.0
            };
            return prev.0 + frac * (le - prev.0);
        }
        prev = (le, count);
    }
    f64::NAN
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let jobs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(1000);
    if args.iter().any(|a| a == "--real") {
        real::run(jobs);
    } else {
        memory(jobs).await;
    }
}

fn operator_binary() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/camelid-operator")
}

/// The operator's reconcile numbers from its `/metrics`.
fn report(metrics: &str, rss: f64) {
    let name = "camelid_operator_reconcile_duration_seconds";
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
        .unwrap_or("?")
        .to_string();
    println!(
        "  reconcile latency p50 {:.2} ms, p99 {:.2} ms over {count} reconciles (operator's histogram)",
        percentile(metrics, name, 0.5) * 1000.0,
        percentile(metrics, name, 0.99) * 1000.0
    );
    println!("  operator resident memory: {rss:.1} MiB");
}

mod real;

async fn memory(jobs: usize) {
    let server = MemoryApiServer::start().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("memory-apiserver.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: memory, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: anyone, user: {{}}}}]\ncontexts: [{{name: memory, context: {{cluster: memory, user: anyone, namespace: default}}}}]\n\
             current-context: memory\n",
            server.url()
        ),
    )
    .unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml");
    let template: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    {
        let mut store = server.cluster();
        for i in 0..jobs {
            let mut job = template.clone();
            let name = format!("job-{i:04}");
            job["metadata"] = json!({"name": name, "namespace": "default"});
            let key = Key {
                resource: Resource::new("apis/camelid.dev/v1alpha1", "finetunejobs"),
                namespace: Some("default".into()),
                name,
            };
            store.create(&key, job, "kubectl").unwrap();
        }
    }
    let metrics_port = free_port();
    let operator = operator_binary();
    let mut child = Command::new(&operator)
        .args(["run", "--namespace", "camelid-system"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
        .env("KUBECONFIG", &kubeconfig)
        .env("CAMELID_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo build --release -p camelid-operator)",
                operator.display()
            )
        });
    let started = Instant::now();
    let jobs_resource = Resource::new("apis/batch/v1", "jobs");
    loop {
        let n = server.cluster().list(&jobs_resource, Some("default"), None).len();
        if n >= jobs {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {n} of {jobs} jobs started after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_started = started.elapsed();
    // Let the status writes settle, then read the operator's own numbers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = http_get(metrics_port, "/metrics");
    let rss = rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!("camelid-operator, {jobs} FineTuneJobs in the in-memory API server (2 workers x 4 GPUs each):");
    println!(
        "  every job's first attempt created after {:.2} s",
        all_started.as_secs_f64()
    );
    report(&metrics, rss);
}
