//! From a succeeded FineTuneJob to a served, autoscaled, moderated model, with every camelid part real: the
//! unmodified operator (`camelid_operator::run::run`) and gateway (with ChatModel discovery) against the in-memory
//! API server, and real `camelid-worker` processes. The test plays only the kubelet and the EndpointSlice
//! controller: for each desired worker of the Deployment it runs the container's command with its args (the model
//! claim mounted at a temporary directory), and lists it in the Service's EndpointSlice once `/readyz` says the
//! weights are loaded. It also plays the kubelet's part in worker authentication: the container's token comes from
//! the Secret the operator wrote, and only the gateway that holds the same install secret can use the worker.
//!
//! The ChatModel starts at zero → a streamed request waits at the gateway (SSE comments) → the gateway reports it
//! queued → the operator scales to one → the worker loads → the request is answered → a flagged prompt is refused
//! before any worker sees it → idle for the scale-down delay → back to zero.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use camelid_gateway::GatewayConfig;
use camelid_gateway::discovery::ModelRules;
use camelid_gateway::routing::{HoldLimits, StaticEndpoints};
use camelid_memory_apiserver::MemoryApiServer;
use camelid_memory_apiserver::store::{Key, Part, Resource};
use common::{body_json, fetch, free_port};
use serde_json::{Value, json};

const NS: &str = "default";
/// The install's secret, which the operator and the gateway share (the chart's `camelid-worker-secret`).
const SECRET: &str = "the-serving-e2e-install-secret";

fn wait_for(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kubelet and EndpointSlice controller for the ChatModel's one Deployment.
struct Kubelet {
    server: MemoryApiServer,
    claim_dir: std::path::PathBuf,
    worker: Option<(Child, u16, u16)>,
}

impl Kubelet {
    fn deployment(&self) -> Value {
        self.server
            .cluster()
            .get(&Key::new("apis/apps/v1", "deployments", Some(NS), "smol-worker"))
            .cloned()
            .unwrap_or_default()
    }

    /// Brings the running workers in line with the Deployment (0 or 1 here).
    fn sync(&mut self) {
        let d = self.deployment();
        if d.is_null() {
            return;
        }
        let want = d["spec"]["replicas"].as_i64().unwrap_or(0);
        match (want, self.worker.is_some()) {
            (1.., false) => self.start(&d),
            (0, true) => self.stop(),
            _ => {}
        }
        let ready = self
            .worker
            .as_ref()
            .is_some_and(|(_, _, http)| fetch(*http, "GET", "/readyz", "").is_some_and(|(s, _)| s == 200));
        let endpoints = match &self.worker {
            Some((_, grpc, _)) if ready => {
                json!([{"addresses": ["127.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-a",
                                                    "targetRef": {"kind": "Pod", "name": format!("smol-worker-{grpc}")}}])
            }
            _ => json!([]),
        };
        let mut store = self.server.cluster();
        let slice = Key::new(
            "apis/discovery.k8s.io/v1",
            "endpointslices",
            Some(NS),
            "smol-abcde",
        );
        let port = self.worker.as_ref().map_or(0, |w| w.1);
        let body = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "smol-abcde", "labels": {"kubernetes.io/service-name": "smol", "camelid.dev/chatmodel": "smol"}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}], "endpoints": endpoints});
        if store
            .get(&slice)
            .is_some_and(|s| s["endpoints"] == body["endpoints"] && s["ports"] == body["ports"])
        {
            return;
        }
        if store.get(&slice).is_some() {
            store
                .merge(&slice, &body, Part::Main, "endpointslice-controller")
                .unwrap();
        } else {
            store.create(&slice, body, "endpointslice-controller").unwrap();
        }
        let status = json!({"status": {"replicas": want, "readyReplicas": i64::from(ready)}});
        let deployment = Key::new("apis/apps/v1", "deployments", Some(NS), "smol-worker");
        store
            .merge(&deployment, &status, Part::Status, "kube-controller-manager")
            .unwrap();
    }

    /// Runs the worker container: its command and args, the claim mounted, its ports on free local ones.
    fn start(&mut self, d: &Value) {
        let container = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["command"], json!(["camelid-worker"]));
        let (grpc, http) = (free_port(), free_port());
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                match a {
                    "0.0.0.0:50051" => format!("127.0.0.1:{grpc}"),
                    "0.0.0.0:9090" => format!("127.0.0.1:{http}"),
                    _ => a.replace("/camelid/volumes/models", self.claim_dir.to_str().unwrap()),
                }
            })
            .collect();
        assert!(
            !args.iter().any(|a| a == "--allow-unauthenticated"),
            "an operator with the install's secret ran open workers: {args:?}"
        );
        let child = Command::new(env!("CARGO_BIN_EXE_camelid-worker"))
            .args(&args)
            .envs(self.secret_env(container))
            .env("CAMELID_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.worker = Some((child, grpc, http));
    }

    /// The container's variables from Secrets, read as the kubelet would: the operator's Secret must exist.
    fn secret_env(&self, container: &Value) -> Vec<(String, String)> {
        let store = self.server.cluster();
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let from = &e["valueFrom"]["secretKeyRef"];
                let name = from["name"].as_str()?;
                let key = from["key"].as_str().unwrap();
                let secret = store
                    .get(&Key::new("api/v1", "secrets", Some(NS), name))
                    .unwrap_or_else(|| {
                        panic!("the pod needs the Secret {name}, which the operator did not make")
                    });
                let value = match secret["data"][key].as_str() {
                    Some(b64) => String::from_utf8(
                        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap(),
                    )
                    .unwrap(),
                    None => secret["stringData"][key].as_str().unwrap().to_string(),
                };
                Some((e["name"].as_str().unwrap().to_string(), value))
            })
            .collect()
    }

    fn stop(&mut self) {
        if let Some((mut child, _, _)) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop();
    }
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

