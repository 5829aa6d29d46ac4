//! The evaluation Job of a FineTuneJob's promotion gate, as an owned object (no API calls). One pod, never
//! restarted in place: two native sidecars serve the candidate (the job's exported model, read-only from the
//! output claim) and the baseline with `camelid serve`, each ready once its `/readyz` answers, and then the main
//! container runs `camelid eval gate` against both. The gate writes its answers, judgments and report into
//! `<output>/evaluation` on the output claim (so a retried pod resumes from them) and its [`Summary`] to the
//! termination message, where the operator reads it.
//!
//! [`Summary`]: camelid_contracts::evaluation::Summary

use std::collections::BTreeMap;

use camelid_contracts::evaluation::{GateSettings, JUDGE_API_KEY_ENV, SUMMARY_PATH};
use camelid_contracts::names;
use camelid_crds::FineTuneJob;
use camelid_crds::evaluation::EvaluationSpec;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::build::output_dir;
use crate::chatmodel::build::ModelFiles;
use crate::error::BuildError;
use crate::placement::{Capacity, placement};
use crate::pod::{VOLUMES_ROOT, download, harden, on_claim};
use crate::settings::Settings;

/// The main container's name: the operator reads its termination message.
pub const GATE_CONTAINER: &str = "gate";
/// The candidate's server port inside the pod.
pub const CANDIDATE_PORT: u16 = 8001;
/// The baseline's server port inside the pod.
pub const BASELINE_PORT: u16 = 8002;
/// Kubernetes retries a failed gate this many times; the gate itself retries a judge's transient errors, so a
/// failure here is one that outlasted those.
pub const BACKOFF_LIMIT: i32 = 2;

/// The longest an evaluation may run, retries included: 80 MT-bench questions against a slow judge take an
/// hour or two; a day means something is stuck.
pub const ACTIVE_DEADLINE_SECONDS: i64 = 24 * 3600;
/// Where a questions ConfigMap is mounted in the gate.
const QUESTIONS_DIR: &str = "/camelid/questions";
/// A model server may take this long to load its weights (5 s x 360 = 30 minutes) before the pod fails.
const STARTUP_PERIOD_SECONDS: i32 = 5;
const STARTUP_FAILURES: i32 = 360;

/// The model the candidate is compared with, resolved to files the pod can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    /// Its model name at its server, and in the answer and judgment files.
    pub name: String,
    /// Where its files are (a claim, a path in the image, or a URI to download).
    pub files: ModelFiles,
    /// The chat template it is served with (unset: the model's own).
    pub template: Option<String>,
}

/// The Job's name: `<job>-eval`.
pub fn job_name(job: &FineTuneJob) -> String {
    format!("{}-eval", job.name_any())
}

/// The labels of the evaluation Job and its pod.
pub fn labels(job: &FineTuneJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), names::APP_NAME.into()),
        (
            "app.kubernetes.io/component".into(),
            names::EVALUATION_COMPONENT.into(),
        ),
        ("app.kubernetes.io/managed-by".into(), names::MANAGER.into()),
        (names::FINETUNEJOB_LABEL.into(), job.name_any()),
    ])
}

/// The folder on the output claim, next to the exported model, that the gate writes into:
/// `evaluation/<key>`. A retried gate resumes from it; a job recreated under the same name (new weights) or an
/// evaluation spec changed gets a folder of its own, so no answer or verdict about other weights or under other
/// settings is ever reused.
pub fn out_dir(job: &FineTuneJob) -> String {
    format!("{}/{}", output_dir(job), out_subdir(job))
}

/// `evaluation/<key>`, the key a fingerprint of the job's uid and its evaluation spec.
pub fn out_subdir(job: &FineTuneJob) -> String {
    let spec = serde_json::to_string(&job.spec.evaluation).unwrap_or_default();
    let key = crate::chatmodel::build::fingerprint(&format!("{}/{spec}", job.uid().unwrap_or_default()));
    format!("evaluation/{}", &key[..12])
}

