//! What the judge reads besides the questions: the contestants' answers and the reference answers, each with a
//! digest of where it came from, so a judgment file's settings say which answers it judged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::JudgeError;
use super::prompts::hex;
use crate::format::{ModelAnswer, Question, QuestionId};
use crate::jsonl;

/// One model's answers by question.
#[derive(Debug, Clone, Default)]
struct ModelAnswers {
    by_question: HashMap<QuestionId, ModelAnswer>,
    sha256: String,
}

/// The contestants' answers, by model and question (FastChat's `load_model_answers`).
#[derive(Debug, Clone, Default)]
pub struct AnswerSet {
    models: BTreeMap<String, ModelAnswers>,
}

impl AnswerSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads `model_answer/<model>.jsonl` files, each model named by its file's stem as FastChat names them (not by
    /// the records' `model_id`, which is often a path or a served name). Two files of the same stem are an error:
    /// one model's answers would silently replace the other's.
    pub fn load_files(paths: &[PathBuf]) -> Result<Self, JudgeError> {
        let mut set = Self::new();
        for path in paths {
            let model = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if set.contains(&model) {
                return Err(JudgeError::DuplicateModel {
                    model,
                    path: path.clone(),
                });
            }
            set.add_file(&model, path)?;
        }
        Ok(set)
    }

    /// Loads one model's answer file under the name `model`. A file still being written (a torn last line) is read
    /// up to its last whole answer; a later answer to the same question replaces an earlier one, as in FastChat.
    pub fn add_file(&mut self, model: &str, path: &Path) -> Result<(), JudgeError> {
        let bytes = std::fs::read(path).map_err(|source| JudgeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let lines = jsonl::read::<ModelAnswer>(path, true).map_err(JudgeError::Answers)?;
        self.models.insert(
            model.to_string(),
            ModelAnswers {
                by_question: lines
                    .into_iter()
                    .map(|l| (l.record.question_id.clone(), l.record))
                    .collect(),
                sha256: hex(&Sha256::digest(&bytes)),
            },
        );
        Ok(())
    }

    /// Adds answers held in memory under the name `model`; their digest is that of the JSON Lines they would be.
    pub fn insert(&mut self, model: &str, answers: Vec<ModelAnswer>) {
        let mut h = Sha256::new();
        for a in &answers {
            h.update(serde_json::to_vec(a).unwrap_or_default());
            h.update(b"\n");
        }
        self.models.insert(
            model.to_string(),
            ModelAnswers {
                by_question: answers.into_iter().map(|a| (a.question_id.clone(), a)).collect(),
                sha256: hex(&h.finalize()),
            },
        );
    }

    /// The models, in name order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Whether `model` has an answer file at all.
    pub fn contains(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// `model`'s answer to `question`.
    pub fn get(&self, model: &str, question: &QuestionId) -> Option<&ModelAnswer> {
        self.models.get(model)?.by_question.get(question)
    }

    /// The turns of `model`'s answer to `question` (FastChat reads `choices[0]`).
    pub fn turns(&self, model: &str, question: &QuestionId) -> Option<&[String]> {
        self.get(model, question)?
            .choices
            .first()
            .map(|c| c.turns.as_slice())
    }

    /// The digest of `model`'s answers as loaded.
    pub fn sha256(&self, model: &str) -> Option<&str> {
        self.models.get(model).map(|m| m.sha256.as_str())
    }
}

/// Reference answers from a file in FastChat's answer format (`reference_answer/gpt-4.jsonl`), by question.
#[derive(Debug, Clone, Default)]
pub struct References {
    by_question: HashMap<QuestionId, Vec<String>>,
    sha256: String,
}

impl References {
    /// Loads a reference answer file.
    pub fn load(path: &Path) -> Result<Self, JudgeError> {
        let mut set = AnswerSet::new();
        set.add_file("reference", path)?;
        let Some(m) = set.models.remove("reference") else {
            return Ok(Self::default());
        };
        Ok(Self::from_answers(m.by_question.into_values(), m.sha256))
    }

    fn from_answers(answers: impl IntoIterator<Item = ModelAnswer>, sha256: String) -> Self {
        let by_question = answers
            .into_iter()
            .filter_map(|a| Some((a.question_id, a.choices.into_iter().next()?.turns)))
            .collect();
        Self { by_question, sha256 }
    }

    /// The reference's turns for `question`.
    pub fn get(&self, question: &QuestionId) -> Option<&[String]> {
        self.by_question.get(question).map(Vec::as_slice)
    }

    /// The digest of the file as loaded.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The reference for `question`'s `turn`: the file's when the caller gave one and it covers the turn (what FastChat
/// uses), else the question's own `reference` field; `None` when neither has the turn's text. Both references of a
/// turn-2 prompt come from the same source.
pub(crate) fn reference_for<'a>(
    question: &'a Question,
    references: Option<&'a References>,
    turn: u32,
) -> Option<&'a [String]> {
    let covers = |r: &&[String]| r.len() >= turn as usize;
    let from_file = references
        .and_then(|r| r.get(&question.question_id))
        .filter(covers);
    from_file.or_else(|| question.reference.as_deref().filter(covers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Choice;

    fn answer(q: i64, turns: &[&str]) -> ModelAnswer {
        ModelAnswer {
            question_id: QuestionId::Number(q),
            answer_id: String::new(),
            model_id: "m".into(),
            choices: vec![Choice {
                index: 0,
                turns: turns.iter().map(|t| t.to_string()).collect(),
            }],
            tstamp: 0.0,
        }
    }

    fn question(reference: Option<&[&str]>) -> Question {
        Question {
            question_id: QuestionId::Number(1),
            category: "math".into(),
            turns: vec!["q1".into(), "q2".into()],
            reference: reference.map(|r| r.iter().map(|t| t.to_string()).collect()),
            required_temperature: None,
        }
    }

    #[test]
    fn the_reference_file_wins_over_the_questions_own_where_it_covers_the_turn() {
        let file = References::from_answers([answer(1, &["file1"])], String::new());
        let q = question(Some(&["own1", "own2"]));
        assert_eq!(
            reference_for(&q, Some(&file), 1),
            Some(&["file1".to_string()][..])
        );
        let turn_2 = reference_for(&q, Some(&file), 2).map(|r| r[0].as_str());
        assert_eq!(
            turn_2,
            Some("own1"),
            "the file's reference has one turn: the question's own covers turn 2"
        );
        assert_eq!(reference_for(&question(None), Some(&file), 2), None);
        assert_eq!(reference_for(&q, None, 2).map(<[String]>::len), Some(2));
        assert_eq!(reference_for(&question(None), None, 1), None);
        let other = References::from_answers([answer(7, &["x"])], String::new());
        assert_eq!(
            reference_for(&q, Some(&other), 1).map(|r| r[0].as_str()),
            Some("own1")
        );
    }

    #[test]
    fn answers_in_memory_have_a_stable_digest() {
        let mut a = AnswerSet::new();
        a.insert("x", vec![answer(1, &["t"])]);
        let mut b = AnswerSet::new();
        b.insert("x", vec![answer(1, &["t"])]);
        assert_eq!(a.sha256("x"), b.sha256("x"));
        b.insert("x", vec![answer(1, &["u"])]);
        assert_ne!(a.sha256("x"), b.sha256("x"));
        assert_eq!(a.turns("x", &QuestionId::Number(1)).map(<[String]>::len), Some(1));
        assert!(a.turns("x", &QuestionId::Number(2)).is_none());
        assert!(a.contains("x") && !a.contains("y"));
    }
}
