//! `examples/chatmodel.yaml` → the exact children it gets at 3 desired workers (1 on-demand base + 2 spot), as a
//! YAML snapshot in `tests/golden/`; and the other shapes a ChatModel takes (one Deployment, a model by URI).
//! `UPDATE_GOLDEN=1 cargo test -p camelid-operator --test golden_chatmodel` rewrites the snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod golden_common;

use camelid_contracts::worker_auth::{self, InstallSecret};
use camelid_crds::ChatModel;
use camelid_operator::chatmodel::build::{Children, ModelFiles, Surge, children, split};
use camelid_operator::settings::Settings;
use serde_json::json;

fn example() -> ChatModel {
    golden_common::example("chatmodel.yaml", "7d1f2e3a-4b5c-4d6e-8f90-a1b2c3d4e5f6")
}

fn files() -> ModelFiles {
    ModelFiles {
        claim: Some("models".into()),
        path: Some("vicuna-smol".into()),
        uri: None,
        shown: "finetunejob/vicuna-smol".into(),
        revision: "0123456789abcdef".into(),
        ..ModelFiles::default()
    }
}

fn yaml(c: &Children) -> String {
    let mut docs = vec![
        serde_yaml_ng::to_string(&c.service).unwrap(),
        serde_yaml_ng::to_string(&c.workers).unwrap(),
    ];
    if let Some(spot) = &c.spot_workers {
        docs.push(serde_yaml_ng::to_string(spot).unwrap());
    }
    docs.push(serde_yaml_ng::to_string(&c.budget).unwrap());
    docs.push(serde_yaml_ng::to_string(&c.account).unwrap());
    if let Some(token) = &c.token {
        docs.push(serde_yaml_ng::to_string(token).unwrap());
    }
    docs.join("---\n")
}

/// The operator as the chart runs it: with the install's secret for workers' tokens.
fn installed() -> Settings {
    Settings {
        worker_secret: Some(
            InstallSecret::new("an-install-secret-of-48-bytes-for-the-golden-tests").unwrap(),
        ),
        ..Settings::default()
    }
}

fn value<T: serde::Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).unwrap()
}

#[test]
fn the_example_builds_exactly_these_children() {
    let model = example();
    let c = children(&model, &files(), 3, Surge::default(), &installed()).unwrap();
    golden_common::golden("chatmodel-3-replicas.yaml", &yaml(&c));
}

