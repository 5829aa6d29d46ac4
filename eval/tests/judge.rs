//! The judge step against a tiny OpenAI-compatible judge that favours the answer containing "good" (pairwise: the
//! verdict follows whichever answer is shown as A; single: 8 for "good", 3 otherwise), mumbles ("MUMBLE") or
//! echoes the verdict format ("ECHO") on cue, and can be told to refuse requests: both orders' mapping, FastChat's
//! choice of prompt per category and turn, verdict errors counted and never guessed, resuming, failed matches, the
//! settings sidecar, and the same judgments as FastChat's own code builds from the same judge.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "judge/fake.rs"]
mod fake;
#[path = "judge/fastchat.rs"]
mod fastchat;

use std::sync::Arc;

use camelid_eval::format::{ModelAnswer, QuestionId, SingleJudgment, Winner};
use camelid_eval::jsonl;
use camelid_eval::judge::{
    JudgeError, JudgeInputs, MissingAnswer, Pairing, ReferenceFallback, judge_pairwise, judge_single,
};

use fake::{Fake, answer, data, find, models, number, options, pairs, start, without_tstamp};

#[tokio::test]
async fn pairwise_maps_both_orders_and_picks_fastchats_prompt_per_category_and_turn() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data(
        "pairwise",
        &[("m1", "good"), ("m2", "bad"), ("m3", "good")],
        &[("m3", 3)],
    );
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &d.answers,
        references: Some(&d.references),
    };
    let out = d.dir.join("gpt-4_pair.jsonl");
    let stats = judge_pairwise(
        &client,
        &inputs,
        &Pairing::All(models(&["m1", "m2", "m3"])),
        &options(&out),
    )
    .await
    .unwrap();
    // Turn 1: 4 questions x 3 pairs, less m3's two pairs on question 3; turn 2: the two 2-turn questions x 3.
    assert_eq!(
        (
            stats.planned,
            stats.judged,
            stats.skipped,
            stats.failed,
            stats.verdict_errors
        ),
        (16, 16, 0, 0, 0)
    );
    assert_eq!(
        stats.missing_answers,
        [MissingAnswer {
            model: "m3".into(),
            question_id: QuestionId::Number(3),
            turn: 1
        }]
    );
    assert_eq!(
        stats.reference_fallbacks,
        [ReferenceFallback {
            question_id: QuestionId::Number(3),
            category: "reasoning".into(),
            turn: 1
        }]
    );
    let all = pairs(&out);
    assert_eq!(all.len(), 16);
    let requests = fake.requests();
    assert_eq!(requests.len(), 32, "two games per match");
    for r in &requests {
        assert_eq!(r["temperature"], 0.0);
        assert_eq!(r["max_tokens"], 2048);
        assert_eq!(r["model"], "judge-model");
        assert_eq!(r["messages"][0]["role"], "system");
        assert_eq!(r["messages"][1]["role"], "user");
    }

    // Game 1 shows model_1 as A, game 2 swaps; both say m1's good answer wins.
    let j = find(&all, 1, "m1", "m2", 1);
    assert_eq!((j.g1_winner, j.g2_winner), (Winner::Model1, Winner::Model1));
    assert_eq!(j.judge, ("gpt-4".to_string(), "pair-v2".to_string()));
    assert!(
        j.g1_user_prompt
            .contains("[The Start of Assistant A's Answer]\ngood: m1 on 1.1 {x}\n"),
        "{}",
        j.g1_user_prompt
    );
    assert!(
        j.g2_user_prompt
            .contains("[The Start of Assistant A's Answer]\nbad: m2 on 1.1 {x}\n")
    );
    assert!(
        j.g1_user_prompt
            .contains("Write a haiku about {braces} and “quotes”.")
    );
    assert_eq!(j.g1_judgment, "A is better. [[A]]");
    assert_eq!(j.g2_judgment, "B is better. [[B]]");
    // Two good answers: each order favours its A, so the games disagree.
    let j = find(&all, 1, "m1", "m3", 1);
    assert_eq!((j.g1_winner, j.g2_winner), (Winner::Model1, Winner::Model2));
    let j = find(&all, 4, "m2", "m3", 1);
    assert_eq!((j.g1_winner, j.g2_winner), (Winner::Model2, Winner::Model2));

    // Turn 2: the whole conversation, with the multi-turn prompt.
    let j = find(&all, 1, "m1", "m2", 2);
    assert_eq!(j.judge.1, "pair-v2-multi-turn");
    assert!(
        j.g1_user_prompt.contains("Now make it rhyme, {{keep}} it.")
            && j.g1_user_prompt.contains("good: m1 on 1.2")
    );
    assert_eq!((j.g1_winner, j.g2_winner), (Winner::Model1, Winner::Model1));
    // Math and coding against the reference: the file's where it has one, over the question's own.
    let j = find(&all, 2, "m1", "m2", 1);
    assert_eq!(j.judge.1, "pair-math-v1");
    assert!(
        j.g1_user_prompt
            .contains("[The Start of Reference Answer]\nfile: 4\n")
            && !j.g1_user_prompt.contains("own: 4")
    );
    let j = find(&all, 2, "m1", "m2", 2);
    assert_eq!(j.judge.1, "pair-math-v1-multi-turn");
    assert!(j.g1_user_prompt.contains("### Reference answer:\nfile: 12"));
    assert_eq!(find(&all, 4, "m1", "m2", 1).judge.1, "pair-math-v1");
    // Reasoning without a reference: the general prompt, reported above.
    assert_eq!(find(&all, 3, "m1", "m2", 1).judge.1, "pair-v2");

    // The file is in a fixed order: question, model_1, model_2, turn.
    let keys: Vec<_> = all
        .iter()
        .map(|j| {
            (
                j.question_id.clone(),
                j.model_1.clone(),
                j.model_2.clone(),
                j.turn,
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    // A system prompt is the prompt's own.
    let system = requests[0]["messages"][0]["content"].as_str().unwrap();
    assert!(system.starts_with("Please act as an impartial judge"));
}

#[tokio::test]
async fn single_grades_each_answer_with_the_questions_own_reference_when_no_file_is_given() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data("single", &[("m1", "good"), ("m2", "bad")], &[]);
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &d.answers,
        references: None,
    };
    let out = d.dir.join("gpt-4_single.jsonl");
    let stats = judge_single(&client, &inputs, &models(&["m1", "m2"]), &options(&out))
        .await
        .unwrap();
    assert_eq!((stats.planned, stats.judged, stats.verdict_errors), (12, 12, 0));
    // Without the file, coding has no reference either.
    let fallbacks: Vec<i64> = stats
        .reference_fallbacks
        .iter()
        .map(|f| match f.question_id {
            QuestionId::Number(n) => n,
            QuestionId::Text(_) => 0,
        })
        .collect();
    assert_eq!(fallbacks, [3, 4]);
    let all: Vec<SingleJudgment> = jsonl::read(&out, false)
        .unwrap()
        .into_iter()
        .map(|l| l.record)
        .collect();
    let get = |q: i64, m: &str, t: u32| {
        all.iter()
            .find(|j| j.question_id == QuestionId::Number(q) && j.model == m && j.turn == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(get(1, "m1", 1).score, 8.0);
    assert_eq!(get(1, "m2", 1).score, 3.0);
    assert_eq!(get(1, "m1", 1).judge.1, "single-v1");
    assert_eq!(get(1, "m1", 2).judge.1, "single-v1-multi-turn");
    let math = get(2, "m2", 2);
    assert_eq!(math.judge.1, "single-math-v1-multi-turn");
    assert!(math.user_prompt.contains("own: 4") && math.user_prompt.contains("own: 12"));
    assert_eq!(get(2, "m1", 1).judge.1, "single-math-v1");
    assert_eq!(get(4, "m1", 1).judge.1, "single-v1");
    // single-v1's system prompt is FastChat's "You are a helpful assistant.".
    assert!(
        fake.requests()
            .iter()
            .any(|r| r["messages"][0]["content"] == "You are a helpful assistant.")
    );
}

#[tokio::test]
async fn unparseable_and_contradictory_verdicts_are_recorded_as_errors_never_guessed() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data(
        "verdicts",
        &[("good", "good"), ("mumbler", "MUMBLE"), ("echoer", "ECHO")],
        &[],
    );
    let inputs = JudgeInputs {
        questions: &d.questions[..1],
        answers: &d.answers,
        references: None,
    };
    let out = d.dir.join("pair.jsonl");
    let pairing = Pairing::Baseline {
        models: models(&["mumbler", "echoer", "good"]),
        baseline: "good".into(),
    };
    let stats = judge_pairwise(&client, &inputs, &pairing, &options(&out))
        .await
        .unwrap();
    assert_eq!(
        (stats.planned, stats.judged),
        (4, 4),
        "2 pairs x 2 turns; the baseline is not paired with itself"
    );
    assert_eq!(stats.verdict_errors, 8, "every game of every match");
    let all = pairs(&out);
    for j in &all {
        assert_eq!(
            (j.g1_winner, j.g2_winner),
            (Winner::Error, Winner::Error),
            "{j:?}"
        );
        assert_eq!(j.model_2, "good");
    }
    let echo = find(&all, 1, "echoer", "good", 1);
    assert!(
        echo.g1_judgment.contains("[[A]]"),
        "FastChat would have called this A"
    );

    let out = d.dir.join("single.jsonl");
    let stats = judge_single(&client, &inputs, &models(&["mumbler", "echoer"]), &options(&out))
        .await
        .unwrap();
    assert_eq!((stats.judged, stats.verdict_errors), (4, 4));
    let all: Vec<SingleJudgment> = jsonl::read(&out, false)
        .unwrap()
        .into_iter()
        .map(|l| l.record)
        .collect();
    assert!(all.iter().all(|j| j.score == -1.0), "{all:?}");
}

#[tokio::test]
async fn a_resumed_run_writes_what_an_uninterrupted_one_writes_asking_only_for_the_rest() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data("resume", &[("m1", "good"), ("m2", "bad"), ("m3", "good")], &[]);
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &d.answers,
        references: Some(&d.references),
    };
    let pairing = Pairing::All(models(&["m1", "m2", "m3"]));
    let whole = d.dir.join("whole.jsonl");
    let first = judge_pairwise(&client, &inputs, &pairing, &options(&whole))
        .await
        .unwrap();
    assert_eq!(first.judged, 18);

    // A run killed after some matches: its lines in completion order, a torn last line, and its settings.
    let text = std::fs::read_to_string(&whole).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let kept: Vec<&str> = [11, 2, 7, 0, 16].iter().map(|i| lines[*i]).collect();
    let partial = d.dir.join("partial.jsonl");
    std::fs::write(&partial, format!("{}\n{}", kept.join("\n"), &lines[5][..40])).unwrap();
    std::fs::copy(
        d.dir.join("whole.jsonl.settings.json"),
        d.dir.join("partial.jsonl.settings.json"),
    )
    .unwrap();

    fake.clear();
    let resumed = judge_pairwise(&client, &inputs, &pairing, &options(&partial))
        .await
        .unwrap();
    assert_eq!((resumed.skipped, resumed.judged), (5, 13));
    assert_eq!(
        fake.requests().len(),
        26,
        "only the missing matches, two games each"
    );
    assert_eq!(without_tstamp(&partial), without_tstamp(&whole));

    // Once more: nothing left to ask.
    fake.clear();
    let again = judge_pairwise(&client, &inputs, &pairing, &options(&partial))
        .await
        .unwrap();
    assert_eq!((again.skipped, again.judged), (18, 0));
    assert!(fake.requests().is_empty());
    assert_eq!(without_tstamp(&partial), without_tstamp(&whole));
}

