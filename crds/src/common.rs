//! Types both resources use: files on volumes, spot scheduling, conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Files on a volume: a path inside a PersistentVolumeClaim, or (without `claimName`) a path inside the
/// image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct VolumePath {
    /// A PersistentVolumeClaim in the resource's namespace, mounted read-only; unset: `path` is inside the
    /// container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The path inside the claim (or, without a claim, inside the container image).
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("path must not contain '..'"))]
    pub path: String,
}

/// Which cloud's spot node pools to use; sets the node labels and tolerations those pools carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SpotProvider {
    /// GKE Spot VMs (`cloud.google.com/gke-spot`).
    Gke,
    /// EKS managed node groups (`eks.amazonaws.com/capacityType: SPOT`).
    Eks,
    /// Karpenter (`karpenter.sh/capacity-type: spot`).
    Karpenter,
    /// AKS spot node pools (`kubernetes.azure.com/scalesetpriority: spot`).
    Aks,
    /// Your own pools: `nodeSelector` and `tolerations` pick them.
    Custom,
}

/// A model: a FineTuneJob's exported model (ChatModels only), a path on a claim (or in the image), or a URI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(
    validation = Rule::new("(has(self.fineTuneJob) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1")
        .message("set exactly one of fineTuneJob, path and uri"),
    validation = Rule::new("!has(self.claimName) || has(self.path)").message("claimName needs a path inside the claim"),
    validation = Rule::new("has(self.uri) || (!has(self.sha256) && !has(self.maxBytes))")
        .message("sha256 and maxBytes check a download: they need a uri")
)]
pub struct ModelSource {
    /// A FineTuneJob in this namespace, whose exported model a ChatModel serves once the job succeeds (a
    /// FineTuneJob's `baseModel` cannot name one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job: Option<String>,
    /// A PersistentVolumeClaim in this namespace that holds `path` (mounted read-only); unset: `path` is inside
    /// the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The HF model directory or `.gguf` file, inside `claimName` or the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An `https://` URL of a GGUF file, downloaded by an init container before the trainer or worker starts.
    /// Redirects are followed over https only. `http://` is refused unless the operator runs with
    /// `--allow-http-model-uris` (in-cluster or test mirrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub uri: Option<String>,
    /// The SHA-256 of the file at `uri`, 64 lowercase hex digits: a download that does not match fails and
    /// nothing is served or trained from it (unset: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// The most bytes the download of `uri` may have (unset: the operator's `--max-model-bytes`, which also
    /// caps this); a larger file fails the download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
}

/// How pods use spot capacity: a FineTuneJob's attempts (all on spot while the budget of preemptions and pending
/// time lasts, then on-demand), or a ChatModel's workers (a base on on-demand nodes, the rest on spot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(validation = Rule::new("!has(self.provider) || self.provider != 'custom' || (has(self.nodeSelector) && size(self.nodeSelector) > 0)")
    .message("a custom spot provider needs nodeSelector labels that pick its spot nodes"))]
pub struct SpotPolicy {
    /// Use spot nodes (default true): a FineTuneJob starts there and stays while the budget of preemptions and
    /// pending time lasts; a ChatModel puts its workers beyond `baseOnDemand` there. False: on-demand nodes only.
    #[serde(default = "default_true")]
    pub prefer_spot: bool,
    /// Which cloud's spot node pools to use (their node labels and tolerations); `custom` (or unset): only
    /// `nodeSelector` and `tolerations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<SpotProvider>,
    /// Extra node labels for spot attempts (all a `custom` provider has).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Extra tolerations for spot attempts (besides the provider's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node labels for on-demand attempts (custom pools); on-demand pods also keep off the provider's spot
    /// nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on_demand_node_selector: BTreeMap<String, String>,
    /// ChatModels only: workers always on on-demand nodes; workers beyond them go to spot nodes. Unset: all
    /// workers go to spot nodes when `provider` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub base_on_demand: Option<i32>,
    /// FineTuneJobs only: preemptions after which the next attempts go to on-demand nodes (default 3; 0: after
    /// the first).
    #[serde(default = "default_max_preemptions")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_preemptions: i32,
    /// FineTuneJobs only: how long a spot attempt's pods may wait unscheduled before the next attempt goes to
    /// on-demand nodes (default 10m; e.g. `90s`, `1h30m`).
    #[serde(default = "default_pending_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub pending_timeout: String,
}

impl Default for SpotPolicy {
    fn default() -> Self {
        Self {
            prefer_spot: true,
            provider: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            on_demand_node_selector: BTreeMap::new(),
            base_on_demand: None,
            max_preemptions: default_max_preemptions(),
            pending_timeout: default_pending_timeout(),
        }
    }
}

/// Joins the wrapped lines of the descriptions of a type and of its fields into one line each, keeping paragraph
/// breaks: doc comments wrap at the source's width, `kubectl explain` wraps at the terminal's. Every struct of the
/// CRDs names it in `#[schemars(transform = ...)]`.
pub(crate) fn unwrap_descriptions(schema: &mut schemars::Schema) {
    fn unwrap(description: Option<&mut serde_json::Value>) {
        if let Some(serde_json::Value::String(text)) = description {
            *text = text
                .split("\n\n")
                .map(|paragraph| paragraph.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n\n");
        }
    }
    unwrap(schema.get_mut("description"));
    if let Some(serde_json::Value::Object(properties)) = schema.get_mut("properties") {
        for property in properties.values_mut() {
            unwrap(property.get_mut("description"));
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}

fn default_max_preemptions() -> i32 {
    3
}

fn default_pending_timeout() -> String {
    "10m".into()
}

/// Parses a Kubernetes-style duration (`1h30m`, `90s`) into seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut number = String::new();
    if text.is_empty() {
        return None;
    }
    for c in text.chars() {
        match c {
            '0'..='9' => number.push(c),
            's' | 'm' | 'h' => {
                let n: u64 = number.parse().ok()?;
                number.clear();
                let unit = match c {
                    's' => 1,
                    'm' => 60,
                    _ => 3600,
                };
                total = total.checked_add(n.checked_mul(unit)?)?;
            }
            _ => return None,
        }
    }
    number.is_empty().then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes() {
        assert_eq!(parse_duration("10m"), Some(600));
        assert_eq!(parse_duration("1h30m"), Some(5400));
        assert_eq!(parse_duration("90s"), Some(90));
        for bad in ["", "10", "m", "1d", "1.5h", "-1m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
