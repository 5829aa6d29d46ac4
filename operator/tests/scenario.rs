//! `kubectl apply -f examples/finetunejob.yaml` through the unmodified operator (`camelid_operator::run::run`,
//! with leader election) against the in-memory API server, the test playing the rest of the cluster: the Job
//! controller's pods, the nodes, spot preemptions, and the trainer's `/progress`.
//!
//! The job starts on spot → progress reaches its status → the operator is killed and restarted (no duplicate
//! children) → steady reconciles write nothing → three preemptions (a `DisruptionTarget`, the trainer's exit code
//! 75, a node gone) each restart the gang with `preemptions` + 1 and lost GPU-hours → the third moves it to
//! on-demand → every rank succeeds → the ChatModel is created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use camelid_crds::FineTuneJob;
mod common;

use camelid_memory_apiserver::MemoryApiServer;
use camelid_memory_apiserver::store::{Key, Part, Resource};
use common::{NS, client, eventually, json_server};
use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

/// A trainer's `/progress`, whose document the test sets.
async fn progress_server() -> (u16, std::sync::Arc<std::sync::Mutex<Value>>) {
    json_server(
        "/progress",
        json!({"phase": "loading", "step": 0, "total_steps": 0, "epoch": 0.0, "loss": null, "learning_rate": 0.0,
               "tokens_per_second": 0.0, "last_checkpoint": null, "eta_seconds": null}),
    )
    .await
}

struct Scenario {
    /// The FineTuneJob's name.
    name: &'static str,
    server: MemoryApiServer,
    client: Client,
    progress_port: u16,
}