#[tokio::test]
async fn a_failed_request_fails_its_match_only_and_a_rerun_resumes_it() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data("failed", &[("m1", "good"), ("m2", "bad")], &[]);
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &d.answers,
        references: Some(&d.references),
    };
    let pairing = Pairing::Pairs(vec![("m1".into(), "m2".into())]);
    let out = d.dir.join("pair.jsonl");
    *fake.refuse.lock().unwrap() = Some("Write a haiku".into());
    let err = judge_pairwise(&client, &inputs, &pairing, &options(&out))
        .await
        .unwrap_err();
    assert_eq!(err.category(), "judge_failed");
    let message = err.to_string();
    assert!(message.contains("2 of 6 matches failed"), "{message}");
    assert!(
        message.contains("question 1 turn 1: m1 vs m2 (pair-v2)"),
        "{message}"
    );
    assert!(
        message.contains("question 1 turn 2: m1 vs m2 (pair-v2-multi-turn)"),
        "{message}"
    );
    let JudgeError::MatchesFailed { failed, stats } = err else {
        unreachable!()
    };
    assert_eq!((failed.len(), stats.judged, stats.failed), (2, 4, 2));
    assert_eq!(pairs(&out).len(), 4, "the others are written");
    assert!(
        pairs(&out).iter().all(|j| j.question_id != QuestionId::Number(1)),
        "nothing guessed for the failed ones"
    );

    *fake.refuse.lock().unwrap() = None;
    fake.clear();
    let stats = judge_pairwise(&client, &inputs, &pairing, &options(&out))
        .await
        .unwrap();
    assert_eq!((stats.skipped, stats.judged), (4, 2));
    assert_eq!(fake.requests().len(), 4);
    assert_eq!(pairs(&out).len(), 6);
}

