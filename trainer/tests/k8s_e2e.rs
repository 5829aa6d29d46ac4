//! One run with every process real, on a real control plane (etcd, kube-apiserver, controller-manager, scheduler,
//! kwok): the operator and the gateway are local processes of camelid's binaries, and the test plays the kubelet of
//! two spot nodes and one on-demand node (`kubelet/`), running each pod's container as a local process:
//!
//! a FineTuneJob of a tiny model (one worker, CPU) → the real Job controller and scheduler put its pod on a spot
//! node → `camelid-trainer launch` trains and reports `/progress` → GKE's termination notice on the node → the
//! operator deletes the pod with its grace period → the trainer gets SIGTERM, writes its checkpoint and exits 75 →
//! the operator starts attempt 2 on the other spot node → it resumes from the checkpoint and finishes → the
//! ChatModel is created → the user lets it scale to zero → the official openai client's request is held by the
//! gateway (which discovers the model over the real API), the operator scales up, a `camelid-worker` serves the
//! exported model through the real EndpointSlice controller → a flagged prompt is refused → back to zero.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod kubelet;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use camelid_test_support::k8s::{ControlPlane, Daemon, FakeNode, wait_until, workspace_binary};
use serde_json::json;

const NS: &str = "default";

fn spot_node(name: &str) -> FakeNode {
    FakeNode::gke_spot(name).played_by_test()
}

