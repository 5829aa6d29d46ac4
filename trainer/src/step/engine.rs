//! One training step over a LLaMA model: forward and backward decoder layer by decoder layer, gradients
//! accumulated in f32 next to f32 master weights, AdamW applied to the masters.
//!
//! With activation checkpointing, the forward pass keeps only each layer's input; backward recomputes one layer at a
//! time with autograd on and pushes the incoming gradient through it. Each layer's forward and backward touch only
//! that layer's parameters (named `model.layers.N.*`), the unit a sharded trainer will gather and scatter.
//!
//! On CPU the model computes in f32 and is its own master copy. With `bf16` compute (the GPU default) a bf16 copy
//! of the model runs forward and backward; its gradients are added into f32 accumulators and the updated masters
//! are copied back into it after every optimizer step.

use camelid_model::Llama;
use camelid_model::lora::LoraAdapter;
use tch::{Kind, TchError, Tensor};

use crate::config::Checkpointing;
use crate::data::batching::MicroBatch;
use crate::step::head_loss::linear_cross_entropy;

#[derive(Debug)]
pub struct Engine {
    /// Checkpoint names, in [`Llama::named_parameters`] order.
    pub names: Vec<String>,
    /// f32 master weights (the parameters of `model` itself when it computes in f32).
    pub masters: Vec<Tensor>,
    /// f32 gradient sums over the micro-batches of the current step.
    pub grads: Vec<Tensor>,
    /// The bf16 copy that computes, when the master model does not compute itself.
    compute: Option<Llama>,
    checkpointing: Checkpointing,
    index: std::collections::HashMap<String, usize>,
    /// LoRA training: the adapter whose tensors are the masters (the base is frozen).
    lora: Option<Lora>,
    /// Time in collectives since last taken (a replicated LoRA gang's gradient sums).
    pub comm_time: std::time::Duration,
}

/// What a LoRA run keeps beside the masters.
#[derive(Debug)]
struct Lora {
    /// Owns the adapter tensors the model's projections share.
    adapter: LoraAdapter,
    /// Seeds each layer's dropout masks from the run's seed, the micro-batch and the layer, so that a layer
    /// recomputed in backward draws the masks of its forward pass, and a resumed run those of the first.
    dropout_seed: Option<u64>,
}

/// What the forward pass keeps of one decoder layer for its backward.
struct Saved {
    input: Tensor,
    /// The MLP's gate and up projections (selective recomputation).
    gate_up: Option<(Tensor, Tensor)>,
}

impl Engine {
    /// Takes the master model (f32). With `compute_kind` other than f32 a copy in that dtype does the math.
    pub fn new(
        master: &Llama,
        compute_kind: Kind,
        checkpointing: Checkpointing,
    ) -> Result<Self, EngineError> {
        let named = master.named_parameters();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let masters: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        if masters.iter().any(|t| t.kind() != Kind::Float) {
            return Err(EngineError::Setup("master weights must be f32".into()));
        }
        let compute = if compute_kind == Kind::Float {
            for t in &masters {
                let _ = t.set_requires_grad(true);
            }
            None
        } else {
            let weights = named
                .iter()
                .map(|(n, t)| {
                    Ok((
                        n.clone(),
                        t.f_detach()?.f_to_kind(compute_kind)?.set_requires_grad(true),
                    ))
                })
                .collect::<Result<camelid_model::weights::Weights, TchError>>()?;
            Some(Llama::from_weights(master.config().clone(), weights)?)
        };
        let grads = masters
            .iter()
            .map(Tensor::f_zeros_like)
            .collect::<Result<Vec<_>, _>>()?;
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Ok(Self {
            names,
            masters,
            grads,
            compute,
            checkpointing,
            index,
            lora: None,
            comm_time: Default::default(),
        })
    }

    /// LoRA training: `adapter` is attached to `model` (frozen, in the dtype it computes in) and its f32 tensors
    /// are the only masters. Selective recomputation keeps the MLP's gate and up outputs without their
    /// adapters' graph, so LoRA recomputes whole layers instead (`full`).
    pub fn new_lora(
        model: &mut Llama,
        adapter: LoraAdapter,
        checkpointing: Checkpointing,
        seed: u64,
    ) -> Result<Self, EngineError> {
        for (_, t) in model.named_parameters() {
            let _ = t.set_requires_grad(false);
        }
        let named = adapter.named_parameters();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let masters: Vec<Tensor> = named.iter().map(|(_, t)| t.set_requires_grad(true)).collect();
        let grads = masters
            .iter()
            .map(Tensor::f_zeros_like)
            .collect::<Result<Vec<_>, _>>()?;
        model.attach_lora(&adapter, true)?;
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        let dropout_seed = (adapter.config().dropout > 0.0).then_some(seed);
        let checkpointing = match checkpointing {
            Checkpointing::Selective => Checkpointing::Full,
            other => other,
        };
        Ok(Self {
            names,
            masters,
            grads,
            compute: None,
            checkpointing,
            index,
            lora: Some(Lora {
                adapter,
                dropout_seed,
            }),
            comm_time: Default::default(),
        })
    }

