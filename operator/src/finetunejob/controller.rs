//! The FineTuneJob controller: fetch (a fresh copy of the job, then its attempt: Job, pods, their nodes, rank 0's
//! `/progress`, [`super::observe`]) → validate (the spec's limits into the decision's [`State`]) → decide
//! ([`super::decide`]) → apply (children by server-side apply, deletions) → status (`patch_status`), with an
//! Event on every phase change. Watches FineTuneJobs, the Jobs they own (the attempts' and the evaluation's) and
//! their pods. A job with `spec.evaluation` goes through the promotion gate after training ([`super::evaluate`]).
//! The guard around each reconcile and the error policy are [`crate::reconcile`]'s, shared with the ChatModel
//! controller.

use std::sync::Arc;
use std::time::Duration;

use camelid_crds::finetunejob::{FineTuneJobPhase, FineTuneJobStatus};
use camelid_crds::{ChatModel, FineTuneJob};
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::build::{self, Attempt};
use super::decide::{self, Decision, RestartReason, State};
use super::evaluate;
use super::gate;
use super::observe::{self, Observed};
use super::publish::{PUBLISHED_BY_ANNOTATION, may_publish_over};
use super::status;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::placement::Capacity;
use crate::reconcile::{self, Controlled, Note};
use crate::settings::Settings;

/// What reconciles need.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// The GPU prices ConfigMap (`namespace`, `name`).
    pub prices: Option<(String, String)>,
    /// Port of the trainers' `/progress`.
    pub progress_port: u16,
    pub http: reqwest::Client,
    /// How often a running job's progress is read.
    pub poll: Duration,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// Fails only when the HTTP client that reads the trainers' `/progress` cannot be built.
    pub fn new(
        client: Client,
        settings: Settings,
        prices: Option<(String, String)>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            recorder: reconcile::recorder(&client),
            client,
            settings,
            prices,
            progress_port: camelid_contracts::names::TRAINER_PROGRESS_PORT,
            http: reconcile::http_client(Duration::from_secs(2))?,
            poll: Duration::from_secs(15),
            metrics,
        })
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
    // One malformed FineTuneJob (say, written before a schema change) must not break the watch of all of them.
    let jobs = Api::<DeserializeGuard<FineTuneJob>>::all(client.clone());
    // The attempts' Jobs and pods, and the evaluation's.
    let selector = format!(
        "app.kubernetes.io/managed-by=camelid-operator,app.kubernetes.io/component in (trainer,{})",
        camelid_contracts::names::EVALUATION_COMPONENT
    );
    Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(
            Api::<Job>::all(client.clone()),
            watcher::Config::default().labels(&selector),
        )
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(&selector),
            |pod| {
                let name = pod.labels().get("camelid.dev/finetunejob")?.clone();
                Some(ObjectRef::<DeserializeGuard<FineTuneJob>>::new(&name).within(&pod.namespace()?))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, reconcile::error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

pub async fn reconcile(
    guarded: Arc<DeserializeGuard<FineTuneJob>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    reconcile::guarded(&guarded, &*ctx, |cached| reconcile_fresh(cached, &ctx)).await
}

/// Reconciles from a fresh read: the watch cache may not have this controller's own last status write yet, and
/// acting on an older attempt number would start that attempt again.
async fn reconcile_fresh(cached: &FineTuneJob, ctx: &Context) -> Result<Action, Error> {
    match reconcile::fetch(&ctx.client, cached).await? {
        Some(fresh) => reconcile_inner(&fresh, ctx).await,
        None => Ok(Action::await_change()),
    }
}

/// What acting on a decision changed besides the status: when to look again, and what to tell users.
pub(super) struct Step {
    /// Zero: wait for a change.
    pub(super) requeue: Duration,
    pub(super) note: Option<Note>,
}

/// The pipeline on a fresh copy of `ftj`: training (or the promotion gate, or a promotion by hand), then status.
async fn reconcile_inner(ftj: &FineTuneJob, ctx: &Context) -> Result<Action, Error> {
    let old = ftj.status.clone().unwrap_or_default();
    if finished(ftj, &old) {
        return Ok(Action::await_change());
    }
    let now = jiff::Timestamp::now();
    if let Err(denied) = ctx.settings.policy.check_finetunejob(ftj, &ctx.settings) {
        // Nothing is built: the spec waits for a change.
        let message = format!("refused by the operator's policy: {denied}");
        reconcile::refuse(ctx, ftj, &old, "PolicyDenied", &message, now).await?;
        return Ok(Action::await_change());
    }
    let mut status = old.clone();
    crate::conditions::admit(&mut status.conditions);
    let step = match old.phase {
        Some(FineTuneJobPhase::Evaluating) => evaluate::watch(ctx, ftj, &mut status, now).await,
        // Not finished, so a person asked to promote it.
        Some(FineTuneJobPhase::Rejected) => evaluate::promote(ctx, ftj, &mut status).await,
        _ => train(ctx, ftj, &mut status, now).await,
    };
    let step = match step {
        Ok(step) => step,
        Err(e @ Error::NotOwned { .. }) => {
            // Neither applied over nor deleted: looked at again later, in case the other object goes.
            reconcile::refuse(ctx, ftj, &old, "NameConflict", &e.to_string(), now).await?;
            return Ok(Action::requeue(NAME_CONFLICT_RETRY));
        }
        Err(e) => return Err(e),
    };
    write_status(ctx, ftj, &old, status, step.note, now).await?;
    Ok(if step.requeue.is_zero() {
        Action::await_change()
    } else {
        Action::requeue(step.requeue)
    })
}

/// Training: validate → fetch the attempt → decide → apply.
async fn train(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    let state = validate(ftj, status, now);
    let observed = match state.attempt {
        0 => None,
        attempt => Some(observe::observe(ctx, ftj, attempt).await?),
    };
    let decision = match &observed {
        None => decide::decide(&state, None, &[]),
        Some(o) => decide::decide(&state, o.job, &o.pods),
    };
    if let Some(o) = &observed {
        record_progress(ctx, ftj, status, o, state.capacity, now).await;
    }
    let running = observed.as_ref().is_some_and(|o| o.running);
    act(ctx, ftj, decision, running, status, now).await
}

/// How often an object whose child's name is taken by a foreign object is looked at again.
pub(crate) const NAME_CONFLICT_RETRY: Duration = Duration::from_secs(30);

impl reconcile::Refusable for FineTuneJobStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }

    /// The job's message, the last thing that happened in words, is why it is refused.
    fn show_refusal(&mut self, message: &str) {
        self.message = Some(message.to_string());
    }
}

