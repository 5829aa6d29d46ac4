//! The chart against a real control plane (etcd, kube-apiserver with RBAC, controller-manager, scheduler and kwok,
//! from `tools/k8s-bins.sh`), as a user meets it:
//! - `helm lint --strict` is clean, `helm install` establishes the CRDs and its Deployments become available;
//! - every Kubernetes object in `examples/` is accepted by `kubectl apply`, and every crafted bad FineTuneJob and
//!   ChatModel is rejected by the real API server (schema and CEL) with the expected message;
//! - the operator and the gateway run as local processes with tokens of the ServiceAccounts the chart created
//!   (TokenRequest), and the operator's own arguments from the chart's Deployment: every API call they make is
//!   authorized by the chart's Roles alone, so a missing verb fails here;
//! - `kubectl get finetunejobs,chatmodels` prints the printer columns with the values the operator wrote;
//! - `helm upgrade` and `helm uninstall` work, and uninstalling keeps the CRDs and users' objects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crd_cases;
mod k8s_common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use camelid_test_support::k8s::{ControlPlane, Daemon, FakeNode, wait_until, workspace_binary};
use k8s_common::{events, names, operator, table};
use serde_json::Value;

const NS: &str = "camelid-system";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn chart() -> String {
    repo().join("charts/camelid").display().to_string()
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_on_a_real_cluster_and_its_roles_suffice() {
    let cp = ControlPlane::start().unwrap();
    cp.add_node(&FakeNode::new("system-1")).unwrap();
    // A GKE spot pool with L4 GPUs, where examples/finetunejob.yaml's first attempt goes.
    cp.add_node(
        &FakeNode::gke_spot("gke-spot-l4-1")
            .label("cloud.google.com/gke-accelerator", "nvidia-l4")
            .gpus(8),
    )
    .unwrap();

    for claim in ["models", "datasets", "training"] {
        cp.add_claim("default", claim).unwrap();
    }

    let lint = cp.helm(&["lint", "--strict", &chart()]).unwrap();
    assert!(!lint.contains("[WARNING]") && !lint.contains("[ERROR]"), "{lint}");

    cp.helm(&[
        "install",
        "camelid",
        &chart(),
        "-n",
        NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "3m",
    ])
    .unwrap();
    cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/finetunejobs.camelid.dev",
        "crd/chatmodels.camelid.dev",
    ])
    .unwrap();
    for deployment in ["camelid-operator", "camelid-gateway"] {
        let d = cp.get_json(&["deployment", deployment, "-n", NS]);
        assert_eq!(
            d["status"]["availableReplicas"], d["spec"]["replicas"],
            "{deployment}: {}",
            d["status"]
        );
    }

    examples_are_accepted(&cp);
    bad_specs_are_rejected(&cp);

    let operator = operator_as_its_service_account(&cp);
    let gateway = gateway_as_its_service_account(&cp);
    printer_columns_show_the_operators_values(&cp);
    for daemon in [&operator, &gateway] {
        let log = daemon.log_text();
        assert!(
            !log.contains("forbidden") && !log.contains("Forbidden") && !log.contains("failed"),
            "{} was refused an API call with the chart's RBAC:\n{log}",
            daemon.name
        );
    }
    drop((operator, gateway));

    cp.helm(&[
        "upgrade",
        "camelid",
        &chart(),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        "replicaCount=2",
        "--wait",
        "--timeout",
        "3m",
    ])
    .unwrap();
    let d = cp.get_json(&["deployment", "camelid-operator", "-n", NS]);
    assert_eq!(
        (
            d["spec"]["replicas"].clone(),
            d["status"]["readyReplicas"].clone()
        ),
        (2.into(), 2.into())
    );
    assert!(
        cp.helm(&["history", "camelid", "-n", NS])
            .unwrap()
            .contains("Upgrade complete")
    );

    cp.helm(&["uninstall", "camelid", "-n", NS, "--wait", "--timeout", "3m"])
        .unwrap();
    assert!(names(&cp, &["deployments", "-n", NS]).is_empty());
    assert!(names(&cp, &["clusterroles", "-l", "app.kubernetes.io/instance=camelid"]).is_empty());
    // Helm never deletes what crds/ installed, so users' jobs and models survive an uninstall.
    assert_eq!(
        names(&cp, &["finetunejobs", "-n", "default"]),
        ["sql-lora", "vicuna-smol"]
    );
}