impl Scenario {
    fn start_operator(&self) -> tokio::task::JoinHandle<()> {
        let args = camelid_operator::run::RunArgs {
            namespace: "camelid-system".into(),
            gpu_prices: Some("gpu-prices".into()),
            trainer_image: "camelid-trainer:test".into(),
            fetch_image: "curl:test".into(),
            autoscale_seconds: 1,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            health_addr: "127.0.0.1:0".parse().unwrap(),
            leader_election: true,
            progress_port: self.progress_port,
            progress_poll_seconds: 1,
            ..camelid_operator::run::RunArgs::default()
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            camelid_operator::run::run(args, client).await.unwrap();
        })
    }

    fn job(&self, attempt: i32) -> Job {
        let name = format!("{}-a{attempt}", self.name);
        let job = self
            .server
            .cluster()
            .get(&Key::new("apis/batch/v1", "jobs", Some(NS), &name))
            .cloned();
        serde_json::from_value(job.unwrap_or_else(|| panic!("no Job {name}"))).unwrap()
    }

    fn ftj(&self) -> Value {
        self.server
            .cluster()
            .get(&Key::new(
                "apis/camelid.dev/v1alpha1",
                "finetunejobs",
                Some(NS),
                self.name,
            ))
            .cloned()
            .unwrap()
    }

    fn status(&self) -> Value {
        self.ftj()["status"].clone()
    }

    fn jobs(&self) -> Vec<String> {
        let store = self.server.cluster();
        store
            .list(&Resource::new("apis/batch/v1", "jobs"), Some(NS), None)
            .iter()
            .map(|j| j["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// What the Job controller and kubelet do: the attempt's pods, bound to `nodes`, running with rank 0's
    /// progress reachable on loopback.
    fn run_pods(&self, attempt: i32, nodes: &[&str]) {
        let mut store = self.server.cluster();
        let job_name = format!("{}-a{attempt}", self.name);
        let job = store
            .get(&Key::new("apis/batch/v1", "jobs", Some(NS), &job_name))
            .cloned()
            .unwrap();
        for node in nodes {
            let _ = store.create(
                &Key::new("api/v1", "nodes", None, node),
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
                "kubelet",
            );
        }
        for (index, node) in nodes.iter().enumerate() {
            let mut labels = job["spec"]["template"]["metadata"]["labels"].clone();
            labels["batch.kubernetes.io/job-completion-index"] = json!(index.to_string());
            let name = format!("{job_name}-{index}");
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": labels,
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                        "uid": job["metadata"]["uid"], "controller": true}]},
                "spec": job["spec"]["template"]["spec"].clone()});
            let k = Key::new("api/v1", "pods", Some(NS), &name);
            store.create(&k, pod, "job-controller").unwrap();
            store
                .merge(&k, &json!({"spec": {"nodeName": node}}), Part::Main, "scheduler")
                .unwrap();
            store
                .merge(
                    &k,
                    &json!({"status": {"phase": "Running", "podIP": "127.0.0.1"}}),
                    Part::Status,
                    "kubelet",
                )
                .unwrap();
        }
    }

    fn set_pod_status(&self, name: &str, status: Value) {
        self.server
            .cluster()
            .merge(
                &Key::new("api/v1", "pods", Some(NS), name),
                &json!({"status": status}),
                Part::Status,
                "kubelet",
            )
            .unwrap();
    }

    fn delete_node(&self, node: &str) {
        self.server
            .cluster()
            .delete(&Key::new("api/v1", "nodes", None, node))
            .unwrap();
    }

    async fn wait_attempt(&self, attempt: i32) {
        let job = format!("{}-a{attempt}", self.name);
        let previous = format!("{}-a{}", self.name, attempt - 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(self.jobs() == [job.clone()] && self.status()["attempt"] == json!(attempt)) {
            assert!(
                Instant::now() < deadline,
                "attempt {attempt} did not replace the last: jobs {:?}, status {}",
                self.jobs(),
                self.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!self.jobs().contains(&previous));
        let pods = self.server.cluster().list(
            &Resource::new("api/v1", "pods"),
            Some(NS),
            Some(&format!("camelid.dev/attempt={}", attempt - 1)),
        );
        assert!(
            pods.is_empty(),
            "the preempted attempt's pods are gone with its Job"
        );
    }
}

fn terminated(code: i32) -> Value {
    json!([{"name": "trainer", "ready": false, "restartCount": 0, "image": "camelid-trainer:test", "imageID": "",
        "state": {"terminated": {"exitCode": code}}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finetunejob_survives_preemptions_moves_to_on_demand_and_publishes_its_model() {
    let server = MemoryApiServer::start().await.unwrap();
    let client = client(&server);
    let (progress_port, progress) = progress_server().await;
    let s = Scenario {
        name: "vicuna-smol",
        server,
        client: client.clone(),
        progress_port,
    };
    s.server
        .cluster()
        .create(
            &Key::new("api/v1", "configmaps", Some("camelid-system"), "gpu-prices"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gpu-prices"},
                   "data": {"nvidia-l4.spot": "0.22", "nvidia-l4.on-demand": "0.71"}}),
            "helm",
        )
        .unwrap();
    // A malformed FineTuneJob (as if written before a schema change): it gets an Event, and breaks nothing.
    s.server
        .cluster()
        .create(
            &Key::new("apis/camelid.dev/v1alpha1", "finetunejobs", Some(NS), "broken"),
            json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "broken"},
                   "spec": {"workers": "two"}}),
            "old-client",
        )
        .unwrap();
    let mut operator = s.start_operator();

    // kubectl apply -f examples/finetunejob.yaml
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml");
    let ftj: FineTuneJob = serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), NS);
    api.patch("vicuna-smol", &PatchParams::apply("kubectl"), &Patch::Apply(&ftj))
        .await
        .unwrap();

    eventually("attempt 1 starts on spot", || {
        let jobs = s.jobs();
        async move { jobs == ["vicuna-smol-a1"] }
    })
    .await;
    let job = s.job(1);
    assert_eq!(
        job.metadata.labels.as_ref().unwrap()["camelid.dev/capacity"],
        "spot"
    );
    assert_eq!(s.status()["phase"], "Pending");

    // Running, with progress.
    s.run_pods(1, &["spot-1", "spot-2"]);
    let checkpoint_time = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    *progress.lock().unwrap() = json!({"phase": "training", "step": 100, "total_steps": 400, "epoch": 0.75,
        "loss": 1.5, "learning_rate": 2e-5, "tokens_per_second": 5000.0, "eta_seconds": 1800.0,
        "last_checkpoint": {"step": 100, "time": checkpoint_time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()}});
    eventually("progress reaches the status", || {
        let st = s.status();
        async move { st["phase"] == "Running" && st["progress"] == "100/400 (25%)" && st["loss"] == 1.5 }
    })
    .await;
    assert_eq!(s.status()["lastCheckpoint"]["step"], 100);

    // Killed and restarted mid-run: it takes the lease back, and creates nothing twice.
    operator.abort();
    let _ = operator.await;
    operator = s.start_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.jobs(), ["vicuna-smol-a1"]);
    let services = s
        .server
        .cluster()
        .list(&Resource::new("api/v1", "services"), Some(NS), None)
        .len();
    assert_eq!(services, 1);
    // Steady state: reconciles (one a second) write nothing (the lease's renewals aside).
    let counted = ["finetunejobs", "jobs", "services", "pods", "chatmodels"];
    let writes = || {
        counted
            .iter()
            .map(|p| s.server.cluster().writes_to(p))
            .sum::<u64>()
    };
    let before = writes();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        writes(),
        before,
        "steady reconciles wrote: {:?}",
        s.server.cluster().writes
    );

    // Preemption 1: the spot node reclaims a pod (DisruptionTarget), and the node goes.
    let attempt_start: jiff::Timestamp = s.status()["attemptStartTime"].as_str().unwrap().parse().unwrap();
    let preempted_at = jiff::Timestamp::now();
    s.set_pod_status("vicuna-smol-a1-1", json!({"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]}));
    s.wait_attempt(2).await;
    let st = s.status();
    assert_eq!(
        (
            st["preemptions"].clone(),
            st["restarts"].clone(),
            st["phase"].clone()
        ),
        (json!(1), json!(0), json!("Recovering"))
    );
    // The checkpoint (60 s old) predates this attempt, so the work lost is every GPU since the attempt started.
    let lost = st["lostGpuHours"].as_f64().unwrap();
    let expected = 8.0 * preempted_at.duration_since(attempt_start).as_secs_f64() / 3600.0;
    assert!(
        (lost - expected).abs() <= 8.0 * 3.0 / 3600.0,
        "lost {lost} GPU-hours, expected about {expected}"
    );
    assert!(lost > 0.0);

    // Preemption 2: the trainer checkpoints on SIGTERM and exits 75.
    s.run_pods(2, &["spot-3", "spot-4"]);
    s.set_pod_status(
        "vicuna-smol-a2-0",
        json!({"phase": "Failed", "containerStatuses": terminated(75)}),
    );
    s.wait_attempt(3).await;
    assert_eq!(s.status()["preemptions"], 2);
    let job = s.job(3);
    assert_eq!(
        job.metadata.labels.as_ref().unwrap()["camelid.dev/capacity"],
        "spot"
    );

    // Preemption 3: a node vanishes. maxPreemptions is 3: attempt 4 goes on-demand.
    s.run_pods(3, &["spot-5", "spot-6"]);
    s.delete_node("spot-6");
    s.wait_attempt(4).await;
    assert_eq!(s.status()["preemptions"], 3);
    assert_eq!(s.status()["capacity"], "on-demand");
    let job = s.job(4);
    assert_eq!(
        job.metadata.labels.as_ref().unwrap()["camelid.dev/capacity"],
        "on-demand"
    );
    let pod_spec = job.spec.unwrap().template.spec.unwrap();
    assert!(
        !pod_spec
            .node_selector
            .unwrap()
            .contains_key("cloud.google.com/gke-spot")
    );
    assert!(pod_spec.affinity.is_some(), "kept off spot pools");

    // Every rank finishes: the model is exported and served.
    s.run_pods(4, &["od-1", "od-2"]);
    for pod in ["vicuna-smol-a4-0", "vicuna-smol-a4-1"] {
        s.set_pod_status(
            pod,
            json!({"phase": "Succeeded", "containerStatuses": terminated(0)}),
        );
    }
    eventually("the job succeeds", || {
        let st = s.status();
        async move { st["phase"] == "Succeeded" }
    })
    .await;
    let st = s.status();
    assert_eq!(st["output"], "pvc://models/vicuna-smol");
    assert_eq!(st["restarts"], 0);
    assert!(st["estimatedCost"].as_str().unwrap().starts_with('$'));
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "True");
    let chat = s
        .server
        .cluster()
        .get(&Key::new(
            "apis/camelid.dev/v1alpha1",
            "chatmodels",
            Some(NS),
            "vicuna-smol",
        ))
        .cloned();
    let chat = chat.expect("the ChatModel is created");
    assert_eq!(chat["spec"]["model"], json!({"fineTuneJob": "vicuna-smol"}));
    // The ChatModel controller serves the exported model: its workers load it from the job's output claim.
    eventually("the ChatModel's workers and Service", || async {
        let store = s.server.cluster();
        store
            .get(&Key::new(
                "apis/apps/v1",
                "deployments",
                Some(NS),
                "vicuna-smol-worker",
            ))
            .is_some()
            && store
                .get(&Key::new("api/v1", "services", Some(NS), "vicuna-smol"))
                .is_some()
    })
    .await;
    let workers = s
        .server
        .cluster()
        .get(&Key::new(
            "apis/apps/v1",
            "deployments",
            Some(NS),
            "vicuna-smol-worker",
        ))
        .cloned()
        .unwrap();
    let args = workers["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert_eq!(args[1], "/camelid/volumes/models/vicuna-smol", "{args}");
    eventually("the ChatModel's status", || async {
        let store = s.server.cluster();
        let cm = store.get(&Key::new(
            "apis/camelid.dev/v1alpha1",
            "chatmodels",
            Some(NS),
            "vicuna-smol",
        ));
        cm.is_some_and(|cm| {
            cm["status"]["model"] == "finetunejob/vicuna-smol" && cm["status"]["phase"] == "Loading"
        })
    })
    .await;

    // Events were recorded for each step.
    let events = s
        .server
        .cluster()
        .list(&Resource::new("apis/events.k8s.io/v1", "events"), Some(NS), None);
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    for reason in [
        "AttemptStarted",
        "PhaseChanged",
        "Preempted",
        "Succeeded",
        "InvalidSpec",
    ] {
        assert!(reasons.contains(&reason), "no {reason} event in {reasons:?}");
    }
    operator.abort();
}

/// `kubectl apply` of a ChatModel serving the base and of `examples/finetunejob-lora.yaml`: when the LoRA job
/// succeeds its adapter joins the ChatModel's `spec.adapters` (the base it serves untouched), the ChatModel's
/// status lists where workers find it, and the workers are not restarted (the adapter is on the claim they
/// already mount; the gateway loads it on them when first asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_finetunejob_adds_its_adapter_to_the_running_chatmodel_of_its_base() {
    let server = MemoryApiServer::start().await.unwrap();
    let client = client(&server);
    let (progress_port, _progress) = progress_server().await;
    let s = Scenario {
        name: "sql-lora",
        server,
        client: client.clone(),
        progress_port,
    };
    let operator = s.start_operator();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob-lora.yaml");
    let ftj: FineTuneJob = serde_yaml_ng::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let base = json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
        "metadata": {"name": "smollm2", "namespace": NS, "annotations": {"camelid.dev/accept-adapters": "true"}},
        "spec": {"model": ftj.spec.base_model}});
    let models: Api<camelid_crds::ChatModel> = Api::namespaced(client.clone(), NS);
    models
        .patch("smollm2", &PatchParams::apply("kubectl"), &Patch::Apply(&base))
        .await
        .unwrap();
    let deployment = Key::new("apis/apps/v1", "deployments", Some(NS), "smollm2-worker");
    eventually("the base's workers", || {
        let found = s.server.cluster().get(&deployment).is_some();
        async move { found }
    })
    .await;
    let template = |s: &Scenario| s.server.cluster().get(&deployment).unwrap()["spec"]["template"].clone();
    let before = template(&s);
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), NS);
    api.patch("sql-lora", &PatchParams::apply("kubectl"), &Patch::Apply(&ftj))
        .await
        .unwrap();
    eventually("attempt 1 starts", || {
        let jobs = s.jobs();
        async move { jobs == ["sql-lora-a1"] }
    })
    .await;
    let args = s.job(1).spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    for flag in [
        "--method",
        "lora",
        "--lora-rank",
        "16",
        "--lora-target-modules",
        "all-linear",
    ] {
        assert!(args.iter().any(|a| a == flag), "{flag} not in {args:?}");
    }
    s.run_pods(1, &["gpu-1"]);
    s.set_pod_status(
        "sql-lora-a1-0",
        json!({"phase": "Succeeded", "containerStatuses": terminated(0)}),
    );
    eventually("the job succeeds", || {
        let st = s.status();
        async move { st["phase"] == "Succeeded" }
    })
    .await;
    let chat_key = Key::new("apis/camelid.dev/v1alpha1", "chatmodels", Some(NS), "smollm2");
    eventually("the adapter is listed and resolved", || {
        let cm = s.server.cluster().get(&chat_key).cloned().unwrap();
        async move {
            cm["status"]["adapters"]
                == json!([{"name": "sql-lora", "path": "/camelid/volumes/models/adapters/sql-lora"}])
                && cm["status"]["adapterCount"] == 1
        }
    })
    .await;
    let cm = s.server.cluster().get(&chat_key).cloned().unwrap();
    assert_eq!(
        cm["spec"]["adapters"],
        json!([{"name": "sql-lora", "fineTuneJob": "sql-lora"}])
    );
    assert_eq!(
        cm["spec"]["model"],
        json!({"claimName": "models", "path": "smollm2-135m-instruct"})
    );
    assert_eq!(template(&s), before, "the workers were not restarted");
    operator.abort();
}
