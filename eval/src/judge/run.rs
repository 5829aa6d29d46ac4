//! Running the judge: plan the matches, skip those already in the output, ask the judge for the rest with bounded
//! concurrency, append each finished match durably, and rewrite the file in a fixed order at the end.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::JudgeError;
use super::options::{JudgeInputs, JudgeOptions, JudgeStats, Pairing};
use super::plan::{self, Key, Planned};
use super::prompts::JudgeMode;
use super::settings::{self, JudgeSettings};
use super::verdict::{self, Game};
use crate::client::{ChatClient, ClientError, Message, Sampling};
use crate::format::{PairJudgment, SingleJudgment, Winner};
use crate::jsonl;

/// Judges `pairing`'s pairs on every question: two games per match and turn, game 1 with `model_1` as assistant
/// A, game 2 swapped, each judgment a [`PairJudgment`] line of `options.output`. Resumes a partial output.
///
/// Errors: bad inputs or settings before any request; [`JudgeError::MatchesFailed`] after the run when judge
/// requests failed (every other match is written).
pub async fn judge_pairwise(
    client: &ChatClient,
    inputs: &JudgeInputs<'_>,
    pairing: &Pairing,
    options: &JudgeOptions,
) -> Result<JudgeStats, JudgeError> {
    let contestants: Vec<Vec<String>> = pairing.pairs()?.into_iter().map(|(a, b)| vec![a, b]).collect();
    run::<PairJudgment>(client, inputs, JudgeMode::Pairwise, &contestants, options).await
}

/// Grades each of `models`' answers to every question 1 to 10, one [`SingleJudgment`] line per (question, model,
/// turn) of `options.output`. Resumes a partial output.
pub async fn judge_single(
    client: &ChatClient,
    inputs: &JudgeInputs<'_>,
    models: &[String],
    options: &JudgeOptions,
) -> Result<JudgeStats, JudgeError> {
    let mut contestants: Vec<Vec<String>> = Vec::new();
    for m in models {
        if !contestants.iter().any(|c| c.first() == Some(m)) {
            contestants.push(vec![m.clone()]);
        }
    }
    run::<SingleJudgment>(client, inputs, JudgeMode::Single, &contestants, options).await
}

/// A line of a judgment file.
trait Record: Serialize + DeserializeOwned {
    fn key(&self) -> Key;
    /// The record of a finished match, and how many of its games gave no verdict.
    fn build(planned: Planned, judgments: Vec<String>, tstamp: f64) -> (Self, usize);
}

impl Record for PairJudgment {
    fn key(&self) -> Key {
        Key {
            question_id: self.question_id.clone(),
            model_1: self.model_1.clone(),
            model_2: self.model_2.clone(),
            turn: self.turn,
            judge: self.judge.clone(),
        }
    }

    fn build(planned: Planned, judgments: Vec<String>, tstamp: f64) -> (Self, usize) {
        let Planned {
            key, user_prompts, ..
        } = planned;
        let mut prompts = user_prompts.into_iter();
        let mut judgments = judgments.into_iter();
        let (g1_user_prompt, g2_user_prompt) = (
            prompts.next().unwrap_or_default(),
            prompts.next().unwrap_or_default(),
        );
        let (g1_judgment, g2_judgment) = (
            judgments.next().unwrap_or_default(),
            judgments.next().unwrap_or_default(),
        );
        let g1_winner = verdict::game_winner(&g1_judgment, Game::G1);
        let g2_winner = verdict::game_winner(&g2_judgment, Game::G2);
        let errors = [g1_winner, g2_winner]
            .iter()
            .filter(|w| **w == Winner::Error)
            .count();
        let record = PairJudgment {
            question_id: key.question_id,
            model_1: key.model_1,
            model_2: key.model_2,
            g1_winner,
            g2_winner,
            judge: key.judge,
            g1_user_prompt,
            g1_judgment,
            g2_user_prompt,
            g2_judgment,
            turn: key.turn,
            tstamp,
        };
        (record, errors)
    }
}

impl Record for SingleJudgment {
    fn key(&self) -> Key {
        Key {
            question_id: self.question_id.clone(),
            model_1: self.model.clone(),
            model_2: String::new(),
            turn: self.turn,
            judge: self.judge.clone(),
        }
    }

    fn build(planned: Planned, judgments: Vec<String>, tstamp: f64) -> (Self, usize) {
        let Planned {
            key, user_prompts, ..
        } = planned;
        let judgment = judgments.into_iter().next().unwrap_or_default();
        let score = verdict::score(&judgment);
        let record = SingleJudgment {
            question_id: key.question_id,
            model: key.model_1,
            judge: key.judge,
            user_prompt: user_prompts.into_iter().next().unwrap_or_default(),
            judgment,
            score,
            turn: key.turn,
            tstamp,
        };
        (record, usize::from(score == verdict::ERROR_SCORE))
    }
}

