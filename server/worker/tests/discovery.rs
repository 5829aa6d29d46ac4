//! The gateway in a cluster, against the in-memory API server and a real `camelid-worker`: it serves the
//! ChatModels it finds, routes only to endpoints their EndpointSlices mark ready, holds a request while the model
//! has none (keeping a stream open with SSE comments) and answers it once one is ready, stops sending to a worker
//! whose node has a termination notice (503 with `Retry-After` after the hold time), and follows a ChatModel's
//! `allowedKeys`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use camelid_gateway::GatewayConfig;
use camelid_gateway::discovery::ModelRules;
use camelid_gateway::routing::{HoldLimits, StaticEndpoints};
use camelid_memory_apiserver::MemoryApiServer;
use camelid_memory_apiserver::store::{Key, Part};
use common::{Worker, body_json, fetch, free_port};
use serde_json::{Value, json};

const NS: &str = "default";

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn load(admin: u16) -> Value {
    let (_, raw) = fetch(admin, "GET", "/internal/load", "").unwrap();
    body_json(&raw)
}

fn chat(stream: bool) -> String {
    json!({"model": "smol", "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
           "max_tokens": 8, "stream": stream})
    .to_string()
}

#[test]
fn the_gateway_serves_chatmodels_holds_requests_at_zero_and_routes_only_to_ready_workers() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(MemoryApiServer::start()).unwrap();
    let slice = Key::new(
        "apis/discovery.k8s.io/v1",
        "endpointslices",
        Some(NS),
        "smol-x7k2p",
    );
    let model = Key::new("apis/camelid.dev/v1alpha1", "chatmodels", Some(NS), "smol");
    server
        .cluster()
        .create(
            &model,
            json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "smol"},
                   "spec": {"model": {"path": "/models/smol"}, "replicas": {"min": 0, "max": 2},
                            "autoscaling": {"scaleToZero": true}}}),
            "kubectl",
        )
        .unwrap();
    let gateway = runtime.block_on(async {
        let client = server.client().unwrap();
        let found = Arc::new(StaticEndpoints::new(Default::default()));
        let rules = ModelRules::default();
        camelid_gateway::discovery::spawn(client, Some(NS.into()), found.clone(), rules.clone());
        let config = GatewayConfig {
            hold: HoldLimits {
                timeout: Duration::from_secs(6),
                max_requests: 10,
                keepalive: Duration::from_millis(200),
            },
            probe_interval: Duration::from_millis(500),
            ..GatewayConfig::default()
        };
        let state = camelid_gateway::state_with(&config, Some((found, rules))).unwrap();
        common::Gateway::spawn(state).await
    });

    // The ChatModel is served (listed) with no worker at all.
    wait_for("smol in /v1/models", || {
        fetch(gateway.api, "GET", "/v1/models", "").is_some_and(|(_, raw)| raw.contains("\"smol\""))
    });
    // Its worker starts (loading SmolLM2) and is in the EndpointSlice, not ready yet.
    let worker = Worker::start(free_port(), free_port());
    server
        .cluster()
        .create(
            &slice,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "smol-x7k2p", "labels": {"kubernetes.io/service-name": "smol", "camelid.dev/chatmodel": "smol"}},
                   "addressType": "IPv4", "ports": [{"name": "grpc", "port": worker.grpc, "protocol": "TCP"}],
                   "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": false}, "nodeName": "node-a"}]}),
            "kube-controller-manager",
        )
        .unwrap();

    // A streamed request is held: the operator sees it queued, the client gets comments meanwhile.
    let held =
        std::thread::spawn(move || fetch(gateway.api, "POST", "/v1/chat/completions", &chat(true)).unwrap());
    wait_for("the request queued", || {
        load(gateway.admin)["models"]["default/smol"]["queued"] == 1
    });
    let (_, metrics) = fetch(gateway.admin, "GET", "/metrics", "").unwrap();
    assert!(
        metrics.contains("camelid_gateway_held_requests{model=\"default/smol\"} 1"),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(worker.finished_requests(), 0, "an unready endpoint got a request");
    let ready = json!({"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-a"}]});
    server
        .cluster()
        .merge(&slice, &ready, Part::Main, "kube-controller-manager")
        .unwrap();
    let (status, raw) = held.join().unwrap();
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains(": keep-alive"),
        "no SSE comment while waiting: {raw}"
    );
    assert!(
        raw.contains("\"content\"") && raw.contains("data: [DONE]"),
        "{raw}"
    );
    assert_eq!(worker.finished_requests(), 1);
    assert_eq!(
        load(gateway.admin)["models"]["default/smol"],
        json!({"inFlight": 0, "queued": 0})
    );

    // Ready now: a request goes straight through.
    let (status, raw) = fetch(gateway.api, "POST", "/v1/chat/completions", &chat(false)).unwrap();
    assert_eq!(status, 200, "{raw}");

    // The worker's node gets a spot termination notice: no new requests go there; past the hold time, 503.
    server
        .cluster()
        .create(
            &Key::new("api/v1", "nodes", None, "node-a"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                   "spec": {"taints": [{"key": "cloud.google.com/impending-node-termination", "effect": "NoSchedule"}]}}),
            "kubelet",
        )
        .unwrap();
    wait_for("the endpoint dropped", || {
        fetch(gateway.api, "GET", "/readyz", "").is_some_and(|(s, _)| s == 503)
    });
    let before = worker.finished_requests();
    let started = Instant::now();
    let (status, raw) = fetch(gateway.api, "POST", "/v1/chat/completions", &chat(false)).unwrap();
    assert_eq!(status, 503, "{raw}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "answered before the hold time: {:?}",
        started.elapsed()
    );
    assert!(raw.to_ascii_lowercase().contains("retry-after: 10"), "{raw}");
    assert_eq!(body_json(&raw)["error"]["code"], "model_starting");
    assert_eq!(worker.finished_requests(), before);

    // The ChatModel allows only the key `alice`: an anonymous request is refused.
    server
        .cluster()
        .merge(
            &model,
            &json!({"spec": {"allowedKeys": ["alice"]}}),
            Part::Main,
            "kubectl",
        )
        .unwrap();
    wait_for("allowedKeys followed", || {
        fetch(gateway.api, "POST", "/v1/chat/completions", &chat(false)).is_some_and(|(s, _)| s == 403)
    });
    drop(worker);
    drop(runtime);
}
