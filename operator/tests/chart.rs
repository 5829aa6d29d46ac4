//! `charts/camelid` rendered and linted by the real `helm` (v3.22, built from source by `tools/k8s-bins.sh`), for
//! the default values and variants: `helm lint --strict` is clean, every rendered object parses as its Kubernetes
//! type with nothing left over (a misspelt field fails), the operator and the gateway meet the restricted Pod
//! Security Standard (non-root, read-only filesystem, no capabilities, RuntimeDefault seccomp), NetworkPolicies
//! close what only camelid's own pods may reach, the operator's policy flags follow the values, and RBAC grants no
//! wildcards and no Secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use camelid_test_support::workspace;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The values of each variant the test renders.
fn cases() -> Vec<(&'static str, Value)> {
    vec![
        ("default", json!({})),
        (
            "ha",
            json!({"replicaCount": 2, "leaderElection": true, "imagePullSecrets": [{"name": "regcred"}],
                   "nodeSelector": {"pool": "system"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}]}),
        ),
        (
            "no-leader-election",
            json!({"leaderElection": false, "gpuPrices": {"nvidia-t4": {"spot": 0.11, "onDemand": 0.35}}}),
        ),
        (
            "no-gateway",
            json!({"gateway": {"enabled": false}, "evaluation": {"image": "registry.example/camelid:eval"}}),
        ),
        (
            "no-network-policies",
            json!({"networkPolicy": {"enabled": false}, "policy": {"allowedPriorityClasses": ["batch-low"],
                   "allowedTolerationKeys": ["*"], "allowHttpModelUris": true, "maxModelBytes": 1000000}}),
        ),
        (
            "open-gateway",
            json!({"gateway": {"allowAnonymous": true, "keysSecret": "", "watchNamespace": "team-a"}}),
        ),
    ]
}

/// Runs helm with its caches in `home`; its stdout, or a panic with its stderr.
fn helm(home: &Path, args: &[&str]) -> String {
    let helm = camelid_test_support::k8s::binary("helm").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of each case: the documents of the stream, each with the template it came from.
fn render(home: &Path) -> Vec<(&'static str, Vec<(String, Value)>)> {
    let chart = workspace().join("charts/camelid");
    let chart = chart.to_str().unwrap();
    cases()
        .into_iter()
        .map(|(case, values)| {
            let file = home.join(format!("{case}.json"));
            std::fs::write(&file, values.to_string()).unwrap();
            let args = [
                "template",
                "camelid",
                chart,
                "-n",
                "camelid-system",
                "-f",
                file.to_str().unwrap(),
            ];
            let stream = helm(home, &args);
            let docs = stream
                .split("\n---")
                .filter_map(|text| {
                    let source = text
                        .lines()
                        .find_map(|l| l.strip_prefix("# Source: "))?
                        .to_string();
                    let doc: Value = serde_yaml_ng::from_str(text).unwrap();
                    (!doc.is_null()).then_some((source, doc))
                })
                .collect();
            (case, docs)
        })
        .collect()
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
    let home = tempfile_dir();
    let chart = workspace().join("charts/camelid");
    // --strict fails on warnings as well as errors; NOTES.txt is rendered too.
    helm(&home, &["lint", "--strict", chart.to_str().unwrap()]);
    let notes = std::fs::read_to_string(chart.join("templates/NOTES.txt")).unwrap();
    assert!(notes.contains("kubectl get finetunejobs"));
    let mut all_secrets = Vec::new();
    for (case, docs) in render(&home) {
        let mut kinds = Vec::new();
        let mut policies = Vec::new();
        let mut secrets = Vec::new();
        for (path, doc) in &docs {
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "Deployment" => {
                    let d = typed::<Deployment>(doc);
                    check_worker_secret_env(case, &d);
                    check_deployment(case, &d);
                }
                "Secret" => secrets.push(check_worker_secret(case, &typed::<Secret>(doc))),
                "Service" => {
                    typed::<Service>(doc);
                }
                "ClusterRole" => check_rules(&typed::<ClusterRole>(doc).rules.unwrap_or_default()),
                "Role" => check_rules(&typed::<Role>(doc).rules.unwrap_or_default()),
                "ClusterRoleBinding" => {
                    typed::<ClusterRoleBinding>(doc);
                }
                "RoleBinding" => {
                    typed::<RoleBinding>(doc);
                }
                "ServiceAccount" => {
                    typed::<ServiceAccount>(doc);
                }
                "NetworkPolicy" => policies.push(typed::<NetworkPolicy>(doc)),
                "ConfigMap" => {
                    let cm = typed::<ConfigMap>(doc);
                    match cm.data.as_ref().and_then(|d| d.get("gateway.yaml")) {
                        Some(config) => check_gateway_config(case, config),
                        None => check_prices(case, &cm),
                    }
                }
                other => panic!("{case}: unexpected kind {other} in {path}"),
            }
            kinds.push(kind);
        }
        kinds.sort();
        let mut expected = vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Role",
            "RoleBinding",
            "Secret",
            "ServiceAccount",
        ];
        all_secrets.extend(secrets);
        if case != "no-network-policies" {
            // The operator's, and the workers', trainers' and evaluation pods' in each workload namespace.
            expected.extend(["NetworkPolicy"; 4]);
        }
        if case != "no-gateway" && case != "no-network-policies" {
            expected.push("NetworkPolicy");
        }
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
        if case != "no-network-policies" {
            check_network_policies(case, &policies);
        }
    }
    // Each install gets its own worker secret: no two renders share one.
    let distinct: std::collections::BTreeSet<_> = all_secrets.iter().collect();
    assert_eq!(
        distinct.len(),
        all_secrets.len(),
        "a worker secret repeats across installs"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

/// The install's worker secret: random, long enough for `camelid_contracts::worker_auth`. Returns it.
fn check_worker_secret(case: &str, s: &Secret) -> Vec<u8> {
    assert_eq!(
        s.metadata.name.as_deref(),
        Some("camelid-worker-secret"),
        "{case}"
    );
    let value = s.data.as_ref().unwrap()["secret"].0.clone();
    assert!(value.len() >= 48, "{case}: a {}-byte worker secret", value.len());
    value
}

/// The operator and the gateway both read the install's worker secret from it.
fn check_worker_secret_env(case: &str, d: &Deployment) {
    let container = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let env = container.env.as_ref().unwrap();
    let secret = env
        .iter()
        .find(|e| e.name == "CAMELID_WORKER_SECRET")
        .unwrap_or_else(|| panic!("{case}: {:?} has no CAMELID_WORKER_SECRET", d.metadata.name));
    let from = secret.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref());
    assert_eq!(
        from.map(|f| (f.name.as_str(), f.key.as_str())),
        Some(("camelid-worker-secret", "secret")),
        "{case}"
    );
}

