use std::path::PathBuf;

use super::stats::*;
use super::*;
use crate::format::{Outcome, QuestionId, Winner};

fn pair(q: i64, m1: &str, m2: &str, g1: Winner, g2: Winner, turn: u32) -> PairJudgment {
    PairJudgment {
        question_id: QuestionId::Number(q),
        model_1: m1.into(),
        model_2: m2.into(),
        g1_winner: g1,
        g2_winner: g2,
        judge: ("gpt-4".into(), "pair-v2".into()),
        g1_user_prompt: String::new(),
        g1_judgment: String::new(),
        g2_user_prompt: String::new(),
        g2_judgment: String::new(),
        turn,
        tstamp: 0.0,
    }
}

fn single(q: i64, model: &str, score: f64, turn: u32) -> SingleJudgment {
    SingleJudgment {
        question_id: QuestionId::Number(q),
        model: model.into(),
        judge: ("gpt-4".into(), "single-v1".into()),
        user_prompt: String::new(),
        judgment: String::new(),
        score,
        turn,
        tstamp: 0.0,
    }
}

fn categories(list: &[(i64, &str)]) -> Categories {
    list.iter()
        .map(|(q, c)| (QuestionId::Number(*q), c.to_string()))
        .collect()
}

use Winner::{Error as E, Model1 as M1, Model2 as M2, Tie as T};

#[test]
fn matches_count_for_a_model_whichever_side_it_played() {
    let pairs = [
        pair(1, "cand", "base", M1, M1, 1), // cand wins
        pair(2, "base", "cand", M2, M2, 1), // cand wins, as model_2
        pair(3, "base", "cand", M1, M1, 1), // cand loses
        pair(4, "cand", "base", M1, M2, 1), // orders disagree: tie
        pair(5, "cand", "base", T, T, 2),   // tie
        pair(6, "cand", "base", E, M1, 2),  // error: left out, counted
        pair(7, "base", "cand", M2, E, 2),  // error
    ];
    let cats = categories(&[
        (1, "writing"),
        (2, "writing"),
        (3, "math"),
        (4, "math"),
        (5, ""),
        (6, "math"),
    ]);
    let stats = pairwise(&pairs, &cats, &Bootstrap::default());
    assert_eq!(stats.len(), 1, "one pair, whichever side each played");
    let p = &stats[0];
    assert_eq!((p.model.as_str(), p.opponent.as_str()), ("cand", "base"));
    let all = Tally {
        wins: 2,
        ties: 2,
        losses: 1,
        errors: 2,
    };
    assert_eq!(p.overall.tally, all);
    assert_eq!(all.win_rate(), Some(0.4));
    assert_eq!(all.adjusted_win_rate(), Some(0.6));
    assert_eq!(all.loss_rate(), Some(0.2));
    let cat = |c: &str| p.by_category.get(c).map(|r| r.tally).unwrap_or_default();
    assert_eq!((cat("writing").wins, cat("writing").decided()), (2, 2));
    assert_eq!(
        (
            cat("math").wins,
            cat("math").ties,
            cat("math").losses,
            cat("math").errors
        ),
        (0, 1, 1, 1)
    );
    assert_eq!(
        cat("unknown").ties,
        1,
        "an empty category and a question not in the file are unknown"
    );
    assert_eq!(cat("unknown").errors, 1);
    assert_eq!(p.by_turn.get(&1).map(Tally::decided), Some(4));
    assert_eq!(p.by_turn.get(&2).map(|t| (t.ties, t.errors)), Some((1, 2)));

    let flipped = p.flipped();
    assert_eq!(flipped.overall.tally, all.flipped());
    assert_eq!(flipped.overall.tally.adjusted_win_rate(), Some(0.4));
    assert_eq!(totals(&pairs).get("base").copied(), Some(all.flipped()));
    assert_eq!(orient(&pairs[1], "cand"), Some(Outcome::Win));
    assert_eq!(orient(&pairs[1], "other"), None);
}

