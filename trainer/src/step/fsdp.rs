//! Fully sharded data parallel training (ZeRO-3): no rank ever holds the whole model, its gradients or its
//! optimizer state.
//!
//! The parameters are grouped into units: one per decoder layer (`model.layers.N.*`) and one for the rest (the
//! embeddings, the final norm and an untied vocabulary projection). Each unit's parameters are flattened in
//! checkpoint order into one f32 vector, padded to a multiple of the world size, and each rank keeps only its
//! contiguous slice: the f32 master shard, its gradient shard and AdamW's two moments for it.
//!
//! A micro-batch runs layer by layer as the single-process engine's full activation checkpointing does: the
//! forward pass all-gathers a layer's shards (cast to the compute dtype) into place just before the layer runs
//! and swaps the layer out right after, keeping only the layer's input; backward gathers the layer again,
//! recomputes it with autograd on, pushes the gradient through, flattens the layer's parameter gradients,
//! reduce-scatters them (in f32) so that each rank adds only its slice, and frees the layer. The next layer's
//! all-gather is started before a layer computes (forward and backward), and a layer's reduce-scatter is waited for
//! only after the next layer's backward, so both run meanwhile on the process group's threads. The `rest` unit
//! stays gathered for the micro-batch (the embeddings are used at both ends). Gradient clipping uses the norm
//! over all ranks' shards, and AdamW updates only the local shard, so the update is the single-process update
//! computed in pieces.

use std::rc::Rc;
use std::time::{Duration, Instant};

use camelid_c10d::ProcessGroup;
use camelid_contracts::progress::ShardMemory;
use camelid_model::Llama;
use tch::{Device, Kind, TchError, Tensor};

use crate::data::batching::MicroBatch;
use crate::error::TrainError;
use crate::step::engine::EngineError;
use crate::step::head_loss::linear_cross_entropy;

/// One parameter inside a unit's flat vector.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    shape: Vec<i64>,
    offset: i64,
    numel: i64,
}

/// A group of parameters gathered and scattered together.
#[derive(Debug, Clone)]
struct Unit {
    /// `rest` or `layers.N`: the tensor names of its shards in checkpoints.
    label: String,
    slots: Vec<Slot>,
    /// Flat length, padded to a multiple of the world size.
    padded: i64,
}

/// A unit's all-gather in flight.
struct Gathering {
    unit: usize,
    full: Tensor,
    pending: camelid_c10d::Pending,
}

/// A unit's gradient reduce-scatter in flight: `mine` receives this rank's slice.
struct Reducing {
    unit: usize,
    mine: Tensor,
    pending: camelid_c10d::Pending,
}

pub struct ShardedEngine {
    group: Rc<ProcessGroup>,
    units: Vec<Unit>,
    /// f32 master shard per unit, `[padded / world]`.
    pub masters: Vec<Tensor>,
    /// f32 gradient shard per unit, summed over the micro-batches of the current step.
    pub grads: Vec<Tensor>,
    compute_kind: Kind,
    device: Device,
    /// Time spent inside collectives since the last [`ShardedEngine::take_comm_time`].
    comm: Duration,
}

impl std::fmt::Debug for ShardedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedEngine")
            .field("group", &self.group)
            .field("units", &self.units.len())
            .field("compute_kind", &self.compute_kind)
            .finish()
    }
}

fn unit_label(name: &str) -> String {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .map_or_else(|| "rest".to_string(), |(i, _)| format!("layers.{i}"))
}

