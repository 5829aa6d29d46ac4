//! The promotion gate's verdict, pure: from the evaluation Job's state and its gate pods' termination messages
//! to the next step. A gate that succeeded left a [`Summary`]: the model passes when its win rate reaches
//! `minWinRate`, and is rejected otherwise, or when the judge gave no verdict that could be parsed (no evidence
//! never passes). A Job that failed (Kubernetes' retries used up) fails the FineTuneJob with the gate's own error
//! text. Also the status fields a summary fills, and whether a person asked to promote a rejected model.

use camelid_contracts::evaluation::Summary;
use camelid_contracts::names;
use camelid_crds::FineTuneJob;
use camelid_crds::evaluation::EvaluationStatus;
use kube::ResourceExt;

use super::decide::PodPhase;

/// The longest piece of a termination message repeated in the status (the kubelet keeps at most 4096 bytes, a
/// log tail included).
const EXCERPT_CHARS: usize = 1024;

/// The largest share of matches whose verdict could not be parsed that still lets a model pass: beyond it the
/// few parsed verdicts are not evidence (one win among 160 matches is not a win rate of 1).
pub const MAX_UNPARSED_SHARE: f64 = 0.2;

/// The evaluation Job as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GateJob {
    /// Its `Complete` condition is true: a gate pod exited 0.
    pub complete: bool,
    /// Its `Failed` condition is true: the gate failed `backoffLimit` + 1 times (or the Job was stopped).
    pub failed: bool,
    /// The `Failed` condition's reason and message, for when no pod says more.
    pub why_failed: Option<String>,
}

/// One gate pod of the Job (each retry is a new pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRun {
    pub phase: PodPhase,
    /// The gate container's termination message: the [`Summary`] as JSON after success, the error text (or the
    /// log's tail) after a failure.
    pub message: Option<String>,
}

/// What was observed of the gate: its Job (none when it does not exist) and its pods, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GateView {
    pub job: Option<GateJob>,
    pub runs: Vec<GateRun>,
}

/// The next step of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No evaluation Job: start it.
    Start,
    /// The Job finished but its result cannot be found (its pod is gone, or wrote no summary): delete the Job, so
    /// the gate runs again; it resumes from its files and writes the summary anew.
    Rerun { why: String },
    /// The gate runs, or Kubernetes runs it again after a failure (`retried` says why, then).
    Running { retried: Option<String> },
    /// The model won often enough: publish it. `why` has the numbers.
    Passed { summary: Summary, why: String },
    /// The model lost, or no verdict could be parsed: not published.
    Rejected { summary: Summary, why: String },
    /// The evaluation could not be run, or its result cannot be read.
    Failed { why: String },
}

/// Decides the next step from `view`, with the spec's `minWinRate`.
pub fn decide(view: &GateView, min_win_rate: f64) -> Verdict {
    let Some(job) = &view.job else {
        return Verdict::Start;
    };
    if job.complete {
        let message = view
            .runs
            .iter()
            .rev()
            .find(|r| r.phase == PodPhase::Succeeded)
            .and_then(|r| r.message.as_deref())
            .filter(|m| !m.trim().is_empty());
        return match message {
            Some(text) => judge(text, min_win_rate),
            None => Verdict::Rerun {
                why: "the gate succeeded but its summary is gone with its pod (or was never written); running it \
                      again, from its files"
                    .into(),
            },
        };
    }
    let failed: Vec<&GateRun> = view.runs.iter().filter(|r| r.phase == PodPhase::Failed).collect();
    let last_error = failed.last().and_then(|r| r.message.as_deref()).map(excerpt);
    if job.failed {
        let why = last_error
            .or_else(|| job.why_failed.clone())
            .unwrap_or_else(|| "the evaluation Job failed".into());
        return Verdict::Failed {
            why: format!("evaluation failed: {why}"),
        };
    }
    let retried = (!failed.is_empty()).then(|| {
        format!(
            "the gate failed {} time(s), Kubernetes runs it again (at most {}): {}",
            failed.len(),
            super::evaljob::BACKOFF_LIMIT,
            last_error.unwrap_or_else(|| "no message".into())
        )
    });
    Verdict::Running { retried }
}

