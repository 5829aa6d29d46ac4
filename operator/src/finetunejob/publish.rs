//! Who may re-point a ChatModel (pure): a FineTuneJob's `output.chatModel` names a ChatModel to create, or to
//! point at the job's model when it succeeds. Only one the job created itself is re-pointed; anyone else's (a
//! user's, another job's) is left alone, or a FineTuneJob's author could replace what another team serves.

use camelid_crds::{ChatModel, FineTuneJob};
use kube::ResourceExt;
use serde_json::{Value, json};

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

/// The annotation by which a ChatModel another party created accepts LoRA adapters from FineTuneJobs whose
/// `output.chatModel` names it: adapters add names, they never change what the base name serves.
pub const ACCEPT_ADAPTERS_ANNOTATION: &str = "camelid.dev/accept-adapters";

/// The server-side-apply patch by which a LoRA job publishes its adapter (named after the job) on the ChatModel
/// `name`: created serving the job's base model when there is none; on an existing one, only the adapter's entry
/// (each job applies under a field manager of its own, so entries of other jobs stay). Refused, saying why, when
/// the ChatModel is neither the job's nor accepting adapters, or serves another model than the job's base.
pub fn adapter_patch(ftj: &FineTuneJob, name: &str, existing: Option<&ChatModel>) -> Result<Value, String> {
    let job = ftj.name_any();
    let entry = json!({"name": job, "fineTuneJob": job});
    let meta = json!({"name": name, "namespace": ftj.namespace().unwrap_or_default()});
    let Some(existing) = existing else {
        let uid = ftj.uid().unwrap_or_default();
        let mut patch = json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": meta,
            "spec": {"model": ftj.spec.base_model, "template": ftj.spec.template, "adapters": [entry]},
        });
        patch["metadata"]["annotations"] = json!({PUBLISHED_BY_ANNOTATION: uid});
        patch["metadata"]["labels"] = json!({"camelid.dev/finetunejob": job});
        return Ok(patch);
    };
    let accepts = existing
        .annotations()
        .get(ACCEPT_ADAPTERS_ANNOTATION)
        .is_some_and(|v| v == "true");
    if !accepts && !may_publish_over(existing, &ftj.uid().unwrap_or_default()) {
        return Err(format!(
            "ChatModel {name} was not created by this job and does not accept adapters (annotate it \
             {ACCEPT_ADAPTERS_ANNOTATION}=true to allow it)"
        ));
    }
    if existing.spec.model != ftj.spec.base_model {
        return Err(format!(
            "ChatModel {name} serves another model than this LoRA job's baseModel: an adapter only fits the base \
             it was trained on"
        ));
    }
    Ok(
        json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel", "metadata": meta,
              "spec": {"adapters": [entry]}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora_job() -> FineTuneJob {
        serde_json::from_value(json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "sql-lora", "namespace": "team-a", "uid": "job-uid"},
            "spec": {"baseModel": {"path": "/models/prod.gguf"}, "dataset": {"path": "/d.json"},
                     "hyperparameters": {}, "method": "Lora", "checkpoints": {"claimName": "c"},
                     "output": {"claimName": "runs", "chatModel": "prod"}}}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A LoRA job adds its adapter to the ChatModel of its base without touching what the base name serves; it
    /// creates one when there is none; another team's ChatModel takes adapters only when it says so, and never
    /// one trained on another base.
    #[test]
    fn a_lora_job_adds_its_adapter_only_where_it_fits_and_is_welcome() {
        let job = lora_job();
        let created = adapter_patch(&job, "prod", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(created["spec"]["model"], json!({"path": "/models/prod.gguf"}));
        assert_eq!(
            created["spec"]["adapters"],
            json!([{"name": "sql-lora", "fineTuneJob": "sql-lora"}])
        );
        assert_eq!(
            created["metadata"]["annotations"][PUBLISHED_BY_ANNOTATION],
            "job-uid"
        );

        let welcoming = model(json!({ACCEPT_ADAPTERS_ANNOTATION: "true"}));
        let added = adapter_patch(&job, "prod", Some(&welcoming)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            added["spec"],
            json!({"adapters": [{"name": "sql-lora", "fineTuneJob": "sql-lora"}]})
        );
        let err = adapter_patch(&job, "prod", Some(&model(json!({})))).expect_err("not welcome");
        assert!(err.contains(ACCEPT_ADAPTERS_ANNOTATION), "{err}");
        let mut other_base = welcoming.clone();
        other_base.spec.model.path = Some("/models/other.gguf".into());
        let err = adapter_patch(&job, "prod", Some(&other_base)).expect_err("another base");
        assert!(err.contains("another model"), "{err}");
    }

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
