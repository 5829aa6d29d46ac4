//! The children of a ChatModel, as owned objects (no API calls): one worker Deployment, or two when
//! `spot.baseOnDemand` is set (the base on on-demand nodes, the rest on spot), a Service whose EndpointSlices
//! the gateways route by, and a PodDisruptionBudget. Workers are ready only once their weights are loaded
//! (`/readyz`), and a rolling update surges one new worker before an old one goes, so ready replicas never drop
//! below the desired count because of an update. A worker with a termination notice is replaced the same way:
//! its Deployment gets one more replica ([`Surge`], decided in [`super::spot`]) while it is still there.

use std::collections::BTreeMap;

use camelid_contracts::{names, worker_auth};
use camelid_crds::ChatModel;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Secret, SecretKeySelector, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::error::BuildError;
use crate::placement::{Capacity, Placement, placement};
use crate::pod::{DOWNLOAD_DIR, VOLUMES_ROOT, download, harden, on_claim, service_account};
use crate::settings::Settings;

/// The workers' gRPC port, as Kubernetes types it.
const GRPC_PORT: i32 = names::WORKER_GRPC_PORT as i32;
/// The workers' `/metrics`, `/healthz` and `/readyz`, as Kubernetes types it.
const HTTP_PORT: i32 = names::WORKER_HTTP_PORT as i32;

/// Where the served model's files are, resolved from the ChatModel's source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFiles {
    /// A PersistentVolumeClaim holding them, or none (a path in the image, or a download).
    pub claim: Option<String>,
    /// The path inside the claim or image.
    pub path: Option<String>,
    /// A URI to download the model (GGUF) from.
    pub uri: Option<String>,
    /// The download's SHA-256, checked before the file is used (the source's `sha256`).
    pub sha256: Option<String>,
    /// The download's size limit (the source's `maxBytes`, within the operator's).
    pub max_bytes: Option<i64>,
    /// What is served, for `status.model` (`finetunejob/NAME`, `pvc://CLAIM/PATH`, a path or the URI).
    pub shown: String,
    /// Changes whenever the files may have: the FineTuneJob's completion, or the source itself.
    pub revision: String,
    /// Claims holding LoRA adapters besides the model's own, which the workers mount too (read-only).
    pub adapter_claims: Vec<String>,
}

impl ModelFiles {
    /// The path the worker (or any model server mounting the files the same way) loads.
    pub fn worker_path(&self) -> String {
        match (&self.claim, &self.path) {
            (Some(claim), Some(path)) => on_claim(claim, path),
            (None, Some(path)) => path.clone(),
            _ => format!("{DOWNLOAD_DIR}/model.gguf"),
        }
    }
}

/// A short, stable fingerprint of `text` (FNV-1a), for revisions.
pub fn fingerprint(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Which of a ChatModel's Deployments a worker belongs to (its `camelid.dev/pool` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// `NAME-worker`: on-demand workers, or all of them without `spot.baseOnDemand`.
    Base,
    /// `NAME-worker-spot`: the workers beyond the on-demand base.
    Spot,
}

impl Pool {
    /// The pool label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Pool::Base => "base",
            Pool::Spot => "spot",
        }
    }

    /// The pool a label value names, if any.
    pub fn of(label: &str) -> Option<Pool> {
        [Pool::Base, Pool::Spot].into_iter().find(|p| p.as_str() == label)
    }
}

/// Replicas each Deployment runs beyond its share of the desired workers: replacements for workers whose node
/// is going, started while those still serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Surge {
    pub base: i32,
    pub spot: i32,
}

impl Surge {
    pub fn total(self) -> i32 {
        self.base.saturating_add(self.spot)
    }
}

/// On a worker Deployment while it surges: how many of its replicas are replacements ([`Surge`]). The operator
/// reads it back so that the autoscaler's current count, and `status.desiredReplicas`, leave them out.
pub const SURGE_ANNOTATION: &str = "camelid.dev/surge";

/// The children of a ChatModel at `replicas` desired workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub service: Service,
    /// On-demand (or, without `baseOnDemand`, all) workers.
    pub workers: Deployment,
    /// Spot workers beyond the on-demand base, when `baseOnDemand` is set.
    pub spot_workers: Option<Deployment>,
    pub budget: PodDisruptionBudget,
    /// The workers' own ServiceAccount (`NAME-worker`), without a token.
    pub account: ServiceAccount,
    /// The workers' token ([`camelid_contracts::worker_auth`]), when the operator has the install's secret.
    pub token: Option<Secret>,
}

