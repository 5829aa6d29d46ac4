//! `examples/finetunejob.yaml` on spot capacity with Kubernetes' own controllers doing their part: the real Job
//! controller makes the Indexed Job's pods, the real scheduler places them on kwok's fake GKE nodes (a spot
//! attempt only on the spot pool, an on-demand attempt never there), the taint-eviction and pod-GC controllers react
//! to node changes. The operator runs as a local process.
//!
//! Four preemptions, one of each kind: a spot node's termination taint (the checkpoint-first path: the operator
//! deletes the pods with their grace period, the trainer writes its checkpoint and exits 75), a `DisruptionTarget`
//! condition (a NoExecute taint, so the taint-eviction controller evicts), the trainer's exit code 75 on its own,
//! and a node deleted. After `maxPreemptions` (3 in the example; the fourth kind is checked before it) the next
//! attempt is on-demand; when every rank succeeds, the ChatModel is created. Status, Events and the printer columns
//! are checked on the way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_common;

use std::collections::BTreeSet;

use camelid_test_support::k8s::{ControlPlane, FakeNode, wait_until};
use k8s_common::{admin_operator, cluster, events, names, table};
use serde_json::{Value, json};

const NS: &str = "default";

fn spot_node(name: &str) -> FakeNode {
    FakeNode::gke_spot(name)
        .label("cloud.google.com/gke-accelerator", "nvidia-l4")
        .gpus(4)
}

fn on_demand_node(name: &str) -> FakeNode {
    FakeNode::new(name)
        .label("cloud.google.com/gke-accelerator", "nvidia-l4")
        .gpus(4)
}

struct Cluster {
    cp: ControlPlane,
}

impl Cluster {
    fn status(&self) -> Value {
        self.cp.get_json(&["finetunejob", "vicuna-smol", "-n", NS])["status"].clone()
    }

