//! Spot-safe serving (pure): which workers are leaving, the surge that replaces them before they go, and the
//! preemptions counted in the status, once per pod.
//!
//! A worker is *leaving* when its node has one of the clouds' termination taints
//! ([`camelid_contracts::names::TERMINATION_TAINTS`], the ones the FineTuneJob controller checkpoints on) or is
//! gone, while its ReplicaSet still counts it (not being deleted, not stopped). Its Deployment then runs one more
//! replica: the replacement starts, loads and becomes ready while the old worker still serves, and the gateways
//! move its open streams over as it drains. Once the old pod is deleted or stopped its ReplicaSet no longer counts
//! it, the leaving count drops and so does the surge, so the replacement simply stays.
//!
//! The replacement goes to the leaving worker's own pool, not to on-demand capacity: a replacement elsewhere
//! would be taken back as soon as the old pod goes (its own Deployment then replaces it itself), so capacity
//! would dip while that second replacement loads. A ChatModel's `spot` policy has no on-demand fallback of its
//! own (`maxPreemptions` and `pendingTimeout` are FineTuneJobs'); `baseOnDemand` is where on-demand capacity
//! is asked for. A replacement that finds no spot capacity waits, as it would after the old pod went.
//!
//! The surge is not bounded by `replicas.max`: it replaces, it does not add serving capacity, like a
//! Deployment's own rolling-update surge. It is bounded by the pool's own share of the desired workers, so that
//! a worker that is leaving while its pool scales down is one of those going anyway.

use std::collections::BTreeSet;

use camelid_contracts::names::TERMINATION_TAINTS;
use camelid_crds::chatmodel::{ChatModelStatus, LeavingWorker};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use super::build::{Pool, Surge};
use crate::reconcile::Note;

/// A worker pod as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pod: String,
    pub uid: String,
    /// Its Deployment's pool; `None` for a pod with another pool label (not one of this model's Deployments).
    pub pool: Option<Pool>,
    /// Its node, once scheduled.
    pub node: Option<String>,
    /// Counted by its ReplicaSet: neither being deleted nor stopped (`Succeeded`, `Failed`).
    pub active: bool,
    /// Why its node is going ([`notice`]); `None` when it stays.
    pub notice: Option<String>,
}

impl Worker {
    /// What `pod` says of itself; its node's notice is the caller's to add.
    pub fn of(pod: &Pod) -> Worker {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        Worker {
            pod: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            pool: pod
                .labels()
                .get(camelid_contracts::names::POOL_LABEL)
                .and_then(|p| Pool::of(p)),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            active: pod.metadata.deletion_timestamp.is_none()
                && !matches!(phase, Some("Succeeded" | "Failed")),
            notice: None,
        }
    }

    fn leaving(&self) -> bool {
        self.active && self.node.is_some() && self.notice.is_some()
    }
}

/// Why a worker's node is going, in words: its first termination taint, or that it is gone (`node` is `None`);
/// `None` when it stays.
pub fn notice(node: Option<&Node>) -> Option<String> {
    let Some(node) = node else {
        return Some("its node is gone".into());
    };
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .find(|t| TERMINATION_TAINTS.contains(&t.key.as_str()))
        .map(|t| format!("termination taint {} on its node", t.key))
}

/// The replacements to run beside leaving workers, per pool: one for each, up to the pool's own share of the
/// desired workers (`wanted`: (base, spot), as [`super::build::split`] gives them).
pub fn surge(wanted: (i32, i32), workers: &[Worker]) -> Surge {
    let leaving = |pool: Pool| {
        let n = workers
            .iter()
            .filter(|w| w.leaving() && w.pool == Some(pool))
            .count();
        i32::try_from(n).unwrap_or(i32::MAX)
    };
    Surge {
        base: leaving(Pool::Base).min(wanted.0.max(0)),
        spot: leaving(Pool::Spot).min(wanted.1.max(0)),
    }
}