#[test]
fn a_job_is_preempted_resumes_finishes_and_its_model_is_served_with_every_process_real() {
    let cp = Arc::new(ControlPlane::start().unwrap());
    cp.install_crds().unwrap();
    for claim in ["models", "datasets", "training"] {
        cp.add_claim(NS, claim).unwrap();
    }
    for node in [
        spot_node("spot-a"),
        spot_node("spot-b"),
        FakeNode::new("cpu-a").played_by_test(),
    ] {
        cp.add_node(&node).unwrap();
    }
    // A node kwok runs, which none of this job's pods need: kwok is there as in the other cluster tests. Its taint
    // keeps them off it: kwok would report a pod there running, with no process behind it (a worker scheduled
    // there never became ready).
    cp.add_node(&FakeNode::new("kwok-spare").taint("camelid.test/spare", "true", "NoSchedule"))
        .unwrap();

    // The claims' contents: the tiny model and a dataset.
    let claims = cp.dir().join("claims");
    std::fs::create_dir_all(claims.join("models")).unwrap();
    std::fs::create_dir_all(claims.join("datasets")).unwrap();
    std::os::unix::fs::symlink(common::tiny_model(), claims.join("models/tiny")).unwrap();
    common::write_dataset(&claims.join("datasets/chats.jsonl"), 24);

    let progress_port = camelid_test_support::free_port();
    let ip = camelid_test_support::k8s::host_ip().unwrap();
    let _kubelet = kubelet::start(
        cp.clone(),
        &["spot-a", "spot-b", "cpu-a"],
        &claims,
        [
            (
                "camelid-trainer".to_string(),
                Path::new(env!("CARGO_BIN_EXE_camelid-trainer")).to_path_buf(),
            ),
            (
                "camelid-worker".to_string(),
                workspace_binary("camelid-worker", "camelid-worker"),
            ),
        ]
        .into(),
        // Every pod is on this host's address: the progress port is a free one (the operator is told), the
        // worker's are its own (the EndpointSlice controller publishes the container ports).
        vec![
            ("0.0.0.0:8090".into(), format!("{ip}:{progress_port}")),
            ("0.0.0.0:".into(), format!("{ip}:")),
        ],
        vec![
            ("MASTER_ADDR".into(), "127.0.0.1".into()),
            (
                "MASTER_PORT".into(),
                camelid_test_support::free_port().to_string(),
            ),
        ],
    );

    // The gateway, discovering ChatModels over the API, and its Service's endpoint, where the operator reads load.
    let gateway_port = camelid_test_support::free_port();
    let admin_port = camelid_test_support::free_port();
    let gateway_config = cp.dir().join("gateway.yaml");
    std::fs::write(
        &gateway_config,
        "hold: {timeout_ms: 240000, max_requests: 10, keepalive_ms: 1000}\nmoderation:\n  providers:\n    \
         rules: {type: rules, categories: {violence: [\"build a bomb\"]}}\n  profiles:\n    default: {input: [rules]}\n",
    )
    .unwrap();
    let _gateway = Daemon::start(
        "gateway",
        cp.dir(),
        Command::new(workspace_binary("camelid-gateway", "camelid-gateway"))
            .env("KUBECONFIG", cp.kubeconfig())
            .env("CAMELID_LOG", "info")
            .arg("--config")
            .arg(&gateway_config)
            .args([
                "--listen",
                &format!("{ip}:{gateway_port}"),
                "--admin-listen",
                &format!("{ip}:{admin_port}"),
                "--discover-chatmodels",
                "--allow-anonymous",
            ]),
    );
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "camelid-gateway", "namespace": "camelid-system"},
        "spec": {"ports": [{"name": "http", "port": 8000}, {"name": "admin", "port": 9091}]}})
        .to_string(),
    )
    .unwrap();
    cp.apply(&json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "camelid-gateway-local", "namespace": "camelid-system",
            "labels": {"kubernetes.io/service-name": "camelid-gateway", "endpointslice.kubernetes.io/managed-by": "camelid-test"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": gateway_port, "protocol": "TCP"},
                                      {"name": "admin", "port": admin_port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip.clone()], "conditions": {"ready": true}}]}).to_string()).unwrap();
    let _operator = Daemon::start(
        "operator",
        cp.dir(),
        Command::new(workspace_binary("camelid-operator", "camelid-operator"))
            .env("KUBECONFIG", cp.kubeconfig())
            .env("CAMELID_LOG", "info,kube=warn")
            .args([
                "run",
                "--namespace",
                "camelid-system",
                "--autoscale-seconds",
                "1",
                "--progress-poll-seconds",
                "1",
            ])
            .args([
                "--termination-grace-seconds",
                "60",
                "--progress-port",
                &progress_port.to_string(),
            ])
            .args(["--metrics-addr", "127.0.0.1:0", "--health-addr", "127.0.0.1:0"]),
    );

    cp.apply(
        &json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": NS},
        "spec": {"baseModel": {"claimName": "models", "path": "tiny"},
                 "dataset": {"claimName": "datasets", "path": "chats.jsonl"},
                 "hyperparameters": {"maxSteps": 300, "globalBatch": 2, "microBatch": 2, "maxLength": 96,
                                     "learningRate": 1e-3},
                 "workers": 1, "gpusPerWorker": 0,
                 "spot": {"preferSpot": true, "provider": "gke", "maxPreemptions": 3},
                 "checkpoints": {"claimName": "training", "intervalSteps": 25, "keep": 1},
                 "output": {"claimName": "models", "path": "tiny-ft", "chatModel": "tiny"}}})
        .to_string(),
    )
    .unwrap();

    // Attempt 1 trains on a spot node; its progress reaches the status.
    wait_until("attempt 1 trains and reports progress", 180, || {
        let st = &cp.get_json(&["finetunejob", "tiny", "-n", NS])["status"];
        st["phase"] == "Running" && st["lastCheckpoint"]["step"].as_u64().is_some_and(|s| s >= 25)
    });
    let pod = cp.get_json(&[
        "pods",
        "-n",
        NS,
        "-l",
        "camelid.dev/finetunejob=tiny,camelid.dev/attempt=1",
    ])["items"][0]
        .clone();
    let node = pod["spec"]["nodeName"].as_str().unwrap().to_string();
    assert!(node.starts_with("spot-"), "a spot attempt ran on {node}");

    // GKE's termination notice: the operator asks the trainer to checkpoint; it exits 75.
    cp.kubectl(&[
        "taint",
        "node",
        &node,
        "cloud.google.com/impending-node-termination=true:NoSchedule",
    ])
    .unwrap();
    wait_until("attempt 2 after the preemption", 120, || {
        let st = &cp.get_json(&["finetunejob", "tiny", "-n", NS])["status"];
        st["attempt"] == 2 && st["preemptions"] == 1
    });
    let pod_name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let record = _kubelet.record.lock().unwrap().exits.clone();
    assert!(
        record.contains(&(pod_name.clone(), 75)),
        "the trainer stopped after its checkpoint: {record:?}"
    );
    let st = cp.get_json(&["finetunejob", "tiny", "-n", NS])["status"].clone();
    assert_eq!(st["restarts"], 0, "{st}");

    // Attempt 2 resumes from the checkpoint and finishes; the ChatModel appears.
    wait_until("the job succeeds", 300, || {
        cp.get_json(&["finetunejob", "tiny", "-n", NS])["status"]["phase"] == "Succeeded"
    });
    let log = std::fs::read_to_string(cp.dir().join(format!("pod-{}.log", {
        let pods = cp.get_json(&[
            "pods",
            "-n",
            NS,
            "-l",
            "camelid.dev/finetunejob=tiny,camelid.dev/attempt=2",
        ]);
        pods["items"][0]["metadata"]["name"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    })))
    .unwrap_or_default();
    assert!(
        log.to_lowercase().contains("resum"),
        "attempt 2 resumed from the checkpoint:\n{log}"
    );
    assert!(
        claims.join("models/tiny-ft/config.json").is_file(),
        "the model was exported"
    );
    wait_until("the ChatModel is created", 30, || {
        !cp.get_json(&["chatmodel", "tiny", "-n", NS]).is_null()
    });

    // The user lets it scale to zero, with moderation.
    cp.kubectl(&["patch", "chatmodel", "tiny", "-n", NS, "--type=merge", "-p",
        r#"{"spec":{"replicas":{"min":0,"max":1},"autoscaling":{"scaleToZero":true,"scaleDownDelay":"5s"},"moderation":"default","gpus":0}}"#])
        .unwrap();
    wait_until("the ChatModel is at zero", 120, || {
        cp.get_json(&["chatmodel", "tiny", "-n", NS])["status"]["phase"] == "ScaledToZero"
    });

    // The official openai client, through the gateway: held at zero, served once a worker is up; a flagged prompt
    // refused.
    let started = Instant::now();
    let out = Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/gateway_openai_k8s.py"))
        .arg(format!("http://{ip}:{gateway_port}/v1"))
        .arg("tiny")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{}cold start to the answer: {:.1} s",
        String::from_utf8_lossy(&out.stdout),
        started.elapsed().as_secs_f64()
    );
    let workers = &_kubelet.record.lock().unwrap().started;
    assert!(
        workers.iter().any(|p| p.starts_with("tiny-worker")),
        "a worker pod ran: {workers:?}"
    );

    wait_until("back to zero after the scale-down delay", 120, || {
        cp.get_json(&["chatmodel", "tiny", "-n", NS])["status"]["phase"] == "ScaledToZero"
    });
    let events = cp.kubectl(&["get", "events", "-n", NS]).unwrap();
    for reason in ["CheckpointRequested", "Preempted", "ScaledUp", "ScaledToZero"] {
        assert!(events.contains(reason), "no {reason} Event:\n{events}");
    }
}
