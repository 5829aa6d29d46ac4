//! `examples/finetunejob.yaml` → the exact children of its first (spot) attempt and of an on-demand attempt, and
//! (with the evaluation its comment shows) its evaluation Job, as YAML snapshots in `tests/golden/`.
//! `UPDATE_GOLDEN=1 cargo test -p camelid-operator --test golden` rewrites them; review the diff like code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod crd_cases;
mod golden_common;

use camelid_crds::FineTuneJob;
use camelid_operator::chatmodel::build::ModelFiles;
use camelid_operator::error::BuildError;
use camelid_operator::finetunejob::build::{Attempt, Children, children, grad_accum};
use camelid_operator::finetunejob::evaljob::{self, Baseline};
use camelid_operator::placement::Capacity;
use camelid_operator::settings::Settings;
use golden_common::golden;

fn example() -> FineTuneJob {
    golden_common::example("finetunejob.yaml", "2c8e1b0a-5f0e-4b8e-9a51-0c1d2e3f4a5b")
}

/// The children of `job`'s attempt `number` on `capacity`.
fn attempt(
    job: &FineTuneJob,
    number: i32,
    capacity: Capacity,
    settings: &Settings,
) -> Result<Children, BuildError> {
    children(job, Attempt { number, capacity }, settings)
}

fn yaml(children: &Children) -> String {
    format!(
        "{}---\n{}---\n{}",
        serde_yaml_ng::to_string(&children.account).unwrap(),
        serde_yaml_ng::to_string(&children.service).unwrap(),
        serde_yaml_ng::to_string(&children.job).unwrap()
    )
}

#[test]
fn the_example_builds_exactly_these_children() {
    let job = example();
    assert_eq!(
        grad_accum(&job),
        4,
        "128 = 2 workers x 4 GPUs x micro-batch 4 x 4 steps"
    );
    let settings = Settings::default();
    for (number, capacity, snapshot) in [
        (1, Capacity::Spot, "finetunejob-attempt1-spot.yaml"),
        (4, Capacity::OnDemand, "finetunejob-attempt4-on-demand.yaml"),
    ] {
        let built = attempt(&job, number, capacity, &settings).unwrap();
        golden(snapshot, &yaml(&built));
        // Building is pure: the same inputs give the same objects.
        assert_eq!(built, attempt(&job, number, capacity, &settings).unwrap());
    }
}

#[test]
fn children_need_an_owner() {
    let mut job = example();
    job.metadata.uid = None;
    let e = attempt(&job, 1, Capacity::Spot, &Settings::default()).unwrap_err();
    assert_eq!(e, BuildError::NoOwner);
}

/// The example with the evaluation its comment shows.
fn example_with_evaluation() -> FineTuneJob {
    let mut job: FineTuneJob = serde_json::from_value(crd_cases::example_with_evaluation()).unwrap();
    job.metadata.uid = example().metadata.uid;
    job
}

fn args_of(container: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    container.args.clone().unwrap_or_default()
}

