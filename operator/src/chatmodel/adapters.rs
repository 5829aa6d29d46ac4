//! Where a ChatModel's LoRA adapters are (pure): a LoRA FineTuneJob's export once it succeeded, or a directory on
//! a claim. The ChatModel's status lists the ones ready, with the directory its workers see; the gateway loads an
//! adapter on a worker when a request first names it, so adding one restarts no worker (unless it is on a claim
//! the workers do not mount yet).

use std::collections::BTreeMap;

use camelid_crds::FineTuneJob;
use camelid_crds::chatmodel::{AdapterSpec, AdapterStatus};
use camelid_crds::finetunejob::FineTuneJobPhase;

use crate::finetunejob::build::output_path;
use crate::pod::on_claim;

/// An adapter's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFiles {
    pub name: String,
    /// The claim holding it; none for a directory in the worker image.
    pub claim: Option<String>,
    pub path: String,
}

impl AdapterFiles {
    /// The directory as the workers see it.
    pub fn worker_path(&self) -> String {
        match &self.claim {
            Some(claim) => on_claim(claim, &self.path),
            None => self.path.clone(),
        }
    }

    pub fn status(&self) -> AdapterStatus {
        AdapterStatus {
            name: self.name.clone(),
            path: self.worker_path(),
        }
    }
}

/// The adapters of `specs` that can be served, and for each that cannot yet, why. `jobs` holds the FineTuneJobs
/// they name, as read; `model_claim` is the claim of the model served (a path adapter's default claim).
pub fn resolve(
    specs: &[AdapterSpec],
    jobs: &BTreeMap<String, FineTuneJob>,
    model_claim: Option<&str>,
) -> (Vec<AdapterFiles>, Vec<String>) {
    let mut ready = Vec::new();
    let mut waiting = Vec::new();
    for spec in specs {
        match one(spec, jobs, model_claim) {
            Ok(files) => ready.push(files),
            Err(why) => waiting.push(format!("adapter {}: {why}", spec.name)),
        }
    }
    (ready, waiting)
}

fn one(
    spec: &AdapterSpec,
    jobs: &BTreeMap<String, FineTuneJob>,
    model_claim: Option<&str>,
) -> Result<AdapterFiles, String> {
    let files = |claim: Option<String>, path: String| AdapterFiles {
        name: spec.name.clone(),
        claim,
        path,
    };
    match (&spec.fine_tune_job, &spec.path) {
        (None, Some(path)) => {
            let claim = spec.claim_name.clone().or(model_claim.map(str::to_string));
            Ok(files(claim, path.clone()))
        }
        (Some(name), None) => {
            let job = jobs
                .get(name)
                .ok_or_else(|| format!("FineTuneJob {name} does not exist"))?;
            if job.spec.method.is_full() {
                return Err(format!(
                    "FineTuneJob {name} is a full fine-tune, not a LoRA adapter: serve it as a ChatModel's model"
                ));
            }
            let phase = job.status.as_ref().and_then(|s| s.phase);
            match phase {
                Some(FineTuneJobPhase::Succeeded) => {
                    Ok(files(Some(job.spec.output.claim_name.clone()), output_path(job)))
                }
                Some(p) => Err(format!(
                    "waiting for FineTuneJob {name} to succeed (now {})",
                    p.as_str()
                )),
                None => Err(format!("waiting for FineTuneJob {name} to succeed (now new)")),
            }
        }
        _ => Err("names neither or both of fineTuneJob and path".into()),
    }
}

#[cfg(test)]
mod tests {
    use camelid_crds::finetunejob::FineTuneJobStatus;

    use super::*;

    fn job(name: &str, method: &str, phase: Option<FineTuneJobPhase>) -> FineTuneJob {
        let mut ftj: FineTuneJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "default", "uid": "u1"},
            "spec": {"baseModel": {"path": "/m"}, "dataset": {"path": "/d.json"}, "hyperparameters": {},
                     "method": method, "checkpoints": {"claimName": "c"}, "output": {"claimName": "runs"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        ftj.status = Some(FineTuneJobStatus {
            phase,
            ..FineTuneJobStatus::default()
        });
        ftj
    }

    fn spec(name: &str, job: Option<&str>, path: Option<&str>) -> AdapterSpec {
        AdapterSpec {
            name: name.into(),
            fine_tune_job: job.map(str::to_string),
            path: path.map(str::to_string),
            claim_name: None,
        }
    }

    #[test]
    fn adapters_resolve_to_their_directories_or_say_why_not_yet() {
        let jobs: BTreeMap<String, FineTuneJob> = [
            job("sql-lora", "Lora", Some(FineTuneJobPhase::Succeeded)),
            job("poet-lora", "Lora", Some(FineTuneJobPhase::Running)),
            job("full", "Full", Some(FineTuneJobPhase::Succeeded)),
        ]
        .into_iter()
        .map(|j| (j.metadata.name.clone().unwrap_or_default(), j))
        .collect();
        let specs = [
            spec("sql", Some("sql-lora"), None),
            spec("poet", Some("poet-lora"), None),
            spec("chef", None, Some("adapters/chef")),
            spec("whole", Some("full"), None),
            spec("ghost", Some("nope"), None),
        ];
        let (ready, waiting) = resolve(&specs, &jobs, Some("models"));
        let paths: Vec<(String, String)> = ready.iter().map(|a| (a.name.clone(), a.worker_path())).collect();
        assert_eq!(
            paths,
            [
                (
                    "sql".to_string(),
                    "/camelid/volumes/runs/models/sql-lora".to_string()
                ),
                (
                    "chef".to_string(),
                    "/camelid/volumes/models/adapters/chef".to_string()
                ),
            ]
        );
        assert_eq!(waiting.len(), 3, "{waiting:?}");
        assert!(
            waiting[0].contains("poet") && waiting[0].contains("Running"),
            "{waiting:?}"
        );
        assert!(waiting[1].contains("full fine-tune"), "{waiting:?}");
        assert!(waiting[2].contains("does not exist"), "{waiting:?}");
    }
}
