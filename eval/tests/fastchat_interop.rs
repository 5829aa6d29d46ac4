//! Our judgment files and numbers against FastChat's own code (`tests/python/fastchat_judgments.py` runs it):
//! files we write are read by FastChat's `show_result.py` to the same numbers as ours, and files FastChat's
//! `play_a_match_pair` / `play_a_match_single` write (with a scripted judge) are read by us to the same numbers as
//! FastChat's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use camelid_eval::format::{Choice, ModelAnswer, PairJudgment, Question, QuestionId, SingleJudgment, Winner};
use camelid_eval::jsonl;
use camelid_eval::report::stats::{Tally, totals};
use camelid_eval::report::{Bootstrap, Judgments, Report, read_categories, read_judgments};
use camelid_test_support::{python, workspace};
use serde_json::Value;

const CANDIDATE: &str = "vicuna-ft";
const BASELINE: &str = "llama-base";

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-fastchat-interop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Runs the FastChat helper and returns the JSON it prints.
fn fastchat(args: &[&str]) -> Value {
    let script = workspace().join("tests/python/fastchat_judgments.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{stderr}",
        script.display()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)))
}

fn write<T: serde::Serialize>(path: &Path, records: &[T]) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    jsonl::write_all(path, records).unwrap_or_else(|e| panic!("{e}"));
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// FastChat's pairwise table (what `show_result.py` printed) equals our tally for each model it lists.
fn assert_pairwise_agrees(theirs: &Value, ours: &BTreeMap<String, Tally>) {
    let models = theirs["models"].as_object().cloned().unwrap_or_default();
    assert!(
        !models.is_empty(),
        "FastChat printed no model:\n{}",
        theirs["printed"]
    );
    for (model, row) in &models {
        let t = ours.get(model).copied().unwrap_or_default();
        let num = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let ctx = format!(
            "{model}: ours {t:?}, FastChat printed\n{}",
            theirs["printed"].as_str().unwrap_or("")
        );
        assert_eq!(
            (num("win"), num("tie"), num("loss")),
            (f64::from(t.wins), f64::from(t.ties), f64::from(t.losses)),
            "{ctx}"
        );
        assert!(close(num("win_rate"), t.win_rate().unwrap_or(f64::NAN)), "{ctx}");
        assert!(
            close(num("loss_rate"), t.loss_rate().unwrap_or(f64::NAN)),
            "{ctx}"
        );
        assert!(
            close(
                num("win_rate_adjusted"),
                t.adjusted_win_rate().unwrap_or(f64::NAN)
            ),
            "{ctx}"
        );
    }
}

/// FastChat's single-answer means (first turn, second turn, all turns) equal ours.
fn assert_single_agrees(theirs: &Value, report: &Report) {
    for (section, turn) in [("turn1", Some(1)), ("turn2", Some(2)), ("average", None)] {
        let printed = theirs[section].as_object().cloned().unwrap_or_default();
        assert_eq!(
            printed.len(),
            report.scores.len(),
            "{section}: {}",
            theirs["printed"]
        );
        for s in &report.scores {
            let ours = match turn {
                Some(t) => s.by_turn.get(&t).and_then(|m| m.value()),
                None => s.overall.value(),
            };
            let theirs_value = printed.get(&s.model).and_then(Value::as_f64);
            assert!(
                ours.zip(theirs_value).is_some_and(|(a, b)| close(a, b)),
                "{} {section}: ours {ours:?}, FastChat {theirs_value:?}\n{}",
                s.model,
                theirs["printed"]
            );
        }
    }
}

fn pair(q: i64, candidate_first: bool, g: (Winner, Winner), turn: u32) -> PairJudgment {
    let (model_1, model_2) = if candidate_first {
        (CANDIDATE, BASELINE)
    } else {
        (BASELINE, CANDIDATE)
    };
    PairJudgment {
        question_id: QuestionId::Number(q),
        model_1: model_1.into(),
        model_2: model_2.into(),
        g1_winner: g.0,
        g2_winner: g.1,
        judge: (
            "gpt-4".into(),
            if turn == 1 {
                "pair-v2"
            } else {
                "pair-v2-multi-turn"
            }
            .into(),
        ),
        g1_user_prompt: format!("question {q} turn {turn}"),
        g1_judgment: "[[A]]".into(),
        g2_user_prompt: format!("question {q} turn {turn}, swapped"),
        g2_judgment: "[[B]]".into(),
        turn,
        tstamp: 1_700_000_000.5,
    }
}

