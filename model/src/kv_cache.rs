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
        let slot = &mut self.layers[layer];
        let current_cap = slot.as_ref().map_or(0, |l| l.keys.size()[2] as usize);
        if needed > current_cap {
            let cap = needed.max(current_cap * 2).max(16).min(self.max_len.max(needed));
            let mut shape = keys.size();
            shape[2] = cap as i64;
            let (kind, device): (Kind, Device) = (keys.kind(), keys.device());
            let grown = LayerBuf {
                keys: Tensor::f_zeros(&shape, (kind, device))?,
                values: Tensor::f_zeros(&shape, (kind, device))?,
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
        let Some(buf) = slot.as_ref() else {
            unreachable!("allocated above")
        };
        buf.keys.f_narrow(2, self.len as i64, new as i64)?.f_copy_(keys)?;
        buf.values
            .f_narrow(2, self.len as i64, new as i64)?
            .f_copy_(values)?;
        Ok((
            buf.keys.f_narrow(2, 0, needed as i64)?,
            buf.values.f_narrow(2, 0, needed as i64)?,
        ))
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
