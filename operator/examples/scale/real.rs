//! The scale bench against Kubernetes' own control plane: the FineTuneJobs are created first (one `kubectl create`
//! of a List), then the operator starts and the clock runs until every job's first Job exists.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use camelid_test_support::k8s::{ControlPlane, FakeNode};
use serde_json::{Value, json};

use crate::{free_port, http_get, operator_binary, report, rss_mib};

/// The API server's `apiserver_request_total`, summed over every label.
fn requests(cp: &ControlPlane) -> f64 {
    let metrics = cp.kubectl(&["get", "--raw", "/metrics"]).unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn count(cp: &ControlPlane, kind: &str) -> usize {
    cp.kubectl(&["get", kind, "-n", "default", "--no-headers", "-o", "name"])
        .map(|out| out.lines().count())
        .unwrap_or(0)
}

pub fn run(jobs: usize) {
    let cp = ControlPlane::start().expect("start the control plane (tools/k8s-bins.sh builds it)");
    cp.install_crds().unwrap();
    cp.add_node(&FakeNode::new("cpu-1")).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml");
    let template: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let items: Vec<Value> = (0..jobs)
        .map(|i| {
            let mut job = template.clone();
            job["metadata"] = json!({"name": format!("job-{i:04}"), "namespace": "default"});
            job
        })
        .collect();
    let list = cp.dir().join("jobs.json");
    std::fs::write(
        &list,
        json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    cp.kubectl(&["create", "-f", &list.display().to_string()])
        .unwrap();

    let metrics_port = free_port();
    let mut child = Command::new(operator_binary())
        .args(["run", "--namespace", "camelid-system"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CAMELID_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("target/release/camelid-operator (cargo build --release -p camelid-operator)");
    let before = requests(&cp);
    let started = Instant::now();
    loop {
        let n = count(&cp, "jobs.batch");
        if n >= jobs {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {n} of {jobs} jobs started after 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let all_started = started.elapsed();
    let rate = (requests(&cp) - before) / all_started.as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let metrics = http_get(metrics_port, "/metrics");
    let rss = rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "camelid-operator, {jobs} FineTuneJobs in a real kube-apiserver (etcd, controller-manager, scheduler, kwok):"
    );
    println!(
        "  every job's first attempt created after {:.2} s",
        all_started.as_secs_f64()
    );
    report(&metrics, rss);
    println!(
        "  API server: {rate:.0} requests/s while starting (every client: operator, Job controller, scheduler, kwok)"
    );
}
