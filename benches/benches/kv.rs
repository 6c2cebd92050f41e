//! KV block bookkeeping: the free list (`BlockPool`) and per-request block tables
//! (`KvCacheManager`), the work the scheduler does for every running request each step.
//!
//!   cargo bench -p pagoda-benches --bench kv
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagoda_engine::kv::{BlockPool, KvCacheManager};
use pagoda_engine::RequestId;

fn block_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_pool");
    for n in [1usize, 32] {
        let mut pool = BlockPool::new(65_536);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("allocate_release_{n}"), |b| {
            b.iter(|| {
                let blocks = pool.allocate(black_box(n)).expect("the pool has room");
                pool.release(black_box(blocks));
            })
        });
    }
    g.finish();
}

/// 256 requests each grow a 512-token context one block at a time (as decode does), then all
/// are freed: 256 × 32 `allocate_slots` calls (the elements) and 256 frees per iteration.
fn kv_manager(c: &mut Criterion) {
    const NUM_SEQS: u64 = 256;
    const BLOCK_SIZE: usize = 16;
    const CONTEXT: usize = 512;
    let mut kv = KvCacheManager::new(NUM_SEQS as usize * CONTEXT / BLOCK_SIZE, BLOCK_SIZE);
    let mut g = c.benchmark_group("kv_manager");
    g.throughput(Throughput::Elements(
        NUM_SEQS * (CONTEXT / BLOCK_SIZE) as u64,
    ));
    g.bench_function("grow_256_seqs_to_512_tokens_then_free", |b| {
        b.iter(|| {
            for tokens in (BLOCK_SIZE..=CONTEXT).step_by(BLOCK_SIZE) {
                for id in 0..NUM_SEQS {
                    assert!(kv.allocate_slots(RequestId(id), tokens));
                }
            }
            for id in 0..NUM_SEQS {
                kv.free(RequestId(id));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, block_pool, kv_manager);
criterion_main!(benches);
