//! The FineTuneJob and ChatModel specs users write, good and bad, shared by the schema tests (`crds.rs`, kube's CEL
//! engine on the generated YAML) and the real API server's (`k8s_chart.rs`): each bad case is a merge patch on an
//! example and a fragment its rejection must name.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::Path;

use serde_json::{Value, json};

pub fn example(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Applies a JSON merge patch (RFC 7386) to `base`.
pub fn patched(base: &Value, patch: Value) -> Value {
    let mut out = base.clone();
    merge(&mut out, patch);
    out
}

fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(map) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in map {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

/// The printer columns of `kubectl get finetunejobs` after NAME, in order.
pub const FINETUNEJOB_COLUMNS: [&str; 8] = [
    "PHASE",
    "PROGRESS",
    "LOSS",
    "EVAL",
    "PREEMPTIONS",
    "LAST-CKPT",
    "COST",
    "AGE",
];

/// The printer columns of `kubectl get chatmodels` after NAME, in order.
pub const CHATMODEL_COLUMNS: [&str; 6] = ["READY", "REPLICAS", "MODEL", "ADAPTERS", "ENDPOINT", "AGE"];
/// The ChatModel's further columns in `kubectl get -o wide` (priority 1).
pub const CHATMODEL_WIDE_COLUMNS: [&str; 2] = ["PREEMPTIONS", "MIGRATIONS"];

/// Bad FineTuneJobs: a merge patch on `examples/finetunejob.yaml` and what the rejection must say.
pub fn finetunejob_cases() -> Vec<(Value, &'static str)> {
    vec![
        (json!({"spec": {"workers": 0}}), "workers"),
        (json!({"spec": {"workers": "two"}}), "workers"),
        (json!({"spec": {"gpusPerWorker": 17}}), "gpusPerWorker"),
        (
            json!({"spec": {"hyperparameters": {"learningRate": -1}}}),
            "learningRate",
        ),
        (
            json!({"spec": {"hyperparameters": {"maxSteps": 100}}}),
            "set epochs or maxSteps, not both",
        ),
        (
            json!({"spec": {"hyperparameters": {"microBatch": 3}}}),
            "multiple of workers x gpusPerWorker",
        ),
        (
            json!({"spec": {"hyperparameters": {"microBatch": 256}}}),
            "microBatch must not exceed globalBatch",
        ),
        (
            json!({"spec": {"baseModel": {"uri": "https://x/m.gguf"}}}),
            "exactly one of fineTuneJob, path and uri",
        ),
        (
            json!({"spec": {"baseModel": {"path": null, "claimName": "models"}}}),
            "exactly one of fineTuneJob, path and uri",
        ),
        (
            json!({"spec": {"baseModel": {"claimName": null, "path": null, "fineTuneJob": "earlier"}}}),
            "baseModel.fineTuneJob: a FineTuneJob trains from files",
        ),
        (
            json!({"spec": {"spot": {"baseOnDemand": 1}}}),
            "spot.baseOnDemand is for ChatModels",
        ),
        (
            json!({"spec": {"baseModel": {"claimName": null, "path": null, "uri": "ftp://x"}}}),
            "uri",
        ),
        (
            json!({"spec": {"dataset": {"path": "../../etc/passwd"}}}),
            "must not contain '..'",
        ),
        (
            json!({"spec": {"spot": {"provider": "custom"}}}),
            "custom spot provider needs nodeSelector",
        ),
        (json!({"spec": {"spot": {"provider": "gcp"}}}), "provider"),
        (
            json!({"spec": {"spot": {"pendingTimeout": "ten minutes"}}}),
            "pendingTimeout",
        ),
        (json!({"spec": {"checkpoints": null}}), "checkpoints"),
        (
            json!({"spec": {"imagePullPolicy": "Sometimes"}}),
            "imagePullPolicy",
        ),
        (json!({"spec": {"maxRestarts": -1}}), "maxRestarts"),
    ]
    .into_iter()
    .chain(evaluation_cases())
    .collect()
}

/// The `evaluation` the example shows in its comment, uncommented: so the documented one is checked too.
pub fn evaluation() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "# evaluation:")
        .take_while(|l| l.starts_with("  # "))
        .map(|l| &l["  # ".len()..])
        .collect();
    assert!(!block.is_empty(), "examples/finetunejob.yaml shows no evaluation");
    let parsed: Value = serde_yaml_ng::from_str(&block.join("\n")).unwrap();
    parsed["evaluation"].clone()
}

