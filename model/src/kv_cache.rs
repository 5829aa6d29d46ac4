//! The key/value cache of one sequence: per layer, keys and values of every position seen so far.
//!
//! A cache either owns its buffers (one sequence on its own: `generate`, evaluation, tests), which grow by
//! doubling up to the model's context so appending a token is a copy of one row, or lies in fixed-size blocks of a
//! [`BlockStore`] that many sequences share (a serving worker), listed by the sequence's block table. A block
//! holds [`BlockStore::block_size`] consecutive positions; which blocks a sequence may use, and which full blocks
//! hold a prefix that several sequences read, is the worker's block manager's business: a cache only reads the
//! blocks of its table and writes at its next positions.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::{Device, Kind, Tensor};

use crate::cpu_attention::{Rows, attend};
use crate::error::{ModelError, Result};

#[derive(Debug)]
struct LayerBuf {
    keys: Tensor,
    values: Tensor,
}

/// Keys and values of many sequences in blocks: per layer, `[num_blocks * block_size, kv_heads * head_dim]`, a
/// row per position (slot `block * block_size + offset`). Allocated once, uninitialised, so memory is committed
/// only as blocks are first written.
#[derive(Debug)]
pub struct BlockStore {
    layers: Vec<LayerBuf>,
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl BlockStore {
    /// A store of `num_blocks` blocks of `block_size` positions for a model's `num_layers` layers.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        [kv_heads, head_dim]: [usize; 2],
        (kind, device): (Kind, Device),
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(ModelError::InvalidRequest(
                "a KV block store needs blocks of at least one position".into(),
            ));
        }
        let shape = [(num_blocks * block_size) as i64, (kv_heads * head_dim) as i64];
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerBuf {
                    keys: Tensor::f_empty(shape, (kind, device))?,
                    values: Tensor::f_empty(shape, (kind, device))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
        })
    }

    /// Bytes one block takes over `num_layers` layers, keys and values, in `kind`: what sizes a store to a memory
    /// budget.
    pub fn block_bytes(
        num_layers: usize,
        block_size: usize,
        [kv_heads, head_dim]: [usize; 2],
        kind: Kind,
    ) -> usize {
        2 * num_layers * block_size * kv_heads * head_dim * kind.elt_size_in_bytes()
    }
}

/// A [`BlockStore`] shared by the caches that live in it.
pub type SharedBlocks = Arc<Mutex<BlockStore>>;

#[derive(Debug)]
enum Storage {
    Own {
        layers: Vec<Option<LayerBuf>>,
        max_len: usize,
    },
    Paged {
        store: SharedBlocks,
        blocks: Vec<u32>,
    },
}

/// Keys and values for one sequence (batch dimension 1).
#[derive(Debug)]
pub struct KvCache {
    storage: Storage,
    len: usize,
}

