//! The repacked weight layout and the quantized activations, shared by every kernel path.
//!
//! Weights: output rows are taken 16 at a time (a *group*; the last one is zero-padded). For
//! each group and each block of 32 input columns the 32x16 quants are stored as 64-byte
//! [`Line`]s: line `j`, lane `r` (bytes `4r..4r+4`) holds bytes `4j..4j+4` of row `r`'s GGML
//! `qs`. For Q4 that byte holds element `4j+t` in its low nibble and `16+4j+t` in its high one
//! (GGML's nibble order), so one line feeds two dot-product instructions of 16 rows x 4 columns;
//! Q4 blocks take 4 lines, Q8_0 blocks 8. The group's per-block scales follow the same order in
//! [`Scales16`]: `d` of the 16 rows, then (Q4_1 only) `m` of the 16 rows.
//!
//! Activations: each row of `x` is quantized once to Q8 blocks of 32 (`q = round(x / d)` with
//! `d = max|x| / 127`, ties to even), keeping per block `d`, the integer sum of `q` (for the Q4_0
//! and Q8_0 offset corrections) and `d * sum` (for Q4_1's `m` term).
use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per GGML block.
pub(crate) const BLOCK: usize = 32;
/// Output rows per group (one 512-bit register of i32/f32 lanes).
pub(crate) const GROUP: usize = 16;
/// Most activation rows per kernel tile (they share the unpacked weights of a block).
pub(crate) const MAX_MT: usize = 4;

/// The weight formats handled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QKind {
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one GGML block.
    pub(crate) fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Quant bytes of one row in one block (the GGML `qs`).
    fn qs_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }

    /// [`Line`]s per (group, block).
    pub(crate) fn lines_per_block(self) -> usize {
        self.qs_bytes() / 4
    }

    /// [`Scales16`] per (group, block).
    pub(crate) fn scales_per_block(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            Self::Q4_0 | Self::Q8_0 => 1,
        }
    }
}

/// 64 bytes of quants: 16 rows x 4 bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// One f16 scale (as bits) for each of the 16 rows of a group.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
pub(crate) struct Scales16(pub(crate) [u16; GROUP]);

/// Repacked weights; see the module docs for the order.
pub(crate) struct Packed {
    pub(crate) kind: QKind,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row (`cols / 32`).
    pub(crate) num_blocks: usize,
    pub(crate) num_groups: usize,
    pub(crate) lines: Vec<Line>,
    pub(crate) scales: Vec<Scales16>,
}

impl Packed {
    /// Repacks GGML blocks of a row-major `[rows, cols]` matrix (`cols % 32 == 0`).
    pub(crate) fn from_ggml(kind: QKind, rows: usize, cols: usize, data: &[u8]) -> Self {
        let num_blocks = cols / BLOCK;
        let num_groups = rows.div_ceil(GROUP);
        let bb = kind.ggml_block_bytes();
        assert_eq!(cols % BLOCK, 0, "cols {cols} is not a multiple of {BLOCK}");
        assert_eq!(data.len(), rows * num_blocks * bb, "GGML data size");
        let lpb = kind.lines_per_block();
        let spb = kind.scales_per_block();
        let mut lines = vec![Line([0; 64]); num_groups * num_blocks * lpb];
        let mut scales = vec![Scales16([0; GROUP]); num_groups * num_blocks * spb];
        for row in 0..rows {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..num_blocks {
                let raw = &data[(row * num_blocks + b) * bb..][..bb];
                let gb = g * num_blocks + b;
                scales[gb * spb].0[r] = u16::from_le_bytes([raw[0], raw[1]]);
                let qs = match kind {
                    QKind::Q4_1 => {
                        scales[gb * spb + 1].0[r] = u16::from_le_bytes([raw[2], raw[3]]);
                        &raw[4..]
                    }
                    QKind::Q4_0 | QKind::Q8_0 => &raw[2..],
                };
                for (j, word) in qs.chunks_exact(4).enumerate() {
                    lines[gb * lpb + j].0[4 * r..4 * r + 4].copy_from_slice(word);
                }
            }
        }
        Self {
            kind,
            rows,
            cols,
            num_blocks,
            num_groups,
            lines,
            scales,
        }
    }

    /// The lines of (group, block).
    #[inline]
    pub(crate) fn block_lines(&self, g: usize, b: usize) -> &[Line] {
        let lpb = self.kind.lines_per_block();
        &self.lines[(g * self.num_blocks + b) * lpb..][..lpb]
    }

    /// The scales of (group, block): `[d]` or `[d, m]`.
    #[inline]
    pub(crate) fn block_scales(&self, g: usize, b: usize) -> &[Scales16] {
        let spb = self.kind.scales_per_block();
        &self.scales[(g * self.num_blocks + b) * spb..][..spb]
    }

