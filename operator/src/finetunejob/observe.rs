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

/// The most bytes of `/progress` the operator reads: the trainer's answer is a few hundred; a pod in the job's
/// namespace answering in rank 0's place must not make the operator buffer gigabytes.
pub const PROGRESS_MAX_BYTES: usize = 1 << 20;

/// Why `/progress` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("reading {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered more than {limit} bytes; the rest was not read")]
    TooLarge { url: String, limit: usize },
    #[error("{url} is not a progress report: {source}")]
    Json { url: String, source: serde_json::Error },
}

/// Rank 0's `/progress`; `None` (with a warning when it answered wrongly) when it cannot be read.
pub async fn progress(ctx: &Context, ip: &str) -> Option<status::Progress> {
    let url = format!("http://{ip}:{}/progress", ctx.progress_port);
    match read_progress(&ctx.http, &url, PROGRESS_MAX_BYTES).await {
        Ok(p) => Some(p),
        Err(e @ ProgressError::Http { .. }) => {
            tracing::debug!(error = %e, "no progress");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the trainer's progress");
            None
        }
    }
}

/// GETs `url` and parses its body as a progress report, reading at most `limit` bytes.
pub async fn read_progress(
    http: &reqwest::Client,
    url: &str,
    limit: usize,
) -> Result<status::Progress, ProgressError> {
    let http_error = |source| ProgressError::Http {
        url: url.into(),
        source,
    };
    let too_large = || ProgressError::TooLarge {
        url: url.into(),
        limit,
    };
    let mut response = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(http_error)?;
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|source| ProgressError::Json {
        url: url.into(),
        source,
    })
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves one HTTP answer with `body` (chunked, so without a length up front) to every connection.
    async fn server(body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = socket.read(&mut request).await;
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    let _ = socket.write_all(head.as_bytes()).await;
                    for part in body.chunks(64 * 1024) {
                        let chunk = format!("{:x}\r\n", part.len());
                        let _ = socket.write_all(chunk.as_bytes()).await;
                        let _ = socket.write_all(part).await;
                        let _ = socket.write_all(b"\r\n").await;
                    }
                    let _ = socket.write_all(b"0\r\n\r\n").await;
                });
            }
        });
        format!("http://{addr}/progress")
    }

    /// The attack: something answering on rank 0's progress port streams an endless JSON string. The operator
    /// stops at the cap with an error naming the URL and the limit.
    #[tokio::test]
    async fn a_huge_progress_answer_is_cut_off_at_the_cap() {
        let mut body = b"{\"step\": \"".to_vec();
        body.resize(8 << 20, b'a');
        let url = server(body).await;
        let http = reqwest::Client::new();
        let err = read_progress(&http, &url, PROGRESS_MAX_BYTES)
            .await
            .err()
            .unwrap_or_else(|| panic!("an 8 MiB answer was read"));
        assert!(
            matches!(err, ProgressError::TooLarge { limit, .. } if limit == 1 << 20),
            "{err}"
        );
        assert!(
            err.to_string().contains(&url) && err.to_string().contains("1048576"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_progress_report_within_the_cap_is_read() {
        let report = serde_json::to_vec(&camelid_contracts::progress::Progress::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let url = server(report).await;
        let http = reqwest::Client::new();
        let read = read_progress(&http, &url, PROGRESS_MAX_BYTES).await;
        assert!(read.is_ok(), "{:?}", read.err());
        let err = read_progress(&http, &url, 2).await.err();
        assert!(matches!(err, Some(ProgressError::TooLarge { .. })), "{err:?}");
    }
}
