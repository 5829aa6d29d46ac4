//! What to do next with a FineTuneJob, from what was observed of its current attempt (its Job, pods and nodes).
//! Pure, so every case is a table test: a preemption (the pod's `DisruptionTarget` condition, its node gone, or
//! the trainer's exit code 75 after a termination checkpoint) restarts the gang without counting against
//! `maxRestarts`; a real failure counts; bad input (exit code 2) fails at once; after `maxPreemptions`, or after
//! waiting `pendingTimeout` for spot nodes, the next attempt goes to on-demand nodes.

use camelid_contracts::exit;

use crate::placement::Capacity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    /// A pod's `status.phase` as Kubernetes writes it; anything else (or none yet) is `Unknown`.
    pub fn of(phase: Option<&str>) -> Self {
        match phase {
            Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }
}

/// One trainer pod as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    pub phase: PodPhase,
    /// Bound to a node.
    pub scheduled: bool,
    /// The node it ran on no longer exists.
    pub node_gone: bool,
    /// Its node carries a termination notice (a spot interruption taint).
    pub node_terminating: bool,
    /// The pod has the `DisruptionTarget` condition (preempted, evicted, or its node is shutting down).
    pub disruption_target: bool,
    /// The trainer container's exit code, once it exited.
    pub exit_code: Option<i32>,
    /// Being deleted.
    pub deleting: bool,
}

/// The current attempt's Job as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobView {
    /// The Job's `Complete` condition is true.
    pub complete: bool,
    /// The Job's `Failed` condition is true.
    pub failed: bool,
}

/// The job's policy and counters, from its spec and status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct State {
    pub attempt: i32,
    pub capacity: Capacity,
    pub preemptions: i32,
    pub restarts: i32,
    pub max_preemptions: i32,
    pub max_restarts: i32,
    pub prefer_spot: bool,
    /// Seconds the attempt's pods may wait unscheduled on spot before falling back.
    pub pending_timeout_secs: u64,
    /// Seconds since the attempt started.
    pub attempt_age_secs: u64,
    /// The operator asked this attempt's trainers to checkpoint (a termination notice on their nodes). Deleted
    /// pods are removed once they stop, possibly before their exit codes are read: the attempt's end is then the
    /// preemption's.
    pub checkpoint_requested: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// Spot capacity was taken back; not the job's fault.
    Preempted,
    /// Spot nodes did not come within `pendingTimeout`.
    PendingTimeout,
    /// The trainer failed; counts against `maxRestarts`.
    Failed,
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No attempt exists: start attempt `attempt` on `capacity`.
    Start {
        attempt: i32,
        capacity: Capacity,
    },
    /// The attempt is running or starting: keep watching.
    Wait,
    /// These pods' nodes are about to go away: delete them with their grace period so the trainer writes a
    /// termination checkpoint (SIGTERM) before the node does.
    CheckpointFirst {
        pods: Vec<String>,
    },
    /// End this attempt (delete its Job and pods) and start the next.
    Restart {
        reason: RestartReason,
        attempt: i32,
        capacity: Capacity,
        why: String,
    },
    Succeeded,
    Failed {
        why: String,
    },
}

/// Where the next attempt runs after `preemptions` preemptions (and whether spot already failed to come).
pub fn next_capacity(state: &State, preemptions: i32, spot_timed_out: bool) -> Capacity {
    if !state.prefer_spot
        || spot_timed_out
        || preemptions >= state.max_preemptions
        || state.capacity == Capacity::OnDemand
    {
        Capacity::OnDemand
    } else {
        Capacity::Spot
    }
}

