//! The FineTuneJob controller: fetch (the job's attempt: its Job, pods, their nodes, rank 0's `/progress`) →
//! decide ([`super::decide`]) → apply (children by server-side apply, deletions) → status (`patch_status`), with
//! an Event on every phase change. Watches FineTuneJobs, the Jobs they own and their pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use camelid_crds::finetunejob::{FineTuneJobPhase, FineTuneJobStatus};
use camelid_crds::{ChatModel, FineTuneJob};
use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::build::{self, Attempt, Settings};
use super::decide::{self, Decision, JobView, PodPhase, PodView, RestartReason, State};
use super::spot::Capacity;
use super::status;
use crate::error::Error;
use crate::metrics::Metrics;

/// The field manager of everything this controller writes.
pub const MANAGER: &str = camelid_contracts::names::MANAGER;

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
    pub fn new(
        client: Client,
        settings: Settings,
        prices: Option<(String, String)>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            prices,
            progress_port: camelid_contracts::names::TRAINER_PROGRESS_PORT,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            poll: Duration::from_secs(15),
            metrics,
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    // One malformed FineTuneJob (say, written before a schema change) must not break the watch of all of them.
    let jobs = Api::<DeserializeGuard<FineTuneJob>>::all(client.clone());
    let selector = "app.kubernetes.io/managed-by=camelid-operator,app.kubernetes.io/component=trainer";
    Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(
            Api::<Job>::all(client.clone()),
            watcher::Config::default().labels(selector),
        )
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default().labels(selector),
            |pod| {
                let name = pod.labels().get("camelid.dev/finetunejob")?.clone();
                Some(ObjectRef::<DeserializeGuard<FineTuneJob>>::new(&name).within(&pod.namespace()?))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

fn error_policy(job: Arc<DeserializeGuard<FineTuneJob>>, e: &Error, ctx: Arc<Context>) -> Action {
    e.retry_policy("FineTuneJob", &job.name_any(), &ctx.metrics)
}

/// The observed state of the current attempt.
struct Observed {
    job: Option<JobView>,
    pods: Vec<PodView>,
    rank0_ip: Option<String>,
    running: bool,
}

async fn observe(ctx: &Context, ftj: &FineTuneJob, attempt: i32) -> Result<Observed, Error> {
    let ns = ftj.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job = jobs.get_opt(&build::job_name(ftj, attempt)).await?.map(|j| {
        let cond = |t: &str| {
            j.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
        };
        JobView {
            complete: cond("Complete"),
            failed: cond("Failed"),
        }
    });
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let selector = format!(
        "camelid.dev/finetunejob={},camelid.dev/attempt={attempt}",
        ftj.name_any()
    );
    let mut views = Vec::new();
    let mut rank0_ip = None;
    let mut running = false;
    for pod in pods.list(&ListParams::default().labels(&selector)).await?.items {
        let status = pod.status.clone().unwrap_or_default();
        let phase = match status.phase.as_deref() {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        };
        running |= phase == PodPhase::Running;
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let (node_gone, node_terminating) = match &node_name {
            Some(n) => match nodes.get_opt(n).await? {
                None => (true, false),
                Some(node) => {
                    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
                    (
                        false,
                        taints
                            .iter()
                            .any(|t| camelid_contracts::names::TERMINATION_TAINTS.contains(&t.key.as_str())),
                    )
                }
            },
            None => (false, false),
        };
        let exit_code = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == "trainer")
            .and_then(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code));
        let index = pod
            .labels()
            .get("batch.kubernetes.io/job-completion-index")
            .cloned();
        if index.as_deref() == Some("0") && phase == PodPhase::Running {
            rank0_ip = status.pod_ip.clone();
        }
        views.push(PodView {
            name: pod.name_any(),
            phase,
            scheduled: node_name.is_some(),
            node_gone,
            node_terminating,
            disruption_target: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "DisruptionTarget" && c.status == "True"),
            exit_code,
            deleting: pod.metadata.deletion_timestamp.is_some(),
        });
    }
    Ok(Observed {
        job,
        pods: views,
        rank0_ip,
        running,
    })
}

async fn progress(ctx: &Context, ip: &str) -> Option<status::Progress> {
    let url = format!("http://{ip}:{}/progress", ctx.progress_port);
    let response = ctx.http.get(&url).send().await.ok()?;
    response.error_for_status().ok()?.json().await.ok()
}