#[test]
fn nothing_decided_has_no_rate_and_no_interval() {
    let stats = pairwise(
        &[pair(1, "a", "b", E, E, 1)],
        &Categories::new(),
        &Bootstrap::default(),
    );
    assert_eq!(stats[0].overall.tally.errors, 1);
    assert_eq!(stats[0].overall.tally.adjusted_win_rate(), None);
    assert_eq!(stats[0].overall.interval, None);
}

#[test]
fn all_wins_give_the_interval_one_to_one() {
    let units = vec![
        Tally {
            wins: 2,
            ..Tally::default()
        };
        30
    ];
    let i = bootstrap_interval(&units, &Bootstrap::default());
    assert_eq!(i, Some(Interval { low: 1.0, high: 1.0 }));
}

/// The normal approximation's 95% width for a rate of 0.5 over `n` independent units.
fn normal_width(n: f64) -> f64 {
    2.0 * 1.959_964 * (0.25 / n).sqrt()
}

#[test]
fn an_even_split_gives_an_interval_around_a_half_of_the_normal_width() {
    let n = 400;
    let units: Vec<Tally> = (0..n)
        .map(|k| {
            let mut t = Tally::default();
            t.record(if k % 2 == 0 { Outcome::Win } else { Outcome::Loss });
            t
        })
        .collect();
    let config = Bootstrap::default();
    let i = bootstrap_interval(&units, &config).unwrap_or(Interval { low: 9.0, high: 9.0 });
    assert!(i.low < 0.5 && 0.5 < i.high, "{i:?}");
    let (width, expected) = (i.high - i.low, normal_width(f64::from(n)));
    assert!(
        (width / expected - 1.0).abs() < 0.2,
        "width {width}, normal approximation {expected}"
    );
    assert_eq!(
        bootstrap_interval(&units, &config),
        Some(i),
        "the same seed draws the same interval"
    );
    // Rates over 400 units move in steps of 1/400, so one other seed may land on the same interval; five won't.
    let others: Vec<_> = (1..=5)
        .map(|seed| bootstrap_interval(&units, &Bootstrap { seed, ..config }))
        .collect();
    assert!(
        others.iter().any(|o| *o != Some(i)),
        "another seed draws other resamples"
    );
}

#[test]
fn a_questions_turns_are_resampled_together() {
    // 200 questions of two turns each, both turns with the same outcome: 200 independent units, not 400.
    let mut pairs = Vec::new();
    for q in 0..200 {
        let w = if q % 2 == 0 { M1 } else { M2 };
        pairs.push(pair(q, "a", "b", w, w, 1));
        pairs.push(pair(q, "a", "b", w, w, 2));
    }
    let stats = pairwise(&pairs, &Categories::new(), &Bootstrap::default());
    let i = stats[0]
        .overall
        .interval
        .unwrap_or(Interval { low: 0.0, high: 0.0 });
    let width = i.high - i.low;
    assert!((width / normal_width(200.0) - 1.0).abs() < 0.2, "width {width}");
    assert!(
        width > 1.2 * normal_width(400.0),
        "narrower than the evidence: {width}"
    );
    let flipped = stats[0].flipped().overall.interval;
    assert_eq!(flipped, Some(i.flipped()));
}

