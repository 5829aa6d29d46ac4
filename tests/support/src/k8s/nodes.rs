//! Fake nodes that kwok keeps Ready: the labels, taints and GPU capacity of a cloud's node pools.

use serde_json::{Value, json};

/// The annotation (`key=value`) that tells kwok a node is its to run.
pub(crate) const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node=fake";

/// A node for kwok to manage.
#[derive(Debug, Clone, Default)]
pub struct FakeNode {
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// `(key, value, effect)`.
    pub taints: Vec<(String, String, String)>,
    pub gpus: u32,
    /// Left to the test, which plays its kubelet (runs its pods' containers as local processes and reports their
    /// status), instead of kwok.
    pub played_by_test: bool,
}

impl FakeNode {
    pub fn new(name: &str) -> FakeNode {
        FakeNode {
            name: name.into(),
            ..FakeNode::default()
        }
    }

    /// A node of a GKE spot pool: labelled and tainted as GKE does, so only pods that tolerate spot land there.
    pub fn gke_spot(name: &str) -> FakeNode {
        FakeNode::new(name)
            .label("cloud.google.com/gke-spot", "true")
            .taint("cloud.google.com/gke-spot", "true", "NoSchedule")
    }

    pub fn label(mut self, key: &str, value: &str) -> FakeNode {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> FakeNode {
        self.taints.push((key.into(), value.into(), effect.into()));
        self
    }

    /// A node whose kubelet the test plays: kwok leaves it and its pods alone.
    pub fn played_by_test(mut self) -> FakeNode {
        self.played_by_test = true;
        self
    }

    pub fn gpus(mut self, gpus: u32) -> FakeNode {
        self.gpus = gpus;
        self
    }

    /// The Node object, with capacity for the pods of a small cluster.
    pub fn manifest(&self) -> Value {
        let (key, value) = KWOK_ANNOTATION.split_once('=').unwrap_or_default();
        let mut labels: serde_json::Map<String, Value> =
            self.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        labels.insert("kubernetes.io/hostname".into(), json!(self.name));
        labels.insert("kubernetes.io/os".into(), json!("linux"));
        labels.insert("kubernetes.io/arch".into(), json!("amd64"));
        labels.insert("type".into(), json!("kwok"));
        let taints: Vec<Value> = self
            .taints
            .iter()
            .map(|(k, v, e)| json!({"key": k, "value": v, "effect": e}))
            .collect();
        let mut capacity = json!({"cpu": "64", "memory": "512Gi", "pods": "110"});
        if self.gpus > 0 {
            capacity["nvidia.com/gpu"] = json!(self.gpus.to_string());
        }
        let annotations = if self.played_by_test {
            json!({})
        } else {
            json!({key: value})
        };
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": annotations},
            "spec": {"taints": taints},
            "status": {"capacity": capacity, "allocatable": capacity},
        })
    }
}
