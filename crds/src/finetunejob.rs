//! FineTuneJob: fine-tune a base model on a conversation dataset with N trainer pods, on spot capacity with
//! checkpoint-resume, reporting progress, preemptions, GPU-hours and cost in its status.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{SpotPolicy, VolumePath};

/// The FineTuneJob spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "camelid.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    doc = "Fine-tunes a model on conversations with a gang of trainer pods on spot capacity, resuming from checkpoints after preemptions.",
    namespaced,
    status = "FineTuneJobStatus",
    shortname = "ftj",
    category = "camelid",
    printcolumn = r#"{"name": "PHASE", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "PROGRESS", "type": "string", "jsonPath": ".status.progress"}"#,
    printcolumn = r#"{"name": "LOSS", "type": "number", "jsonPath": ".status.loss"}"#,
    printcolumn = r#"{"name": "PREEMPTIONS", "type": "integer", "jsonPath": ".status.preemptions"}"#,
    printcolumn = r#"{"name": "LAST-CKPT", "type": "date", "jsonPath": ".status.lastCheckpoint.time"}"#,
    printcolumn = r#"{"name": "COST", "type": "string", "jsonPath": ".status.estimatedCost"}"#,
    printcolumn = r#"{"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.hyperparameters.globalBatch % (self.workers * (self.gpusPerWorker > 0 ? self.gpusPerWorker : 1) * self.hyperparameters.microBatch) == 0"
).message("hyperparameters.globalBatch must be a multiple of workers x gpusPerWorker x hyperparameters.microBatch (each GPU, or each worker without GPUs, takes whole micro-batches)"))]
pub struct FineTuneJobSpec {
    /// The model to fine-tune: an HF directory or a GGUF file.
    pub base_model: ModelSource,
    /// ShareGPT or OpenAI-style conversations, JSON or JSONL.
    pub dataset: VolumePath,
    /// The chat template: `vicuna_v1.1`, or unset for the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub hyperparameters: Hyperparameters,
    /// Trainer pods (one rank per GPU in each).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: i32,
    /// GPUs per trainer pod; 0 trains on CPU.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_worker: i32,
    /// The GPU type (a node label value, and the key of its price in the prices ConfigMap), e.g. `nvidia-a100-80gb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    #[serde(default)]
    pub spot: SpotPolicy,
    pub checkpoints: CheckpointSpec,
    pub output: OutputSpec,
    /// The trainer image (default: the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Real failures (not preemptions) before the job fails.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: i32,
    /// CPU and memory per trainer pod; GPUs come from `gpusPerWorker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn one() -> i32 {
    1
}

fn default_max_restarts() -> i32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The name Kubernetes and `kubectl get` show (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// A model: a path on a claim (or in the image), or a URI fetched before training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.path) != has(self.uri)").message("set exactly one of path and uri"),
    validation = Rule::new("!has(self.claimName) || has(self.path)").message("claimName needs a path inside the claim")
)]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An `http(s)://` URL of a GGUF file, downloaded by an init container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub uri: Option<String>,
}

/// Training settings (Vicuna's defaults where unset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.epochs) && has(self.maxSteps))").message("set epochs or maxSteps, not both"),
    validation = Rule::new("self.microBatch <= self.globalBatch").message("microBatch must not exceed globalBatch")
)]
pub struct Hyperparameters {
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub epochs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// Sequences per optimizer step, over all ranks.
    #[serde(default = "default_global_batch")]
    #[schemars(range(min = 1, max = 65536))]
    pub global_batch: i32,
    /// Sequences per forward pass on one rank.
    #[serde(default = "default_micro_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch: i32,
    /// Tokens per sequence.
    #[serde(default = "default_max_length")]
    #[schemars(range(min = 16, max = 131072))]
    pub max_length: i32,
    #[serde(default = "default_warmup")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: f64,
    #[serde(default = "default_seed")]
    pub seed: i64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            learning_rate: default_lr(),
            epochs: None,
            max_steps: None,
            global_batch: default_global_batch(),
            micro_batch: default_micro_batch(),
            max_length: default_max_length(),
            warmup_ratio: default_warmup(),
            seed: default_seed(),
        }
    }
}

fn default_lr() -> f64 {
    2e-5
}
fn default_global_batch() -> i32 {
    128
}
fn default_micro_batch() -> i32 {
    2
}
fn default_max_length() -> i32 {
    2048
}
fn default_warmup() -> f64 {
    0.03
}
fn default_seed() -> i64 {
    42
}

/// Where checkpoints go: a claim every attempt mounts, so a new gang resumes where the last one stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// A ReadWriteMany claim (all workers write their shards to it).
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The folder inside the claim (default: `checkpoints/<job name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Optimizer steps between checkpoints.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1))]
    pub interval_steps: i64,
    /// Complete checkpoints kept (0: delete them once the model is exported).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 0, max = 100))]
    pub keep: i32,
}

fn default_interval() -> i64 {
    200
}
fn default_keep() -> i32 {
    2
}

/// Where the exported model goes, and the ChatModel to serve it with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The folder inside the claim (default: `models/<job name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A ChatModel to create (or point at the new model) when the job succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_model: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FineTuneJobPhase {
    Pending,
    Running,
    Recovering,
    Succeeded,
    Failed,
}

impl FineTuneJobPhase {
    /// The name Kubernetes and `kubectl get` show (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            FineTuneJobPhase::Pending => "Pending",
            FineTuneJobPhase::Running => "Running",
            FineTuneJobPhase::Recovering => "Recovering",
            FineTuneJobPhase::Succeeded => "Succeeded",
            FineTuneJobPhase::Failed => "Failed",
        }
    }
}

/// The checkpoint an attempt would resume from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    pub step: i64,
    pub time: Time,
}

/// What the job is doing, what it cost, and what preemptions threw away.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FineTuneJobPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `step/total (percent)`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,
    /// The current attempt (a gang of pods); every restart starts a new one.
    #[serde(default)]
    pub attempt: i32,
    /// `spot` or `on-demand`: where the current attempt runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    #[serde(default)]
    pub preemptions: i32,
    /// Restarts after real failures (count against `maxRestarts`).
    #[serde(default)]
    pub restarts: i32,
    #[serde(default)]
    pub gpu_hours_spot: f64,
    #[serde(default)]
    pub gpu_hours_on_demand: f64,
    /// GPU-hours of work lost to preemptions: workers x GPUs x time since the last checkpoint, at each one.
    #[serde(default)]
    pub lost_gpu_hours: f64,
    /// From the GPU prices ConfigMap, e.g. `$12.40`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// GPU time is counted up to here (while the attempt's pods run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounted_until: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Where the exported model is (`pvc://claim/path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