/// `--flag value` pairs of `args` after its subcommand words.
fn flag(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

#[test]
fn the_evaluation_job_serves_both_models_beside_the_gate() {
    let job = example_with_evaluation();
    let spec = job.spec.evaluation.clone().unwrap();
    let baseline = evaljob::base_model_baseline(&job);
    let settings = Settings::default();
    let built = evaljob::job(&job, &spec, &baseline, &settings).unwrap();
    golden(
        "finetunejob-evaluation.yaml",
        &serde_yaml_ng::to_string(&built).unwrap(),
    );
    assert_eq!(built, evaljob::job(&job, &spec, &baseline, &settings).unwrap());
    let job_spec = built.spec.as_ref().unwrap();
    assert_eq!(job_spec.backoff_limit, Some(2));
    let pod = job_spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    // The two servers are native sidecars, started (and ready on /readyz) before the gate.
    let sidecars = pod.init_containers.as_ref().unwrap();
    assert_eq!(
        sidecars.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["candidate", "baseline"]
    );
    for c in sidecars {
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        let probe = c.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        assert_eq!(args_of(c)[0], "serve");
    }
    assert_eq!(
        flag(&args_of(&sidecars[0]), "--model").as_deref(),
        Some("/camelid/volumes/models/vicuna-smol")
    );
    assert_eq!(
        flag(&args_of(&sidecars[1]), "--model").as_deref(),
        Some("/camelid/volumes/models/smollm2-135m-instruct")
    );
    // The candidate reads the output claim, the gate writes its folder there.
    let read_only =
        |c: &k8s_openapi::api::core::v1::Container| c.volume_mounts.as_ref().unwrap()[0].read_only;
    assert_eq!(read_only(&sidecars[0]), Some(true));
    let gate = &pod.containers[0];
    assert_eq!(read_only(gate), Some(false));
    assert_eq!(
        gate.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let args = args_of(gate);
    assert_eq!(args[..2], ["eval", "gate"]);
    for (name, value) in [
        ("--questions", "/camelid/volumes/datasets/mt_bench/question.jsonl"),
        ("--candidate-url", "http://127.0.0.1:8001/v1"),
        ("--candidate-model", "vicuna-smol"),
        ("--baseline-url", "http://127.0.0.1:8002/v1"),
        ("--baseline-model", "smollm2-135m-instruct"),
        ("--judge-url", "https://api.openai.com/v1"),
        ("--judge-model", "gpt-4"),
        ("--concurrency", "8"),
        ("--max-tokens", "512"),
        ("--max-questions", "80"),
        // Keyed by the job's uid and evaluation spec: a recreated job never resumes another's verdicts.
        (
            "--out",
            "/camelid/volumes/models/vicuna-smol/evaluation/e0af87d3aeed",
        ),
        ("--summary", "/dev/termination-log"),
    ] {
        assert_eq!(flag(&args, name).as_deref(), Some(value), "{name} in {args:?}");
    }
    let env = gate.env.as_ref().unwrap();
    assert_eq!(env[0].name, "CAMELID_JUDGE_API_KEY");
    let key = env[0]
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (key.name.as_str(), key.key.as_str()),
        ("judge-api-key", "api-key")
    );
}

#[test]
fn questions_from_a_configmap_and_a_baseline_by_uri_are_mounted_and_downloaded() {
    let mut job = example_with_evaluation();
    let spec = job.spec.evaluation.as_mut().unwrap();
    spec.questions =
        serde_json::from_value(serde_json::json!({"configMap": {"name": "mt-bench", "key": "q"}})).unwrap();
    spec.judge.api_key_secret = None;
    spec.judge.max_tokens = Some(256);
    spec.image = Some("camelid:eval".into());
    let spec = spec.clone();
    let baseline = Baseline {
        name: "tiny".into(),
        files: ModelFiles {
            claim: None,
            path: None,
            uri: Some("https://example.com/tiny.gguf".into()),
            shown: "https://example.com/tiny.gguf".into(),
            revision: String::new(),
            ..ModelFiles::default()
        },
        template: Some("vicuna_v1.1".into()),
    };
    let built = evaljob::job(&job, &spec, &baseline, &Settings::default()).unwrap();
    let pod = built.spec.unwrap().template.spec.unwrap();
    let init = pod.init_containers.unwrap();
    // The download runs to completion first; then the servers start.
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["fetch-model", "candidate", "baseline"]
    );
    assert_eq!(init[0].restart_policy, None);
    let base = args_of(&init[2]);
    assert_eq!(
        flag(&base, "--model").as_deref(),
        Some("/camelid/download/model.gguf")
    );
    assert_eq!(flag(&base, "--template").as_deref(), Some("vicuna_v1.1"));
    let gate = args_of(&pod.containers[0]);
    assert_eq!(
        flag(&gate, "--judge-max-tokens").as_deref(),
        Some("256"),
        "judge.maxTokens is the gate's --judge-max-tokens"
    );
    assert_eq!(init[2].image.as_deref(), Some("camelid:eval"));
    let gate = &pod.containers[0];
    assert!(
        gate.env.iter().flatten().all(|e| e.value_from.is_none()),
        "no key without a Secret: {:?}",
        gate.env
    );
    assert_eq!(
        flag(&args_of(gate), "--questions").as_deref(),
        Some("/camelid/questions/question.jsonl")
    );
    let volumes = pod.volumes.unwrap();
    let questions = volumes.iter().find(|v| v.name == "questions").unwrap();
    let cm = questions.config_map.as_ref().unwrap();
    assert_eq!(cm.name, "mt-bench");
    assert_eq!(cm.items.as_ref().unwrap()[0].key, "q");
    // One claim: the output, written by the gate.
    let claims: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .collect();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        (claims[0].claim_name.as_str(), claims[0].read_only),
        ("models", Some(false))
    );
}

#[test]
fn the_evaluation_pod_goes_to_on_demand_gpu_nodes_when_its_servers_ask_for_gpus() {
    let job = example_with_evaluation();
    let spec = job.spec.evaluation.clone().unwrap();
    let built = evaljob::job(
        &job,
        &spec,
        &evaljob::base_model_baseline(&job),
        &Settings::default(),
    )
    .unwrap();
    let pod = built.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.node_selector.unwrap()["cloud.google.com/gke-accelerator"],
        "nvidia-l4"
    );
    let affinity = serde_json::to_string(&pod.affinity).unwrap();
    assert!(
        affinity.contains("NotIn") && affinity.contains("cloud.google.com/gke-spot"),
        "{affinity}"
    );
}