async fn prices(ctx: &Context) -> BTreeMap<String, String> {
    let Some((ns, name)) = &ctx.prices else {
        return BTreeMap::new();
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.data)
        .unwrap_or_default()
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

async fn apply_children(ctx: &Context, ftj: &FineTuneJob, attempt: Attempt) -> Result<(), Error> {
    let children = build::children(ftj, attempt, &ctx.settings)?;
    let ns = ftj.namespace().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&build::service_name(ftj), &pp, &Patch::Apply(&children.service))
        .await?;
    Api::<Job>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &build::job_name(ftj, attempt.number),
            &pp,
            &Patch::Apply(&children.job),
        )
        .await?;
    Ok(())
}

/// Applies the children of `attempt` and records it in `status`.
async fn start_attempt(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    attempt: Attempt,
    now: &Time,
) -> Result<(), Error> {
    apply_children(ctx, ftj, attempt).await?;
    status.attempt = attempt.number;
    status.capacity = Some(attempt.capacity.as_str().into());
    status.attempt_start_time = Some(now.clone());
    status.start_time.get_or_insert(now.clone());
    status.accounted_until = None;
    Ok(())
}

async fn delete_attempt(ctx: &Context, ftj: &FineTuneJob, attempt: i32) -> Result<(), Error> {
    let ns = ftj.namespace().unwrap_or_default();
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match Api::<Job>::namespaced(ctx.client.clone(), &ns)
        .delete(&build::job_name(ftj, attempt), &dp)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates or points the job's ChatModel at the exported model.
async fn publish_model(ctx: &Context, ftj: &FineTuneJob) -> Result<(), Error> {
    let Some(name) = &ftj.spec.output.chat_model else {
        return Ok(());
    };
    let ns = ftj.namespace().unwrap_or_default();
    // By the job, not its output path: the ChatModel's workers then roll whenever the job exports again.
    let patch = json!({
        "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
        "metadata": {"name": name, "namespace": ns, "labels": {"camelid.dev/finetunejob": ftj.name_any()}},
        "spec": {"model": {"fineTuneJob": ftj.name_any()}, "template": ftj.spec.template},
    });
    Api::<ChatModel>::namespaced(ctx.client.clone(), &ns)
        .patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

pub async fn reconcile(
    guarded: Arc<DeserializeGuard<FineTuneJob>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ftj = match &guarded.0 {
        Ok(ftj) => ftj,
        Err(_) => {
            crate::events::invalid_spec(&ctx.recorder, &ctx.metrics, "FineTuneJob", &guarded).await;
            return Ok(Action::await_change());
        }
    };
    let result = reconcile_fresh(ftj, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// Reconciles from a fresh read: the watch cache may not have this controller's own last status write yet, and
/// acting on an older attempt number would start that attempt again.
async fn reconcile_fresh(cached: &FineTuneJob, ctx: &Context) -> Result<Action, Error> {
    let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    match api.get_opt(&cached.name_any()).await? {
        Some(fresh) => reconcile_inner(&fresh, ctx).await,
        None => Ok(Action::await_change()),
    }
}

async fn reconcile_inner(ftj: &FineTuneJob, ctx: &Context) -> Result<Action, Error> {
    let old = ftj.status.clone().unwrap_or_default();
    if matches!(
        old.phase,
        Some(FineTuneJobPhase::Succeeded | FineTuneJobPhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    let now = jiff::Timestamp::now();
    let now_time = Time(now);
    let mut status = old.clone();
    let attempt = status.attempt;
    let observed = if attempt > 0 {
        Some(observe(ctx, ftj, attempt).await?)
    } else {
        None
    };
    let state = State {
        attempt,
        capacity: capacity_of(&status),
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
    };
    let decision = match &observed {
        None => decide::decide(&state, None, &[]),
        Some(o) => decide::decide(&state, o.job, &o.pods),
    };
    if let Some(o) = &observed {
        if let Some(ip) = &o.rank0_ip
            && let Some(p) = progress(ctx, ip).await
        {
            status::apply_progress(&mut status, &p);
        }
        status::account(&mut status, now, o.running, state.capacity, gpus_in_gang(ftj));
    }
    let generation = ftj.metadata.generation;
    let mut event: Option<(EventType, &str, String)> = None;
    let requeue = match decision {
        Decision::Start { attempt, capacity } => {
            start_attempt(
                ctx,
                ftj,
                &mut status,
                Attempt {
                    number: attempt,
                    capacity,
                },
                &now_time,
            )
            .await?;
            status.phase = Some(FineTuneJobPhase::Pending);
            event = Some((
                EventType::Normal,
                "AttemptStarted",
                format!("attempt {attempt} on {} capacity", capacity.as_str()),
            ));
            ctx.poll.min(Duration::from_secs(10))
        }
        Decision::Wait => {
            let running = observed.as_ref().is_some_and(|o| o.running);
            status.phase = Some(match (running, status.phase) {
                (true, _) => FineTuneJobPhase::Running,
                (false, Some(FineTuneJobPhase::Recovering)) => FineTuneJobPhase::Recovering,
                (false, _) => FineTuneJobPhase::Pending,
            });
            if running {
                ctx.poll
            } else {
                ctx.poll.min(Duration::from_secs(10))
            }
        }
        Decision::CheckpointFirst { pods } => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ftj.namespace().unwrap_or_default());
            let dp = DeleteParams {
                grace_period_seconds: Some(ctx.settings.termination_grace_seconds as u32),
                ..DeleteParams::default()
            };
            for pod in &pods {
                let _ = api.delete(pod, &dp).await;
            }
            event = Some((
                EventType::Normal,
                "CheckpointRequested",
                format!(
                    "termination notice on the nodes of {}: asked them to checkpoint",
                    pods.join(", ")
                ),
            ));
            Duration::from_secs(5)
        }
        Decision::Restart {
            reason,
            attempt,
            capacity,
            why,
        } => {
            delete_attempt(ctx, ftj, status.attempt).await?;
            match reason {
                RestartReason::Preempted => {
                    status.preemptions += 1;
                    status.lost_gpu_hours += status::lost_gpu_hours(&status, now, gpus_in_gang(ftj));
                    status.lost_gpu_hours = (status.lost_gpu_hours * 1e6).round() / 1e6;
                    ctx.metrics.preempted();
                }
                RestartReason::Failed => status.restarts += 1,
                RestartReason::PendingTimeout => {}
            }
            start_attempt(
                ctx,
                ftj,
                &mut status,
                Attempt {
                    number: attempt,
                    capacity,
                },
                &now_time,
            )
            .await?;
            status.phase = Some(FineTuneJobPhase::Recovering);
            let kind = match reason {
                RestartReason::Preempted => "Preempted",
                RestartReason::PendingTimeout => "SpotUnavailable",
                RestartReason::Failed => "AttemptFailed",
            };
            let message = format!(
                "{why}; attempt {attempt} resumes from the last checkpoint on {} capacity",
                capacity.as_str()
            );
            status.message = Some(message.clone());
            event = Some((
                if reason == RestartReason::Failed {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                kind,
                message,
            ));
            Duration::from_secs(5)
        }
        Decision::Succeeded => {
            publish_model(ctx, ftj).await?;
            status.phase = Some(FineTuneJobPhase::Succeeded);
            status.completion_time = Some(now_time.clone());
            status.accounted_until = None;
            status.output = Some(format!(
                "pvc://{}/{}",
                ftj.spec.output.claim_name,
                ftj.spec
                    .output
                    .path
                    .clone()
                    .unwrap_or_else(|| format!("models/{}", ftj.name_any()))
            ));
            status.message = Some("the model is exported".into());
            event = Some((
                EventType::Normal,
                "Succeeded",
                format!("exported to {}", status.output.clone().unwrap_or_default()),
            ));
            Duration::ZERO
        }
        Decision::Failed { why } => {
            status.phase = Some(FineTuneJobPhase::Failed);
            status.completion_time = Some(now_time.clone());
            status.accounted_until = None;
            status.message = Some(why.clone());
            event = Some((EventType::Warning, "Failed", why));
            Duration::ZERO
        }
    };
    let phase = status.phase.map(|p| p.as_str()).unwrap_or_default();
    if event.is_none() && status.phase != old.phase {
        event = Some((EventType::Normal, "PhaseChanged", format!("now {phase}")));
    }
    let succeeded = status.phase == Some(FineTuneJobPhase::Succeeded);
    let message = status.message.clone().unwrap_or_default();
    crate::conditions::set(
        &mut status.conditions,
        "Ready",
        succeeded,
        &phase,
        &message,
        &now_time,
        generation,
    );
    status.estimated_cost = status::estimated_cost(&status, ftj.spec.gpu_type.as_deref(), &prices(ctx).await);
    status.observed_generation = generation;
    if status != old {
        let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), &ftj.namespace().unwrap_or_default());
        let patch = json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "status": status});
        api.patch_status(
            &ftj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    if let Some((type_, reason, note)) = event {
        crate::events::publish(&ctx.recorder, &ftj.object_ref(&()), type_, reason, note).await;
    }
    Ok(if requeue.is_zero() {
        Action::await_change()
    } else {
        Action::requeue(requeue)
    })
}
