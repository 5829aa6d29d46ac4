//! The judge step of `camelid eval`: FastChat's `gen_judgment.py`, against any OpenAI-compatible judge.
//!
//! A run plans its matches as FastChat does ([`prompts`] picks the prompt per category and turn), asks the judge
//! for each game with bounded concurrency, reads the verdict ([`verdict`]) and appends the judgment to a file in
//! FastChat's format ([`crate::format::PairJudgment`], [`crate::format::SingleJudgment`]), so FastChat's
//! `show_result.py` and our report read it alike.
//!
//! Where we differ from FastChat, on purpose:
//! - a judgment with contradictory verdicts is an error, not the first one FastChat finds ([`verdict`]);
//! - a judge request that fails after the client's retries fails its match (FastChat records `$ERROR$` as the
//!   judgment and an `error` verdict); the run finishes the others and says which failed, and a rerun resumes them;
//! - a run resumes its output instead of appending duplicates, and refuses to resume one made with other settings
//!   (judge, prompts, answers), which it records next to the output ([`settings`]);
//! - a missing answer or reference is reported and skipped or judged with the general prompt (FastChat asserts).
//!
//! ```no_run
//! # async fn demo(client: camelid_eval::client::ChatClient, questions: Vec<camelid_eval::format::Question>)
//! # -> Result<(), camelid_eval::judge::JudgeError> {
//! use camelid_eval::judge::{AnswerSet, JudgeInputs, JudgeOptions, Pairing, judge_pairwise};
//! let answers = AnswerSet::load_files(&["answers/mine.jsonl".into(), "answers/gpt-3.5-turbo.jsonl".into()])?;
//! let inputs = JudgeInputs { questions: &questions, answers: &answers, references: None };
//! let pairing = Pairing::Baseline { models: vec!["mine".into()], baseline: "gpt-3.5-turbo".into() };
//! let options = JudgeOptions::new("gpt-4", "judgments/gpt-4_pair.jsonl")?;
//! let stats = judge_pairwise(&client, &inputs, &pairing, &options).await?;
//! # Ok(()) }
//! ```

mod inputs;
mod options;
mod plan;
pub mod prompts;
mod run;
pub mod settings;
pub mod verdict;

use std::path::PathBuf;

pub use inputs::{AnswerSet, References};
pub use options::{JudgeInputs, JudgeOptions, JudgeStats, MissingAnswer, Pairing, ReferenceFallback};
pub use prompts::{JudgeMode, JudgePrompt, JudgePrompts, NEED_REF_CATS};
pub use run::{judge_pairwise, judge_single};
pub use settings::JudgeSettings;
pub use verdict::{PairVerdict, VerdictError};

use crate::format::QuestionId;
use crate::jsonl::JsonlError;

/// How many failed matches an error message lists (the error holds them all).
const FAILED_SHOWN: usize = 10;

/// Why a judge run could not start, or did not judge everything.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("the embedded judge prompts, line {line}: {source}")]
    EmbeddedPrompts {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("judge prompts: {0}")]
    PromptFile(#[source] JsonlError),
    #[error("no judge prompt {name:?} in {origin}")]
    MissingPrompt { name: String, origin: String },
    #[error("judge prompt {name}: expected {expected}, found {found}")]
    PromptMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("judge prompt {prompt}: {detail}")]
    Template { prompt: String, detail: String },
    #[error("answers: {0}")]
    Answers(#[source] JsonlError),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answers for model {model:?} (answers loaded for: {})", known.join(", "))]
    UnknownModel { model: String, known: Vec<String> },
    #[error("{}: another answer file already gave the answers of model {model:?}", path.display())]
    DuplicateModel { model: String, path: PathBuf },
    #[error("model {model:?} is paired with itself")]
    InvalidPair { model: String },
    #[error("question {question_id} has no turns")]
    EmptyQuestion { question_id: QuestionId },
    #[error("judgments: {0}")]
    Output(#[source] JsonlError),
    #[error("{}: {source}", path.display())]
    SettingsParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{} holds judgments made with other settings; resume refused. Changed:\n  {}\n\
         Use another output, or start a new file (the old one is kept as .old) with force_new.",
        path.display(),
        changes.join("\n  ")
    )]
    SettingsChanged { path: PathBuf, changes: Vec<String> },
    #[error(
        "{} of {} matches failed (a rerun resumes them; the others are written):\n  {}{}",
        failed.len(),
        stats.planned,
        failed.iter().take(FAILED_SHOWN).cloned().collect::<Vec<_>>().join("\n  "),
        more(failed.len())
    )]
    MatchesFailed {
        /// Each failed match and why.
        failed: Vec<String>,
        /// What the run did otherwise.
        stats: Box<JudgeStats>,
    },
}

/// The tail of a list cut at [`FAILED_SHOWN`].
fn more(n: usize) -> String {
    if n > FAILED_SHOWN {
        format!("\n  ... and {} more", n - FAILED_SHOWN)
    } else {
        String::new()
    }
}

impl JudgeError {
    /// A stable category, for logs and reports.
    pub fn category(&self) -> &'static str {
        match self {
            JudgeError::EmbeddedPrompts { .. }
            | JudgeError::PromptFile(_)
            | JudgeError::MissingPrompt { .. }
            | JudgeError::PromptMismatch { .. } => "prompts",
            JudgeError::Template { .. } => "template",
            JudgeError::Answers(_) => "answers",
            JudgeError::Read { .. } | JudgeError::Write { .. } => "io",
            JudgeError::UnknownModel { .. }
            | JudgeError::DuplicateModel { .. }
            | JudgeError::InvalidPair { .. }
            | JudgeError::EmptyQuestion { .. } => "input",
            JudgeError::Output(_) => "output",
            JudgeError::SettingsParse { .. } => "settings",
            JudgeError::SettingsChanged { .. } => "settings_changed",
            JudgeError::MatchesFailed { .. } => "judge_failed",
        }
    }
}
