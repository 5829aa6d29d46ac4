//! camelid's model worker: one model on libtorch behind gRPC, with continuous batching.
//!
//! [`WorkerHandle`] is the entry point: it admits requests (a semaphore bounds running plus queued ones) and sends
//! them to the engine thread, which runs the [`scheduler::Scheduler`]'s steps over the model. [`grpc`] exposes a
//! handle as the `camelid.worker.v1.Worker` service and [`http`] serves its
//! metrics and health. [`engine`] holds the types the handle and the engine thread exchange.

pub mod adapters;
pub mod blocks;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod handle;
pub mod http;
pub mod load;
pub mod metrics;
mod running;
pub mod scheduler;

pub use engine::{Event, GenParams, Input, ModelInfo, WorkerConfig};
pub use error::WorkerError;
pub use handle::{Generation, WorkerHandle};
pub use load::ModelArgs;
