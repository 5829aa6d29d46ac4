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
