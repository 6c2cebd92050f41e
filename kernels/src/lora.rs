//! Batched LoRA (BGMV style): one op applies a different low-rank update to every token of a
//! flattened batch, chosen by a per-token slot index, so requests with different adapters (or
//! none) share one step without splitting the batch.
//!
//! Shapes (T = tokens, IN/OUT = the projection's features, S = slots, R = the largest rank):
//! - `x [T, IN]`, `y [T, OUT]` (the base projection's input and output, same dtype);
//! - a slot stack ([`LoraStack`]) per projection: `a [S * R, IN]` (rows of A) and
//!   `bt [S * R, OUT]` (rows of Bᵀ, already multiplied by the adapter's scaling); an adapter of
//!   rank `r < R` fills its slot's first `r` rows and leaves the rest zero;
//! - [`LoraIndices`]: each token's slot, or [`NO_SLOT`].
//!
//! `y[t] += bt[s]ᵀ (a[s] x[t])` with `s` the token's slot.
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{dot, Float};

/// The slot index of a token that uses no adapter.
pub const NO_SLOT: u32 = u32::MAX;

/// The device slots of one adapted projection. See the module docs for the layout.
#[derive(Debug)]
pub struct LoraStack {
    a: Tensor,
    bt: Tensor,
    max_rank: usize,
    /// Rank of the adapter in each slot (0 = empty), so the CPU skips the zero rows.
    ranks: Vec<usize>,
}

impl LoraStack {
    pub fn zeros(
        num_slots: usize,
        max_rank: usize,
        (in_features, out_features): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            a: Tensor::zeros((num_slots * max_rank, in_features), dtype, device)?,
            bt: Tensor::zeros((num_slots * max_rank, out_features), dtype, device)?,
            max_rank,
            ranks: vec![0; num_slots],
        })
    }

    pub fn num_slots(&self) -> usize {
        self.ranks.len()
    }

    /// Bytes on the device.
    pub fn size_in_bytes(&self) -> usize {
        (self.a.elem_count() + self.bt.elem_count()) * self.a.dtype().size_in_bytes()
    }

    /// Fills `slot` with `a [r, IN]` and scaled `bt [r, OUT]` (`r ≤ R`), or clears it.
    pub fn set_slot(&mut self, slot: usize, weights: Option<(&Tensor, &Tensor)>) -> Result<()> {
        if slot >= self.ranks.len() {
            candle_core::bail!("lora: slot {slot} of {}", self.ranks.len());
        }
        let (in_f, out_f) = (self.a.dims()[1], self.bt.dims()[1]);
        let row0 = slot * self.max_rank;
        let rank = match weights {
            Some((a, bt)) => {
                let r = a.dims2()?.0;
                if r == 0 || r > self.max_rank || a.dims() != [r, in_f] || bt.dims() != [r, out_f] {
                    candle_core::bail!(
                        "lora: slot weights a {:?} / bt {:?} do not fit rank ≤ {} and ({in_f}, {out_f})",
                        a.shape(),
                        bt.shape(),
                        self.max_rank
                    );
                }
                let dev = self.a.device();
                let (dt, a, bt) = (self.a.dtype(), a.to_device(dev)?, bt.to_device(dev)?);
                self.a.slice_set(&a.to_dtype(dt)?.contiguous()?, 0, row0)?;
                self.bt
                    .slice_set(&bt.to_dtype(dt)?.contiguous()?, 0, row0)?;
                r
            }
            None => 0,
        };
        if rank < self.max_rank {
            let n = self.max_rank - rank;
            let (dt, dev) = (self.a.dtype(), self.a.device());
            self.a
                .slice_set(&Tensor::zeros((n, in_f), dt, dev)?, 0, row0 + rank)?;
            self.bt
                .slice_set(&Tensor::zeros((n, out_f), dt, dev)?, 0, row0 + rank)?;
        }
        self.ranks[slot] = rank;
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

    /// True when some token uses an adapter.
    pub fn any(&self) -> bool {
        self.token_slots.iter().any(|&s| s != NO_SLOT)
    }
}