#[test]
fn workers_get_their_own_models_token_and_without_a_secret_say_they_are_open() {
    let model = example();
    let c = children(&model, &files(), 1, Surge::default(), &installed()).unwrap();
    let token = value(c.token.as_ref().unwrap());
    let key = format!(
        "{}/{}",
        model.metadata.namespace.clone().unwrap(),
        model.metadata.name.clone().unwrap()
    );
    let secret = InstallSecret::new("an-install-secret-of-48-bytes-for-the-golden-tests").unwrap();
    assert_eq!(
        token["stringData"][worker_auth::TOKEN_KEY],
        secret.token_for(&key)
    );
    assert_eq!(token["metadata"]["ownerReferences"][0]["kind"], "ChatModel");
    let container = &value(&c.workers)["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["env"][0]["name"], worker_auth::TOKEN_ENV);
    assert_eq!(
        container["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        token["metadata"]["name"]
    );
    assert!(
        !container["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--allow-unauthenticated"))
    );
    // Their own account, with no token: never the namespace's `default` and whatever it was granted.
    let pod = &value(&c.workers)["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], value(&c.account)["metadata"]["name"]);
    assert_eq!(pod["serviceAccountName"], "vicuna-smol-worker");
    assert_eq!(value(&c.account)["automountServiceAccountToken"], false);
    assert_eq!(pod["automountServiceAccountToken"], false);

    // The same name in another namespace: another token.
    let mut other = example();
    other.metadata.namespace = Some("team-b".into());
    let theirs = value(
        children(&other, &files(), 1, Surge::default(), &installed())
            .unwrap()
            .token
            .as_ref()
            .unwrap(),
    );
    assert_ne!(theirs["stringData"], token["stringData"]);

    let open = children(&model, &files(), 1, Surge::default(), &Settings::default()).unwrap();
    assert!(open.token.is_none());
    let container = &value(&open.workers)["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_array().cloned().unwrap_or_default();
    assert!(
        !env.iter().any(|e| e["name"] == worker_auth::TOKEN_ENV),
        "{env:?}"
    );
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--allow-unauthenticated"))
    );
}

#[test]
fn the_on_demand_base_fills_first_and_spot_takes_the_rest() {
    let model = example();
    assert_eq!(split(&model, 0), (0, 0));
    assert_eq!(split(&model, 1), (1, 0));
    assert_eq!(split(&model, 4), (1, 3));
    let c = children(&model, &files(), 4, Surge::default(), &Settings::default()).unwrap();
    let base = value(&c.workers);
    let spot = value(c.spot_workers.as_ref().unwrap());
    assert_eq!(
        (base["spec"]["replicas"].clone(), spot["spec"]["replicas"].clone()),
        (json!(1), json!(3))
    );
    // Spot workers go to GKE's spot pool; the base keeps off it.
    let spot_pod = &spot["spec"]["template"]["spec"];
    assert_eq!(spot_pod["nodeSelector"]["cloud.google.com/gke-spot"], "true");
    assert!(
        base["spec"]["template"]["spec"]["nodeSelector"]
            .get("cloud.google.com/gke-spot")
            .is_none()
    );
    // Each Deployment selects only its own pool.
    assert_eq!(
        base["spec"]["selector"]["matchLabels"]["camelid.dev/pool"],
        "base"
    );
    assert_eq!(
        spot["spec"]["selector"]["matchLabels"]["camelid.dev/pool"],
        "spot"
    );
}

#[test]
fn a_surge_adds_replicas_to_its_pool_says_so_and_leaves_the_budget_alone() {
    let model = example();
    let steady = children(&model, &files(), 4, Surge::default(), &Settings::default()).unwrap();
    let surge = Surge { base: 0, spot: 2 };
    let c = children(&model, &files(), 4, surge, &Settings::default()).unwrap();
    let base = value(&c.workers);
    let spot = value(c.spot_workers.as_ref().unwrap());
    assert_eq!(
        (base["spec"]["replicas"].clone(), spot["spec"]["replicas"].clone()),
        (json!(1), json!(5))
    );
    assert_eq!(spot["metadata"]["annotations"]["camelid.dev/surge"], "2");
    assert!(
        base["metadata"]["annotations"].is_null(),
        "only a surging Deployment carries the annotation, so applying without it removes it"
    );
    assert_eq!(value(&c.budget), value(&steady.budget));
    // Nothing but the replicas and the annotation changes: the pods do not roll.
    assert_eq!(
        spot["spec"]["template"],
        value(steady.spot_workers.as_ref().unwrap())["spec"]["template"]
    );
}

#[test]
fn workers_are_ready_only_with_weights_loaded_and_updates_never_drop_below_the_desired_count() {
    let c = children(&example(), &files(), 2, Surge::default(), &Settings::default()).unwrap();
    let d = value(&c.workers);
    let worker = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(worker["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["camelid.dev/model-revision"],
        "0123456789abcdef"
    );
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(value(&c.budget)["spec"]["maxUnavailable"], 1);
    for owned in [value(&c.service), d.clone(), value(&c.budget)] {
        assert_eq!(owned["metadata"]["ownerReferences"][0]["kind"], "ChatModel");
        assert_eq!(owned["metadata"]["ownerReferences"][0]["controller"], true);
    }
}

#[test]
fn without_an_on_demand_base_there_is_one_deployment_and_a_uri_is_downloaded_first() {
    let mut model = example();
    model.spec.spot = Default::default();
    model.spec.gpus = 0;
    let files = ModelFiles {
        claim: None,
        path: None,
        uri: Some("https://example.com/smol.gguf".into()),
        shown: "https://example.com/smol.gguf".into(),
        revision: "r".into(),
        ..ModelFiles::default()
    };
    let c = children(&model, &files, 2, Surge::default(), &Settings::default()).unwrap();
    assert!(c.spot_workers.is_none());
    let pod = value(&c.workers)["spec"]["template"]["spec"].clone();
    assert_eq!(pod["initContainers"][0]["name"], "fetch-model");
    assert_eq!(pod["containers"][0]["args"][1], "/camelid/download/model.gguf");
    assert_eq!(pod["containers"][0]["args"][9], "cpu");
    assert!(pod.get("nodeSelector").is_none());
}

#[test]
fn prefer_spot_off_keeps_every_worker_on_demand_and_on_its_own_pools() {
    // The same spot policy as a FineTuneJob's: `preferSpot: false` and `onDemandNodeSelector` mean the same here.
    let mut model = example();
    model.spec.spot.prefer_spot = false;
    model
        .spec
        .spot
        .on_demand_node_selector
        .insert("pool".into(), "steady".into());
    assert_eq!(split(&model, 3), (3, 0));
    let c = children(&model, &files(), 3, Surge::default(), &Settings::default()).unwrap();
    let pod = value(&c.workers)["spec"]["template"]["spec"].clone();
    assert_eq!(pod["nodeSelector"]["pool"], "steady");
    assert_eq!(value(&c.workers)["spec"]["replicas"], 3);
    let spot = c.spot_workers.map(|d| value(&d)["spec"]["replicas"].clone());
    assert!(spot.as_ref().is_none_or(|r| *r == 0), "{spot:?}");
}

#[test]
fn children_need_an_owner() {
    let mut model = example();
    model.metadata.uid = None;
    assert!(children(&model, &files(), 1, Surge::default(), &Settings::default()).is_err());
}
