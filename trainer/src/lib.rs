//! camelid's trainer: Vicuna-style data handling, the training loop with our own AdamW, atomic checkpoints with
//! exact resume, progress reporting and export.
//!
//! The pipeline: [`data`] reads and cleans conversations ([`markdown`] repairs scraped HTML), [`dataset`]
//! renders, splits and labels them, [`batching`] orders them, [`engine`] runs a step layer by layer ([`fsdp`] sharded over the ranks of [`dist`], both behind
//! [`backend`]),
//! [`optim`] updates, [`checkpoint`] saves and verifies, [`progress`] reports, [`train`] ties it together.

pub mod backend;
pub mod batching;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod dist;
pub mod engine;
pub mod error;
pub mod fsdp;
pub mod head_loss;
pub mod launch;
pub mod markdown;
pub mod optim;
pub mod progress;
mod run;
pub mod train;

pub use error::TrainError;
