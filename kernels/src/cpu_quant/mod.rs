//! Quantized matrix products on the CPU for GGML Q4_0, Q4_1 and Q8_0 weights, as llama.cpp does
//! them: each activation row is quantized once to Q8 blocks of 32, then every (row, block) pair
//! is an exact integer dot product scaled in f32.
//!
//! - [`CpuQMatrix`]: a weight `[rows = out_features, cols = in_features]` repacked at load from a
//!   candle `QTensor`; [`CpuQMatrix::matmul`] on slices, [`CpuQMatrix::forward`] on tensors.
//! - [`KernelPath`]: which kernel runs — AVX-512 VNNI, AVX2 (runtime-detected), or the portable
//!   scalar one, which is also the reference: all paths give bit-identical results.
//! - [`Threading`]: how output rows are spread over threads (candle's CPU worker pool by default).
//!
//! Output rows are computed 16 at a time against up to 4 activation rows at a time; tasks are
//! runs of 16-row groups (at least ~32 KB of weights each, ~4 per thread). No allocation per
//! call besides the caller thread's reused scratch (quantized activations and, for `m > 1`, a
//! group-major output) and, in [`CpuQMatrix::forward`], the output tensor.
//!
//! Shapes and dtypes: `x [m, cols]` f32 row-major -> `y [m, rows]` f32, `y = x · Wᵀ`; `cols` is a
//! multiple of 32 (GGML blocks). Results differ from an f32 matmul by the activation quantization
//! (8 bits per value, one scale per 32 values), like candle's `QMatMul`.
mod layout;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use layout::{Packed, QKind, QuantActs, GROUP, MAX_MT};

/// The kernel that computes the integer dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable Rust; the reference for the others.
    Scalar,
    /// x86_64 AVX2 + FMA + F16C (`vpmaddubsw`), 8 output rows per register.
    Avx2,
    /// x86_64 AVX-512 F/BW/VNNI (`vpdpbusd`), 16 output rows per register.
    Avx512Vnni,
}

impl KernelPath {
    /// The fastest path this CPU supports (detected once). [`CpuQMatrix::matmul`] uses it.
    pub fn detect() -> Self {
        static PATH: OnceLock<KernelPath> = OnceLock::new();
        *PATH.get_or_init(|| {
            [Self::Avx512Vnni, Self::Avx2]
                .into_iter()
                .find(|p| p.is_supported())
                .unwrap_or(Self::Scalar)
        })
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        Kernel::new(self).is_some()
    }
}

/// How [`CpuQMatrix::matmul_with`] spreads output rows over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Threading {
    /// candle's persistent CPU pool (`candle_core::utils::barrier_pool`, sized by
    /// `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the physical cores), the one
    /// candle's own CPU ops use: its workers spin between ops, so dispatch costs ~1 µs and no
    /// second set of threads competes for the cores. Fastest on an otherwise idle machine; like
    /// every candle op, it degrades badly when other processes take the cores (the caller
    /// spin-waits for a descheduled worker).
    #[default]
    CandlePool,
    /// The global rayon pool: wakes sleeping threads per call (~5-10 µs each), and competes
    /// with candle's spinning workers; robust under contention.
    Rayon,
    /// The calling thread only; on a 2-core machine it reaches ~80% of the DRAM bandwidth for
    /// `m = 1`, and is the most robust when other processes take the cores.
    Single,
}

impl Threading {
    fn num_threads(self) -> usize {
        match self {
            Self::CandlePool => candle_core::utils::barrier_pool().n_workers() + 1,
            Self::Rayon => rayon::current_num_threads(),
            Self::Single => 1,
        }
    }
}

/// Options of [`CpuQMatrix::matmul_with`]; the default is what [`CpuQMatrix::matmul`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulOptions {
    pub path: KernelPath,
    pub threading: Threading,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        Self {
            path: KernelPath::detect(),
            threading: Threading::default(),
        }
    }
}

/// A weight matrix `[rows = out_features, cols = in_features]` in a CPU-friendly quantized
/// layout, built from a candle `QTensor` (GGML Q4_0 / Q4_1 / Q8_0; repacked, same size).
pub struct CpuQMatrix {
    packed: Packed,
}

impl std::fmt::Debug for CpuQMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuQMatrix")
            .field("dtype", &self.dtype())
            .field("rows", &self.rows())
            .field("cols", &self.cols())
            .finish()
    }
}

