//! Two operator processes with leader election against a real API server: one holds the `camelid-operator` Lease
//! and reconciles; killed (SIGKILL, no goodbye), the other takes the Lease over within its duration plus one retry,
//! carries on reconciling, and nothing is created twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_common;

use std::time::{Duration, Instant};

use camelid_test_support::k8s::{ControlPlane, Daemon, FakeNode, wait_until};
use k8s_common::{cluster, names, operator};
use serde_json::json;

const NS: &str = "default";

fn finetunejob(name: &str) -> String {
    json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": {"uri": "https://example.com/m.gguf"}, "dataset": {"path": "/data/d.json"},
                 "hyperparameters": {"maxSteps": 10}, "workers": 1, "gpusPerWorker": 0,
                 "spot": {"preferSpot": false},
                 "checkpoints": {"claimName": "training"}, "output": {"claimName": "models"}}})
    .to_string()
}

fn holder(cp: &ControlPlane) -> Option<String> {
    cp.get_json(&["lease", "camelid-operator", "-n", "camelid-system"])["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_standby_operator_takes_over_within_the_lease_and_nothing_is_created_twice() {
    let cp = cluster(NS, &["models", "training"], &[FakeNode::new("cpu-1")]);
    let mut operators: Vec<Daemon> = ["operator-a", "operator-b"]
        .iter()
        .map(|name| {
            operator(
                &cp,
                name,
                cp.kubeconfig(),
                &["--leader-election", "--progress-poll-seconds", "1"],
            )
        })
        .collect();
    wait_until("one operator holds the lease", 60, || holder(&cp).is_some());
    let leader = holder(&cp).unwrap();

    cp.apply(&finetunejob("first")).unwrap();
    wait_until("the leader starts the first job", 60, || {
        names(&cp, &["jobs", "-n", NS]) == ["first-a1"]
    });
    let standby = operators.iter().find(|d| d.name != leader).unwrap();
    assert!(
        !standby.log_text().contains("first"),
        "the standby reconciled while not leading:\n{}",
        standby.log_text()
    );

    let killed_at = Instant::now();
    operators.iter_mut().find(|d| d.name == leader).unwrap().kill();
    let lease_seconds =
        cp.get_json(&["lease", "camelid-operator", "-n", "camelid-system"])["spec"]["leaseDurationSeconds"]
            .as_u64()
            .unwrap();
    wait_until("the standby takes the lease", lease_seconds + 15, || {
        holder(&cp).is_some_and(|h| h != leader)
    });
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_secs(lease_seconds + 5),
        "took over after {took:?}"
    );
    eprintln!("standby took over {took:.1?} after the leader was killed (lease {lease_seconds} s)");

    cp.apply(&finetunejob("second")).unwrap();
    wait_until("the new leader starts the second job", 60, || {
        names(&cp, &["jobs", "-n", NS]) == ["first-a1", "second-a1"]
    });
    // A few more reconciles of both jobs: still one Job and one Service each.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(names(&cp, &["jobs", "-n", NS]), ["first-a1", "second-a1"]);
    assert_eq!(
        names(
            &cp,
            &[
                "services",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/managed-by=camelid-operator"
            ]
        )
        .len(),
        2
    );
    let st = cp.get_json(&["finetunejob", "first", "-n", NS])["status"].clone();
    assert_eq!(
        st["attempt"], 1,
        "the first job was not restarted by the takeover: {st}"
    );
}
