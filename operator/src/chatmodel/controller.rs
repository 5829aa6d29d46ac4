//! The ChatModel controller: fetch (a fresh copy, the model's source, its Deployments, its worker pods and their
//! nodes, the gateways' load) → validate (the autoscaling policy) → decide (the autoscaler, [`super::autoscale`];
//! the replacements of leaving workers, [`super::spot`]) → build ([`super::build`]) → apply (server-side apply) →
//! status (`patch_status`), with an Event on every scale decision and every worker preempted. Requeues every
//! autoscaling period (5 s by default). The guard around each reconcile and the error policy are
//! [`crate::reconcile`]'s, shared with the FineTuneJob controller.
//!
//! Pods and nodes are read each period rather than watched: a termination notice gives 30 s (GKE, AKS) to 2
//! minutes (AWS), so a reaction within one period is in time, and a watch would not win the one race there is.
//! When a leaving worker's pod is deleted or stops, its ReplicaSet may start one more pod before the next reconcile
//! lowers the surge; the ReplicaSet then removes the newest unready pod, that extra one, and the replacement
//! stays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use camelid_crds::chatmodel::{ChatModelStatus, ScaleDecision};
use camelid_crds::{ChatModel, FineTuneJob};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use super::autoscale::{self, History, Policy};
use super::build::{self, ModelFiles, Surge, fingerprint};
use super::load::{Gateways, Migrations};
use super::spot;
use super::status::{self, Source};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reconcile::{self, Controlled, Note};
use crate::settings::Settings;

/// What reconciles need.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub gateways: Gateways,
    /// How often each model's load is read and its replicas decided.
    pub period: Duration,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Each model's recent recommendations (by uid).
    histories: Mutex<HashMap<String, History>>,
    /// A fingerprint of the children last applied for each model (by uid): unchanged children are not sent
    /// again every period.
    applied: Mutex<HashMap<String, String>>,
    /// The gateways' migration counts last read for each model (by uid).
    migrations: Mutex<HashMap<String, Migrations>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, gateways: Gateways, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder: reconcile::recorder(&client),
            client,
            settings,
            gateways,
            period: Duration::from_secs(5),
            metrics,
            histories: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            migrations: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets what was kept for a model that is gone.
    fn forget(&self, model: &ChatModel) {
        if let Some(uid) = model.uid() {
            if let Ok(mut h) = self.histories.lock() {
                h.remove(&uid);
            }
            if let Ok(mut a) = self.applied.lock() {
                a.remove(&uid);
            }
            if let Ok(mut m) = self.migrations.lock() {
                m.remove(&uid);
            }
        }
    }
}

impl Controlled for Context {
    fn client(&self) -> &Client {
        &self.client
    }

    fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let models = Api::<DeserializeGuard<ChatModel>>::all(client.clone());
    let selector = "app.kubernetes.io/managed-by=camelid-operator,app.kubernetes.io/component=worker";
    Controller::new(models, watcher::Config::default().any_semantic())
        .owns(
            Api::<Deployment>::all(client),
            watcher::Config::default().labels(selector),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, reconcile::error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

pub async fn reconcile(
    guarded: Arc<DeserializeGuard<ChatModel>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    reconcile::guarded(&guarded, &*ctx, |cached| reconcile_fresh(cached, &ctx)).await
}

/// Reconciles from a fresh read (see [`reconcile::fetch`]); a model that is gone is forgotten.
async fn reconcile_fresh(cached: &ChatModel, ctx: &Context) -> Result<Action, Error> {
    match reconcile::fetch(&ctx.client, cached).await? {
        Some(fresh) => reconcile_inner(&fresh, ctx).await,
        None => {
            ctx.forget(cached);
            Ok(Action::await_change())
        }
    }
}

/// Fetch: where the model's files are, or why they are not there yet ([`super::source::resolve`] on the
/// FineTuneJob the model names, as read now).
async fn resolve(ctx: &Context, model: &ChatModel) -> Result<Result<ModelFiles, Source>, Error> {
    let job = match &model.spec.model.fine_tune_job {
        Some(name) => {
            let jobs: Api<FineTuneJob> = reconcile::namespaced(&ctx.client, model);
            jobs.get_opt(name).await?
        }
        None => None,
    };
    Ok(super::source::resolve(&model.spec.model, job.as_ref()))
}

/// The model's LoRA adapters that can be served, into the status (the gateway loads them from there) and, for
/// adapters on claims the model's own is not, into the claims the workers mount; the others are named in the
/// `AdaptersAvailable` condition.
async fn observe_adapters(
    ctx: &Context,
    model: &ChatModel,
    files: &mut ModelFiles,
    status: &mut ChatModelStatus,
    now: jiff::Timestamp,
) -> Result<(), Error> {
    let api: Api<FineTuneJob> = reconcile::namespaced(&ctx.client, model);
    let mut jobs = std::collections::BTreeMap::new();
    for name in model
        .spec
        .adapters
        .iter()
        .filter_map(|a| a.fine_tune_job.as_ref())
    {
        if let Some(job) = api.get_opt(name).await? {
            jobs.insert(name.clone(), job);
        }
    }
    let (ready, waiting) = super::adapters::resolve(&model.spec.adapters, &jobs, files.claim.as_deref());
    let mut claims: Vec<String> = ready
        .iter()
        .filter_map(|a| a.claim.clone())
        .filter(|c| Some(c) != files.claim.as_ref())
        .collect();
    claims.sort();
    claims.dedup();
    files.adapter_claims = claims;
    status.adapters = ready.iter().map(|a| a.status()).collect();
    status.adapter_count = i32::try_from(ready.len()).unwrap_or(i32::MAX);
    if model.spec.adapters.is_empty() {
        status.conditions.retain(|c| c.type_ != "AdaptersAvailable");
    } else {
        let (ok, reason, message) = match waiting.is_empty() {
            true => (
                true,
                "Resolved",
                format!("{} adapter(s) can be served", ready.len()),
            ),
            false => (false, "Waiting", waiting.join("; ")),
        };
        crate::conditions::set(
            &mut status.conditions,
            "AdaptersAvailable",
            ok,
            reason,
            &message,
            &Time(now),
            model.metadata.generation,
        );
    }
    Ok(())
}

/// The workers' desired and ready replicas now, summed over both Deployments; `None` before they exist. The
/// desired leave out the replacements of leaving workers (each Deployment's [`build::SURGE_ANNOTATION`]).
async fn observe_workers(ctx: &Context, model: &ChatModel) -> Result<Option<(i32, i32)>, Error> {
    let api: Api<Deployment> = reconcile::namespaced(&ctx.client, model);
    let mut found = None;
    for name in [build::workers_name(model), build::spot_workers_name(model)] {
        if let Some(d) = api.get_opt(&name).await? {
            let surge = d
                .annotations()
                .get(build::SURGE_ANNOTATION)
                .and_then(|s| s.parse::<i32>().ok())
                .unwrap_or(0);
            let (desired, ready) = found.get_or_insert((0, 0));
            let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            *desired += replicas.saturating_sub(surge).max(0);
            *ready += d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        }
    }
    Ok(found)
}

/// The model's worker pods, each with its node's termination notice, if any ([`spot::notice`]). Each node is
/// read once per reconcile, and only for pods that still count.
async fn observe_pods(ctx: &Context, model: &ChatModel) -> Result<Vec<spot::Worker>, Error> {
    let pods: Api<Pod> = reconcile::namespaced(&ctx.client, model);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let selector = build::worker_selector_text(model);
    let mut notices: HashMap<String, Option<String>> = HashMap::new();
    let mut workers = Vec::new();
    for pod in pods.list(&ListParams::default().labels(&selector)).await?.items {
        let mut worker = spot::Worker::of(&pod);
        if let (true, Some(node)) = (worker.active, &worker.node) {
            if !notices.contains_key(node) {
                let notice = spot::notice(nodes.get_opt(node).await?.as_ref());
                notices.insert(node.clone(), notice);
            }
            worker.notice = notices.get(node).cloned().flatten();
        }
        workers.push(worker);
    }
    Ok(workers)
}

/// Applies the children unless the same were applied last time and the workers still run `observed` replicas.
async fn apply(
    ctx: &Context,
    model: &ChatModel,
    files: &ModelFiles,
    replicas: i32,
    surge: Surge,
    observed: Option<i32>,
) -> Result<(), Error> {
    let children = build::children(model, files, replicas, surge, &ctx.settings)?;
    let uid = model.uid().unwrap_or_default();
    let print = fingerprint(&format!("{children:?}"));
    let same = ctx.applied.lock().is_ok_and(|a| a.get(&uid) == Some(&print));
    if same && observed == Some(replicas) {
        return Ok(());
    }
    apply_children(ctx, model, &children).await?;
    if let Ok(mut a) = ctx.applied.lock() {
        a.insert(uid, print);
    }
    Ok(())
}

/// Applies each child over nothing, or over the object this model controls: never over a foreign one of the
/// same name ([`reconcile::apply_owned`]).
async fn apply_children(ctx: &Context, model: &ChatModel, children: &build::Children) -> Result<(), Error> {
    // The workers' account first: their pods are refused without it.
    let accounts: Api<ServiceAccount> = reconcile::namespaced(&ctx.client, model);
    reconcile::apply_owned(&accounts, &build::workers_name(model), &children.account, model).await?;
    let services: Api<Service> = reconcile::namespaced(&ctx.client, model);
    reconcile::apply_owned(&services, &build::service_name(model), &children.service, model).await?;
    let deployments: Api<Deployment> = reconcile::namespaced(&ctx.client, model);
    reconcile::apply_owned(
        &deployments,
        &build::workers_name(model),
        &children.workers,
        model,
    )
    .await?;
    let spot = build::spot_workers_name(model);
    match &children.spot_workers {
        Some(workers) => reconcile::apply_owned(&deployments, &spot, workers, model).await?,
        None => {
            let uid = model.uid().unwrap_or_default();
            reconcile::delete_owned(&deployments, &spot, &uid, &DeleteParams::default()).await?
        }
    }
    let budgets: Api<PodDisruptionBudget> = reconcile::namespaced(&ctx.client, model);
    reconcile::apply_owned(&budgets, &build::workers_name(model), &children.budget, model).await?;
    let secrets: Api<Secret> = reconcile::namespaced(&ctx.client, model);
    let token = camelid_contracts::worker_auth::token_secret_name(&model.name_any());
    match &children.token {
        Some(secret) => reconcile::apply_owned(&secrets, &token, secret, model).await,
        None => {
            let uid = model.uid().unwrap_or_default();
            reconcile::delete_owned(&secrets, &token, &uid, &DeleteParams::default()).await
        }
    }
}

/// The pipeline on a fresh copy of `model`: validate → fetch (the model's files, the workers) → decide → apply →
/// status.
async fn reconcile_inner(model: &ChatModel, ctx: &Context) -> Result<Action, Error> {
    let now = jiff::Timestamp::now();
    let old = model.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = model.metadata.generation;
    status.endpoint = Some(build::service_name(model));
    status.selector = Some(build::worker_selector_text(model));
    let policy = validate(model)?;
    if let Err(denied) = ctx.settings.policy.check_chatmodel(model, &ctx.settings) {
        // Nothing is built: the spec waits for a change.
        let message = format!("refused by the operator's policy: {denied}");
        reconcile::refuse(ctx, model, &old, "PolicyDenied", &message, now).await?;
        return Ok(Action::await_change());
    }
    crate::conditions::admit(&mut status.conditions);
    let mut preempted = Vec::new();
    let resolved = match resolve(ctx, model).await? {
        Ok(mut files) => {
            observe_adapters(ctx, model, &mut files, &mut status, now).await?;
            Ok(files)
        }
        Err(source) => Err(source),
    };
    let note = match resolved {
        Err(source) => {
            let workers = observe_workers(ctx, model).await?;
            let (desired, ready) = workers.unwrap_or((0, 0));
            status::observe(&mut status, &source, desired, ready, &Time(now));
            None
        }
        Ok(files) => match serve(ctx, model, &policy, &files, &old, &mut status, now).await {
            Ok((note, notes)) => {
                preempted = notes;
                note
            }
            Err(e @ Error::NotOwned { .. }) => {
                // Neither applied over nor deleted: looked at again later, in case the other object goes.
                reconcile::refuse(ctx, model, &old, "NameConflict", &e.to_string(), now).await?;
                return Ok(Action::requeue(
                    crate::finetunejob::controller::NAME_CONFLICT_RETRY,
                ));
            }
            Err(e) => return Err(e),
        },
    };
    let note = match note {
        None if status.phase != old.phase => {
            let phase = status.phase.map(|p| p.as_str()).unwrap_or_default();
            Some(Note::normal("PhaseChanged", format!("now {phase}")))
        }
        note => note,
    };
    reconcile::write_status(ctx, model, &old, &status, note).await?;
    // After the status, as `write_status` does: an Event never tells of a count the status does not have yet.
    for note in preempted {
        crate::events::publish(
            &ctx.recorder,
            &model.object_ref(&()),
            note.type_,
            note.reason,
            note.message,
        )
        .await;
    }
    Ok(Action::requeue(ctx.period))
}

impl reconcile::Refusable for ChatModelStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

/// Validate: the autoscaling policy, which needs a readable `scaleDownDelay`.
fn validate(model: &ChatModel) -> Result<Policy, Error> {
    Policy::of(model).ok_or_else(|| {
        Error::Invalid(format!(
            "spec.autoscaling.scaleDownDelay {:?} is not a duration like 5m or 1h30m",
            model.spec.autoscaling.scale_down_delay
        ))
    })
}

/// The model's files are there: observe the workers and the load, decide the replicas and the replacements of
/// leaving workers, apply the children and record it all in `status`. Returns the Event to record (a scale
/// decision, or else a new model revision) and a `WorkerPreempted` Event for each worker newly leaving.
async fn serve(
    ctx: &Context,
    model: &ChatModel,
    policy: &Policy,
    files: &ModelFiles,
    old: &ChatModelStatus,
    status: &mut ChatModelStatus,
    now: jiff::Timestamp,
) -> Result<(Option<Note>, Vec<Note>), Error> {
    let now_time = Time(now);
    let workers = observe_workers(ctx, model).await?;
    let pods = observe_pods(ctx, model).await?;
    let (current, ready) = workers.unwrap_or((policy.min, 0));
    let decision = decide(ctx, model, policy, current, now).await?;
    let surge = spot::surge(build::split(model, decision.replicas), &pods);
    apply(ctx, model, files, decision.replicas, surge, workers.map(|w| w.0)).await?;
    let preempted = spot::record(status, &pods, surge);
    for _ in &preempted {
        ctx.metrics.worker_preempted();
    }
    status.replacing = surge.total();
    count_migrations(ctx, model, status, now).await;
    let mut note = None;
    if workers.is_some() && decision.replicas != current {
        let reason = if decision.replicas == 0 {
            "ScaledToZero"
        } else if decision.replicas > current {
            "ScaledUp"
        } else {
            "ScaledDown"
        };
        status.last_scale = Some(ScaleDecision {
            time: now_time.clone(),
            from: current,
            to: decision.replicas,
            reason: decision.reason.clone(),
        });
        ctx.metrics.scaled(reason);
        note = Some(Note::normal(
            reason,
            format!("{current} → {}: {}", decision.replicas, decision.reason),
        ));
    }
    status.model = Some(files.shown.clone());
    if status.model_revision.as_ref() != Some(&files.revision) && old.model_revision.is_some() {
        note.get_or_insert(Note::normal(
            "ModelUpdated",
            format!("rolling the workers to revision {}", files.revision),
        ));
    }
    status.model_revision = Some(files.revision.clone());
    status::observe(
        status,
        &Source::Ready,
        decision.replicas,
        ready.min(decision.replicas),
        &now_time,
    );
    Ok((note, preempted))
}

/// Adds the streams the gateways migrated since the last read to `status.migrations` ([`Migrations`]); nothing
/// when no gateway answered. The counts read are remembered before the status is written, so a failed status write
/// loses that one increase: an undercount, never a double count.
async fn count_migrations(
    ctx: &Context,
    model: &ChatModel,
    status: &mut ChatModelStatus,
    now: jiff::Timestamp,
) {
    let namespace = model.namespace().unwrap_or_default();
    let Some(counts) = ctx
        .gateways
        .migrations_of(&ctx.client, &namespace, &model.name_any())
        .await
    else {
        return;
    };
    let Ok(mut all) = ctx.migrations.lock() else {
        return;
    };
    let new = all
        .entry(model.uid().unwrap_or_default())
        .or_default()
        .advance(&counts, now.as_second());
    let new = i64::try_from(new).unwrap_or(i64::MAX);
    status.migrations = status.migrations.saturating_add(new);
}

/// Decide: the autoscaler's replicas for the gateways' load of `model`, given its recent recommendations.
async fn decide(
    ctx: &Context,
    model: &ChatModel,
    policy: &Policy,
    current: i32,
    now: jiff::Timestamp,
) -> Result<autoscale::Decision, Error> {
    let namespace = model.namespace().unwrap_or_default();
    let load = ctx
        .gateways
        .load_of(&ctx.client, &namespace, &model.name_any())
        .await;
    let mut histories = ctx
        .histories
        .lock()
        .map_err(|_| Error::Invalid("poisoned".into()))?;
    let history = histories.entry(model.uid().unwrap_or_default()).or_default();
    Ok(autoscale::decide(policy, current, load, history, now.as_second()))
}