/// The baseline by default: the job's own base model, under the name of its file or folder.
pub fn base_model_baseline(job: &FineTuneJob) -> Baseline {
    let base = &job.spec.base_model;
    let shown = base.path.clone().or_else(|| base.uri.clone()).unwrap_or_default();
    Baseline {
        name: served_name(&shown, &job.name_any()),
        files: ModelFiles {
            claim: base.claim_name.clone(),
            path: base.path.clone(),
            uri: base.uri.clone(),
            sha256: base.sha256.clone(),
            max_bytes: base.max_bytes,
            revision: String::new(),
            shown,
            adapter_claims: Vec::new(),
        },
        template: None,
    }
}

/// A model name from the last part of a path or URI (`.../smollm2-135m.gguf` → `smollm2-135m`), never the
/// candidate's.
fn served_name(source: &str, candidate: &str) -> String {
    let last = source
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let stem = last.strip_suffix(".gguf").unwrap_or(last);
    let name: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        return "baseline".into();
    }
    distinct(name, candidate)
}

/// `name`, or `<name>-baseline` when it is the candidate's: the two must differ in the answer files.
pub fn distinct(name: String, candidate: &str) -> String {
    if name == candidate {
        format!("{name}-baseline")
    } else {
        name
    }
}

/// The gate's flags: the questions, both servers on loopback, the judge, the limits and the output folder.
pub fn gate_settings(job: &FineTuneJob, spec: &EvaluationSpec, baseline: &Baseline) -> GateSettings {
    let loopback = |port: u16| format!("http://127.0.0.1:{port}/v1");
    GateSettings {
        questions: questions_path(spec).into(),
        candidate_url: loopback(CANDIDATE_PORT),
        candidate_model: job.name_any(),
        baseline_url: loopback(BASELINE_PORT),
        baseline_model: baseline.name.clone(),
        judge_url: spec.judge.url.clone(),
        judge_model: spec.judge.model.clone(),
        concurrency: u32::try_from(spec.concurrency).ok(),
        max_tokens: u32::try_from(spec.max_tokens).ok(),
        judge_max_tokens: spec.judge.max_tokens.and_then(|n| u32::try_from(n).ok()),
        max_questions: spec.max_questions.and_then(|n| u32::try_from(n).ok()),
        out: out_dir(job).into(),
        summary: SUMMARY_PATH.into(),
    }
}

/// The questions file as the gate sees it: on its claim, or the ConfigMap key mounted as a file.
fn questions_path(spec: &EvaluationSpec) -> String {
    let q = &spec.questions;
    match (&q.claim_name, &q.path) {
        (Some(claim), Some(path)) => on_claim(claim, path),
        _ => format!("{QUESTIONS_DIR}/question.jsonl"),
    }
}

/// The evaluation Job of `job` against `baseline`. Pure: the same inputs give the same Job.
pub fn job(
    job: &FineTuneJob,
    spec: &EvaluationSpec,
    baseline: &Baseline,
    settings: &Settings,
) -> Result<Job, BuildError> {
    let owner = job.controller_owner_ref(&()).ok_or(BuildError::NoOwner)?;
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(job)),
            namespace: job.namespace(),
            labels: Some(labels(job)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            // Input the gate refuses (exit 2: a bad question file, settings it cannot resume under) fails the
            // Job at once: retrying would load both models again to be refused again.
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    action: "FailJob".into(),
                    on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                        container_name: Some(GATE_CONTAINER.into()),
                        operator: "In".into(),
                        values: vec![camelid_contracts::exit::INVALID],
                    }),
                    on_pod_conditions: None,
                }],
            }),
            // A pod that never gets a node or a judge that never answers ends the evaluation rather than
            // leaving the job Evaluating for ever.
            active_deadline_seconds: Some(ACTIVE_DEADLINE_SECONDS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(job)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(job, spec, baseline, settings)?),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    })
}

