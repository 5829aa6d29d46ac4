//! LoRA on the decoder: an adapter attached to the projections for training (autograd through `s · B (A x)`),
//! merged into the weights, or applied per row in the CPU step so that sequences with different adapters (or
//! none) share one pass over the base weights.

use tch::{Kind, Tensor};

use super::{Linear, Llama};
use crate::cpu_gemv::DecodePool;
use crate::error::{ModelError, Result};
use crate::lora::{LORA_MODULES, LoraAdapter};
use crate::storage;

/// One adapter pair attached to a [`Linear`]: shares the adapter's tensors (and their gradients).
#[derive(Debug)]
pub(super) struct Attached {
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// Dropout probability on the adapter's input, applied only while training.
    dropout: Option<f64>,
}

impl Attached {
    /// `y + s · B (A dropout(x))`, computed in the adapter's f32 as PEFT does and returned in `y`'s dtype.
    pub(super) fn add_to(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let mut h = x.f_to_kind(self.a.kind())?;
        if let Some(p) = self.dropout {
            h = h.f_dropout(p, true)?;
        }
        let delta = h
            .f_linear(&self.a, None::<&Tensor>)?
            .f_linear(&self.b, None::<&Tensor>)?;
        let kind = y.kind();
        Ok(y.f_to_kind(Kind::Float)?
            .f_add(&delta.f_mul_scalar(self.scale)?)?
            .f_to_kind(kind)?)
    }
}

impl Llama {
    /// Layer `i`'s projections in [`LORA_MODULES`] order.
    fn lora_linears(&mut self, i: usize) -> [&mut Linear; 7] {
        let l = &mut self.layers[i];
        [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ]
    }

