//! The children of one attempt of a FineTuneJob, as owned objects (no API calls): a headless Service for the
//! gang's rendezvous and DNS, and an Indexed Job with one pod per worker running `camelid-trainer train --resume
//! auto` with the torchrun-compatible environment, the job's volumes, and spot or on-demand placement.

use std::collections::BTreeMap;

use camelid_contracts::TrainerSettings;
use camelid_contracts::names;
use camelid_contracts::settings::{Device, Method};
use camelid_crds::FineTuneJob;
use camelid_crds::common::ModelSource;
use camelid_crds::common::VolumePath;
use camelid_crds::finetunejob::TrainMethod;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
    ResourceRequirements, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::error::BuildError;
use crate::placement::{Capacity, placement};
use crate::pod::{DOWNLOAD_DIR, VOLUMES_ROOT, download, env_var, harden, on_claim};
use crate::settings::Settings;

/// Port of the gang's rendezvous (rank 0's TCPStore).
const MASTER_PORT: i32 = names::RENDEZVOUS_PORT as i32;
/// Port of the trainer's `/progress` and `/metrics`.
const PROGRESS_PORT: i32 = names::TRAINER_PROGRESS_PORT as i32;

/// One gang of trainer pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub number: i32,
    pub capacity: Capacity,
}

/// The children of `job` for `attempt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub service: Service,
    pub job: Job,
    /// The trainers' (and the evaluation's) own ServiceAccount, `NAME-trainer`, without a token.
    pub account: ServiceAccount,
}

pub fn service_name(job: &FineTuneJob) -> String {
    format!("{}-trainer", job.name_any())
}

pub fn job_name(job: &FineTuneJob, attempt: i32) -> String {
    format!("{}-a{attempt}", job.name_any())
}

/// The labels every child (and pod) of `job` carries.
pub fn labels(job: &FineTuneJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), names::APP_NAME.into()),
        ("app.kubernetes.io/component".into(), "trainer".into()),
        ("app.kubernetes.io/managed-by".into(), names::MANAGER.into()),
        (names::FINETUNEJOB_LABEL.into(), job.name_any()),
    ])
}

/// Trainer processes per pod: one per GPU, or one on CPU.
pub fn ranks_per_pod(job: &FineTuneJob) -> i32 {
    job.spec.gpus_per_worker.max(1)
}

/// Gradient accumulation steps so that one optimizer step sees `globalBatch` sequences.
pub fn grad_accum(job: &FineTuneJob) -> i32 {
    let h = &job.spec.hyperparameters;
    let per_step = job.spec.workers * ranks_per_pod(job) * h.micro_batch;
    (h.global_batch / per_step.max(1)).max(1)
}

/// The claims a job mounts, each once, and whether every use of it is read-only.
fn claims(job: &FineTuneJob) -> BTreeMap<String, bool> {
    let mut claims: BTreeMap<String, bool> = BTreeMap::new();
    let mut add = |claim: &str, read_only: bool| {
        let entry = claims.entry(claim.to_string()).or_insert(true);
        *entry &= read_only;
    };
    if let Some(c) = &job.spec.base_model.claim_name {
        add(c, true);
    }
    if let Some(c) = &job.spec.dataset.claim_name {
        add(c, true);
    }
    add(&job.spec.checkpoints.claim_name, false);
    add(&job.spec.output.claim_name, false);
    claims
}

fn file(v: &VolumePath) -> String {
    match &v.claim_name {
        Some(claim) => on_claim(claim, &v.path),
        None => v.path.clone(),
    }
}

fn model_path(m: &ModelSource) -> String {
    match (&m.claim_name, &m.path, &m.uri) {
        (Some(claim), Some(path), _) => on_claim(claim, path),
        (None, Some(path), _) => path.clone(),
        _ => format!("{DOWNLOAD_DIR}/model.gguf"),
    }
}

pub fn checkpoint_dir(job: &FineTuneJob) -> String {
    let c = &job.spec.checkpoints;
    let default = format!("checkpoints/{}", job.name_any());
    on_claim(&c.claim_name, c.path.as_deref().unwrap_or(&default))
}