    /// The LoRA adapter being trained.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().map(|l| &l.adapter)
    }

    /// Seeds libtorch's generator for layer `i` of `batch` when the adapter has dropout.
    fn seed_layer(&self, batch: &MicroBatch, i: usize) {
        if let Some(seed) = self.lora.as_ref().and_then(|l| l.dropout_seed) {
            let mixed = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(batch.position.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                .wrapping_add(i as u64);
            tch::manual_seed((mixed >> 1) as i64);
        }
    }

    fn compute_params(&self, master: &Llama) -> Vec<Tensor> {
        if self.lora.is_some() {
            return self.masters.iter().map(Tensor::shallow_clone).collect();
        }
        let model = self.compute.as_ref().unwrap_or(master);
        model
            .named_parameters()
            .into_iter()
            .map(|(_, t)| t.shallow_clone())
            .collect()
    }

    /// Forward and backward of one micro-batch; the loss summed over its trainable tokens is scaled by
    /// `loss_scale` (one over the step's trainable tokens, so that the step's gradient is the mean over every
    /// token of the global batch whatever the micro-batch split). Returns the unscaled summed loss as a 0-dim f64
    /// tensor on the model's device: reading it would make the host wait for the device, so callers add it up
    /// there and read it once per step.
    pub fn micro_step(
        &mut self,
        master: &Llama,
        batch: &MicroBatch,
        loss_scale: f64,
    ) -> Result<Tensor, EngineError> {
        let model = self.compute.as_ref().unwrap_or(master);
        let rope = batch.rope(model)?;
        let (head_weight, head_name) = model.lm_head_weight();
        // The vocabulary projection's gradient accumulator; a LoRA run leaves it frozen.
        let head_grad = match &self.lora {
            Some(_) => None,
            None => Some(
                &self.grads[*self
                    .index
                    .get(head_name)
                    .ok_or_else(|| EngineError::Setup(format!("no parameter {head_name}")))?],
            ),
        };
        // The loss and d(loss)/d(final hidden state), the vocabulary projection's gradient added on the side.
        let head = |last: &Tensor| -> Result<Tensor, EngineError> {
            let normed = model.final_norm(last)?;
            let hidden = normed.size()[2];
            let flat = normed.f_view([-1, hidden])?;
            let (loss, grad) = linear_cross_entropy(
                &flat,
                head_weight,
                &batch.targets.f_view([-1])?,
                &batch.trainable_rows,
                loss_scale,
                head_grad,
            )?;
            // d(sum(flat * grad))/dθ is the vector-Jacobian product of everything before the projection.
            flat.f_mul(&grad)?.f_sum(flat.kind())?.f_backward()?;
            Ok(loss)
        };
        let loss = if self.checkpointing == Checkpointing::None {
            let mut x = model.embed(&batch.input)?;
            for i in 0..model.config().num_layers {
                self.seed_layer(batch, i);
                x = model.decoder_layer(i, &x, &rope)?;
            }
            head(&x)?
        } else {
            let selective = self.checkpointing == Checkpointing::Selective;
            let embedded = model.embed(&batch.input)?;
            let mut saved = Vec::with_capacity(model.config().num_layers);
            let last = tch::no_grad(|| -> Result<Tensor, EngineError> {
                let mut x = embedded.f_detach()?;
                for i in 0..model.config().num_layers {
                    self.seed_layer(batch, i);
                    let mid = model.attention_block(i, &x, &rope)?;
                    let (gate, up) = model.mlp_gate_up(i, &model.mlp_norm(i, &mid)?)?;
                    let next = mid.f_add(&model.mlp_down(i, &gate, &up)?)?;
                    saved.push(Saved {
                        input: x,
                        gate_up: selective.then_some((gate, up)),
                    });
                    x = next;
                }
                Ok(x)
            })?;
            let last = last.set_requires_grad(true);
            let loss = head(&last)?;
            let mut grad = last.f_grad()?;
            for (i, layer) in saved.into_iter().enumerate().rev() {
                grad = match layer.gate_up {
                    None => {
                        let x = layer.input.f_detach()?.set_requires_grad(true);
                        self.seed_layer(batch, i);
                        let out = model.decoder_layer(i, &x, &rope)?;
                        out.f_mul(&grad)?.f_sum(out.kind())?.f_backward()?;
                        x.f_grad()?
                    }
                    Some((gate, up)) => {
                        self.layer_backward_selective(model, i, layer.input, gate, up, &grad, &rope)?
                    }
                };
            }
            // Frozen embeddings (LoRA) have nothing to receive the gradient.
            if embedded.requires_grad() {
                embedded.f_mul(&grad)?.f_sum(embedded.kind())?.f_backward()?;
            }
            loss
        };
        tch::no_grad(|| -> Result<(), TchError> {
            for (acc, p) in self.grads.iter().zip(self.compute_params(master)) {
                let mut g = p.f_grad()?;
                if g.defined() {
                    let _ = acc.shallow_clone().f_add_(&g.f_to_kind(Kind::Float)?)?;
                    let _ = g.f_zero_()?;
                }
            }
            Ok(())
        })?;
        Ok(loss)
    }

    /// Backward of decoder layer `i` from its kept input and MLP gate/up projections: the attention block is
    /// recomputed, the gate and up matmuls are not (their weight gradients are formed directly).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward_selective(
        &self,
        model: &Llama,
        i: usize,
        input: Tensor,
        gate: Tensor,
        up: Tensor,
        grad_out: &Tensor,
        rope: &camelid_model::llama::RopeTables,
    ) -> Result<Tensor, EngineError> {
        // down_proj(silu(gate) * up): gradients of down_proj and of the kept gate/up.
        let gate = gate.set_requires_grad(true);
        let up = up.set_requires_grad(true);
        let down = model.mlp_down(i, &gate, &up)?;
        down.f_mul(grad_out)?.f_sum(down.kind())?.f_backward()?;
        let (d_gate, d_up) = (gate.f_grad()?, up.f_grad()?);
        // Recompute the attention block and the MLP norm with autograd on.
        let x = input.set_requires_grad(true);
        let mid = model.attention_block(i, &x, rope)?;
        let normed = model.mlp_norm(i, &mid)?;
        let hidden = normed.size()[2];
        let grad_normed = tch::no_grad(|| -> Result<Tensor, EngineError> {
            let flat_normed = normed.f_detach()?.f_view([-1, hidden])?;
            let mut grad_normed: Option<Tensor> = None;
            for ((weight, bias, prefix), d) in model.mlp_gate_up_params(i).into_iter().zip([&d_gate, &d_up]) {
                let d = d.f_view([-1, d.size()[2]])?;
                let dw = d.f_tr()?.f_matmul(&flat_normed)?.f_to_kind(Kind::Float)?;
                self.accumulate(&format!("{prefix}.weight"), &dw)?;
                if bias.is_some() {
                    let db = d.f_sum_dim_intlist(&[0i64][..], false, Kind::Float)?;
                    self.accumulate(&format!("{prefix}.bias"), &db)?;
                }
                let dx = d.f_matmul(&weight.f_detach()?)?;
                grad_normed = Some(match grad_normed {
                    Some(g) => g.f_add(&dx)?,
                    None => dx,
                });
            }
            grad_normed
                .ok_or_else(|| EngineError::Setup("no MLP projections".into()))?
                .f_view(normed.size().as_slice())
                .map_err(EngineError::from)
        })?;
        // Residual: d(out)/d(mid) is the identity plus the path through the norm and the projections.
        normed
            .f_mul(&grad_normed)?
            .f_sum(normed.kind())?
            .f_add(&mid.f_mul(grad_out)?.f_sum(mid.kind())?)?
            .f_backward()?;
        Ok(x.f_grad()?)
    }

    fn accumulate(&self, name: &str, grad: &Tensor) -> Result<(), EngineError> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| EngineError::Setup(format!("no parameter {name}")))?;
        let _ = self.grads[i].shallow_clone().f_add_(grad)?;
        Ok(())
    }

    /// After the optimizer updated the masters: clears the accumulated gradients and refreshes the compute copy.
    pub fn finish_step(&mut self, master: &Llama) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), TchError> {
            for g in &self.grads {
                let _ = g.shallow_clone().f_zero_()?;
            }
            Ok(())
        })?;
        self.refresh_compute_copy(master)
    }

    /// Copies the masters into the compute copy (after an update, or after masters were loaded from a checkpoint).
    pub fn refresh_compute_copy(&mut self, master: &Llama) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), TchError> {
            if self.compute.is_some() {
                for (c, m) in self.compute_params(master).iter().zip(&self.masters) {
                    c.shallow_clone().f_copy_(m)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot set up training: {0}")]
    Setup(String),
    #[error(transparent)]
    Model(#[from] camelid_model::ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}
