//! `camelid eval` end to end against real servers: `camelid serve` (SmolLM2-135M-Instruct) is both contestants
//! and the judge. The answer and judge steps are SIGKILLed mid-run and resumed, and their files must equal an
//! uninterrupted run's (greedy decoding; `tstamp` aside). The report reads what the judge wrote and counts the
//! unparseable verdicts a 135M judge gives instead of guessing them; the gate writes the operator's summary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use camelid_contracts::evaluation::Summary;
use common::{serve, workspace};
use serde_json::Value;

const QUESTIONS: &str = r#"{"question_id": 1, "category": "generic", "turns": ["Name one fruit."]}
{"question_id": 2, "category": "math", "turns": ["What is 2 + 3?"], "reference": ["5"]}
{"question_id": 3, "category": "writing", "turns": ["Write a short greeting.", "Make it shorter."]}
{"question_id": 4, "category": "generic", "turns": ["Name one color."]}
"#;

fn camelid(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_camelid"));
    c.arg("eval").args(args).env("CAMELID_LOG", "warn");
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.stderr(Stdio::inherit()).output().expect("run camelid eval");
    assert!(out.status.success(), "camelid eval failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every record of a jsonl file with its `tstamp` removed.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tstamp");
            v
        })
        .collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Starts `command`, SIGKILLs it once `out` has at least one finished record and before it has `all`, then runs
/// it again to the end. Panics if the first run finished before it could be killed.
fn kill_midway_then_resume(mut command: impl FnMut() -> Command, out: &Path, all: usize) {
    let mut child: Child = command().stdout(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        let n = lines(out);
        assert!(n < all, "the run finished before it could be killed");
        if n >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no record written in 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        lines(out) < all,
        "killed with every record written: nothing left to resume"
    );
    run_ok(command());
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let q = dir.join("question.jsonl");
    std::fs::write(&q, QUESTIONS).unwrap();
    q
}

#[test]
fn answer_judge_report_and_gate_against_camelid_serve_resuming_after_sigkill() {
    let (_a, port_a, _) = serve(&["--served-model-name", "smol"]);
    let (_b, port_b, _) = serve(&["--served-model-name", "smol-b"]);
    let url_a = format!("http://127.0.0.1:{port_a}/v1");
    let url_b = format!("http://127.0.0.1:{port_b}/v1");
    let root = workspace().join("target/eval-e2e");
    let full = fresh(&root.join("full"));
    let killed = fresh(&root.join("killed"));

    // Two contestants on one server: the model as it is, and told to be brief.
    let answer = |q: &Path, id: &str, system: Option<&str>| {
        let q = q.to_path_buf();
        let url = url_a.clone();
        let id = id.to_string();
        let system = system.map(str::to_string);
        move || {
            let mut c = camelid(&["answer", "--base-url", &url, "--model", "smol", "--model-id", &id]);
            c.arg("--questions").arg(&q);
            c.args(["--temperature", "0", "--max-tokens", "24", "--concurrency", "2"]);
            if let Some(s) = &system {
                c.args(["--system-prompt", s]);
            }
            c
        }
    };
    for q in [&full, &killed] {
        run_ok(answer(q, "smol", None)());
    }
    run_ok(answer(&full, "smol-brief", Some("Answer in one short sentence."))());
    let brief = killed.parent().unwrap().join("model_answer/smol-brief.jsonl");
    kill_midway_then_resume(
        answer(&killed, "smol-brief", Some("Answer in one short sentence.")),
        &brief,
        4,
    );
    let full_brief = records(&full.parent().unwrap().join("model_answer/smol-brief.jsonl"));
    assert_eq!(full_brief.len(), 4);
    assert_eq!(
        records(&brief),
        full_brief,
        "a killed and resumed answer run wrote what an uninterrupted one did"
    );
    assert_eq!(
        full_brief[2]["choices"][0]["turns"].as_array().unwrap().len(),
        2,
        "both turns answered"
    );

    // The judge is the same model: pairwise against the baseline, both orders, killed midway and resumed.
    let judge = |q: &Path| {
        let q = q.to_path_buf();
        let url = url_a.clone();
        move || {
            let dir = q.parent().unwrap().join("model_answer");
            let mut c = camelid(&["judge", "--mode", "pairwise-baseline", "--baseline", "smol"]);
            c.arg("--questions")
                .arg(&q)
                .arg("--answers")
                .arg(dir.join("smol.jsonl"))
                .arg(dir.join("smol-brief.jsonl"));
            c.args([
                "--judge-url",
                &url,
                "--judge-model",
                "smol",
                "--max-tokens",
                "32",
                "--concurrency",
                "2",
            ]);
            c
        }
    };
    run_ok(judge(&full)());
    let pair = |q: &Path| q.parent().unwrap().join("model_judgment/smol_pair.jsonl");
    kill_midway_then_resume(judge(&killed), &pair(&killed), 5);
    let judged = records(&pair(&full));
    assert_eq!(judged.len(), 5, "four first turns and one second turn");
    assert_eq!(
        records(&pair(&killed)),
        judged,
        "a killed and resumed judge run wrote what an uninterrupted one did"
    );
    let math = judged.iter().find(|j| j["question_id"] == 2).unwrap();
    assert_eq!(
        math["judge"][1], "pair-math-v1",
        "math is judged against the reference"
    );
    assert!(
        math["g1_user_prompt"]
            .as_str()
            .unwrap()
            .contains("[The Start of Reference Answer]")
    );
    let errors = judged
        .iter()
        .filter(|j| j["g1_winner"] == "error" || j["g2_winner"] == "error")
        .count();

    // The report counts what it could not parse instead of guessing.
    let md = root.join("full/report.md");
    let html = root.join("full/report.html");
    let mut c = camelid(&["report", "--model", "smol-brief"]);
    c.arg("--questions")
        .arg(&full)
        .arg("--judgments")
        .arg(pair(&full));
    c.arg("--markdown").arg(&md).arg("--html").arg(&html);
    let table = run_ok(c);
    assert!(table.contains("smol-brief"), "{table}");
    assert!(
        std::fs::read_to_string(&html).unwrap().contains("<svg"),
        "the page has its charts"
    );
    assert!(std::fs::read_to_string(&md).unwrap().contains("smol"));

    // The gate, as the evaluation Job runs it: two servers, a summary the operator can read.
    let gate_dir = root.join("gate");
    let _ = std::fs::remove_dir_all(&gate_dir);
    let summary_path = root.join("gate-summary.json");
    let mut c = camelid(&["gate", "--candidate-url", &url_b, "--candidate-model", "smol-b"]);
    c.args([
        "--baseline-url",
        &url_a,
        "--baseline-model",
        "smol",
        "--judge-url",
        &url_a,
        "--judge-model",
        "smol",
    ]);
    c.args([
        "--max-tokens",
        "16",
        "--judge-max-tokens",
        "32",
        "--max-questions",
        "2",
        "--concurrency",
        "2",
    ]);
    c.arg("--questions")
        .arg(&full)
        .arg("--out")
        .arg(&gate_dir)
        .arg("--summary")
        .arg(&summary_path);
    run_ok(c);
    let summary: Summary = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(
        (summary.candidate.as_str(), summary.baseline.as_str()),
        ("smol-b", "smol")
    );
    assert_eq!(
        summary.decided() + summary.errors,
        2,
        "two one-turn questions, each one match"
    );
    assert_eq!(summary.win_rate.is_some(), summary.decided() > 0);
    assert!(gate_dir.join("report.html").exists());
    eprintln!("judge gave {errors} unparseable pairwise verdicts of 5; gate summary: {summary:?}");
}
