//! camelid's trainer: Vicuna-style data handling, the training loop with our own AdamW, atomic checkpoints with
//! exact resume, progress reporting and export.
//!
//! The pipeline, module by module:
//! - [`data`]: the samples. Reading and cleaning conversations ([`data::markdown`] repairs scraped HTML),
//!   [`data::tokenize`] renders, splits and labels them, [`data::batching`] orders and collates them.
//! - [`step`]: the step engines, behind [`step::Backend`]: [`step::engine`] runs a step layer by layer in one
//!   process, [`step::fsdp`] sharded over the ranks of a gang, both with [`step::head_loss`]'s chunked loss.
//! - [`optim`] updates the masters, [`checkpoint`] saves and verifies, [`progress`] reports.
//! - [`torchrun`]: this process's place in a gang (torchrun's environment) and the loop's own collectives;
//!   [`launch`] starts a gang on one machine.
//! - [`train`] ties it together, phase by phase.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod launch;
pub mod optim;
pub mod progress;
pub mod step;
pub mod torchrun;
pub mod train;

pub use error::TrainError;