/// Decides the next step for an attempt observed as `job` (none when its Job does not exist) and `pods`.
pub fn decide(state: &State, job: Option<JobView>, pods: &[PodView]) -> Decision {
    let Some(job) = job else {
        let capacity = if state.attempt == 0 {
            if state.prefer_spot {
                Capacity::Spot
            } else {
                Capacity::OnDemand
            }
        } else {
            state.capacity
        };
        return Decision::Start {
            attempt: state.attempt.max(1),
            capacity,
        };
    };
    let bad_input = pods.iter().find(|p| p.exit_code == Some(exit::INVALID));
    if let Some(p) = bad_input {
        return Decision::Failed {
            why: format!(
                "{} exited with {}: bad arguments, config or data (see its log); not retried",
                p.name,
                exit::INVALID
            ),
        };
    }
    let preempted = pods.iter().find(|p| {
        p.disruption_target
            || p.node_gone
            || p.exit_code == Some(exit::STOPPED)
            || (p.phase == PodPhase::Failed && p.deleting)
    });
    if let Some(p) = preempted {
        let why = if p.exit_code == Some(exit::STOPPED) {
            format!("{} stopped after a termination checkpoint", p.name)
        } else if p.node_gone {
            format!("{}'s node is gone", p.name)
        } else {
            format!("{} was disrupted (spot preemption or eviction)", p.name)
        };
        let preemptions = state.preemptions + 1;
        return Decision::Restart {
            reason: RestartReason::Preempted,
            attempt: state.attempt + 1,
            capacity: next_capacity(state, preemptions, false),
            why,
        };
    }
    if job.complete || (!pods.is_empty() && pods.iter().all(|p| p.phase == PodPhase::Succeeded)) {
        return Decision::Succeeded;
    }
    // Asked to checkpoint, and the Job failed with no exit code left to read (its pods already gone): a
    // preemption, not a failure. Until the Job fails, its trainers are still checkpointing.
    if state.checkpoint_requested && job.failed && !pods.iter().any(|p| p.phase == PodPhase::Failed) {
        return Decision::Restart {
            reason: RestartReason::Preempted,
            attempt: state.attempt + 1,
            capacity: next_capacity(state, state.preemptions + 1, false),
            why:
                "the attempt stopped after a termination checkpoint was requested (its pods were gone before \
                  their exit codes could be read)"
                    .into(),
        };
    }
    let failed = pods.iter().find(|p| p.phase == PodPhase::Failed);
    if job.failed || failed.is_some() {
        let who = failed.map_or_else(|| "the attempt's Job".to_string(), |p| p.name.clone());
        let code = failed
            .and_then(|p| p.exit_code)
            .map_or_else(String::new, |c| format!(" with exit code {c}"));
        if state.restarts >= state.max_restarts {
            return Decision::Failed {
                why: format!("{who} failed{code}; maxRestarts ({}) reached", state.max_restarts),
            };
        }
        return Decision::Restart {
            reason: RestartReason::Failed,
            attempt: state.attempt + 1,
            capacity: state.capacity,
            why: format!("{who} failed{code}"),
        };
    }
    let warned: Vec<String> = pods
        .iter()
        .filter(|p| p.node_terminating && !p.deleting && p.phase == PodPhase::Running)
        .map(|p| p.name.clone())
        .collect();
    if !warned.is_empty() {
        return Decision::CheckpointFirst { pods: warned };
    }
    let unscheduled = pods.iter().any(|p| !p.scheduled && p.phase == PodPhase::Pending);
    if state.capacity == Capacity::Spot && unscheduled && state.attempt_age_secs >= state.pending_timeout_secs
    {
        return Decision::Restart {
            reason: RestartReason::PendingTimeout,
            attempt: state.attempt + 1,
            capacity: next_capacity(state, state.preemptions, true),
            why: format!("no spot capacity within {} s", state.pending_timeout_secs),
        };
    }
    Decision::Wait
}