/// The run both modes share.
async fn run<R: Record>(
    client: &ChatClient,
    inputs: &JudgeInputs<'_>,
    mode: JudgeMode,
    contestants: &[Vec<String>],
    options: &JudgeOptions,
) -> Result<JudgeStats, JudgeError> {
    let prompts = options.prompts.for_mode(mode)?;
    let mut models: Vec<&String> = contestants.iter().flatten().collect();
    models.sort();
    models.dedup();
    for m in &models {
        if !inputs.answers.contains(m) {
            return Err(JudgeError::UnknownModel {
                model: m.to_string(),
                known: inputs.answers.models().map(str::to_string).collect(),
            });
        }
    }
    let plan = plan::plan(mode, inputs, contestants, &prompts, &options.judge_name)?;
    let mut stats = JudgeStats {
        planned: plan.matches.len(),
        missing_answers: plan.missing_answers.into_iter().collect(),
        reference_fallbacks: plan.reference_fallbacks.into_iter().collect(),
        ..JudgeStats::default()
    };
    for m in &stats.missing_answers {
        tracing::warn!(model = %m.model, question = %m.question_id, turn = m.turn, "no answer to judge; skipped");
    }
    for f in &stats.reference_fallbacks {
        tracing::warn!(question = %f.question_id, category = %f.category, turn = f.turn, "no reference answer; judged with the general prompt");
    }

    let current = JudgeSettings {
        mode: mode.as_str().to_string(),
        judge_model: options.judge_name.clone(),
        judge_url: client.endpoint().base_url.clone(),
        judge_endpoint_model: client.endpoint().model.clone(),
        temperature: options.temperature,
        max_tokens: options.max_tokens,
        prompts: prompts.iter().map(|(n, p)| (n.to_string(), p.sha256())).collect(),
        answers: models
            .iter()
            .map(|m| {
                (
                    m.to_string(),
                    inputs.answers.sha256(m).unwrap_or_default().to_string(),
                )
            })
            .collect(),
        references: inputs.references.map(|r| r.sha256().to_string()),
    };
    let output = options.output.as_path();
    settings::reconcile(output, &current, options.force_new)?;

    // The judgments already made; a later line for the same match replaces an earlier one, as FastChat reads them.
    let mut done: BTreeMap<Key, R> = BTreeMap::new();
    if output.exists() {
        for line in jsonl::read::<R>(output, true).map_err(JudgeError::Output)? {
            done.insert(line.record.key(), line.record);
        }
    }
    let todo: Vec<Planned> = plan
        .matches
        .into_iter()
        .filter(|p| !done.contains_key(&p.key))
        .collect();
    stats.skipped = stats.planned - todo.len();
    tracing::info!(mode = mode.as_str(), planned = stats.planned, skipped = stats.skipped, to_judge = todo.len(), output = %output.display(), "judging");

    let bar = progress_bar(options.progress, todo.len());
    let mut appender = jsonl::Appender::open(output).map_err(JudgeError::Output)?;
    let sampling = Sampling {
        temperature: options.temperature,
        max_tokens: options.max_tokens,
        seed: None,
    };
    let mut failed = Vec::new();
    let mut games = futures_util::stream::iter(todo.into_iter().map(|p| play(client, p, sampling)))
        .buffer_unordered(options.concurrency.max(1));
    while let Some((planned, result)) = games.next().await {
        bar.inc(1);
        let key = planned.key.clone();
        match result {
            Ok(judgments) => {
                let (record, errors) = R::build(planned, judgments, now());
                appender.append(&record).map_err(JudgeError::Output)?;
                if errors > 0 {
                    tracing::warn!(%key, games = errors, "the judge gave no usable verdict; recorded as an error");
                }
                stats.judged += 1;
                stats.verdict_errors += errors;
                done.insert(key, record);
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, category = e.category(), "judge request failed");
                failed.push(format!("{key}: {e}"));
            }
        }
    }
    drop(games);
    bar.finish_and_clear();
    drop(appender);

    let records: Vec<R> = done.into_values().collect();
    jsonl::write_all(output, &records).map_err(JudgeError::Output)?;
    stats.failed = failed.len();
    tracing::info!(
        judged = stats.judged,
        skipped = stats.skipped,
        failed = stats.failed,
        verdict_errors = stats.verdict_errors,
        "judging done"
    );
    if failed.is_empty() {
        Ok(stats)
    } else {
        Err(JudgeError::MatchesFailed {
            failed,
            stats: Box::new(stats),
        })
    }
}

/// Plays one match's games in order, stopping at the first failed request.
async fn play(
    client: &ChatClient,
    planned: Planned,
    sampling: Sampling,
) -> (Planned, Result<Vec<String>, ClientError>) {
    let mut judgments = Vec::with_capacity(planned.user_prompts.len());
    for user in &planned.user_prompts {
        // FastChat's OpenAI conversation: the system message only when there is one.
        let mut messages = Vec::with_capacity(2);
        if !planned.system_prompt.is_empty() {
            messages.push(Message::system(planned.system_prompt.clone()));
        }
        messages.push(Message::user(user.clone()));
        match client.complete(&messages, sampling).await {
            Ok(text) => judgments.push(text),
            Err(e) => return (planned, Err(e)),
        }
    }
    (planned, Ok(judgments))
}

/// A bar on stderr, or one that draws nothing.
fn progress_bar(show: bool, len: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("judging {bar:40} {pos}/{len} [{elapsed_precise} eta {eta}]")
    {
        bar.set_style(style);
    }
    bar
}

/// Seconds since the Unix epoch, FastChat's `time.time()`.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
