//! Kubernetes Events, as both controllers record them.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::metrics::Metrics;

/// Records an Event on `reference`; a failure is logged, never fatal (Events are advice, not state).
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

/// For an object of `kind` that cannot be read: says what is wrong where users look (a Warning Event), counts it
/// and logs it. The caller then waits for the object to change.
pub async fn invalid_spec<K>(
    recorder: &Recorder,
    metrics: &Metrics,
    kind: &str,
    guarded: &DeserializeGuard<K>,
) where
    K: Resource<DynamicType = ()>,
{
    let Err(invalid) = &guarded.0 else { return };
    let name = invalid.metadata.name.clone().unwrap_or_default();
    tracing::warn!(kind, name = %name, error = %invalid.error, "object cannot be read");
    metrics.reconcile_error("invalid_spec");
    let note = format!("this {kind} cannot be read: {}", invalid.error);
    publish(
        recorder,
        &guarded.object_ref(&()),
        EventType::Warning,
        "InvalidSpec",
        note,
    )
    .await;
}