/// The exported model's folder inside the output claim (default `models/<job name>`).
pub fn output_path(job: &FineTuneJob) -> String {
    job.spec
        .output
        .path
        .clone()
        .unwrap_or_else(|| format!("models/{}", job.name_any()))
}

/// The exported model's folder as mounted in the pods.
pub fn output_dir(job: &FineTuneJob) -> String {
    on_claim(&job.spec.output.claim_name, &output_path(job))
}

/// Where the exported model is, for status and users: `pvc://<claim>/<path>`.
pub fn output_uri(job: &FineTuneJob) -> String {
    format!(
        "pvc://{}/{}",
        job.spec.output.claim_name,
        output_path(job).trim_start_matches('/')
    )
}

/// The trainer settings `job` asks for, in the contract the trainer parses.
pub fn trainer_settings(job: &FineTuneJob) -> TrainerSettings {
    let s = &job.spec;
    let h = &s.hyperparameters;
    TrainerSettings {
        model: Some(model_path(&s.base_model).into()),
        data: Some(file(&s.dataset).into()),
        output: Some(output_dir(job).into()),
        checkpoint_dir: Some(checkpoint_dir(job).into()),
        learning_rate: Some(h.learning_rate),
        max_length: usize::try_from(h.max_length).ok(),
        micro_batch: usize::try_from(h.micro_batch).ok(),
        grad_accum: usize::try_from(grad_accum(job)).ok(),
        warmup_ratio: Some(h.warmup_ratio),
        // The seed is any 64-bit pattern; the CRD's integer carries it.
        seed: Some(h.seed as u64),
        packing: h.packing,
        checkpoint_interval_steps: u64::try_from(s.checkpoints.interval_steps).ok(),
        checkpoint_keep: usize::try_from(s.checkpoints.keep).ok(),
        device: Some(if s.gpus_per_worker > 0 {
            Device::Cuda
        } else {
            Device::Cpu
        }),
        // maxSteps wins over epochs (the CRD refuses both).
        max_steps: h.max_steps.and_then(|n| u64::try_from(n).ok()),
        epochs: h.epochs.filter(|_| h.max_steps.is_none()),
        template: s.template.clone(),
        ..lora_settings(job)
    }
}

/// The LoRA part of the trainer settings (nothing for a full fine-tune). An evaluated LoRA job also exports the
/// merged model, which its promotion gate serves as the candidate.
fn lora_settings(job: &FineTuneJob) -> TrainerSettings {
    let s = &job.spec;
    if s.method.is_full() {
        return TrainerSettings::default();
    }
    let lora = s.lora.clone().unwrap_or_default();
    TrainerSettings {
        method: Some(Method::Lora),
        lora_rank: lora.rank.and_then(|r| usize::try_from(r).ok()),
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        lora_target_modules: lora.target_modules,
        lora_merge: exports_merged(job).then_some(true),
        ..TrainerSettings::default()
    }
}

/// Whether a LoRA job also exports the merged model: asked for, or for its promotion gate, which judges it.
pub fn exports_merged(job: &FineTuneJob) -> bool {
    job.spec.lora.as_ref().and_then(|l| l.merge) == Some(true) || job.spec.evaluation.is_some()
}

/// The folder a model server loads for `job`'s model (the promotion gate's candidate): the export, or for a
/// LoRA job the merged model beside its adapter.
pub fn served_dir(job: &FineTuneJob) -> String {
    match job.spec.method {
        TrainMethod::Full => output_dir(job),
        TrainMethod::Lora => format!("{}/merged", output_dir(job)),
    }
}

/// `camelid-trainer train` arguments for `job`.
pub fn trainer_args(job: &FineTuneJob) -> Result<Vec<String>, BuildError> {
    let mut args = vec![
        "train".to_string(),
        "--resume".into(),
        "auto".into(),
        "--progress-addr".into(),
        format!("0.0.0.0:{}", names::TRAINER_PROGRESS_PORT),
    ];
    let settings = trainer_settings(job)
        .to_args()
        .map_err(|e| BuildError::Settings(e.to_string()))?;
    args.extend(settings);
    Ok(args)
}