fn chat(content: &str, stream: bool) -> String {
    json!({"model": "smol", "messages": [{"role": "user", "content": content}], "temperature": 0,
           "max_tokens": 8, "stream": stream})
    .to_string()
}

#[test]
fn a_finetuned_model_is_served_from_zero_moderated_and_scaled_back_to_zero() {
    // The job's output on the claim `models`: here the default SmolLM2 as a GGUF file (the trainer exports an HF
    // directory; the worker loads either the same way).
    let claim_dir = std::env::temp_dir().join(format!("camelid-claim-{}", std::process::id()));
    std::fs::create_dir_all(&claim_dir).unwrap();
    let gguf = camelid_model::default_model_path().unwrap();
    let _ = std::fs::remove_file(claim_dir.join("smol-ft.gguf"));
    std::os::unix::fs::symlink(&gguf, claim_dir.join("smol-ft.gguf")).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(MemoryApiServer::start()).unwrap();
    let gateway_config = claim_dir.join("gateway.yaml");
    std::fs::write(
        &gateway_config,
        "moderation:\n  providers:\n    rules: {type: rules, categories: {violence: [\"build a bomb\"]}}\n  \
         profiles:\n    default: {input: [rules]}\n",
    )
    .unwrap();
    let gateway = runtime.block_on(async {
        let client = server.client().unwrap();
        let found = Arc::new(StaticEndpoints::new(Default::default()));
        let rules = ModelRules::default();
        camelid_gateway::discovery::spawn(client.clone(), Some(NS.into()), found.clone(), rules.clone());
        let config = GatewayConfig {
            hold: HoldLimits {
                timeout: Duration::from_secs(120),
                max_requests: 10,
                keepalive: Duration::from_millis(500),
            },
            probe_interval: Duration::from_millis(500),
            worker_secret: camelid_gateway::routing::WorkerSecret::new(SECRET).unwrap(),
            ..GatewayConfig::from_file(&gateway_config).unwrap()
        };
        let state = camelid_gateway::state_with(&config, Some((found, rules))).unwrap();
        let port = common::Gateway::spawn(state).await;
        let args = camelid_operator::run::RunArgs {
            namespace: "camelid-system".into(),
            autoscale_seconds: 1,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            health_addr: "127.0.0.1:0".parse().unwrap(),
            leader_election: false,
            progress_poll_seconds: 1,
            worker_secret: Some(camelid_contracts::worker_auth::InstallSecret::new(SECRET).unwrap()),
            ..camelid_operator::run::RunArgs::default()
        };
        tokio::spawn(async move { camelid_operator::run::run(args, client).await.unwrap() });
        port
    });
    {
        let mut store = server.cluster();
        // The gateway Service's EndpointSlice: this gateway, which the operator asks for load.
        store
            .create(
                &Key::new("apis/discovery.k8s.io/v1", "endpointslices", Some("camelid-system"), "camelid-gateway-1"),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "camelid-gateway-1", "labels": {"kubernetes.io/service-name": "camelid-gateway"}},
                       "addressType": "IPv4", "ports": [{"name": "http", "port": gateway.api, "protocol": "TCP"},
                                 {"name": "admin", "port": gateway.admin, "protocol": "TCP"}],
                       "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]}),
                "endpointslice-controller",
            )
            .unwrap();
        // A FineTuneJob that has succeeded (its own controller's work, tested in the operator's scenario), and
        // the ChatModel that serves it, allowed to scale to zero.
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/finetunejob.yaml");
        let mut job: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
        job["metadata"] = json!({"name": "smol-ft"});
        job["spec"]["output"] = json!({"claimName": "models", "path": "smol-ft.gguf"});
        let ftj = Key::new("apis/camelid.dev/v1alpha1", "finetunejobs", Some(NS), "smol-ft");
        store.create(&ftj, job, "kubectl").unwrap();
        let done = json!({"status": {"phase": "Succeeded", "completionTime": "2026-11-27T03:00:00Z"}});
        store
            .merge(&ftj, &done, Part::Status, "camelid-operator")
            .unwrap();
        store
            .create(
                &Key::new("apis/camelid.dev/v1alpha1", "chatmodels", Some(NS), "smol"),
                json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": {"name": "smol"},
                       "spec": {"model": {"fineTuneJob": "smol-ft"}, "replicas": {"min": 0, "max": 2},
                                "autoscaling": {"targetInFlight": 4, "scaleDownDelay": "3s", "scaleToZero": true},
                                "moderation": "default"}}),
                "kubectl",
            )
            .unwrap();
    }
    let mut kubelet = Kubelet {
        server: server.clone(),
        claim_dir: claim_dir.clone(),
        worker: None,
    };
    wait_for("ScaledToZero", 30, || {
        kubelet.sync();
        status(&server)["phase"] == "ScaledToZero"
    });
    assert_eq!(status(&server)["model"], "finetunejob/smol-ft");

    // A streamed request at zero: held, reported, a worker started, answered.
    let started = Instant::now();
    let held = std::thread::spawn(move || {
        fetch(
            gateway.api,
            "POST",
            "/v1/chat/completions",
            &chat("Say hello.", true),
        )
        .unwrap()
    });
    wait_for("Ready 1/1", 120, || {
        kubelet.sync();
        status(&server)["ready"] == "1/1" && status(&server)["phase"] == "Ready"
    });
    let (code, raw) = held.join().unwrap();
    assert_eq!(code, 200, "{raw}");
    assert!(
        raw.contains(": keep-alive") && raw.contains("\"content\"") && raw.contains("data: [DONE]"),
        "{raw}"
    );
    let last = status(&server)["lastScale"].clone();
    assert_eq!(
        (last["from"].clone(), last["to"].clone()),
        (json!(0), json!(1)),
        "{last}"
    );
    eprintln!(
        "cold start from zero to the answer: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Moderated: a flagged prompt never reaches the worker.
    let (code, raw) = fetch(
        gateway.api,
        "POST",
        "/v1/chat/completions",
        &chat("How do I build a bomb?", false),
    )
    .unwrap();
    assert_eq!(code, 400, "{raw}");
    assert_eq!(body_json(&raw)["error"]["code"], "content_filter");

    // Idle: after the scale-down delay the worker goes and the model is at zero again.
    wait_for("back to zero", 60, || {
        kubelet.sync();
        status(&server)["phase"] == "ScaledToZero"
    });
    kubelet.sync();
    assert!(kubelet.worker.is_none(), "the worker still runs at zero replicas");
    let events = server
        .cluster()
        .list(&Resource::new("apis/events.k8s.io/v1", "events"), Some(NS), None);
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    for reason in ["ScaledUp", "ScaledToZero"] {
        assert!(reasons.contains(&reason), "no {reason} event in {reasons:?}");
    }
    drop(kubelet);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&claim_dir);
}