fn lock(store: &SharedBlocks) -> MutexGuard<'_, BlockStore> {
    // The store holds plain buffers with no invariant a panicking writer could break.
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KvCache {
    /// An empty cache for `num_layers` layers with its own buffers, holding at most `max_len` positions.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            storage: Storage::Own {
                layers: (0..num_layers).map(|_| None).collect(),
                max_len,
            },
            len: 0,
        }
    }

    /// A cache in `store`'s blocks `blocks` (in position order) whose first `len` positions are already filled
    /// (a cached prefix).
    pub fn paged(store: SharedBlocks, blocks: Vec<u32>, len: usize) -> Self {
        Self {
            storage: Storage::Paged { store, blocks },
            len,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold: its bound, or the positions of its blocks.
    pub fn max_len(&self) -> usize {
        match &self.storage {
            Storage::Own { max_len, .. } => *max_len,
            Storage::Paged { store, blocks } => blocks.len() * lock(store).block_size,
        }
    }

    /// Replaces a paged cache's block table (the worker's block manager grew it); its filled positions must keep
    /// their blocks.
    pub fn set_blocks(&mut self, table: &[u32]) {
        if let Storage::Paged { blocks, .. } = &mut self.storage {
            blocks.clear();
            blocks.extend_from_slice(table);
        }
    }

    /// Whether the CPU decode step can read and write this cache: CPU f32 buffers (or none yet).
    pub(crate) fn is_cpu_f32(&self) -> bool {
        let fits = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
        match &self.storage {
            Storage::Own { layers, .. } => layers.iter().flatten().all(|l| fits(&l.keys)),
            Storage::Paged { store, .. } => lock(store).layers.iter().all(|l| fits(&l.keys)),
        }
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
        let (len, needed) = (self.len, self.len + new);
        match &mut self.storage {
            Storage::Own { layers, max_len } => {
                let (shape, options) = (keys.size(), (keys.kind(), keys.device()));
                let dims = [shape[1], shape[3]];
                let buf = reserve(&mut layers[layer], len, needed, *max_len, dims, options)?;
                buf.keys.f_narrow(2, len as i64, new as i64)?.f_copy_(keys)?;
                buf.values.f_narrow(2, len as i64, new as i64)?.f_copy_(values)?;
                Ok((
                    buf.keys.f_narrow(2, 0, needed as i64)?,
                    buf.values.f_narrow(2, 0, needed as i64)?,
                ))
            }
            Storage::Paged { store, blocks } => {
                let mut store = lock(store);
                let slots = slot_tensor(&store, blocks, len..needed, keys.device())?;
                let history = slot_tensor(&store, blocks, 0..needed, keys.device())?;
                let (kv_heads, head_dim) = (store.kv_heads as i64, store.head_dim as i64);
                let buf = &mut store.layers[layer];
                let write_and_gather = |target: &mut Tensor, new_rows: &Tensor| -> Result<Tensor> {
                    let rows = new_rows
                        .f_select(0, 0)?
                        .f_permute([1, 0, 2])?
                        .f_reshape([new as i64, kv_heads * head_dim])?
                        .f_to_kind(target.kind())?;
                    let _ = target.f_index_copy_(0, &slots, &rows)?;
                    Ok(target
                        .f_index_select(0, &history)?
                        .f_view([needed as i64, kv_heads, head_dim])?
                        .f_permute([1, 0, 2])?
                        .f_unsqueeze(0)?
                        .f_to_kind(keys.kind())?)
                };
                let k = write_and_gather(&mut buf.keys, keys)?;
                let v = write_and_gather(&mut buf.values, values)?;
                Ok((k, v))
            }
        }
    }

    /// Writes one position's keys and values (`kv_heads * head_dim` f32 each, head-major) `ahead` positions
    /// past the filled ones (a step writes all its positions before it advances) in layer `layer` of a CPU f32
    /// cache. False (nothing written) when the cache is of another kind.
    pub(crate) fn write_ahead(
        &mut self,
        layer: usize,
        ahead: usize,
        keys: &[f32],
        values: &[f32],
        head_dim: usize,
    ) -> Result<bool> {
        let kv_heads = keys.len() / head_dim.max(1);
        if kv_heads == 0 || keys.len() != values.len() || keys.len() != kv_heads * head_dim {
            return Ok(false);
        }
        let pos = self.len + ahead;
        let needed = pos + 1;
        match &mut self.storage {
            Storage::Own { layers, max_len } => {
                // Growing a buffer of another kind would convert it: leave such a cache to the libtorch path. (A
                // paged store of another kind is turned away by `f32s_mut` below.)
                let other = |l: &LayerBuf| l.keys.kind() != Kind::Float || l.keys.device() != Device::Cpu;
                if layers[layer].as_ref().is_some_and(other) {
                    return Ok(false);
                }
                let options = (Kind::Float, Device::Cpu);
                let dims = [kv_heads as i64, head_dim as i64];
                let buf = reserve(&mut layers[layer], pos, needed, *max_len, dims, options)?;
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
            }
            Storage::Paged { store, blocks } => {
                let mut store = lock(store);
                if store.kv_heads * store.head_dim != keys.len() {
                    return Ok(false);
                }
                let slot = slot_of(&store, blocks, pos)?;
                let buf = &mut store.layers[layer];
                for (buffer, row) in [(&mut buf.keys, keys), (&mut buf.values, values)] {
                    let Some(data) = crate::storage::f32s_mut(buffer) else {
                        return Ok(false);
                    };
                    data[slot * row.len()..(slot + 1) * row.len()].copy_from_slice(row);
                }
            }
        }
        Ok(true)
    }

    /// Attention of one query (`heads * head_dim` f32) over the first `len` positions of layer `layer`, on the
    /// CPU, appended to `out`; false (nothing appended) when the cache is not CPU f32.
    pub(crate) fn attend(&self, layer: usize, q: &[f32], len: usize, out: &mut Vec<f32>) -> Result<bool> {
        Ok(with_views(&[self], layer, |views| {
            views[0].attend(q, len, 0..views[0].kv_heads(), out)
        })
        .unwrap_or(false))
    }

    /// Marks `t` more positions as filled once every layer has appended them.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// Where a cache layer's rows lie in its buffers.
#[derive(Clone, Copy)]
enum Layout<'c> {
    /// `[1, kv_heads, capacity, head_dim]`.
    Own { capacity: usize },
    /// A row per slot, `[slots, kv_heads * head_dim]`.
    Paged { blocks: &'c [u32], block_size: usize },
}

/// One cache layer as CPU attention reads it, borrowed for a step; plain slices, so the pool's threads can share it.
#[derive(Clone, Copy)]
pub(crate) struct AttentionView<'c> {
    rows: Rows<'c>,
    layout: Layout<'c>,
}

impl AttentionView<'_> {
    /// The layer's key/value heads: attention's units of work for one row.
    pub(crate) fn kv_heads(&self) -> usize {
        self.rows.kv_heads
    }

    /// [`attend`] of `q`'s heads that share key/value heads `kv` over the first `len` positions; false (nothing
    /// appended) when they are not all held.
    pub(crate) fn attend(&self, q: &[f32], len: usize, kv: Range<usize>, out: &mut Vec<f32>) -> bool {
        let (kv_heads, head_dim) = (self.rows.kv_heads, self.rows.head_dim);
        match self.layout {
            Layout::Own { capacity } if len <= capacity => {
                attend(q, &self.rows, len, kv, |h, p| (h * capacity + p) * head_dim, out)
            }
            Layout::Paged {
                blocks,
                block_size: b,
            } if len <= blocks.len() * b => {
                let at =
                    |h: usize, p: usize| ((blocks[p / b] as usize * b + p % b) * kv_heads + h) * head_dim;
                attend(q, &self.rows, len, kv, at, out)
            }
            _ => false,
        }
    }
}

