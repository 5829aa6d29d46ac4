//! `camelid eval gate`: the promotion gate a FineTuneJob's evaluation Job runs. It answers the questions with the
//! candidate and the baseline, judges each question pairwise in both orders and grades the candidate's answers,
//! writes the report, and leaves a [`Summary`] where the operator reads it (the container's termination message).
//! Every step resumes from the files in `--out`, so a Job retry after a lost pod or a judge outage repeats no
//! finished request. Whether the numbers pass is the operator's call (`minWinRate`), not this program's.

use std::path::PathBuf;

use camelid_contracts::evaluation::{GateSettings, JUDGE_API_KEY_ENV, SUMMARY_MAX_BYTES, Summary};

use crate::CliError;
use crate::answer::{self, AnswerSettings};
use crate::cli::{endpoint, file_safe, progress, write};
use crate::client::{ChatClient, RetryPolicy};
use crate::judge::{self, AnswerSet, JudgeInputs, JudgeOptions, Pairing};
use crate::questions::{self, Selection};
use crate::report::{self, Bootstrap, Report};

/// The gate's answers are at most this long unless the spec says otherwise.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// Runs the gate and records the outcome at `settings.summary`: the [`Summary`] as JSON, or the error in words.
pub async fn run_and_record(settings: &GateSettings) -> Result<Summary, CliError> {
    let outcome = run(settings).await;
    let message = match &outcome {
        Ok(summary) => serde_json::to_string(summary).unwrap_or_default(),
        Err(e) => truncate(&format!("evaluation failed: {e}"), SUMMARY_MAX_BYTES),
    };
    if let Err(source) = std::fs::write(&settings.summary, &message) {
        // The operator reads nothing else: a gate whose summary is lost must not look like a success. Run by
        // hand, pass `--summary FILE` (the default is the container's termination log).
        tracing::error!(path = %settings.summary.display(), error = %source, "the summary could not be written");
        return Err(outcome.err().unwrap_or(CliError::Write {
            path: settings.summary.clone(),
            source,
        }));
    }
    outcome
}

/// Answer, judge, report; the summary of the candidate against the baseline.
pub async fn run(s: &GateSettings) -> Result<Summary, CliError> {
    if s.candidate_model == s.baseline_model {
        return Err(CliError::Usage(format!(
            "the candidate and the baseline are both named {:?}: their answer files would be one",
            s.candidate_model
        )));
    }
    let file = questions::read(&s.questions)?;
    let selection = Selection {
        max_questions: s.max_questions.map(|n| n as usize),
        ..Selection::ALL
    };
    let selected = file.select(&selection)?;
    let answers_dir = s.out.join("model_answer");
    let mut files = Vec::new();
    for (url, model) in [
        (&s.candidate_url, &s.candidate_model),
        (&s.baseline_url, &s.baseline_model),
    ] {
        let mut settings = AnswerSettings::new(endpoint(url, model, None), &file, selection);
        settings.max_tokens = s.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if let Some(c) = s.concurrency {
            settings.concurrency = c as usize;
        }
        let out = answers_dir.join(format!("{}.jsonl", file_safe(model)));
        let stats = answer::answer(&settings, &selected, &out, progress()).await?;
        tracing::info!(model = %model, answered = stats.answered, resumed = stats.resumed, "answers ready");
        files.push((model.clone(), out));
    }
    let mut answers = AnswerSet::new();
    for (model, path) in &files {
        answers.add_file(model, path)?;
    }
    let judgments = judge_both(s, &selected, &answers).await?;
    summarize(s, &judgments)
}

/// Pairwise judgments of the candidate against the baseline (both orders) and single grades of the candidate;
/// the two judgment files.
async fn judge_both(
    s: &GateSettings,
    questions: &[crate::format::Question],
    answers: &AnswerSet,
) -> Result<[PathBuf; 2], CliError> {
    let client = ChatClient::new(
        endpoint(&s.judge_url, &s.judge_model, Some(JUDGE_API_KEY_ENV)),
        RetryPolicy::default(),
    )?;
    let inputs = JudgeInputs {
        questions,
        answers,
        references: None,
    };
    let dir = s.out.join("model_judgment");
    let judge = file_safe(&s.judge_model);
    let pair_path = dir.join(format!("{judge}_pair.jsonl"));
    let single_path = dir.join(format!("{judge}_single.jsonl"));
    let mut options = JudgeOptions::new(&s.judge_model, pair_path.clone())?;
    options.progress = progress();
    if let Some(n) = s.judge_max_tokens {
        options.max_tokens = n;
    }
    if let Some(c) = s.concurrency {
        options.concurrency = (c as usize).max(1);
    }
    let pairing = Pairing::Baseline {
        models: vec![s.candidate_model.clone()],
        baseline: s.baseline_model.clone(),
    };
    let stats = judge::judge_pairwise(&client, &inputs, &pairing, &options).await?;
    tracing::info!(
        judged = stats.judged,
        unparseable = stats.verdict_errors,
        "pairwise judged"
    );
    options.output = single_path.clone();
    let stats = judge::judge_single(
        &client,
        &inputs,
        std::slice::from_ref(&s.candidate_model),
        &options,
    )
    .await?;
    tracing::info!(
        judged = stats.judged,
        unparseable = stats.verdict_errors,
        "single graded"
    );
    Ok([pair_path, single_path])
}

/// The report files and the summary.
fn summarize(s: &GateSettings, judgments: &[PathBuf; 2]) -> Result<Summary, CliError> {
    let read = report::read_judgments(judgments)?;
    let categories = report::read_categories(&s.questions)?;
    let built = Report::new(&read, &categories, &Bootstrap::default()).oriented_for(&s.candidate_model);
    eprint!("{}", built.text());
    write(Some(&s.out.join("report.md")), &built.markdown())?;
    write(Some(&s.out.join("report.html")), &built.html())?;
    let mut summary = built.summary(&s.candidate_model, &s.baseline_model, &s.judge_model);
    summary.report = Some("report.html".into());
    write(
        Some(&s.out.join("summary.json")),
        &serde_json::to_string_pretty(&summary).unwrap_or_default(),
    )?;
    Ok(summary)
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