/// A job that succeeded or failed is done: nothing is reconciled until its spec changes. A rejected one is done
/// until a person asks to promote it; an evaluating one is still being decided.
fn finished(ftj: &FineTuneJob, status: &FineTuneJobStatus) -> bool {
    match status.phase {
        Some(FineTuneJobPhase::Succeeded | FineTuneJobPhase::Failed) => true,
        Some(FineTuneJobPhase::Rejected) => !gate::promote_requested(ftj),
        Some(
            FineTuneJobPhase::Pending
            | FineTuneJobPhase::Running
            | FineTuneJobPhase::Recovering
            | FineTuneJobPhase::Evaluating,
        )
        | None => false,
    }
}

/// Validate: the spec's limits and durations, and the status so far, as the decision table's state. An
/// unreadable `pendingTimeout` (the CRD's pattern refuses one) falls back to 10 minutes.
fn validate(ftj: &FineTuneJob, status: &FineTuneJobStatus, now: jiff::Timestamp) -> State {
    State {
        attempt: status.attempt,
        capacity: capacity_of(status),
        preemptions: status.preemptions,
        restarts: status.restarts,
        max_preemptions: ftj.spec.spot.max_preemptions,
        max_restarts: ftj.spec.max_restarts,
        prefer_spot: ftj.spec.spot.prefer_spot,
        pending_timeout_secs: camelid_crds::common::parse_duration(&ftj.spec.spot.pending_timeout)
            .unwrap_or(600),
        attempt_age_secs: status
            .attempt_start_time
            .as_ref()
            .map_or(0, |t| (now - t.0).get_seconds().max(0) as u64),
        checkpoint_requested: status
            .conditions
            .iter()
            .any(|c| c.type_ == crate::conditions::TERMINATION_NOTICE && c.status == "True"),
    }
}

