//! Which KV blocks are free, who holds each, and which full blocks hold a prefix that later requests can reuse
//! (automatic prefix caching), as a state machine free of any model so it can be tested directly.
//!
//! A full block is registered under its exact content: the tokens it holds and the content id of the block
//! before it (a chain, so a block matches only behind the same whole prefix), plus a salt that separates
//! tenants' caches. Keys are compared in full, never by a hash alone, so no crafted prompt can collide into
//! another's keys and values. A block nobody holds stays cached, evictable, until a new allocation needs it
//! (least recently used first).

use std::collections::{BTreeMap, HashMap, VecDeque};

/// A block's index in the worker's block store.
pub type BlockId = u32;

/// What a full block's keys and values were computed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The content id of the block before it, or the salt's root for the first block.
    parent: Parent,
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Parent {
    Root(u64),
    Block(u64),
}

#[derive(Debug, Default, Clone)]
struct BlockState {
    holders: u32,
    /// The content id and key while the block is registered in the prefix cache.
    cached: Option<(u64, Key)>,
    /// When it was last released (its place in the eviction order).
    released_at: u64,
}

/// The free list, the holders of each block and the prefix cache.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Blocks nobody holds and nothing caches.
    free: VecDeque<BlockId>,
    /// Blocks nobody holds that still cache a prefix, by release time (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    index: HashMap<Key, BlockId>,
    next_content: u64,
    clock: u64,
    /// Prompt tokens looked up in the prefix cache, and those found (vLLM's counters, in tokens).
    pub queries: u64,
    pub hits: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            blocks: vec![BlockState::default(); num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            evictable: BTreeMap::new(),
            index: HashMap::new(),
            next_content: 0,
            clock: 0,
            queries: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks an allocation can take now: free ones and cached ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// The share of blocks held by running sequences, 0 to 1 (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.available() as f64 / self.blocks.len() as f64
    }

    /// Blocks needed for `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached full blocks that `tokens` starts with, taken (held) for the caller. At least one
    /// token is always left to compute, since the caller needs the last position's logits.
    pub fn take_prefix(&mut self, salt: u64, tokens: &[u32]) -> Vec<BlockId> {
        let most = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = Parent::Root(salt);
        let mut taken = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(most) {
            let key = Key {
                parent,
                tokens: chunk.into(),
            };
            let Some(&block) = self.index.get(&key) else {
                break;
            };
            let state = &mut self.blocks[block as usize];
            let Some((content, _)) = state.cached.as_ref() else {
                break;
            };
            parent = Parent::Block(*content);
            if state.holders == 0 {
                self.evictable.remove(&state.released_at);
            }
            state.holders += 1;
            taken.push(block);
        }
        taken
    }

    /// Counts one admitted request's lookup: `queried` prompt tokens, `hit` of them found cached. (A request
    /// waiting at the queue's head looks up every step; only the lookup it is admitted with counts.)
    pub fn record_lookup(&mut self, queried: usize, hit: usize) {
        self.queries += queried as u64;
        self.hits += hit as u64;
    }

    /// One block for the caller to fill: a free one, else the least recently released cached one (dropping it
    /// from the cache). None when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop_front() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                if let Some((_, key)) = self.blocks[block as usize].cached.take() {
                    self.index.remove(&key);
                }
                block
            }
        };
        self.blocks[block as usize].holders = 1;
        Some(block)
    }

    /// Lets go of `blocks`: one nobody holds any more becomes evictable if it caches a prefix, free otherwise.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            let Some(state) = self.blocks.get_mut(block as usize) else {
                continue;
            };
            state.holders = state.holders.saturating_sub(1);
            if state.holders > 0 {
                continue;
            }
            if state.cached.is_some() {
                // Released in reverse so a prefix's first blocks, shared the most, are evicted last.
                self.clock += 1;
                state.released_at = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }

    /// Registers the full blocks of a sequence whose first `filled` positions of `tokens` are computed into
    /// `table`, from block `from` on (those before are registered already, or were taken from the cache).
    /// Returns how many of its blocks are registered now. A block whose content is cached in another block
    /// already stays uncached (both hold the same values; the first keeps serving).
    pub fn register(
        &mut self,
        salt: u64,
        tokens: &[u32],
        table: &[BlockId],
        filled: usize,
        from: usize,
    ) -> usize {
        let full = (filled.min(tokens.len()) / self.block_size).min(table.len());
        let mut parent = Parent::Root(salt);
        for (i, &block) in table.iter().enumerate().take(full) {
            let state = &self.blocks[block as usize];
            if i >= from && state.cached.is_none() {
                let key = Key {
                    parent,
                    tokens: tokens[i * self.block_size..(i + 1) * self.block_size].into(),
                };
                if self.index.contains_key(&key) {
                    return i;
                }
                self.next_content += 1;
                self.index.insert(key.clone(), block);
                self.blocks[block as usize].cached = Some((self.next_content, key));
            }
            match &self.blocks[block as usize].cached {
                Some((content, _)) => parent = Parent::Block(*content),
                None => return i,
            }
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(m: &mut BlockManager, tokens: &[u32]) -> Vec<BlockId> {
        let table: Vec<BlockId> = (0..m.blocks_for(tokens.len()))
            .map(|_| m.allocate().expect("a free block"))
            .collect();
        m.register(0, tokens, &table, tokens.len(), 0);
        table
    }

    #[test]
    fn a_released_prefix_is_found_again_and_shared() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let first = filled(&mut m, &prompt);
        assert_eq!(first.len(), 3);
        m.release(&first);
        assert_eq!(m.available(), 8);
        // Two full blocks match; the partial third never does.
        let second = m.take_prefix(0, &prompt);
        assert_eq!(second, first[..2]);
        let third = m.take_prefix(0, &prompt);
        assert_eq!(third, first[..2], "held blocks are shared too");
        assert_eq!(m.available(), 6);
        m.release(&second);
        assert_eq!(m.available(), 6, "still held by the third");
        m.release(&third);
        assert_eq!(m.available(), 8);
    }

    #[test]
    fn the_last_token_is_always_computed() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..8).collect();
        let table = filled(&mut m, &prompt);
        m.release(&table);
        assert_eq!(
            m.take_prefix(0, &prompt).len(),
            1,
            "8 tokens: one block of hits, 4 tokens computed"
        );
    }

    #[test]
    fn a_block_matches_only_behind_the_same_prefix_and_salt() {
        let mut m = BlockManager::new(8, 2);
        let a = filled(&mut m, &[1, 2, 3, 4, 9]);
        m.release(&a);
        assert!(
            m.take_prefix(0, &[7, 7, 3, 4, 9]).is_empty(),
            "same second block, other first"
        );
        assert!(
            m.take_prefix(1, &[1, 2, 3, 4, 9]).is_empty(),
            "another tenant's salt"
        );
        assert_eq!(m.take_prefix(0, &[1, 2, 3, 5, 9]), a[..1]);
    }

    #[test]
    fn allocation_evicts_the_least_recently_released_cached_block() {
        let mut m = BlockManager::new(3, 2);
        let old = filled(&mut m, &[1, 2]);
        let newer = filled(&mut m, &[3, 4]);
        m.release(&old);
        m.release(&newer);
        let taken = m.allocate().expect("free block");
        assert!(
            !old.contains(&taken) && !newer.contains(&taken),
            "the free block goes first"
        );
        assert_eq!(m.allocate(), Some(old[0]), "then the oldest cached one");
        assert!(
            m.take_prefix(0, &[1, 2, 0]).is_empty(),
            "evicted: no longer found"
        );
        assert_eq!(m.take_prefix(0, &[3, 4, 0]), newer);
        assert_eq!(m.allocate(), None, "everything is held");
    }

    #[test]
    fn duplicate_content_stays_uncached_and_frees_normally() {
        let mut m = BlockManager::new(4, 2);
        let a = filled(&mut m, &[5, 6, 7]);
        let b: Vec<BlockId> = (0..2).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.register(0, &[5, 6, 7], &b, 3, 0), 0);
        m.release(&b);
        assert_eq!(m.available(), 2, "b's blocks are free, not cached");
        m.release(&a);
        assert_eq!(m.take_prefix(0, &[5, 6, 7]), a[..1]);
    }
}
