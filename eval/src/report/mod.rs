//! `camelid eval report`: judgment files in, numbers and pages out.
//!
//! - reading ([`read_judgments`], [`read_categories`]): any mix of pairwise and single judgment files, ours or
//!   FastChat's own, each file's kind told by its records' shape;
//! - [`stats`]: the numbers, pure and checked against FastChat's `show_result.py`;
//! - [`Report`]: the numbers for every pair and model, rendered as a terminal table ([`Report::text`]), Markdown
//!   ([`Report::markdown`]) or one self-contained HTML page ([`Report::html`]), and the gate's [`Summary`].
//!
//! Everything in the files (model names, categories, judge names) is someone else's text: each renderer escapes
//! it for where it goes.

pub mod html;
pub mod stats;
pub mod text;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use camelid_contracts::evaluation::Summary;
use serde_json::Value;

use crate::format::{PairJudgment, Question, SingleJudgment};
use crate::jsonl::{self, JsonlError};

pub use stats::{Bootstrap, Categories, Interval, Mean, PairwiseStats, Record, ScoreStats, Tally};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading judgments: {0}")]
    Judgments(#[source] JsonlError),
    #[error("reading questions: {0}")]
    Questions(#[source] JsonlError),
    #[error("{}:{line}: {detail}", path.display())]
    Shape {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{}:{line}: {source}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

impl ReportError {
    /// A stable category, for logs.
    pub fn category(&self) -> &'static str {
        match self {
            ReportError::Judgments(_) => "judgments",
            ReportError::Questions(_) => "questions",
            ReportError::Shape { .. } => "shape",
            ReportError::Record { .. } => "record",
        }
    }
}

/// Every judgment record read, pairwise and single.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgments {
    pub pairs: Vec<PairJudgment>,
    pub singles: Vec<SingleJudgment>,
}

/// The kind of a judgment file, told by its records' fields (FastChat names its files by judge, not by kind, and
/// a user may rename them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pair,
    Single,
}

impl Kind {
    fn of(record: &Value) -> Option<Kind> {
        let has = |k: &str| record.get(k).is_some();
        if has("model_1") && has("model_2") && has("g1_winner") && has("g2_winner") {
            Some(Kind::Pair)
        } else if has("model") && has("score") {
            Some(Kind::Single)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pair => "pairwise",
            Kind::Single => "single",
        }
    }
}

/// Reads judgment files, each all pairwise or all single (the kind of its first record; a record of the other
/// kind is an error naming its line). A torn last line, left by a judge killed mid-write, is dropped as a resumed
/// run would drop it, so a report can be made of a run still in progress.
pub fn read_judgments<P: AsRef<Path>>(paths: &[P]) -> Result<Judgments, ReportError> {
    let mut out = Judgments::default();
    for p in paths {
        read_file(p.as_ref(), &mut out)?;
    }
    Ok(out)
}

fn read_file(path: &Path, out: &mut Judgments) -> Result<(), ReportError> {
    let lines = jsonl::read::<Value>(path, true).map_err(ReportError::Judgments)?;
    let mut kind = None;
    for jsonl::Line { line, mut record } in lines {
        let shape = |detail: String| ReportError::Shape {
            path: path.to_path_buf(),
            line,
            detail,
        };
        let this = Kind::of(&record).ok_or_else(|| {
            shape(
                "neither a pairwise judgment (model_1, model_2, g1_winner, g2_winner) nor a single one \
                 (model, score)"
                    .into(),
            )
        })?;
        match kind {
            None => kind = Some(this),
            Some(k) if k != this => {
                return Err(shape(format!(
                    "a {} judgment in a file of {} judgments",
                    this.name(),
                    k.name()
                )));
            }
            Some(_) => {}
        }
        let bad = |source| ReportError::Record {
            path: path.to_path_buf(),
            line,
            source,
        };
        match this {
            Kind::Pair => {
                // FastChat's `play_a_match_pair` with a single-answer judge writes no `turn`: it judges the first.
                if let Some(obj) = record.as_object_mut() {
                    obj.entry("turn").or_insert(Value::from(1));
                }
                out.pairs.push(serde_json::from_value(record).map_err(bad)?);
            }
            Kind::Single => out.singles.push(serde_json::from_value(record).map_err(bad)?),
        }
    }
    Ok(())
}

/// Each question's category, from a `question.jsonl`.
pub fn read_categories(question_file: &Path) -> Result<Categories, ReportError> {
    let lines = jsonl::read::<Question>(question_file, false).map_err(ReportError::Questions)?;
    Ok(lines
        .into_iter()
        .map(|l| (l.record.question_id, l.record.category))
        .collect())
}

/// The numbers of a set of judgments, ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The judge models whose verdicts these are, in the order first seen.
    pub judges: Vec<String>,
    /// One per pair of models that met (see [`stats::pairwise`] for the side each is seen from).
    pub pairwise: Vec<PairwiseStats>,
    pub scores: Vec<ScoreStats>,
    pub bootstrap: Bootstrap,
}

impl Report {
    pub fn new(judgments: &Judgments, categories: &Categories, bootstrap: &Bootstrap) -> Report {
        let mut judges: Vec<String> = Vec::new();
        let names = judgments.pairs.iter().map(|j| &j.judge.0);
        for name in names.chain(judgments.singles.iter().map(|j| &j.judge.0)) {
            if !judges.contains(name) {
                judges.push(name.clone());
            }
        }
        Report {
            judges,
            pairwise: stats::pairwise(&judgments.pairs, categories, bootstrap),
            scores: stats::scores(&judgments.singles, categories),
            bootstrap: *bootstrap,
        }
    }

    /// Every pair `model` played seen from `model`'s side, so a report about a candidate reads left to right.
    pub fn oriented_for(mut self, model: &str) -> Report {
        for p in &mut self.pairwise {
            if p.opponent == model {
                *p = p.flipped();
            }
        }
        self
    }

    /// `model`'s stats against `opponent`, from `model`'s side.
    pub fn pair(&self, model: &str, opponent: &str) -> Option<PairwiseStats> {
        self.pairwise.iter().find_map(|p| {
            if p.model == model && p.opponent == opponent {
                Some(p.clone())
            } else if p.model == opponent && p.opponent == model {
                Some(p.flipped())
            } else {
                None
            }
        })
    }

    /// `model`'s single-answer grades.
    pub fn scores_of(&self, model: &str) -> Option<&ScoreStats> {
        self.scores.iter().find(|s| s.model == model)
    }

    /// What the gate reports to the operator: `candidate`'s record against `baseline` (zero everywhere when they
    /// never met) and its mean single-answer grade when there is one. `report` is left for the gate to fill.
    pub fn summary(&self, candidate: &str, baseline: &str, judge: &str) -> Summary {
        let record = self
            .pair(candidate, baseline)
            .map(|p| p.overall)
            .unwrap_or_default();
        let t = record.tally;
        Summary {
            candidate: candidate.to_string(),
            baseline: baseline.to_string(),
            judge: judge.to_string(),
            wins: t.wins,
            ties: t.ties,
            losses: t.losses,
            errors: t.errors,
            win_rate: t.adjusted_win_rate(),
            win_rate_low: record.interval.map(|i| i.low),
            win_rate_high: record.interval.map(|i| i.high),
            mean_score: self.scores_of(candidate).and_then(|s| s.overall.value()),
            report: None,
        }
    }
}