/// Work (weight bytes x activation rows) below which a task is not worth a thread hand-off.
const MIN_TASK_WORK: usize = 32 * 1024;
/// Tasks per thread, for balance when a thread is slowed by other work.
const TASKS_PER_THREAD: usize = 4;
/// Most tasks of one call.
const MAX_TASKS: usize = 64;

thread_local! {
    /// The caller's quantized activations and, for `m > 1`, its group-major output.
    static SCRATCH: RefCell<(QuantActs, Vec<f32>)> = RefCell::default();
}

impl CpuQMatrix {
    /// Repacks a 2-D CPU `QTensor` of `[rows, cols]`. `None` for dtypes (or devices, or ranks)
    /// this module doesn't handle: the caller keeps candle's path.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(kind) = QKind::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let &[rows, cols] = q.shape().dims() else {
            return Ok(None);
        };
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let data = q.data()?;
        Ok(Some(Self {
            packed: Packed::from_ggml(kind, rows, cols, &data),
        }))
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.packed.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.packed.cols
    }

    /// The GGML dtype it was built from.
    pub fn dtype(&self) -> GgmlDType {
        match self.packed.kind {
            QKind::Q4_0 => GgmlDType::Q4_0,
            QKind::Q4_1 => GgmlDType::Q4_1,
            QKind::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Bytes of weights and scales (what a matrix-vector product streams from memory).
    pub fn size_in_bytes(&self) -> usize {
        self.packed.size_in_bytes()
    }

    /// Writes row `row` of W, dequantized, into `out` (`cols` values): an embedding lookup when
    /// W is a tied embedding / lm_head, so the weights need not be kept twice.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        self.packed.dequantize_row(row, out);
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, with `x` and `y` row-major; `m` is 1 for decode, up to a
    /// few hundred for prefill. Panics if the slice lengths are not `m * cols` and `m * rows`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.matmul_with(x, m, y, MatmulOptions::default());
    }

    /// [`Self::matmul`] on a chosen kernel path and threading. Panics if this CPU can't run
    /// `options.path` (see [`KernelPath::is_supported`]).
    pub fn matmul_with(&self, x: &[f32], m: usize, y: &mut [f32], options: MatmulOptions) {
        let w = &self.packed;
        assert_eq!(x.len(), m * w.cols, "x is not [m = {m}, cols = {}]", w.cols);
        assert_eq!(y.len(), m * w.rows, "y is not [m = {m}, rows = {}]", w.rows);
        let kernel = Kernel::new(options.path)
            .unwrap_or_else(|| panic!("{:?} is not supported on this CPU", options.path));
        if m == 0 {
            return;
        }
        SCRATCH.with(|scratch| {
            let (acts, group_major) = &mut *scratch.borrow_mut();
            acts.quantize(x, m, w.cols);
            let gpt = self.groups_per_task(m, options.threading.num_threads());
            if m == 1 {
                // Group-major order is row order for one activation row: write `y` directly.
                run_tasks(kernel, w, acts, m, gpt, y, options.threading);
                return;
            }
            group_major.resize(w.num_groups * m * GROUP, 0.0);
            run_tasks(kernel, w, acts, m, gpt, group_major, options.threading);
            for (g, tile) in group_major.chunks_exact(m * GROUP).enumerate() {
                let (r0, valid) = (g * GROUP, w.valid_rows(g));
                for (mi, src) in tile.chunks_exact(GROUP).enumerate() {
                    y[mi * w.rows + r0..][..valid].copy_from_slice(&src[..valid]);
                }
            }
        });
    }

    /// `x [.., cols]` (any dtype, any layout; computed in f32) -> `[.., rows]` in `x`'s dtype.
    /// CPU tensors only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let y = x.apply_op1_no_bwd(self)?;
        y.to_dtype(dtype)
    }

    /// Groups of output rows per task: enough work to pay for the hand-off, a few tasks per
    /// thread so a thread slowed by other work doesn't hold up the call.
    fn groups_per_task(&self, m: usize, num_threads: usize) -> usize {
        let num_groups = self.packed.num_groups.max(1);
        if num_threads <= 1 {
            return num_groups;
        }
        let work_per_group = (self.packed.group_bytes() * m).max(1);
        MIN_TASK_WORK
            .div_ceil(work_per_group)
            .max(num_groups.div_ceil(num_threads * TASKS_PER_THREAD))
            .max(num_groups.div_ceil(MAX_TASKS))
            .min(num_groups)
    }
}

