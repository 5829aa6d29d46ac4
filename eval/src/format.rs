//! FastChat's `llm_judge` file formats, field for field, so FastChat's scripts read our files and we read theirs:
//! `question.jsonl` ([`Question`]), `model_answer/<model>.jsonl` ([`ModelAnswer`]) and
//! `model_judgment/<judge>_pair.jsonl` / `<judge>_single.jsonl` ([`PairJudgment`], [`SingleJudgment`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A question's id: a number in FastChat's own sets, a string in some others (Arena Hard); kept as it came.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Number(i64),
    Text(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Number(n) => write!(f, "{n}"),
            QuestionId::Text(s) => f.write_str(s),
        }
    }
}

/// One line of `question.jsonl`: one or more user turns, asked in one conversation, and optionally a reference
/// answer per turn for the reference-guided judge prompts (math, reasoning, coding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub question_id: QuestionId,
    #[serde(default)]
    pub category: String,
    pub turns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Vec<String>>,
    /// The temperature this question must be answered at, over the category's (FastChat's
    /// `required_temperature`; refused together with a fixed `--temperature`, as FastChat refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_temperature: Option<f32>,
}

/// One line of `model_answer/<model>.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAnswer {
    pub question_id: QuestionId,
    /// FastChat writes a random short UUID; ours is derived from the model, question and settings, so a resumed
    /// run writes the same file as an uninterrupted one.
    pub answer_id: String,
    pub model_id: String,
    pub choices: Vec<Choice>,
    /// Seconds since the Unix epoch when the answer was finished.
    pub tstamp: f64,
}

/// FastChat's `choices[]` entry: one answer per turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub turns: Vec<String>,
}

/// Who a pairwise verdict favours, in FastChat's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    #[serde(rename = "model_1")]
    Model1,
    #[serde(rename = "model_2")]
    Model2,
    Tie,
    /// The judge's output had no verdict, or contradictory ones: never guessed, counted and left out.
    Error,
}

/// The judge as FastChat records it: `[judge model, prompt name]`.
pub type JudgeId = (String, String);

/// One line of `model_judgment/<judge>_pair.jsonl`: the same match judged twice, once with `model_1` as
/// assistant A (game 1) and once with the answers swapped (game 2), to cancel the judge's position bias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairJudgment {
    pub question_id: QuestionId,
    pub model_1: String,
    pub model_2: String,
    pub g1_winner: Winner,
    pub g2_winner: Winner,
    pub judge: JudgeId,
    pub g1_user_prompt: String,
    pub g1_judgment: String,
    pub g2_user_prompt: String,
    pub g2_judgment: String,
    /// 1 for the first turn, 2 for MT-bench's second (judged with the whole conversation).
    pub turn: u32,
    pub tstamp: f64,
}

/// One line of `model_judgment/<judge>_single.jsonl`: one answer graded 1 to 10.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleJudgment {
    pub question_id: QuestionId,
    pub model: String,
    pub judge: JudgeId,
    pub user_prompt: String,
    pub judgment: String,
    /// The rating, or -1 when the judge gave none that could be parsed (FastChat's convention).
    pub score: f64,
    pub turn: u32,
    pub tstamp: f64,
}

/// The outcome of one pairwise match for `model_1`, by FastChat's rule: a win only when both orders agree;
/// orders that disagree, or agree on a tie, are a tie; a match with an unparseable verdict in either order is
/// left out (FastChat's `show_result.py` drops those rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Win,
    Tie,
    Loss,
    Excluded,
}

impl PairJudgment {
    /// This match's outcome for `model_1`.
    pub fn outcome(&self) -> Outcome {
        match (self.g1_winner, self.g2_winner) {
            (Winner::Error, _) | (_, Winner::Error) => Outcome::Excluded,
            (Winner::Model1, Winner::Model1) => Outcome::Win,
            (Winner::Model2, Winner::Model2) => Outcome::Loss,
            _ => Outcome::Tie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastchat_lines_parse_and_write_back_field_for_field() {
        let line = r#"{"question_id": 81, "model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "tie", "judge": ["gpt-4", "pair-v2"], "g1_user_prompt": "p", "g1_judgment": "[[A]]", "g2_user_prompt": "q", "g2_judgment": "[[C]]", "turn": 1, "tstamp": 1.5}"#;
        let j: PairJudgment = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.judge, ("gpt-4".to_string(), "pair-v2".to_string()));
        assert_eq!(j.outcome(), Outcome::Tie);
        let back: serde_json::Value = serde_json::to_value(&j).unwrap_or_default();
        let orig: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        assert_eq!(back, orig);
    }

    #[test]
    fn both_orders_must_agree_for_a_win() {
        let mut j = PairJudgment {
            question_id: QuestionId::Text("x".into()),
            model_1: "a".into(),
            model_2: "b".into(),
            g1_winner: Winner::Model1,
            g2_winner: Winner::Model2,
            judge: ("j".into(), "pair-v2".into()),
            g1_user_prompt: String::new(),
            g1_judgment: String::new(),
            g2_user_prompt: String::new(),
            g2_judgment: String::new(),
            turn: 1,
            tstamp: 0.0,
        };
        assert_eq!(j.outcome(), Outcome::Tie, "orders that disagree are a tie");
        j.g2_winner = Winner::Model1;
        assert_eq!(j.outcome(), Outcome::Win);
        j.g1_winner = Winner::Model2;
        j.g2_winner = Winner::Model2;
        assert_eq!(j.outcome(), Outcome::Loss);
        j.g2_winner = Winner::Error;
        assert_eq!(j.outcome(), Outcome::Excluded);
    }
}
