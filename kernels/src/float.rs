//! What the CPU kernels share: element types read as f32 (f32, f16, bf16), the small vector
//! loops (written so the compiler vectorizes them), and contiguous storage slices.
use candle_core::{Layout, Result};
use half::{bf16, f16};

pub(crate) trait Float: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    fn from_f(v: f32) -> Self;
}
impl Float for f32 {
    fn f(self) -> f32 {
        self
    }
    fn from_f(v: f32) -> Self {
        v
    }
}
impl Float for f16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from_f(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Float for bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from_f(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

pub(crate) fn dot<T: Float>(a: &[T], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, xc) = (a.chunks_exact(8), x.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(a, x)| a.f() * x)
        .sum();
    for (a, x) in ac.zip(xc) {
        for i in 0..8 {
            acc[i] += a[i].f() * x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += w * x`.
pub(crate) fn axpy<T: Float>(out: &mut [f32], w: f32, x: &[T]) {
    for (o, x) in out.iter_mut().zip(x) {
        *o += w * x.f();
    }
}

/// The elements of a contiguous tensor's storage; an error for strided layouts.
pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("CPU kernels need contiguous tensors"),
    }
}
