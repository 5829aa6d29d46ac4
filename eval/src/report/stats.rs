//! The numbers of a report, pure functions of the judgment records: pairwise win/tie/loss tallies by FastChat's
//! both-orders rule with a bootstrap interval of the adjusted win rate, and single-answer mean scores. Kept apart
//! from reading and rendering so each number is tested directly and checked against FastChat's `show_result.py`.

use std::collections::{BTreeMap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::format::{Outcome, PairJudgment, QuestionId, SingleJudgment};

/// The category of a question the question file does not name (or names with an empty category).
pub const UNKNOWN_CATEGORY: &str = "unknown";

/// The seed of the default bootstrap: fixed, so the same judgments give the same interval in every report.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// Each question's category, from the question file.
pub type Categories = BTreeMap<QuestionId, String>;

/// The category `id` is counted under: its question's, or [`UNKNOWN_CATEGORY`].
pub fn category_of<'a>(categories: &'a Categories, id: &QuestionId) -> &'a str {
    categories
        .get(id)
        .map(String::as_str)
        .filter(|c| !c.is_empty())
        .unwrap_or(UNKNOWN_CATEGORY)
}

/// One model's pairwise record: wins, ties and losses count; `errors` are matches left out because either
/// order's verdict could not be parsed (FastChat drops them silently; we show how many).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub wins: u32,
    pub ties: u32,
    pub losses: u32,
    pub errors: u32,
}

impl Tally {
    /// Counts one match's outcome.
    pub fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Win => self.wins += 1,
            Outcome::Tie => self.ties += 1,
            Outcome::Loss => self.losses += 1,
            Outcome::Excluded => self.errors += 1,
        }
    }

    /// Wins, ties and losses: the verdicts that count.
    pub fn decided(&self) -> u32 {
        self.wins + self.ties + self.losses
    }

    /// wins / decided (FastChat's `win_rate`); `None` when nothing was decided.
    pub fn win_rate(&self) -> Option<f64> {
        self.rate(f64::from(self.wins))
    }

    /// losses / decided (FastChat's `loss_rate`).
    pub fn loss_rate(&self) -> Option<f64> {
        self.rate(f64::from(self.losses))
    }

    /// (wins + ties / 2) / decided (FastChat's `win_rate_adjusted`): a tie is half a win and half a loss, so
    /// 0.5 means "as good as the opponent" whatever the judge's taste for ties. The headline number.
    pub fn adjusted_win_rate(&self) -> Option<f64> {
        self.rate(f64::from(self.wins) + 0.5 * f64::from(self.ties))
    }

    fn rate(&self, numerator: f64) -> Option<f64> {
        let n = self.decided();
        (n > 0).then(|| numerator / f64::from(n))
    }

    /// The same record seen from the opponent's side.
    pub fn flipped(&self) -> Tally {
        Tally {
            wins: self.losses,
            losses: self.wins,
            ..*self
        }
    }
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.wins += o.wins;
        self.ties += o.ties;
        self.losses += o.losses;
        self.errors += o.errors;
    }
}

/// The outcome of `j` for `model`, whichever side it played; `None` when it did not play (or played itself).
pub fn orient(j: &PairJudgment, model: &str) -> Option<Outcome> {
    if j.model_1 == j.model_2 {
        return None;
    }
    if j.model_1 == model {
        Some(j.outcome())
    } else if j.model_2 == model {
        Some(match j.outcome() {
            Outcome::Win => Outcome::Loss,
            Outcome::Loss => Outcome::Win,
            o => o,
        })
    } else {
        None
    }
}

/// A confidence interval of an adjusted win rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// The interval of the opponent's adjusted win rate (1 - x): the same resamples seen from the other side.
    pub fn flipped(self) -> Interval {
        Interval {
            low: 1.0 - self.high,
            high: 1.0 - self.low,
        }
    }
}

/// How the interval is drawn. The RNG is ChaCha seeded with `seed`, afresh for each interval, so a report is
/// reproducible and one pair's interval does not move when another model is added to the files.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bootstrap {
    pub rounds: u32,
    pub seed: u64,
    /// The interval's coverage, e.g. 0.95.
    pub level: f64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self {
            rounds: 1000,
            seed: DEFAULT_SEED,
            level: 0.95,
        }
    }
}

