//! The CRDs the chart ships: in sync with the types, and what they accept. Objects are checked as the API server
//! would: defaults applied, then the structural schema (types, required fields, enums, ranges, patterns), then
//! the CEL rules (`x-kubernetes-validations`, evaluated by kube's CEL engine) — against the generated YAML itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod schema;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn chart_crds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/camelid/crds")
}

#[test]
fn the_charts_crds_are_generated_from_the_types() {
    let files = camelid_operator::crdgen::crd_files().unwrap();
    assert_eq!(files.len(), 2);
    for (name, yaml) in files {
        let path = chart_crds().join(&name);
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            shipped == yaml,
            "{} is stale: run `cargo run -p camelid-operator -- crds --out charts/camelid/crds`",
            path.display()
        );
    }
}

/// The openAPIV3Schema of a shipped CRD.
fn crd_schema(file: &str) -> Value {
    let text = std::fs::read_to_string(chart_crds().join(file)).unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn example(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Applies a JSON merge patch (RFC 7386) to `base`.
fn patched(base: &Value, patch: Value) -> Value {
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

#[test]
fn finetunejob_examples_pass_and_bad_specs_are_rejected_with_clear_messages() {
    let schema = crd_schema("finetunejobs.camelid.dev.yaml");
    let good = example("finetunejob.yaml");
    schema::check(&schema, &good).unwrap();
    // Minimal: everything with a default left out.
    let minimal = json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "m"},
        "spec": {"baseModel": {"uri": "https://example.com/m.gguf"}, "dataset": {"path": "/data/d.json"},
                 "hyperparameters": {}, "gpusPerWorker": 0,
                 "checkpoints": {"claimName": "c"}, "output": {"claimName": "o"}}});
    schema::check(&schema, &minimal).unwrap();

    let cases = [
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
            "exactly one of path and uri",
        ),
        (
            json!({"spec": {"baseModel": {"path": null, "claimName": "models"}}}),
            "exactly one of path and uri",
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
    ];
    for (patch, needle) in cases {
        let bad = patched(&good, patch.clone());
        let e = schema::check(&schema, &bad).expect_err(&patch.to_string());
        assert!(e.contains(needle), "{patch}: {e}");
    }
}

#[test]
fn chatmodel_examples_pass_and_bad_specs_are_rejected_with_clear_messages() {
    let schema = crd_schema("chatmodels.camelid.dev.yaml");
    let good = example("chatmodel.yaml");
    schema::check(&schema, &good).unwrap();
    let cases = [
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
    ];
    for (patch, needle) in cases {
        let bad = patched(&good, patch.clone());
        let e = schema::check(&schema, &bad).expect_err(&patch.to_string());
        assert!(e.contains(needle), "{patch}: {e}");
    }
}

#[test]
fn the_printer_columns_are_the_ones_users_see() {
    let columns = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(chart_crds().join(file)).unwrap();
        let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
        crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        columns("finetunejobs.camelid.dev.yaml"),
        [
            "PHASE",
            "PROGRESS",
            "LOSS",
            "PREEMPTIONS",
            "LAST-CKPT",
            "COST",
            "AGE"
        ]
    );
    assert_eq!(
        columns("chatmodels.camelid.dev.yaml"),
        ["READY", "REPLICAS", "MODEL", "ENDPOINT", "AGE"]
    );
}