    /// Real (unpadded) rows in group `g`.
    #[inline]
    pub(crate) fn valid_rows(&self, g: usize) -> usize {
        (self.rows - g * GROUP).min(GROUP)
    }

    /// Dequantizes row `row` into `out` (`cols` values).
    pub(crate) fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        assert_eq!(out.len(), self.cols, "out is not one row");
        let (g, r) = (row / GROUP, row % GROUP);
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let lines = self.block_lines(g, b);
            let scales = self.block_scales(g, b);
            let d = f16_bits(scales[0].0[r]);
            for (j, line) in lines.iter().enumerate() {
                for (t, &byte) in line.0[4 * r..4 * r + 4].iter().enumerate() {
                    match self.kind {
                        QKind::Q4_0 => {
                            out[4 * j + t] = (i32::from(byte & 0x0F) - 8) as f32 * d;
                            out[16 + 4 * j + t] = (i32::from(byte >> 4) - 8) as f32 * d;
                        }
                        QKind::Q4_1 => {
                            let m = f16_bits(scales[1].0[r]);
                            out[4 * j + t] = f32::from(byte & 0x0F) * d + m;
                            out[16 + 4 * j + t] = f32::from(byte >> 4) * d + m;
                        }
                        QKind::Q8_0 => out[4 * j + t] = f32::from(byte as i8) * d,
                    }
                }
            }
        }
    }

    /// Bytes of weights streamed per group (quants and scales).
    pub(crate) fn group_bytes(&self) -> usize {
        self.num_blocks
            * (self.kind.lines_per_block() * 64 + self.kind.scales_per_block() * GROUP * 2)
    }

    /// Bytes of weights and scales held.
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.num_groups * self.group_bytes()
    }
}

/// Activations quantized to Q8 blocks, `m` rows of `cols`; reused between calls.
#[derive(Default)]
pub(crate) struct QuantActs {
    pub(crate) cols: usize,
    pub(crate) num_blocks: usize,
    /// `[m, cols]`.
    pub(crate) qs: Vec<i8>,
    /// Block scale `d`, `[m, num_blocks]`.
    pub(crate) d: Vec<f32>,
    /// Sum of the block's `qs`, `[m, num_blocks]`.
    pub(crate) sum: Vec<i32>,
    /// `d * sum` as f32, `[m, num_blocks]`.
    pub(crate) dsum: Vec<f32>,
}

/// `1.5 * 2^23`: adding and subtracting it rounds an f32 of magnitude below 2^22 to the nearest
/// integer, ties to even (the same result as `cvtps2dq` in the default rounding mode).
const ROUND_MAGIC: f32 = 12_582_912.0;

impl QuantActs {
    /// Quantizes `x` (`[m, cols]`, row-major), reusing the buffers.
    pub(crate) fn quantize(&mut self, x: &[f32], m: usize, cols: usize) {
        assert_eq!(x.len(), m * cols, "x is not [m, cols]");
        assert_eq!(cols % BLOCK, 0, "cols {cols} is not a multiple of {BLOCK}");
        let num_blocks = cols / BLOCK;
        self.cols = cols;
        self.num_blocks = num_blocks;
        self.qs.resize(m * cols, 0);
        self.d.resize(m * num_blocks, 0.0);
        self.sum.resize(m * num_blocks, 0);
        self.dsum.resize(m * num_blocks, 0.0);
        let blocks = x
            .chunks_exact(BLOCK)
            .zip(self.qs.chunks_exact_mut(BLOCK))
            .zip(self.d.iter_mut())
            .zip(self.sum.iter_mut())
            .zip(self.dsum.iter_mut());
        for ((((xb, qb), d), sum), dsum) in blocks {
            let xb: &[f32; BLOCK] = xb.try_into().expect("block of 32");
            let qb: &mut [i8; BLOCK] = qb.try_into().expect("block of 32");
            (*d, *sum) = quantize_block(xb, qb);
            *dsum = *d * *sum as f32;
        }
    }
}

/// One Q8 block: returns `(d, sum of q)`.
#[inline]
fn quantize_block(x: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, i32) {
    let mut amax = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (a, &v) in amax.iter_mut().zip(chunk) {
            let v = v.abs();
            *a = if v > *a { v } else { *a };
        }
    }
    let amax = amax.iter().fold(0f32, |a, &v| if v > a { v } else { a });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // The clamp only matters for non-finite or subnormal input (then `id` can overflow).
        let r = ((v * id + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0);
        let qi = r as i32;
        *q = qi as i8;
        sum += qi;
    }
    (d, sum)
}

/// f16 bits to f32.
#[inline]
pub(crate) fn f16_bits(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}
