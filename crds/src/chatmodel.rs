//! ChatModel: a model served by autoscaled workers behind the gateway (its controller is the ChatModel issue).

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ModelSource, SpotPolicy};
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
    printcolumn = r#"{"name": "ADAPTERS", "type": "integer", "jsonPath": ".status.adapterCount"}"#,
    printcolumn = r#"{"name": "ENDPOINT", "type": "string", "jsonPath": ".status.endpoint"}"#,
    printcolumn = r#"{"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name": "PREEMPTIONS", "type": "integer", "jsonPath": ".status.preemptions", "priority": 1}"#,
    printcolumn = r#"{"name": "MIGRATIONS", "type": "integer", "jsonPath": ".status.migrations", "priority": 1}"#,
    // `kubectl scale`, HorizontalPodAutoscalers and KEDA write `replicas.desired` through `/scale`; the operator
    // runs that many workers while `autoscaling.enabled` is false.
    scale(
        spec_replicas_path = ".spec.replicas.desired",
        status_replicas_path = ".status.desiredReplicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
// Only the built-in autoscaler needs `scaleToZero` to reach zero: with it off, `replicas.desired` (written by
// `kubectl scale`, an HPA or KEDA) may be 0 as soon as `replicas.min` allows it.
#[x_kube(validation = Rule::new("self.replicas.min > 0 || self.autoscaling.scaleToZero || !self.autoscaling.enabled")
    .message("replicas.min is 0: set autoscaling.scaleToZero to allow scaling to zero (or turn autoscaling.enabled off and scale through /scale)"))]
pub struct ChatModelSpec {
    /// The model to serve: a FineTuneJob's output, a path on a claim or in the image, or a URI (exactly one).
    pub model: ModelSource,
    /// The chat template prompts are rendered with: `vicuna_v1.1`, or unset for the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The bounds of the number of workers (default: min 1, max 1), and the number to run when the built-in
    /// autoscaler is off (`desired`, which the `/scale` subresource writes).
    #[serde(default)]
    pub replicas: Replicas,
    /// How the number of workers follows the gateways' load (default: the built-in autoscaler, 8 requests in
    /// flight per worker, 5m before scaling down, never to zero).
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// CPU and memory requests and limits per worker; `nvidia.com/gpu` comes from `gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// GPUs per worker (default 0: serve on CPU); sets the workers' `nvidia.com/gpu` requests and limits.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    /// The GPU model to run on when `gpus` > 0, e.g. `nvidia-l4`: a value of the node label
    /// `nvidia.com/gpu.product` (`cloud.google.com/gke-accelerator` on GKE). Unset: any GPU node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// Which workers run on spot nodes (default: none; all on the nodes the scheduler picks).
    #[serde(default)]
    pub spot: SpotPolicy,
    /// The gateway's moderation profile for this model (a profile name in the gateway's config). An API key's
    /// own profile takes precedence; unset: the gateway's default profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<String>,
    /// Names of the gateway's API keys that may use this model (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_keys: Vec<String>,
    /// LoRA adapters served over the model, each asked for by its name in a request's `model`. A FineTuneJob
    /// with `method: lora` adds its adapter here when it succeeds. Workers load adapters when first asked for
    /// one, without a restart.
    // The bounds keep the API server's cost estimate of the items' CEL rules within its budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<AdapterSpec>,
    /// The worker image (default: the operator's `--worker-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the worker image is pulled: `Always`, `IfNotPresent` or `Never` (unset: Kubernetes' default,
    /// `Always` for `:latest` and `IfNotPresent` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// The bounds of the number of workers, and how many to run when the built-in autoscaler is off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must not exceed replicas.max"))]
pub struct Replicas {
    /// The fewest workers (default 1); 0 needs `autoscaling.scaleToZero`, or the autoscaler off.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// The most workers (default 1); at least `min`.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// The workers to run while `autoscaling.enabled` is false (default 1), within `min` and `max`: a value
    /// outside runs the nearest bound instead of being refused, so that an HPA or KEDA with wider bounds of its
    /// own never fails to write it. The `/scale` subresource's replicas (`kubectl scale`, an HPA, KEDA). Ignored
    /// while the built-in autoscaler is on.
    // Defaulted, not optional: `/scale` shows an unset value as 0 replicas, and an HPA does not scale a target at 0.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub desired: i32,
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            min: 1,
            max: 1,
            desired: 1,
        }
    }
}

fn one() -> i32 {
    1
}

