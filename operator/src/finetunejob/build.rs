//! The children of one attempt of a FineTuneJob, as owned objects (no API calls): a headless Service for the
//! gang's rendezvous and DNS, and an Indexed Job with one pod per worker running `camelid-trainer train --resume
//! auto` with the torchrun-compatible environment, the job's volumes, and spot or on-demand placement.

use std::collections::BTreeMap;

use camelid_contracts::TrainerSettings;
use camelid_contracts::names;
use camelid_contracts::settings::Device;
use camelid_crds::FineTuneJob;
use camelid_crds::common::VolumePath;
use camelid_crds::finetunejob::ModelSource;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::spot::{Capacity, placement};

/// Port of the gang's rendezvous (rank 0's TCPStore).
const MASTER_PORT: i32 = names::RENDEZVOUS_PORT as i32;
/// Port of the trainer's `/progress` and `/metrics`.
const PROGRESS_PORT: i32 = names::TRAINER_PROGRESS_PORT as i32;
/// Where each claim is mounted.
pub const VOLUMES_ROOT: &str = "/camelid/volumes";
/// Where a model given by URI is downloaded.
pub const DOWNLOAD_DIR: &str = "/camelid/download";

/// Operator-wide settings the children depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The trainer image when a job names none.
    pub trainer_image: String,
    /// The image that downloads a model given by URI.
    pub fetch_image: String,
    /// Seconds between SIGTERM and SIGKILL: the trainer writes its termination checkpoint in this time.
    pub termination_grace_seconds: i64,
    /// The worker image when a ChatModel names none.
    pub worker_image: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trainer_image: "ghcr.io/camelid-dev/camelid-trainer:0.1.0".into(),
            fetch_image: "curlimages/curl:8.11.1".into(),
            termination_grace_seconds: 180,
            worker_image: "ghcr.io/camelid-dev/camelid-worker:0.1.0".into(),
        }
    }
}

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
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// The job has no UID yet (not read from the API server), so children cannot be owned by it.
    #[error("the FineTuneJob has no uid; children need an owner reference")]
    NoOwner,
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

pub(crate) fn on_claim(claim: &str, path: &str) -> String {
    format!("{VOLUMES_ROOT}/{claim}/{}", path.trim_start_matches('/'))
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

pub fn output_dir(job: &FineTuneJob) -> String {
    let o = &job.spec.output;
    let default = format!("models/{}", job.name_any());
    on_claim(&o.claim_name, o.path.as_deref().unwrap_or(&default))
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
        ..TrainerSettings::default()
    }
}

/// `camelid-trainer train` arguments for `job`.
pub fn trainer_args(job: &FineTuneJob) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--resume".into(),
        "auto".into(),
        "--progress-addr".into(),
        format!("0.0.0.0:{}", names::TRAINER_PROGRESS_PORT),
    ];
    args.extend(trainer_settings(job).to_args());
    args
}

fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The children of `job` for `attempt`. Pure: the same inputs give the same objects.
pub fn children(job: &FineTuneJob, attempt: Attempt, settings: &Settings) -> Result<Children, BuildError> {
    let owner: OwnerReference = job.controller_owner_ref(&()).ok_or(BuildError::NoOwner)?;
    let namespace = job.namespace();
    let service_name = service_name(job);
    let job_name = job_name(job, attempt.number);
    let mut labels = labels(job);
    let selector = labels.clone();
    let meta = |name: &str, labels: &BTreeMap<String, String>| ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.clone(),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let service = Service {
        metadata: meta(&service_name, &labels),
        spec: Some(ServiceSpec {
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
        }),
        ..Service::default()
    };

    labels.insert(names::ATTEMPT_LABEL.into(), attempt.number.to_string());
    labels.insert(names::CAPACITY_LABEL.into(), attempt.capacity.as_str().into());
    let s = &job.spec;
    let ranks = ranks_per_pod(job);
    let mut env = vec![
        // Indexed Job pods are `<job>-<index>.<subdomain>`: rank 0 hosts the rendezvous.
        env_var("MASTER_ADDR", format!("{job_name}-0.{service_name}")),
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
    let mut command = vec!["camelid-trainer".to_string()];
    if ranks > 1 {
        command.extend(["launch".into(), "--nproc".into(), ranks.to_string(), "--".into()]);
    }
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
    if let Some(uri) = &s.base_model.uri {
        let (volume, mount, fetch) = download(&settings.fetch_image, uri);
        volumes.push(volume);
        mounts.push(mount);
        init_containers.push(fetch);
    }
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
    let place = placement(
        &s.spot,
        attempt.capacity,
        s.gpus_per_worker,
        s.gpu_type.as_deref(),
    );
    let trainer = Container {
        name: "trainer".into(),
        image: Some(s.image.clone().unwrap_or_else(|| settings.trainer_image.clone())),
        image_pull_policy: s.image_pull_policy.map(|p| p.as_str().into()),
        command: Some(command),
        args: Some(trainer_args(job)),
        env: Some(env),
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
        security_context: Some(restricted()),
        ..Container::default()
    };
    let workers = s.workers;
    let job = Job {
        metadata: meta(&job_name, &labels),
        spec: Some(JobSpec {
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
                spec: Some(PodSpec {
                    subdomain: Some(service_name),
                    restart_policy: Some("Never".into()),
                    termination_grace_period_seconds: Some(settings.termination_grace_seconds),
                    priority_class_name: s.priority_class_name.clone(),
                    node_selector: (!place.node_selector.is_empty()).then_some(place.node_selector),
                    tolerations: (!place.tolerations.is_empty()).then_some(place.tolerations),
                    affinity: place.affinity,
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    containers: vec![trainer],
                    volumes: Some(volumes),
                    security_context: Some(pod_security()),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    Ok(Children { service, job })
}

/// The emptyDir, its mount and the init container that download a model given by URI to
/// `DOWNLOAD_DIR/model.gguf`.
pub(crate) fn download(fetch_image: &str, uri: &str) -> (Volume, VolumeMount, Container) {
    let volume = Volume {
        name: "download".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "download".into(),
        mount_path: DOWNLOAD_DIR.into(),
        ..VolumeMount::default()
    };
    let fetch = Container {
        name: "fetch-model".into(),
        image: Some(fetch_image.to_string()),
        args: Some(vec![
            "-fsSL".into(),
            "--retry".into(),
            "5".into(),
            "-o".into(),
            format!("{DOWNLOAD_DIR}/model.gguf"),
            uri.to_string(),
        ]),
        volume_mounts: Some(vec![mount.clone()]),
        security_context: Some(restricted()),
        ..Container::default()
    };
    (volume, mount, fetch)
}

/// camelid's images run as user 1000, never root.
pub(crate) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        fs_group: Some(1000),
        ..PodSecurityContext::default()
    }
}

pub(crate) fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..SecurityContext::default()
    }
}