/// Rank 0's progress into `status`, and the GPU-hours of the attempt so far.
async fn record_progress(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    observed: &Observed,
    capacity: Capacity,
    now: jiff::Timestamp,
) {
    if let Some(ip) = &observed.rank0_ip
        && let Some(p) = observe::progress(ctx, ip).await
    {
        status::apply_progress(status, &p);
    }
    status::account(status, now, observed.running, capacity, gpus_in_gang(ftj));
}

/// Apply: carries out `decision` on the cluster and in `status`.
async fn act(
    ctx: &Context,
    ftj: &FineTuneJob,
    decision: Decision,
    running: bool,
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    match decision {
        Decision::Start { attempt, capacity } => {
            let attempt = Attempt {
                number: attempt,
                capacity,
            };
            start(ctx, ftj, status, attempt, now).await
        }
        Decision::Wait => Ok(wait(ctx, status, running)),
        Decision::CheckpointFirst { pods } => checkpoint_first(ctx, ftj, &pods, status, now).await,
        Decision::Restart {
            reason,
            attempt,
            capacity,
            why,
        } => {
            let attempt = Attempt {
                number: attempt,
                capacity,
            };
            restart(ctx, ftj, status, reason, attempt, &why, now).await
        }
        Decision::Succeeded => match &ftj.spec.evaluation {
            Some(evaluation) => evaluate::start(ctx, ftj, evaluation, status, now).await,
            None => succeed(ctx, ftj, status, now).await,
        },
        Decision::Failed { why } => Ok(fail(status, why, now)),
    }
}

/// The first attempt.
async fn start(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    attempt: Attempt,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    start_attempt(ctx, ftj, status, attempt, &Time(now)).await?;
    status.phase = Some(FineTuneJobPhase::Pending);
    let message = format!(
        "attempt {} on {} capacity",
        attempt.number,
        attempt.capacity.as_str()
    );
    Ok(Step {
        requeue: ctx.poll.min(Duration::from_secs(10)),
        note: Some(Note::normal("AttemptStarted", message)),
    })
}

/// Nothing to do but watch: the phase follows whether the gang runs.
fn wait(ctx: &Context, status: &mut FineTuneJobStatus, running: bool) -> Step {
    status.phase = Some(match (running, status.phase) {
        (true, _) => FineTuneJobPhase::Running,
        (false, Some(FineTuneJobPhase::Recovering)) => FineTuneJobPhase::Recovering,
        (false, _) => FineTuneJobPhase::Pending,
    });
    Step {
        requeue: if running {
            ctx.poll
        } else {
            ctx.poll.min(Duration::from_secs(10))
        },
        note: None,
    }
}

