//! The promotion gate on a real control plane: FineTuneJobs with `spec.evaluation` go from training through their
//! evaluation Job (made into a pod by Kubernetes' own Job controller, retried by it) to a verdict. kwok plays the
//! containers: a test ends the gate by annotating its pod with an exit code and the termination message the gate
//! would write (`kwok.camelid.dev/message`, see `tests/support/stages.yaml`). The operator runs as a local process.
//!
//! Three jobs share one control plane: one whose fine-tune wins (its ChatModel appears, `Evaluated=True`, the
//! `EVAL` column shows the win rate), one that loses (`Rejected` with the numbers, no ChatModel, until the
//! annotation `camelid.dev/promote=true` publishes it), and one whose judge is unreachable on every try (the Job
//! fails after its retries and the FineTuneJob with it, with the gate's error, never `Succeeded`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod k8s_common;

use camelid_contracts::evaluation::Summary;
use camelid_test_support::k8s::{ControlPlane, FakeNode, wait_until};
use k8s_common::{admin_operator, cluster, events, names, table};
use serde_json::{Value, json};

const NS: &str = "default";
const JUDGE_ERROR: &str = "judge http://judge/v1 unreachable: error sending request: connection refused";

/// A small CPU fine-tune of one worker with a promotion gate: questions from a ConfigMap, the judge's key from a
/// Secret, its base model as the baseline.
fn job(name: &str) -> Value {
    json!({
        "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"claimName": "models", "path": "smollm2-135m-instruct"},
            "dataset": {"claimName": "datasets", "path": "sharegpt/conversations.json"},
            "hyperparameters": {"maxSteps": 10, "globalBatch": 2, "microBatch": 2},
            "workers": 1, "gpusPerWorker": 0,
            "spot": {"preferSpot": false},
            "checkpoints": {"claimName": "training"},
            "output": {"claimName": "models", "path": name, "chatModel": name},
            "evaluation": {
                "questions": {"configMap": {"name": "mt-bench", "key": "question.jsonl"}},
                "judge": {"url": "http://judge/v1", "model": "gpt-4",
                          "apiKeySecret": {"name": "judge-key", "key": "api-key"}},
                "minWinRate": 0.5, "maxQuestions": 40,
            },
        },
    })
}

/// The gate's summary after `wins`, `ties` and `losses` (and `errors` unparseable verdicts).
fn summary(candidate: &str, wins: u32, ties: u32, losses: u32, errors: u32, interval: (f64, f64)) -> String {
    let decided = f64::from(wins + ties + losses);
    let s = Summary {
        candidate: candidate.into(),
        baseline: "smollm2-135m-instruct".into(),
        judge: "gpt-4".into(),
        wins,
        ties,
        losses,
        errors,
        win_rate: Some((f64::from(wins) + f64::from(ties) / 2.0) / decided),
        win_rate_low: Some(interval.0),
        win_rate_high: Some(interval.1),
        report: Some("report.md".into()),
        ..Summary::default()
    };
    serde_json::to_string(&s).unwrap()
}

struct Cluster {
    cp: ControlPlane,
}

impl Cluster {
    fn status(&self, job: &str) -> Value {
        self.cp.get_json(&["finetunejob", job, "-n", NS])["status"].clone()
    }

