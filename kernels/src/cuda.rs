//! CUDA launches of the paged KV cache kernels (`src/cuda/paged.cu`, compiled to PTX by
//! build.rs). Same contracts as the CPU implementations in `paged.rs`, which are their
//! reference in the tests.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

use crate::paged::AttentionMetadata;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged.ptx"));
const MODULE: &str = "pagoda_paged";
/// Warps per block in `paged_attention_*` (the kernel's `WARPS`).
const WARPS: u32 = 4;

/// [`AttentionMetadata`] on the GPU: block tables, and each token's sequence and position.
#[derive(Debug)]
pub struct DeviceMetadata {
    tables: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    token_pos: CudaSlice<u32>,
}

/// Uploads the step's metadata on first use; every layer reuses it.
fn uploaded<'a>(meta: &'a AttentionMetadata, dev: &CudaDevice) -> Result<&'a DeviceMetadata> {
    if let Some(m) = meta.on_device.cell.get() {
        return Ok(m);
    }
    let mut token_seq = Vec::with_capacity(meta.num_tokens());
    for i in 0..meta.num_seqs() {
        let n = (meta.query_start_loc[i + 1] - meta.query_start_loc[i]) as usize;
        token_seq.extend(std::iter::repeat_n(i as u32, n));
    }
    let m = DeviceMetadata {
        tables: dev.clone_htod(&meta.block_tables)?,
        token_seq: dev.clone_htod(&token_seq)?,
        token_pos: dev.clone_htod(&meta.positions())?,
    };
    Ok(meta.on_device.cell.get_or_init(|| Arc::new(m)))
}

fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("pagoda CUDA kernels need contiguous tensors"),
    }
}

