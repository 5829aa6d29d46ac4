//! `charts/camelid` rendered and linted by a real Helm v4 engine (PyPI `helm-python-sdk`, through
//! `tests/python/chart_render.py`), for the default values and variants: lint has no errors or warnings, every
//! rendered object parses as its Kubernetes type with nothing left over (a misspelt field fails), the operator
//! runs non-root on a read-only filesystem without capabilities, and RBAC grants no wildcards and no Secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> PathBuf {
    let p = std::env::var_os("CAMELID_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `make test` (it creates the project .venv)",
        p.display()
    );
    p
}

fn render() -> Value {
    let out = Command::new(python())
        .arg(workspace().join("tests/python/chart_render.py"))
        .output()
        .expect("run tests/python/chart_render.py");
    assert!(
        out.status.success(),
        "chart_render.py failed (is helm-python-sdk installed? `make test` installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Parses `doc` as `T` and back: anything `T` does not know (a misspelt field) makes the two differ.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let back = serde_json::to_value(&object).unwrap();
    assert_eq!(&back, doc, "fields were lost parsing {}", doc["kind"]);
    object
}

#[test]
fn the_chart_renders_lints_and_parses_as_kubernetes_objects() {
    let out = render();
    let lint = &out["lint"];
    assert!(lint["errors"].as_array().unwrap().is_empty(), "{lint}");
    // Severity 1 is INFO (e.g. "icon is recommended"); warnings and errors are not allowed.
    for m in lint["messages"].as_array().unwrap() {
        assert!(m["severity"].as_i64().unwrap() <= 1, "lint: {m}");
    }
    for (case, templates) in out["renders"].as_object().unwrap() {
        let mut kinds = Vec::new();
        for (path, text) in templates.as_object().unwrap() {
            if path.ends_with("NOTES.txt") {
                assert!(text.as_str().unwrap().contains("kubectl get finetunejobs"));
                continue;
            }
            for doc in serde_yaml_ng::Deserializer::from_str(text.as_str().unwrap()) {
                let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
                if doc.is_null() {
                    continue;
                }
                let kind = doc["kind"].as_str().unwrap().to_string();
                match kind.as_str() {
                    "Deployment" => check_deployment(case, &typed::<Deployment>(&doc)),
                    "Service" => {
                        typed::<Service>(&doc);
                    }
                    "ClusterRole" => check_rules(&typed::<ClusterRole>(&doc).rules.unwrap_or_default()),
                    "Role" => check_rules(&typed::<Role>(&doc).rules.unwrap_or_default()),
                    "ClusterRoleBinding" => {
                        typed::<ClusterRoleBinding>(&doc);
                    }
                    "RoleBinding" => {
                        typed::<RoleBinding>(&doc);
                    }
                    "ServiceAccount" => {
                        typed::<ServiceAccount>(&doc);
                    }
                    "ConfigMap" => {
                        let cm = typed::<ConfigMap>(&doc);
                        match cm.data.as_ref().and_then(|d| d.get("gateway.yaml")) {
                            Some(config) => check_gateway_config(case, config),
                            None => check_prices(case, &cm),
                        }
                    }
                    other => panic!("{case}: unexpected kind {other} in {path}"),
                }
                kinds.push(kind);
            }
        }
        kinds.sort();
        let mut expected = vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceAccount",
        ];
        if case != "no-gateway" {
            // The gateway's own account, read-only ClusterRole, config, Service and Deployment.
            expected.extend([
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "Deployment",
                "Service",
                "ServiceAccount",
            ]);
        }
        expected.sort_unstable();
        assert_eq!(kinds, expected, "{case}");
    }
}

fn check_deployment(case: &str, d: &Deployment) {
    let spec = d.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let component = d.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"].clone();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    let args = c.args.as_ref().unwrap();
    if component == "gateway" {
        return check_gateway(case, spec, args);
    }
    assert_eq!(args[0], "run");
    assert!(
        args.contains(&"--gateway-service=camelid-gateway".to_string()),
        "{args:?}"
    );
    let leader = args.iter().any(|a| a == "--leader-election");
    match case {
        "ha" => {
            assert_eq!(spec.replicas, Some(2));
            assert!(leader);
            assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "system");
            assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        }
        "no-leader-election" => assert!(!leader),
        _ => assert!(leader && c.image.as_deref() == Some("ghcr.io/camelid-dev/camelid-operator:0.1.0")),
    }
}

fn check_gateway(case: &str, spec: &k8s_openapi::api::apps::v1::DeploymentSpec, args: &[String]) {
    assert!(args.contains(&"--discover-chatmodels".to_string()), "{args:?}");
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    // Ready while it runs: a model at zero replicas needs the gateway to hold its requests.
    let ready = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(ready.path.as_deref(), Some("/healthz"));
    let anonymous = args.iter().any(|a| a == "--allow-anonymous");
    let keys = pod.volumes.iter().flatten().any(|v| v.name == "keys");
    match case {
        "open-gateway" => {
            assert!(anonymous && !keys);
            assert!(args.contains(&"--watch-namespace=team-a".to_string()));
        }
        _ => assert!(!anonymous && keys, "keys are required by default"),
    }
}

/// The rendered gateway config is one the real gateway accepts (moderation included).
fn check_gateway_config(case: &str, text: &str) {
    let dir = std::env::temp_dir().join(format!("camelid-chart-{}-{case}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    // The keys file is a Secret mounted in the pod; here an empty one stands in at the same relative place.
    let text = text.replace("/etc/camelid/keys/keys.yaml", "keys.yaml");
    std::fs::write(dir.join("keys.yaml"), "keys: []\n").unwrap();
    std::fs::write(&path, &text).unwrap();
    let config =
        camelid_gateway::GatewayConfig::from_file(&path).unwrap_or_else(|e| panic!("{case}: {e}\n{text}"));
    assert_eq!(config.hold.timeout, std::time::Duration::from_secs(180));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { camelid_gateway::state(&config).unwrap_or_else(|e| panic!("{case}: {e}")) });
    std::fs::remove_dir_all(&dir).unwrap();
}

fn check_rules(rules: &[k8s_openapi::api::rbac::v1::PolicyRule]) {
    for r in rules {
        let all = r
            .verbs
            .iter()
            .chain(r.resources.iter().flatten())
            .chain(r.api_groups.iter().flatten());
        for item in all {
            assert_ne!(item, "*", "wildcard in {r:?}");
        }
        assert!(
            !r.resources.iter().flatten().any(|x| x == "secrets"),
            "the operator needs no Secrets: {r:?}"
        );
    }
}

fn check_prices(case: &str, cm: &ConfigMap) {
    let data = cm.data.as_ref().unwrap();
    assert_eq!(data["nvidia-l4.spot"], "0.22");
    assert_eq!(data["nvidia-l4.on-demand"], "0.71");
    if case == "no-leader-election" {
        assert_eq!(data["nvidia-t4.spot"], "0.11");
    }
}
