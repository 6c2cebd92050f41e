//! Paged KV cache and paged attention (vLLM's PagedAttention idea): a sequence's keys and values
//! live in fixed-size blocks anywhere in a pool; a block table maps its logical blocks to pool
//! blocks and a slot mapping says where each new token's key and value go.
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::float::{axpy, contiguous, dot, Float};

/// One layer's share of the KV pool: keys and values `[num_blocks, block_size, num_kv_heads,
/// head_dim]`, contiguous, on the model's device.
#[derive(Clone, Debug)]
pub struct PagedKvLayer {
    pub k: Tensor,
    pub v: Tensor,
}

impl PagedKvLayer {
    /// A zeroed layer cache.
    pub fn zeros(
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks, block_size, num_kv_heads, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
        })
    }

    pub fn block_size(&self) -> usize {
        self.k.dims()[1]
    }
}

/// Where the step's tokens belong, host side. Built by the engine's runner for each step.
///
/// The step's query tokens are flattened: sequence `i` owns tokens
/// `query_start_loc[i]..query_start_loc[i + 1]`, which are the last `q_len` of its `seq_lens[i]`
/// tokens (everything before them is already in the cache). Its logical block `b` is pool block
/// `block_tables[i * max_blocks_per_seq + b]`.
#[derive(Clone, Debug, Default)]
pub struct AttentionMetadata {
    /// `[num_tokens]`: pool slot (`block * block_size + offset`) of each token's key and value.
    pub slot_mapping: Vec<u32>,
    /// `[num_seqs + 1]`, starting at 0.
    pub query_start_loc: Vec<u32>,
    /// `[num_seqs]`: context length of each sequence after this step (cached + new tokens).
    pub seq_lens: Vec<u32>,
    /// `[num_seqs * max_blocks_per_seq]`, padded with 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// The same on the device, uploaded by the first CUDA kernel that needs it and shared by
    /// every layer of the step. Build the metadata once per step; don't edit it after use.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) on_device: DeviceCopy,
}

/// Lazily uploaded device copy of the metadata (empty without CUDA). A clone starts empty, so
/// an edited clone never reuses a stale upload.
#[derive(Debug, Default)]
pub(crate) struct DeviceCopy {
    #[cfg(feature = "cuda")]
    pub(crate) cell: std::sync::OnceLock<std::sync::Arc<crate::cuda::DeviceMetadata>>,
}

impl Clone for DeviceCopy {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl AttentionMetadata {
    pub fn new(
        slot_mapping: Vec<u32>,
        query_start_loc: Vec<u32>,
        seq_lens: Vec<u32>,
        block_tables: Vec<u32>,
        max_blocks_per_seq: usize,
    ) -> Self {
        Self {
            slot_mapping,
            query_start_loc,
            seq_lens,
            block_tables,
            max_blocks_per_seq,
            on_device: DeviceCopy::default(),
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// Absolute position of every query token, `[num_tokens]`.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for (i, &seq_len) in self.seq_lens.iter().enumerate() {
            let q_len = self.query_start_loc[i + 1] - self.query_start_loc[i];
            out.extend(seq_len - q_len..seq_len);
        }
        out
    }

