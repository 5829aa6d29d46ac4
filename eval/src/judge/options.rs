//! What a judge run takes and what it reports: the inputs, the pairing of models, the options, the statistics.

use std::path::PathBuf;

use serde::Serialize;

use super::JudgeError;
use super::inputs::{AnswerSet, References};
use super::prompts::JudgePrompts;
use crate::format::{Question, QuestionId};

/// What is judged.
#[derive(Debug, Clone, Copy)]
pub struct JudgeInputs<'a> {
    pub questions: &'a [Question],
    /// The contestants' answers (FastChat's `model_answer/*.jsonl`).
    pub answers: &'a AnswerSet,
    /// A reference answer file (FastChat's `reference_answer/gpt-4.jsonl`); without it, a question's own
    /// `reference` field serves.
    pub references: Option<&'a References>,
}

/// Which models meet in pairwise judging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pairing {
    /// These pairs, `(model_1, model_2)` as given.
    Pairs(Vec<(String, String)>),
    /// FastChat's `pairwise-baseline`: each model (as `model_1`) against the baseline (`model_2`); the baseline
    /// itself, when listed, is skipped.
    Baseline { models: Vec<String>, baseline: String },
    /// FastChat's `pairwise-all`: every pair `(models[i], models[j])` with `i < j`.
    All(Vec<String>),
}

impl Pairing {
    /// The pairs, in FastChat's order, without repeats; a model paired with itself is an error.
    pub fn pairs(&self) -> Result<Vec<(String, String)>, JudgeError> {
        let mut out: Vec<(String, String)> = Vec::new();
        match self {
            Pairing::Pairs(pairs) => {
                for (a, b) in pairs {
                    if a == b {
                        return Err(JudgeError::InvalidPair { model: a.clone() });
                    }
                    if !out.iter().any(|(x, y)| x == a && y == b) {
                        out.push((a.clone(), b.clone()));
                    }
                }
            }
            Pairing::Baseline { models, baseline } => {
                for m in models.iter().filter(|m| *m != baseline) {
                    if !out.iter().any(|(x, _)| x == m) {
                        out.push((m.clone(), baseline.clone()));
                    }
                }
            }
            Pairing::All(models) => {
                for (i, a) in models.iter().enumerate() {
                    for b in &models[i + 1..] {
                        if a != b && !out.iter().any(|(x, y)| x == a && y == b) {
                            out.push((a.clone(), b.clone()));
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// How to judge.
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// The judge's name as recorded in each judgment's `judge` field (FastChat's `--judge-model`, e.g. `gpt-4`);
    /// FastChat's `show_result.py` selects judgments by it.
    pub judge_name: String,
    pub prompts: JudgePrompts,
    /// FastChat judges at temperature 0 ...
    pub temperature: f32,
    /// ... with up to 2048 tokens of explanation and verdict.
    pub max_tokens: u32,
    /// Judge requests in flight at once (at least 1).
    pub concurrency: usize,
    /// The judgment file (FastChat's `model_judgment/<judge>_pair.jsonl` or `_single.jsonl`).
    pub output: PathBuf,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// When the output's recorded settings differ from this run's, move the old output aside (`*.old`) and start
    /// a new file instead of refusing.
    pub force_new: bool,
}

impl JudgeOptions {
    /// FastChat's defaults: the embedded prompts, temperature 0, 2048 tokens; 8 requests at once, no progress bar.
    pub fn new(judge_name: impl Into<String>, output: impl Into<PathBuf>) -> Result<Self, JudgeError> {
        Ok(Self {
            judge_name: judge_name.into(),
            prompts: JudgePrompts::embedded()?,
            temperature: 0.0,
            max_tokens: 2048,
            concurrency: 8,
            output: output.into(),
            progress: false,
            force_new: false,
        })
    }
}

/// A contestant's answer a match needed and did not find (no answer to the question, or fewer turns than judged).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MissingAnswer {
    pub model: String,
    pub question_id: QuestionId,
    pub turn: u32,
}

/// A question of a reference-guided category judged with the general prompt, for want of a reference answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ReferenceFallback {
    pub question_id: QuestionId,
    pub category: String,
    pub turn: u32,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JudgeStats {
    /// Matches this run's inputs call for.
    pub planned: usize,
    /// Matches judged now.
    pub judged: usize,
    /// Matches already in the output, not asked again.
    pub skipped: usize,
    /// Matches whose judge request failed; a rerun resumes them.
    pub failed: usize,
    /// Games (two per pairwise match, one per single) judged now whose judgment gave no usable verdict; recorded
    /// as FastChat's `error` winner or score -1, never guessed.
    pub verdict_errors: usize,
    /// Matches not planned because an answer is missing.
    pub missing_answers: Vec<MissingAnswer>,
    /// Questions judged without the reference their category calls for.
    pub reference_fallbacks: Vec<ReferenceFallback>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn pairs_follow_fastchats_modes() {
        let all = Pairing::All(names(&["a", "b", "c"])).pairs().ok();
        assert_eq!(all, Some(vec![pair("a", "b"), pair("a", "c"), pair("b", "c")]));
        let baseline = Pairing::Baseline {
            models: names(&["a", "base", "b", "a"]),
            baseline: "base".into(),
        };
        assert_eq!(
            baseline.pairs().ok(),
            Some(vec![pair("a", "base"), pair("b", "base")])
        );
        let given = Pairing::Pairs(vec![pair("b", "a"), pair("b", "a"), pair("a", "b")]);
        assert_eq!(
            given.pairs().ok(),
            Some(vec![pair("b", "a"), pair("a", "b")]),
            "orders are kept"
        );
        let itself = Pairing::Pairs(vec![pair("a", "a")]).pairs();
        assert_eq!(itself.err().map(|e| e.category()), Some("input"));
    }
}