/// The children of `job` for `attempt`. Pure: the same inputs give the same objects.
pub fn children(job: &FineTuneJob, attempt: Attempt, settings: &Settings) -> Result<Children, BuildError> {
    let owner = job.controller_owner_ref(&()).ok_or(BuildError::NoOwner)?;
    let meta = |name: String, labels: BTreeMap<String, String>| ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let service = Service {
        metadata: meta(service_name(job), labels(job)),
        spec: Some(service_spec(labels(job))),
        ..Service::default()
    };
    let pod_labels = attempt_labels(job, attempt);
    let gang = Job {
        metadata: meta(job_name(job, attempt.number), pod_labels.clone()),
        spec: Some(job_spec(job, attempt, settings, pod_labels)?),
        ..Job::default()
    };
    Ok(Children {
        service,
        job: gang,
        account: crate::pod::service_account(meta(service_name(job), labels(job))),
    })
}

/// The headless Service of the gang: rank 0's rendezvous and every rank's progress, resolvable before any rank is
/// ready.
fn service_spec(selector: BTreeMap<String, String>) -> ServiceSpec {
    ServiceSpec {
        cluster_ip: Some("None".into()),
        // Ranks find each other before any of them is ready.
        publish_not_ready_addresses: Some(true),
        selector: Some(selector),
        ports: Some(vec![
            ServicePort {
                name: Some(names::RENDEZVOUS_PORT_NAME.into()),
                port: MASTER_PORT,
                target_port: Some(IntOrString::Int(MASTER_PORT)),
                ..ServicePort::default()
            },
            ServicePort {
                name: Some(names::TRAINER_PROGRESS_PORT_NAME.into()),
                port: PROGRESS_PORT,
                target_port: Some(IntOrString::Int(PROGRESS_PORT)),
                ..ServicePort::default()
            },
        ]),
        ..ServiceSpec::default()
    }
}

/// The labels of an attempt's Job and pods: the job's, its attempt number and its capacity.
fn attempt_labels(job: &FineTuneJob, attempt: Attempt) -> BTreeMap<String, String> {
    let mut labels = labels(job);
    labels.insert(names::ATTEMPT_LABEL.into(), attempt.number.to_string());
    labels.insert(names::CAPACITY_LABEL.into(), attempt.capacity.as_str().into());
    labels
}

/// The Indexed Job of an attempt: one pod per worker, never retried by Kubernetes.
fn job_spec(
    job: &FineTuneJob,
    attempt: Attempt,
    settings: &Settings,
    labels: BTreeMap<String, String>,
) -> Result<JobSpec, BuildError> {
    let workers = job.spec.workers;
    Ok(JobSpec {
        completion_mode: Some("Indexed".into()),
        completions: Some(workers),
        parallelism: Some(workers),
        // The operator restarts the whole gang itself, deciding between preemption and failure.
        backoff_limit: Some(0),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..ObjectMeta::default()
            }),
            spec: Some(pod_spec(job, attempt, settings)?),
        },
        ..JobSpec::default()
    })
}

/// The pod of one worker of `attempt`: the trainer, its volumes, its placement.
fn pod_spec(job: &FineTuneJob, attempt: Attempt, settings: &Settings) -> Result<PodSpec, BuildError> {
    let s = &job.spec;
    let PodVolumes {
        volumes,
        mounts,
        init_containers,
    } = pod_volumes(job, settings);
    let place = placement(
        &s.spot,
        attempt.capacity,
        s.gpus_per_worker,
        s.gpu_type.as_deref(),
    );
    let mut spec = PodSpec {
        subdomain: Some(service_name(job)),
        restart_policy: Some("Never".into()),
        termination_grace_period_seconds: Some(settings.termination_grace_seconds),
        priority_class_name: s.priority_class_name.clone(),
        node_selector: (!place.node_selector.is_empty()).then_some(place.node_selector),
        tolerations: (!place.tolerations.is_empty()).then_some(place.tolerations),
        affinity: place.affinity,
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers: vec![trainer_container(job, attempt, settings, mounts)?],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    harden(&mut spec, &service_name(job));
    Ok(spec)
}

/// A pod's volumes, the trainer's mounts of them, and the init containers that fill them.
struct PodVolumes {
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    init_containers: Vec<Container>,
}

/// Each claim the job uses, mounted once under `VOLUMES_ROOT`, and the download of a model given by URI.
fn pod_volumes(job: &FineTuneJob, settings: &Settings) -> PodVolumes {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, (claim, read_only)) in claims(job).into_iter().enumerate() {
        let name = format!("claim-{i}");
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(read_only),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{VOLUMES_ROOT}/{claim}"),
            read_only: Some(read_only),
            ..VolumeMount::default()
        });
    }
    let mut init_containers = Vec::new();
    let base = &job.spec.base_model;
    if let Some(uri) = &base.uri {
        let (volume, mount, fetch) = download(settings, uri, base.sha256.as_deref(), base.max_bytes);
        volumes.push(volume);
        mounts.push(mount);
        init_containers.push(fetch);
    }
    PodVolumes {
        volumes,
        mounts,
        init_containers,
    }
}