/// GPU-hours lost to a preemption: every GPU of the gang, from the last checkpoint (or the attempt's start, if
/// later) to the preemption.
pub fn lost_gpu_hours(gpus_in_gang: i32, since_checkpoint_secs: u64) -> f64 {
    f64::from(gpus_in_gang) * since_checkpoint_secs as f64 / 3600.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            attempt: 1,
            capacity: Capacity::Spot,
            preemptions: 0,
            restarts: 0,
            max_preemptions: 3,
            max_restarts: 2,
            prefer_spot: true,
            pending_timeout_secs: 600,
            attempt_age_secs: 60,
            checkpoint_requested: false,
        }
    }

    /// The race a loaded cluster plays: the trainers asked to checkpoint exit 75 and their pods are removed (the
    /// Job controller takes its finalizer off) before the operator reads them. The failed Job is then the
    /// preemption, never a failure counted against `maxRestarts`.
    #[test]
    fn a_job_that_fails_after_a_checkpoint_request_with_its_pods_gone_was_preempted() {
        let failed = Some(JobView {
            complete: false,
            failed: true,
        });
        let mut s = state();
        assert!(matches!(
            decide(&s, failed, &[]),
            Decision::Restart {
                reason: RestartReason::Failed,
                ..
            }
        ));
        s.checkpoint_requested = true;
        let Decision::Restart {
            reason, attempt, why, ..
        } = decide(&s, failed, &[])
        else {
            panic!("not a restart")
        };
        assert_eq!((reason, attempt), (RestartReason::Preempted, 2));
        assert!(why.contains("stopped after a termination checkpoint"), "{why}");
        assert_eq!(decide(&s, RUNNING, &[]), Decision::Wait, "still checkpointing");
    }

    fn pod(name: &str, phase: PodPhase) -> PodView {
        PodView {
            name: name.into(),
            phase,
            scheduled: phase != PodPhase::Pending,
            node_gone: false,
            node_terminating: false,
            disruption_target: false,
            exit_code: None,
            deleting: false,
        }
    }

    const RUNNING: Option<JobView> = Some(JobView {
        complete: false,
        failed: false,
    });

    #[test]
    fn a_new_job_starts_on_spot_unless_it_prefers_on_demand() {
        let mut s = state();
        s.attempt = 0;
        assert_eq!(
            decide(&s, None, &[]),
            Decision::Start {
                attempt: 1,
                capacity: Capacity::Spot
            }
        );
        s.prefer_spot = false;
        assert_eq!(
            decide(&s, None, &[]),
            Decision::Start {
                attempt: 1,
                capacity: Capacity::OnDemand
            }
        );
    }

    #[test]
    fn preemptions_restart_the_gang_and_move_to_on_demand_after_the_budget() {
        let mut gone = pod("j-a1-1", PodPhase::Failed);
        gone.node_gone = true;
        let mut disrupted = pod("j-a1-0", PodPhase::Running);
        disrupted.disruption_target = true;
        let mut stopped = pod("j-a1-0", PodPhase::Failed);
        stopped.exit_code = Some(exit::STOPPED);
        for p in [gone, disrupted, stopped] {
            let d = decide(&state(), RUNNING, &[pod("x", PodPhase::Running), p.clone()]);
            let Decision::Restart {
                reason,
                attempt,
                capacity,
                why,
            } = d
            else {
                panic!("{d:?}")
            };
            assert_eq!(
                (reason, attempt, capacity),
                (RestartReason::Preempted, 2, Capacity::Spot),
                "{p:?}"
            );
            assert!(why.contains(&p.name), "{why}");
        }
        // The third preemption uses up maxPreemptions (3): the next attempt goes on-demand.
        let mut s = state();
        s.preemptions = 2;
        let mut p = pod("j-a3-0", PodPhase::Running);
        p.disruption_target = true;
        let Decision::Restart { capacity, .. } = decide(&s, RUNNING, &[p]) else {
            panic!()
        };
        assert_eq!(capacity, Capacity::OnDemand);
    }

    #[test]
    fn real_failures_count_and_bad_input_fails_at_once() {
        let mut crashed = pod("j-a1-1", PodPhase::Failed);
        crashed.exit_code = Some(1);
        let d = decide(
            &state(),
            RUNNING,
            &[pod("j-a1-0", PodPhase::Running), crashed.clone()],
        );
        assert!(
            matches!(
                d,
                Decision::Restart {
                    reason: RestartReason::Failed,
                    attempt: 2,
                    capacity: Capacity::Spot,
                    ..
                }
            ),
            "{d:?}"
        );
        let mut s = state();
        s.restarts = 2;
        let Decision::Failed { why } = decide(&s, RUNNING, &[crashed]) else {
            panic!()
        };
        assert!(
            why.contains("exit code 1") && why.contains("maxRestarts (2)"),
            "{why}"
        );
        let mut bad = pod("j-a1-0", PodPhase::Failed);
        bad.exit_code = Some(exit::INVALID);
        let Decision::Failed { why } = decide(&state(), RUNNING, &[bad]) else {
            panic!()
        };
        assert!(why.contains("not retried"), "{why}");
    }

    #[test]
    fn termination_notices_ask_for_a_checkpoint_first() {
        let mut warned = pod("j-a1-1", PodPhase::Running);
        warned.node_terminating = true;
        let d = decide(
            &state(),
            RUNNING,
            &[pod("j-a1-0", PodPhase::Running), warned.clone()],
        );
        assert_eq!(
            d,
            Decision::CheckpointFirst {
                pods: vec!["j-a1-1".into()]
            }
        );
        warned.deleting = true;
        assert_eq!(
            decide(&state(), RUNNING, &[warned]),
            Decision::Wait,
            "already asked"
        );
    }

    #[test]
    fn waiting_too_long_for_spot_falls_back_to_on_demand() {
        let pending = [pod("j-a1-0", PodPhase::Pending), pod("j-a1-1", PodPhase::Pending)];
        assert_eq!(decide(&state(), RUNNING, &pending), Decision::Wait);
        let mut s = state();
        s.attempt_age_secs = 601;
        let d = decide(&s, RUNNING, &pending);
        assert!(
            matches!(
                d,
                Decision::Restart {
                    reason: RestartReason::PendingTimeout,
                    capacity: Capacity::OnDemand,
                    ..
                }
            ),
            "{d:?}"
        );
        s.capacity = Capacity::OnDemand;
        assert_eq!(
            decide(&s, RUNNING, &pending),
            Decision::Wait,
            "on-demand waits as long as it takes"
        );
    }

    #[test]
    fn success_when_every_rank_finished() {
        let done = [
            pod("j-a1-0", PodPhase::Succeeded),
            pod("j-a1-1", PodPhase::Succeeded),
        ];
        assert_eq!(decide(&state(), RUNNING, &done), Decision::Succeeded);
        assert_eq!(
            decide(
                &state(),
                Some(JobView {
                    complete: true,
                    failed: false
                }),
                &[]
            ),
            Decision::Succeeded
        );
        assert_eq!(
            decide(&state(), RUNNING, &[pod("j-a1-0", PodPhase::Running)]),
            Decision::Wait
        );
    }

    #[test]
    fn lost_work_is_every_gpu_since_the_last_checkpoint() {
        assert!((lost_gpu_hours(8, 1800) - 4.0).abs() < 1e-9);
        assert_eq!(lost_gpu_hours(0, 1800), 0.0);
    }
}
