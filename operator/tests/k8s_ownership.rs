//! The operator against a real API server (with Pod Security admission on, as kube-apiserver has it by default):
//! - a ChatModel named like an existing Service it does not own: the operator applies nothing over it, creates no
//!   workers, and says so in the condition `Admitted=False` (reason `NameConflict`) and an Event; once the foreign
//!   Service is gone, it serves;
//! - a ChatModel whose spec asks for an image outside the operator's policy gets `Admitted=False` (reason
//!   `PolicyDenied`) naming `spec.image`, and nothing is created;
//! - in a namespace that enforces the "restricted" Pod Security Standard, the workers' pods are admitted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_common;

use camelid_test_support::k8s::{ControlPlane, FakeNode, wait_until};
use k8s_common::{admin_operator, cluster, events, names};
use serde_json::{Value, json};

const NS: &str = "team-a";

fn chatmodel(name: &str, namespace: &str, extra: Value) -> String {
    let mut spec = json!({"model": {"path": "/models/smol.gguf"}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    .to_string()
}

fn admitted(cp: &ControlPlane, name: &str, namespace: &str) -> Option<Value> {
    let st = cp.get_json(&["chatmodel", name, "-n", namespace])["status"].clone();
    st["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Admitted")
        .cloned()
}

#[test]
fn the_operator_never_takes_over_foreign_objects_refuses_denied_specs_and_meets_restricted_namespaces() {
    let cp = cluster(NS, &[], &[FakeNode::new("cpu-1")]);
    for ns in [NS, "locked"] {
        cp.kubectl(&["create", "namespace", ns]).unwrap();
    }
    cp.kubectl(&[
        "label",
        "namespace",
        "locked",
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ])
    .unwrap();
    // Another team's Service, named like the ChatModel about to be created.
    let foreign = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "smol", "namespace": NS, "labels": {"team": "b"}},
        "spec": {"selector": {"app": "billing"}, "ports": [{"port": 443, "name": "https"}]}});
    cp.apply(&foreign.to_string()).unwrap();
    let daemon = admin_operator(&cp, &[]);

    cp.apply(&chatmodel("smol", NS, json!({}))).unwrap();
    wait_until("the name conflict is reported", 60, || {
        admitted(&cp, "smol", NS).is_some_and(|c| c["reason"] == "NameConflict")
    });
    let condition = admitted(&cp, "smol", NS).unwrap();
    assert_eq!(condition["status"], "False");
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("Service smol") && message.contains("not controlled by this ChatModel smol"),
        "{message}"
    );
    let service = cp.get_json(&["service", "smol", "-n", NS]);
    assert_eq!(
        service["spec"]["selector"],
        json!({"app": "billing"}),
        "the Service was taken over"
    );
    assert!(service["metadata"]["ownerReferences"].is_null(), "{service}");
    assert!(
        names(&cp, &["deployments", "-n", NS]).is_empty(),
        "workers were created"
    );
    let conflicts = events(&cp, NS, "reason=NameConflict");
    assert!(conflicts.contains("NameConflict"), "{conflicts}");

    // A spec outside the operator's policy: refused, naming the field; nothing is built.
    cp.apply(&chatmodel(
        "miner",
        NS,
        json!({"image": "evil.example/miner:latest"}),
    ))
    .unwrap();
    wait_until("the policy denial is reported", 60, || {
        admitted(&cp, "miner", NS).is_some_and(|c| c["reason"] == "PolicyDenied")
    });
    let message = admitted(&cp, "miner", NS).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("spec.image") && message.contains("evil.example/miner"),
        "{message}"
    );
    assert!(
        cp.kubectl_output(&["get", "service", "miner", "-n", NS])
            .unwrap()
            .status
            .code()
            != Some(0)
    );

    // In a namespace enforcing the restricted Pod Security Standard, the workers' pods are admitted.
    cp.apply(&chatmodel("smol", "locked", json!({}))).unwrap();
    wait_until("the locked namespace's worker pod is created", 90, || {
        !names(&cp, &["pods", "-n", "locked", "-l", "camelid.dev/chatmodel=smol"]).is_empty()
    });
    let rejected = events(&cp, "locked", "reason=FailedCreate");
    assert!(!rejected.contains("PodSecurity"), "{rejected}");

    // The foreign Service goes: the ChatModel is served and the refusal cleared.
    cp.kubectl(&["delete", "service", "smol", "-n", NS]).unwrap();
    wait_until("the ChatModel is served once the name is free", 90, || {
        names(&cp, &["deployments", "-n", NS]) == ["smol-worker"] && admitted(&cp, "smol", NS).is_none()
    });
    let service = cp.get_json(&["service", "smol", "-n", NS]);
    assert_eq!(service["metadata"]["ownerReferences"][0]["kind"], "ChatModel");
    drop(daemon);
}