impl ShardedEngine {
    /// Shards `model` (f32, whole, the same on every rank) and swaps every parameter out of it: from here on a
    /// parameter is whole only while its unit is gathered.
    pub fn new(model: &mut Llama, compute_kind: Kind, group: Rc<ProcessGroup>) -> Result<Self, TrainError> {
        let (rank, world) = (group.rank() as i64, group.world() as i64);
        let device = model.device();
        let mut units: Vec<Unit> = Vec::new();
        // Each unit's parameters, flattened (views of the model's tensors, not copies), in checkpoint order.
        let mut flats: Vec<Vec<Tensor>> = Vec::new();
        for (name, t) in model.named_parameters() {
            if t.kind() != Kind::Float {
                return Err(EngineError::Setup("master weights must be f32".into()).into());
            }
            let label = unit_label(&name);
            let index = match units.iter().position(|u| u.label == label) {
                Some(i) => i,
                None => {
                    units.push(Unit {
                        label,
                        slots: Vec::new(),
                        padded: 0,
                    });
                    flats.push(Vec::new());
                    units.len() - 1
                }
            };
            let unit = &mut units[index];
            let numel = t.numel() as i64;
            unit.slots.push(Slot {
                name,
                shape: t.size(),
                offset: unit.padded,
                numel,
            });
            unit.padded += numel;
            flats[index].push(t.f_detach()?.f_reshape([-1])?);
        }
        let mut masters = Vec::with_capacity(units.len());
        for (unit, mut parts) in units.iter_mut().zip(flats) {
            let total = unit.padded;
            unit.padded = (total + world - 1) / world * world;
            let shard_len = unit.padded / world;
            if unit.padded > total {
                parts.push(Tensor::f_zeros([unit.padded - total], (Kind::Float, device))?);
            }
            let flat = Tensor::f_cat(&parts, 0)?;
            // A copy of its own: the whole flat vector is freed at the end of the iteration.
            let mut shard = Tensor::f_empty([shard_len], (Kind::Float, device))?;
            shard.f_copy_(&flat.f_narrow(0, rank * shard_len, shard_len)?)?;
            masters.push(shard);
        }
        let grads = masters
            .iter()
            .map(Tensor::f_zeros_like)
            .collect::<Result<Vec<_>, _>>()?;
        let engine = Self {
            group,
            units,
            masters,
            grads,
            compute_kind,
            device,
            comm: Duration::ZERO,
        };
        for u in 0..engine.units.len() {
            engine.release(model, u)?;
        }
        Ok(engine)
    }

    pub fn memory(&self) -> ShardMemory {
        let bytes = |ts: &[Tensor]| ts.iter().map(|t| t.numel() as u64 * 4).sum::<u64>();
        let full: i64 = self
            .units
            .iter()
            .flat_map(|u| u.slots.iter().map(|s| s.numel))
            .sum();
        ShardMemory {
            rank: self.group.rank(),
            world: self.group.world(),
            parameter_bytes: bytes(&self.masters),
            gradient_bytes: bytes(&self.grads),
            optimizer_state_bytes: 0,
            full_parameter_bytes: full as u64 * 4,
        }
    }

    /// Checkpoint names of the local shards (`rest`, `layers.0`, ...), in the order of `masters` and `grads`.
    pub fn shard_names(&self) -> Vec<String> {
        self.units.iter().map(|u| u.label.clone()).collect()
    }

