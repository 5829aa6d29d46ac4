//! The promotion gate's steps of the FineTuneJob controller. When training succeeds and the job has
//! `spec.evaluation`, [`start`] records the export, resolves the baseline and applies the evaluation Job
//! ([`super::evaljob`]) instead of publishing the model; while the job is `Evaluating`, [`watch`] fetches that Job
//! and its gate pods, decides ([`super::gate`]) and publishes the ChatModel only on a pass; a `Rejected` job
//! that a person annotates `camelid.dev/promote: "true"` is published by [`promote`]. Each returns the
//! controller's [`Step`]; the controller writes the status.

use std::time::Duration;

use camelid_contracts::evaluation::Summary;
use camelid_contracts::names;
use camelid_crds::evaluation::EvaluationSpec;
use camelid_crds::finetunejob::{FineTuneJobPhase, FineTuneJobStatus};
use camelid_crds::{ChatModel, FineTuneJob};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::build;
use super::controller::{Context, Step, publish_model};
use super::decide::PodPhase;
use super::evaljob::{self, Baseline};
use super::gate::{self, GateJob, GateRun, GateView, Verdict};
use crate::chatmodel::status::Source;
use crate::error::Error;
use crate::reconcile::{self, Note};

/// How often an evaluation is looked at besides the watch of its Job and pods.
const EVALUATION_POLL: Duration = Duration::from_secs(30);
/// How often a baseline that is not servable yet is looked at again.
const BASELINE_POLL: Duration = Duration::from_secs(15);
/// The condition the gate's outcome is recorded in.
const EVALUATED: &str = "Evaluated";

/// Training is done: record the exported model, and start the evaluation Job against the baseline (or wait for
/// the baseline to be servable).
pub(super) async fn start(
    ctx: &Context,
    ftj: &FineTuneJob,
    spec: &EvaluationSpec,
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    status.phase = Some(FineTuneJobPhase::Evaluating);
    status.output = Some(build::output_uri(ftj));
    status.accounted_until = None;
    let baseline = match baseline(ctx, ftj, spec).await? {
        Ok(baseline) => baseline,
        Err(Source::Failed(why)) => {
            let why = format!("evaluation failed: the baseline cannot be served: {why}");
            return Ok(fail(ftj, status, why, now));
        }
        Err(Source::Waiting(why)) => {
            status.message = Some(format!("the model is exported; waiting for the baseline: {why}"));
            return Ok(Step {
                requeue: BASELINE_POLL,
                note: None,
            });
        }
        Err(Source::Ready) => return Err(Error::Invalid("a baseline resolved to no files".into())),
    };
    let job = evaljob::job(ftj, spec, &baseline, &ctx.settings)?;
    let jobs: Api<Job> = reconcile::namespaced(&ctx.client, ftj);
    reconcile::apply_owned(&jobs, &evaljob::job_name(ftj), &job, ftj).await?;
    let message = format!(
        "the model is exported; evaluating it against {} ({}) with the judge {}",
        baseline.name, baseline.files.shown, spec.judge.model
    );
    status.message = Some(message.clone());
    Ok(Step {
        requeue: EVALUATION_POLL,
        note: Some(Note::normal("EvaluationStarted", message)),
    })
}

/// Evaluating: fetch the evaluation Job and its pods → decide → publish, reject, fail or keep waiting.
pub(super) async fn watch(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    let Some(spec) = &ftj.spec.evaluation else {
        // The gate was taken out of the spec while it ran: the job ends as it would have without one.
        return super::controller::succeed(ctx, ftj, status, now).await;
    };
    let view = observe(ctx, ftj).await?;
    let runs = view.runs.len();
    match gate::decide(&view, spec.min_win_rate) {
        Verdict::Start => start(ctx, ftj, spec, status, now).await,
        Verdict::Rerun { why } => {
            delete_gate_job(ctx, ftj).await?;
            status.message = Some(why.clone());
            Ok(Step {
                requeue: Duration::from_secs(5),
                note: Some(Note::normal("EvaluationRerun", why)),
            })
        }
        Verdict::Running { retried } => {
            if let Some(retried) = retried {
                status.message = Some(retried);
            }
            Ok(Step {
                requeue: EVALUATION_POLL,
                note: None,
            })
        }
        Verdict::Passed { summary, why } => pass(ctx, ftj, status, &summary, runs, why, now).await,
        Verdict::Rejected { summary, why } => Ok(reject(ftj, status, &summary, runs, why, now)),
        Verdict::Failed { why } => Ok(fail(ftj, status, why, now)),
    }
}

