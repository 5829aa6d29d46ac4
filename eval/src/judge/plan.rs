//! Which matches a run judges and the exact words each game sends, worked out before the first request, as
//! FastChat's `make_match*` functions do: every question at turn 1, questions of exactly two turns again at turn 2
//! with the multi-turn prompt, the reference-guided prompt for [`super::prompts::NEED_REF_CATS`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use super::inputs::reference_for;
use super::prompts::{self, JudgeMode, JudgePrompt};
use super::{JudgeError, JudgeInputs, MissingAnswer, ReferenceFallback};
use crate::format::{JudgeId, QuestionId};

/// What identifies a judgment in its file: the same key is never judged twice. Its field order is the order of
/// the rewritten file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub question_id: QuestionId,
    /// `model_1`, or the graded model of a single judgment.
    pub model_1: String,
    /// `model_2`; empty for a single judgment.
    pub model_2: String,
    pub turn: u32,
    pub judge: JudgeId,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "question {} turn {}: {}",
            self.question_id, self.turn, self.model_1
        )?;
        if !self.model_2.is_empty() {
            write!(f, " vs {}", self.model_2)?;
        }
        write!(f, " ({})", self.judge.1)
    }
}

/// One match, ready to send: pairwise has two games (model_1 as A, then swapped), single has one.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub key: Key,
    pub system_prompt: String,
    pub user_prompts: Vec<String>,
}

/// A run's matches and what could not be planned as FastChat would.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub matches: Vec<Planned>,
    pub missing_answers: BTreeSet<MissingAnswer>,
    pub reference_fallbacks: BTreeSet<ReferenceFallback>,
}

/// Plans `mode`'s matches of `contestants`: pairs `[model_1, model_2]` for pairwise, `[model]` for single.
pub(crate) fn plan(
    mode: JudgeMode,
    inputs: &JudgeInputs<'_>,
    contestants: &[Vec<String>],
    prompts: &BTreeMap<&'static str, &JudgePrompt>,
    judge_name: &str,
) -> Result<Plan, JudgeError> {
    for q in inputs.questions {
        if q.turns.is_empty() {
            return Err(JudgeError::EmptyQuestion {
                question_id: q.question_id.clone(),
            });
        }
    }
    let mut out = Plan::default();
    let mut seen = HashSet::new();
    for turn in [1u32, 2] {
        for q in inputs.questions {
            if turn == 2 && q.turns.len() != 2 {
                continue;
            }
            let mut reference = None;
            if prompts::needs_reference(&q.category) {
                reference = reference_for(q, inputs.references, turn);
                if reference.is_none() {
                    out.reference_fallbacks.insert(ReferenceFallback {
                        question_id: q.question_id.clone(),
                        category: q.category.clone(),
                        turn,
                    });
                }
            }
            let name = prompts::prompt_name(mode, reference.is_some(), turn == 2);
            let prompt = prompts.get(name).ok_or_else(|| JudgeError::MissingPrompt {
                name: name.to_string(),
                origin: "the prompts of this mode".into(),
            })?;
            for models in contestants {
                let mut answers = Vec::new();
                for m in models {
                    match inputs.answers.turns(m, &q.question_id) {
                        Some(t) if t.len() >= turn as usize => answers.push(t),
                        _ => {
                            out.missing_answers.insert(MissingAnswer {
                                model: m.clone(),
                                question_id: q.question_id.clone(),
                                turn,
                            });
                        }
                    }
                }
                if answers.len() != models.len() {
                    continue;
                }
                let key = Key {
                    question_id: q.question_id.clone(),
                    model_1: models.first().cloned().unwrap_or_default(),
                    model_2: models.get(1).cloned().unwrap_or_default(),
                    turn,
                    judge: (judge_name.to_string(), prompt.name.clone()),
                };
                if !seen.insert(key.clone()) {
                    continue;
                }
                let values = match answers.as_slice() {
                    [a, b] => [(a, b), (b, a)]
                        .into_iter()
                        .map(|(x, y)| prompts::pair_values(&q.turns, x, y, reference, turn))
                        .collect::<Option<Vec<_>>>(),
                    [a] => prompts::single_values(&q.turns, a, reference, turn).map(|v| vec![v]),
                    _ => None,
                };
                let Some(values) = values else {
                    return Err(JudgeError::Template {
                        prompt: prompt.name.clone(),
                        detail: format!("{key}: a text the prompt needs is missing"),
                    });
                };
                let user_prompts = values
                    .iter()
                    .map(|v| prompt.fill(v))
                    .collect::<Result<Vec<_>, _>>()?;
                out.matches.push(Planned {
                    key,
                    system_prompt: prompt.system_prompt.clone(),
                    user_prompts,
                });
            }
        }
    }
    Ok(out)
}