fn check_deployment(case: &str, d: &Deployment) {
    let spec = d.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let component = d.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"].clone();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    // The restricted Pod Security Standard, as the operator's own pods are held to it; these two need their
    // ServiceAccount tokens (the operator and the gateway's discovery talk to the API server).
    let mut token_ok = pod.clone();
    token_ok.automount_service_account_token = Some(false);
    assert_eq!(
        camelid_operator::podsecurity::violations(&token_ok),
        Vec::<String>::new(),
        "{case}: {component}"
    );
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
    // The evaluation pods' image: the worker image (which has the `camelid` command) unless set.
    let eval_image = match case {
        "no-gateway" => "--eval-image=registry.example/camelid:eval",
        _ => "--eval-image=ghcr.io/camelid-dev/camelid-worker:0.1.0",
    };
    assert!(args.contains(&eval_image.to_string()), "{args:?}");
    let policy: &[&str] = match case {
        "no-network-policies" => &[
            "--allowed-priority-classes=batch-low",
            "--allowed-toleration-keys=*",
            "--allow-http-model-uris",
            "--max-model-bytes=1000000",
        ],
        _ => &[
            "--allowed-image-prefixes=ghcr.io/camelid-dev/",
            "--allowed-priority-classes=",
            "--allowed-toleration-keys=cloud.google.com/gke-spot,kubernetes.azure.com/scalesetpriority,nvidia.com/gpu",
        ],
    };
    for flag in policy {
        assert!(args.contains(&flag.to_string()), "{case}: {flag} not in {args:?}");
    }
    if case != "no-network-policies" {
        assert!(!args.iter().any(|a| a == "--allow-http-model-uris"), "{args:?}");
    }
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

/// The NetworkPolicies: the gateway's API open and its admin port closed but to the operator and monitoring; the
/// workers' gRPC only from the gateways; the trainers only from trainers (and their progress from the operator);
/// the evaluation pods from nothing; the operator only scraped.
fn check_network_policies(case: &str, policies: &[NetworkPolicy]) {
    let by_name = |name: &str| {
        policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{case}: no NetworkPolicy {name}"))
            .spec
            .clone()
            .unwrap()
    };
    let ports = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| -> Vec<String> {
        rule.ports
            .iter()
            .flatten()
            .filter_map(|p| match &p.port {
                Some(IntOrString::String(name)) => Some(name.clone()),
                _ => None,
            })
            .collect()
    };
    let workers = by_name("camelid-workers");
    assert_eq!(
        workers.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let rules = workers.ingress.unwrap();
    let grpc = rules.iter().find(|r| ports(r) == ["grpc"]).unwrap();
    let from = &grpc.from.as_ref().unwrap()[0];
    assert_eq!(
        from.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/component"],
        "gateway"
    );
    assert_eq!(
        from.namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "camelid-system",
        "only the release namespace's gateways"
    );
    assert!(
        rules.iter().all(|r| r.from.is_some()),
        "a worker rule open to all: {rules:?}"
    );
    let trainers = by_name("camelid-trainers").ingress.unwrap();
    assert!(
        trainers.iter().all(|r| r.from.is_some()),
        "a trainer rule open to all"
    );
    assert_eq!(by_name("camelid-evaluation").ingress, Some(Vec::new()));
    let operator = by_name("camelid-operator").ingress.unwrap();
    assert!(
        operator
            .iter()
            .all(|r| ports(r) == ["metrics"] && r.from.is_some())
    );
    if case != "no-gateway" {
        let gateway = by_name("camelid-gateway").ingress.unwrap();
        let admin = gateway.iter().find(|r| ports(r) == ["admin"]).unwrap();
        assert!(admin.from.is_some(), "the admin port is open to all");
        let api = gateway.iter().find(|r| ports(r) == ["http"]).unwrap();
        assert!(api.from.is_none(), "the API is open to clients");
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
        // Secrets only to write each ChatModel's workers' token: never listed or watched, so the operator cannot
        // read the tenants' Secrets en masse.
        if r.resources.iter().flatten().any(|x| x == "secrets") {
            let verbs: Vec<&str> = r.verbs.iter().map(String::as_str).collect();
            assert_eq!(verbs, ["get", "create", "patch", "delete"], "{r:?}");
            assert_eq!(
                r.resources.as_deref(),
                Some(&["secrets".to_string()][..]),
                "{r:?}"
            );
        }
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

/// A fresh directory for helm's caches and the values files.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-chart-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