    fn condition(&self, job: &str, type_: &str) -> Value {
        self.status(job)["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null)
    }

    fn pods(&self, selector: &str) -> Vec<Value> {
        self.cp.get_json(&["pods", "-n", NS, "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Ends `pod`'s containers with `code`, the gate's termination message `message` with it.
    fn exit(&self, pod: &str, code: i32, message: Option<&str>) {
        let code = format!("kwok.camelid.dev/exit-code={code}");
        let message = message.map(|m| format!("kwok.camelid.dev/message={m}"));
        let mut args = vec!["annotate", "pod", pod, "-n", NS];
        args.extend(message.as_deref());
        args.push(&code);
        self.cp.kubectl(&args).unwrap();
    }

    /// Waits for `job`'s trainer to run and ends it with success.
    fn train(&self, job: &str) {
        let selector = format!("camelid.dev/finetunejob={job},app.kubernetes.io/component=trainer");
        wait_until(&format!("{job}'s trainer runs"), 90, || {
            self.pods(&selector)
                .iter()
                .any(|p| p["status"]["phase"] == "Running")
        });
        let pod = self.pods(&selector)[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        self.exit(&pod, 0, None);
    }

    /// Waits for `job` to be Evaluating with a gate pod running that has not ended yet; returns that pod.
    fn gate_pod(&self, job: &str) -> Value {
        let selector = format!("camelid.dev/finetunejob={job},app.kubernetes.io/component=evaluation");
        let mut found = None;
        wait_until(&format!("{job}'s next gate pod runs"), 120, || {
            found = self
                .pods(&selector)
                .into_iter()
                .find(|p| p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null());
            found.is_some()
        });
        assert_eq!(self.status(job)["phase"], "Evaluating", "{}", self.status(job));
        found.unwrap()
    }

    fn pod_name(pod: &Value) -> String {
        pod["metadata"]["name"].as_str().unwrap().to_string()
    }

    fn chat_models(&self) -> Vec<String> {
        names(&self.cp, &["chatmodels", "-n", NS])
    }

    fn events(&self, job: &str) -> String {
        events(&self.cp, NS, &format!("involvedObject.name={job}"))
    }

    /// The `kubectl get finetunejob` row of `job`, by column.
    fn row(&self, job: &str) -> std::collections::BTreeMap<String, String> {
        let text = self.cp.kubectl(&["get", "finetunejob", job, "-n", NS]).unwrap();
        table(&text)[0].iter().cloned().collect()
    }
}

/// The gate container's arguments: the contract's flags, one name per setting.
/// Returns the key of the gate's folder.
fn check_gate_args(pod: &Value) -> String {
    let spec = &pod["spec"];
    let gate = &spec["containers"][0];
    assert_eq!(gate["name"], "gate");
    assert_eq!(gate["image"], "camelid-eval:test", "the operator's --eval-image");
    let args: Vec<&str> = gate["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for (flag, value) in [
        ("--judge-url", "http://judge/v1"),
        ("--judge-model", "gpt-4"),
        ("--concurrency", "8"),
        ("--max-tokens", "512"),
        ("--max-questions", "40"),
        ("--candidate-url", "http://127.0.0.1:8001/v1"),
        ("--baseline-model", "smollm2-135m-instruct"),
    ] {
        let i = args.iter().position(|a| *a == flag);
        assert_eq!(
            i.and_then(|i| args.get(i + 1)).copied(),
            Some(value),
            "{flag} in {args:?}"
        );
    }
    // The gate's folder is keyed by the job's uid and evaluation spec, so a recreated job starts afresh.
    let out = args
        .iter()
        .position(|a| *a == "--out")
        .and_then(|i| args.get(i + 1))
        .unwrap();
    let key = out
        .strip_prefix("/camelid/volumes/models/tune-wins/evaluation/")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(key.len(), 12, "{out}");
    assert_eq!(&args[..2], ["eval", "gate"]);
    assert_eq!(gate["env"][0]["valueFrom"]["secretKeyRef"]["name"], "judge-key");
    let sidecars: Vec<&str> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(sidecars, ["candidate", "baseline"]);
    key.to_string()
}

#[test]
fn the_promotion_gate_publishes_winners_rejects_losers_and_fails_on_a_broken_judge() {
    let cp = cluster(
        NS,
        &["models", "datasets", "training"],
        &[FakeNode::new("node-1")],
    );
    cp.kubectl(&[
        "create",
        "configmap",
        "mt-bench",
        "-n",
        NS,
        "--from-literal=question.jsonl={\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"Hi\"]}",
    ])
    .unwrap();
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "judge-key",
        "-n",
        NS,
        "--from-literal=api-key=sk-test",
    ])
    .unwrap();
    let c = Cluster { cp };
    let _operator = admin_operator(
        &c.cp,
        &[
            "--progress-poll-seconds",
            "1",
            "--eval-image",
            "camelid-eval:test",
        ],
    );
    let jobs = ["tune-wins", "tune-loses", "tune-broken"];
    for name in jobs {
        c.cp.apply(&job(name).to_string()).unwrap();
    }
    for name in jobs {
        c.train(name);
    }

    // The broken judge first: Kubernetes waits 10 s, then 20 s, before it retries a failed gate.
    let broken = c.gate_pod("tune-broken");
    c.exit(&Cluster::pod_name(&broken), 1, Some(JUDGE_ERROR));

    // A winner: 25 wins, 5 ties, 10 losses is a win rate of 0.6875.
    let pod = c.gate_pod("tune-wins");
    assert_eq!(
        c.status("tune-wins")["output"],
        "pvc://models/tune-wins",
        "the export is recorded before the verdict"
    );
    assert!(
        c.chat_models().is_empty(),
        "no ChatModel while the gate runs: {:?}",
        c.chat_models()
    );
    let key = check_gate_args(&pod);
    let wins = summary("tune-wins", 25, 5, 10, 0, (0.55, 0.8));
    c.exit(&Cluster::pod_name(&pod), 0, Some(&wins));
    wait_until("the winner succeeds", 60, || {
        c.status("tune-wins")["phase"] == "Succeeded"
    });
    wait_until("the winner's ChatModel appears", 30, || {
        c.chat_models().contains(&"tune-wins".to_string())
    });
    let evaluated = c.condition("tune-wins", "Evaluated");
    assert_eq!(
        (evaluated["status"].as_str(), evaluated["reason"].as_str()),
        (Some("True"), Some("Passed")),
        "{evaluated}"
    );
    let st = c.status("tune-wins");
    assert_eq!(st["evaluation"]["winRate"], 0.6875, "{st}");
    assert_eq!(
        (
            st["evaluation"]["wins"].clone(),
            st["evaluation"]["report"].clone()
        ),
        (
            json!(25),
            json!(format!("pvc://models/tune-wins/evaluation/{key}/report.md"))
        )
    );
    let row = c.row("tune-wins");
    assert_eq!(
        (row["PHASE"].as_str(), row["EVAL"].as_str()),
        ("Succeeded", "0.6875"),
        "{row:?}"
    );
    let events = c.events("tune-wins");
    for reason in ["EvaluationStarted", "Evaluated"] {
        assert!(events.contains(reason), "no {reason} Event in:\n{events}");
    }

    // A loser: 10 wins, 5 ties, 25 losses (3 unparseable) is 0.3125 < 0.5.
    let pod = c.gate_pod("tune-loses");
    let loses = summary("tune-loses", 10, 5, 25, 3, (0.2, 0.43));
    c.exit(&Cluster::pod_name(&pod), 0, Some(&loses));
    wait_until("the loser is rejected", 60, || {
        c.status("tune-loses")["phase"] == "Rejected"
    });
    let st = c.status("tune-loses");
    let message = st["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "win rate 0.31 [0.20, 0.43] < minWinRate 0.5 (wins 10, ties 5, losses 25, 3 unparseable)"
        ) && message.contains("camelid.dev/promote=true"),
        "{message}"
    );
    let evaluated = c.condition("tune-loses", "Evaluated");
    assert_eq!(
        (evaluated["status"].as_str(), evaluated["reason"].as_str()),
        (Some("False"), Some("Rejected"))
    );
    assert_eq!(c.condition("tune-loses", "Ready")["status"], "False");
    assert_eq!(c.row("tune-loses")["EVAL"], "0.3125");
    assert!(
        c.events("tune-loses").contains("Rejected"),
        "{}",
        c.events("tune-loses")
    );
    // Rejected is final: a few reconciles later there is still no ChatModel.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !c.chat_models().contains(&"tune-loses".to_string()),
        "a rejected model is not served"
    );
    // A person promotes it by hand.
    c.cp.kubectl(&[
        "annotate",
        "finetunejob",
        "tune-loses",
        "-n",
        NS,
        "camelid.dev/promote=true",
    ])
    .unwrap();
    wait_until("the promoted model's ChatModel appears", 30, || {
        c.chat_models().contains(&"tune-loses".to_string())
    });
    wait_until("the promoted job succeeds", 30, || {
        c.status("tune-loses")["phase"] == "Succeeded"
    });
    let message = c.status("tune-loses")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.starts_with("promoted by hand despite the evaluation: win rate 0.31"),
        "{message}"
    );

