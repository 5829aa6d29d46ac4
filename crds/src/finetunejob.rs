//! FineTuneJob: fine-tune a base model on a conversation dataset with N trainer pods, on spot capacity with
//! checkpoint-resume, reporting progress, preemptions, GPU-hours and cost in its status.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ModelSource, SpotPolicy, VolumePath};
use crate::evaluation::{EvaluationSpec, EvaluationStatus};

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
    printcolumn = r#"{"name": "EVAL", "type": "number", "jsonPath": ".status.evaluation.winRate"}"#,
    printcolumn = r#"{"name": "PREEMPTIONS", "type": "integer", "jsonPath": ".status.preemptions"}"#,
    printcolumn = r#"{"name": "LAST-CKPT", "type": "date", "jsonPath": ".status.lastCheckpoint.time"}"#,
    printcolumn = r#"{"name": "COST", "type": "string", "jsonPath": ".status.estimatedCost"}"#,
    printcolumn = r#"{"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(
    validation = Rule::new(
        "self.hyperparameters.globalBatch % (self.workers * (self.gpusPerWorker > 0 ? self.gpusPerWorker : 1) * self.hyperparameters.microBatch) == 0"
    ).message("hyperparameters.globalBatch must be a multiple of workers x gpusPerWorker x hyperparameters.microBatch (each GPU, or each worker without GPUs, takes whole micro-batches)"),
    validation = Rule::new("!has(self.baseModel.fineTuneJob)")
        .message("baseModel.fineTuneJob: a FineTuneJob trains from files; name the other job's output claim and path"),
    validation = Rule::new("!has(self.spot.baseOnDemand)")
        .message("spot.baseOnDemand is for ChatModels: a FineTuneJob's gang runs on one kind of capacity at a time"),
    validation = Rule::new("!has(self.lora) || (has(self.method) && self.method == 'Lora')")
        .message("lora settings need method: Lora")
)]
pub struct FineTuneJobSpec {
    /// The model to fine-tune: an HF directory or a GGUF file, on a claim, in the image, or downloaded from a
    /// URI.
    pub base_model: ModelSource,
    /// The training data: ShareGPT or OpenAI-style conversations, a JSON or JSONL file.
    pub dataset: VolumePath,
    /// The chat template conversations are rendered with: `vicuna_v1.1`, or unset for the model's own. A
    /// ChatModel created through `output.chatModel` serves with the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Training settings; each one left out takes its default (Vicuna's), so `{}` is valid.
    pub hyperparameters: Hyperparameters,
    /// `Full` (default: every weight, as Vicuna) or `Lora`: adapters on the frozen base, and the job's output is
    /// a PEFT adapter that `output.chatModel` serves beside the base instead of a new model.
    #[serde(default, skip_serializing_if = "TrainMethod::is_full")]
    pub method: TrainMethod,
    /// LoRA's settings (with `method: Lora`; each left out takes the trainer's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Trainer pods in the gang (default 1), each running one rank per GPU: the world size is `workers` x
    /// `gpusPerWorker`, or `workers` on CPU.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: i32,
    /// GPUs per trainer pod (default 1), one rank each; sets the pods' `nvidia.com/gpu` requests and limits.
    /// 0 trains on CPU, one rank per pod.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_worker: i32,
    /// The GPU model to run on, e.g. `nvidia-a100-80gb`: a value of the node label `nvidia.com/gpu.product`
    /// (`cloud.google.com/gke-accelerator` on GKE) and the key of its prices in the GPU prices ConfigMap.
    /// Unset: any GPU node, and no `status.estimatedCost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// Spot scheduling and when attempts fall back to on-demand nodes (default: prefer spot, on-demand after
    /// 3 preemptions or 10m without spot nodes).
    #[serde(default)]
    pub spot: SpotPolicy,
    /// Where checkpoints go and how often; a new attempt resumes from the newest one.
    pub checkpoints: CheckpointSpec,
    /// Where the exported model goes, and the ChatModel to serve it with.
    pub output: OutputSpec,
    /// The promotion gate (unset: none): after training, the model is compared with a baseline by a judge, and
    /// `output.chatModel` is created only when it wins often enough; otherwise the job ends `Rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationSpec>,
    /// The trainer image (default: the operator's `--trainer-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the trainer image is pulled: `Always`, `IfNotPresent` or `Never` (unset: Kubernetes' default,
    /// `Always` for `:latest` and `IfNotPresent` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// The PriorityClass of the trainer pods (unset: the cluster's default priority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Restarts after real failures (not preemptions) before the job fails (default 3). A trainer that
    /// rejects its arguments, config or data (exit code 2) fails the job at once.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: i32,
    /// CPU and memory requests and limits per trainer pod; `nvidia.com/gpu` comes from `gpusPerWorker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn one() -> i32 {
    1
}

