//! The question file (FastChat's `question.jsonl`), read and checked before a single request is sent: a file a
//! run is about to spend hours of endpoint time on should fail on its first bad line, named by file and line,
//! not on question 57 of 80. Then the slice of it a run asks, the way FastChat's `--question-begin` /
//! `--question-end` take one, and optionally only its first N.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::{Question, QuestionId};
use crate::jsonl::{self, JsonlError};

/// The most turns one question may have: MT-bench has 2; a file with more than this is not a benchmark.
pub const MAX_TURNS: usize = 16;

/// The longest turn, in bytes: the longest in FastChat's sets is a few KiB; a longer one is a mistake or an attack
/// on the endpoint's context window, better refused here than answered with a 400 on every try.
pub const MAX_TURN_BYTES: usize = 64 * 1024;

/// Why a question file was refused.
#[derive(Debug, thiserror::Error)]
pub enum QuestionsError {
    /// The file could not be read, or a line is not a question (the message names file:line).
    #[error("reading the questions: {source}")]
    Read {
        #[source]
        source: JsonlError,
    },
    #[error("{}: no questions in the file", path.display())]
    NoQuestions { path: PathBuf },
    #[error("{}:{line}: question {id}: field `turns` is empty", path.display())]
    EmptyTurns {
        path: PathBuf,
        line: usize,
        id: QuestionId,
    },
    #[error("{}:{line}: field `question_id`: {id} is already the id of the question on line {first_line}", path.display())]
    DuplicateId {
        path: PathBuf,
        line: usize,
        id: QuestionId,
        first_line: usize,
    },
    #[error("{}:{line}: question {id}: field `turns` has {count} entries, more than the {MAX_TURNS} allowed", path.display())]
    TooManyTurns {
        path: PathBuf,
        line: usize,
        id: QuestionId,
        count: usize,
    },
    #[error("{}:{line}: question {id}: field `turns[{index}]` is {bytes} bytes, more than the {MAX_TURN_BYTES} allowed", path.display())]
    TurnTooLong {
        path: PathBuf,
        line: usize,
        id: QuestionId,
        index: usize,
        bytes: usize,
    },
    #[error("{}:{line}: question {id}: field `reference` has {references} entries but `turns` has {turns}; give one reference per turn", path.display())]
    ReferenceMismatch {
        path: PathBuf,
        line: usize,
        id: QuestionId,
        references: usize,
        turns: usize,
    },
    #[error("{}: the selection {selection} leaves none of its {available} questions", path.display())]
    EmptySelection {
        path: PathBuf,
        selection: Selection,
        available: usize,
    },
}

impl QuestionsError {
    /// A stable category, for logs and reports.
    pub fn category(&self) -> &'static str {
        match self {
            QuestionsError::Read {
                source: JsonlError::Io { .. },
            } => "io",
            QuestionsError::Read { .. } => "parse",
            QuestionsError::NoQuestions { .. } | QuestionsError::EmptySelection { .. } => "empty",
            QuestionsError::EmptyTurns { .. }
            | QuestionsError::DuplicateId { .. }
            | QuestionsError::TooManyTurns { .. }
            | QuestionsError::TurnTooLong { .. }
            | QuestionsError::ReferenceMismatch { .. } => "invalid",
        }
    }
}

/// Which of a file's questions a run asks: FastChat's `questions[begin:end]` (both optional, `end` past the last
/// meaning the last), then at most the first `max_questions` of those. Recorded with the answers, so a resumed
/// run asks the same questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Selection {
    pub begin: Option<usize>,
    pub end: Option<usize>,
    pub max_questions: Option<usize>,
}

impl Selection {
    /// Every question.
    pub const ALL: Selection = Selection {
        begin: None,
        end: None,
        max_questions: None,
    };

    /// The selected questions, in file order.
    pub fn apply<'a>(&self, questions: &'a [Question]) -> &'a [Question] {
        let len = questions.len();
        let end = self.end.unwrap_or(len).min(len);
        let begin = self.begin.unwrap_or(0).min(end);
        let slice = &questions[begin..end];
        let take = self.max_questions.unwrap_or(slice.len()).min(slice.len());
        &slice[..take]
    }
}

