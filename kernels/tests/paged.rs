//! Paged attention against a plain contiguous causal attention, on random inputs with a shuffled
//! block pool, mixed prefill / chunked prefill / decode sequences and grouped-query heads.
use candle_core::{DType, Device, IndexOp, Tensor};
use pagoda_kernels::{paged_attention, reshape_and_cache, AttentionMetadata, PagedKvLayer};

/// Every device this build can run on (CUDA when compiled in and present).
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if let Ok(d) = Device::new_cuda(0) {
        out.push(d);
    }
    out
}

/// Reference: softmax(q k^T * scale + causal mask) v for one sequence, contiguous.
/// q `[q_len, H, D]`, k/v `[ctx, KVH, D]`; the queries are the last q_len positions.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (q_len, h, d) = q.dims3().unwrap();
    let (ctx, kvh, _) = k.dims3().unwrap();
    let group = h / kvh;
    let mut rows = Vec::new();
    for t in 0..q_len {
        let pos = ctx - q_len + t;
        let mut heads = Vec::new();
        for head in 0..h {
            let qh = q.i((t, head)).unwrap().reshape((1, d)).unwrap();
            let kh = k.i((0..=pos, head / group)).unwrap();
            let vh = v.i((0..=pos, head / group)).unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
            let p = candle_nn_softmax(&s);
            heads.push(p.matmul(&vh).unwrap().reshape(d).unwrap());
        }
        rows.push(Tensor::stack(&heads, 0).unwrap());
    }
    Tensor::stack(&rows, 0).unwrap()
}

fn candle_nn_softmax(s: &Tensor) -> Tensor {
    let max = s.max_keepdim(1).unwrap();
    let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
    let sum = e.sum_keepdim(1).unwrap();
    e.broadcast_div(&sum).unwrap()
}

struct Seq {
    /// Tokens already cached before this step.
    cached: usize,
    /// New tokens this step.
    new: usize,
}

fn run_case(
    device: &Device,
    dtype: DType,
    seqs: &[Seq],
    h: usize,
    kvh: usize,
    d: usize,
    bs: usize,
) {
    let num_blocks = 64;
    let cache = PagedKvLayer::zeros(num_blocks, bs, kvh, d, dtype, device).unwrap();
    // A shuffled pool so block tables are not the identity.
    let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
    free.swap(3, 40);
    free.swap(10, 20);
    let max_blocks = seqs
        .iter()
        .map(|s| (s.cached + s.new).div_ceil(bs))
        .max()
        .unwrap();
    let mut tables = Vec::new();
    let mut full_k = Vec::new();
    let mut full_v = Vec::new();
    for s in seqs {
        let ctx = s.cached + s.new;
        let mut table: Vec<u32> = (0..ctx.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
        let k = Tensor::randn(0f32, 1.0, (ctx, kvh, d), device).unwrap();
        let v = Tensor::randn(0f32, 1.0, (ctx, kvh, d), device).unwrap();
        // Cache the already-computed prefix in one call.
        if s.cached > 0 {
            let slots: Vec<u32> = (0..s.cached)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            reshape_and_cache(
                &k.i(0..s.cached).unwrap(),
                &v.i(0..s.cached).unwrap(),
                &cache,
                &slots,
            )
            .unwrap();
        }
        full_k.push(k);
        full_v.push(v);
        table.resize(max_blocks, 0);
        tables.push(table);
    }
    // This step: the new tokens of every sequence, flattened.
    let mut meta = AttentionMetadata::new(Vec::new(), vec![0], Vec::new(), Vec::new(), max_blocks);
    let mut qs = Vec::new();
    let mut new_k = Vec::new();
    let mut new_v = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let ctx = s.cached + s.new;
        for p in s.cached..ctx {
            meta.slot_mapping
                .push(tables[i][p / bs] * bs as u32 + (p % bs) as u32);
        }
        meta.query_start_loc.push(meta.slot_mapping.len() as u32);
        meta.seq_lens.push(ctx as u32);
        meta.block_tables.extend(&tables[i]);
        qs.push(Tensor::randn(0f32, 1.0, (s.new, h, d), device).unwrap());
        new_k.push(full_k[i].i(s.cached..ctx).unwrap());
        new_v.push(full_v[i].i(s.cached..ctx).unwrap());
    }
    let q = Tensor::cat(&qs, 0).unwrap();
    reshape_and_cache(
        &Tensor::cat(&new_k, 0).unwrap(),
        &Tensor::cat(&new_v, 0).unwrap(),
        &cache,
        &meta.slot_mapping,
    )
    .unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let out = paged_attention(&q.to_dtype(dtype).unwrap(), &cache, &meta, scale as f32).unwrap();
    assert_eq!(out.dims(), &[meta.num_tokens(), h, d]);
    let tol = if dtype == DType::F32 { 1e-5 } else { 3e-2 };
    for (i, s) in seqs.iter().enumerate() {
        // The reference runs on the CPU in f32 on the same (rounded) inputs.
        let round = |t: &Tensor| {
            t.to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let expected = reference(
            &round(&qs[i]),
            &round(&full_k[i]),
            &round(&full_v[i]),
            scale,
        );
        let start = meta.query_start_loc[i] as usize;
        let got = out
            .i(start..start + s.new)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let diff = (got - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < tol,
            "sequence {i} on {device:?} {dtype:?}: max abs diff {diff}"
        );
    }
}

#[test]
fn paged_attention_matches_contiguous_reference() {
    let seqs = [
        Seq { cached: 0, new: 7 },  // prefill
        Seq { cached: 20, new: 1 }, // decode across a block boundary
        Seq { cached: 16, new: 5 }, // chunked prefill starting on a block boundary
        Seq { cached: 3, new: 1 },  // short decode
        Seq {
            cached: 33,
            new: 12,
        }, // chunk spanning blocks
    ];
    for device in devices() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            run_case(&device, dtype, &seqs, 4, 2, 16, 16);
            run_case(&device, dtype, &seqs, 6, 6, 8, 4);
        }
    }
}

#[test]
fn bad_metadata_is_an_error_not_a_panic() {
    let device = Device::Cpu;
    let cache = PagedKvLayer::zeros(4, 4, 1, 8, DType::F32, &device).unwrap();
    let q = Tensor::zeros((2, 2, 8), DType::F32, &device).unwrap();
    let good = AttentionMetadata::new(vec![0, 1], vec![0, 2], vec![2], vec![0], 1);
    assert!(paged_attention(&q, &cache, &good, 1.0).is_ok());
    let mut out_of_pool = good.clone();
    out_of_pool.block_tables = vec![9];
    assert!(paged_attention(&q, &cache, &out_of_pool, 1.0).is_err());
    let mut too_long = good.clone();
    too_long.seq_lens = vec![5];
    assert!(paged_attention(&q, &cache, &too_long, 1.0).is_err());
    let mut bad_slot = good;
    bad_slot.slot_mapping = vec![0, 99];
    let k = Tensor::zeros((2, 1, 8), DType::F32, &device).unwrap();
    assert!(reshape_and_cache(&k, &k, &cache, &bad_slot.slot_mapping).is_err());
}
