//! A ChatModel's workers on spot capacity with Kubernetes' own controllers doing their part: the real Deployment
//! and ReplicaSet controllers make the workers, the real scheduler places them on kwok's fake GKE nodes (the base
//! on the on-demand node, the rest on the spot pool), the disruption controller keeps the budget. The operator
//! runs as a local process.
//!
//! A termination taint on the node of a spot worker: the operator surges a replacement onto the other spot node
//! while the old worker is still there, counts the preemption in the status (`preemptions`, `leaving`,
//! `replacing`) with a `WorkerPreempted` Event naming the pod and its node; once the old pod is gone the surge is
//! taken back and one spot worker stays, on a remaining spot node. Then, with the built-in autoscaler off,
//! `kubectl scale` (the ChatModel's `/scale` subresource) sets the workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_common;

use camelid_test_support::k8s::{ControlPlane, FakeNode, wait_until};
use k8s_common::{admin_operator, cluster, events};
use serde_json::{Value, json};

const NS: &str = "default";

fn status(cp: &ControlPlane) -> Value {
    cp.get_json(&["chatmodel", "smol", "-n", NS])["status"].clone()
}

/// The worker pods of `pool` (`base` or `spot`) that are not being deleted.
fn pods(cp: &ControlPlane, pool: &str) -> Vec<Value> {
    let selector = format!("camelid.dev/chatmodel=smol,camelid.dev/pool={pool}");
    cp.get_json(&["pods", "-n", NS, "-l", &selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn running(cp: &ControlPlane, pool: &str) -> Vec<(String, String)> {
    pods(cp, pool)
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn deployment(cp: &ControlPlane, name: &str) -> Value {
    cp.get_json(&["deployment", name, "-n", NS])
}

#[test]
fn a_spot_worker_with_a_termination_notice_is_replaced_before_it_goes_and_kubectl_scale_sets_the_workers() {
    let nodes = [
        FakeNode::new("od-1"),
        FakeNode::gke_spot("spot-1"),
        FakeNode::gke_spot("spot-2"),
    ];
    let cp = cluster(NS, &[], &nodes);
    let _operator = admin_operator(&cp, &["--autoscale-seconds", "1"]);
    let model = json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
        "metadata": {"name": "smol", "namespace": NS},
        "spec": {"model": {"path": "/models/smol.gguf"},
                 "replicas": {"min": 1, "max": 3, "desired": 2},
                 "autoscaling": {"enabled": false},
                 "spot": {"provider": "gke", "baseOnDemand": 1}}});
    cp.apply(&model.to_string()).unwrap();

    // Two workers: the base on the on-demand node, one on the spot pool.
    wait_until("one base and one spot worker run", 90, || {
        running(&cp, "base").len() == 1 && running(&cp, "spot").len() == 1
    });
    assert_eq!(running(&cp, "base")[0].1, "od-1");
    let (old, node) = running(&cp, "spot")[0].clone();
    assert!(node.starts_with("spot-"), "{node}");
    wait_until("the status shows 2 ready workers", 60, || {
        status(&cp)["ready"] == "2/2"
    });
    assert_eq!(
        status(&cp)["selector"],
        "app.kubernetes.io/component=worker,camelid.dev/chatmodel=smol"
    );

    // GKE's termination notice on the spot worker's node.
    cp.kubectl(&[
        "taint",
        "node",
        &node,
        "cloud.google.com/impending-node-termination=true:NoSchedule",
    ])
    .unwrap();
    wait_until("the spot Deployment surges by one", 60, || {
        let d = deployment(&cp, "smol-worker-spot");
        d["spec"]["replicas"] == 2 && d["metadata"]["annotations"]["camelid.dev/surge"] == "1"
    });
    wait_until("the replacement runs on the other spot node", 90, || {
        running(&cp, "spot").len() == 2
    });
    let spot = running(&cp, "spot");
    assert!(
        spot.iter().any(|(pod, _)| pod == &old),
        "the old worker is still there: {spot:?}"
    );
    let (_, elsewhere) = spot.iter().find(|(pod, _)| pod != &old).cloned().unwrap();
    assert!(
        elsewhere.starts_with("spot-") && elsewhere != node,
        "the replacement is on {elsewhere}"
    );
    assert_eq!(
        deployment(&cp, "smol-worker")["spec"]["replicas"],
        1,
        "the base is not surged"
    );
    wait_until("the status counts the preemption", 60, || {
        let st = status(&cp);
        st["preemptions"] == 1 && st["replacing"] == 1
    });
    let st = status(&cp);
    assert_eq!(
        st["desiredReplicas"], 2,
        "replacements are not desired workers: {st}"
    );
    assert_eq!(st["leaving"][0]["pod"], old.as_str(), "{st}");
    assert_eq!(st["leaving"][0]["node"], node.as_str(), "{st}");
    wait_until("the WorkerPreempted Event", 30, || {
        let e = events(&cp, NS, "reason=WorkerPreempted");
        e.contains(&old) && e.contains(&node)
    });

    // The node goes, as the cloud takes it back: its pod first (its shutdown), then the node.
    cp.kubectl(&["delete", "pod", &old, "-n", NS, "--wait=false"])
        .unwrap();
    cp.kubectl(&["delete", "node", &node, "--wait=false"]).unwrap();
    wait_until("the surge is taken back", 60, || {
        let d = deployment(&cp, "smol-worker-spot");
        d["spec"]["replicas"] == 1 && d["metadata"]["annotations"]["camelid.dev/surge"].is_null()
    });
    // The ReplicaSet may have started one more pod before the surge was lowered, and then removes one of the two.
    // Which one is its choice: it ranks pods by how long they have been ready in power-of-two buckets, so the
    // newer pod usually goes but the replacement sometimes does (seen in 2 of 6 runs). Either way one spot worker
    // is left, on a spot node that is still there.
    wait_until("one spot worker, on a remaining spot node", 90, || {
        let spot = running(&cp, "spot");
        spot.len() == 1 && spot[0].1 != node && spot[0].1.starts_with("spot-") && pods(&cp, "spot").len() == 1
    });
    wait_until("the status no longer shows it leaving", 60, || {
        let st = status(&cp);
        st["replacing"] == 0 && st["leaving"].is_null() && st["ready"] == "2/2"
    });
    assert_eq!(status(&cp)["preemptions"], 1, "counted once: {}", status(&cp));

    // With the autoscaler off, `kubectl scale` sets the workers through the /scale subresource.
    cp.kubectl(&["scale", "chatmodel", "smol", "-n", NS, "--replicas=3"])
        .unwrap();
    wait_until("three workers, the third on spot", 60, || {
        deployment(&cp, "smol-worker-spot")["spec"]["replicas"] == 2 && status(&cp)["desiredReplicas"] == 3
    });
    let model = cp.get_json(&["chatmodel", "smol", "-n", NS]);
    assert_eq!(model["spec"]["replicas"]["desired"], 3, "{model}");
    let scale = cp.get_json(&["chatmodel", "smol", "-n", NS, "--subresource=scale"]);
    assert_eq!(
        (
            scale["spec"]["replicas"].clone(),
            scale["status"]["replicas"].clone()
        ),
        (json!(3), json!(3)),
        "{scale}"
    );
    assert_eq!(
        scale["status"]["selector"],
        "app.kubernetes.io/component=worker,camelid.dev/chatmodel=smol"
    );
    // Beyond replicas.max (3): accepted (an HPA or KEDA with wider bounds must not fail), the nearest bound runs.
    cp.kubectl(&["scale", "chatmodel", "smol", "-n", NS, "--replicas=5"])
        .unwrap();
    wait_until("desired 5 is written", 30, || {
        cp.get_json(&["chatmodel", "smol", "-n", NS])["spec"]["replicas"]["desired"] == 5
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(status(&cp)["desiredReplicas"], 3);
    assert_eq!(deployment(&cp, "smol-worker-spot")["spec"]["replicas"], 2);
    // Down to one: the on-demand base only.
    cp.kubectl(&["scale", "chatmodel", "smol", "-n", NS, "--replicas=1"])
        .unwrap();
    wait_until("one worker", 60, || {
        deployment(&cp, "smol-worker-spot")["spec"]["replicas"] == 0 && status(&cp)["desiredReplicas"] == 1
    });
    let scaled = events(&cp, NS, "involvedObject.name=smol");
    assert!(
        scaled.contains("ScaledUp") && scaled.contains("ScaledDown") && scaled.contains("autoscaling is off"),
        "{scaled}"
    );
}
