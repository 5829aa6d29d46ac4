//! Every contract between two camelid processes, with one definition both sides compile against: what the
//! trainer reports on `/progress` and the operator reads, what the gateways report on `/internal/load` and the
//! autoscaler sums, the trainer's exit codes, the labels and ports the operator writes and the gateway watches,
//! the trainer's settings (one name per setting from the CRD field to the flag to the JSON key), and the
//! evaluation gate's settings and summary.
//!
//! Serde and hashing only: no Kubernetes, no libtorch, so every crate can depend on it.

pub mod evaluation;
pub mod exit;
pub mod flags;
pub mod load;
pub mod names;
pub mod progress;
pub mod settings;
pub mod worker_auth;
pub mod worker_limits;

pub use load::{LoadReport, ModelLoad};
pub use progress::{Phase, Progress};
pub use settings::TrainerSettings;
