//! The trainer's errors and the exit codes the operator relies on (see `docs/design.md`).

use std::path::PathBuf;

use camelid_contracts::exit;

use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::step::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] camelid_model::ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint named by `--resume PATH` cannot be used.
    #[error("--resume: {0}")]
    ResumeFrom(#[source] CheckpointError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective or the rendezvous failed: a peer died, hung past the timeout, or never came.
    #[error("process group: {0}")]
    Dist(#[from] camelid_c10d::DistError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    /// A short, stable name for metrics, events and logs.
    pub fn category(&self) -> &'static str {
        match self {
            TrainError::Config(_) => "invalid_config",
            TrainError::Data(e) => e.category(),
            TrainError::Model(e) => e.category(),
            TrainError::Checkpoint(e) | TrainError::ResumeFrom(e) => e.category(),
            TrainError::Engine(_) | TrainError::Torch(_) => "torch",
            TrainError::Io { .. } => "io",
            TrainError::Dist(e) => match e.category() {
                "rendezvous" => "dist_rendezvous",
                "collective" => "dist_collective",
                _ => "dist_invalid",
            },
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Config(_) | TrainError::Data(_) | TrainError::ResumeFrom(_) => exit::INVALID,
            TrainError::Checkpoint(CheckpointError::ConfigMismatch { .. }) => exit::INVALID,
            TrainError::Model(e) if e.is_user_error() => exit::INVALID,
            _ => exit::FAILED,
        }
    }
}
