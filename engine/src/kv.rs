//! KV block bookkeeping: which pool blocks hold which request's keys and values. Logical only —
//! no tensors here; the model's [`pagoda_models::PagedKvCache`] holds the data.
use std::collections::HashMap;

use crate::request::RequestId;

/// Index of a block in the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// The free list of the pool. Blocks are handed out and returned whole.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<BlockId>,
    num_blocks: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        // Popping from the back hands out low ids first.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Self { free, num_blocks }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// `n` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        self.free.extend(blocks);
        debug_assert!(
            self.free.len() <= self.num_blocks,
            "a block was released twice"
        );
    }
}

/// Per-request block tables over a [`BlockPool`].
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<RequestId, Vec<BlockId>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Makes room for the request to hold `num_total_tokens` tokens. `false` (nothing allocated)
    /// when the pool cannot: the caller preempts someone and retries, or waits.
    pub fn allocate_slots(&mut self, id: RequestId, num_total_tokens: usize) -> bool {
        let have = self.tables.get(&id).map_or(0, Vec::len);
        let need = self.blocks_for(num_total_tokens).saturating_sub(have);
        if need == 0 {
            return true;
        }
        match self.pool.allocate(need) {
            Some(blocks) => {
                self.tables.entry(id).or_default().extend(blocks);
                true
            }
            None => false,
        }
    }

    /// Returns every block of the request to the pool.
    pub fn free(&mut self, id: RequestId) {
        if let Some(blocks) = self.tables.remove(&id) {
            self.pool.release(blocks);
        }
    }

    pub fn block_table(&self, id: RequestId) -> &[BlockId] {
        self.tables.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Pool slot of the request's token at `position`.
    pub fn slot(&self, id: RequestId, position: usize) -> u32 {
        let table = self.block_table(id);
        table[position / self.block_size].0 * self.block_size as u32
            + (position % self.block_size) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grows_tables_and_free_returns_everything() {
        let mut kv = KvCacheManager::new(4, 16);
        let a = RequestId(1);
        assert!(kv.allocate_slots(a, 1));
        assert_eq!(kv.block_table(a).len(), 1);
        assert!(kv.allocate_slots(a, 16));
        assert_eq!(kv.block_table(a).len(), 1);
        assert!(kv.allocate_slots(a, 17));
        assert_eq!(kv.block_table(a).len(), 2);
        assert_eq!(kv.slot(a, 17), kv.block_table(a)[1].0 * 16 + 1);
        // Not enough for 3 more blocks: nothing is taken.
        assert!(!kv.allocate_slots(RequestId(2), 48));
        assert_eq!(kv.num_free_blocks(), 2);
        assert!(kv.allocate_slots(RequestId(2), 32));
        assert_eq!(kv.num_free_blocks(), 0);
        kv.free(a);
        kv.free(RequestId(2));
        kv.free(RequestId(2));
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn pool_hands_out_distinct_blocks() {
        let mut pool = BlockPool::new(8);
        let a = pool.allocate(5).unwrap();
        let b = pool.allocate(3).unwrap();
        assert!(pool.allocate(1).is_none());
        let mut all: Vec<_> = a.iter().chain(&b).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8);
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.num_free(), 8);
    }
}
