//! The answer step: ask a contestant every selected question, as FastChat's `gen_api_answer.py` does, and write
//! its `model_answer` file.
//!
//! Each question is one conversation: turn by turn, the user turn is appended, the endpoint asked, and its reply
//! appended before the next turn, so MT-bench's second turn is answered with the first answer in view. Each
//! finished question is appended to the output and synced at once, so a run killed at any point keeps every
//! finished answer and a rerun asks only the rest; the settings that shape the answers are recorded next to them
//! (`<out>.settings.json`) and a rerun under other settings is refused rather than mixed in. A question whose
//! request fails for good (after the client's retries) is left out and named at the end, and the others still
//! run: FastChat writes `$ERROR$` as the answer instead, which the judge then grades as a real one.

mod output;
mod settings;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::Instrument;

pub use output::{old_path, reorganize, settings_path};
pub use settings::{
    AnswerSettings, DEFAULT_CONCURRENCY, DEFAULT_MAX_TOKENS, Fingerprint, MAX_CONCURRENCY, TemperaturePolicy,
    fastchat_temperature,
};

use crate::client::{ChatClient, ClientError, Message, Sampling};
use crate::format::{Choice, ModelAnswer, Question, QuestionId};
use crate::jsonl::{Appender, JsonlError};

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerStats {
    /// Questions selected.
    pub selected: usize,
    /// Of those, already answered in the output when the run started.
    pub resumed: usize,
    /// Answered and written by this run.
    pub answered: usize,
    /// Left unanswered by this run (their requests failed).
    pub failed: usize,
    /// Chat completions received (one per turn answered).
    pub completions: u64,
    pub elapsed: Duration,
}

/// One question the endpoint would not answer.
#[derive(Debug)]
pub struct QuestionFailure {
    pub question_id: QuestionId,
    pub error: ClientError,
}

/// Why an answer run stopped or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("invalid answer settings: {detail}")]
    InvalidSettings { detail: String },
    #[error("invalid questions: {detail}")]
    InvalidQuestions { detail: String },
    #[error("setting up the client: {source}")]
    Client {
        #[source]
        source: ClientError,
    },
    #[error(
        "{} records other settings than this run's, so its answers are not this run's to resume: {}. \
         Rerun with the old settings, or start over (force_new moves the old answers to .old)",
        sidecar.display(), changes.join(", ")
    )]
    SettingsChanged { sidecar: PathBuf, changes: Vec<String> },
    #[error(
        "{} already holds answers but no record of the settings they were given under ({} is missing); \
         start over (force_new moves them to .old) or choose another output",
        path.display(), settings_path(path).display()
    )]
    UnknownOutput { path: PathBuf },
    #[error("{}: not a settings record: {source}", path.display())]
    SettingsUnreadable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the answer file: {0}")]
    Output(#[source] JsonlError),
    #[error(
        "{} of {} questions got no answer (the others are saved; a rerun asks only these): {}; the first failure: {}",
        failures.len(), stats.selected, failure_ids(failures), failures.first().map(|f| f.error.to_string()).unwrap_or_default()
    )]
    Failed {
        failures: Vec<QuestionFailure>,
        stats: AnswerStats,
    },
}

impl AnswerError {
    /// A stable category, for logs and reports.
    pub fn category(&self) -> &'static str {
        match self {
            AnswerError::InvalidSettings { .. } => "settings",
            AnswerError::InvalidQuestions { .. } => "questions",
            AnswerError::Client { .. } => "client",
            AnswerError::SettingsChanged { .. } => "settings_changed",
            AnswerError::UnknownOutput { .. } => "unknown_output",
            AnswerError::SettingsUnreadable { .. } => "settings_unreadable",
            AnswerError::Io { .. } => "io",
            AnswerError::Output(_) => "output",
            AnswerError::Failed { .. } => "failed_questions",
        }
    }
}

fn failure_ids(failures: &[QuestionFailure]) -> String {
    let ids: Vec<String> = failures.iter().map(|f| f.question_id.to_string()).collect();
    ids.join(", ")
}

/// Answers `questions` (already selected, see [`crate::questions`]) into `out_path`, FastChat's
/// `model_answer/<model>.jsonl`, resuming what an earlier run under the same settings left there, and finally
/// sorting the file by question id. A progress bar goes to stderr when `progress` is set and stderr is a
/// terminal. Returns [`AnswerError::Failed`] when some questions got no answer, after answering all the others.
pub async fn answer(
    settings: &AnswerSettings,
    questions: &[Question],
    out_path: &Path,
    progress: bool,
) -> Result<AnswerStats, AnswerError> {
    let span = tracing::info_span!(
        "answer",
        model_id = settings.model_id(),
        out = %out_path.display(),
        questions = questions.len()
    );
    run(settings, questions, out_path, progress)
        .instrument(span)
        .await
}

