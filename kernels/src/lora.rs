//! Batched LoRA (BGMV style): one op applies a different low-rank update to every token of a
//! flattened batch, chosen by a per-token slot index, so requests with different adapters (or
//! none) share one step without splitting the batch.
//!
//! Projections that read the same input and are computed as one matmul (q/k/v, gate/up) are
//! *packed*: one stack holds all their parts, so a step costs one shrink and one expand launch
//! per packed group, and the update is added in place to the fused output.
//!
//! Shapes (T = tokens, IN = input features, n = parts, OUTⱼ = part j's output features,
//! S = slots, R = the largest rank):
//! - `x [T, IN]`; `y [T, ΣOUTⱼ]` (the fused output, contiguous, same dtype);
//! - a [`LoraStack`]: `a [S · n · R, IN]` (rows of A: slot s, part j at rows `(s·n + j)·R ..`)
//!   and per part `btⱼ [S · R, OUTⱼ]` (rows of Bᵀ, already multiplied by the adapter's scaling),
//!   stored one after the other in one flat tensor; an adapter of rank `r < R` fills its first
//!   `r` rows and leaves the rest zero;
//! - [`LoraIndices`]: each token's slot, or [`NO_SLOT`].
//!
//! `y[t, part j] += btⱼ[s]ᵀ (aⱼ[s] x[t])` with `s` the token's slot.
use candle_core::{
    CpuStorage, CustomOp2, DType, Device, InplaceOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::float::{axpy, contiguous, dot, Float};

/// The slot index of a token that uses no adapter.
pub const NO_SLOT: u32 = u32::MAX;

/// The device slots of one packed group of projections. See the module docs for the layout.
#[derive(Debug)]
pub struct LoraStack {
    a: Tensor,
    /// All parts' Bᵀ rows, flat: part j starts at `bt_offsets[j]`.
    bt: Tensor,
    bt_offsets: Vec<usize>,
    parts: Vec<usize>,
    max_rank: usize,
    /// Rank of each slot's adapter per part (0 = empty), so the CPU skips the zero rows.
    ranks: Vec<Vec<usize>>,
}

impl LoraStack {
    /// `parts`: the output features of each packed projection.
    pub fn zeros(
        num_slots: usize,
        max_rank: usize,
        in_features: usize,
        parts: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = parts.len();
        let mut bt_offsets = Vec::with_capacity(n);
        let mut total = 0;
        for &o in parts {
            bt_offsets.push(total);
            total += num_slots * max_rank * o;
        }
        Ok(Self {
            a: Tensor::zeros((num_slots * n * max_rank, in_features), dtype, device)?,
            bt: Tensor::zeros(total, dtype, device)?,
            bt_offsets,
            parts: parts.to_vec(),
            max_rank,
            ranks: vec![vec![0; n]; num_slots],
        })
    }

    pub fn num_slots(&self) -> usize {
        self.ranks.len()
    }

    /// Bytes on the device.
    pub fn size_in_bytes(&self) -> usize {
        (self.a.elem_count() + self.bt.elem_count()) * self.a.dtype().size_in_bytes()
    }

    /// Fills part `part` of `slot` with `a [r, IN]` and scaled `bt [r, OUTⱼ]` (`r ≤ R`), or
    /// clears it.
    pub fn set_slot(
        &mut self,
        slot: usize,
        part: usize,
        weights: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        if slot >= self.ranks.len() || part >= self.parts.len() {
            candle_core::bail!(
                "lora: slot {slot} part {part} of {} slots, {} parts",
                self.ranks.len(),
                self.parts.len()
            );
        }
        let (in_f, out_f, r_max) = (self.a.dims()[1], self.parts[part], self.max_rank);
        let a_row0 = (slot * self.parts.len() + part) * r_max;
        let bt_at = |row: usize| self.bt_offsets[part] + (slot * r_max + row) * out_f;
        let (dt, dev) = (self.a.dtype(), self.a.device().clone());
        let rank = match weights {
            Some((a, bt)) => {
                let r = a.dims2()?.0;
                if r == 0 || r > r_max || a.dims() != [r, in_f] || bt.dims() != [r, out_f] {
                    candle_core::bail!(
                        "lora: slot weights a {:?} / bt {:?} do not fit rank ≤ {r_max} and ({in_f}, {out_f})",
                        a.shape(),
                        bt.shape(),
                    );
                }
                let a = a.to_device(&dev)?.to_dtype(dt)?.contiguous()?;
                let bt = bt.to_device(&dev)?.to_dtype(dt)?.flatten_all()?;
                self.a.slice_set(&a, 0, a_row0)?;
                self.bt.slice_set(&bt, 0, bt_at(0))?;
                r
            }
            None => 0,
        };
        if rank < r_max {
            let n = r_max - rank;
            self.a
                .slice_set(&Tensor::zeros((n, in_f), dt, &dev)?, 0, a_row0 + rank)?;
            self.bt
                .slice_set(&Tensor::zeros(n * out_f, dt, &dev)?, 0, bt_at(rank))?;
        }
        self.ranks[slot][part] = rank;
        Ok(())
    }
}

/// Each token's slot for one step (host side), with a device copy made on first use and
/// shared by every projection of the step.
#[derive(Debug, Default)]
pub struct LoraIndices {
    pub token_slots: Vec<u32>,
    #[cfg(feature = "cuda")]
    pub(crate) on_device:
        std::sync::OnceLock<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>,
}

/// A clone starts without a device copy.
impl Clone for LoraIndices {
    fn clone(&self) -> Self {
        Self::new(self.token_slots.clone())
    }
}

impl LoraIndices {
    pub fn new(token_slots: Vec<u32>) -> Self {
        Self {
            token_slots,
            #[cfg(feature = "cuda")]
            on_device: Default::default(),
        }
    }
}

/// Adds every token's LoRA update to `y` in place (see the module docs). `x [T, IN]` and
/// `y [T, ΣOUTⱼ]` (contiguous) in the stack's dtype.
pub fn lora_apply(y: &Tensor, x: &Tensor, stack: &LoraStack, idx: &LoraIndices) -> Result<()> {
    let (t, in_f) = x.dims2()?;
    let total: usize = stack.parts.iter().sum();
    let dt = stack.a.dtype();
    if in_f != stack.a.dims()[1]
        || y.dims() != [t, total]
        || idx.token_slots.len() != t
        || x.dtype() != dt
        || y.dtype() != dt
        || !y.is_contiguous()
    {
        candle_core::bail!(
            "lora_apply: x {:?} {:?}, y {:?} {:?} (contiguous: {}), a {:?} {dt:?}, parts {:?}, {} slot indices",
            x.shape(),
            x.dtype(),
            y.shape(),
            y.dtype(),
            y.is_contiguous(),
            stack.a.shape(),
            stack.parts,
            idx.token_slots.len()
        );
    }
    if let Some(&s) = idx
        .token_slots
        .iter()
        .find(|&&s| s != NO_SLOT && s as usize >= stack.num_slots())
    {
        candle_core::bail!("lora_apply: slot {s} of {}", stack.num_slots());
    }
    let x = x.contiguous()?;
    let v = x.apply_op2_no_bwd(&stack.a, &Shrink { stack, idx })?;
    y.inplace_op3(&v, &stack.bt, &Expand { stack, idx })
}

/// `v [T, n·R]` (f32) = each token's slot rows of A times its input.
struct Shrink<'a> {
    stack: &'a LoraStack,
    idx: &'a LoraIndices,
}