    /// Time spent in collectives since the last call.
    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut self.comm)
    }

    fn timed<T>(
        &mut self,
        f: impl FnOnce(&ProcessGroup) -> Result<T, camelid_c10d::DistError>,
    ) -> Result<T, TrainError> {
        let started = Instant::now();
        let out = f(&self.group);
        self.comm += started.elapsed();
        Ok(out?)
    }

    /// Starts all-gathering unit `u` in `kind` (the caller computes meanwhile; [`ShardedEngine::finish_gather`]
    /// puts it in place).
    fn start_gather(&mut self, u: usize, kind: Kind) -> Result<Gathering, TrainError> {
        let full = Tensor::f_empty([self.units[u].padded], (kind, self.device))?;
        let shard = self.masters[u].f_to_kind(kind)?;
        let pending = self.timed(|g| g.all_gather_start(&full, &shard))?;
        Ok(Gathering {
            unit: u,
            full,
            pending,
        })
    }

    /// Waits for a gather and swaps the unit's parameters into `model`; returns them (leaves that collect their
    /// gradients when `trainable`).
    fn finish_gather(
        &mut self,
        model: &mut Llama,
        gathering: Gathering,
        trainable: bool,
    ) -> Result<Vec<Tensor>, TrainError> {
        let Gathering { unit, full, pending } = gathering;
        self.timed(|_| pending.wait())?;
        let mut leaves = Vec::with_capacity(self.units[unit].slots.len());
        for slot in &self.units[unit].slots {
            let view = full
                .f_narrow(0, slot.offset, slot.numel)?
                .f_view(slot.shape.as_slice())?;
            let leaf = if trainable {
                view.set_requires_grad(true)
            } else {
                view
            };
            let _ = model.replace_parameter(&slot.name, leaf.shallow_clone())?;
            leaves.push(leaf);
        }
        Ok(leaves)
    }

    fn gather(
        &mut self,
        model: &mut Llama,
        u: usize,
        kind: Kind,
        trainable: bool,
    ) -> Result<Vec<Tensor>, TrainError> {
        let gathering = self.start_gather(u, kind)?;
        self.finish_gather(model, gathering, trainable)
    }

    /// Swaps unit `u`'s parameters out of `model` (so that its gathered storage is freed once the caller drops
    /// the leaves).
    fn release(&self, model: &mut Llama, u: usize) -> Result<(), TrainError> {
        for slot in &self.units[u].slots {
            let empty = Tensor::f_empty([0], (self.compute_kind, self.device))?;
            let _ = model.replace_parameter(&slot.name, empty)?;
        }
        Ok(())
    }

    /// Starts reduce-scattering unit `u`'s gradients (the leaves' `.grad`, plus `extra` for the parameter it
    /// names) in f32; [`ShardedEngine::finish_reduce`] adds this rank's slice into its gradient shard.
    fn start_reduce(
        &mut self,
        u: usize,
        leaves: &[Tensor],
        extra: Option<(&str, &Tensor)>,
    ) -> Result<Reducing, TrainError> {
        let unit = &self.units[u];
        let mut parts = Vec::with_capacity(unit.slots.len() + 1);
        let mut total = 0;
        for (slot, leaf) in unit.slots.iter().zip(leaves) {
            let g = leaf.f_grad()?;
            let mut flat = if g.defined() {
                g.f_to_kind(Kind::Float)?.f_reshape([-1])?
            } else {
                Tensor::f_zeros([slot.numel], (Kind::Float, self.device))?
            };
            if let Some((name, add)) = extra
                && name == slot.name
            {
                flat = flat.f_add(&add.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
            }
            parts.push(flat);
            total += slot.numel;
        }
        if unit.padded > total {
            parts.push(Tensor::f_zeros(
                [unit.padded - total],
                (Kind::Float, self.device),
            )?);
        }
        let flat = Tensor::f_cat(&parts, 0)?;
        let mine = self.grads[u].f_zeros_like()?;
        let pending = self.timed(|g| g.reduce_scatter_start(&mine, &flat))?;
        Ok(Reducing {
            unit: u,
            mine,
            pending,
        })
    }

    fn finish_reduce(&mut self, reducing: Reducing) -> Result<(), TrainError> {
        let Reducing { unit, mine, pending } = reducing;
        self.timed(|_| pending.wait())?;
        let _ = self.grads[unit].shallow_clone().f_add_(&mine)?;
        Ok(())
    }

    /// Forward and backward of this rank's micro-batch of the round, or only the round's collectives when this
    /// rank has no micro-batch in it (the last round of a step the ranks do not divide evenly). Returns the summed
    /// loss (0-dim f64 on the device, 0 without a batch); see [`crate::step::engine::Engine::micro_step`] for `loss_scale`.
    pub fn micro_step(
        &mut self,
        model: &mut Llama,
        batch: Option<&MicroBatch>,
        loss_scale: f64,
    ) -> Result<Tensor, TrainError> {
        let layers = self.units.len() - 1;
        let kind = self.compute_kind;
        let rest = self.gather(model, 0, kind, true)?;
        let mut loss = Tensor::f_zeros([], (Kind::Double, self.device))?;
        let rope = batch.map(|b| b.rope(model)).transpose()?;
        let embedded = batch.map(|b| model.embed(&b.input)).transpose()?;
        let mut x = embedded.as_ref().map(Tensor::f_detach).transpose()?;
        let mut saved = Vec::with_capacity(layers);
        // Each layer's gather is started before the previous layer computes (one layer of prefetch, forward and
        // backward), so communication overlaps compute.
        let mut next = if layers > 0 {
            Some(self.start_gather(1, kind)?)
        } else {
            None
        };
        for i in 0..layers {
            let current = next
                .take()
                .ok_or_else(|| EngineError::Setup("no gather in flight".into()))?;
            let _leaves = self.finish_gather(model, current, false)?;
            if i + 1 < layers {
                next = Some(self.start_gather(i + 2, kind)?);
            }
            if let (Some(input), Some(rope)) = (x.take(), rope.as_ref()) {
                let next = tch::no_grad(|| model.decoder_layer(i, &input, rope))?;
                saved.push(input);
                x = Some(next);
            }
            self.release(model, i + 1)?;
        }
        let mut next = if layers > 0 {
            Some(self.start_gather(layers, kind)?)
        } else {
            None
        };
        let (head_weight, head_name) = model.lm_head_weight();
        let head_name = head_name.to_string();
        let head_grad = head_weight.f_zeros_like()?.f_to_kind(Kind::Float)?;
        let mut grad = None;
        if let (Some(last), Some(batch)) = (x, batch) {
            let last = last.set_requires_grad(true);
            let normed = model.final_norm(&last)?;
            let flat = normed.f_view([-1, normed.size()[2]])?;
            let (sum, g) = linear_cross_entropy(
                &flat,
                head_weight,
                &batch.targets.f_view([-1])?,
                &batch.trainable_rows,
                loss_scale,
                Some(&head_grad),
            )?;
            flat.f_mul(&g)?.f_sum(flat.kind())?.f_backward()?;
            loss = sum;
            grad = Some(last.f_grad()?);
        }
        let mut reducing: Option<Reducing> = None;
        for i in (0..layers).rev() {
            let current = next
                .take()
                .ok_or_else(|| EngineError::Setup("no gather in flight".into()))?;
            let leaves = self.finish_gather(model, current, true)?;
            if i > 0 {
                next = Some(self.start_gather(i, kind)?);
            }
            if let (Some(g), Some(input), Some(rope)) = (grad.take(), saved.pop(), rope.as_ref()) {
                let input = input.set_requires_grad(true);
                let out = model.decoder_layer(i, &input, rope)?;
                out.f_mul(&g)?.f_sum(out.kind())?.f_backward()?;
                grad = Some(input.f_grad()?);
            }
            // The layer's reduce-scatter runs while the next layer recomputes; the previous one is done by now.
            let started = self.start_reduce(i + 1, &leaves, None)?;
            if let Some(previous) = reducing.replace(started) {
                self.finish_reduce(previous)?;
            }
            self.release(model, i + 1)?;
        }
        if let (Some(embedded), Some(g)) = (embedded, grad) {
            embedded.f_mul(&g)?.f_sum(embedded.kind())?.f_backward()?;
        }
        let rest_reducing = self.start_reduce(0, &rest, Some((&head_name, &head_grad)))?;
        if let Some(previous) = reducing.take() {
            self.finish_reduce(previous)?;
        }
        self.finish_reduce(rest_reducing)?;
        self.release(model, 0)?;
        Ok(loss)
    }

    /// Clips the gradient shards to a global L2 norm of `max_norm` (when `max_norm > 0`); returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, TrainError> {
        let local = tch::no_grad(|| -> Result<f64, TchError> {
            let mut sum = 0.0;
            for g in &self.grads {
                sum += f64::try_from(g.f_square()?.f_sum(Kind::Double)?)?;
            }
            Ok(sum)
        })?;
        let mut total = Tensor::f_from_slice(&[local])?.f_to_device(self.device)?;
        self.timed(|g| g.all_reduce_sum(&mut total))?;
        let norm = f64::try_from(&total.f_to_device(Device::Cpu)?)?.sqrt();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                tch::no_grad(|| -> Result<(), TchError> {
                    for g in &self.grads {
                        let _ = g.shallow_clone().f_mul_scalar_(coef)?;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(norm)
    }

    /// Clears the gradient shards after an optimizer step.
    pub fn finish_step(&mut self) -> Result<(), TrainError> {
        for g in &self.grads {
            let _ = g.shallow_clone().f_zero_()?;
        }
        Ok(())
    }

    /// Puts the whole model into `model` in `kind` on rank 0, one unit at a time (every rank takes part in the
    /// gathers; the others drop each unit at once), for the export. Rank 0 then holds one whole copy, in the
    /// export dtype, beside its shards.
    pub fn gather_for_export(&mut self, model: &mut Llama, kind: Kind) -> Result<(), TrainError> {
        let leader = self.group.rank() == 0;
        for u in 0..self.units.len() {
            let leaves = self.gather(model, u, kind, false)?;
            if !leader {
                drop(leaves);
                self.release(model, u)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_grouped_by_decoder_layer() {
        assert_eq!(unit_label("model.layers.12.mlp.up_proj.weight"), "layers.12");
        assert_eq!(unit_label("model.embed_tokens.weight"), "rest");
        assert_eq!(unit_label("model.norm.weight"), "rest");
        assert_eq!(unit_label("lm_head.weight"), "rest");
    }
}