/// The model won: publish it.
async fn pass(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    summary: &Summary,
    runs: usize,
    why: String,
    now: jiff::Timestamp,
) -> Result<Step, Error> {
    publish_model(ctx, ftj).await?;
    status.evaluation = Some(gate::record(summary, &out_uri(ftj), runs));
    status.phase = Some(FineTuneJobPhase::Succeeded);
    status.completion_time = Some(Time(now));
    status.message = Some(format!("the model is exported and passed its evaluation: {why}"));
    set_evaluated(ftj, status, true, "Passed", &why, now);
    Ok(Step {
        requeue: Duration::ZERO,
        note: Some(Note::normal("Evaluated", format!("passed: {why}"))),
    })
}

/// The model lost: it stays on its claim, unpublished, until a person promotes it.
fn reject(
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    summary: &Summary,
    runs: usize,
    why: String,
    now: jiff::Timestamp,
) -> Step {
    status.evaluation = Some(gate::record(summary, &out_uri(ftj), runs));
    status.phase = Some(FineTuneJobPhase::Rejected);
    status.completion_time = Some(Time(now));
    let message = format!(
        "rejected: {why}; the model stays at {}; to serve it anyway: kubectl annotate finetunejob {} {}=true",
        build::output_uri(ftj),
        ftj.name_any(),
        names::PROMOTE_ANNOTATION
    );
    status.message = Some(message.clone());
    set_evaluated(ftj, status, false, "Rejected", &why, now);
    Step {
        requeue: Duration::ZERO,
        note: Some(Note::warning("Rejected", message)),
    }
}

/// The evaluation could not be run: the job fails (a person can fix the cause and recreate the job).
fn fail(ftj: &FineTuneJob, status: &mut FineTuneJobStatus, why: String, now: jiff::Timestamp) -> Step {
    status.phase = Some(FineTuneJobPhase::Failed);
    status.completion_time = Some(Time(now));
    status.message = Some(why.clone());
    set_evaluated(ftj, status, false, "EvaluationFailed", &why, now);
    Step {
        requeue: Duration::ZERO,
        note: Some(Note::warning("EvaluationFailed", why)),
    }
}

/// A rejected model a person asked to serve anyway: publish it. The `Evaluated` condition keeps saying why it
/// was rejected.
pub(super) async fn promote(
    ctx: &Context,
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
) -> Result<Step, Error> {
    publish_model(ctx, ftj).await?;
    let why = status
        .conditions
        .iter()
        .find(|c| c.type_ == EVALUATED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let message = format!("promoted by hand despite the evaluation: {why}");
    status.phase = Some(FineTuneJobPhase::Succeeded);
    status.message = Some(message.clone());
    Ok(Step {
        requeue: Duration::ZERO,
        note: Some(Note::normal("Promoted", message)),
    })
}

fn set_evaluated(
    ftj: &FineTuneJob,
    status: &mut FineTuneJobStatus,
    ok: bool,
    reason: &str,
    message: &str,
    now: jiff::Timestamp,
) {
    crate::conditions::set(
        &mut status.conditions,
        EVALUATED,
        ok,
        reason,
        message,
        &Time(now),
        ftj.metadata.generation,
    );
}

/// The gate's folder as users find it: `pvc://<claim>/<output path>/evaluation/<key>`.
fn out_uri(ftj: &FineTuneJob) -> String {
    format!("{}/{}", build::output_uri(ftj), evaljob::out_subdir(ftj))
}

/// Fetch: the baseline's files, or why they cannot be served (yet). The default is the job's own base model; a
/// ChatModel is resolved as its controller resolves it, with its FineTuneJob as read now.
async fn baseline(
    ctx: &Context,
    ftj: &FineTuneJob,
    spec: &EvaluationSpec,
) -> Result<Result<Baseline, Source>, Error> {
    let Some(chosen) = &spec.baseline else {
        return Ok(Ok(evaljob::base_model_baseline(ftj)));
    };
    let name = &chosen.chat_model;
    let models: Api<ChatModel> = reconcile::namespaced(&ctx.client, ftj);
    let Some(model) = models.get_opt(name).await? else {
        return Ok(Err(Source::Waiting(format!("ChatModel {name} does not exist"))));
    };
    let source = &model.spec.model;
    // Its download runs in this job's evaluation pod: held to the same policy as the job's own.
    if let Err(denied) = ctx.settings.policy.check_source("spec.model", source) {
        return Ok(Err(Source::Failed(format!(
            "ChatModel {name} is refused by the operator's policy: {denied}"
        ))));
    }
    let job = match &source.fine_tune_job {
        // Training has just replaced this job's own earlier model: there is nothing left to compare with.
        Some(own) if *own == ftj.name_any() => {
            return Ok(Err(Source::Failed(format!(
                "ChatModel {name} serves this job's own output, which training replaced; name another baseline"
            ))));
        }
        Some(other) => {
            let jobs: Api<FineTuneJob> = reconcile::namespaced(&ctx.client, ftj);
            jobs.get_opt(other).await?
        }
        None => None,
    };
    Ok(
        crate::chatmodel::source::resolve(source, job.as_ref()).map(|files| Baseline {
            name: evaljob::distinct(name.clone(), &ftj.name_any()),
            files,
            template: model.spec.template.clone(),
        }),
    )
}

/// Deletes the evaluation Job (its pods in the background), so the gate starts afresh; one already gone is fine.
async fn delete_gate_job(ctx: &Context, ftj: &FineTuneJob) -> Result<(), Error> {
    let dp = kube::api::DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Background),
        ..kube::api::DeleteParams::default()
    };
    let jobs: Api<Job> = reconcile::namespaced(&ctx.client, ftj);
    let uid = ftj.uid().unwrap_or_default();
    reconcile::delete_owned(&jobs, &evaljob::job_name(ftj), &uid, &dp).await
}

