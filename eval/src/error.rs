//! What a `camelid eval` command can fail with, and its exit code: 2 for input the user must fix (a bad flag,
//! question file or changed settings), 1 for everything else (a server that stayed down, a disk that failed).

use std::path::PathBuf;

use crate::answer::AnswerError;
use crate::client::ClientError;
use crate::judge::JudgeError;
use crate::questions::QuestionsError;
use crate::report::ReportError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Questions(#[from] QuestionsError),
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error(transparent)]
    Judge(#[from] JudgeError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl CliError {
    /// The process exit code (`camelid_contracts::exit`).
    pub fn exit_code(&self) -> u8 {
        use camelid_contracts::exit;
        let invalid = match self {
            CliError::Usage(_) | CliError::Questions(_) => true,
            CliError::Answer(e) => matches!(
                e.category(),
                "settings" | "questions" | "settings_changed" | "unknown_output" | "settings_unreadable"
            ),
            CliError::Judge(e) => matches!(
                e.category(),
                "input" | "settings_changed" | "settings" | "template" | "prompts" | "answers"
            ),
            CliError::Report(_) => true,
            _ => false,
        };
        (if invalid { exit::INVALID } else { exit::FAILED }) as u8
    }
}