    fn pods(&self, attempt: i32) -> Vec<Value> {
        let selector = format!("camelid.dev/finetunejob=vicuna-smol,camelid.dev/attempt={attempt}");
        self.cp.get_json(&["pods", "-n", NS, "-l", &selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for attempt `attempt` to be the only Job, with both ranks Running; returns their nodes.
    fn running(&self, attempt: i32) -> BTreeSet<String> {
        let job = format!("vicuna-smol-a{attempt}");
        wait_until(&format!("attempt {attempt}'s two pods run"), 90, || {
            let pods = self.pods(attempt);
            names(&self.cp, &["jobs", "-n", NS]) == [job.clone()]
                && pods.len() == 2
                && pods.iter().all(|p| {
                    p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
                })
        });
        wait_until(&format!("the status shows attempt {attempt} Running"), 60, || {
            let st = self.status();
            st["attempt"] == attempt && st["phase"] == "Running"
        });
        // Every pod is a trainer that writes its termination checkpoint on SIGTERM and exits 75.
        for pod in self.pods(attempt) {
            let name = pod["metadata"]["name"].as_str().unwrap();
            self.cp
                .kubectl(&[
                    "annotate",
                    "pod",
                    name,
                    "-n",
                    NS,
                    "kwok.camelid.dev/exit-on-sigterm=75",
                    "--overwrite",
                ])
                .unwrap();
        }
        self.pods(attempt)
            .iter()
            .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_string())
            .collect()
    }

    /// The pod of `rank` in attempt `attempt`.
    fn rank(&self, attempt: i32, rank: &str) -> Value {
        self.pods(attempt)
            .into_iter()
            .find(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == rank)
            .unwrap_or_else(|| panic!("no rank {rank} pod in attempt {attempt}"))
    }

    fn node_of(&self, attempt: i32, rank: &str) -> String {
        self.rank(attempt, rank)["spec"]["nodeName"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn pod_name(&self, attempt: i32, rank: &str) -> String {
        self.rank(attempt, rank)["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits for attempt `attempt` to replace the last, with `preemptions` counted, nothing counted as a failure,
    /// and the cause in the status message.
    fn restarted(&self, attempt: i32, preemptions: i32, cause: &str) {
        wait_until(
            &format!("attempt {attempt} after preemption {preemptions}"),
            // A node's preemption passes through the node lifecycle controller's grace periods; on a loaded 2-core
            // machine (load 10) one took over 90 s.
            180,
            || {
                let st = self.status();
                st["attempt"] == attempt && st["preemptions"] == preemptions
            },
        );
        let st = self.status();
        assert_eq!(st["restarts"], 0, "a preemption is not a failure: {st}");
        let message = st["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(cause),
            "attempt {attempt}: expected {cause:?} in {message:?}"
        );
        eprintln!("attempt {attempt}: {message}");
        let previous = format!("vicuna-smol-a{}", attempt - 1);
        wait_until(&format!("{previous} is deleted"), 60, || {
            !names(&self.cp, &["jobs", "-n", NS]).contains(&previous)
        });
    }

    fn events(&self) -> String {
        events(&self.cp, NS, "involvedObject.name=vicuna-smol")
    }
}

#[test]
fn a_finetunejob_survives_each_kind_of_preemption_on_real_controllers_and_publishes_its_model() {
    let nodes = [
        spot_node("spot-1"),
        spot_node("spot-2"),
        on_demand_node("od-1"),
        on_demand_node("od-2"),
    ];
    let cp = cluster(NS, &["models", "datasets", "training"], &nodes);
    cp.kubectl(&[
        "create",
        "configmap",
        "gpu-prices",
        "-n",
        "camelid-system",
        "--from-literal=nvidia-l4.spot=0.22",
        "--from-literal=nvidia-l4.on-demand=0.71",
    ])
    .unwrap();
    let c = Cluster { cp };
    let _operator = admin_operator(
        &c.cp,
        &[
            "--gpu-prices",
            "gpu-prices",
            "--progress-poll-seconds",
            "1",
            "--termination-grace-seconds",
            "30",
        ],
    );
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml"),
    )
    .unwrap();
    c.cp.apply(&example).unwrap();

    // Attempt 1 on the spot pool, placed by the scheduler.
    assert_eq!(c.running(1), ["spot-1", "spot-2"].map(String::from).into());
    assert_eq!(c.status()["capacity"], "spot");

    // Preemption 1, the checkpoint-first path: GKE's termination notice taint on a node. The operator deletes the
    // pod with its grace period; the trainer checkpoints and exits 75.
    let node = c.node_of(1, "0");
    c.cp.kubectl(&[
        "taint",
        "node",
        &node,
        "cloud.google.com/impending-node-termination=true:NoSchedule",
    ])
    .unwrap();
    c.restarted(2, 1, "stopped after a termination checkpoint");
    assert!(c.events().contains("CheckpointRequested"), "{}", c.events());
    // The tainted node is leaving: a new spot node takes its place, as a node pool would.
    c.cp.kubectl(&["delete", "node", &node]).unwrap();
    c.cp.add_node(&spot_node("spot-3")).unwrap();
    let nodes = c.running(2);
    assert!(
        nodes.iter().all(|n| n.starts_with("spot-")),
        "spot attempt on {nodes:?}"
    );

    // Preemption 2, a DisruptionTarget: a NoExecute taint the pods do not tolerate, so Kubernetes' taint-eviction
    // controller marks and evicts them.
    let node = c.node_of(2, "1");
    c.cp.kubectl(&["taint", "node", &node, "camelid.test/reclaimed=true:NoExecute"])
        .unwrap();
    c.restarted(3, 2, "was disrupted");
    c.cp.kubectl(&["delete", "node", &node]).unwrap();
    c.cp.add_node(&spot_node("spot-4")).unwrap();
    let nodes = c.running(3);
    assert!(
        nodes.iter().all(|n| n.starts_with("spot-")),
        "spot attempt on {nodes:?}"
    );

    // Preemption 3: the trainer exits 75 by itself (it got SIGTERM from the node's shutdown). That is the last
    // allowed on spot: attempt 4 goes on-demand.
    let pod = c.pod_name(3, "0");
    c.cp.kubectl(&["annotate", "pod", &pod, "-n", NS, "kwok.camelid.dev/exit-code=75"])
        .unwrap();
    c.restarted(4, 3, "stopped after a termination checkpoint");
    assert_eq!(c.status()["capacity"], "on-demand");
    let nodes = c.running(4);
    assert_eq!(
        nodes,
        ["od-1", "od-2"].map(String::from).into(),
        "an on-demand attempt never on spot"
    );

    // A node deleted under the on-demand attempt is a loss too (counted; the attempt stays on-demand).
    let node = c.node_of(4, "1");
    c.cp.kubectl(&["delete", "node", &node]).unwrap();
    c.cp.add_node(&on_demand_node("od-3")).unwrap();
    c.restarted(5, 4, "node is gone");
    assert_eq!(c.status()["capacity"], "on-demand");
    c.running(5);

    let row = &table(&c.cp.kubectl(&["get", "finetunejobs", "-n", NS]).unwrap())[0];
    let row: std::collections::BTreeMap<_, _> = row.iter().cloned().collect();
    assert_eq!(
        (row["PHASE"].as_str(), row["PREEMPTIONS"].as_str()),
        ("Running", "4")
    );
    assert!(row["COST"].starts_with('$'), "{row:?}");
    assert!(
        c.status()["lostGpuHours"].as_f64().unwrap() > 0.0,
        "{}",
        c.status()
    );

    // Every rank finishes: the job succeeds and its ChatModel appears.
    for pod in c.pods(5) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        c.cp.kubectl(&["annotate", "pod", name, "-n", NS, "kwok.camelid.dev/exit-code=0"])
            .unwrap();
    }
    wait_until("the job succeeds", 90, || c.status()["phase"] == "Succeeded");
    let st = c.status();
    assert_eq!(
        (st["output"].clone(), st["restarts"].clone()),
        (json!("pvc://models/vicuna-smol"), json!(0))
    );
    wait_until("the ChatModel is created", 30, || {
        names(&c.cp, &["chatmodels", "-n", NS]) == ["vicuna-smol"]
    });
    let events = c.events();
    for reason in ["AttemptStarted", "CheckpointRequested", "Preempted"] {
        assert!(events.contains(reason), "no {reason} Event in:\n{events}");
    }
}