/// The example with its evaluation.
pub fn example_with_evaluation() -> Value {
    patched(
        &example("finetunejob.yaml"),
        json!({"spec": {"evaluation": evaluation()}}),
    )
}

/// A merge patch that gives the example the evaluation with `flaw` merged into it.
fn bad_evaluation(flaw: Value) -> Value {
    json!({"spec": {"evaluation": patched(&evaluation(), flaw)}})
}

/// Bad evaluations: merge patches on `examples/finetunejob.yaml` (whole evaluations, each with one flaw).
fn evaluation_cases() -> Vec<(Value, &'static str)> {
    let questions_rule =
        "evaluation.questions: set claimName and path (a file on a claim) or configMap, exactly one";
    vec![
        (
            bad_evaluation(
                json!({"questions": {"configMap": {"name": "mt-bench", "key": "question.jsonl"}}}),
            ),
            questions_rule,
        ),
        (
            bad_evaluation(json!({"questions": {"claimName": null, "path": null}})),
            questions_rule,
        ),
        (
            bad_evaluation(json!({"questions": {"path": null}})),
            questions_rule,
        ),
        (
            bad_evaluation(json!({"questions": {"path": "../secrets.jsonl"}})),
            "must not contain '..'",
        ),
        (
            bad_evaluation(
                json!({"questions": {"claimName": null, "path": null, "configMap": {"name": "q"}}}),
            ),
            "key",
        ),
        (bad_evaluation(json!({"judge": {"url": "judge:8000"}})), "url"),
        (bad_evaluation(json!({"judge": {"model": null}})), "model"),
        (bad_evaluation(json!({"minWinRate": 1.5})), "minWinRate"),
        (bad_evaluation(json!({"concurrency": 0})), "concurrency"),
        (bad_evaluation(json!({"maxQuestions": 0})), "maxQuestions"),
        (bad_evaluation(json!({"baseline": {}})), "chatModel"),
        (
            json!({"spec": {"lora": {"rank": 8}}}),
            "lora settings need method: Lora",
        ),
        (json!({"spec": {"method": "Lora", "lora": {"rank": 0}}}), "rank"),
        (json!({"spec": {"method": "QLoRA"}}), "method"),
    ]
}

/// A FineTuneJob with everything that has a default left out.
pub fn minimal_finetunejob() -> Value {
    json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "m"},
        "spec": {"baseModel": {"uri": "https://example.com/m.gguf"}, "dataset": {"path": "/data/d.json"},
                 "hyperparameters": {}, "gpusPerWorker": 0,
                 "checkpoints": {"claimName": "c"}, "output": {"claimName": "o"}}})
}

/// Bad ChatModels: a merge patch on `examples/chatmodel.yaml` and what the rejection must say.
pub fn chatmodel_cases() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"spec": {"replicas": {"min": 3, "max": 2}}}),
            "replicas.min must not exceed replicas.max",
        ),
        (
            json!({"spec": {"autoscaling": {"scaleToZero": false}}}),
            "set autoscaling.scaleToZero",
        ),
        (
            json!({"spec": {"model": {"path": "/m"}}}),
            "exactly one of fineTuneJob, path and uri",
        ),
        (
            json!({"spec": {"model": {"fineTuneJob": null}}}),
            "exactly one of fineTuneJob, path and uri",
        ),
        (
            json!({"spec": {"autoscaling": {"targetInFlight": 0}}}),
            "targetInFlight",
        ),
        (json!({"spec": {"gpus": -1}}), "gpus"),
        (json!({"spec": {"replicas": {"desired": -1}}}), "desired"),
        (json!({"spec": {"autoscaling": {"enabled": "no"}}}), "enabled"),
        (
            json!({"spec": {"adapters": [{"name": "sql"}]}}),
            "exactly one of fineTuneJob and path",
        ),
        (
            json!({"spec": {"adapters": [{"name": "sql", "path": "a", "fineTuneJob": "j"}]}}),
            "exactly one of fineTuneJob and path",
        ),
        (
            json!({"spec": {"adapters": [{"name": "sql", "path": "../../etc"}]}}),
            "must not contain '..'",
        ),
        (
            json!({"spec": {"adapters": [{"name": "a b", "path": "x"}]}}),
            "name",
        ),
        (
            json!({"spec": {"adapters": [{"name": "sql", "claimName": "c", "fineTuneJob": "j"}]}}),
            "claimName needs a path",
        ),
    ]
}