/// The percentile bootstrap interval of the adjusted win rate. The unit resampled is the question (one tally per
/// question, its turns together): turns of one conversation are not independent, so resampling them apart would
/// give an interval narrower than the evidence. Questions with no decided verdict carry no information and are
/// left out. `None` when nothing was decided or `rounds` is 0.
pub fn bootstrap_interval(per_question: &[Tally], config: &Bootstrap) -> Option<Interval> {
    let units: Vec<Tally> = per_question.iter().copied().filter(|t| t.decided() > 0).collect();
    if units.is_empty() || config.rounds == 0 {
        return None;
    }
    let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
    let mut rates = Vec::with_capacity(config.rounds as usize);
    for _ in 0..config.rounds {
        let mut sum = Tally::default();
        for _ in 0..units.len() {
            sum += units[rng.random_range(0..units.len())];
        }
        // Every unit has a decided verdict, so every resample has a rate.
        rates.extend(sum.adjusted_win_rate());
    }
    rates.sort_by(f64::total_cmp);
    let tail = (1.0 - config.level.clamp(0.0, 1.0)) / 2.0;
    Some(Interval {
        low: percentile(&rates, tail),
        high: percentile(&rates, 1.0 - tail),
    })
}

/// The `q` quantile of sorted `xs`, interpolated linearly between order statistics (numpy's default).
fn percentile(xs: &[f64], q: f64) -> f64 {
    let pos = q * (xs.len().saturating_sub(1)) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (
        xs.get(lo).copied().unwrap_or(f64::NAN),
        xs.get(hi).copied().unwrap_or(f64::NAN),
    );
    a + (b - a) * (pos - lo as f64)
}

/// A tally and the bootstrap interval of its adjusted win rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Record {
    pub tally: Tally,
    pub interval: Option<Interval>,
}

impl Record {
    fn of(per_question: &BTreeMap<QuestionId, Tally>, bootstrap: &Bootstrap) -> Record {
        let units: Vec<Tally> = per_question.values().copied().collect();
        let mut tally = Tally::default();
        for t in &units {
            tally += *t;
        }
        Record {
            tally,
            interval: bootstrap_interval(&units, bootstrap),
        }
    }

    fn flipped(&self) -> Record {
        Record {
            tally: self.tally.flipped(),
            interval: self.interval.map(Interval::flipped),
        }
    }
}

/// `model`'s record against `opponent`, whichever side each played in each match: overall, by question category
/// and by turn.
#[derive(Debug, Clone, PartialEq)]
pub struct PairwiseStats {
    pub model: String,
    pub opponent: String,
    pub overall: Record,
    pub by_category: BTreeMap<String, Record>,
    pub by_turn: BTreeMap<u32, Tally>,
}

impl PairwiseStats {
    /// The same stats from `opponent`'s side.
    pub fn flipped(&self) -> PairwiseStats {
        PairwiseStats {
            model: self.opponent.clone(),
            opponent: self.model.clone(),
            overall: self.overall.flipped(),
            by_category: self
                .by_category
                .iter()
                .map(|(c, r)| (c.clone(), r.flipped()))
                .collect(),
            by_turn: self.by_turn.iter().map(|(t, r)| (*t, r.flipped())).collect(),
        }
    }
}

/// Tallies by question while a pair's matches are gathered.
#[derive(Default)]
struct Gathering {
    overall: BTreeMap<QuestionId, Tally>,
    by_category: BTreeMap<String, BTreeMap<QuestionId, Tally>>,
    by_turn: BTreeMap<u32, Tally>,
}

