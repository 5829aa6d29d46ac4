//! Where a model source's files are, or why they are not there yet (pure): a path on a claim or in the image, a
//! URI, or a FineTuneJob's exported model once the job succeeded. The ChatModel controller serves what this
//! resolves; the FineTuneJob controller's promotion gate serves a baseline ChatModel's model the same way.

use camelid_contracts::names;
use camelid_crds::FineTuneJob;
use camelid_crds::common::ModelSource;
use camelid_crds::finetunejob::FineTuneJobPhase;
use kube::ResourceExt;

use super::build::{ModelFiles, fingerprint};
use super::status::Source;
use crate::finetunejob::build::{exports_merged, output_path};

/// The files of `src`; `job` is the FineTuneJob it names, as read (none when it does not exist or none is named).
pub fn resolve(src: &ModelSource, job: Option<&FineTuneJob>) -> Result<ModelFiles, Source> {
    let Some(name) = &src.fine_tune_job else {
        return files_of(src);
    };
    let Some(ftj) = job else {
        return Err(Source::Waiting(format!("FineTuneJob {name} does not exist")));
    };
    let status = ftj.status.clone().unwrap_or_default();
    match status.phase {
        // A LoRA job's export is an adapter; the merged model beside it is a model.
        Some(FineTuneJobPhase::Succeeded) if !ftj.spec.method.is_full() && !exports_merged(ftj) => {
            Err(Source::Failed(format!(
                "FineTuneJob {name} trained a LoRA adapter: list it under spec.adapters of a ChatModel serving its \
                 base model (or set lora.merge to export a merged model)"
            )))
        }
        Some(FineTuneJobPhase::Succeeded) => Ok(exported(ftj)),
        Some(FineTuneJobPhase::Failed) => Err(Source::Failed(format!(
            "FineTuneJob {name} failed: {}",
            status.message.unwrap_or_default()
        ))),
        // Not failed: a person may still promote it, and then it is served.
        Some(FineTuneJobPhase::Rejected) => Err(Source::Waiting(format!(
            "FineTuneJob {name} was rejected by its evaluation ({}); to serve it anyway: kubectl annotate \
             finetunejob {name} {}=true",
            status.message.unwrap_or_default(),
            names::PROMOTE_ANNOTATION
        ))),
        Some(
            phase @ (FineTuneJobPhase::Pending
            | FineTuneJobPhase::Running
            | FineTuneJobPhase::Recovering
            | FineTuneJobPhase::Evaluating),
        ) => Err(waiting_for(name, phase.as_str())),
        None => Err(waiting_for(name, "new")),
    }
}

pub(super) fn waiting_for(job: &str, phase: &str) -> Source {
    Source::Waiting(format!("waiting for FineTuneJob {job} to succeed (now {phase})"))
}

/// A source that names its files: a path on a claim, a path in the image, or a URI.
fn files_of(src: &ModelSource) -> Result<ModelFiles, Source> {
    let shown = match (&src.claim_name, &src.path, &src.uri) {
        (Some(claim), Some(path), _) => format!("pvc://{claim}/{}", path.trim_start_matches('/')),
        (None, Some(path), _) => path.clone(),
        (_, _, Some(uri)) => uri.clone(),
        _ => return Err(Source::Failed("set one of fineTuneJob, path and uri".into())),
    };
    Ok(ModelFiles {
        claim: src.claim_name.clone(),
        path: src.path.clone(),
        uri: src.uri.clone(),
        sha256: src.sha256.clone(),
        max_bytes: src.max_bytes,
        revision: fingerprint(&shown),
        shown,
        adapter_claims: Vec::new(),
    })
}

/// The exported model of a FineTuneJob that succeeded. Its revision follows the job's completion, so workers
/// roll whenever the job exports again.
fn exported(ftj: &FineTuneJob) -> ModelFiles {
    let job = ftj.name_any();
    let status = ftj.status.clone().unwrap_or_default();
    let mut path = output_path(ftj);
    if !ftj.spec.method.is_full() {
        path.push_str("/merged");
    }
    let completed = status
        .completion_time
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    ModelFiles {
        claim: Some(ftj.spec.output.claim_name.clone()),
        path: Some(path),
        uri: None,
        sha256: None,
        max_bytes: None,
        shown: format!("finetunejob/{job}"),
        revision: fingerprint(&format!("{}/{completed}", ftj.uid().unwrap_or_default())),
        adapter_claims: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use camelid_crds::finetunejob::FineTuneJobStatus;

    use super::*;

    fn job(phase: Option<FineTuneJobPhase>, message: &str) -> FineTuneJob {
        let mut ftj: FineTuneJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "tune", "namespace": "default", "uid": "u1"},
            "spec": {"baseModel": {"path": "/m"}, "dataset": {"path": "/d.json"}, "hyperparameters": {},
                     "checkpoints": {"claimName": "c"}, "output": {"claimName": "models", "path": "tuned"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        ftj.status = Some(FineTuneJobStatus {
            phase,
            message: Some(message.into()),
            ..FineTuneJobStatus::default()
        });
        ftj
    }

    fn by_job() -> ModelSource {
        ModelSource {
            fine_tune_job: Some("tune".into()),
            ..ModelSource::default()
        }
    }

    #[test]
    fn files_named_by_the_source_are_ready_at_once() {
        let src = ModelSource {
            claim_name: Some("models".into()),
            path: Some("/llama".into()),
            ..ModelSource::default()
        };
        let files = resolve(&src, None).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(files.shown, "pvc://models/llama");
        assert_eq!(files.claim.as_deref(), Some("models"));
    }

    #[test]
    fn a_jobs_model_is_served_once_it_succeeded() {
        let ok = job(Some(FineTuneJobPhase::Succeeded), "done");
        let files = resolve(&by_job(), Some(&ok)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (
                files.claim.as_deref(),
                files.path.as_deref(),
                files.shown.as_str()
            ),
            (Some("models"), Some("tuned"), "finetunejob/tune")
        );
        assert_eq!(
            resolve(&by_job(), None),
            Err(Source::Waiting("FineTuneJob tune does not exist".into()))
        );
        let evaluating = job(Some(FineTuneJobPhase::Evaluating), "");
        assert_eq!(
            resolve(&by_job(), Some(&evaluating)),
            Err(Source::Waiting(
                "waiting for FineTuneJob tune to succeed (now Evaluating)".into()
            ))
        );
        let failed = job(Some(FineTuneJobPhase::Failed), "maxRestarts reached");
        assert!(
            matches!(resolve(&by_job(), Some(&failed)), Err(Source::Failed(m)) if m.contains("maxRestarts"))
        );
    }

    #[test]
    fn a_rejected_job_waits_and_says_how_to_promote_it() {
        let rejected = job(Some(FineTuneJobPhase::Rejected), "win rate 0.31 < minWinRate 0.5");
        let Err(Source::Waiting(why)) = resolve(&by_job(), Some(&rejected)) else {
            panic!("a rejected job can still be promoted: the ChatModel waits");
        };
        assert!(why.contains("rejected") && why.contains("win rate 0.31"), "{why}");
        assert!(
            why.contains("kubectl annotate finetunejob tune camelid.dev/promote=true"),
            "{why}"
        );
    }
}
