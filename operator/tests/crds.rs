//! The CRDs the chart ships: in sync with the types, and what they accept. Objects are checked as the API server
//! would: defaults applied, then the structural schema (types, required fields, enums, ranges, patterns), then
//! the CEL rules (`x-kubernetes-validations`, evaluated by kube's CEL engine) — against the generated YAML itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crd_cases;
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

#[test]
fn finetunejob_examples_pass_and_bad_specs_are_rejected_with_clear_messages() {
    let schema = crd_schema("finetunejobs.camelid.dev.yaml");
    let good = crd_cases::example("finetunejob.yaml");
    schema::check(&schema, &good).unwrap();
    // Minimal: everything with a default left out.
    let minimal = crd_cases::minimal_finetunejob();
    schema::check(&schema, &minimal).unwrap();
    // The promotion gate the example documents, and the least of one: questions from a ConfigMap and a judge.
    schema::check(&schema, &crd_cases::example_with_evaluation()).unwrap();
    let least = crd_cases::patched(
        &minimal,
        json!({"spec": {"evaluation": {"questions": {"configMap": {"name": "mt-bench", "key": "question.jsonl"}},
                                       "judge": {"url": "http://judge/v1", "model": "gpt-4"}}}}),
    );
    schema::check(&schema, &least).unwrap();

    let cases = crd_cases::finetunejob_cases();
    for (patch, needle) in cases {
        let bad = crd_cases::patched(&good, patch.clone());
        let e = schema::check(&schema, &bad).expect_err(&patch.to_string());
        assert!(e.contains(needle), "{patch}: {e}");
    }
}

#[test]
fn chatmodel_examples_pass_and_bad_specs_are_rejected_with_clear_messages() {
    let schema = crd_schema("chatmodels.camelid.dev.yaml");
    let good = crd_cases::example("chatmodel.yaml");
    schema::check(&schema, &good).unwrap();
    let with_adapters = crd_cases::patched(
        &good,
        json!({"spec": {"adapters": [{"name": "sql", "fineTuneJob": "sql-lora"},
                                     {"name": "poet:v2", "path": "adapters/poet", "claimName": "shared"}]}}),
    );
    schema::check(&schema, &with_adapters).unwrap();
    let cases = crd_cases::chatmodel_cases();
    for (patch, needle) in cases {
        let bad = crd_cases::patched(&good, patch.clone());
        let e = schema::check(&schema, &bad).expect_err(&patch.to_string());
        assert!(e.contains(needle), "{patch}: {e}");
    }
}

#[test]
fn the_printer_columns_are_the_ones_users_see() {
    // The columns of plain `kubectl get` (priority 0), or of `-o wide` only (priority 1).
    let columns = |file: &str, priority: i64| -> Vec<String> {
        let text = std::fs::read_to_string(chart_crds().join(file)).unwrap();
        let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
        crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["priority"].as_i64().unwrap_or(0) == priority)
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        columns("finetunejobs.camelid.dev.yaml", 0),
        crd_cases::FINETUNEJOB_COLUMNS
    );
    assert_eq!(
        columns("chatmodels.camelid.dev.yaml", 0),
        crd_cases::CHATMODEL_COLUMNS
    );
    assert_eq!(
        columns("chatmodels.camelid.dev.yaml", 1),
        crd_cases::CHATMODEL_WIDE_COLUMNS
    );
}

#[test]
fn chatmodels_have_a_scale_subresource_for_hpa_and_keda() {
    let text = std::fs::read_to_string(chart_crds().join("chatmodels.camelid.dev.yaml")).unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        crd["spec"]["versions"][0]["subresources"]["scale"],
        json!({"specReplicasPath": ".spec.replicas.desired",
               "statusReplicasPath": ".status.desiredReplicas",
               "labelSelectorPath": ".status.selector"})
    );
    // Defaulted, so `/scale` never reads an unset value (an HPA takes that for 0 replicas and stops).
    let replicas = &crd_schema("chatmodels.camelid.dev.yaml")["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(replicas["properties"]["desired"]["default"], 1, "{replicas}");
}