/// `dst[slot * row ..] = src[t * row ..]` for every token `t`.
pub fn write_slots(
    dst: &mut CudaStorage,
    dst_l: &Layout,
    src: &CudaStorage,
    src_l: &Layout,
    slots: &[u32],
) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let dev = dst.device().clone();
    let row = (src_l.shape().elem_count() / slots.len()) as u32;
    let slots_dev = dev.clone_htod(slots)?;
    let cfg = LaunchConfig {
        grid_dim: (slots.len() as u32, 1, 1),
        block_dim: (row.min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    let (dr, sr) = (range(dst_l)?, range(src_l)?);
    macro_rules! launch {
        ($kernel:literal, $d:expr, $s:expr) => {{
            let func = dev.get_or_load_custom_func($kernel, MODULE, PTX)?;
            let mut d = $d.slice_mut(dr.clone());
            let s = $s.slice(sr.clone());
            let mut b = func.builder();
            b.arg(&s);
            b.arg(&mut d);
            b.arg(&slots_dev);
            b.arg(&row);
            // SAFETY: the kernel writes `slots.len() * row` elements at slots the caller
            // checked are inside `dst`, and reads as many from `src`.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&mut dst.slice, &src.slice) {
        (CudaStorageSlice::F32(d), CudaStorageSlice::F32(s)) => launch!("write_slots_u32", d, s),
        (CudaStorageSlice::F16(d), CudaStorageSlice::F16(s)) => launch!("write_slots_u16", d, s),
        (CudaStorageSlice::BF16(d), CudaStorageSlice::BF16(s)) => launch!("write_slots_u16", d, s),
        _ => candle_core::bail!("reshape_and_cache: unsupported dtype on cuda"),
    }
    Ok(())
}

/// Paged attention of f32 queries `[T, H, D]` over the cache; returns f32 `[T, H, D]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &CudaStorage,
    ql: &Layout,
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    meta: &AttentionMetadata,
    (num_heads, num_kv_heads, head_dim, block_size): (usize, usize, usize, usize),
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    if head_dim > 256 {
        candle_core::bail!("paged_attention on cuda supports head_dim up to 256, got {head_dim}");
    }
    let dev = q.device().clone();
    let num_tokens = meta.num_tokens();
    let shape = Shape::from((num_tokens, num_heads, head_dim));
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(num_tokens * num_heads * head_dim)? };
    if num_tokens == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let DeviceMetadata {
        tables,
        token_seq,
        token_pos,
    } = uploaded(meta, &dev)?;
    let CudaStorageSlice::F32(qs) = &q.slice else {
        candle_core::bail!("paged_attention: queries must be f32");
    };
    let qs = qs.slice(range(ql)?);
    let pairs = (num_tokens * num_heads) as u32;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(WARPS), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let dims = [
        num_tokens as u32,
        num_heads as u32,
        num_kv_heads as u32,
        head_dim as u32,
        block_size as u32,
        meta.max_blocks_per_seq as u32,
    ];
    macro_rules! launch {
        ($kernel:literal, $k:expr, $v:expr) => {{
            let func = dev.get_or_load_custom_func($kernel, MODULE, PTX)?;
            let (kv, vv) = ($k.slice(range(kl)?), $v.slice(range(vl)?));
            let mut b = func.builder();
            b.arg(&qs);
            b.arg(&kv);
            b.arg(&vv);
            b.arg(tables);
            b.arg(token_seq);
            b.arg(token_pos);
            b.arg(&out);
            for d in &dims {
                b.arg(d);
            }
            b.arg(&scale);
            // SAFETY: the metadata was checked against the pool (`AttentionMetadata::check`),
            // so every block table entry and position is inside the cache.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match (&k.slice, &v.slice) {
        (CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            launch!("paged_attention_f32", k, v)
        }
        (CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            launch!("paged_attention_f16", k, v)
        }
        (CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            launch!("paged_attention_bf16", k, v)
        }
        _ => candle_core::bail!("paged_attention: unsupported cache dtype on cuda"),
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
const LORA_MODULE: &str = "pagoda_lora";

fn slots_on_device<'a>(
    idx: &'a crate::lora::LoraIndices,
    dev: &CudaDevice,
) -> Result<&'a CudaSlice<u32>> {
    if let Some(s) = idx.on_device.get() {
        return Ok(s);
    }
    let s = dev.clone_htod(&idx.token_slots)?;
    Ok(idx.on_device.get_or_init(|| s))
}

/// LoRA shrink: `v [T, rows]` f32 (see `lora.rs`).
pub fn lora_shrink(
    (x, xl): (&CudaStorage, &Layout),
    (a, al): (&CudaStorage, &Layout),
    idx: &crate::lora::LoraIndices,
    rows: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (num_tokens, in_f) = xl.shape().dims2()?;
    let shape = Shape::from((num_tokens, rows));
    // SAFETY: the kernel writes all `T * rows` values.
    let v = unsafe { dev.alloc::<f32>(num_tokens * rows)? };
    if num_tokens > 0 {
        let slots = slots_on_device(idx, &dev)?;
        let cfg = LaunchConfig {
            grid_dim: (((num_tokens * rows) as u32).div_ceil(WARPS), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = [num_tokens as u32, rows as u32, in_f as u32];
        macro_rules! launch {
            ($name:literal, $x:expr, $a:expr) => {{
                let (xs, as_) = ($x.slice(range(xl)?), $a.slice(range(al)?));
                let f = dev.get_or_load_custom_func($name, LORA_MODULE, LORA_PTX)?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&as_);
                b.arg(slots);
                b.arg(&v);
                for d in &dims {
                    b.arg(d);
                }
                // SAFETY: `lora_apply` checked the shapes and that every slot is in the stack.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match (&x.slice, &a.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(a)) => {
                launch!("lora_shrink_f32", x, a)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(a)) => {
                launch!("lora_shrink_f16", x, a)
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(a)) => {
                launch!("lora_shrink_bf16", x, a)
            }
            _ => candle_core::bail!("lora_apply: unsupported dtype on cuda"),
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(v, dev), shape))
}

/// Highest adapter rank on CUDA (the engine's limit too).
const MAX_RANK: usize = 64;

/// LoRA expand, in place on the fused output `y [T, Σ parts]` (see `lora.rs`).
pub fn lora_expand(
    (y, yl): (&mut CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    (bt, btl): (&CudaStorage, &Layout),
    idx: &crate::lora::LoraIndices,
    (rank, parts, offsets): (usize, &[usize], &[usize]),
) -> Result<()> {
    if parts.is_empty() || parts.len() > 3 || rank > MAX_RANK {
        candle_core::bail!(
            "lora_apply on cuda packs 1 to 3 projections of rank up to {MAX_RANK}, got {} of rank {rank}",
            parts.len()
        );
    }
    let dev = y.device().clone();
    let num_tokens = yl.shape().dims2()?.0;
    if num_tokens == 0 {
        return Ok(());
    }
    let slots = slots_on_device(idx, &dev)?;
    let total: usize = parts.iter().sum();
    let out = |j: usize| parts.get(j).copied().unwrap_or(0) as u32;
    let base = |j: usize| offsets.get(j).copied().unwrap_or(0) as u64;
    let (rank, n) = (rank as u32, parts.len() as u32);
    let (o0, o1, o2, b1, b2) = (out(0), out(1), out(2), base(1), base(2));
    // Each thread takes the columns of one 16-byte vector (the kernel's `Vec<T>::N`).
    let cfg = |cols_per_thread: u32| LaunchConfig {
        grid_dim: (
            (total as u32).div_ceil(cols_per_thread * 128),
            num_tokens as u32,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let CudaStorageSlice::F32(v) = &v.slice else {
        candle_core::bail!("lora_apply: v must be f32");
    };
    let vs = v.slice(range(vl)?);
    let yr = range(yl)?;
    macro_rules! launch {
        ($name:literal, $y:expr, $bt:expr, $n:expr) => {{
            let mut ys = $y.slice_mut(yr.clone());
            let bs = $bt.slice(range(btl)?);
            let f = dev.get_or_load_custom_func($name, LORA_MODULE, LORA_PTX)?;
            let mut b = f.builder();
            b.arg(&mut ys);
            b.arg(&vs);
            b.arg(&bs);
            b.arg(slots);
            b.arg(&rank);
            b.arg(&n);
            b.arg(&o0);
            b.arg(&o1);
            b.arg(&o2);
            b.arg(&b1);
            b.arg(&b2);
            // SAFETY: as for the shrink; `y` is `[T, total]` and contiguous (checked).
            unsafe { b.launch(cfg($n)) }.w()?;
        }};
    }
    match (&mut y.slice, &bt.slice) {
        (CudaStorageSlice::F32(y), CudaStorageSlice::F32(b)) => {
            launch!("lora_expand_f32", y, b, 4)
        }
        (CudaStorageSlice::F16(y), CudaStorageSlice::F16(b)) => {
            launch!("lora_expand_f16", y, b, 8)
        }
        (CudaStorageSlice::BF16(y), CudaStorageSlice::BF16(b)) => {
            launch!("lora_expand_bf16", y, b, 8)
        }
        _ => candle_core::bail!("lora_apply: unsupported dtype on cuda"),
    }
    Ok(())
}