/// One [`PairwiseStats`] per pair of models that met, seen from the side of the model that was `model_1` in the
/// pair's first match (the candidate, in matches our judge and FastChat's `make_match` build), in the order pairs
/// first appear. Every record counts: a match judged twice (two files, a rerun) counts twice, as in FastChat.
pub fn pairwise(
    pairs: &[PairJudgment],
    categories: &Categories,
    bootstrap: &Bootstrap,
) -> Vec<PairwiseStats> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut gathered: Vec<Gathering> = Vec::new();
    for j in pairs {
        if j.model_1 == j.model_2 {
            continue;
        }
        let key = if j.model_1 < j.model_2 {
            (j.model_1.clone(), j.model_2.clone())
        } else {
            (j.model_2.clone(), j.model_1.clone())
        };
        let i = *index.entry(key).or_insert_with(|| {
            order.push((j.model_1.clone(), j.model_2.clone()));
            gathered.push(Gathering::default());
            order.len() - 1
        });
        let (Some(g), Some(outcome)) = (gathered.get_mut(i), order.get(i).and_then(|(m, _)| orient(j, m)))
        else {
            continue;
        };
        let category = category_of(categories, &j.question_id).to_string();
        g.overall
            .entry(j.question_id.clone())
            .or_default()
            .record(outcome);
        g.by_category
            .entry(category)
            .or_default()
            .entry(j.question_id.clone())
            .or_default()
            .record(outcome);
        g.by_turn.entry(j.turn).or_default().record(outcome);
    }
    order
        .into_iter()
        .zip(gathered)
        .map(|((model, opponent), g)| PairwiseStats {
            model,
            opponent,
            overall: Record::of(&g.overall, bootstrap),
            by_category: g
                .by_category
                .iter()
                .map(|(c, q)| (c.clone(), Record::of(q, bootstrap)))
                .collect(),
            by_turn: g.by_turn,
        })
        .collect()
}

/// Each model's record against all its opponents together: what FastChat's `show_result.py --mode pairwise-all`
/// prints (and, with one opponent, what `pairwise-baseline` prints).
pub fn totals(pairs: &[PairJudgment]) -> BTreeMap<String, Tally> {
    let mut out: BTreeMap<String, Tally> = BTreeMap::new();
    for j in pairs {
        for m in [&j.model_1, &j.model_2] {
            if let Some(o) = orient(j, m) {
                out.entry(m.clone()).or_default().record(o);
            }
        }
    }
    out
}

/// A running mean.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mean {
    pub sum: f64,
    pub count: u32,
}

impl Mean {
    pub fn add(&mut self, x: f64) {
        self.sum += x;
        self.count += 1;
    }

    /// The mean; `None` when nothing was added.
    pub fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / f64::from(self.count))
    }
}

/// A model's single-answer grades (1 to 10), as FastChat's `display_result_single` averages them: by turn and
/// over all turns (the mean of all grades, not of the turn means), and by category too.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScoreStats {
    pub model: String,
    pub overall: Mean,
    pub by_turn: BTreeMap<u32, Mean>,
    pub by_category: BTreeMap<String, Mean>,
    pub by_category_turn: BTreeMap<String, BTreeMap<u32, Mean>>,
    /// Grades of -1: the judge gave none that could be parsed. Left out of every mean.
    pub unparsed: u32,
}

/// The score FastChat writes when the judge's rating could not be parsed.
pub const UNPARSED_SCORE: f64 = -1.0;

/// One [`ScoreStats`] per model, in the order models first appear.
pub fn scores(singles: &[SingleJudgment], categories: &Categories) -> Vec<ScoreStats> {
    let mut out: Vec<ScoreStats> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for j in singles {
        let i = *index.entry(j.model.as_str()).or_insert_with(|| {
            out.push(ScoreStats {
                model: j.model.clone(),
                ..ScoreStats::default()
            });
            out.len() - 1
        });
        let Some(s) = out.get_mut(i) else { continue };
        if j.score == UNPARSED_SCORE {
            s.unparsed += 1;
            continue;
        }
        let category = category_of(categories, &j.question_id).to_string();
        s.overall.add(j.score);
        s.by_turn.entry(j.turn).or_default().add(j.score);
        s.by_category.entry(category.clone()).or_default().add(j.score);
        s.by_category_turn
            .entry(category)
            .or_default()
            .entry(j.turn)
            .or_default()
            .add(j.score);
    }
    out
}
