//! CPU paged attention (`pagoda_kernels::paged_attention`, the reference implementation the
//! CPU build runs): a decode step of 16 sequences with 512 cached tokens each, and a 512-token
//! prefill, for SmolLM2-135M's heads (9 query, 3 key/value, dim 64) and Llama-3-8B's (32, 8,
//! 128). Block size 16; f32; block tables deliberately not contiguous.
//!
//!   cargo bench -p pagoda-benches --bench paged_attention
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagoda_kernels::{paged_attention, AttentionMetadata, PagedKvLayer};

const BLOCK_SIZE: usize = 16;

struct Heads {
    name: &'static str,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

const HEADS: [Heads; 2] = [
    Heads {
        name: "smollm2",
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    },
    Heads {
        name: "llama3_8b",
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
    },
];

/// `num_seqs` sequences of `context` tokens whose last `q_len` are this step's queries.
fn metadata(num_seqs: usize, context: usize, q_len: usize) -> (AttentionMetadata, usize) {
    let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
    let num_blocks = num_seqs * blocks_per_seq;
    let (mut slots, mut starts, mut lens, mut tables) =
        (Vec::new(), vec![0u32], Vec::new(), Vec::new());
    for s in 0..num_seqs {
        // Interleave sequences' blocks: block b of sequence s is pool block b * num_seqs + s.
        let table: Vec<u32> = (0..blocks_per_seq)
            .map(|b| (b * num_seqs + s) as u32)
            .collect();
        for p in context - q_len..context {
            slots.push(table[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
        }
        starts.push(slots.len() as u32);
        lens.push(context as u32);
        tables.extend(table);
    }
    (
        AttentionMetadata::new(slots, starts, lens, tables, blocks_per_seq),
        num_blocks,
    )
}

fn attention(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut g = c.benchmark_group("paged_attention_cpu");
    for h in &HEADS {
        for (case, num_seqs, context, q_len) in
            [("decode_16x512", 16, 512, 1), ("prefill_512", 1, 512, 512)]
        {
            let (meta, num_blocks) = metadata(num_seqs, context, q_len);
            let shape = (num_blocks, BLOCK_SIZE, h.num_kv_heads, h.head_dim);
            let cache = PagedKvLayer {
                k: Tensor::randn(0f32, 1.0, shape, &device).unwrap(),
                v: Tensor::randn(0f32, 1.0, shape, &device).unwrap(),
            };
            let num_tokens = meta.num_tokens();
            let q =
                Tensor::randn(0f32, 1.0, (num_tokens, h.num_heads, h.head_dim), &device).unwrap();
            let scale = 1.0 / (h.head_dim as f32).sqrt();
            g.throughput(Throughput::Elements(num_tokens as u64));
            g.bench_function(format!("{}_{case}", h.name), |b| {
                b.iter(|| paged_attention(&q, &cache, &meta, scale).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
