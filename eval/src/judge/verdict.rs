//! Reading the judge's verdict out of its judgment, as FastChat's `run_judge_pair` / `run_judge_single` do, with two
//! deliberate differences: a judgment that gives more than one distinct verdict is an error, never a guess; and a
//! grade outside 1 to 10 is an error, where FastChat records whatever number it finds.
//!
//! FastChat checks `"[[A]]" in judgment` first, then `[[B]]`, then `[[C]]`, so a judge that echoes the instructions
//! ("... \"[[A]]\" if assistant A is better, \"[[B]]\" if ...") and then answers `[[B]]` is recorded as preferring
//! A. Likewise it takes the first `[[rating]]` of a judgment that gives two. Those guesses bias the result toward
//! A and toward whatever the judge wrote first; we record the game as an error instead (FastChat's `"error"`
//! winner, score -1), which FastChat's own `show_result.py` already leaves out, and count it.

use std::sync::LazyLock;

use regex::Regex;

use crate::format::Winner;

/// The score FastChat records when the judge gave no usable rating.
pub const ERROR_SCORE: f64 = -1.0;

/// The ratings a `[[rating]]` prompt asks for.
pub const RATING_RANGE: std::ops::RangeInclusive<f64> = 1.0..=10.0;

/// A pairwise verdict in the judge's own terms: the answer shown as A, the one shown as B, or a tie (`[[C]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairVerdict {
    A,
    B,
    Tie,
}

/// Which of a match's two games: game 1 shows `model_1` as assistant A, game 2 swaps the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Game {
    G1,
    G2,
}

impl PairVerdict {
    /// The verdict in terms of the match's models, FastChat's `g1_map` / `g2_map`: in game 2 assistant A is
    /// `model_2`.
    pub fn winner(self, game: Game) -> Winner {
        match (self, game) {
            (PairVerdict::Tie, _) => Winner::Tie,
            (PairVerdict::A, Game::G1) | (PairVerdict::B, Game::G2) => Winner::Model1,
            (PairVerdict::B, Game::G1) | (PairVerdict::A, Game::G2) => Winner::Model2,
        }
    }
}

/// The winner a game's judgment gives, [`Winner::Error`] when it gives none or several.
pub fn game_winner(judgment: &str, game: Game) -> Winner {
    parse_pair(judgment).map_or(Winner::Error, |v| v.winner(game))
}

/// Why a judgment gave no verdict. Not fatal: the game is recorded as an error and counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerdictError {
    #[error("the judgment is empty")]
    Empty,
    #[error("the judgment has no verdict in the form {expected}")]
    Missing { expected: &'static str },
    #[error("the judgment gives contradictory verdicts ({})", found.join(", "))]
    Contradictory { found: Vec<String> },
    #[error("the rating {rating} is outside 1 to 10")]
    OutOfRange { rating: String },
}

impl VerdictError {
    /// A stable category, for logs and reports.
    pub fn category(&self) -> &'static str {
        match self {
            VerdictError::Empty => "empty",
            VerdictError::Missing { .. } => "missing",
            VerdictError::Contradictory { .. } => "contradictory",
            VerdictError::OutOfRange { .. } => "out_of_range",
        }
    }
}

/// The verdict of an `[[A]]` judgment: exactly `[[A]]`, `[[B]]` or `[[C]]` (a tie), matched as FastChat matches
/// them (`[[ A ]]` or `[[a]]` are no verdict). The same token repeated is one verdict; two different ones are
/// [`VerdictError::Contradictory`].
pub fn parse_pair(judgment: &str) -> Result<PairVerdict, VerdictError> {
    if judgment.trim().is_empty() {
        return Err(VerdictError::Empty);
    }
    let found: Vec<(&str, PairVerdict)> = [
        ("[[A]]", PairVerdict::A),
        ("[[B]]", PairVerdict::B),
        ("[[C]]", PairVerdict::Tie),
    ]
    .into_iter()
    .filter(|(token, _)| judgment.contains(token))
    .collect();
    match found.as_slice() {
        [] => Err(VerdictError::Missing {
            expected: "[[A]], [[B]] or [[C]]",
        }),
        [(_, verdict)] => Ok(*verdict),
        many => Err(VerdictError::Contradictory {
            found: many.iter().map(|(t, _)| t.to_string()).collect(),
        }),
    }
}

/// FastChat's `one_score_pattern`, with ASCII digits (Python's `\d` also takes other scripts' digits, which its
/// `ast.literal_eval` then fails on).
static RATING: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\[\[([0-9]+\.?[0-9]*)\]\]").ok());
/// FastChat's `one_score_pattern_backup`, tried only when the first finds nothing.
static RATING_BACKUP: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\[([0-9]+\.?[0-9]*)\]").ok());

