//! Attacks on the operator's policy: specs whose authors may not create pods, asking for pods they could not
//! create themselves. Each is refused naming the field.

use camelid_crds::{ChatModel, FineTuneJob};
use serde_json::{Value, json};

use super::*;
use Spec::{Model, Tune};

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

/// A spec for the policy to judge: a FineTuneJob's or a ChatModel's, as a patch on its smallest spec.
#[derive(Debug)]
enum Spec {
    Tune(Value),
    Model(Value),
}

impl Spec {
    /// What `policy` says of the spec, the operator's other settings being their defaults.
    fn judged_by(&self, policy: &Policy) -> Result<(), Denied> {
        match self {
            Tune(patch) => {
                let settings = Settings {
                    policy: policy.clone(),
                    ..Settings::default()
                };
                policy.check_finetunejob(&finetunejob(patch.clone()), &settings)
            }
            Model(patch) => policy.check_chatmodel(&chatmodel(patch.clone()), &Settings::default()),
        }
    }
}

/// Each case is a spec the default policy refuses, the field the denial names (where the case gives one) and what
/// its reason must mention: one table, so that every attack is checked the same way.
fn assert_refused(cases: &[(Spec, Option<&str>, &[&str])]) {
    for (spec, field, why) in cases {
        let d = match spec.judged_by(&Policy::default()) {
            Err(d) => d,
            Ok(()) => panic!("allowed: {spec:?}"),
        };
        if let Some(field) = field {
            assert_eq!(d.field, *field, "{spec:?}");
        }
        for fragment in *why {
            assert!(d.why.contains(fragment), "{d}");
        }
    }
}

/// `policy` allows every one of `specs`.
fn assert_allowed(policy: &Policy, specs: &[Spec]) {
    for spec in specs {
        assert_eq!(spec.judged_by(policy), Ok(()), "{spec:?}");
    }
}

#[test]
fn a_spec_cannot_choose_an_image_outside_the_allowed_registries() {
    assert_refused(&[
        (
            Tune(json!({"image": "evil.example/miner:latest"})),
            Some("spec.image"),
            &["evil.example/miner", "ghcr.io/camelid-dev/"],
        ),
        // A look-alike of an allowed prefix.
        (
            Model(json!({"image": "ghcr.io/camelid-dev-evil/worker:1"})),
            Some("spec.image"),
            &[],
        ),
        // The evaluation pod's image too.
        (
            Tune(
                json!({"evaluation": {"questions": {"configMap": {"name": "q", "key": "q"}},
                "judge": {"url": "https://judge.example/v1", "model": "j"}, "image": "docker.io/library/alpine"}}),
            ),
            Some("spec.evaluation.image"),
            &[],
        ),
    ]);
    // The operator's own images and those under an allowed prefix are fine.
    assert_allowed(
        &Policy::default(),
        &[
            Tune(json!({"image": Settings::default().trainer_image})),
            Tune(json!({"image": "ghcr.io/camelid-dev/camelid-trainer:0.2.0"})),
        ],
    );
    assert!(under("ghcr.io/camelid-dev:1", "ghcr.io/camelid-dev"));
    assert!(!under("ghcr.io/camelid-devx/a", "ghcr.io/camelid-dev"));
    assert!(!under("anything", ""));
}

#[test]
fn a_spec_cannot_choose_a_priority_class_the_policy_does_not_allow() {
    assert_refused(&[(
        Tune(json!({"priorityClassName": "system-node-critical"})),
        Some("spec.priorityClassName"),
        &["system-node-critical", "allowed: none"],
    )]);
    let batch = Policy {
        priority_classes: vec!["batch-low".into()],
        ..Policy::default()
    };
    assert_allowed(&batch, &[Tune(json!({"priorityClassName": "batch-low"}))]);
}

#[test]
fn a_spec_cannot_tolerate_taints_the_policy_does_not_allow() {
    assert_refused(&[
        // Onto the control plane.
        (
            Tune(json!({"spot": {"tolerations": [
                {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
                {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}})),
            Some("spec.spot.tolerations[1].key"),
            &["node-role.kubernetes.io/control-plane"],
        ),
        // A toleration without a key tolerates every taint.
        (
            Model(json!({"spot": {"tolerations": [{"operator": "Exists"}]}})),
            Some("spec.spot.tolerations[0].key"),
            &["every taint"],
        ),
    ]);
    let any = Policy {
        toleration_keys: vec!["*".into()],
        ..Policy::default()
    };
    assert_allowed(
        &any,
        &[Model(json!({"spot": {"tolerations": [{"operator": "Exists"}]}}))],
    );
}

#[test]
fn a_model_uri_must_be_https_without_credentials_and_within_the_size_limit() {
    let model = |m: Value| Model(json!({ "model": m }));
    assert_refused(&[
        (
            model(json!({"path": null, "uri": "http://mirror.local/m.gguf"})),
            Some("spec.model.uri"),
            &["plain http", "--allow-http-model-uris"],
        ),
        (
            Tune(json!({"baseModel": {"path": null, "uri": "ftp://x/m.gguf"}})),
            Some("spec.baseModel.uri"),
            &[],
        ),
        (
            model(json!({"path": null, "uri": "https://user:pw@host/m.gguf"})),
            None,
            &["credentials"],
        ),
        (
            model(json!({"path": null, "uri": "https://host/m.gguf\n-o /etc/x"})),
            None,
            &["control characters"],
        ),
        (
            model(json!({"path": null, "uri": "https:///m.gguf"})),
            None,
            &["no host"],
        ),
        (
            model(json!({"path": null, "uri": "https://h/m.gguf", "maxBytes": i64::MAX})),
            Some("spec.model.maxBytes"),
            &[],
        ),
        (
            model(json!({"path": null, "uri": "https://h/m.gguf", "sha256": "ABC; rm -rf /"})),
            Some("spec.model.sha256"),
            &[],
        ),
    ]);
    // http only with the operator's opt-in; https with a checksum and a limit is fine.
    let open = Policy {
        allow_http_uris: true,
        ..Policy::default()
    };
    assert_allowed(
        &open,
        &[model(json!({"path": null, "uri": "http://mirror.local/m.gguf"}))],
    );
    let strict = Policy::default();
    assert_allowed(
        &strict,
        &[model(
            json!({"path": null, "uri": "https://h/m.gguf", "maxBytes": 1000,
            "sha256": "a".repeat(64)}),
        )],
    );
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