async fn run(
    settings: &AnswerSettings,
    questions: &[Question],
    out: &Path,
    progress: bool,
) -> Result<AnswerStats, AnswerError> {
    let started = Instant::now();
    settings
        .validate()
        .map_err(|detail| AnswerError::InvalidSettings { detail })?;
    check_questions(questions)?;
    check_required_temperatures(settings, questions)?;
    let client = ChatClient::new(settings.endpoint.clone(), settings.retry)
        .map_err(|source| AnswerError::Client { source })?;
    output::prepare(out, &settings.fingerprint(), settings.force_new)?;
    let done = answered_already(&output::read_answers(out)?, questions, settings.model_id());
    let todo: Vec<&Question> = questions
        .iter()
        .filter(|q| !done.contains(&q.question_id))
        .collect();
    tracing::info!(resumed = done.len(), to_ask = todo.len(), "answering");
    let mut appender = Appender::open(out).map_err(AnswerError::Output)?;
    let bar = progress_bar(questions.len(), done.len(), progress);
    let completions = AtomicU64::new(0);
    let mut stats = AnswerStats {
        selected: questions.len(),
        resumed: done.len(),
        answered: 0,
        failed: 0,
        completions: 0,
        elapsed: Duration::ZERO,
    };
    let mut failures = Vec::new();
    let mut pending = futures_util::stream::iter(todo)
        .map(|q| {
            let asked = ask(&client, settings, q, &completions);
            async move { (q.question_id.clone(), asked.await) }
        })
        .buffer_unordered(settings.concurrency);
    while let Some((question_id, result)) = pending.next().await {
        match result {
            Ok(answer) => {
                appender.append(&answer).map_err(AnswerError::Output)?;
                stats.answered += 1;
            }
            Err(error) => {
                tracing::error!(%question_id, category = error.category(), %error, "no answer");
                failures.push(QuestionFailure { question_id, error });
            }
        }
        bar.inc(1);
    }
    drop(pending);
    drop(appender);
    bar.finish_and_clear();
    output::reorganize(out).map_err(AnswerError::Output)?;
    stats.failed = failures.len();
    stats.completions = completions.load(Ordering::Relaxed);
    stats.elapsed = started.elapsed();
    tracing::info!(
        answered = stats.answered,
        failed = stats.failed,
        elapsed_s = stats.elapsed.as_secs_f64(),
        "answers written"
    );
    if failures.is_empty() {
        Ok(stats)
    } else {
        failures.sort_by(|a, b| a.question_id.cmp(&b.question_id));
        Err(AnswerError::Failed { failures, stats })
    }
}

/// FastChat refuses a fixed temperature over questions that require their own; so do we, naming the first.
fn check_required_temperatures(settings: &AnswerSettings, questions: &[Question]) -> Result<(), AnswerError> {
    let fixed = matches!(settings.temperature, TemperaturePolicy::Fixed(_));
    match questions.iter().find(|q| q.required_temperature.is_some()) {
        Some(q) if fixed => Err(AnswerError::InvalidSettings {
            detail: format!(
                "question {} requires temperature {} (`required_temperature`); leave --temperature unset",
                q.question_id,
                q.required_temperature.unwrap_or_default()
            ),
        }),
        Some(q)
            if !q
                .required_temperature
                .is_some_and(|t| t.is_finite() && (0.0..=2.0).contains(&t)) =>
        {
            Err(AnswerError::InvalidQuestions {
                detail: format!(
                    "question {}: required_temperature is outside 0..=2",
                    q.question_id
                ),
            })
        }
        _ => Ok(()),
    }
}

/// One question's conversation: each turn asked with every earlier turn and answer before it.
async fn ask(
    client: &ChatClient,
    settings: &AnswerSettings,
    question: &Question,
    completions: &AtomicU64,
) -> Result<ModelAnswer, ClientError> {
    let sampling = Sampling {
        temperature: question
            .required_temperature
            .unwrap_or_else(|| settings.temperature.for_category(&question.category)),
        max_tokens: settings.max_tokens,
        seed: settings.question_seed(&question.question_id),
    };
    let mut messages = Vec::with_capacity(1 + 2 * question.turns.len());
    if let Some(system) = &settings.system_prompt {
        messages.push(Message::system(system.clone()));
    }
    let mut turns = Vec::with_capacity(question.turns.len());
    for (n, turn) in question.turns.iter().enumerate() {
        messages.push(Message::user(turn.clone()));
        let reply = client
            .complete(&messages, sampling)
            .instrument(tracing::debug_span!("turn", question_id = %question.question_id, turn = n + 1))
            .await?;
        completions.fetch_add(1, Ordering::Relaxed);
        messages.push(Message::assistant(reply.clone()));
        turns.push(reply);
    }
    Ok(ModelAnswer {
        question_id: question.question_id.clone(),
        answer_id: settings.answer_id(&question.question_id),
        model_id: settings.model_id().to_string(),
        choices: vec![Choice { index: 0, turns }],
        tstamp: unix_now(),
    })
}

