//! The promotion gate of a FineTuneJob (`spec.evaluation`): after training, the exported model answers a set of
//! questions next to a baseline, a judge model compares the answers pairwise, and the job's ChatModel is created
//! only when the fine-tune wins often enough. What the gate found is `status.evaluation`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The promotion gate: a fine-tune that loses to its baseline is not served. After training the operator runs an
/// evaluation Job (`<job>-eval`) that serves the new model and the baseline side by side, answers the questions
/// with both and has the judge compare each pair in both orders. The job's ChatModel is created only when the win
/// rate reaches `minWinRate`; otherwise the job is `Rejected`, its model stays on the output claim, and the
/// annotation `camelid.dev/promote: "true"` serves it anyway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct EvaluationSpec {
    /// The questions, in FastChat's `question.jsonl` format (MT-Bench's, or your own).
    pub questions: QuestionsSource,
    /// The judge: an OpenAI-compatible model that compares two answers.
    pub judge: JudgeSpec,
    /// What the fine-tune must beat (unset: the job's own `baseModel`; one given as a path inside the trainer
    /// image must be inside the evaluation `image` too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineSpec>,
    /// The least win rate that passes (default 0.5: at least as good as the baseline), a tie counting as half a
    /// win: (wins + ties / 2) / (wins + ties + losses).
    #[serde(default = "default_min_win_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_win_rate: f64,
    /// Requests in flight to each model and to the judge (default 8); gate flag `--concurrency`.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: i32,
    /// Most tokens in each answer (default 512); gate flag `--max-tokens`.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_tokens: i32,
    /// Answer only the first this many questions of the file (unset: all); gate flag `--max-questions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_questions: Option<i32>,
    /// The image with the `camelid` command that serves both models and runs the gate (default: the operator's
    /// `--eval-image`, itself the worker image unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU, memory and GPU requests and limits of each of the two model servers (the candidate's and the
    /// baseline's get the same); the gate itself only sends requests. GPUs here place the pod on GPU nodes of the
    /// job's `gpuType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_min_win_rate() -> f64 {
    0.5
}

fn default_concurrency() -> i32 {
    8
}

fn default_max_tokens() -> i32 {
    512
}

/// Where the questions file is: a path on a PersistentVolumeClaim, or a key of a ConfigMap (exactly one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
#[x_kube(validation = Rule::new(
    "has(self.configMap) ? !has(self.claimName) && !has(self.path) : has(self.claimName) && has(self.path)"
).message("evaluation.questions: set claimName and path (a file on a claim) or configMap, exactly one"))]
pub struct QuestionsSource {
    /// A PersistentVolumeClaim in the job's namespace holding the file at `path` (mounted read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The file inside `claimName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("path must not contain '..'"))]
    pub path: Option<String>,
    /// A ConfigMap key holding the file (small question sets; a ConfigMap holds at most 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
}

/// One key of a ConfigMap in the job's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct ConfigMapKey {
    /// The ConfigMap's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key whose value is the file.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The judge model, behind an OpenAI-compatible API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct JudgeSpec {
    /// The API's base URL, ending in `/v1` (e.g. `https://api.openai.com/v1`); gate flag `--judge-url`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// The judge's model name, e.g. `gpt-4`; gate flag `--judge-model`. It cannot start with `-` (it would read
    /// as a flag).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[^-]"))]
    pub model: String,
    /// The Secret key holding the API key (unset: requests carry no key). The operator never reads it: the
    /// evaluation pod gets it as an environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKey>,
    /// Most tokens in each judgment (unset: FastChat's 2048); gate flag `--judge-max-tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_tokens: Option<i32>,
}

/// One key of a Secret in the job's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct SecretKey {
    /// The Secret's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key whose value is the API key.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The model the fine-tune is compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct BaselineSpec {
    /// A ChatModel in the job's namespace: the model it serves (its files, or its FineTuneJob's output once that
    /// succeeded) is served again inside the evaluation pod, with its template, so that the model in production
    /// is what the fine-tune must beat.
    #[schemars(length(min = 1))]
    pub chat_model: String,
}

/// What the promotion gate found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::common::unwrap_descriptions)]
pub struct EvaluationStatus {
    /// (wins + ties / 2) / (wins + ties + losses); unset when the judge gave no parseable verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate: Option<f64>,
    /// The low end of the 95% bootstrap interval of `winRate` (questions resampled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate_low: Option<f64>,
    /// The high end of that interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate_high: Option<f64>,
    /// Matches (a question's turn) the fine-tune won: the judge preferred it in both orders.
    #[serde(default)]
    pub wins: i64,
    /// Matches judged a tie in both orders, or judged differently in the two (a win and a tie included).
    #[serde(default)]
    pub ties: i64,
    /// Matches the baseline won in both orders.
    #[serde(default)]
    pub losses: i64,
    /// Matches left out because the judge's verdict could not be parsed in one of the two orders (never guessed).
    #[serde(default)]
    pub errors: i64,
    /// The fine-tune's mean single-answer score (1 to 10), when single-answer grading ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_score: Option<f64>,
    /// The judge's model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// Where the report is (`pvc://claim/path`), next to the answer and judgment files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// How many times the gate ran for this result (Kubernetes retries a failed gate up to twice; a retry resumes
    /// from the answers and judgments already written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}