/// `y[t, part j] += Σₖ v[t, j·R + k] · btⱼ[s·R + k]`.
struct Expand<'a> {
    stack: &'a LoraStack,
    idx: &'a LoraIndices,
}

impl Shrink<'_> {
    fn run<T: Float>(&self, x: &[T], a: &[T], in_f: usize) -> Vec<f32> {
        let (r_max, n) = (self.stack.max_rank, self.stack.parts.len());
        let width = n * r_max;
        let mut v = vec![0f32; self.idx.token_slots.len() * width];
        let token = |(t, vt): (usize, &mut [f32])| {
            let s = self.idx.token_slots[t];
            if s == NO_SLOT {
                return;
            }
            let s = s as usize;
            let xs: Vec<f32> = x[t * in_f..(t + 1) * in_f].iter().map(|v| v.f()).collect();
            for j in 0..n {
                for k in 0..self.stack.ranks[s][j] {
                    let row = (s * n + j) * r_max + k;
                    vt[j * r_max + k] = dot(&a[row * in_f..(row + 1) * in_f], &xs);
                }
            }
        };
        if self.idx.token_slots.len() >= 4 {
            v.par_chunks_mut(width).enumerate().for_each(token);
        } else {
            v.chunks_mut(width).enumerate().for_each(token);
        }
        v
    }
}

