//! The CRDs the chart ships: in sync with the types, and what they accept. Objects are checked as the API server
//! would: defaults applied, then the structural schema (types, required fields, enums, ranges, patterns), then
//! the CEL rules (`x-kubernetes-validations`, evaluated by kube's CEL engine) — against the generated YAML itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crd_cases;
mod schema;

use std::path::{Path, PathBuf};

use serde_json::Value;

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
    let cases = crd_cases::chatmodel_cases();
    for (patch, needle) in cases {
        let bad = crd_cases::patched(&good, patch.clone());
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
        crd_cases::FINETUNEJOB_COLUMNS
    );
    assert_eq!(
        columns("chatmodels.camelid.dev.yaml"),
        crd_cases::CHATMODEL_COLUMNS
    );
}
