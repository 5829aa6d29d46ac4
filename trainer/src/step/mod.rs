//! The step engines: how one optimizer step's forward and backward passes are computed, behind one interface for
//! the training loop. [`Engine`] when this process trains alone (the whole model, every activation-checkpointing
//! mode), [`ShardedEngine`] when it is one rank of several (ZeRO-3 sharding over c10d); [`Backend`] picks between
//! them, and both compute the loss with [`head_loss`]'s chunked cross-entropy. The optimizer that consumes the
//! gradients lives apart, in [`crate::optim`].

pub mod engine;
pub mod fsdp;
pub mod head_loss;

use std::time::Duration;

use camelid_model::Llama;
use tch::{Kind, Tensor};

pub use self::engine::{Engine, EngineError};
pub use self::fsdp::ShardedEngine;
use crate::data::batching::MicroBatch;
use crate::error::TrainError;
use crate::optim::clip_grad_norm;

#[derive(Debug)]
pub enum Backend {
    Single(Box<Engine>),
    Sharded(ShardedEngine),
}

impl Backend {
    /// Forward and backward of `batch` (this rank's micro-batch of the round; `None` when it has none).
    pub fn micro_step(
        &mut self,
        model: &mut Llama,
        batch: Option<&MicroBatch>,
        loss_scale: f64,
    ) -> Result<Tensor, TrainError> {
        match (self, batch) {
            (Backend::Single(e), Some(b)) => Ok(e.micro_step(model, b, loss_scale)?),
            (Backend::Single(_), None) => Ok(Tensor::f_zeros([], (Kind::Double, model.device()))?),
            (Backend::Sharded(e), b) => e.micro_step(model, b, loss_scale),
        }
    }

    /// Checkpoint names of [`Backend::masters`] and [`Backend::grads`]: parameter names, or shard names.
    pub fn names(&self) -> Vec<String> {
        match self {
            Backend::Single(e) => e.names.clone(),
            Backend::Sharded(e) => e.shard_names(),
        }
    }

    /// The f32 tensors the optimizer updates (this rank's).
    pub fn masters(&self) -> &[Tensor] {
        match self {
            Backend::Single(e) => &e.masters,
            Backend::Sharded(e) => &e.masters,
        }
    }

    pub fn grads(&self) -> &[Tensor] {
        match self {
            Backend::Single(e) => &e.grads,
            Backend::Sharded(e) => &e.grads,
        }
    }

    /// Clips to a global norm (over every rank); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, TrainError> {
        match self {
            Backend::Single(e) => Ok(clip_grad_norm(&e.grads, max_norm)?),
            Backend::Sharded(e) => e.clip_grad_norm(max_norm),
        }
    }

    /// After the optimizer step: clears the gradients (and refreshes a bf16 compute copy).
    pub fn finish_step(&mut self, model: &Llama) -> Result<(), TrainError> {
        match self {
            Backend::Single(e) => Ok(e.finish_step(model)?),
            Backend::Sharded(e) => e.finish_step(),
        }
    }

    /// After masters were loaded from a checkpoint.
    pub fn after_restore(&mut self, model: &Llama) -> Result<(), TrainError> {
        match self {
            Backend::Single(e) => Ok(e.refresh_compute_copy(model)?),
            Backend::Sharded(_) => Ok(()),
        }
    }

    /// Time spent in collectives since the last call (`None` for a single process).
    pub fn take_comm_time(&mut self) -> Option<Duration> {
        match self {
            Backend::Single(_) => None,
            Backend::Sharded(e) => Some(e.take_comm_time()),
        }
    }

    /// Makes `model` whole on rank 0 for the export (in `kind`, when sharded).
    pub fn prepare_export(&mut self, model: &mut Llama, kind: Kind) -> Result<(), TrainError> {
        match self {
            Backend::Single(_) => Ok(()),
            Backend::Sharded(e) => e.gather_for_export(model, kind),
        }
    }
}