/// The verdict of a gate that succeeded with `message` as its termination message.
fn judge(message: &str, min_win_rate: f64) -> Verdict {
    let summary: Summary = match serde_json::from_str(message.trim()) {
        Ok(summary) => summary,
        Err(e) => {
            return Verdict::Failed {
                why: format!(
                    "evaluation failed: the gate's summary cannot be read ({e}): {}",
                    excerpt(message)
                ),
            };
        }
    };
    // The rate is recomputed from the counts: the gate's own arithmetic is not trusted with a promotion.
    let decided = summary.decided();
    let rate =
        (decided > 0).then(|| (f64::from(summary.wins) + f64::from(summary.ties) / 2.0) / f64::from(decided));
    let unparsed_share = f64::from(summary.errors) / f64::from((decided + summary.errors).max(1));
    match rate {
        None => Verdict::Rejected {
            why: format!(
                "the judge gave no parseable verdict ({}); a gate without evidence never passes",
                counts(&summary)
            ),
            summary,
        },
        Some(_) if unparsed_share > MAX_UNPARSED_SHARE => Verdict::Rejected {
            why: format!(
                "the judge's verdict could not be parsed for {} of {} matches, more than {:.0}%: too little \
                 evidence to pass ({})",
                summary.errors,
                decided + summary.errors,
                MAX_UNPARSED_SHARE * 100.0,
                counts(&summary)
            ),
            summary,
        },
        Some(rate) if rate >= min_win_rate => Verdict::Passed {
            why: format!(
                "win rate {} >= minWinRate {min_win_rate} ({})",
                shown_rate(&summary, rate),
                counts(&summary)
            ),
            summary,
        },
        Some(rate) => Verdict::Rejected {
            why: format!(
                "win rate {} < minWinRate {min_win_rate} ({})",
                shown_rate(&summary, rate),
                counts(&summary)
            ),
            summary,
        },
    }
}

/// `0.31 [0.20, 0.43]`, or `0.31` without an interval.
fn shown_rate(summary: &Summary, rate: f64) -> String {
    match (summary.win_rate_low, summary.win_rate_high) {
        (Some(low), Some(high)) => format!("{rate:.2} [{low:.2}, {high:.2}]"),
        _ => format!("{rate:.2}"),
    }
}

/// `wins 10, ties 5, losses 25, 3 unparseable`.
fn counts(summary: &Summary) -> String {
    format!(
        "wins {}, ties {}, losses {}, {} unparseable",
        summary.wins, summary.ties, summary.losses, summary.errors
    )
}

/// A termination message as one trimmed piece of at most [`EXCERPT_CHARS`] characters (its end, where a log's
/// tail has the error).
fn excerpt(text: &str) -> String {
    let text = text.trim();
    let count = text.chars().count();
    if count <= EXCERPT_CHARS {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - EXCERPT_CHARS).collect();
    format!("...{tail}")
}

/// The status fields of `summary`: its numbers, its report on the claim (`out` is the gate's folder as
/// `pvc://claim/path`), and how many gate pods it took.
pub fn record(summary: &Summary, out: &str, runs: usize) -> EvaluationStatus {
    let round = |v: f64| (v * 1e4).round() / 1e4;
    EvaluationStatus {
        win_rate: summary.win_rate.map(round),
        win_rate_low: summary.win_rate_low.map(round),
        win_rate_high: summary.win_rate_high.map(round),
        wins: i64::from(summary.wins),
        ties: i64::from(summary.ties),
        losses: i64::from(summary.losses),
        errors: i64::from(summary.errors),
        mean_score: summary.mean_score.map(round),
        judge: (!summary.judge.is_empty()).then(|| summary.judge.clone()),
        report: summary.report.as_ref().map(|r| format!("{out}/{r}")),
        attempt: i32::try_from(runs).ok().filter(|n| *n > 0),
    }
}