#[test]
fn with_autoscaling_off_a_chatmodel_may_go_to_zero_without_scale_to_zero() {
    let schema = crd_schema("chatmodels.camelid.dev.yaml");
    let good = crd_cases::example("chatmodel.yaml");
    let off = crd_cases::patched(
        &good,
        json!({"spec": {"replicas": {"min": 0, "max": 4, "desired": 0},
                        "autoscaling": {"enabled": false, "scaleToZero": false}}}),
    );
    schema::check(&schema, &off).unwrap();
    let on = crd_cases::patched(&off, json!({"spec": {"autoscaling": {"enabled": true}}}));
    let e = schema::check(&schema, &on).expect_err("min 0 with the autoscaler on needs scaleToZero");
    assert!(e.contains("set autoscaling.scaleToZero"), "{e}");
    // Out of bounds is not refused: the operator runs the nearest bound.
    let wide = crd_cases::patched(&off, json!({"spec": {"replicas": {"desired": 9}}}));
    schema::check(&schema, &wide).unwrap();
}

/// The Kubernetes types the CRDs embed, as `(name, their own schema)`: their fields are Kubernetes' to document,
/// and their own description is what an undocumented field of that type shows in `kubectl explain`. (k8s-openapi's
/// `schemars` feature is on because camelid-crds turns it on for the CRD schemas.)
fn kubernetes_types() -> Vec<(&'static str, Value)> {
    use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::schemars::schema_for;
    [
        ("Condition", serde_json::to_value(schema_for!(Condition))),
        ("Quantity", serde_json::to_value(schema_for!(Quantity))),
        (
            "ResourceRequirements",
            serde_json::to_value(schema_for!(ResourceRequirements)),
        ),
        ("Time", serde_json::to_value(schema_for!(Time))),
        ("Toleration", serde_json::to_value(schema_for!(Toleration))),
    ]
    .into_iter()
    .map(|(name, schema)| (name, schema.unwrap()))
    .collect()
}

/// The field names of an object schema, sorted.
fn property_names(schema: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = schema["properties"]
        .as_object()
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    names.sort_unstable();
    names
}

/// The path of the first property under `schema` without a description of its own, walking object properties,
/// array items and map values. A description is its own when it is not empty and not merely the description of
/// the Kubernetes type the field has (an undocumented `Time` field says "Time is a wrapper around time.Time...").
/// The walk does not go into objects of Kubernetes' types (ResourceRequirements, Toleration, Condition): those
/// are recognized by their field names, since a documented field carries our description instead of theirs.
fn first_undocumented(schema: &Value, path: &str, k8s: &[(&str, Value)]) -> Option<String> {
    let names = property_names(schema);
    if !names.is_empty() && k8s.iter().any(|(_, t)| property_names(t) == names) {
        return None;
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let here = format!("{path}.{name}");
            let description = property["description"].as_str().unwrap_or_default().trim();
            if description.is_empty() {
                return Some(format!(
                    "{here} has no description: `kubectl explain` shows nothing for it"
                ));
            }
            if let Some((kind, _)) = k8s
                .iter()
                .find(|(_, t)| t["description"].as_str().map(str::trim) == Some(description))
            {
                return Some(format!(
                    "{here} only has the description of Kubernetes' {kind}, not what this field means"
                ));
            }
            if let Some(missing) = first_undocumented(property, &here, k8s) {
                return Some(missing);
            }
        }
    }
    for (key, suffix) in [("items", "[]"), ("additionalProperties", ".*")] {
        if schema[key].is_object()
            && let Some(missing) = first_undocumented(&schema[key], &format!("{path}{suffix}"), k8s)
        {
            return Some(missing);
        }
    }
    None
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    let k8s = kubernetes_types();
    assert!(
        k8s.iter().all(|(_, t)| t["description"].is_string()),
        "Kubernetes' types have descriptions"
    );
    for (file, yaml) in camelid_operator::crdgen::crd_files().unwrap() {
        let crd: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for part in ["spec", "status"] {
            let schema = &root["properties"][part];
            assert!(schema.is_object(), "{file}: no {part}");
            let path = format!("{kind}.{part}");
            assert!(
                schema["description"]
                    .as_str()
                    .is_some_and(|d| !d.trim().is_empty()),
                "{file}: {path} has no description"
            );
            if let Some(missing) = first_undocumented(schema, &path, &k8s) {
                panic!("{file}: {missing}; add a doc comment to the field");
            }
        }
    }
}

#[test]
fn conditions_are_a_map_list_keyed_by_type() {
    for (file, yaml) in camelid_operator::crdgen::crd_files().unwrap() {
        let crd: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["conditions"];
        assert_eq!(conditions["type"], "array", "{file}");
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{file}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{file}"
        );
        // A map-list's keys must be required (or defaulted) in its items.
        let required = conditions["items"]["required"].as_array().unwrap();
        assert!(required.iter().any(|r| r == "type"), "{file}: {required:?}");
    }
}