pub fn workers_name(model: &ChatModel) -> String {
    format!("{}-worker", model.name_any())
}

pub fn spot_workers_name(model: &ChatModel) -> String {
    format!("{}-worker-spot", model.name_any())
}

/// The Service (and the gateways' model name) of a ChatModel: its own name.
pub fn service_name(model: &ChatModel) -> String {
    model.name_any()
}

/// The labels of all of a model's workers, whichever their pool: the Service's selector, the budget's and the
/// `/scale` subresource's.
pub fn worker_selector(model: &ChatModel) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::CHATMODEL_LABEL.to_string(), model.name_any()),
        ("app.kubernetes.io/component".to_string(), "worker".to_string()),
    ])
}

/// [`worker_selector`] as a label selector string (`status.selector`, a pod list's `labelSelector`).
pub fn worker_selector_text(model: &ChatModel) -> String {
    worker_selector(model)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn labels(model: &ChatModel) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), names::APP_NAME.into()),
        ("app.kubernetes.io/component".into(), "worker".into()),
        ("app.kubernetes.io/managed-by".into(), names::MANAGER.into()),
        (names::CHATMODEL_LABEL.into(), model.name_any()),
    ])
}

/// How `replicas` split into (on-demand, spot) workers.
pub fn split(model: &ChatModel, replicas: i32) -> (i32, i32) {
    match model.spec.spot.base_on_demand {
        _ if !model.spec.spot.prefer_spot => (replicas, 0),
        Some(base) => {
            let on_demand = replicas.min(base.max(0));
            (on_demand, replicas - on_demand)
        }
        None => (replicas, 0),
    }
}

/// The capacity of the single Deployment when there is no on-demand base: spot when a provider is named (and
/// `preferSpot` is not turned off, which keeps the workers off its spot pools).
fn single_capacity(model: &ChatModel) -> Option<Capacity> {
    let spot = &model.spec.spot;
    spot.provider.map(|_| {
        if spot.prefer_spot {
            Capacity::Spot
        } else {
            Capacity::OnDemand
        }
    })
}

/// How long a worker pod has between SIGTERM and SIGKILL.
pub const WORKER_GRACE_SECONDS: i64 = 60;
/// How long a terminated worker keeps generating before it interrupts what is left for the gateway to continue
/// elsewhere: inside the grace period, with room for the interrupted streams to end.
pub const WORKER_DRAIN_SECONDS: i64 = 45;