/// The rating of a `[[rating]]` judgment: `[[7]]`, `[[7.5]]`, else FastChat's backup form `[7]`. Every rating the
/// chosen form finds must agree ([`VerdictError::Contradictory`] otherwise) and lie in 1 to 10.
pub fn parse_rating(judgment: &str) -> Result<f64, VerdictError> {
    if judgment.trim().is_empty() {
        return Err(VerdictError::Empty);
    }
    for pattern in [&*RATING, &*RATING_BACKUP].into_iter().flatten() {
        let texts: Vec<&str> = pattern
            .captures_iter(judgment)
            .filter_map(|c| c.get(1).map(|m| m.as_str()))
            .collect();
        let Some(first) = texts.first() else {
            continue;
        };
        let mut values: Vec<(f64, &str)> = Vec::new();
        for text in &texts {
            // `[0-9]+\.?[0-9]*` always parses; a failure would be a bug, reported as no rating.
            let Ok(v) = text.parse::<f64>() else {
                return Err(VerdictError::Missing {
                    expected: "[[rating]]",
                });
            };
            if !values.iter().any(|(seen, _)| *seen == v) {
                values.push((v, text));
            }
        }
        if values.len() > 1 {
            return Err(VerdictError::Contradictory {
                found: values.iter().map(|(_, t)| format!("[[{t}]]")).collect(),
            });
        }
        let rating = values.first().map_or(f64::NAN, |(v, _)| *v);
        if !RATING_RANGE.contains(&rating) {
            return Err(VerdictError::OutOfRange {
                rating: first.to_string(),
            });
        }
        return Ok(rating);
    }
    Err(VerdictError::Missing {
        expected: "[[rating]]",
    })
}

/// The score a single judgment records: the rating, or [`ERROR_SCORE`].
pub fn score(judgment: &str) -> f64 {
    parse_rating(judgment).unwrap_or(ERROR_SCORE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pair_verdict_is_read() {
        let reply = "Assistant A is more accurate.\n\nFinal verdict: [[A]]";
        assert_eq!(parse_pair(reply), Ok(PairVerdict::A));
        assert_eq!(parse_pair("[[B]]"), Ok(PairVerdict::B));
        assert_eq!(parse_pair("It's a tie: [[C]]."), Ok(PairVerdict::Tie));
        assert_eq!(
            parse_pair("[[A]] I repeat, [[A]]"),
            Ok(PairVerdict::A),
            "one verdict, said twice"
        );
    }

    #[test]
    fn no_verdict_or_a_malformed_one_is_an_error() {
        assert_eq!(parse_pair(""), Err(VerdictError::Empty));
        assert_eq!(parse_pair(" \n\t"), Err(VerdictError::Empty));
        for bad in [
            "A is better",
            "[[ A ]]",
            "[[a]]",
            "[A]",
            "[[D]]",
            "[[A]",
            "[A]]",
            "**A**",
            "$ERROR$",
        ] {
            assert!(
                matches!(parse_pair(bad), Err(VerdictError::Missing { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn contradictory_verdicts_are_an_error_where_fastchat_would_pick_a() {
        let echo = "Output \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n[[B]]";
        let e = parse_pair(echo);
        assert_eq!(
            e,
            Err(VerdictError::Contradictory {
                found: vec!["[[A]]".into(), "[[B]]".into(), "[[C]]".into()]
            })
        );
        assert_eq!(e.err().map(|e| e.category()), Some("contradictory"));
        assert!(parse_pair("[[B]] or maybe [[C]]").is_err());
        assert_eq!(game_winner(echo, Game::G1), Winner::Error);
    }

    #[test]
    fn game_two_maps_a_to_model_2() {
        assert_eq!(PairVerdict::A.winner(Game::G1), Winner::Model1);
        assert_eq!(PairVerdict::B.winner(Game::G1), Winner::Model2);
        assert_eq!(PairVerdict::A.winner(Game::G2), Winner::Model2);
        assert_eq!(PairVerdict::B.winner(Game::G2), Winner::Model1);
        assert_eq!(PairVerdict::Tie.winner(Game::G2), Winner::Tie);
        assert_eq!(game_winner("[[A]]", Game::G2), Winner::Model2);
        assert_eq!(game_winner("none", Game::G1), Winner::Error);
    }

    #[test]
    fn ratings_in_fastchats_forms() {
        assert_eq!(parse_rating("Rating: [[7.5]]"), Ok(7.5));
        assert_eq!(parse_rating("Rating: [[10]]"), Ok(10.0));
        assert_eq!(parse_rating("[[1]]"), Ok(1.0));
        assert_eq!(parse_rating("[[7.]]"), Ok(7.0));
        assert_eq!(parse_rating("Rating: [8]"), Ok(8.0), "FastChat's backup form");
        assert_eq!(
            parse_rating("[[6]] and as said, [[6.0]]"),
            Ok(6.0),
            "the same rating twice"
        );
        assert_eq!(
            parse_rating("see [3] ... Rating: [[9]]"),
            Ok(9.0),
            "the backup is not consulted when [[ ]] matches"
        );
    }

    #[test]
    fn bad_ratings_are_errors() {
        assert_eq!(parse_rating(""), Err(VerdictError::Empty));
        assert!(matches!(
            parse_rating("[[0]]"),
            Err(VerdictError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_rating("[[11]]"),
            Err(VerdictError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_rating("[[0.5]]"),
            Err(VerdictError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_rating("[[10.5]]"),
            Err(VerdictError::OutOfRange { .. })
        ));
        for bad in [
            "Rating: 7",
            "[[seven]]",
            "[[ 7 ]]",
            "[[-3]]",
            "[[7/10]]",
            "[[.5]]",
            "[[A]]",
        ] {
            assert!(
                matches!(parse_rating(bad), Err(VerdictError::Missing { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            parse_rating("Rating: [[7]] ... no, [[8]]"),
            Err(VerdictError::Contradictory {
                found: vec!["[[7]]".into(), "[[8]]".into()]
            })
        );
        assert!(matches!(
            parse_rating("[3] vs [4]"),
            Err(VerdictError::Contradictory { .. })
        ));
        assert_eq!(score("[[11]]"), ERROR_SCORE);
        assert_eq!(score("[[4]]"), 4.0);
    }
}