    fn check(&self, block_size: usize, num_blocks: usize) -> Result<()> {
        let n = self.num_seqs();
        if self.query_start_loc.len() != n + 1 || self.query_start_loc[0] != 0 {
            candle_core::bail!(
                "attention metadata: query_start_loc must have num_seqs + 1 entries from 0"
            );
        }
        if self.query_start_loc[n] as usize != self.num_tokens() {
            candle_core::bail!("attention metadata: query_start_loc does not end at num_tokens");
        }
        if self.block_tables.len() != n * self.max_blocks_per_seq {
            candle_core::bail!(
                "attention metadata: block_tables is not num_seqs * max_blocks_per_seq"
            );
        }
        for i in 0..n {
            let q_len = self.query_start_loc[i + 1].checked_sub(self.query_start_loc[i]);
            let seq_len = self.seq_lens[i] as usize;
            match q_len {
                Some(q) if (q as usize) <= seq_len => {}
                _ => candle_core::bail!("attention metadata: sequence {i} has a bad query range"),
            }
            if seq_len.div_ceil(block_size) > self.max_blocks_per_seq {
                candle_core::bail!(
                    "attention metadata: sequence {i} needs more blocks than its table has"
                );
            }
        }
        let num_slots = (num_blocks * block_size) as u32;
        if self.slot_mapping.iter().any(|&s| s >= num_slots)
            || self.block_tables.iter().any(|&b| b as usize >= num_blocks)
        {
            candle_core::bail!("attention metadata: slot or block out of the pool");
        }
        Ok(())
    }
}

/// Writes the step's new keys and values `[T, KVH, D]` into their slots of `cache`.
pub fn reshape_and_cache(
    k: &Tensor,
    v: &Tensor,
    cache: &PagedKvLayer,
    slot_mapping: &[u32],
) -> Result<()> {
    let (num_tokens, num_kv_heads, head_dim) = k.dims3()?;
    if v.dims() != k.dims() || num_tokens != slot_mapping.len() {
        candle_core::bail!(
            "reshape_and_cache: k {:?}, v {:?}, {} slots",
            k.shape(),
            v.shape(),
            slot_mapping.len()
        );
    }
    let (_, _, ckvh, cd) = cache.k.dims4()?;
    if (ckvh, cd) != (num_kv_heads, head_dim) {
        candle_core::bail!(
            "reshape_and_cache: cache {:?} vs k {:?}",
            cache.k.shape(),
            k.shape()
        );
    }
    let num_slots = cache.k.dims()[0] * cache.block_size();
    if slot_mapping.iter().any(|&s| s as usize >= num_slots) {
        candle_core::bail!("reshape_and_cache: slot out of the pool ({num_slots} slots)");
    }
    let op = WriteSlots { slot_mapping };
    let k = k.to_dtype(cache.k.dtype())?.contiguous()?;
    let v = v.to_dtype(cache.v.dtype())?.contiguous()?;
    cache.k.inplace_op2(&k, &op)?;
    cache.v.inplace_op2(&v, &op)
}

struct WriteSlots<'a> {
    slot_mapping: &'a [u32],
}

impl WriteSlots<'_> {
    fn write<T: WithDType>(
        &self,
        dst: &mut [T],
        dst_l: &Layout,
        src: &[T],
        src_l: &Layout,
    ) -> Result<()> {
        let (Some((d0, d1)), Some((s0, s1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("reshape_and_cache: tensors must be contiguous");
        };
        let dst = &mut dst[d0..d1];
        let src = &src[s0..s1];
        let row = src.len() / self.slot_mapping.len().max(1);
        for (t, &slot) in self.slot_mapping.iter().enumerate() {
            let at = slot as usize * row;
            dst[at..at + row].copy_from_slice(&src[t * row..(t + 1) * row]);
        }
        Ok(())
    }
}

impl candle_core::InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "reshape-and-cache"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
    ) -> Result<()> {
        crate::cuda::write_slots(dst, dst_l, src, src_l, self.slot_mapping)
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.write(d, l1, s, l2),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.write(d, l1, s, l2),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.write(d, l1, s, l2),
            _ => candle_core::bail!("reshape_and_cache: unsupported dtype"),
        }
    }
}

/// Causal attention of the step's query tokens `[T, H, D]` over the paged cache (which already
/// holds this step's keys and values, see [`reshape_and_cache`]). Grouped-query attention: query
/// head `h` reads key/value head `h / (H / KVH)`. Returns `[T, H, D]` in the query's dtype.
pub fn paged_attention(
    q: &Tensor,
    cache: &PagedKvLayer,
    meta: &AttentionMetadata,
    scale: f32,
) -> Result<Tensor> {
    let (num_tokens, num_heads, head_dim) = q.dims3()?;
    let (num_blocks, block_size, num_kv_heads, cd) = cache.k.dims4()?;
    if cd != head_dim || num_heads % num_kv_heads != 0 || num_tokens != meta.num_tokens() {
        candle_core::bail!(
            "paged_attention: q {:?}, cache {:?}, {} tokens in metadata",
            q.shape(),
            cache.k.shape(),
            meta.num_tokens()
        );
    }
    meta.check(block_size, num_blocks)?;
    let in_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let op = PagedAttention {
        meta,
        scale,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    };
    let out = q.apply_op3_no_bwd(&cache.k, &cache.v, &op)?;
    out.to_dtype(in_dtype)
}