/// The trainer container: `camelid-trainer` (or its launcher, for several GPUs) with the gang's environment.
fn trainer_container(
    job: &FineTuneJob,
    attempt: Attempt,
    settings: &Settings,
    mounts: Vec<VolumeMount>,
) -> Result<Container, BuildError> {
    let s = &job.spec;
    let resources = trainer_resources(job);
    Ok(Container {
        name: "trainer".into(),
        image: Some(s.image.clone().unwrap_or_else(|| settings.trainer_image.clone())),
        image_pull_policy: s.image_pull_policy.map(|p| p.as_str().into()),
        command: Some(trainer_command(job)),
        args: Some(trainer_args(job)?),
        env: Some(trainer_env(job, attempt)),
        ports: Some(vec![
            ContainerPort {
                name: Some(names::RENDEZVOUS_PORT_NAME.into()),
                container_port: MASTER_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(names::TRAINER_PROGRESS_PORT_NAME.into()),
                container_port: PROGRESS_PORT,
                ..ContainerPort::default()
            },
        ]),
        resources: (resources != ResourceRequirements::default()).then_some(resources),
        volume_mounts: Some(mounts),
        ..Container::default()
    })
}

/// `camelid-trainer`, or `camelid-trainer launch --nproc N --` for one process per GPU.
fn trainer_command(job: &FineTuneJob) -> Vec<String> {
    let ranks = ranks_per_pod(job);
    let mut command = vec!["camelid-trainer".to_string()];
    if ranks > 1 {
        command.extend(["launch".into(), "--nproc".into(), ranks.to_string(), "--".into()]);
    }
    command
}

/// The torchrun-compatible environment of the gang.
fn trainer_env(job: &FineTuneJob, attempt: Attempt) -> Vec<EnvVar> {
    let s = &job.spec;
    let ranks = ranks_per_pod(job);
    let mut env = vec![
        // Indexed Job pods are `<job>-<index>.<subdomain>`: rank 0 hosts the rendezvous.
        env_var(
            "MASTER_ADDR",
            format!("{}-0.{}", job_name(job, attempt.number), service_name(job)),
        ),
        env_var("MASTER_PORT", MASTER_PORT.to_string()),
        env_var("WORLD_SIZE", (s.workers * ranks).to_string()),
        env_var("NNODES", s.workers.to_string()),
        env_var("NPROC_PER_NODE", ranks.to_string()),
        env_var("CAMELID_ATTEMPT", attempt.number.to_string()),
    ];
    if ranks == 1 {
        // One process per pod: its rank is the pod's completion index (JOB_COMPLETION_INDEX, set by Kubernetes).
        env.push(env_var("LOCAL_RANK", "0"));
    }
    env
}

/// The job's resources, with its GPUs as both limit and request.
fn trainer_resources(job: &FineTuneJob) -> ResourceRequirements {
    let s = &job.spec;
    let mut resources = s.resources.clone().unwrap_or_default();
    if s.gpus_per_worker > 0 {
        let gpus = Quantity(s.gpus_per_worker.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus);
    }
    resources
}