#[test]
fn single_grades_average_by_turn_and_category_leaving_unparsed_out() {
    let singles = [
        single(1, "a", 8.0, 1),
        single(1, "a", 6.0, 2),
        single(2, "a", 9.0, 1),
        single(2, "a", -1.0, 2),
        single(3, "a", 4.5, 1),
        single(1, "b", 5.0, 1),
    ];
    let cats = categories(&[(1, "writing"), (2, "writing")]);
    let s = scores(&singles, &cats);
    assert_eq!(s.iter().map(|s| s.model.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let a = &s[0];
    assert_eq!(a.unparsed, 1);
    assert_eq!(a.by_turn.get(&1).and_then(Mean::value), Some(21.5 / 3.0));
    assert_eq!(a.by_turn.get(&2).and_then(Mean::value), Some(6.0));
    assert_eq!(
        a.overall.value(),
        Some(27.5 / 4.0),
        "the mean of all grades, as FastChat's average"
    );
    assert_eq!(
        a.by_category.get("writing").and_then(Mean::value),
        Some(23.0 / 3.0)
    );
    assert_eq!(a.by_category.get("unknown").and_then(Mean::value), Some(4.5));
    let cell = a
        .by_category_turn
        .get("writing")
        .and_then(|t| t.get(&1))
        .and_then(Mean::value);
    assert_eq!(cell, Some(8.5));
}

#[test]
fn the_summary_is_the_candidates_record_against_the_baseline() {
    let judgments = Judgments {
        pairs: vec![
            pair(1, "base", "cand", M2, M2, 1),
            pair(2, "cand", "base", T, M1, 1),
            pair(3, "cand", "base", E, M1, 1),
        ],
        singles: vec![single(1, "cand", 7.0, 1), single(1, "base", 3.0, 1)],
    };
    let report = Report::new(&judgments, &Categories::new(), &Bootstrap::default());
    let s = report.summary("cand", "base", "gpt-4");
    assert_eq!((s.wins, s.ties, s.losses, s.errors), (1, 1, 0, 1));
    assert_eq!(s.win_rate, Some(0.75));
    assert!(
        s.win_rate_low
            .zip(s.win_rate_high)
            .is_some_and(|(l, h)| l <= 0.75 && 0.75 <= h)
    );
    assert_eq!(s.mean_score, Some(7.0));
    assert_eq!(
        (s.candidate.as_str(), s.judge.as_str(), s.report),
        ("cand", "gpt-4", None)
    );
    assert_eq!(report.summary("base", "cand", "gpt-4").win_rate, Some(0.25));
    let oriented = report.oriented_for("base");
    assert_eq!(oriented.pairwise[0].model, "base");
    let never = oriented.summary("cand", "nobody", "gpt-4");
    assert_eq!((never.wins, never.win_rate), (0, None));
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

#[test]
fn files_are_told_apart_by_their_records_and_errors_name_the_line() {
    let dir = temp("read");
    let pair_line = serde_json::to_string(&pair(1, "a", "b", M1, T, 2)).unwrap_or_default();
    let single_line = serde_json::to_string(&single(1, "a", 7.5, 1)).unwrap_or_default();
    // FastChat's play_a_match_pair with a single-answer judge writes no turn.
    let fastchat_pair = r#"{"question_id": 2, "model_1": "a", "model_2": "b", "g1_winner": "tie", "g2_winner": "tie", "judge": ["gpt-4", "single-v1"], "g1_user_prompt": "", "g1_judgment": "", "g2_user_prompt": "", "g2_judgment": "", "m1_score": 5, "m2_score": 5, "tstamp": 1.0}"#;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        let _ = std::fs::write(&p, text);
        p
    };
    let pairs = write("gpt-4_pair.jsonl", format!("{pair_line}\n\n{fastchat_pair}\n"));
    let singles = write(
        "renamed.jsonl",
        format!("{single_line}\n{single_line}\n{{\"model\": \"a\", \"sco"),
    );
    let j = read_judgments(&[&pairs, &singles]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (j.pairs.len(), j.singles.len()),
        (2, 2),
        "a torn last line is dropped"
    );
    assert_eq!((j.pairs[0].turn, j.pairs[1].turn), (2, 1));

    let mixed = write("mixed.jsonl", format!("{pair_line}\n{single_line}\n"));
    let err = read_judgments(&[mixed])
        .err()
        .map(|e| (e.category(), e.to_string()));
    assert!(
        err.as_ref()
            .is_some_and(|(c, e)| *c == "shape" && e.contains("mixed.jsonl:2:")),
        "{err:?}"
    );
    let other = write("other.jsonl", "{\"question_id\": 1, \"turns\": []}\n".into());
    let err = read_judgments(&[other])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("other.jsonl:1: neither"), "{err}");
    let mut wrong = serde_json::to_value(pair(1, "a", "b", M1, T, 2)).unwrap_or_default();
    wrong["g2_winner"] = "maybe".into();
    let bad = write("bad.jsonl", format!("{pair_line}\n{wrong}\n"));
    let err = read_judgments(&[bad])
        .err()
        .map(|e| (e.category(), e.to_string()));
    assert!(
        err.as_ref()
            .is_some_and(|(c, e)| *c == "record" && e.contains("bad.jsonl:2:")),
        "{err:?}"
    );
    let missing = read_judgments(&[dir.join("none.jsonl")])
        .err()
        .map(|e| e.category());
    assert_eq!(missing, Some("judgments"));

    let questions = write(
        "question.jsonl",
        "{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"x\"]}\n".into(),
    );
    let cats = read_categories(&questions).unwrap_or_default();
    assert_eq!(category_of(&cats, &QuestionId::Number(81)), "writing");
    assert_eq!(category_of(&cats, &QuestionId::Number(82)), UNKNOWN_CATEGORY);
}

#[test]
fn strings_from_the_files_come_out_escaped_everywhere() {
    let evil = "<script>alert(1)</script>";
    let judgments = Judgments {
        pairs: vec![
            pair(1, evil, "base\u{1b}[2J", M1, M1, 1),
            pair(2, evil, "base\u{1b}[2J", M2, T, 2),
        ],
        singles: vec![single(1, evil, 8.0, 1), single(2, evil, 6.0, 2)],
    };
    let cats = categories(&[(1, "<img src=x onerror=alert(1)>"), (2, "coding")]);
    let report = Report::new(&judgments, &cats, &Bootstrap::default());
    let html = report.html();
    assert!(!html.contains("<script"), "a model name became a tag");
    assert!(!html.contains("<img"), "a category became a tag");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        html.contains("default-src 'none'"),
        "the page forbids scripts outright"
    );
    for external in ["http://", "https://", "<link", "@import", "url("] {
        let outside = html.replace("http://www.w3.org/2000/svg", "");
        assert!(!outside.contains(external), "the page loads {external}");
    }
    assert!(html.contains("<svg") && html.contains("class=\"half\"") && html.contains("class=\"whisker\""));
    let markdown = report.markdown();
    assert!(
        !markdown.contains("<script") && !markdown.contains("<img"),
        "{markdown}"
    );
    let text = report.text();
    assert!(
        !text.contains('\u{1b}'),
        "an escape sequence reached the terminal"
    );
    assert!(
        text.contains("<script>alert(1)</script> vs base\u{fffd}[2J: by category"),
        "{text}"
    );
}

#[test]
fn the_terminal_table_is_aligned() {
    let judgments = Judgments {
        pairs: vec![
            pair(1, "cand", "base", M1, M1, 1),
            pair(2, "cand", "base", M2, M2, 1),
        ],
        singles: vec![single(1, "cand", 8.0, 1), single(1, "cand", 6.0, 2)],
    };
    let cats = categories(&[(1, "a-long-category-name"), (2, "x")]);
    let text = Report::new(&judgments, &cats, &Bootstrap::default()).text();
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("cand vs base: by category"))
        .skip(1)
        .take(4)
        .collect();
    assert!(table[0].starts_with("category"), "{text}");
    assert!(table[3].starts_with("all"), "{text}");
    let ends: Vec<usize> = table.iter().map(|l| l.find('%').unwrap_or(0)).collect();
    assert!(
        ends[1] > 0 && ends[1..].iter().all(|e| *e == ends[1]),
        "the columns line up:\n{text}"
    );
    assert!(
        text.contains("cand") && text.contains("8.00") && text.contains("7.00"),
        "{text}"
    );
}
