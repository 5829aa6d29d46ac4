//! Status conditions, keyed by `type`, as both controllers write them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets condition `type_` in `conditions`. While its status and reason stay the same, its transition time stays
/// too (only the message and generation follow), so steady reconciles write nothing new.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
    generation: Option<i64>,
) {
    let value = if ok { "True" } else { "False" };
    if let Some(c) = conditions
        .iter_mut()
        .find(|c| c.type_ == type_ && c.status == value && c.reason == reason)
    {
        c.message = message.into();
        c.observed_generation = generation;
        return;
    }
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now.clone(),
        observed_generation: generation,
    });
}

/// On a FineTuneJob while the operator has asked its current attempt's trainers to checkpoint (a termination
/// notice on their nodes); gone when the next attempt starts. Remembered because the stopped pods, exit codes and
/// all, may be removed before the operator sees them: the attempt's end is then still known to be a preemption.
pub const TERMINATION_NOTICE: &str = "TerminationNotice";

/// The condition that says the operator refuses to act on an object: `False` with reason `PolicyDenied` (the
/// spec asks for what the operator's policy forbids) or `NameConflict` (a child's name is taken by an object the
/// resource does not control). Present only while refused, so objects the operator acts on carry no extra
/// condition.
pub const ADMITTED: &str = "Admitted";

/// Records a refusal in `conditions`; true when it is new (its Event is worth recording).
pub fn refuse(
    conditions: &mut Vec<Condition>,
    reason: &str,
    message: &str,
    now: &Time,
    generation: Option<i64>,
) -> bool {
    let before = conditions.clone();
    set(conditions, ADMITTED, false, reason, message, now, generation);
    let same = |a: &Condition, b: &Condition| (&a.reason, &a.message) == (&b.reason, &b.message);
    let old = before.iter().find(|c| c.type_ == ADMITTED);
    let new = conditions.iter().find(|c| c.type_ == ADMITTED);
    !matches!((old, new), (Some(a), Some(b)) if same(a, b))
}

/// The object is acted on again: its refusal, if any, goes.
pub fn admit(conditions: &mut Vec<Condition>) {
    conditions.retain(|c| c.type_ != ADMITTED);
}