/// Fetch: the evaluation Job's conditions and its gate pods (oldest first) with their termination messages.
async fn observe(ctx: &Context, ftj: &FineTuneJob) -> Result<GateView, Error> {
    let jobs: Api<Job> = reconcile::namespaced(&ctx.client, ftj);
    let Some(job) = jobs.get_opt(&evaljob::job_name(ftj)).await? else {
        return Ok(GateView::default());
    };
    if !job
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == ftj.uid().as_ref())
    {
        // An earlier FineTuneJob's of this name, orphaned: its result is about other weights. It goes, and the
        // gate starts afresh once it is gone. Any other Job of this name is not the operator's to delete.
        let earlier = job
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.kind == "FineTuneJob" && o.name == ftj.name_any());
        if !earlier {
            return Err(reconcile::not_owned::<Job, _>(&evaljob::job_name(ftj), ftj));
        }
        let dp = kube::api::DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Background),
            preconditions: Some(kube::api::Preconditions {
                uid: job.uid(),
                resource_version: None,
            }),
            ..kube::api::DeleteParams::default()
        };
        reconcile::delete(&jobs, &evaljob::job_name(ftj), &dp).await?;
        return Ok(GateView {
            job: Some(GateJob::default()),
            runs: Vec::new(),
        });
    }
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let holds = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status == "True");
    let why_failed = holds("Failed").map(|c| {
        format!(
            "{}: {}",
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default()
        )
    });
    let gate_job = GateJob {
        complete: holds("Complete").is_some(),
        failed: why_failed.is_some(),
        why_failed,
    };
    let pods: Api<Pod> = reconcile::namespaced(&ctx.client, ftj);
    let selector = format!(
        "{}={},app.kubernetes.io/component={}",
        names::FINETUNEJOB_LABEL,
        ftj.name_any(),
        names::EVALUATION_COMPONENT
    );
    let mut pods = pods.list(&ListParams::default().labels(&selector)).await?.items;
    // Only this Job's pods: a Job deleted and applied again leaves the old one's until they are collected.
    pods.retain(|p| {
        p.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == job.uid().as_ref())
    });
    pods.sort_by_key(|p| (p.creation_timestamp(), p.name_any()));
    Ok(GateView {
        job: Some(gate_job),
        runs: pods.iter().map(gate_run).collect(),
    })
}

/// One gate pod: its phase and the gate container's termination message.
fn gate_run(pod: &Pod) -> GateRun {
    let status = pod.status.clone().unwrap_or_default();
    let phase = PodPhase::of(status.phase.as_deref());
    let message = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == evaljob::GATE_CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone());
    GateRun { phase, message }
}