struct PagedAttention<'a> {
    meta: &'a AttentionMetadata,
    scale: f32,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl PagedAttention<'_> {
    /// One query token (at `pos` of sequence `seq`) against its context, for the query heads
    /// that share key/value head `kvh` (read once for all of them). `q` and `out` are those
    /// heads' `[group, D]`; `scores` is scratch.
    fn attend<T: Float>(
        &self,
        q: &[f32],
        (k, v): (&[T], &[T]),
        (seq, pos, kvh): (usize, usize, usize),
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        let (d, bs) = (self.head_dim, self.block_size);
        let group = self.num_heads / self.num_kv_heads;
        let table = &self.meta.block_tables
            [seq * self.meta.max_blocks_per_seq..(seq + 1) * self.meta.max_blocks_per_seq];
        let ctx = pos + 1;
        let row = self.num_kv_heads * d;
        let at = |p: usize| (table[p / bs] as usize * bs + p % bs) * row + kvh * d;
        // scores[j * ctx + p]: head j of the group at position p.
        scores.clear();
        scores.resize(group * ctx, 0.0);
        for p in 0..ctx {
            let kr = &k[at(p)..at(p) + d];
            for j in 0..group {
                scores[j * ctx + p] = dot(kr, &q[j * d..(j + 1) * d]) * self.scale;
            }
        }
        for sj in scores.chunks_mut(ctx) {
            let max = sj.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in sj.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            sj.iter_mut().for_each(|s| *s *= inv);
        }
        out.fill(0.0);
        for p in 0..ctx {
            let vr = &v[at(p)..at(p) + d];
            for j in 0..group {
                axpy(&mut out[j * d..(j + 1) * d], scores[j * ctx + p], vr);
            }
        }
    }

    /// One task per (query token, key/value head).
    fn run<T: Float>(&self, q: &[f32], k: &[T], v: &[T]) -> Vec<f32> {
        let chunk = self.num_heads / self.num_kv_heads * self.head_dim;
        let num_tokens = self.meta.num_tokens();
        let mut out = vec![0f32; num_tokens * self.num_heads * self.head_dim];
        // (sequence, position) of every query token.
        let mut owner = Vec::with_capacity(num_tokens);
        for (i, pos) in self.meta.positions().into_iter().enumerate() {
            let seq = self
                .meta
                .query_start_loc
                .partition_point(|&s| s as usize <= i)
                - 1;
            owner.push((seq, pos as usize));
        }
        let kvh_n = self.num_kv_heads;
        out.par_chunks_mut(chunk)
            .zip(q.par_chunks(chunk))
            .enumerate()
            .for_each_init(Vec::new, |scores, (i, (o, qg))| {
                let (seq, pos) = owner[i / kvh_n];
                self.attend(qg, (k, v), (seq, pos, i % kvh_n), o, scores)
            });
        out
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
        );
        crate::cuda::paged_attention(q, ql, (k, kl), (v, vl), self.meta, dims, self.scale)
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(q) = q else {
            candle_core::bail!("paged_attention: queries must be f32 on cpu");
        };
        let q = contiguous(q, ql)?;
        let out = match (k, v) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.run(q, contiguous(k, kl)?, contiguous(v, vl)?)
            }
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.run(q, contiguous(k, kl)?, contiguous(v, vl)?)
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.run(q, contiguous(k, kl)?, contiguous(v, vl)?)
            }
            _ => candle_core::bail!("paged_attention: unsupported cache dtype"),
        };
        let shape = Shape::from((self.meta.num_tokens(), self.num_heads, self.head_dim));
        Ok((CpuStorage::F32(out), shape))
    }
}