fn default_max_restarts() -> i32 {
    3
}

/// What a FineTuneJob trains.
// No doc comments on the variants: see `PullPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TrainMethod {
    #[default]
    Full,
    Lora,
}

impl TrainMethod {
    pub fn is_full(&self) -> bool {
        *self == TrainMethod::Full
    }
}

/// LoRA adapters' settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct LoraSpec {
    /// The adapters' rank (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: Option<i32>,
    /// The adapters' scale is alpha / rank (default alpha 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' inputs while training (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 0.99))]
    pub dropout: Option<f64>,
    /// The projections that get adapters: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj`, or `all-linear` (default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_modules: Vec<String>,
    /// Also export the base with the adapter merged in (`<output>/merged`); always on with `evaluation`, which
    /// judges the merged model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<bool>,
}

/// When the kubelet pulls a container image (Kubernetes' `imagePullPolicy`): `Always` on every container
/// start, `IfNotPresent` when the node lacks it, `Never` (it must be on the node already).
// No doc comments on the variants: they would turn the schema's `enum` into a `oneOf`, and an optional field of
// this type would lose `null` from its allowed values (the API server checks a null against `enum` too).
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

/// Training settings (Vicuna's defaults where unset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(
    validation = Rule::new("!(has(self.epochs) && has(self.maxSteps))").message("set epochs or maxSteps, not both"),
    validation = Rule::new("self.microBatch <= self.globalBatch").message("microBatch must not exceed globalBatch")
)]
pub struct Hyperparameters {
    /// Peak learning rate of the cosine schedule, reached after warmup (default 2e-5); trainer flag
    /// `--learning-rate`.
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: f64,
    /// Passes over the dataset, fractions allowed (default 3). Not together with `maxSteps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1000.0))]
    pub epochs: Option<f64>,
    /// Train exactly this many optimizer steps instead of a number of epochs; the learning-rate schedule is
    /// computed from it. Not together with `epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// Sequences per optimizer step over all ranks (default 128): a multiple of `workers` x `gpusPerWorker` x
    /// `microBatch`; the quotient is the gradient accumulation steps.
    #[serde(default = "default_global_batch")]
    #[schemars(range(min = 1, max = 65536))]
    pub global_batch: i32,
    /// Sequences per forward pass on one rank (default 2); lower it when a GPU runs out of memory.
    #[serde(default = "default_micro_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch: i32,
    /// Tokens per sequence (default 2048); longer conversations are truncated.
    #[serde(default = "default_max_length")]
    #[schemars(range(min = 16, max = 131072))]
    pub max_length: i32,
    /// Share of the steps spent warming the learning rate up from 0 to `learningRate` (default 0.03).
    #[serde(default = "default_warmup")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: f64,
    /// Seeds data order and sampling (default 42): the same seed and data give the same run.
    #[serde(default = "default_seed")]
    pub seed: i64,
    /// Put each micro-batch's conversations back to back in one sequence, attention kept within each, instead
    /// of padding them to the longest (default true): the same loss, without computing padding. Trainer flag
    /// `--packing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
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
            packing: None,
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
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct CheckpointSpec {
    /// A ReadWriteMany PersistentVolumeClaim in the job's namespace (all workers write their shards to it).
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The folder inside the claim (default: `checkpoints/<job name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Optimizer steps between checkpoints (default 200): at most this much work is lost to a preemption
    /// without notice (with notice the trainer checkpoints before it stops).
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1))]
    pub interval_steps: i64,
    /// Complete checkpoints kept (default 2); 0 keeps only the newest while training and deletes it after the
    /// export.
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
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct OutputSpec {
    /// A PersistentVolumeClaim in the job's namespace the exported model is written to.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The folder inside the claim (default: `models/<job name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The name of a ChatModel to create, or to point at this job, when the job succeeds: after training, or with
    /// `evaluation`, once the model passes its promotion gate (unset: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_model: Option<String>,
}

/// Where a FineTuneJob is: `Pending` (an attempt's pods are starting), `Running` (training), `Recovering` (a
/// new attempt after a preemption or failure, resuming from the last checkpoint), `Evaluating` (the model is
/// exported and the promotion gate runs), `Succeeded` (the model is exported, and passed the gate if there is
/// one), `Rejected` (the model lost to its baseline: exported but not served) or `Failed` (`maxRestarts`
/// reached, the trainer rejected its input, or the evaluation could not be run).
// No doc comments on the variants: see `PullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FineTuneJobPhase {
    Pending,
    Running,
    Recovering,
    Evaluating,
    Succeeded,
    Rejected,
    Failed,
}

impl FineTuneJobPhase {
    /// The name Kubernetes and `kubectl get` show (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            FineTuneJobPhase::Pending => "Pending",
            FineTuneJobPhase::Running => "Running",
            FineTuneJobPhase::Recovering => "Recovering",
            FineTuneJobPhase::Evaluating => "Evaluating",
            FineTuneJobPhase::Succeeded => "Succeeded",
            FineTuneJobPhase::Rejected => "Rejected",
            FineTuneJobPhase::Failed => "Failed",
        }
    }
}

