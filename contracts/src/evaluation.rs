//! The promotion gate's contract between the operator and `camelid eval gate` in the evaluation Job.
//!
//! The operator fills [`GateSettings`] from a FineTuneJob's `spec.evaluation` and writes it as flags
//! ([`GateSettings::to_args`]); `camelid eval gate` parses the same struct (clap, feature `clap`). One name per
//! setting: the CRD's `evaluation.concurrency` is the flag `--concurrency`, `evaluation.judge.model` is
//! `--judge-model`. When the gate has judged, it writes a [`Summary`] as JSON to [`SUMMARY_PATH`], the container's
//! termination message, which the operator reads from the pod's status: no volume and no port between them. A
//! gate that fails writes its error there as plain text instead, so `kubectl describe pod` shows it too.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the gate writes its [`Summary`]: Kubernetes' default `terminationMessagePath`.
pub const SUMMARY_PATH: &str = "/dev/termination-log";

/// The kubelet keeps at most this many bytes of a termination message; a [`Summary`] fits well inside.
pub const SUMMARY_MAX_BYTES: usize = 4096;

/// The environment variable the gate reads the judge's API key from (the operator fills it from the Secret the
/// spec names).
pub const JUDGE_API_KEY_ENV: &str = "CAMELID_JUDGE_API_KEY";

/// The flags of `camelid eval gate`: answer the questions with the candidate and the baseline, judge them
/// pairwise in both orders, write the report and the [`Summary`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateSettings {
    /// The questions, in FastChat's `question.jsonl` format.
    #[cfg_attr(feature = "clap", arg(long))]
    pub questions: PathBuf,
    /// The OpenAI-compatible base URL serving the model under evaluation (ending in `/v1`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub candidate_url: String,
    /// The candidate's model name at that endpoint; also its `model_id` in the answer and judgment files.
    #[cfg_attr(feature = "clap", arg(long))]
    pub candidate_model: String,
    /// The OpenAI-compatible base URL serving the baseline.
    #[cfg_attr(feature = "clap", arg(long))]
    pub baseline_url: String,
    /// The baseline's model name at that endpoint.
    #[cfg_attr(feature = "clap", arg(long))]
    pub baseline_model: String,
    /// The judge's OpenAI-compatible base URL; its key comes from [`JUDGE_API_KEY_ENV`] when set.
    #[cfg_attr(feature = "clap", arg(long))]
    pub judge_url: String,
    /// The judge's model name, e.g. `gpt-4`.
    #[cfg_attr(feature = "clap", arg(long))]
    pub judge_model: String,
    /// Requests in flight to each endpoint.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Most tokens in each answer.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Most tokens in each judgment (default FastChat's 2048); a small local judge that never stops wants fewer.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_max_tokens: Option<u32>,
    /// Answer only the first this many questions of the file.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_questions: Option<u32>,
    /// The folder for the answer and judgment files and the report; a retried gate resumes from what is there.
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: PathBuf,
    /// Where the [`Summary`] goes.
    #[cfg_attr(feature = "clap", arg(long, default_value = SUMMARY_PATH))]
    #[serde(default = "summary_path")]
    pub summary: PathBuf,
}

fn summary_path() -> PathBuf {
    PathBuf::from(SUMMARY_PATH)
}

impl Default for GateSettings {
    fn default() -> Self {
        Self {
            questions: PathBuf::new(),
            candidate_url: String::new(),
            candidate_model: String::new(),
            baseline_url: String::new(),
            baseline_model: String::new(),
            judge_url: String::new(),
            judge_model: String::new(),
            concurrency: None,
            max_tokens: None,
            judge_max_tokens: None,
            max_questions: None,
            out: PathBuf::new(),
            summary: summary_path(),
        }
    }
}

impl GateSettings {
    /// The flags `camelid eval gate` parses back into the same struct.
    pub fn to_args(&self) -> Result<Vec<String>, serde_json::Error> {
        crate::flags::to_args(self)
    }
}

/// What the gate found: the candidate's pairwise record against the baseline (both orders judged; orders that
/// disagree are a tie, as FastChat counts them), the bootstrap interval of the win rate, and where the report is.
/// Whether that passes is the operator's decision (`minWinRate`), not the gate's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub candidate: String,
    pub baseline: String,
    /// The judge's model name.
    pub judge: String,
    pub wins: u32,
    pub ties: u32,
    pub losses: u32,
    /// Matches (a question's turn) left out because the verdict of one of the two orders could not be parsed;
    /// never guessed.
    pub errors: u32,
    /// (wins + ties / 2) / (wins + ties + losses); unset when no verdict could be parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate: Option<f64>,
    /// The 95% bootstrap interval of `winRate`, resampling questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate_low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub win_rate_high: Option<f64>,
    /// The candidate's mean single-answer score (1 to 10), when single-answer grading ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_score: Option<f64>,
    /// The report's file name inside the gate's `out` folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}

impl Summary {
    /// Wins, ties and losses: the verdicts that count.
    pub fn decided(&self) -> u32 {
        self.wins + self.ties + self.losses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_flags_carry_the_crd_names_in_kebab_case() {
        let s = GateSettings {
            questions: "/q/question.jsonl".into(),
            candidate_url: "http://127.0.0.1:8001/v1".into(),
            candidate_model: "vicuna".into(),
            judge_model: "gpt-4".into(),
            concurrency: Some(8),
            ..GateSettings::default()
        };
        let args = s.to_args().unwrap_or_default();
        let pairs: Vec<_> = args.chunks(2).map(|c| (c[0].as_str(), c[1].as_str())).collect();
        assert!(pairs.contains(&("--candidate-model", "vicuna")));
        assert!(pairs.contains(&("--judge-model", "gpt-4")));
        assert!(pairs.contains(&("--concurrency", "8")));
        assert!(pairs.contains(&("--summary", SUMMARY_PATH)));
        assert!(
            !args.contains(&"--max-tokens".to_string()),
            "unset settings are left to the gate"
        );
    }

    #[test]
    fn a_summary_fits_in_a_termination_message() {
        let s = Summary {
            candidate: "c".repeat(253),
            baseline: "b".repeat(253),
            judge: "j".repeat(253),
            wins: 1000,
            win_rate: Some(0.123_456_789),
            win_rate_low: Some(0.1),
            win_rate_high: Some(0.2),
            mean_score: Some(7.25),
            report: Some("report.html".into()),
            ..Summary::default()
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert!(json.len() < SUMMARY_MAX_BYTES);
        assert_eq!(serde_json::from_str::<Summary>(&json).ok(), Some(s));
    }
}