/// Records the leaving workers in `status`: each new one (by uid) adds one to `preemptions` and gets a
/// `WorkerPreempted` Event (returned) saying whether it is replaced (`surge`, from [`surge`]); `leaving` becomes
/// the ones still there, so a worker is counted once however many reconciles see it, and across operator
/// restarts. The list holds only workers that are still there, so it is bounded by the workers. A notice that is
/// withdrawn and given again counts twice: it was two notices.
pub fn record(status: &mut ChatModelStatus, workers: &[Worker], surge: Surge) -> Vec<Note> {
    let known: BTreeSet<String> = status.leaving.iter().map(|l| l.uid.clone()).collect();
    let mut leaving = Vec::new();
    let mut notes = Vec::new();
    // The replacements of each pool, told of in the order of its leaving workers.
    let mut replacements = surge;
    for w in workers.iter().filter(|w| w.leaving()) {
        let node = w.node.clone().unwrap_or_default();
        let reason = w.notice.clone().unwrap_or_default();
        let left = match w.pool {
            Some(Pool::Base) => Some(&mut replacements.base),
            Some(Pool::Spot) => Some(&mut replacements.spot),
            None => None,
        };
        let replaced = match left {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if !known.contains(&w.uid) {
            status.preemptions = status.preemptions.saturating_add(1);
            notes.push(Note::normal(
                "WorkerPreempted",
                format!(
                    "worker {} on node {node} is leaving ({reason}); {}",
                    w.pod,
                    if replaced {
                        "a replacement starts beside it while it drains"
                    } else {
                        "not replaced: its pool is scaling down"
                    }
                ),
            ));
        }
        leaving.push(LeavingWorker {
            pod: w.pod.clone(),
            uid: w.uid.clone(),
            node,
            reason,
        });
    }
    status.leaving = leaving;
    notes
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn worker(pod: &str, pool: Pool, notice: Option<&str>) -> Worker {
        Worker {
            pod: pod.into(),
            uid: format!("uid-{pod}"),
            pool: Some(pool),
            node: Some(format!("node-of-{pod}")),
            active: true,
            notice: notice.map(String::from),
        }
    }

    fn node(taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {"taints": taints}}))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_termination_taint_or_a_missing_node_is_a_notice_other_taints_are_not() {
        let gke = node(json!([
            {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"},
            {"key": "cloud.google.com/impending-node-termination", "value": "true", "effect": "NoSchedule"}
        ]));
        assert_eq!(
            notice(Some(&gke)).as_deref(),
            Some("termination taint cloud.google.com/impending-node-termination on its node")
        );
        let karpenter = node(json!([{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]));
        assert!(notice(Some(&karpenter)).is_some());
        let spot_only =
            node(json!([{"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}]));
        assert_eq!(notice(Some(&spot_only)), None);
        assert_eq!(notice(Some(&node(json!(null)))), None);
        assert_eq!(notice(None).as_deref(), Some("its node is gone"));
    }

    #[test]
    fn each_leaving_worker_gets_a_replacement_in_its_own_pool() {
        let workers = [
            worker("b1", Pool::Base, None),
            worker("s1", Pool::Spot, Some("taint")),
            worker("s2", Pool::Spot, Some("taint")),
            worker("s3", Pool::Spot, None),
        ];
        assert_eq!(surge((1, 3), &workers), Surge { base: 0, spot: 2 });
        let on_base = [worker("b1", Pool::Base, Some("gone"))];
        assert_eq!(surge((1, 0), &on_base), Surge { base: 1, spot: 0 });
    }

    #[test]
    fn a_pool_scaling_down_replaces_no_more_than_it_keeps() {
        let workers = [
            worker("s1", Pool::Spot, Some("taint")),
            worker("s2", Pool::Spot, Some("taint")),
        ];
        assert_eq!(surge((1, 1), &workers), Surge { base: 0, spot: 1 });
        assert_eq!(
            surge((0, 0), &workers),
            Surge::default(),
            "at zero nothing is replaced"
        );
    }

    #[test]
    fn a_worker_being_deleted_or_stopped_or_unscheduled_is_no_longer_surged_for() {
        let mut deleting = worker("s1", Pool::Spot, Some("taint"));
        deleting.active = false;
        let mut pending = worker("s2", Pool::Spot, Some("taint"));
        pending.node = None;
        let foreign = Worker {
            pool: None,
            ..worker("x", Pool::Spot, Some("taint"))
        };
        assert_eq!(surge((3, 3), &[deleting, pending, foreign]), Surge::default());
    }

    #[test]
    fn a_pod_is_counted_once_however_many_reconciles_see_it_and_forgotten_once_gone() {
        let mut status = ChatModelStatus::default();
        let s1 = worker("s1", Pool::Spot, Some("termination taint k on its node"));
        let one = Surge { base: 0, spot: 1 };
        let notes = record(&mut status, &[s1.clone(), worker("s2", Pool::Spot, None)], one);
        assert_eq!(status.preemptions, 1);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].reason, "WorkerPreempted");
        assert!(
            notes[0].message.contains("worker s1 on node node-of-s1")
                && notes[0].message.contains("termination taint k")
                && notes[0].message.contains("a replacement starts beside it"),
            "{}",
            notes[0].message
        );
        assert_eq!(
            status.leaving,
            [LeavingWorker {
                pod: "s1".into(),
                uid: "uid-s1".into(),
                node: "node-of-s1".into(),
                reason: "termination taint k on its node".into(),
            }]
        );
        // Seen again (its node now gone too), and by a restarted operator reading the status: not again.
        let mut again = s1.clone();
        again.notice = Some("its node is gone".into());
        assert!(record(&mut status, &[again], one).is_empty());
        let mut restarted: ChatModelStatus =
            serde_json::from_value(serde_json::to_value(&status).unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(record(&mut restarted, std::slice::from_ref(&s1), one).is_empty());
        assert_eq!(restarted.preemptions, 1);
        // Its replacement on the same (spot) pool is another pod: a notice there counts again.
        let r = worker("r1", Pool::Spot, Some("termination taint k on its node"));
        let notes = record(&mut status, &[s1.clone(), r], one);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].message.contains("worker r1") && notes[0].message.contains("not replaced"),
            "the one replacement is s1's: {}",
            notes[0].message
        );
        assert_eq!(status.preemptions, 2);
        // Gone (deleted, stopped): forgotten, so the list stays bounded by the workers there.
        let mut stopped = s1;
        stopped.active = false;
        assert!(record(&mut status, &[stopped], Surge::default()).is_empty());
        assert!(status.leaving.is_empty());
        assert_eq!(status.preemptions, 2);
    }

    #[test]
    fn a_worker_reads_its_pool_node_and_activity_from_its_pod() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "m-worker-spot-x", "uid": "u1", "labels": {"camelid.dev/pool": "spot"}},
            "spec": {"nodeName": "spot-1", "containers": []},
            "status": {"phase": "Running"}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let w = Worker::of(&pod);
        assert_eq!(
            (w.pool, w.node.as_deref(), w.active, w.uid.as_str()),
            (Some(Pool::Spot), Some("spot-1"), true, "u1")
        );
        let mut failed = pod.clone();
        if let Some(s) = failed.status.as_mut() {
            s.phase = Some("Failed".into());
        }
        assert!(!Worker::of(&failed).active);
        let mut deleting = pod;
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(!Worker::of(&deleting).active);
    }
}