#[test]
fn fastchat_reads_our_judgments_to_the_same_numbers() {
    use Winner::{Error as E, Model1 as M1, Model2 as M2, Tie as T};
    let dir = temp("ours");
    // Every combination of two verdicts, the candidate on either side, over 3 categories and 2 turns.
    let verdicts = [M1, M2, T, E];
    let mut pairs = Vec::new();
    let mut singles = Vec::new();
    for q in 0..20_i64 {
        for turn in 1..=2 {
            let k = (q as usize) * 2 + turn as usize;
            let g = (verdicts[k % 4], verdicts[(k / 4 + q as usize) % 4]);
            pairs.push(pair(q, q % 3 != 0, g, turn));
            for (m, model) in [CANDIDATE, BASELINE].iter().enumerate() {
                let score = match (k + m * 3) % 7 {
                    0 => -1.0,
                    r => 2.0 + r as f64 + if r % 2 == 0 { 0.5 } else { 0.0 },
                };
                singles.push(SingleJudgment {
                    question_id: QuestionId::Number(q),
                    model: model.to_string(),
                    judge: ("gpt-4".into(), "single-v1".into()),
                    user_prompt: String::new(),
                    judgment: format!("Rating: [[{score}]]"),
                    score,
                    turn,
                    tstamp: 1_700_000_000.5,
                });
            }
        }
    }
    let (pair_file, single_file) = (dir.join("gpt-4_pair.jsonl"), dir.join("gpt-4_single.jsonl"));
    write(&pair_file, &pairs);
    write(&single_file, &singles);
    let questions: Vec<Question> = (0..20)
        .map(|q| Question {
            question_id: QuestionId::Number(q),
            category: ["writing", "math", "coding"][q as usize % 3].into(),
            turns: vec!["a".into(), "b".into()],
            reference: None,
            required_temperature: None,
        })
        .collect();
    write(&dir.join("question.jsonl"), &questions);

    let categories = read_categories(&dir.join("question.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let judgments = read_judgments(&[&pair_file, &single_file]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(judgments, Judgments { pairs, singles });
    let report = Report::new(&judgments, &categories, &Bootstrap::default());
    let ours = report
        .pair(CANDIDATE, BASELINE)
        .map(|p| p.overall.tally)
        .unwrap_or_default();
    assert!(
        ours.wins > 0 && ours.ties > 0 && ours.losses > 0 && ours.errors > 0,
        "{ours:?}"
    );
    assert_eq!(
        report.pair(CANDIDATE, BASELINE).map(|p| p.by_category.len()),
        Some(3)
    );

    let path = pair_file.to_string_lossy();
    let baseline = fastchat(&["show-pairwise", &path, "--baseline", BASELINE]);
    assert_pairwise_agrees(&baseline, &BTreeMap::from([(CANDIDATE.to_string(), ours)]));
    assert_eq!(
        baseline["models"].as_object().map(|m| m.len()),
        Some(1),
        "the baseline's own row is dropped"
    );
    let all = fastchat(&["show-pairwise", &path]);
    assert_pairwise_agrees(&all, &totals(&judgments.pairs));
    assert_eq!(all["models"].as_object().map(|m| m.len()), Some(2));

    let single = fastchat(&["show-single", &single_file.to_string_lossy()]);
    assert_single_agrees(&single, &report);
    assert!(report.scores.iter().all(|s| s.unparsed > 0));
}

#[test]
fn we_read_fastchats_own_judgments_to_the_same_numbers() {
    let bench = temp("theirs");
    let categories = [
        "writing",
        "roleplay",
        "math",
        "reasoning",
        "stem",
        "humanities",
        "coding",
        "extraction",
    ];
    let questions: Vec<Question> = (0..16)
        .map(|q| {
            let category = categories[q as usize % categories.len()];
            let needs_reference = matches!(category, "math" | "reasoning" | "coding");
            Question {
                question_id: QuestionId::Number(81 + q),
                category: category.into(),
                turns: vec![
                    format!("Question {q} about {category}?"),
                    format!("And a follow-up to {q}?"),
                ],
                reference: needs_reference.then(|| vec![format!("ref {q}"), format!("ref {q} again")]),
                required_temperature: None,
            }
        })
        .collect();
    write(&bench.join("question.jsonl"), &questions);
    let answers = |model: &str| -> Vec<ModelAnswer> {
        questions
            .iter()
            .map(|q| ModelAnswer {
                question_id: q.question_id.clone(),
                answer_id: format!("{model}-{}", q.question_id),
                model_id: model.into(),
                choices: vec![Choice {
                    index: 0,
                    turns: q.turns.iter().map(|t| format!("{model} answers: {t}")).collect(),
                }],
                tstamp: 1_700_000_000.0,
            })
            .collect()
    };
    for model in [CANDIDATE, BASELINE] {
        write(
            &bench.join(format!("model_answer/{model}.jsonl")),
            &answers(model),
        );
    }
    let references: Vec<ModelAnswer> = questions
        .iter()
        .filter_map(|q| {
            let turns = q.reference.clone()?;
            Some(ModelAnswer {
                question_id: q.question_id.clone(),
                answer_id: format!("ref-{}", q.question_id),
                model_id: "gpt-4".into(),
                choices: vec![Choice { index: 0, turns }],
                tstamp: 1_700_000_000.0,
            })
        })
        .collect();
    write(&bench.join("reference_answer/gpt-4.jsonl"), &references);

    let prompts = workspace().join("eval/prompts/judge_prompts.jsonl");
    let made = fastchat(&[
        "judge",
        &bench.to_string_lossy(),
        "--judge-file",
        &prompts.to_string_lossy(),
        "--judge-model",
        "gpt-4",
        "--baseline",
        BASELINE,
        "--seed",
        "7",
    ]);
    let pair_file = PathBuf::from(made["pair"].as_str().unwrap_or_default());
    let single_file = PathBuf::from(made["single"].as_str().unwrap_or_default());
    // 16 questions x 2 turns, judged in both orders; and each of 2 models graded on 2 turns.
    assert_eq!(made["calls"].as_u64(), Some(16 * 2 * 2 + 16 * 2 * 2));

    // Read in the other order, and through one call: each file's kind is told by its records.
    let judgments = read_judgments(&[&single_file, &pair_file]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((judgments.pairs.len(), judgments.singles.len()), (32, 64));
    let by_prompt = |name: &str| judgments.pairs.iter().filter(|j| j.judge.1 == name).count();
    assert_eq!(
        [
            by_prompt("pair-v2"),
            by_prompt("pair-math-v1"),
            by_prompt("pair-v2-multi-turn")
        ],
        [10, 6, 10],
        "FastChat chose the reference judge for math, reasoning and coding"
    );
    let first = judgments
        .pairs
        .iter()
        .find(|j| j.turn == 1 && j.question_id == QuestionId::Number(81));
    assert!(
        first.is_some_and(|j| j.g1_user_prompt.contains("Question 0 about writing?")
            && j.g1_user_prompt.contains("vicuna-ft answers")
            && j.model_1 == CANDIDATE),
        "FastChat built the prompt from our files: {first:?}"
    );

    let categories = read_categories(&bench.join("question.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    let report = Report::new(&judgments, &categories, &Bootstrap::default());
    let ours = report
        .pair(CANDIDATE, BASELINE)
        .map(|p| p.overall.tally)
        .unwrap_or_default();
    assert!(
        ours.wins > 0 && ours.ties > 0 && ours.losses > 0 && ours.errors > 0,
        "seed 7 draws every kind: {ours:?}"
    );
    let unparsed: u32 = report.scores.iter().map(|s| s.unparsed).sum();
    assert!(unparsed > 0, "seed 7 draws an unparseable rating");
    let raw_errors = judgments
        .pairs
        .iter()
        .filter(|j| j.g1_winner == Winner::Error || j.g2_winner == Winner::Error)
        .count();
    assert_eq!(ours.errors as usize, raw_errors);

    let theirs = fastchat(&[
        "show-pairwise",
        &pair_file.to_string_lossy(),
        "--baseline",
        BASELINE,
    ]);
    assert_pairwise_agrees(&theirs, &BTreeMap::from([(CANDIDATE.to_string(), ours)]));
    let single = fastchat(&["show-single", &single_file.to_string_lossy()]);
    assert_single_agrees(&single, &report);

    let summary = report.summary(CANDIDATE, BASELINE, "gpt-4");
    assert_eq!(
        (summary.wins, summary.ties, summary.losses, summary.errors),
        (ours.wins, ours.ties, ours.losses, ours.errors)
    );
    let html = report.html();
    std::fs::write(bench.join("report.html"), &html).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(bench.join("report.txt"), report.text()).unwrap_or_else(|e| panic!("{e}"));
}