/// The pod: the download of a baseline given by URI, the two servers as native sidecars, then the gate.
fn pod_spec(
    job: &FineTuneJob,
    spec: &EvaluationSpec,
    baseline: &Baseline,
    settings: &Settings,
) -> Result<PodSpec, BuildError> {
    let image = spec.image.clone().unwrap_or_else(|| settings.eval_image.clone());
    let claims = Claims::of(job, spec, baseline);
    let output_claim = job.spec.output.claim_name.as_str();
    let mut volumes = claims.volumes();
    let mut init_containers = Vec::new();
    let mut baseline_mounts = Vec::new();
    if let Some(uri) = &baseline.files.uri {
        let f = &baseline.files;
        let (volume, mount, fetch) = download(settings, uri, f.sha256.as_deref(), f.max_bytes);
        volumes.push(volume);
        baseline_mounts.push(mount);
        init_containers.push(fetch);
    }
    baseline_mounts.extend(baseline.files.claim.as_deref().map(|c| claims.mount(c, true)));
    let candidate = Server {
        container: "candidate",
        name: job.name_any(),
        path: super::build::served_dir(job),
        template: job.spec.template.clone(),
        port: CANDIDATE_PORT,
    };
    let base = Server {
        container: "baseline",
        name: baseline.name.clone(),
        path: baseline.files.worker_path(),
        template: baseline.template.clone(),
        port: BASELINE_PORT,
    };
    let candidate_mounts = vec![claims.mount(output_claim, true)];
    init_containers.push(server(&candidate, &image, spec, candidate_mounts));
    init_containers.push(server(&base, &image, spec, baseline_mounts));
    let gate_mounts = gate_mounts(spec, output_claim, &claims, &mut volumes);
    let gate = gate_container(job, spec, baseline, &image, gate_mounts)?;
    let place = placement(
        &job.spec.spot,
        Capacity::OnDemand,
        gpus_per_server(spec),
        job.spec.gpu_type.as_deref(),
    );
    let mut pod = PodSpec {
        restart_policy: Some("Never".into()),
        node_selector: (!place.node_selector.is_empty()).then_some(place.node_selector),
        tolerations: (!place.tolerations.is_empty()).then_some(place.tolerations),
        affinity: place.affinity,
        init_containers: Some(init_containers),
        containers: vec![gate],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    // The FineTuneJob's account, made with its trainers.
    harden(&mut pod, &crate::finetunejob::build::service_name(job));
    Ok(pod)
}

/// The gate's mounts: the output claim (read-write, for `--out`) and the questions, on their claim or from the
/// ConfigMap (whose volume is added to `volumes`).
fn gate_mounts(
    spec: &EvaluationSpec,
    output_claim: &str,
    claims: &Claims,
    volumes: &mut Vec<Volume>,
) -> Vec<VolumeMount> {
    let mut mounts = vec![claims.mount(output_claim, false)];
    let q = &spec.questions;
    match (&q.claim_name, &q.config_map) {
        (Some(claim), _) if claim != output_claim => mounts.push(claims.mount(claim, true)),
        (Some(_), _) | (None, None) => {}
        (None, Some(cm)) => {
            volumes.push(Volume {
                name: "questions".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: cm.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: cm.key.clone(),
                        path: "question.jsonl".into(),
                        ..KeyToPath::default()
                    }]),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(VolumeMount {
                name: "questions".into(),
                mount_path: QUESTIONS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    mounts
}

/// The claims the pod mounts, each once as volume `claim-<i>`: read-only unless the gate writes to it (the output
/// claim, for `--out`).
struct Claims(BTreeMap<String, bool>);

impl Claims {
    fn of(job: &FineTuneJob, spec: &EvaluationSpec, baseline: &Baseline) -> Self {
        let mut claims = BTreeMap::from([(job.spec.output.claim_name.clone(), false)]);
        for claim in [&baseline.files.claim, &spec.questions.claim_name]
            .into_iter()
            .flatten()
        {
            claims.entry(claim.clone()).or_insert(true);
        }
        Self(claims)
    }

    fn volume_name(&self, claim: &str) -> String {
        let index = self.0.keys().position(|c| c == claim).unwrap_or(self.0.len());
        format!("claim-{index}")
    }

    /// A container's mount of `claim` (one of [`Claims::of`]) under [`VOLUMES_ROOT`].
    fn mount(&self, claim: &str, read_only: bool) -> VolumeMount {
        VolumeMount {
            name: self.volume_name(claim),
            mount_path: format!("{VOLUMES_ROOT}/{claim}"),
            read_only: Some(read_only),
            ..VolumeMount::default()
        }
    }

    fn volumes(&self) -> Vec<Volume> {
        self.0
            .iter()
            .map(|(claim, read_only)| Volume {
                name: self.volume_name(claim),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(*read_only),
                }),
                ..Volume::default()
            })
            .collect()
    }
}

/// One of the two model servers.
struct Server {
    /// The sidecar's container name (and port name).
    container: &'static str,
    /// The model name it serves.
    name: String,
    /// The model's path as mounted.
    path: String,
    template: Option<String>,
    port: u16,
}

/// A model server as a native sidecar: it starts before the gate, which starts only once the server's
/// `/readyz` answers (the weights are loaded), and is stopped when the gate exits. It listens on the pod's
/// addresses, not only loopback, because the kubelet's probe comes from outside the pod; hence
/// `--allow-anonymous` (like the cluster's workers, it is reachable only inside the cluster, for the
/// evaluation's duration). The gate itself talks to it on loopback.
fn server(s: &Server, image: &str, spec: &EvaluationSpec, mounts: Vec<VolumeMount>) -> Container {
    let mut args = vec![
        "serve".to_string(),
        "--model".into(),
        s.path.clone(),
        "--served-model-name".into(),
        s.name.clone(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        s.port.to_string(),
        "--allow-anonymous".into(),
    ];
    if let Some(template) = &s.template {
        args.extend(["--template".into(), template.clone()]);
    }
    Container {
        name: s.container.into(),
        image: Some(image.into()),
        command: Some(vec!["camelid".into()]),
        args: Some(args),
        restart_policy: Some("Always".into()),
        ports: Some(vec![ContainerPort {
            name: Some(s.container.into()),
            container_port: i32::from(s.port),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::Int(i32::from(s.port)),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_FAILURES),
            ..Probe::default()
        }),
        resources: spec.resources.clone(),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    }
}

/// The gate: `camelid eval gate` with the contract's flags, the judge's key from its Secret, and its summary (or
/// its error) as the termination message; should it die before writing one, the tail of its log instead.
fn gate_container(
    job: &FineTuneJob,
    spec: &EvaluationSpec,
    baseline: &Baseline,
    image: &str,
    mounts: Vec<VolumeMount>,
) -> Result<Container, BuildError> {
    let mut args = vec!["eval".to_string(), "gate".into()];
    let flags = gate_settings(job, spec, baseline)
        .to_args()
        .map_err(|e| BuildError::Settings(e.to_string()))?;
    args.extend(flags);
    let env = spec.judge.api_key_secret.as_ref().map(|secret| {
        vec![EnvVar {
            name: JUDGE_API_KEY_ENV.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]
    });
    Ok(Container {
        name: GATE_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec!["camelid".into()]),
        args: Some(args),
        env,
        volume_mounts: Some(mounts),
        termination_message_path: Some(SUMMARY_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    })
}

/// GPUs each server asks for in `resources` (limits, else requests): they place the pod on GPU nodes.
fn gpus_per_server(spec: &EvaluationSpec) -> i32 {
    let resources = spec.resources.clone().unwrap_or_default();
    let gpus = |list: Option<BTreeMap<_, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
        list.and_then(|l| l.get("nvidia.com/gpu").and_then(|q| q.0.parse::<i32>().ok()))
    };
    gpus(resources.limits).or(gpus(resources.requests)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_named_after_its_file_and_never_like_the_candidate() {
        assert_eq!(
            served_name("smollm2-135m-instruct", "vicuna"),
            "smollm2-135m-instruct"
        );
        assert_eq!(
            served_name("https://example.com/models/tiny.gguf", "vicuna"),
            "tiny"
        );
        assert_eq!(served_name("/models/llama/", "vicuna"), "llama");
        assert_eq!(served_name("vicuna", "vicuna"), "vicuna-baseline");
        assert_eq!(served_name("", "vicuna"), "baseline");
    }
}
