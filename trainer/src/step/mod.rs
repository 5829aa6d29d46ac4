//! The step engines: how one optimizer step's forward and backward passes are computed, behind one interface for
//! the training loop. [`Engine`] when this process trains alone (the whole model, every activation-checkpointing
//! mode), [`ShardedEngine`] when it is one rank of several (ZeRO-3 sharding over c10d), and for LoRA over several
//! ranks the whole-model engine on every rank with the adapters' gradients summed over the gang (the base is
//! frozen, so there is nothing to shard but a few megabytes of adapters); [`Backend`] picks between them, and both compute the loss with [`head_loss`]'s chunked cross-entropy. The optimizer that consumes the
//! gradients lives apart, in [`crate::optim`].

pub mod engine;
pub mod fsdp;
pub mod head_loss;

use std::rc::Rc;
use std::time::{Duration, Instant};

use camelid_c10d::ProcessGroup;
use camelid_model::lora::LoraAdapter;

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
    /// LoRA on every rank of a gang: the same adapter everywhere, gradients all-reduced before clipping.
    Replicated(Box<Engine>, Rc<ProcessGroup>),
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
            (Backend::Single(e) | Backend::Replicated(e, _), Some(b)) => {
                Ok(e.micro_step(model, b, loss_scale)?)
            }
            (Backend::Single(_) | Backend::Replicated(..), None) => {
                Ok(Tensor::f_zeros([], (Kind::Double, model.device()))?)
            }
            (Backend::Sharded(e), b) => e.micro_step(model, b, loss_scale),
        }
    }

    /// Checkpoint names of [`Backend::masters`] and [`Backend::grads`]: parameter names, or shard names.
    pub fn names(&self) -> Vec<String> {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => e.names.clone(),
            Backend::Sharded(e) => e.shard_names(),
        }
    }

    /// The f32 tensors the optimizer updates (this rank's).
    pub fn masters(&self) -> &[Tensor] {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => &e.masters,
            Backend::Sharded(e) => &e.masters,
        }
    }

    pub fn grads(&self) -> &[Tensor] {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => &e.grads,
            Backend::Sharded(e) => &e.grads,
        }
    }

    /// Clips to a global norm (over every rank); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, TrainError> {
        match self {
            Backend::Single(e) => Ok(clip_grad_norm(&e.grads, max_norm)?),
            Backend::Replicated(e, group) => {
                let started = Instant::now();
                sum_over_gang(&e.grads, group)?;
                e.comm_time += started.elapsed();
                Ok(clip_grad_norm(&e.grads, max_norm)?)
            }
            Backend::Sharded(e) => e.clip_grad_norm(max_norm),
        }
    }

    /// After the optimizer step: clears the gradients (and refreshes a bf16 compute copy).
    pub fn finish_step(&mut self, model: &Llama) -> Result<(), TrainError> {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => Ok(e.finish_step(model)?),
            Backend::Sharded(e) => e.finish_step(),
        }
    }

    /// After masters were loaded from a checkpoint.
    pub fn after_restore(&mut self, model: &Llama) -> Result<(), TrainError> {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => Ok(e.refresh_compute_copy(model)?),
            Backend::Sharded(_) => Ok(()),
        }
    }

    /// Time spent in collectives since the last call (`None` for a single process).
    pub fn take_comm_time(&mut self) -> Option<Duration> {
        match self {
            Backend::Single(_) => None,
            Backend::Replicated(e, _) => Some(std::mem::take(&mut e.comm_time)),
            Backend::Sharded(e) => Some(e.take_comm_time()),
        }
    }

    /// Makes `model` whole on rank 0 for the export (in `kind`, when sharded).
    pub fn prepare_export(&mut self, model: &mut Llama, kind: Kind) -> Result<(), TrainError> {
        match self {
            Backend::Single(_) | Backend::Replicated(..) => Ok(()),
            Backend::Sharded(e) => e.gather_for_export(model, kind),
        }
    }

    /// The LoRA adapter a LoRA run trains.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        match self {
            Backend::Single(e) | Backend::Replicated(e, _) => e.adapter(),
            Backend::Sharded(_) => None,
        }
    }
}

/// Sums `grads` over the gang in one collective (flattened into one f32 vector and back).
fn sum_over_gang(grads: &[Tensor], group: &ProcessGroup) -> Result<(), TrainError> {
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.f_flatten(0, -1))
        .collect::<Result<_, _>>()?;
    let mut all = Tensor::f_cat(&flat, 0)?;
    group.all_reduce_sum(&mut all)?;
    let mut offset = 0;
    for g in grads {
        let n = g.numel() as i64;
        tch::no_grad(|| {
            g.shallow_clone()
                .f_copy_(&all.f_narrow(0, offset, n)?.f_view_as(g)?)
        })?;
        offset += n;
    }
    Ok(())
}
