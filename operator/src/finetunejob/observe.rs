//! Fetch, for the FineTuneJob controller: what is observed of an attempt (its Job's conditions, its pods, their
//! nodes' existence and termination taints), rank 0's `/progress`, and the GPU prices. Apart from the controller
//! so that its reconcile reads as the pipeline's steps.

use std::collections::BTreeMap;

use camelid_crds::FineTuneJob;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::build;
use super::controller::Context;
use super::decide::{JobView, PodPhase, PodView};
use super::status;
use crate::error::Error;

/// The observed state of the current attempt.
pub struct Observed {
    pub job: Option<JobView>,
    pub pods: Vec<PodView>,
    /// Rank 0's address, while it runs.
    pub rank0_ip: Option<String>,
    /// Whether any pod runs.
    pub running: bool,
}

/// The Job and pods of `attempt` of `ftj`.
pub async fn observe(ctx: &Context, ftj: &FineTuneJob, attempt: i32) -> Result<Observed, Error> {
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
        let phase = PodPhase::of(status.phase.as_deref());
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

/// Rank 0's `/progress`; `None` when it does not answer.
pub async fn progress(ctx: &Context, ip: &str) -> Option<status::Progress> {
    let url = format!("http://{ip}:{}/progress", ctx.progress_port);
    let response = ctx.http.get(&url).send().await.ok()?;
    response.error_for_status().ok()?.json().await.ok()
}

/// The GPU prices ConfigMap's data; empty when there is none or it cannot be read.
pub async fn prices(ctx: &Context) -> BTreeMap<String, String> {
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