fn worker_args(model: &ChatModel, files: &ModelFiles, authenticated: bool) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        files.worker_path(),
        "--served-model-name".into(),
        model.name_any(),
        "--listen".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--metrics-addr".into(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--device".into(),
        if model.spec.gpus > 0 { "cuda" } else { "cpu" }.into(),
        "--drain-seconds".into(),
        WORKER_DRAIN_SECONDS.to_string(),
    ];
    if !authenticated {
        // Said on the command line, for all to see: no token was given to these workers.
        args.push("--allow-unauthenticated".into());
    }
    if let Some(template) = &model.spec.template {
        args.extend(["--template".into(), template.clone()]);
    }
    args
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(names::WORKER_HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The pod template of workers on `capacity` (`None`: no placement of their own).
fn pod_template(
    model: &ChatModel,
    files: &ModelFiles,
    pool: &str,
    capacity: Option<Capacity>,
    settings: &Settings,
) -> PodTemplateSpec {
    let mut labels = labels(model);
    labels.insert(names::POOL_LABEL.into(), pool.into());
    if let Some(c) = capacity {
        labels.insert(names::CAPACITY_LABEL.into(), c.as_str().into());
    }
    let (volumes, mounts, init_containers) = worker_volumes(files, settings);
    let place = worker_placement(model, capacity);
    let mut spec = PodSpec {
        node_selector: (!place.node_selector.is_empty()).then_some(place.node_selector),
        tolerations: (!place.tolerations.is_empty()).then_some(place.tolerations),
        affinity: place.affinity,
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers: vec![worker_container(model, files, settings, mounts)],
        volumes: (!volumes.is_empty()).then_some(volumes),
        termination_grace_period_seconds: Some(WORKER_GRACE_SECONDS),
        ..PodSpec::default()
    };
    harden(&mut spec, &workers_name(model));
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                names::REVISION_ANNOTATION.into(),
                files.revision.clone(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(spec),
    }
}

/// The model's claim, mounted read-only, or the download of a model given by URI: the volumes, the worker's
/// mounts of them and the init containers that fill them.
fn worker_volumes(
    files: &ModelFiles,
    settings: &Settings,
) -> (Vec<Volume>, Vec<VolumeMount>, Vec<Container>) {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut init_containers = Vec::new();
    if let Some(claim) = &files.claim {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: format!("{VOLUMES_ROOT}/{claim}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    for (i, claim) in files.adapter_claims.iter().enumerate() {
        let name = format!("adapters-{i}");
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{VOLUMES_ROOT}/{claim}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(uri) = &files.uri {
        let (volume, mount, fetch) = download(settings, uri, files.sha256.as_deref(), files.max_bytes);
        volumes.push(volume);
        mounts.push(mount);
        init_containers.push(fetch);
    }
    (volumes, mounts, init_containers)
}

/// Where workers on `capacity` go; without a capacity of their own, only their GPUs place them.
fn worker_placement(model: &ChatModel, capacity: Option<Capacity>) -> Placement {
    let s = &model.spec;
    // Without a capacity of its own the Deployment is on-demand: no spot provider keeps it off any pool, and
    // `onDemandNodeSelector` (custom pools) still applies.
    placement(
        &s.spot,
        capacity.unwrap_or(Capacity::OnDemand),
        s.gpus,
        s.gpu_type.as_deref(),
    )
}

/// The model's resources, with its GPUs as both limit and request.
fn worker_resources(model: &ChatModel) -> ResourceRequirements {
    let s = &model.spec;
    let mut resources = s.resources.clone().unwrap_or_default();
    if s.gpus > 0 {
        let gpus = Quantity(s.gpus.to_string());
        for list in [&mut resources.limits, &mut resources.requests] {
            list.get_or_insert_with(BTreeMap::new)
                .insert("nvidia.com/gpu".into(), gpus.clone());
        }
    }
    resources
}

/// The `camelid-worker` container: its ports, probes and resources.
fn worker_container(
    model: &ChatModel,
    files: &ModelFiles,
    settings: &Settings,
    mounts: Vec<VolumeMount>,
) -> Container {
    let s = &model.spec;
    let resources = worker_resources(model);
    Container {
        name: "worker".into(),
        image: Some(s.image.clone().unwrap_or_else(|| settings.worker_image.clone())),
        image_pull_policy: s.image_pull_policy.map(|p| p.as_str().into()),
        command: Some(vec!["camelid-worker".into()]),
        args: Some(worker_args(model, files, settings.worker_secret.is_some())),
        env: settings.worker_secret.is_some().then(|| vec![token_env(model)]),
        ports: Some(vec![
            ContainerPort {
                name: Some(names::WORKER_GRPC_PORT_NAME.into()),
                container_port: GRPC_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(names::WORKER_HTTP_PORT_NAME.into()),
                container_port: HTTP_PORT,
                ..ContainerPort::default()
            },
        ]),
        // Loading a large model takes minutes: the startup probe allows 30 of them before liveness applies.
        startup_probe: Some(http_probe("/healthz", 5, 360)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        // Ready (and so in the EndpointSlices the gateways route by) only with the weights loaded.
        readiness_probe: Some(http_probe("/readyz", 2, 1)),
        resources: (resources != ResourceRequirements::default()).then_some(resources),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    }
}

/// The worker's token, from the Secret [`token_secret`] makes.
fn token_env(model: &ChatModel) -> EnvVar {
    EnvVar {
        name: worker_auth::TOKEN_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: worker_auth::token_secret_name(&model.name_any()),
                key: worker_auth::TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The key the gateway derives a model's token from: `NAMESPACE/NAME`, as it names the model.
pub fn token_model_key(model: &ChatModel) -> String {
    format!("{}/{}", model.namespace().unwrap_or_default(), model.name_any())
}

/// The children of `model` serving `files` with `replicas` workers, and `surge` replacements on top. Pure: the
/// same inputs give the same objects.
pub fn children(
    model: &ChatModel,
    files: &ModelFiles,
    replicas: i32,
    surge: Surge,
    settings: &Settings,
) -> Result<Children, BuildError> {
    let owner: OwnerReference = model.controller_owner_ref(&()).ok_or(BuildError::NoOwner)?;
    let meta = |name: String, labels: BTreeMap<String, String>| ObjectMeta {
        name: Some(name),
        namespace: model.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let selector = worker_selector(model);
    let service = Service {
        metadata: meta(service_name(model), labels(model)),
        spec: Some(service_spec(selector.clone())),
        ..Service::default()
    };
    // Each Deployment selects its own pool (a fixed label: selectors cannot change), never the other's pods.
    let deployment = |name: String, replicas: i32, surge: i32, pool: Pool, capacity: Option<Capacity>| {
        let template = pod_template(model, files, pool.as_str(), capacity, settings);
        let mut match_labels = selector.clone();
        match_labels.insert(names::POOL_LABEL.into(), pool.as_str().into());
        let mut metadata = meta(name, labels(model));
        // Only while surging: applied without it, the annotation goes.
        if surge > 0 {
            metadata.annotations = Some(BTreeMap::from([(
                SURGE_ANNOTATION.to_string(),
                surge.to_string(),
            )]));
        }
        Deployment {
            metadata,
            spec: Some(DeploymentSpec {
                replicas: Some(replicas.saturating_add(surge)),
                selector: LabelSelector {
                    match_labels: Some(match_labels),
                    ..LabelSelector::default()
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                template,
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    };
    let (on_demand, spot) = split(model, replicas);
    let (workers, spot_workers) = match model.spec.spot.base_on_demand {
        Some(_) => (
            deployment(
                workers_name(model),
                on_demand,
                surge.base,
                Pool::Base,
                Some(Capacity::OnDemand),
            ),
            Some(deployment(
                spot_workers_name(model),
                spot,
                surge.spot,
                Pool::Spot,
                Some(Capacity::Spot),
            )),
        ),
        None => (
            deployment(
                workers_name(model),
                replicas,
                surge.base,
                Pool::Base,
                single_capacity(model),
            ),
            None,
        ),
    };
    let budget = PodDisruptionBudget {
        metadata: meta(workers_name(model), labels(model)),
        spec: Some(budget_spec(selector)),
        status: None,
    };
    let token = settings.worker_secret.as_ref().map(|secret| Secret {
        metadata: meta(worker_auth::token_secret_name(&model.name_any()), labels(model)),
        string_data: Some(BTreeMap::from([(
            worker_auth::TOKEN_KEY.to_string(),
            secret.token_for(&token_model_key(model)),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    });
    Ok(Children {
        service,
        workers,
        spot_workers,
        budget,
        account: service_account(meta(workers_name(model), labels(model))),
        token,
    })
}

/// The workers' gRPC Service, whose EndpointSlices the gateways route by.
fn service_spec(selector: BTreeMap<String, String>) -> ServiceSpec {
    ServiceSpec {
        selector: Some(selector),
        ports: Some(vec![ServicePort {
            name: Some(names::WORKER_GRPC_PORT_NAME.into()),
            port: GRPC_PORT,
            target_port: Some(IntOrString::String(names::WORKER_GRPC_PORT_NAME.into())),
            app_protocol: Some("kubernetes.io/h2c".into()),
            ..ServicePort::default()
        }]),
        ..ServiceSpec::default()
    }
}

/// Node drains take workers one at a time, so the others keep serving. A surge leaves the budget as it is: the
/// disruption controller expects each Deployment's replicas, replacements included, so a leaving worker can be
/// evicted (a drain) once its replacement is ready, and its node going takes it regardless. The budget never
/// holds back the replacement itself: it only limits evictions.
fn budget_spec(selector: BTreeMap<String, String>) -> PodDisruptionBudgetSpec {
    PodDisruptionBudgetSpec {
        max_unavailable: Some(IntOrString::Int(1)),
        selector: Some(LabelSelector {
            match_labels: Some(selector),
            ..LabelSelector::default()
        }),
        ..PodDisruptionBudgetSpec::default()
    }
}
