//! Who may re-point a ChatModel (pure): a FineTuneJob's `output.chatModel` names a ChatModel to create, or to
//! point at the job's model when it succeeds. Only one the job created itself is re-pointed; anyone else's (a
//! user's, another job's) is left alone, or a FineTuneJob's author could replace what another team serves.

use camelid_crds::ChatModel;
use kube::ResourceExt;

/// The annotation on a ChatModel that `output.chatModel` created: the uid of the FineTuneJob that created it,
/// the only one that may point it elsewhere.
pub const PUBLISHED_BY_ANNOTATION: &str = "camelid.dev/published-by";

/// Whether the job with uid `job_uid` may point `existing` at its model: only when the job created it.
pub fn may_publish_over(existing: &ChatModel, job_uid: &str) -> bool {
    existing
        .annotations()
        .get(PUBLISHED_BY_ANNOTATION)
        .is_some_and(|uid| !job_uid.is_empty() && uid == job_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(annotations: serde_json::Value) -> ChatModel {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
            "metadata": {"name": "prod", "namespace": "team-a", "annotations": annotations,
                         "labels": {"camelid.dev/finetunejob": "mine"}},
            "spec": {"model": {"path": "/models/prod.gguf"}}}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The attack: a FineTuneJob whose `output.chatModel` names another team's ChatModel (even one carrying the
    /// job's name in the label anyone can write) to serve its own model under that name.
    #[test]
    fn a_job_cannot_repoint_a_chatmodel_it_did_not_create() {
        assert!(!may_publish_over(&model(serde_json::json!({})), "job-uid"));
        assert!(!may_publish_over(
            &model(serde_json::json!({PUBLISHED_BY_ANNOTATION: "another-jobs-uid"})),
            "job-uid"
        ));
        assert!(!may_publish_over(
            &model(serde_json::json!({PUBLISHED_BY_ANNOTATION: ""})),
            ""
        ));
        assert!(may_publish_over(
            &model(serde_json::json!({PUBLISHED_BY_ANNOTATION: "job-uid"})),
            "job-uid"
        ));
    }
}