/// `f` over layer `layer` of every cache as an [`AttentionView`], each store locked once for the whole call; None
/// when a cache is not CPU f32 or the caches live in more than one store.
pub(crate) fn with_views<R>(
    caches: &[&KvCache],
    layer: usize,
    f: impl FnOnce(&[AttentionView<'_>]) -> R,
) -> Option<R> {
    let mut stores = caches.iter().filter_map(|c| match &c.storage {
        Storage::Paged { store, .. } => Some(store),
        Storage::Own { .. } => None,
    });
    let first = stores.next();
    if let Some(first) = first
        && !stores.all(|s| Arc::ptr_eq(s, first))
    {
        return None;
    }
    let guard = first.map(lock);
    let mut views = Vec::with_capacity(caches.len());
    for cache in caches {
        let (keys, values, layout, [kv_heads, head_dim]) = match (&cache.storage, guard.as_deref()) {
            (Storage::Own { layers, .. }, _) => {
                let buf = layers.get(layer)?.as_ref()?;
                let [1, kv_heads, capacity, head_dim] = buf.keys.size()[..] else {
                    return None;
                };
                if buf.values.size() != buf.keys.size() {
                    return None;
                }
                let capacity = capacity as usize;
                let dims = [kv_heads as usize, head_dim as usize];
                (&buf.keys, &buf.values, Layout::Own { capacity }, dims)
            }
            (Storage::Paged { blocks, .. }, Some(store)) => {
                let buf = store.layers.get(layer)?;
                let layout = Layout::Paged {
                    blocks,
                    block_size: store.block_size,
                };
                (&buf.keys, &buf.values, layout, [store.kv_heads, store.head_dim])
            }
            (Storage::Paged { .. }, None) => return None,
        };
        let rows = Rows {
            keys: crate::storage::f32s(keys)?,
            values: crate::storage::f32s(values)?,
            head_dim,
            kv_heads,
        };
        views.push(AttentionView { rows, layout });
    }
    Some(f(&views))
}

/// The store slot of position `pos` of a sequence with block table `blocks`.
fn slot_of(store: &BlockStore, blocks: &[u32], pos: usize) -> Result<usize> {
    let b = store.block_size;
    match blocks.get(pos / b) {
        Some(&block) if (block as usize) < store.num_blocks => Ok(block as usize * b + pos % b),
        _ => Err(ModelError::InvalidRequest(format!(
            "the KV cache has no block for position {pos} ({} blocks of {b})",
            blocks.len()
        ))),
    }
}

/// The slots of `positions`, as an index tensor on `device`.
fn slot_tensor(
    store: &BlockStore,
    blocks: &[u32],
    positions: std::ops::Range<usize>,
    device: Device,
) -> Result<Tensor> {
    let slots: Vec<i64> = positions
        .map(|p| slot_of(store, blocks, p).map(|s| s as i64))
        .collect::<Result<_>>()?;
    Ok(Tensor::f_from_slice(&slots)?.f_to_device(device)?)
}

/// A layer's own buffers with room for `needed` positions of `[kv_heads, head_dim]`, grown (by doubling, up to
/// `max_len`) with the first `len` positions copied when they are smaller.
fn reserve(
    slot: &mut Option<LayerBuf>,
    len: usize,
    needed: usize,
    max_len: usize,
    [kv_heads, head_dim]: [i64; 2],
    (kind, device): (Kind, Device),
) -> Result<&mut LayerBuf> {
    let current_cap = slot.as_ref().map_or(0, |l| l.keys.size()[2] as usize);
    if needed > current_cap {
        let cap = needed.max(current_cap * 2).max(16).min(max_len.max(needed));
        let shape = [1, kv_heads, cap as i64, head_dim];
        let grown = LayerBuf {
            keys: Tensor::f_zeros(shape, (kind, device))?,
            values: Tensor::f_zeros(shape, (kind, device))?,
        };
        if let Some(old) = slot.as_ref().filter(|_| len > 0) {
            let len = len as i64;
            grown
                .keys
                .f_narrow(2, 0, len)?
                .f_copy_(&old.keys.f_narrow(2, 0, len)?)?;
            grown
                .values
                .f_narrow(2, 0, len)?
                .f_copy_(&old.values.f_narrow(2, 0, len)?)?;
        }
        *slot = Some(grown);
    }
    slot.as_mut()
        .ok_or_else(|| ModelError::InvalidRequest("a KV cache layer of no positions".into()))
}