    fn check_adapter(&self, adapter: &LoraAdapter) -> Result<()> {
        if adapter.num_layers() != self.layers.len() {
            return Err(ModelError::InvalidRequest(format!(
                "the LoRA adapter has {} layers, the model {}",
                adapter.num_layers(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Computes every targeted projection as `W x + s · B (A x)` with `adapter`'s own tensors, so gradients
    /// reach them (the base weights stay as they are). `training` turns the adapter's dropout on.
    pub fn attach_lora(&mut self, adapter: &LoraAdapter, training: bool) -> Result<()> {
        self.check_adapter(adapter)?;
        let scale = adapter.config().scale();
        let p = adapter.config().dropout;
        let dropout = (training && p > 0.0).then_some(p);
        for i in 0..self.layers.len() {
            for (m, linear) in self.lora_linears(i).into_iter().enumerate() {
                linear.lora = adapter.pair(i, m).map(|pair| Attached {
                    a: pair.a.shallow_clone(),
                    b: pair.b.shallow_clone(),
                    scale,
                    dropout,
                });
            }
        }
        Ok(())
    }

    /// Removes an attached adapter.
    pub fn detach_lora(&mut self) {
        for i in 0..self.layers.len() {
            for linear in self.lora_linears(i) {
                linear.lora = None;
            }
        }
    }

    /// Adds `s · B A` into each targeted weight (in the weight's dtype): the merged model PEFT's
    /// `merge_and_unload` gives, which exports as a plain HF model.
    pub fn merge_lora(&mut self, adapter: &LoraAdapter) -> Result<()> {
        self.check_adapter(adapter)?;
        if self.is_quantized() {
            return Err(ModelError::Unsupported(
                "merging a LoRA adapter into quantized weights: load the base with --dtype f32 or bf16"
                    .into(),
            ));
        }
        let _guard = tch::no_grad_guard();
        for i in 0..self.layers.len() {
            for (m, linear) in self.lora_linears(i).into_iter().enumerate() {
                if let Some(delta) = adapter.delta(i, m)? {
                    let merged = linear
                        .weight
                        .f_to_kind(Kind::Float)?
                        .f_add(&delta.f_to_device(linear.weight.device())?)?;
                    linear.weight = merged.f_to_kind(linear.weight.kind())?;
                }
            }
        }
        Ok(())
    }
}

/// The adapter of each row of a CPU step (None: the base model), for adding `s · B (A x)` to its projections.
pub(super) struct RowAdapters<'a> {
    pub(super) rows: Vec<Option<&'a LoraAdapter>>,
}

impl RowAdapters<'_> {
    pub(super) fn any(&self) -> bool {
        self.rows.iter().any(Option::is_some)
    }

    /// Adds each row's adapter product for `site`, layer `layer`'s `modules`, to `out` (each row's outputs of the modules
    /// concatenated, `widths[j]` values for module `j`), from the rows' inputs `input` (`cols` values each).
    ///
    /// Rows of one adapter are taken together, so each adapter's `A` and `B` are read once per step whatever
    /// its number of rows, and the (adapter, module) products are spread over the pool's threads. Every row's
    /// sums run in the same order in any grouping, so a row's bits do not depend on its neighbours.
    pub(super) fn add(
        &self,
        (layer, modules): (usize, &[usize]),
        widths: &[usize],
        input: &[f32],
        cols: usize,
        out: &mut [f32],
        pool: &DecodePool<'_>,
    ) -> Result<()> {
        let total: usize = widths.iter().sum();
        let mut groups: Vec<(&LoraAdapter, Vec<usize>)> = Vec::new();
        for (r, adapter) in self.rows.iter().enumerate() {
            let Some(adapter) = adapter else { continue };
            match groups.iter_mut().find(|(a, _)| std::ptr::eq(*a, *adapter)) {
                Some((_, rows)) => rows.push(r),
                None => groups.push((adapter, vec![r])),
            }
        }
        let mut items = Vec::new();
        for (adapter, rows) in &groups {
            let mut offset = 0;
            for (&m, &width) in modules.iter().zip(widths) {
                if let Some(pair) = adapter.pair(layer, m) {
                    let (Some(a), Some(b)) = (storage::f32s(&pair.a), storage::f32s(&pair.b)) else {
                        return Err(ModelError::InvalidRequest(format!(
                            "LoRA weights of {} are not CPU f32",
                            LORA_MODULES[m]
                        )));
                    };
                    items.push(Product {
                        rows,
                        a,
                        b,
                        rank: adapter.config().rank,
                        scale: adapter.config().scale() as f32,
                        offset,
                        width,
                    });
                }
                offset += width;
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let parts = pool.parts();
        let work = |part: usize| -> Vec<f32> {
            let mut deltas = Vec::new();
            for item in items.iter().skip(part).step_by(parts) {
                item.compute(input, cols, &mut deltas);
            }
            deltas
        };
        for (part, deltas) in pool.split(&work).iter().enumerate() {
            let mut at = 0;
            for item in items.iter().skip(part).step_by(parts) {
                for &r in item.rows {
                    let dst = &mut out[r * total + item.offset..r * total + item.offset + item.width];
                    dst.iter_mut()
                        .zip(&deltas[at..at + item.width])
                        .for_each(|(y, d)| *y += d);
                    at += item.width;
                }
            }
        }
        Ok(())
    }
}

/// One adapter's product for one module over the rows that use the adapter.
struct Product<'s> {
    rows: &'s [usize],
    /// `[rank, cols]` and `[width, rank]`, row-major.
    a: &'s [f32],
    b: &'s [f32],
    rank: usize,
    scale: f32,
    /// Where the module's outputs start in a row of the step's outputs.
    offset: usize,
    width: usize,
}

impl Product<'_> {
    /// Appends `s · B (A x)` of each row (`width` values per row, in `rows` order) to `deltas`.
    fn compute(&self, input: &[f32], cols: usize, deltas: &mut Vec<f32>) {
        let n = self.rows.len();
        let mut low = vec![0f32; n * self.rank];
        for (k, a_row) in self.a.chunks_exact(cols).enumerate() {
            for (g, &r) in self.rows.iter().enumerate() {
                low[g * self.rank + k] = dot(a_row, &input[r * cols..(r + 1) * cols]);
            }
        }
        let start = deltas.len();
        deltas.resize(start + n * self.width, 0.0);
        for (o, b_row) in self.b.chunks_exact(self.rank).enumerate() {
            for g in 0..n {
                deltas[start + g * self.width + o] =
                    self.scale * dot(b_row, &low[g * self.rank..(g + 1) * self.rank]);
            }
        }
    }
}

/// A dot product in eight lanes (which the compiler vectorizes), in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}