impl CustomOp2 for Shrink<'_> {
    fn name(&self) -> &'static str {
        "lora-shrink"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = self.stack.parts.len() * self.stack.max_rank;
        crate::cuda::lora_shrink((x, xl), (a, al), self.idx, rows)
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, in_f) = xl.shape().dims2()?;
        let v = match (x, a) {
            (CpuStorage::F32(x), CpuStorage::F32(a)) => {
                self.run(contiguous(x, xl)?, contiguous(a, al)?, in_f)
            }
            (CpuStorage::F16(x), CpuStorage::F16(a)) => {
                self.run(contiguous(x, xl)?, contiguous(a, al)?, in_f)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(a)) => {
                self.run(contiguous(x, xl)?, contiguous(a, al)?, in_f)
            }
            _ => candle_core::bail!("lora_apply: unsupported dtype"),
        };
        let width = self.stack.parts.len() * self.stack.max_rank;
        Ok((CpuStorage::F32(v), Shape::from((t, width))))
    }
}

impl Expand<'_> {
    fn run<T: Float>(&self, y: &mut [T], v: &[f32], bt: &[T]) {
        let (r_max, n) = (self.stack.max_rank, self.stack.parts.len());
        let total: usize = self.stack.parts.iter().sum();
        let token = |(t, yt): (usize, &mut [T])| {
            let s = self.idx.token_slots[t];
            if s == NO_SLOT {
                return;
            }
            let s = s as usize;
            let vt = &v[t * n * r_max..(t + 1) * n * r_max];
            let mut col = 0;
            let mut acc = Vec::new();
            for (j, &out_f) in self.stack.parts.iter().enumerate() {
                acc.clear();
                acc.resize(out_f, 0f32);
                let base = self.stack.bt_offsets[j];
                for k in 0..self.stack.ranks[s][j] {
                    let row = base + (s * r_max + k) * out_f;
                    axpy(&mut acc, vt[j * r_max + k], &bt[row..row + out_f]);
                }
                for (y, a) in yt[col..col + out_f].iter_mut().zip(&acc) {
                    *y = T::from_f(y.f() + a);
                }
                col += out_f;
            }
        };
        if self.idx.token_slots.len() >= 4 {
            y.par_chunks_mut(total).enumerate().for_each(token);
        } else {
            y.chunks_mut(total).enumerate().for_each(token);
        }
    }
}

impl InplaceOp3 for Expand<'_> {
    fn name(&self) -> &'static str {
        "lora-expand"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        yl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
        bt: &candle_core::CudaStorage,
        btl: &Layout,
    ) -> Result<()> {
        let s = self.stack;
        crate::cuda::lora_expand(
            (y, yl),
            (v, vl),
            (bt, btl),
            self.idx,
            (s.max_rank, &s.parts, &s.bt_offsets),
        )
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        yl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
        bt: &CpuStorage,
        btl: &Layout,
    ) -> Result<()> {
        let CpuStorage::F32(v) = v else {
            candle_core::bail!("lora_apply: v must be f32");
        };
        let v = contiguous(v, vl)?;
        let Some((y0, y1)) = yl.contiguous_offsets() else {
            candle_core::bail!("lora_apply: y must be contiguous");
        };
        match (y, bt) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => {
                self.run(&mut y[y0..y1], v, contiguous(b, btl)?)
            }
            (CpuStorage::F16(y), CpuStorage::F16(b)) => {
                self.run(&mut y[y0..y1], v, contiguous(b, btl)?)
            }
            (CpuStorage::BF16(y), CpuStorage::BF16(b)) => {
                self.run(&mut y[y0..y1], v, contiguous(b, btl)?)
            }
            _ => candle_core::bail!("lora_apply: unsupported dtype"),
        }
        Ok(())
    }
}