/// `kubectl apply -f` of every Kubernetes object in `examples/` (other YAML there is trainer or gateway config).
fn examples_are_accepted(cp: &ControlPlane) {
    let mut applied = Vec::new();
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.extension().is_some_and(|e| e == "yaml")
            && text.contains("\nkind: ")
            && text.contains("apiVersion:")
        {
            let out = cp
                .kubectl_output(&["apply", "-f", &path.display().to_string()])
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            applied.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    applied.sort();
    assert_eq!(
        applied,
        ["chatmodel.yaml", "finetunejob-lora.yaml", "finetunejob.yaml"]
    );
}

/// Every crafted bad spec is refused by the API server itself, naming what is wrong.
fn bad_specs_are_rejected(cp: &ControlPlane) {
    let cases = [
        ("finetunejob.yaml", crd_cases::finetunejob_cases()),
        ("chatmodel.yaml", crd_cases::chatmodel_cases()),
    ];
    for (file, cases) in cases {
        let good = crd_cases::example(file);
        for (patch, needle) in cases {
            let mut bad = crd_cases::patched(&good, patch.clone());
            bad["metadata"]["name"] = "bad".into();
            let out = cp.apply_output(&bad.to_string(), &["--dry-run=server"]).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{file} with {patch} was accepted");
            assert!(
                stderr.contains(needle),
                "{file} with {patch}: expected {needle:?} in:\n{stderr}"
            );
        }
    }
    let minimal = crd_cases::minimal_finetunejob();
    let out = cp
        .apply_output(&minimal.to_string(), &["--dry-run=server", "-n", "default"])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The operator, run with the arguments of the chart's own Deployment and its ServiceAccount's token.
fn operator_as_its_service_account(cp: &ControlPlane) -> Daemon {
    let deployment = cp.get_json(&["deployment", "camelid-operator", "-n", NS]);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .filter(|a| !a.starts_with("--metrics-addr") && !a.starts_with("--health-addr"))
        .collect();
    assert_eq!(args[0], "run");
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let kubeconfig = cp.service_account_kubeconfig(NS, account).unwrap();
    let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let mut extra = rest.clone();
    extra.retain(|a| !a.starts_with("--namespace"));
    let daemon = operator(cp, "operator", &kubeconfig, &extra);
    wait_until(
        "the operator's first attempt of vicuna-smol runs on the spot pool",
        90,
        || {
            let pods = cp.get_json(&[
                "pods",
                "-n",
                "default",
                "-l",
                "camelid.dev/finetunejob=vicuna-smol",
            ]);
            let items = pods["items"].as_array().cloned().unwrap_or_default();
            items.len() == 2
                && items
                    .iter()
                    .all(|p| p["status"]["phase"] == "Running" && p["spec"]["nodeName"] == "gke-spot-l4-1")
        },
    );
    wait_until("the FineTuneJob's status says Running", 60, || {
        cp.get_json(&["finetunejob", "vicuna-smol", "-n", "default"])["status"]["phase"] == "Running"
    });
    let events = events(cp, "default", "involvedObject.name=vicuna-smol");
    assert!(
        events.contains("AttemptStarted"),
        "the operator's Events: {events}"
    );
    daemon
}

/// The gateway with ChatModel discovery, as its ServiceAccount, finds the example's model over the real API.
fn gateway_as_its_service_account(cp: &ControlPlane) -> Daemon {
    let account = cp.get_json(&["deployment", "camelid-gateway", "-n", NS])["spec"]["template"]["spec"]
        ["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_string();
    let kubeconfig = cp.service_account_kubeconfig(NS, &account).unwrap();
    let port = camelid_test_support::free_port();
    let admin = camelid_test_support::free_port();
    let mut command = Command::new(workspace_binary("camelid-gateway", "camelid-gateway"));
    command
        .env("KUBECONFIG", &kubeconfig)
        .env("CAMELID_LOG", "info")
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--discover-chatmodels",
            "--allow-anonymous",
        ]);
    let daemon = Daemon::start("gateway", cp.dir(), &mut command);
    // The example's ChatModel allows named keys only, so an anonymous `/v1/models` does not list it; the admin
    // port's load report lists every model the gateway discovered.
    wait_until("the gateway discovered the ChatModel", 60, || {
        http_get(admin, camelid_contracts::load::PATH).is_some_and(|body| body.contains("vicuna-smol"))
    });
    daemon
}

fn printer_columns_show_the_operators_values(cp: &ControlPlane) {
    let ftj_text = cp.kubectl(&["get", "finetunejobs", "-n", "default"]).unwrap();
    let chat_text = cp.kubectl(&["get", "chatmodels", "-n", "default"]).unwrap();
    // What README's "On Kubernetes" shows.
    eprintln!("{ftj_text}{chat_text}");
    let ftj = table(&ftj_text);
    let columns: Vec<&str> = ftj[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(columns[0], "NAME");
    assert_eq!(columns[1..], crd_cases::FINETUNEJOB_COLUMNS);
    // examples/finetunejob-lora.yaml is listed too (it waits for a GPU node).
    let vicuna = ftj
        .iter()
        .find(|r| r.iter().any(|(c, v)| c == "NAME" && v == "vicuna-smol"))
        .expect("vicuna-smol is listed");
    let row: std::collections::BTreeMap<_, _> = vicuna.iter().cloned().collect();
    assert_eq!(
        (
            row["NAME"].as_str(),
            row["PHASE"].as_str(),
            row["PREEMPTIONS"].as_str()
        ),
        ("vicuna-smol", "Running", "0")
    );
    assert!(row["COST"].starts_with('$'), "COST: {:?}", row["COST"]);
    let chat = table(&chat_text);
    let columns: Vec<&str> = chat[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(columns[0], "NAME");
    assert_eq!(columns[1..], crd_cases::CHATMODEL_COLUMNS);
    let row: std::collections::BTreeMap<_, _> = chat[0].iter().cloned().collect();
    assert_eq!(row["NAME"], "vicuna-smol");
    let status: Value = cp.get_json(&["chatmodel", "vicuna-smol", "-n", "default"])["status"].clone();
    assert!(!status.is_null(), "the operator wrote the ChatModel's status");
}

/// A plain HTTP GET on loopback; the body when the status is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.split(' ')
        .nth(1)
        .is_some_and(|code| code == "200")
        .then(|| body.to_string())
}