#[tokio::test]
async fn changed_settings_are_refused_with_what_changed_unless_a_new_file_is_forced() {
    let fake = Arc::new(Fake::default());
    let client = start(fake.clone()).await;
    let d = data("settings", &[("m1", "good"), ("m2", "bad")], &[]);
    let pairing = Pairing::Pairs(vec![("m1".into(), "m2".into())]);
    let out = d.dir.join("pair.jsonl");
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &d.answers,
        references: Some(&d.references),
    };
    judge_pairwise(&client, &inputs, &pairing, &options(&out))
        .await
        .unwrap();

    // m2's answers change, and so does the judge's budget.
    let mut answers = d.answers.clone();
    let changed: Vec<ModelAnswer> = d
        .questions
        .iter()
        .map(|q| answer("m2", number(q), &["new".into(), "new".into()]))
        .collect();
    answers.insert("m2", changed);
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &answers,
        references: Some(&d.references),
    };
    let mut opts = options(&out);
    opts.max_tokens = 1024;
    fake.clear();
    let err = judge_pairwise(&client, &inputs, &pairing, &opts)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "settings_changed");
    let JudgeError::SettingsChanged { changes, .. } = &err else {
        unreachable!()
    };
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0], "max_tokens: 2048 → 1024");
    assert!(changes[1].starts_with("answers of m2: "), "{changes:?}");
    assert!(err.to_string().contains("force_new"));
    assert!(fake.requests().is_empty(), "refused before asking the judge");

    opts.force_new = true;
    let stats = judge_pairwise(&client, &inputs, &pairing, &opts).await.unwrap();
    assert_eq!((stats.skipped, stats.judged), (0, 6));
    assert_eq!(
        pairs(&d.dir.join("pair.jsonl.old")).len(),
        6,
        "the old judgments are kept aside"
    );
    assert!(d.dir.join("pair.jsonl.settings.json.old").exists());
    assert!(pairs(&out).iter().all(|j| j.g1_user_prompt.contains("new")));

    // A model judged for the first time is no change: its judgments stand on their own.
    let mut more = answers.clone();
    more.insert(
        "m3",
        d.questions
            .iter()
            .map(|q| answer("m3", number(q), &["good".into(), "good".into()]))
            .collect(),
    );
    let inputs = JudgeInputs {
        questions: &d.questions,
        answers: &more,
        references: Some(&d.references),
    };
    opts.force_new = false;
    let stats = judge_pairwise(
        &client,
        &inputs,
        &Pairing::Pairs(vec![("m3".into(), "m2".into())]),
        &opts,
    )
    .await
    .unwrap();
    assert_eq!(stats.judged, 6);
    assert_eq!(pairs(&out).len(), 12);
}