impl fmt::Display for Selection {
    /// `[begin:end]` as Python writes a slice, then `first N` when capped: `[10:20] first 5`, or `all`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = |b: Option<usize>| b.map(|n| n.to_string()).unwrap_or_default();
        match (self.begin, self.end, self.max_questions) {
            (None, None, None) => f.write_str("all"),
            (None, None, Some(n)) => write!(f, "first {n}"),
            (b, e, n) => {
                write!(f, "[{}:{}]", bound(b), bound(e))?;
                match n {
                    Some(n) => write!(f, " first {n}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A checked question file: every question in file order, and the hash of its bytes (recorded with the answers,
/// so answers to an edited file are never mixed with answers to the old one).
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionFile {
    pub path: PathBuf,
    /// The lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    pub questions: Vec<Question>,
}

impl QuestionFile {
    /// The questions `selection` picks, refusing a selection that picks none (a typo in `--question-begin`, not a
    /// run worth starting).
    pub fn select(&self, selection: &Selection) -> Result<Vec<Question>, QuestionsError> {
        let picked = selection.apply(&self.questions);
        if picked.is_empty() {
            return Err(QuestionsError::EmptySelection {
                path: self.path.clone(),
                selection: *selection,
                available: self.questions.len(),
            });
        }
        Ok(picked.to_vec())
    }
}

/// Reads and checks a question file. Every line must be a question (a torn last line is an error here: a
/// question file is an input, never half-written by us).
pub fn read(path: &Path) -> Result<QuestionFile, QuestionsError> {
    let bytes = std::fs::read(path).map_err(|source| QuestionsError::Read {
        source: JsonlError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let lines = jsonl::read::<Question>(path, false).map_err(|source| QuestionsError::Read { source })?;
    if lines.is_empty() {
        return Err(QuestionsError::NoQuestions {
            path: path.to_path_buf(),
        });
    }
    let mut first_line: HashMap<&QuestionId, usize> = HashMap::with_capacity(lines.len());
    for l in &lines {
        check(path, l.line, &l.record)?;
        if let Some(&first) = first_line.get(&l.record.question_id) {
            return Err(QuestionsError::DuplicateId {
                path: path.to_path_buf(),
                line: l.line,
                id: l.record.question_id.clone(),
                first_line: first,
            });
        }
        first_line.insert(&l.record.question_id, l.line);
    }
    Ok(QuestionFile {
        path: path.to_path_buf(),
        sha256: hex_sha256(&bytes),
        questions: lines.into_iter().map(|l| l.record).collect(),
    })
}

/// One question's own checks: turns present, not too many, none too long, one reference per turn.
fn check(path: &Path, line: usize, q: &Question) -> Result<(), QuestionsError> {
    let at = || (path.to_path_buf(), line, q.question_id.clone());
    if q.turns.is_empty() {
        let (path, line, id) = at();
        return Err(QuestionsError::EmptyTurns { path, line, id });
    }
    if q.turns.len() > MAX_TURNS {
        let (path, line, id) = at();
        let count = q.turns.len();
        return Err(QuestionsError::TooManyTurns {
            path,
            line,
            id,
            count,
        });
    }
    if let Some((index, turn)) = q.turns.iter().enumerate().find(|(_, t)| t.len() > MAX_TURN_BYTES) {
        let (path, line, id) = at();
        let bytes = turn.len();
        return Err(QuestionsError::TurnTooLong {
            path,
            line,
            id,
            index,
            bytes,
        });
    }
    if let Some(reference) = &q.reference
        && reference.len() != q.turns.len()
    {
        let (path, line, id) = at();
        let (references, turns) = (reference.len(), q.turns.len());
        return Err(QuestionsError::ReferenceMismatch {
            path,
            line,
            id,
            references,
            turns,
        });
    }
    Ok(())
}

/// The lowercase hex sha256 of `bytes`.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn q(id: i64) -> Question {
        Question {
            question_id: QuestionId::Number(id),
            category: "writing".into(),
            turns: vec!["hi".into()],
            reference: None,
            required_temperature: None,
        }
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("camelid-questions-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("question.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ids(qs: &[Question]) -> Vec<String> {
        qs.iter().map(|q| q.question_id.to_string()).collect()
    }

    #[test]
    fn selection_slices_like_python_then_caps() {
        let all: Vec<_> = (1..=10).map(q).collect();
        let sel = |begin, end, max_questions| Selection {
            begin,
            end,
            max_questions,
        };
        assert_eq!(ids(sel(None, None, None).apply(&all)).len(), 10);
        assert_eq!(ids(sel(Some(2), Some(5), None).apply(&all)), ["3", "4", "5"]);
        assert_eq!(ids(sel(Some(8), Some(100), None).apply(&all)), ["9", "10"]);
        assert_eq!(ids(sel(Some(2), None, Some(2)).apply(&all)), ["3", "4"]);
        assert_eq!(ids(sel(None, None, Some(50)).apply(&all)).len(), 10);
        assert!(sel(Some(7), Some(3), None).apply(&all).is_empty());
        assert!(sel(Some(70), None, None).apply(&all).is_empty());
        assert_eq!(sel(Some(10), None, Some(5)).to_string(), "[10:] first 5");
        assert_eq!(Selection::ALL.to_string(), "all");
    }

    #[test]
    fn fastchat_question_files_read_whole() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fastchat");
        for (name, count, turns) in [
            ("mt_bench_question.jsonl", 80, 2),
            ("vicuna_bench_question.jsonl", 80, 1),
        ] {
            let path = shared.join(name);
            if !path.exists() {
                continue;
            }
            let f = read(&path).unwrap();
            assert_eq!(f.questions.len(), count, "{name}");
            assert!(f.questions.iter().all(|q| q.turns.len() == turns), "{name}");
            assert_eq!(f.sha256.len(), 64);
        }
    }

    #[test]
    fn each_hostile_question_is_named_by_line_and_field() {
        let long = "x".repeat(MAX_TURN_BYTES + 1);
        let many: Vec<String> = (0..=MAX_TURNS).map(|i| i.to_string()).collect();
        let cases = [
            (
                "empty",
                r#"{"question_id": 1, "turns": []}"#.to_string(),
                "`turns` is empty",
            ),
            (
                "many",
                serde_json::json!({"question_id": 1, "turns": many}).to_string(),
                "more than the 16",
            ),
            (
                "long",
                serde_json::json!({"question_id": 1, "turns": ["a", long]}).to_string(),
                "`turns[1]`",
            ),
            (
                "ref",
                r#"{"question_id": 1, "turns": ["a", "b"], "reference": ["r"]}"#.to_string(),
                "`reference` has 1 entries but `turns` has 2",
            ),
        ];
        for (name, bad, needle) in cases {
            let path = file(
                name,
                &format!("{{\"question_id\": 0, \"turns\": [\"ok\"]}}\n{bad}\n"),
            );
            let err = read(&path).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("question.jsonl:2:"), "{name}: {msg}");
            assert!(msg.contains(needle), "{name}: {msg}");
            assert_eq!(err.category(), "invalid");
        }
        let path = file(
            "dup",
            "{\"question_id\": 7, \"turns\": [\"a\"]}\n\n{\"question_id\": 7, \"turns\": [\"b\"]}\n",
        );
        let msg = read(&path).unwrap_err().to_string();
        assert!(
            msg.contains("question.jsonl:3:") && msg.contains("`question_id`") && msg.contains("line 1"),
            "{msg}"
        );
        let path = file("blank", "\n\n");
        assert_eq!(read(&path).unwrap_err().category(), "empty");
    }

    #[test]
    fn an_empty_selection_is_refused() {
        let path = file("sel", "{\"question_id\": 1, \"turns\": [\"a\"]}\n");
        let f = read(&path).unwrap();
        let sel = Selection {
            begin: Some(5),
            ..Selection::ALL
        };
        assert_eq!(f.select(&sel).unwrap_err().category(), "empty");
        assert_eq!(f.select(&Selection::ALL).unwrap().len(), 1);
    }
}