/// `y + delta`, where `delta[t] = bt[s]ᵀ (a[s] x[t])` for each token's slot `s` (zero for
/// [`NO_SLOT`]). `x [T, IN]` and `y [T, OUT]` in the stack's dtype; returns `[T, OUT]`.
pub fn lora_apply(y: &Tensor, x: &Tensor, stack: &LoraStack, idx: &LoraIndices) -> Result<Tensor> {
    let (t, in_f) = x.dims2()?;
    let out_f = stack.bt.dims()[1];
    if in_f != stack.a.dims()[1] || y.dims() != [t, out_f] || idx.token_slots.len() != t {
        candle_core::bail!(
            "lora_apply: x {:?}, y {:?}, a {:?}, bt {:?}, {} slot indices",
            x.shape(),
            y.shape(),
            stack.a.shape(),
            stack.bt.shape(),
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
    let x = x.to_dtype(stack.a.dtype())?.contiguous()?;
    let op = Bgmv { stack, idx };
    let delta = x.apply_op3_no_bwd(&stack.a, &stack.bt, &op)?;
    y + delta.to_dtype(y.dtype())?
}

struct Bgmv<'a> {
    stack: &'a LoraStack,
    idx: &'a LoraIndices,
}

impl Bgmv<'_> {
    fn run<T: Float>(&self, x: &[T], a: &[T], bt: &[T], in_f: usize, out_f: usize) -> Vec<T> {
        let r_max = self.stack.max_rank;
        let mut out = vec![T::from_f(0.0); self.idx.token_slots.len() * out_f];
        let token = |(t, out): (usize, &mut [T])| {
            let s = self.idx.token_slots[t];
            if s == NO_SLOT {
                return;
            }
            let s = s as usize;
            let xs: Vec<f32> = x[t * in_f..(t + 1) * in_f].iter().map(|v| v.f()).collect();
            let mut acc = vec![0f32; out_f];
            for k in 0..self.stack.ranks[s] {
                let row = s * r_max + k;
                let v = dot(&a[row * in_f..(row + 1) * in_f], &xs);
                for (o, b) in acc.iter_mut().zip(&bt[row * out_f..(row + 1) * out_f]) {
                    *o += v * b.f();
                }
            }
            for (o, v) in out.iter_mut().zip(acc) {
                *o = T::from_f(v);
            }
        };
        if self.idx.token_slots.len() >= 4 {
            out.par_chunks_mut(out_f).enumerate().for_each(token);
        } else {
            out.chunks_mut(out_f).enumerate().for_each(token);
        }
        out
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("lora_apply: tensors must be contiguous"),
    }
}

impl CustomOp3 for Bgmv<'_> {
    fn name(&self) -> &'static str {
        "lora-bgmv"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        bt: &candle_core::CudaStorage,
        btl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::lora_bgmv((x, xl), (a, al), (bt, btl), self.idx, self.stack.max_rank)
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        bt: &CpuStorage,
        btl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, in_f) = xl.shape().dims2()?;
        let out_f = btl.shape().dims2()?.1;
        macro_rules! run {
            ($x:expr, $a:expr, $bt:expr) => {
                self.run(
                    contiguous($x, xl)?,
                    contiguous($a, al)?,
                    contiguous($bt, btl)?,
                    in_f,
                    out_f,
                )
            };
        }
        let out = match (x, a, bt) {
            (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(run!(x, a, b))
            }
            (CpuStorage::F16(x), CpuStorage::F16(a), CpuStorage::F16(b)) => {
                CpuStorage::F16(run!(x, a, b))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(run!(x, a, b))
            }
            _ => candle_core::bail!("lora_apply: unsupported dtype"),
        };
        Ok((out, Shape::from((t, out_f))))
    }
}
