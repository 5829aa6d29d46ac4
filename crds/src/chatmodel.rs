//! ChatModel: a model served by autoscaled workers behind the gateway (its controller is the ChatModel issue).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::SpotProvider;
use crate::finetunejob::PullPolicy;

/// The ChatModel spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "camelid.dev",
    version = "v1alpha1",
    kind = "ChatModel",
    doc = "Serves a model with autoscaled workers behind camelid's OpenAI-compatible gateway.",
    namespaced,
    status = "ChatModelStatus",
    shortname = "cm",
    category = "camelid",
    printcolumn = r#"{"name": "READY", "type": "string", "jsonPath": ".status.ready"}"#,
    printcolumn = r#"{"name": "REPLICAS", "type": "integer", "jsonPath": ".status.desiredReplicas"}"#,
    printcolumn = r#"{"name": "MODEL", "type": "string", "jsonPath": ".status.model"}"#,
    printcolumn = r#"{"name": "ENDPOINT", "type": "string", "jsonPath": ".status.endpoint"}"#,
    printcolumn = r#"{"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas.min > 0 || self.autoscaling.scaleToZero")
    .message("replicas.min is 0: set autoscaling.scaleToZero to allow scaling to zero"))]
pub struct ChatModelSpec {
    pub model: ChatModelSource,
    /// The chat template: `vicuna_v1.1`, or unset for the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub replicas: Replicas,
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// CPU and memory per worker; GPUs come from `gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    #[serde(default)]
    pub spot: ServingSpot,
    /// The gateway's moderation profile for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<String>,
    /// Names of the gateway's API keys that may use this model (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// Where the model comes from: a FineTuneJob's output, a path on a claim (or in the image), or a URI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.fineTuneJob) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1")
        .message("set exactly one of fineTuneJob, path and uri"),
    validation = Rule::new("!has(self.claimName) || has(self.path)").message("claimName needs a path inside the claim")
)]
pub struct ChatModelSource {
    /// A FineTuneJob in this namespace; its exported model is served once it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub uri: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must not exceed replicas.max"))]
pub struct Replicas {
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for Replicas {
    fn default() -> Self {
        Self { min: 1, max: 1 }
    }
}

fn one() -> i32 {
    1
}

/// Request-driven autoscaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// In-flight requests per replica the autoscaler aims for.
    #[serde(default = "default_target")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_in_flight: i32,
    /// How long load must stay low before replicas are removed.
    #[serde(default = "default_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub scale_down_delay: String,
    /// Scale to zero replicas when idle (needs `replicas.min: 0`); the gateway holds requests while one starts.
    #[serde(default)]
    pub scale_to_zero: bool,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            target_in_flight: default_target(),
            scale_down_delay: default_delay(),
            scale_to_zero: false,
        }
    }
}

fn default_target() -> i32 {
    8
}

fn default_delay() -> String {
    "5m".into()
}

/// Spot for serving: a base of on-demand replicas, the rest on spot nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpot {
    /// Replicas always on on-demand nodes; replicas beyond them go to spot nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub base_on_demand: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<SpotProvider>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ChatModelPhase {
    Pending,
    Loading,
    Ready,
    Degraded,
    ScaledToZero,
    Failed,
}

impl ChatModelPhase {
    /// The name Kubernetes and `kubectl get` show (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            ChatModelPhase::Pending => "Pending",
            ChatModelPhase::Loading => "Loading",
            ChatModelPhase::Ready => "Ready",
            ChatModelPhase::Degraded => "Degraded",
            ChatModelPhase::ScaledToZero => "ScaledToZero",
            ChatModelPhase::Failed => "Failed",
        }
    }
}

/// The last scaling decision and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    pub time: Time,
    pub from: i32,
    pub to: i32,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatModelStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ChatModelPhase>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub desired_replicas: i32,
    /// What is served: the FineTuneJob, path or URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The model's name at the gateway's `/v1` API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleDecision>,
}
