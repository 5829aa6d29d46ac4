//! A ChatModel's status from what was observed (pure): its phase, `ready/desired`, and conditions.

use camelid_crds::chatmodel::{ChatModelPhase, ChatModelStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Whether the model's files can be served yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Ready,
    /// Not yet (the FineTuneJob is still running, or missing): why.
    Waiting(String),
    /// Never will be (the FineTuneJob failed): why.
    Failed(String),
}

/// The phase of a model whose source is `source`, with `desired` workers of which `ready` are ready.
pub fn phase(source: &Source, desired: i32, ready: i32) -> ChatModelPhase {
    match source {
        Source::Failed(_) => ChatModelPhase::Failed,
        Source::Waiting(_) => ChatModelPhase::Pending,
        Source::Ready if desired == 0 => ChatModelPhase::ScaledToZero,
        Source::Ready if ready == 0 => ChatModelPhase::Loading,
        Source::Ready if ready < desired => ChatModelPhase::Degraded,
        Source::Ready => ChatModelPhase::Ready,
    }
}

fn set_condition(
    status: &mut ChatModelStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
) {
    let generation = status.observed_generation;
    crate::conditions::set(
        &mut status.conditions,
        type_,
        ok,
        reason,
        message,
        now,
        generation,
    );
}

/// Fills the replica fields, phase and conditions.
pub fn observe(status: &mut ChatModelStatus, source: &Source, desired: i32, ready: i32, now: &Time) {
    let phase = phase(source, desired, ready);
    status.phase = Some(phase);
    status.desired_replicas = desired;
    status.ready_replicas = ready;
    status.ready = Some(format!("{ready}/{desired}"));
    let (ok, reason, message) = match source {
        Source::Ready => (true, "Available", "the model's files are available".to_string()),
        Source::Waiting(why) => (false, "Waiting", why.clone()),
        Source::Failed(why) => (false, "Failed", why.clone()),
    };
    set_condition(status, "ModelAvailable", ok, reason, &message, now);
    let (ok, reason, message) = match phase {
        ChatModelPhase::Ready => (true, "Ready", format!("{ready} of {desired} workers ready")),
        ChatModelPhase::Degraded => (true, "Degraded", format!("{ready} of {desired} workers ready")),
        ChatModelPhase::ScaledToZero => (
            false,
            "ScaledToZero",
            "no workers: the gateways hold requests while one starts".to_string(),
        ),
        ChatModelPhase::Loading => (false, "Loading", format!("0 of {desired} workers ready")),
        ChatModelPhase::Pending | ChatModelPhase::Failed => (false, "ModelNotAvailable", message),
    };
    set_condition(status, "Ready", ok, reason, &message, now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_source_and_the_workers() {
        let waiting = Source::Waiting("FineTuneJob x is Running".into());
        assert_eq!(phase(&waiting, 1, 0), ChatModelPhase::Pending);
        assert_eq!(
            phase(&Source::Failed("x failed".into()), 1, 0),
            ChatModelPhase::Failed
        );
        assert_eq!(phase(&Source::Ready, 0, 0), ChatModelPhase::ScaledToZero);
        assert_eq!(phase(&Source::Ready, 2, 0), ChatModelPhase::Loading);
        assert_eq!(phase(&Source::Ready, 2, 1), ChatModelPhase::Degraded);
        assert_eq!(phase(&Source::Ready, 2, 2), ChatModelPhase::Ready);
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let t0 = Time(jiff::Timestamp::from_second(0).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(60).unwrap());
        let mut status = ChatModelStatus::default();
        observe(&mut status, &Source::Ready, 2, 1, &t0);
        observe(&mut status, &Source::Ready, 3, 1, &t1);
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.last_transition_time, t0);
        assert_eq!(ready.message, "1 of 3 workers ready");
        assert_eq!(status.ready.as_deref(), Some("1/3"));
        observe(&mut status, &Source::Ready, 3, 3, &t1);
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.reason.as_str(), &ready.last_transition_time),
            ("Ready", &t1)
        );
    }
}