/// Every pod template the operator builds (a FineTuneJob's trainers on spot and on-demand, downloading their base
/// model; a ChatModel's workers on both pools, downloading theirs; the evaluation Job with its download and both
/// server sidecars) meets the restricted Pod Security Standard, mounts no ServiceAccount token and writes only to
/// its volumes. A namespace enforcing `restricted` admits them all.
#[test]
fn every_pod_the_operator_builds_meets_the_restricted_pod_security_standard() {
    use camelid_operator::podsecurity::violations;
    let settings = Settings::default();
    let mut job = example_with_evaluation();
    job.spec.base_model = serde_json::from_value(serde_json::json!({
        "uri": "https://example.com/base.gguf", "sha256": "ab".repeat(32), "maxBytes": 1_000_000}))
    .unwrap();
    let mut pods = Vec::new();
    for capacity in [Capacity::Spot, Capacity::OnDemand] {
        let c = attempt(&job, 1, capacity, &settings).unwrap();
        pods.push(("trainer", c.job.spec.unwrap().template.spec.unwrap()));
    }
    let spec = job.spec.evaluation.clone().unwrap();
    let eval = evaljob::job(&job, &spec, &evaljob::base_model_baseline(&job), &settings).unwrap();
    pods.push(("evaluation", eval.spec.unwrap().template.spec.unwrap()));
    let model: camelid_crds::ChatModel = golden_common::example("chatmodel.yaml", "u");
    let files = ModelFiles {
        uri: Some("https://example.com/smol.gguf".into()),
        shown: "https://example.com/smol.gguf".into(),
        ..ModelFiles::default()
    };
    let c = camelid_operator::chatmodel::build::children(
        &model,
        &files,
        3,
        camelid_operator::chatmodel::build::Surge::default(),
        &settings,
    )
    .unwrap();
    pods.push(("workers", c.workers.spec.unwrap().template.spec.unwrap()));
    pods.push((
        "spot workers",
        c.spot_workers.unwrap().spec.unwrap().template.spec.unwrap(),
    ));
    for (what, pod) in &pods {
        assert_eq!(violations(pod), Vec::<String>::new(), "{what}");
        let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
        for c in containers {
            let mounts = c.volume_mounts.as_deref().unwrap_or_default();
            assert!(
                mounts.iter().any(|m| m.mount_path == "/tmp"),
                "{what}/{}: no scratch /tmp",
                c.name
            );
        }
    }
    assert_eq!(pods.len(), 5);
}

/// The attack: a model URI fetched over plain http, from a redirect to http, of any size, unverified. The fetch
/// container allows https only (redirects included), caps the size and checks the spec's sha256 before the file
/// gets its name; the URI and checksum reach the shell as environment variables, not script text.
#[test]
fn the_model_download_is_https_only_size_capped_and_checksummed() {
    let mut job = example();
    let sha = "ab".repeat(32);
    job.spec.base_model = serde_json::from_value(serde_json::json!({
        "uri": "https://example.com/m.gguf?x=$(reboot)", "sha256": sha, "maxBytes": 1_000_000}))
    .unwrap();
    let c = attempt(&job, 1, Capacity::Spot, &Settings::default()).unwrap();
    let pod = c.job.spec.unwrap().template.spec.unwrap();
    let fetch = &pod.init_containers.unwrap()[0];
    let env = |name: &str| {
        fetch
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    assert_eq!(env("MODEL_URI"), "https://example.com/m.gguf?x=$(reboot)");
    assert_eq!(env("MODEL_SHA256"), sha);
    assert_eq!(env("MODEL_MAX_BYTES"), "1000000");
    assert_eq!(env("MODEL_PROTOCOLS"), "=https");
    let script = fetch.command.as_ref().unwrap().join(" ");
    for needle in [
        "--proto \"$MODEL_PROTOCOLS\"",
        "--proto-redir \"$MODEL_PROTOCOLS\"",
        "--max-filesize",
        "sha256sum -c",
    ] {
        assert!(script.contains(needle), "{needle} not in {script}");
    }
    assert!(
        !script.contains("example.com"),
        "the URI is in the script text: {script}"
    );
    let download = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "download")
        .unwrap();
    assert!(download.empty_dir.unwrap().size_limit.is_some());
    // With the operator's opt-in, http too.
    let mut open = Settings::default();
    open.policy.allow_http_uris = true;
    let c = attempt(&job, 1, Capacity::Spot, &open).unwrap();
    let fetch = c
        .job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .remove(0);
    assert!(
        fetch
            .env
            .unwrap()
            .iter()
            .any(|e| e.value.as_deref() == Some("=http,https"))
    );
}

#[test]
fn packing_reaches_the_trainer_under_its_one_name() {
    let args = |job: &FineTuneJob| {
        let built = attempt(job, 1, Capacity::Spot, &Settings::default()).unwrap();
        built.job.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
    };
    let mut job = example();
    // Unset: the trainer's default (packed) applies, and no flag is passed.
    assert!(!args(&job).iter().any(|a| a == "--packing"));
    job.spec.hyperparameters.packing = Some(false);
    let given = args(&job);
    let at = given.iter().position(|a| a == "--packing").unwrap();
    assert_eq!(given[at + 1], "false", "{given:?}");
}
