//! Attacks on the operator's policy: specs whose authors may not create pods, asking for pods they could not
//! create themselves. Each is refused naming the field.

use camelid_crds::{ChatModel, FineTuneJob};
use serde_json::{Value, json};

use super::*;

fn finetunejob(spec_patch: Value) -> FineTuneJob {
    let mut spec = json!({"baseModel": {"path": "/m"}, "dataset": {"path": "/d.json"}, "hyperparameters": {},
                          "checkpoints": {"claimName": "c"}, "output": {"claimName": "models"}});
    merge(&mut spec, spec_patch);
    serde_json::from_value(
        json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "u1"}, "spec": spec}),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn chatmodel(spec_patch: Value) -> ChatModel {
    let mut spec = json!({"model": {"path": "/m.gguf"}});
    merge(&mut spec, spec_patch);
    serde_json::from_value(json!({"apiVersion": "camelid.dev/v1alpha1", "kind": "ChatModel",
        "metadata": {"name": "smol", "namespace": "team-a", "uid": "u2"}, "spec": spec}))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

fn denied_ftj(patch: Value) -> Denied {
    let settings = Settings::default();
    match settings.policy.check_finetunejob(&finetunejob(patch), &settings) {
        Err(d) => d,
        Ok(()) => panic!("allowed"),
    }
}

fn denied_cm(policy: &Policy, patch: Value) -> Denied {
    match policy.check_chatmodel(&chatmodel(patch), &Settings::default()) {
        Err(d) => d,
        Ok(()) => panic!("allowed"),
    }
}

#[test]
fn a_spec_cannot_choose_an_image_outside_the_allowed_registries() {
    let d = denied_ftj(json!({"image": "evil.example/miner:latest"}));
    assert_eq!(d.field, "spec.image");
    assert!(
        d.why.contains("evil.example/miner") && d.why.contains("ghcr.io/camelid-dev/"),
        "{d}"
    );
    // A look-alike of an allowed prefix.
    let d = denied_cm(
        &Policy::default(),
        json!({"image": "ghcr.io/camelid-dev-evil/worker:1"}),
    );
    assert_eq!(d.field, "spec.image");
    // The evaluation pod's image too.
    let d = denied_ftj(
        json!({"evaluation": {"questions": {"configMap": {"name": "q", "key": "q"}},
        "judge": {"url": "https://judge.example/v1", "model": "j"}, "image": "docker.io/library/alpine"}}),
    );
    assert_eq!(d.field, "spec.evaluation.image");
    // The operator's own images and those under an allowed prefix are fine.
    let settings = Settings::default();
    for image in [
        settings.trainer_image.as_str(),
        "ghcr.io/camelid-dev/camelid-trainer:0.2.0",
    ] {
        let job = finetunejob(json!({"image": image}));
        assert_eq!(
            settings.policy.check_finetunejob(&job, &settings),
            Ok(()),
            "{image}"
        );
    }
    assert!(under("ghcr.io/camelid-dev:1", "ghcr.io/camelid-dev"));
    assert!(!under("ghcr.io/camelid-devx/a", "ghcr.io/camelid-dev"));
    assert!(!under("anything", ""));
}

#[test]
fn a_spec_cannot_choose_a_priority_class_the_policy_does_not_allow() {
    let d = denied_ftj(json!({"priorityClassName": "system-node-critical"}));
    assert_eq!(d.field, "spec.priorityClassName");
    assert!(
        d.why.contains("system-node-critical") && d.why.contains("allowed: none"),
        "{d}"
    );
    let settings = Settings {
        policy: Policy {
            priority_classes: vec!["batch-low".into()],
            ..Policy::default()
        },
        ..Settings::default()
    };
    let job = finetunejob(json!({"priorityClassName": "batch-low"}));
    assert_eq!(settings.policy.check_finetunejob(&job, &settings), Ok(()));
}

#[test]
fn a_spec_cannot_tolerate_taints_the_policy_does_not_allow() {
    // Onto the control plane.
    let d = denied_ftj(json!({"spot": {"tolerations": [
        {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}}));
    assert_eq!(d.field, "spec.spot.tolerations[1].key");
    assert!(d.why.contains("node-role.kubernetes.io/control-plane"), "{d}");
    // A toleration without a key tolerates every taint.
    let d = denied_cm(
        &Policy::default(),
        json!({"spot": {"tolerations": [{"operator": "Exists"}]}}),
    );
    assert_eq!(d.field, "spec.spot.tolerations[0].key");
    assert!(d.why.contains("every taint"), "{d}");
    let any = Policy {
        toleration_keys: vec!["*".into()],
        ..Policy::default()
    };
    let model = chatmodel(json!({"spot": {"tolerations": [{"operator": "Exists"}]}}));
    assert_eq!(any.check_chatmodel(&model, &Settings::default()), Ok(()));
}

#[test]
fn a_model_uri_must_be_https_without_credentials_and_within_the_size_limit() {
    let strict = Policy::default();
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "http://mirror.local/m.gguf"}}),
    );
    assert_eq!(d.field, "spec.model.uri");
    assert!(
        d.why.contains("plain http") && d.why.contains("--allow-http-model-uris"),
        "{d}"
    );
    let d = denied_ftj(json!({"baseModel": {"path": null, "uri": "ftp://x/m.gguf"}}));
    assert_eq!(d.field, "spec.baseModel.uri");
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "https://user:pw@host/m.gguf"}}),
    );
    assert!(d.why.contains("credentials"), "{d}");
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "https://host/m.gguf\n-o /etc/x"}}),
    );
    assert!(d.why.contains("control characters"), "{d}");
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "https:///m.gguf"}}),
    );
    assert!(d.why.contains("no host"), "{d}");
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "https://h/m.gguf", "maxBytes": i64::MAX}}),
    );
    assert_eq!(d.field, "spec.model.maxBytes");
    let d = denied_cm(
        &strict,
        json!({"model": {"path": null, "uri": "https://h/m.gguf", "sha256": "ABC; rm -rf /"}}),
    );
    assert_eq!(d.field, "spec.model.sha256");
    // http only with the operator's opt-in; https with a checksum and a limit is fine.
    let open = Policy {
        allow_http_uris: true,
        ..Policy::default()
    };
    let model = chatmodel(json!({"model": {"path": null, "uri": "http://mirror.local/m.gguf"}}));
    assert_eq!(open.check_chatmodel(&model, &Settings::default()), Ok(()));
    let model = chatmodel(
        json!({"model": {"path": null, "uri": "https://h/m.gguf", "maxBytes": 1000,
        "sha256": "a".repeat(64)}}),
    );
    assert_eq!(strict.check_chatmodel(&model, &Settings::default()), Ok(()));
    assert_eq!(strict.max_bytes(Some(1000)), 1000);
    assert_eq!(strict.max_bytes(None), DEFAULT_MAX_MODEL_BYTES);
    assert_eq!(strict.max_bytes(Some(i64::MAX)), DEFAULT_MAX_MODEL_BYTES);
}

#[test]
fn the_command_lines_defaults_are_the_policys_defaults() {
    assert_eq!(crate::run::RunArgs::default().policy(), Policy::default());
}

/// The chart passes every list, empty ones included (`--allowed-priority-classes=`).
#[test]
fn the_charts_flags_parse_into_the_policy() {
    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: crate::run::RunArgs,
    }
    let parsed = <Command as clap::Parser>::try_parse_from([
        "run",
        "--allowed-image-prefixes=ghcr.io/camelid-dev/,registry.example/team/",
        "--allowed-priority-classes=",
        "--allowed-toleration-keys=*",
        "--allow-http-model-uris",
        "--max-model-bytes=1000000",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let policy = parsed.args.policy();
    assert_eq!(
        policy.image_prefixes,
        ["ghcr.io/camelid-dev/", "registry.example/team/"]
    );
    assert!(policy.priority_classes.is_empty());
    assert_eq!(policy.toleration_keys, ["*"]);
    assert!(policy.allow_http_uris);
    assert_eq!(policy.max_model_bytes, 1_000_000);
}