/// The selected questions already answered in full by this model: an answer under another `model_id`, or with
/// fewer turns than its question (not one this code writes, but a hand-edited file may hold it), is asked again,
/// and the sort at the end keeps the new one.
fn answered_already(existing: &[ModelAnswer], questions: &[Question], model_id: &str) -> HashSet<QuestionId> {
    let turns: std::collections::HashMap<&QuestionId, usize> = questions
        .iter()
        .map(|q| (&q.question_id, q.turns.len()))
        .collect();
    existing
        .iter()
        .filter(|a| a.model_id == model_id)
        .filter(|a| {
            let wanted = turns.get(&a.question_id);
            wanted.is_some_and(|&n| a.choices.first().is_some_and(|c| c.turns.len() == n))
        })
        .map(|a| a.question_id.clone())
        .collect()
}

/// Questions handed in directly (not through [`crate::questions::read`]) are checked for what would break the
/// run's bookkeeping: a repeated id, or a question with no turns.
fn check_questions(questions: &[Question]) -> Result<(), AnswerError> {
    let mut seen = HashSet::with_capacity(questions.len());
    for q in questions {
        if q.turns.is_empty() {
            return Err(AnswerError::InvalidQuestions {
                detail: format!("question {} has no turns", q.question_id),
            });
        }
        if !seen.insert(&q.question_id) {
            return Err(AnswerError::InvalidQuestions {
                detail: format!("question id {} is repeated", q.question_id),
            });
        }
    }
    Ok(())
}

fn progress_bar(total: usize, done: usize, visible: bool) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total as u64), target);
    if let Ok(style) =
        ProgressStyle::with_template("answering {bar:40} {pos}/{len} [{elapsed_precise}, eta {eta}]")
    {
        bar.set_style(style);
    }
    bar.set_position(done as u64);
    bar
}

/// Seconds since the Unix epoch, as FastChat's `time.time()`.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn question(id: i64, turns: usize) -> Question {
        Question {
            question_id: QuestionId::Number(id),
            category: "writing".into(),
            turns: (0..turns).map(|t| format!("q{id}t{t}")).collect(),
            reference: None,
            required_temperature: None,
        }
    }

    #[test]
    fn a_required_temperature_is_refused_under_a_fixed_one_and_must_be_sane() {
        let file = crate::questions::QuestionFile {
            path: "q.jsonl".into(),
            sha256: String::new(),
            questions: Vec::new(),
        };
        let endpoint = crate::client::Endpoint {
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key: None,
        };
        let mut settings = AnswerSettings::new(endpoint, &file, crate::questions::Selection::ALL);
        let mut hot = question(7, 1);
        hot.required_temperature = Some(0.3);
        assert!(check_required_temperatures(&settings, std::slice::from_ref(&hot)).is_ok());
        settings.temperature = TemperaturePolicy::Fixed(0.0);
        let err = check_required_temperatures(&settings, std::slice::from_ref(&hot)).unwrap_err();
        assert!(
            err.to_string().contains("question 7 requires temperature 0.3"),
            "{err}"
        );
        settings.temperature = TemperaturePolicy::ByCategory;
        hot.required_temperature = Some(f32::NAN);
        assert!(check_required_temperatures(&settings, &[hot]).is_err());
    }

    fn answer(id: i64, model: &str, turns: usize) -> ModelAnswer {
        ModelAnswer {
            question_id: QuestionId::Number(id),
            answer_id: String::new(),
            model_id: model.into(),
            choices: vec![Choice {
                index: 0,
                turns: vec!["a".into(); turns],
            }],
            tstamp: 0.0,
        }
    }

    #[test]
    fn only_complete_answers_by_this_model_count_as_done() {
        let qs = [question(1, 2), question(2, 2), question(3, 2), question(4, 1)];
        let existing = [
            answer(1, "m", 2),
            answer(2, "m", 1),
            answer(3, "other", 2),
            answer(4, "m", 1),
            answer(9, "m", 1),
        ];
        let done = answered_already(&existing, &qs, "m");
        let mut ids: Vec<_> = done.iter().map(|i| i.to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["1", "4"]);
    }

    #[test]
    fn repeated_or_empty_questions_are_refused() {
        assert!(check_questions(&[question(1, 1), question(2, 2)]).is_ok());
        let err = check_questions(&[question(1, 1), question(1, 2)]).unwrap_err();
        assert!(err.to_string().contains("id 1 is repeated"), "{err}");
        assert_eq!(
            check_questions(&[question(1, 0)]).unwrap_err().category(),
            "questions"
        );
    }

    #[test]
    fn the_failure_lists_every_question() {
        let failure = |id| QuestionFailure {
            question_id: QuestionId::Number(id),
            error: ClientError::Status {
                url: "u".into(),
                status: 400,
                message: "too long".into(),
            },
        };
        let stats = AnswerStats {
            selected: 5,
            resumed: 0,
            answered: 3,
            failed: 2,
            completions: 3,
            elapsed: Duration::ZERO,
        };
        let err = AnswerError::Failed {
            failures: vec![failure(2), failure(4)],
            stats,
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("2 of 5 questions") && msg.contains(": 2, 4;") && msg.contains("too long"),
            "{msg}"
        );
    }
}