impl candle_core::CustomOp1 for CpuQMatrix {
    fn name(&self) -> &'static str {
        "cpu-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("cpu-qmatmul: x must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cpu-qmatmul: x must be contiguous");
        };
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&self.cols()) {
            candle_core::bail!("cpu-qmatmul: x {dims:?} is not [.., {}]", self.cols());
        }
        let m = layout.shape().elem_count() / self.cols().max(1);
        let mut y = vec![0f32; m * self.rows()];
        self.matmul(&x[start..end], m, &mut y);
        *dims.last_mut().expect("rank >= 1") = self.rows();
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// A [`KernelPath`] that this CPU supports.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(x86::Avx512Vnni),
}

impl Kernel {
    fn new(path: KernelPath) -> Option<Self> {
        match path {
            KernelPath::Scalar => Some(Self::Scalar),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => x86::Avx2::detect().map(Self::Avx2),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => x86::Avx512Vnni::detect().map(Self::Avx512),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Avx512Vnni => None,
        }
    }

    /// `out[i][r]` for activation rows `m0 + i` (`i < mt <= MAX_MT`) and rows `16 g + r`.
    fn tile(
        self,
        w: &Packed,
        acts: &QuantActs,
        g: usize,
        m0: usize,
        mt: usize,
        out: &mut [[f32; GROUP]; MAX_MT],
    ) {
        match self {
            Self::Scalar => {
                for (i, out) in out.iter_mut().enumerate().take(mt) {
                    scalar::group_row(w, acts, g, m0 + i, out);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(k) => k.tile(w, acts, g, m0, mt, out),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(k) => k.tile(w, acts, g, m0, mt, out),
        }
    }
}

/// Runs groups `groups` for all `m` activation rows into `out`, group-major:
/// `out[((g - start) * m + mi) * 16 + r]`, only the real rows of the last group.
fn run_groups(
    kernel: Kernel,
    w: &Packed,
    acts: &QuantActs,
    m: usize,
    groups: Range<usize>,
    out: &mut [f32],
) {
    let mut tile = [[0f32; GROUP]; MAX_MT];
    for (gi, g) in groups.enumerate() {
        let valid = w.valid_rows(g);
        let mut m0 = 0;
        while m0 < m {
            let mt = (m - m0).min(MAX_MT);
            kernel.tile(w, acts, g, m0, mt, &mut tile);
            for (i, t) in tile.iter().enumerate().take(mt) {
                out[(gi * m + m0 + i) * GROUP..][..valid].copy_from_slice(&t[..valid]);
            }
            m0 += mt;
        }
    }
}

/// Splits the group-major `out` into tasks of `gpt` groups and runs them.
fn run_tasks(
    kernel: Kernel,
    w: &Packed,
    acts: &QuantActs,
    m: usize,
    gpt: usize,
    out: &mut [f32],
    threading: Threading,
) {
    let chunk = (gpt * m * GROUP).max(1);
    let num_tasks = out.len().div_ceil(chunk);
    let groups = |t: usize| t * gpt..((t + 1) * gpt).min(w.num_groups);
    if num_tasks <= 1 || threading == Threading::Single {
        run_groups(kernel, w, acts, m, 0..w.num_groups, out);
        return;
    }
    match threading {
        Threading::Rayon => out
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(t, out)| run_groups(kernel, w, acts, m, groups(t), out)),
        Threading::CandlePool | Threading::Single => {
            assert!(num_tasks <= MAX_TASKS, "{num_tasks} tasks");
            // The pool takes a shared closure: hand each task its output slice through a slot.
            let slots: [Mutex<Option<&mut [f32]>>; MAX_TASKS] =
                std::array::from_fn(|_| Mutex::new(None));
            for (slot, out) in slots.iter().zip(out.chunks_mut(chunk)) {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(out);
            }
            candle_core::utils::barrier_pool().execute_chunked(num_tasks, |tasks| {
                for t in tasks {
                    let mut slot = slots[t].lock().unwrap_or_else(PoisonError::into_inner);
                    let out = slot.take().expect("each task runs once");
                    run_groups(kernel, w, acts, m, groups(t), out);
                }
            });
        }
    }
}