/// A person asked to serve a rejected model anyway: the annotation `camelid.dev/promote: "true"`.
pub fn promote_requested(job: &FineTuneJob) -> bool {
    job.annotations()
        .get(names::PROMOTE_ANNOTATION)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(wins: u32, ties: u32, losses: u32, errors: u32) -> Summary {
        let decided = wins + ties + losses;
        Summary {
            candidate: "tune".into(),
            baseline: "base".into(),
            judge: "gpt-4".into(),
            wins,
            ties,
            losses,
            errors,
            win_rate: (decided > 0).then(|| (f64::from(wins) + f64::from(ties) / 2.0) / f64::from(decided)),
            win_rate_low: Some(0.2),
            win_rate_high: Some(0.43),
            report: Some("report.md".into()),
            ..Summary::default()
        }
    }

    fn done(message: &str) -> GateView {
        GateView {
            job: Some(GateJob {
                complete: true,
                ..GateJob::default()
            }),
            runs: vec![GateRun {
                phase: PodPhase::Succeeded,
                message: Some(message.into()),
            }],
        }
    }

    fn json(s: &Summary) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }

    #[test]
    fn no_job_starts_one_and_a_running_gate_is_waited_for() {
        assert_eq!(decide(&GateView::default(), 0.5), Verdict::Start);
        let running = GateView {
            job: Some(GateJob::default()),
            runs: vec![GateRun {
                phase: PodPhase::Running,
                message: None,
            }],
        };
        assert_eq!(decide(&running, 0.5), Verdict::Running { retried: None });
    }

    #[test]
    fn a_win_rate_at_the_threshold_passes_and_below_it_is_rejected_with_the_numbers() {
        let even = summary(10, 0, 10, 0);
        let Verdict::Passed { why, .. } = decide(&done(&json(&even)), 0.5) else {
            panic!("0.5 >= 0.5 passes");
        };
        assert_eq!(
            why,
            "win rate 0.50 [0.20, 0.43] >= minWinRate 0.5 (wins 10, ties 0, losses 10, 0 unparseable)"
        );
        let losing = summary(10, 5, 25, 3);
        let Verdict::Rejected { why, summary } = decide(&done(&json(&losing)), 0.5) else {
            panic!("0.31 < 0.5 is rejected");
        };
        assert_eq!(
            why,
            "win rate 0.31 [0.20, 0.43] < minWinRate 0.5 (wins 10, ties 5, losses 25, 3 unparseable)"
        );
        assert_eq!(summary, losing);
    }

    #[test]
    fn a_tie_counts_half_a_win() {
        // 0 wins, 20 ties: 0.5, the baseline's equal.
        let ties = summary(0, 20, 0, 0);
        assert!(matches!(decide(&done(&json(&ties)), 0.5), Verdict::Passed { .. }));
        assert!(matches!(
            decide(&done(&json(&ties)), 0.51),
            Verdict::Rejected { .. }
        ));
    }

    #[test]
    fn no_parseable_verdict_never_passes() {
        let none = summary(0, 0, 0, 12);
        for min in [0.0, 0.5] {
            let Verdict::Rejected { why, .. } = decide(&done(&json(&none)), min) else {
                panic!("no evidence at minWinRate {min}");
            };
            assert!(
                why.contains("the judge gave no parseable verdict") && why.contains("12 unparseable"),
                "{why}"
            );
        }
        // A win rate without any decided verdict (a gate bug) is no evidence either.
        let odd = Summary {
            win_rate: Some(1.0),
            ..summary(0, 0, 0, 1)
        };
        assert!(matches!(
            decide(&done(&json(&odd)), 0.5),
            Verdict::Rejected { .. }
        ));
    }

    #[test]
    fn an_unreadable_summary_fails_clearly() {
        let Verdict::Failed { why } = decide(&done("all good!"), 0.5) else {
            panic!()
        };
        assert!(
            why.starts_with("evaluation failed: the gate's summary cannot be read")
                && why.contains("all good!"),
            "{why}"
        );
        let mut gone = done("");
        gone.runs.clear();
        assert!(matches!(decide(&gone, 0.5), Verdict::Rerun { why } if why.contains("is gone")));
        // A gate that could not write its summary left an empty message: run it again, never pass.
        assert!(matches!(decide(&done("  "), 0.5), Verdict::Rerun { .. }));
    }

    #[test]
    fn a_few_parsed_verdicts_among_many_unparsed_are_not_evidence() {
        let thin = Summary {
            win_rate: Some(1.0),
            ..summary(1, 0, 0, 159)
        };
        let Verdict::Rejected { why, .. } = decide(&done(&json(&thin)), 0.5) else {
            panic!("one win among 160 matches passed")
        };
        assert!(why.contains("159 of 160"), "{why}");
        // A summary whose rate disagrees with its counts is judged by its counts.
        let lying = Summary {
            win_rate: Some(0.9),
            ..summary(0, 0, 10, 0)
        };
        assert!(matches!(
            decide(&done(&json(&lying)), 0.5),
            Verdict::Rejected { .. }
        ));
    }

    #[test]
    fn a_failed_try_is_retried_and_a_failed_job_fails_with_the_gates_error() {
        let error = "judge http://judge/v1 unreachable: connection refused";
        let failed = GateRun {
            phase: PodPhase::Failed,
            message: Some(format!("{error}\n")),
        };
        let retrying = GateView {
            job: Some(GateJob::default()),
            runs: vec![failed.clone()],
        };
        let Verdict::Running {
            retried: Some(retried),
        } = decide(&retrying, 0.5)
        else {
            panic!()
        };
        assert!(
            retried.contains("failed 1 time(s)") && retried.contains(error),
            "{retried}"
        );
        let exhausted = GateView {
            job: Some(GateJob {
                failed: true,
                why_failed: Some("BackoffLimitExceeded: Job has reached the specified backoff limit".into()),
                ..GateJob::default()
            }),
            runs: vec![failed.clone(), failed.clone(), failed],
        };
        assert_eq!(
            decide(&exhausted, 0.5),
            Verdict::Failed {
                why: format!("evaluation failed: {error}")
            }
        );
        let silent = GateView {
            runs: Vec::new(),
            ..exhausted
        };
        let Verdict::Failed { why } = decide(&silent, 0.5) else {
            panic!()
        };
        assert!(why.contains("BackoffLimitExceeded"), "{why}");
    }

    #[test]
    fn long_messages_keep_their_end() {
        let log = format!("{}the real error", "x".repeat(5000));
        let e = excerpt(&log);
        assert!(e.ends_with("the real error") && e.chars().count() == EXCERPT_CHARS + 3);
    }

    #[test]
    fn a_summary_fills_the_status_with_the_report_on_the_claim() {
        let s = Summary {
            win_rate: Some(0.312_345),
            mean_score: Some(6.5),
            ..summary(10, 5, 25, 3)
        };
        let st = record(&s, "pvc://models/tuned/evaluation", 2);
        assert_eq!(st.win_rate, Some(0.3123));
        assert_eq!((st.wins, st.ties, st.losses, st.errors), (10, 5, 25, 3));
        assert_eq!(
            st.report.as_deref(),
            Some("pvc://models/tuned/evaluation/report.md")
        );
        assert_eq!((st.judge.as_deref(), st.attempt), (Some("gpt-4"), Some(2)));
    }

    #[test]
    fn only_a_true_annotation_promotes() {
        let mut job: FineTuneJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
            "spec": {"baseModel": {"path": "/m"}, "dataset": {"path": "/d.json"}, "hyperparameters": {},
                     "checkpoints": {"claimName": "c"}, "output": {"claimName": "o"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!promote_requested(&job));
        for (value, promoted) in [("true", true), ("True", true), ("false", false), ("yes", false)] {
            job.annotations_mut()
                .insert(names::PROMOTE_ANNOTATION.into(), value.into());
            assert_eq!(promote_requested(&job), promoted, "{value}");
        }
    }
}
