//! `GET /progress` on the trainer (rank 0 of each pod): where the run is. The operator copies it into the
//! FineTuneJob's status; `kubectl get finetunejobs` shows it.

use serde::{Deserialize, Serialize};

/// The path the trainer serves the document on.
pub const PATH: &str = "/progress";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Loading,
    Training,
    Checkpointing,
    Exporting,
    Stopped,
    Finished,
    Failed,
}

impl Phase {
    /// The wire name (`training`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Training => "training",
            Phase::Checkpointing => "checkpointing",
            Phase::Exporting => "exporting",
            Phase::Stopped => "stopped",
            Phase::Finished => "finished",
            Phase::Failed => "failed",
        }
    }
}

/// The newest complete checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastCheckpoint {
    pub step: u64,
    /// RFC 3339.
    pub time: String,
}

/// What one rank holds when it is one of several (sharded training), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMemory {
    pub rank: usize,
    pub world: usize,
    /// f32 master weights of the local shards.
    pub parameter_bytes: u64,
    /// f32 gradient accumulators of the local shards.
    pub gradient_bytes: u64,
    /// AdamW's two moments for the local shards (filled in once the optimizer exists).
    pub optimizer_state_bytes: u64,
    /// The whole model's f32 parameters, for comparison.
    pub full_parameter_bytes: u64,
}

/// The `/progress` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: Option<f64>,
    #[serde(default)]
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub last_checkpoint: Option<LastCheckpoint>,
    pub eta_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardMemory>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            phase: Phase::Loading,
            step: 0,
            total_steps: 0,
            epoch: 0.0,
            loss: None,
            learning_rate: 0.0,
            tokens_per_second: 0.0,
            last_checkpoint: None,
            eta_seconds: None,
            shards: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_round_trips_with_snake_case_keys() {
        let p = Progress {
            phase: Phase::Checkpointing,
            step: 3,
            last_checkpoint: Some(LastCheckpoint {
                step: 2,
                time: "2026-11-26T18:00:00Z".into(),
            }),
            ..Progress::default()
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["phase"], Phase::Checkpointing.as_str());
        assert!(v.get("total_steps").is_some() && v.get("shards").is_none());
        assert_eq!(serde_json::from_value::<Progress>(v).unwrap(), p);
    }

    #[test]
    fn an_unknown_phase_is_an_error_not_a_guess() {
        let err = serde_json::from_str::<Progress>(
            r#"{"phase": "dancing", "step": 0, "total_steps": 0, "epoch": 0, "loss": null,
                "tokens_per_second": 0, "last_checkpoint": null, "eta_seconds": null}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("dancing"), "{err}");
    }
}
