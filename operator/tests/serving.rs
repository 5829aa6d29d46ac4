//! A ChatModel through the unmodified operator (`camelid_operator::run::run`) against the in-memory API server.
//! The test plays the Deployment controller (ready replicas) and the gateways: a `/internal/load` server behind
//! the gateway Service's EndpointSlice, reporting the load the test sets, exactly as real gateways do.
//!
//! At zero replicas (scaleToZero) → one queued request starts a worker → a burst scales up at once → the load
//! stops and, one scale-down delay later, the model is back at zero; every decision is in `status.lastScale` and
//! an Event. A malformed ChatModel gets an Event and breaks nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod common;

use camelid_memory_apiserver::MemoryApiServer;
use camelid_memory_apiserver::store::{Key, Resource};
use common::{NS, client, eventually, json_server};
use serde_json::{Value, json};

fn replicas(server: &MemoryApiServer) -> Option<i64> {
    server
        .cluster()
        .get(&Key::new("apis/apps/v1", "deployments", Some(NS), "smol-worker"))
        .and_then(|d| d["spec"]["replicas"].as_i64())
}

fn status(server: &MemoryApiServer) -> Value {
    server
        .cluster()
        .get(&Key::new(
            "apis/camelid.dev/v1alpha1",
            "chatmodels",
            Some(NS),
            "smol",
        ))
        .map(|m| m["status"].clone())
        .unwrap_or_default()
}

/// The Deployment controller's part: every desired worker is ready.
fn all_ready(server: &MemoryApiServer) {
    let n = replicas(server).unwrap();
    server
        .cluster()
        .merge(
            &Key::new("apis/apps/v1", "deployments", Some(NS), "smol-worker"),
            &json!({"status": {"replicas": n, "readyReplicas": n}}),
            camelid_memory_apiserver::store::Part::Status,
            "kube-controller-manager",
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatmodel_scales_from_zero_with_load_and_back_to_zero_when_idle() {
    let server = MemoryApiServer::start().await.unwrap();
    let client = client(&server);
    // The gateways' `/internal/load`, as the test sets it.
    let (load_port, load) = json_server("/internal/load", json!({"models": {}})).await;
    // The gateway Service's EndpointSlice: one ready gateway pod.
    server
        .cluster()
        .create(
            &Key::new("apis/discovery.k8s.io/v1", "endpointslices", Some("camelid-system"), "camelid-gateway-x1"),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "camelid-gateway-x1", "labels": {"kubernetes.io/service-name": "camelid-gateway"}},
                   "addressType": "IPv4", "ports": [{"name": "admin", "port": load_port, "protocol": "TCP"}],
                   "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}),
            "kube-controller-manager",
        )
        .unwrap();
    server
        .cluster()
        .create(
            &Key::new("apis/camelid.dev/v1alpha1", "chatmodels", Some(NS), "broken"),
            json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "broken"},
                   "spec": {"replicas": "many"}}),
            "old-client",
        )
        .unwrap();
    let args = camelid_operator::run::RunArgs {
        namespace: "camelid-system".into(),
        autoscale_seconds: 1,
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        leader_election: false,
        progress_poll_seconds: 1,
        ..camelid_operator::run::RunArgs::default()
    };
    let operator = tokio::spawn(async move { camelid_operator::run::run(args, client).await.unwrap() });
    server
        .cluster()
        .create(
            &Key::new("apis/camelid.dev/v1alpha1", "chatmodels", Some(NS), "smol"),
            json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "smol"},
                   "spec": {"model": {"claimName": "models", "path": "smol"},
                            "replicas": {"min": 0, "max": 4},
                            "autoscaling": {"targetInFlight": 2, "scaleDownDelay": "3s", "scaleToZero": true}}}),
            "kubectl",
        )
        .unwrap();

    // Idle and allowed to: it starts at zero, its Service and budget in place.
    eventually("the workers at zero", || async { replicas(&server) == Some(0) }).await;
    eventually("ScaledToZero", || async {
        status(&server)["phase"] == "ScaledToZero"
    })
    .await;
    assert_eq!(status(&server)["endpoint"], "smol");
    assert_eq!(status(&server)["model"], "pvc://models/smol");
    for (prefix, plural, name) in [
        ("api/v1", "services", "smol"),
        ("apis/policy/v1", "poddisruptionbudgets", "smol-worker"),
    ] {
        assert!(
            server
                .cluster()
                .get(&Key::new(prefix, plural, Some(NS), name))
                .is_some(),
            "no {plural}/{name}"
        );
    }

    // A request waits at a gateway: one worker starts.
    *load.lock().unwrap() = json!({"models": {"default/smol": {"inFlight": 0, "queued": 1}}});
    eventually("one worker", || async { replicas(&server) == Some(1) }).await;
    // The status follows the Deployment in the same reconcile.
    eventually("the decision in the status", || async {
        status(&server)["lastScale"]["to"] == 1
    })
    .await;
    let last = status(&server)["lastScale"].clone();
    assert_eq!((last["from"].clone(), last["to"].clone()), (json!(0), json!(1)));
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("waiting at zero replicas"),
        "{last}"
    );
    eventually("Loading", || async { status(&server)["phase"] == "Loading" }).await;
    all_ready(&server);
    eventually("Ready 1/1", || async {
        status(&server)["ready"] == "1/1" && status(&server)["phase"] == "Ready"
    })
    .await;

    // A burst: 7 in flight at 2 per worker → 4 at once.
    *load.lock().unwrap() = json!({"models": {"default/smol": {"inFlight": 7, "queued": 0}}});
    eventually("four workers", || async { replicas(&server) == Some(4) }).await;
    // 1 of 4 ready while the new workers load.
    eventually("Degraded 1/4", || async {
        status(&server)["phase"] == "Degraded" && status(&server)["ready"] == "1/4"
    })
    .await;
    all_ready(&server);

    // The load stops: nothing changes within the delay, then the model goes back to zero.
    *load.lock().unwrap() = json!({"models": {}});
    let stopped = Instant::now();
    eventually("back at zero", || async { replicas(&server) == Some(0) }).await;
    // The last busy observation may precede the stop by up to one period (1 s): the window starts there.
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "scaled down before the 3 s delay: {:?}",
        stopped.elapsed()
    );
    eventually("ScaledToZero again", || async {
        status(&server)["phase"] == "ScaledToZero"
    })
    .await;

    // A reconcile records its Event after it patches the status, so the last one may still be on its way.
    eventually("ScaledUp, ScaledToZero and InvalidSpec events", || async {
        let events = server
            .cluster()
            .list(&Resource::new("apis/events.k8s.io/v1", "events"), Some(NS), None);
        let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
        ["ScaledUp", "ScaledToZero", "InvalidSpec"]
            .iter()
            .all(|reason| reasons.contains(reason))
    })
    .await;
    operator.abort();
}