/// Request-driven autoscaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct Autoscaling {
    /// The operator's own autoscaler sets the workers from the gateways' load (default true). False: the
    /// operator runs `replicas.desired` workers, for `kubectl scale`, an HPA or KEDA to set through the `/scale`
    /// subresource; the other fields here are then unused.
    #[serde(default = "crate::common::default_true")]
    pub enabled: bool,
    /// Requests in flight (running or queued at the gateways) per worker the autoscaler aims for (default 8).
    #[serde(default = "default_target")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_in_flight: i32,
    /// How long load must stay low before workers are removed (default 5m; e.g. `90s`, `1h30m`): the highest
    /// recommendation of that window wins.
    #[serde(default = "default_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub scale_down_delay: String,
    /// Scale to zero workers after `scaleDownDelay` idle (default false; needs `replicas.min: 0`); the gateways
    /// hold requests while one starts.
    #[serde(default)]
    pub scale_to_zero: bool,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            enabled: true,
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

/// Whether a ChatModel serves: `Pending` (waiting for the model's files, e.g. its FineTuneJob), `Loading` (no
/// worker ready yet), `Ready` (every desired worker ready), `Degraded` (some), `ScaledToZero` (idle, no
/// workers; the gateways hold requests while one starts) or `Failed` (the model can never be served).
// No doc comments on the variants: see `PullPolicy`.
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
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct ScaleDecision {
    /// When the autoscaler decided.
    pub time: Time,
    /// Workers before.
    pub from: i32,
    /// Workers after.
    pub to: i32,
    /// Why, in words: the load against `targetInFlight`, or the idle time.
    pub reason: String,
}

/// A worker pod with a termination notice, still there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct LeavingWorker {
    /// The pod's name.
    pub pod: String,
    /// The pod's uid: a pod of the same name made later is another worker.
    pub uid: String,
    /// The node it runs on.
    pub node: String,
    /// The notice, in words: the node's termination taint, or that the node is gone.
    pub reason: String,
}

/// A LoRA adapter served over a ChatModel's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(validation = Rule::new("has(self.fineTuneJob) != has(self.path)")
    .message("an adapter names exactly one of fineTuneJob and path"))]
#[x_kube(validation = Rule::new("!has(self.claimName) || has(self.path)").message("claimName needs a path inside the claim"))]
pub struct AdapterSpec {
    /// The name requests use in `model`: 1 to 128 letters, digits and `-_.:`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    pub name: String,
    /// A FineTuneJob in this namespace with `method: lora`, whose exported adapter this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub fine_tune_job: Option<String>,
    /// A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) inside `claimName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("path must not contain '..'"))]
    pub path: Option<String>,
    /// The PersistentVolumeClaim `path` is on (default: the model's own claim). Workers mount it read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
}

/// An adapter the workers can load, resolved by the operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterStatus {
    /// Its name in requests.
    pub name: String,
    /// Its directory as the workers see it.
    pub path: String,
}

/// What is served, by how many workers, and the last scaling decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct ChatModelStatus {
    /// `Pending`, `Loading`, `Ready`, `Degraded`, `ScaledToZero` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ChatModelPhase>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Workers ready to serve (on-demand and spot together).
    #[serde(default)]
    pub ready_replicas: i32,
    /// Workers the model runs now: the autoscaler's choice, or `replicas.desired` within its bounds when the
    /// autoscaler is off; replacements of leaving workers come on top (`replacing`). The `/scale` subresource's
    /// status replicas.
    #[serde(default)]
    pub desired_replicas: i32,
    /// The workers' label selector (`app.kubernetes.io/component=worker,camelid.dev/chatmodel=NAME`), for the
    /// `/scale` subresource: an HPA finds the pods whose metrics it reads by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Workers started beside workers whose node has a termination notice, so that serving capacity is back
    /// before those nodes go; 0 once they are gone.
    #[serde(default)]
    pub replacing: i32,
    /// Worker pods that got a termination notice (a termination taint on their node, or their node gone), each
    /// counted once: spot preemptions, mostly.
    #[serde(default)]
    pub preemptions: i32,
    /// The streams the gateways moved off a worker that was going away or failing and continued on another,
    /// added up from the gateways' counts while the operator watched (what happens while no operator runs is
    /// not counted).
    #[serde(default)]
    pub migrations: i64,
    /// The workers with a termination notice that are still there, each already counted in `preemptions` (kept
    /// in the status so that a restarted operator counts none twice).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaving: Vec<LeavingWorker>,
    /// What is served: the FineTuneJob, path or URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The adapters the workers can load (the gateway loads each on a worker when first asked for it); an
    /// adapter whose source is not ready yet is left out, and named in `ModelAvailable`'s message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterStatus>,
    /// How many adapters are served, for `kubectl get`.
    #[serde(default)]
    pub adapter_count: i32,
    /// The model's name at the gateway's `/v1` API (the ChatModel's name; also its Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A fingerprint of the files served; when it changes, the workers roll to the new model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    /// `ModelAvailable`: the model's files can be served; `Ready`: at least one desired worker is ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last scaling decision and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleDecision>,
}