    // The broken judge: every try fails the same way; after backoffLimit (2) retries the Job fails, and the
    // FineTuneJob with it.
    for retry in 1..=2 {
        let pod = c.gate_pod("tune-broken");
        let message = c.status("tune-broken")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(&format!("the gate failed {retry} time(s)")) && message.contains(JUDGE_ERROR),
            "retry {retry}: {message}"
        );
        c.exit(&Cluster::pod_name(&pod), 1, Some(JUDGE_ERROR));
    }
    wait_until("the broken evaluation fails the job", 90, || {
        let phase = c.status("tune-broken")["phase"].clone();
        assert_ne!(phase, "Succeeded", "a failed evaluation never succeeds");
        phase == "Failed"
    });
    let st = c.status("tune-broken");
    assert_eq!(st["message"], format!("evaluation failed: {JUDGE_ERROR}"), "{st}");
    let evaluated = c.condition("tune-broken", "Evaluated");
    assert_eq!(
        (evaluated["status"].as_str(), evaluated["reason"].as_str()),
        (Some("False"), Some("EvaluationFailed"))
    );
    let gates = c.pods("camelid.dev/finetunejob=tune-broken,app.kubernetes.io/component=evaluation");
    assert_eq!(gates.len(), 3, "one try and two retries");
    assert!(!c.chat_models().contains(&"tune-broken".to_string()));
    assert!(c.events("tune-broken").contains("EvaluationFailed"));
}