/// The checkpoint an attempt would resume from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct CheckpointRef {
    /// The optimizer step the checkpoint holds.
    pub step: i64,
    /// When it was written.
    pub time: Time,
}

/// What the job is doing, what it cost, and what preemptions threw away.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct FineTuneJobStatus {
    /// `Pending`, `Running`, `Recovering` (a new attempt after a preemption or failure), `Evaluating` (the
    /// promotion gate runs), `Succeeded`, `Rejected` (the model lost to its baseline; annotate the job
    /// `camelid.dev/promote: "true"` to serve it anyway) or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FineTuneJobPhase>,
    /// `Ready`: True once the model is exported (and passed its evaluation); its reason is the phase, its message
    /// `message`. `Evaluated` (with `spec.evaluation`): True when the model passed the promotion gate, False with
    /// reason `Rejected` (it lost) or `EvaluationFailed` (the gate could not run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `step/total (percent)`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Optimizer steps done, as the trainer reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// Optimizer steps in the whole run (from `epochs` or `maxSteps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// Passes over the dataset done so far (fractional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// The latest training loss the trainer reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Training throughput, in tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// The trainer's estimate of the seconds until training ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// The newest complete checkpoint: the one the next attempt resumes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,
    /// The current attempt (a gang of pods); every restart starts a new one.
    #[serde(default)]
    pub attempt: i32,
    /// `spot` or `on-demand`: where the current attempt runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Attempts ended by spot preemption or a lost node; after `spot.maxPreemptions` of them attempts run on
    /// on-demand nodes. They do not count against `maxRestarts`.
    #[serde(default)]
    pub preemptions: i32,
    /// Restarts after real failures (count against `maxRestarts`).
    #[serde(default)]
    pub restarts: i32,
    /// GPU-hours used on spot nodes: GPUs x time while the attempts' pods run, counted in whole minutes.
    #[serde(default)]
    pub gpu_hours_spot: f64,
    /// GPU-hours used on on-demand nodes, counted like `gpuHoursSpot`.
    #[serde(default)]
    pub gpu_hours_on_demand: f64,
    /// GPU-hours of work lost to preemptions: workers x GPUs x time since the last checkpoint, at each one.
    #[serde(default)]
    pub lost_gpu_hours: f64,
    /// The cost so far, e.g. `$12.40`: GPU-hours on spot and on-demand nodes at the prices of `gpuType` in
    /// the GPU prices ConfigMap (unset without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost: Option<String>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// GPU time is counted up to here (while the attempt's pods run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounted_until: Option<Time>,
    /// When the job succeeded, was rejected or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Where the exported model is (`pvc://claim/path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// What the promotion gate found: the win rate against the baseline and its interval, the verdicts, the
    /// report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationStatus>,
    /// The last thing that happened, in words: why an attempt restarted, why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
