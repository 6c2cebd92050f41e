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
        None => candle_core::bail!("paged kernels need contiguous tensors"),
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

/// Batched LoRA delta `[T, OUT]` in x's dtype (see `lora.rs`).
pub fn lora_bgmv(
    (x, xl): (&CudaStorage, &Layout),
    (a, al): (&CudaStorage, &Layout),
    (bt, btl): (&CudaStorage, &Layout),
    idx: &crate::lora::LoraIndices,
    rank: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (num_tokens, in_f) = xl.shape().dims2()?;
    let out_f = btl.shape().dims2()?.1;
    let shape = Shape::from((num_tokens, out_f));
    let slots = match idx.on_device.get() {
        Some(s) => s,
        None => {
            let s = dev.clone_htod(&idx.token_slots)?;
            idx.on_device.get_or_init(|| s)
        }
    };
    // SAFETY: the shrink kernel writes all `T * R` values.
    let v = unsafe { dev.alloc::<f32>(num_tokens * rank)? };
    let dims = [num_tokens as u32, rank as u32, in_f as u32, out_f as u32];
    let shrink = LaunchConfig {
        grid_dim: (((num_tokens * rank) as u32).div_ceil(WARPS).max(1), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let expand = LaunchConfig {
        grid_dim: ((out_f as u32).div_ceil(256), num_tokens as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($ty:ty, $name:literal, $x:expr, $a:expr, $bt:expr) => {{
            // SAFETY: every element of `out` is written by the expand kernel.
            let mut out = unsafe { dev.alloc::<$ty>(num_tokens * out_f)? };
            if num_tokens > 0 {
                let (xs, as_, bs) = (
                    $x.slice(range(xl)?),
                    $a.slice(range(al)?),
                    $bt.slice(range(btl)?),
                );
                let f = dev.get_or_load_custom_func(
                    concat!("lora_shrink_", $name),
                    LORA_MODULE,
                    LORA_PTX,
                )?;
                let mut b = f.builder();
                b.arg(&xs);
                b.arg(&as_);
                b.arg(slots);
                b.arg(&v);
                b.arg(&dims[0]);
                b.arg(&dims[1]);
                b.arg(&dims[2]);
                // SAFETY: `lora_apply` checked the shapes and that every slot index is inside
                // the stack.
                unsafe { b.launch(shrink) }.w()?;
                let f = dev.get_or_load_custom_func(
                    concat!("lora_expand_", $name),
                    LORA_MODULE,
                    LORA_PTX,
                )?;
                let mut b = f.builder();
                b.arg(&v);
                b.arg(&bs);
                b.arg(slots);
                b.arg(&mut out);
                b.arg(&dims[1]);
                b.arg(&dims[3]);
                // SAFETY: as above.
                unsafe { b.launch(expand) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match (&x.slice, &a.slice, &bt.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
            launch!(f32, "f32", x, a, b)
        }
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
            launch!(half::f16, "f16", x, a, b)
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
            launch!(half::bf16, "bf16", x, a, b)
        }
        _ => candle_core::bail!("lora_apply: unsupported dtype on cuda"),
    };
    Ok((out, shape))
}