/// A termination notice on the nodes of `pods`: deleting them with the grace period asks their trainers to write
/// a checkpoint. Every pod is asked; the first failure (other than a pod already gone) is returned afterwards.
async fn checkpoint_first(
    ctx: &Context,
    ftj: &FineTuneJob,
    pods: &[String],
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    let api: Api<Pod> = reconcile::namespaced(&ctx.client, ftj);
    let dp = DeleteParams {
        grace_period_seconds: Some(ctx.settings.termination_grace_seconds as u32),
        ..DeleteParams::default()
    };
    let mut failed = None;
    for pod in pods {
        if let Err(e) = reconcile::delete(&api, pod, &dp).await {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let message = format!(
        "termination notice on the nodes of {}: asked them to checkpoint",
        pods.join(", ")
    );
    // Remembered: the pods may be gone, exit codes and all, by the time the attempt is seen to end.
    crate::conditions::set(
        &mut status.conditions,
        crate::conditions::TERMINATION_NOTICE,
        true,
        "CheckpointRequested",
        &message,
        &Time(now),
        ftj.metadata.generation,
    );
    Ok(Step {
        requeue: Duration::from_secs(5),
        note: Some(Note::normal("CheckpointRequested", message)),
    })
}

/// Replaces the current attempt with `attempt`, which resumes from the last checkpoint.
async fn restart(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    reason: RestartReason,
    attempt: Attempt,
    why: &str,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    delete_attempt(ctx, ftj, status.attempt).await?;
    match reason {
        RestartReason::Preempted => {
            status.preemptions += 1;
            status.lost_gpu_hours += status::lost_gpu_hours(status, now, gpus_in_gang(ftj));
            status.lost_gpu_hours = (status.lost_gpu_hours * 1e6).round() / 1e6;
            ctx.metrics.preempted();
        }
        RestartReason::Failed => status.restarts += 1,
        RestartReason::PendingTimeout => {}
    }
    start_attempt(ctx, ftj, status, attempt, &Time(now)).await?;
    status.phase = Some(FineTuneJobPhase::Recovering);
    let message = format!(
        "{why}; attempt {} resumes from the last checkpoint on {} capacity",
        attempt.number,
        attempt.capacity.as_str()
    );
    status.message = Some(message.clone());
    let note = match reason {
        RestartReason::Preempted => Note::normal("Preempted", message),
        RestartReason::PendingTimeout => Note::normal("SpotUnavailable", message),
        RestartReason::Failed => Note::warning("AttemptFailed", message),
    };
    Ok(Step {
        requeue: Duration::from_secs(5),
        note: Some(note),
    })
}

/// The model is exported: recorded, and published as the job's ChatModel.
pub(super) async fn succeed(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    publish_model(ctx, ftj).await?;
    status.phase = Some(FineTuneJobPhase::Succeeded);
    status.completion_time = Some(Time(now));
    status.accounted_until = None;
    status
        .conditions
        .retain(|c| c.type_ != crate::conditions::TERMINATION_NOTICE);
    status.output = Some(build::output_uri(ftj));
    status.message = Some("the model is exported".into());
    let message = format!("exported to {}", status.output.clone().unwrap_or_default());
    Ok(Step {
        requeue: Duration::ZERO,
        note: Some(Note::normal("Succeeded", message)),
    })
}

/// The job cannot succeed.
fn fail(status: &mut FineTuneJobStatus, why: String, now: jiff::Timestamp) -> Step {
    status.phase = Some(FineTuneJobPhase::Failed);
    status.completion_time = Some(Time(now));
    status.accounted_until = None;
    status.message = Some(why.clone());
    Step {
        requeue: Duration::ZERO,
        note: Some(Note::warning("Failed", why)),
    }
}

/// Status: the `Ready` condition, the cost so far and the observed generation, written when anything changed,
/// with `note` (or, on a phase change without one, `PhaseChanged`) as an Event.
async fn write_status(
    ctx: &Context,
    ftj: &FineTuneJob,
    old: &FineTuneJobStatus,
    mut status: FineTuneJobStatus,
    note: Option<Note>,
    now: jiff::Timestamp,
) -> Result<(), Error> {
    let generation = ftj.metadata.generation;
    let phase = status.phase.map(|p| p.as_str()).unwrap_or_default();
    let note = match note {
        None if status.phase != old.phase => Some(Note::normal("PhaseChanged", format!("now {phase}"))),
        note => note,
    };
    let succeeded = status.phase == Some(FineTuneJobPhase::Succeeded);
    let message = status.message.clone().unwrap_or_default();
    crate::conditions::set(
        &mut status.conditions,
        "Ready",
        succeeded,
        phase,
        &message,
        &Time(now),
        generation,
    );
    status.estimated_cost =
        status::estimated_cost(&status, ftj.spec.gpu_type.as_deref(), &observe::prices(ctx).await);
    status.observed_generation = generation;
    reconcile::write_status(ctx, ftj, old, &status, note).await
}

fn gpus_in_gang(ftj: &FineTuneJob) -> i32 {
    ftj.spec.workers * ftj.spec.gpus_per_worker
}

fn capacity_of(status: &FineTuneJobStatus) -> Capacity {
    if status.capacity.as_deref() == Some("on-demand") {
        Capacity::OnDemand
    } else {
        Capacity::Spot
    }
}

/// Applies the children of `attempt` and records it in `status`.
async fn start_attempt(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    attempt: Attempt,
    now: &Time,
) -> Result<(), Error> {
    let children = build::children(ftj, attempt, &ctx.settings)?;
    // The pods' account first: the Job's pods are refused without it (the evaluation pod uses it too).
    let accounts: Api<ServiceAccount> = reconcile::namespaced(&ctx.client, ftj);
    reconcile::apply_owned(&accounts, &build::service_name(ftj), &children.account, ftj).await?;
    let services: Api<Service> = reconcile::namespaced(&ctx.client, ftj);
    reconcile::apply_owned(&services, &build::service_name(ftj), &children.service, ftj).await?;
    let jobs: Api<Job> = reconcile::namespaced(&ctx.client, ftj);
    let name = build::job_name(ftj, attempt.number);
    reconcile::apply_owned(&jobs, &name, &children.job, ftj).await?;
    status.attempt = attempt.number;
    status.capacity = Some(attempt.capacity.as_str().into());
    status.attempt_start_time = Some(now.clone());
    status.start_time.get_or_insert(now.clone());
    status.accounted_until = None;
    // A new attempt: its own trainers have not been asked to checkpoint.
    status
        .conditions
        .retain(|c| c.type_ != crate::conditions::TERMINATION_NOTICE);
    Ok(())
}

/// Deletes the Job of `attempt` (its pods in the background); one already gone is fine.
async fn delete_attempt(ctx: &Context, ftj: &FineTuneJob, attempt: i32) -> Result<(), Error> {
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let jobs: Api<Job> = reconcile::namespaced(&ctx.client, ftj);
    let uid = ftj.uid().unwrap_or_default();
    reconcile::delete_owned(&jobs, &build::job_name(ftj, attempt), &uid, &dp).await
}

/// Creates, or points at the exported model, the job's ChatModel; one the job did not create is left alone
/// ([`Error::NotOwned`]).
pub(super) async fn publish_model(ctx: &Context, ftj: &FineTuneJob) -> Result<(), Error> {
    let Some(name) = &ftj.spec.output.chat_model else {
        return Ok(());
    };
    if !ftj.spec.method.is_full() {
        return publish_adapter(ctx, ftj, name).await;
    }
    let ns = ftj.namespace().unwrap_or_default();
    let uid = ftj.uid().unwrap_or_default();
    let models: Api<ChatModel> = reconcile::namespaced(&ctx.client, ftj);
    let existing = models.get_opt(name).await?;
    if let Some(existing) = &existing
        && !may_publish_over(existing, &uid)
    {
        return Err(reconcile::not_owned::<ChatModel, _>(name, ftj));
    }
    // By the job, not its output path: the ChatModel's workers then roll whenever the job exports again. The
    // checked resourceVersion makes a ChatModel replaced in between a conflict, not a takeover.
    let mut patch = json!({
        "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
        "metadata": {"name": name, "namespace": ns, "labels": {"camelid.dev/finetunejob": ftj.name_any()},
                     "annotations": {PUBLISHED_BY_ANNOTATION: uid}},
        "spec": {"model": {"fineTuneJob": ftj.name_any()}, "template": ftj.spec.template},
    });
    if let Some(version) = existing.and_then(|m| m.metadata.resource_version) {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    reconcile::apply(&models, name, &patch).await
}

/// A LoRA job's adapter onto the ChatModel `name` ([`super::publish::adapter_patch`]), applied under a field
/// manager of the job's own so that other jobs' adapters stay.
async fn publish_adapter(ctx: &Context, ftj: &FineTuneJob, name: &str) -> Result<(), Error> {
    let models: Api<ChatModel> = reconcile::namespaced(&ctx.client, ftj);
    let existing = models.get_opt(name).await?;
    let patch = super::publish::adapter_patch(ftj, name, existing.as_ref()).map_err(Error::Invalid)?;
    let manager = format!("{}-adapter-{}", crate::MANAGER, ftj.name_any());
    reconcile::apply_as(&models, name, &patch, &manager).await
}
