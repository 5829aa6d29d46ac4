//! Where pods go: spot or on-demand nodes, per cloud. Each provider's spot pools carry a known label (and some a
//! taint); on-demand pods keep off those pools. Users' own labels and tolerations are added on top. At the crate
//! root because both controllers place pods: a FineTuneJob's attempts and a ChatModel's worker pools.

use std::collections::BTreeMap;

use camelid_crds::common::{SpotPolicy, SpotProvider};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Toleration,
};

/// Which capacity an attempt runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    Spot,
    OnDemand,
}

impl Capacity {
    pub fn as_str(self) -> &'static str {
        match self {
            Capacity::Spot => "spot",
            Capacity::OnDemand => "on-demand",
        }
    }
}

/// The scheduling fields of an attempt's pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Option<Affinity>,
}

/// The taint keys the operator's own tolerations name: the spot pools' (GKE, AKS) and the GPU nodes'. The
/// operator's policy allows users' tolerations of these by default ([`crate::policy::Policy`]).
pub const OPERATOR_TAINTS: &[&str] = &[
    "cloud.google.com/gke-spot",
    "kubernetes.azure.com/scalesetpriority",
    "nvidia.com/gpu",
];

/// The label that marks a provider's spot nodes, and its value there.
fn spot_label(provider: SpotProvider) -> Option<(&'static str, &'static str)> {
    match provider {
        SpotProvider::Gke => Some(("cloud.google.com/gke-spot", "true")),
        SpotProvider::Eks => Some(("eks.amazonaws.com/capacityType", "SPOT")),
        SpotProvider::Karpenter => Some(("karpenter.sh/capacity-type", "spot")),
        SpotProvider::Aks => Some(("kubernetes.azure.com/scalesetpriority", "spot")),
        SpotProvider::Custom => None,
    }
}

/// The taint a provider puts on its spot nodes (GKE and AKS do by default).
fn spot_taint(provider: SpotProvider) -> Option<(&'static str, &'static str)> {
    match provider {
        SpotProvider::Gke => Some(("cloud.google.com/gke-spot", "true")),
        SpotProvider::Aks => Some(("kubernetes.azure.com/scalesetpriority", "spot")),
        _ => None,
    }
}

/// The node label that holds the GPU model, per provider.
pub fn gpu_type_label(provider: Option<SpotProvider>) -> &'static str {
    match provider {
        Some(SpotProvider::Gke) => "cloud.google.com/gke-accelerator",
        _ => "nvidia.com/gpu.product",
    }
}

fn toleration(key: &str, value: &str) -> Toleration {
    Toleration {
        key: Some(key.into()),
        operator: Some("Equal".into()),
        value: Some(value.into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }
}

/// The placement of an attempt on `capacity` under `policy`, for pods that use `gpus` GPUs of `gpu_type`.
pub fn placement(policy: &SpotPolicy, capacity: Capacity, gpus: i32, gpu_type: Option<&str>) -> Placement {
    let mut p = Placement::default();
    let provider = policy.provider;
    match capacity {
        Capacity::Spot => {
            if let Some((key, value)) = provider.and_then(spot_label) {
                p.node_selector.insert(key.into(), value.into());
            }
            if let Some((key, value)) = provider.and_then(spot_taint) {
                p.tolerations.push(toleration(key, value));
            }
            p.node_selector.extend(policy.node_selector.clone());
            p.tolerations.extend(policy.tolerations.iter().cloned());
        }
        Capacity::OnDemand => {
            // Keep off the spot pools: the spot label must be absent or different.
            if let Some((key, value)) = provider.and_then(spot_label) {
                p.affinity = Some(Affinity {
                    node_affinity: Some(NodeAffinity {
                        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                            node_selector_terms: vec![NodeSelectorTerm {
                                match_expressions: Some(vec![NodeSelectorRequirement {
                                    key: key.into(),
                                    operator: "NotIn".into(),
                                    values: Some(vec![value.into()]),
                                }]),
                                ..NodeSelectorTerm::default()
                            }],
                        }),
                        ..NodeAffinity::default()
                    }),
                    ..Affinity::default()
                });
            }
            p.node_selector.extend(policy.on_demand_node_selector.clone());
        }
    }
    if gpus > 0 {
        // The NVIDIA device plugin's usual taint on GPU nodes.
        p.tolerations.push(Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
        if let Some(gpu_type) = gpu_type {
            p.node_selector
                .insert(gpu_type_label(provider).into(), gpu_type.into());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(provider: SpotProvider) -> SpotPolicy {
        SpotPolicy {
            provider: Some(provider),
            ..SpotPolicy::default()
        }
    }

    #[test]
    fn spot_attempts_select_and_tolerate_each_clouds_spot_pools() {
        let p = placement(&policy(SpotProvider::Gke), Capacity::Spot, 1, Some("nvidia-l4"));
        assert_eq!(p.node_selector["cloud.google.com/gke-spot"], "true");
        assert_eq!(p.node_selector["cloud.google.com/gke-accelerator"], "nvidia-l4");
        assert!(
            p.tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("cloud.google.com/gke-spot"))
        );
        assert!(
            p.tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
        );
        let p = placement(&policy(SpotProvider::Eks), Capacity::Spot, 0, None);
        assert_eq!(p.node_selector["eks.amazonaws.com/capacityType"], "SPOT");
        assert!(
            p.tolerations.is_empty(),
            "EKS spot nodes are not tainted by default; no GPUs"
        );
        let p = placement(&policy(SpotProvider::Aks), Capacity::Spot, 0, None);
        assert_eq!(p.node_selector["kubernetes.azure.com/scalesetpriority"], "spot");
        assert_eq!(p.tolerations[0].value.as_deref(), Some("spot"));
    }

    #[test]
    fn on_demand_attempts_keep_off_spot_pools() {
        let p = placement(&policy(SpotProvider::Karpenter), Capacity::OnDemand, 0, None);
        assert!(p.node_selector.is_empty() && p.tolerations.is_empty());
        let term = &p
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (req.key.as_str(), req.operator.as_str()),
            ("karpenter.sh/capacity-type", "NotIn")
        );
        assert_eq!(req.values.as_deref(), Some(&["spot".to_string()][..]));
    }

    #[test]
    fn custom_pools_use_the_users_labels() {
        let mut pol = policy(SpotProvider::Custom);
        pol.node_selector.insert("pool".into(), "cheap-gpus".into());
        pol.on_demand_node_selector
            .insert("pool".into(), "reserved-gpus".into());
        assert_eq!(
            placement(&pol, Capacity::Spot, 0, None).node_selector["pool"],
            "cheap-gpus"
        );
        let od = placement(&pol, Capacity::OnDemand, 0, None);
        assert_eq!(od.node_selector["pool"], "reserved-gpus");
        assert!(od.affinity.is_none());
    }
}
