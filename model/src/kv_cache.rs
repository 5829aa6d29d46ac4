//! The key/value cache of one sequence: per layer, keys and values of every position seen so far.
//!
//! Buffers grow by doubling (up to the model's context) so appending a token is a copy of one row, not a copy of
//! the whole history.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

#[derive(Debug)]
struct LayerBuf {
    keys: Tensor,
    values: Tensor,
}

/// Keys and values for one sequence (batch dimension 1), owned by that sequence.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerBuf>>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that can hold at most `max_len` positions.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            max_len,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes held by the buffers (allocated capacity, not just the used part).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.keys.numel() + l.values.numel()) * l.keys.kind().elt_size_in_bytes())
            .sum()
    }

    /// Appends `keys`/`values` (`[1, kv_heads, t, head_dim]`) of layer `layer` and returns the whole history
    /// including them. Every layer must be given the same `t` before [`KvCache::advance`] is called.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = keys.size()[2] as usize;
        let needed = self.len + new;
        let (shape, options) = (keys.size(), (keys.kind(), keys.device()));
        let len = self.len as i64;
        let buf = self.reserve(layer, needed, [shape[1], shape[3]], options)?;
        buf.keys.f_narrow(2, len, new as i64)?.f_copy_(keys)?;
        buf.values.f_narrow(2, len, new as i64)?.f_copy_(values)?;
        Ok((
            buf.keys.f_narrow(2, 0, needed as i64)?,
            buf.values.f_narrow(2, 0, needed as i64)?,
        ))
    }

    /// Layer `layer`'s buffers with room for `needed` positions of `[kv_heads, head_dim]`, grown (by doubling, up
    /// to the cache's bound) and their filled part copied when they are smaller.
    fn reserve(
        &mut self,
        layer: usize,
        needed: usize,
        [kv_heads, head_dim]: [i64; 2],
        (kind, device): (Kind, Device),
    ) -> Result<&mut LayerBuf> {
        let slot = &mut self.layers[layer];
        let current_cap = slot.as_ref().map_or(0, |l| l.keys.size()[2] as usize);
        if needed > current_cap {
            let cap = needed.max(current_cap * 2).max(16).min(self.max_len.max(needed));
            let shape = [1, kv_heads, cap as i64, head_dim];
            let grown = LayerBuf {
                keys: Tensor::f_zeros(shape, (kind, device))?,
                values: Tensor::f_zeros(shape, (kind, device))?,
            };
            if let Some(old) = slot.as_ref().filter(|_| self.len > 0) {
                grown
                    .keys
                    .f_narrow(2, 0, self.len as i64)?
                    .f_copy_(&old.keys.f_narrow(2, 0, self.len as i64)?)?;
                grown
                    .values
                    .f_narrow(2, 0, self.len as i64)?
                    .f_copy_(&old.values.f_narrow(2, 0, self.len as i64)?)?;
            }
            *slot = Some(grown);
        }
        slot.as_mut()
            .ok_or_else(|| crate::ModelError::InvalidRequest("a KV cache layer of no positions".into()))
    }

    /// Writes one position's keys and values (`kv_heads * head_dim` f32 each, head-major) at the next free
    /// position of layer `layer` of a CPU f32 cache. False (nothing written) when the layer's buffers are of
    /// another kind, as a cache filled by a GPU or f16 model is.
    pub(crate) fn write_next(
        &mut self,
        layer: usize,
        keys: &[f32],
        values: &[f32],
        head_dim: usize,
    ) -> Result<bool> {
        let kv_heads = keys.len() / head_dim.max(1);
        let other_kind = self.layers[layer]
            .as_ref()
            .is_some_and(|l| l.keys.kind() != Kind::Float);
        if other_kind || kv_heads == 0 || keys.len() != values.len() || keys.len() != kv_heads * head_dim {
            return Ok(false);
        }
        let (pos, needed) = (self.len, self.len + 1);
        let buf = self.reserve(
            layer,
            needed,
            [kv_heads as i64, head_dim as i64],
            (Kind::Float, Device::Cpu),
        )?;
        let cap = buf.keys.size()[2] as usize;
        if buf.keys.size() != [1, kv_heads as i64, cap as i64, head_dim as i64] {
            return Ok(false);
        }
        for (buffer, rows) in [(&mut buf.keys, keys), (&mut buf.values, values)] {
            let Some(data) = crate::storage::f32s_mut(buffer) else {
                return Ok(false);
            };
            for (h, row) in rows.chunks(head_dim).enumerate() {
                let at = (h * cap + pos) * head_dim;
                data[at..at + head_dim].copy_from_slice(row);
            }
        }
        Ok(true)
    }

    /// Layer `layer`'s whole key and value buffers (`[1, kv_heads, capacity, head_dim]`), once it has any.
    pub(crate) fn layer_buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|l| (&l.keys, &l.values))
    }

    /// Marks `t` more positions as filled once every layer has appended them.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
