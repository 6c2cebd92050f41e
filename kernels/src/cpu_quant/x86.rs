//! x86_64 kernels: AVX-512 VNNI (`vpdpbusd`, 16 rows per register) and AVX2
//! (`vpmaddubsw` + `vpmaddwd`, 8 rows per register). Each computes a tile of one 16-row group
//! against up to [`MAX_MT`] activation rows, reusing the unpacked weights of a block across them.
//!
//! Both use unsigned weight quants against signed activation quants: Q4 nibbles are 0..15 (Q4_0's
//! -8 offset is taken out afterwards as `8 * sum(a)`); Q8_0 on AVX-512 flips the sign bit
//! (`w + 128`) and subtracts `128 * sum(a)`, on AVX2 uses `|w| * sign(a, w)`. The integer sums are
//! exact, and the f32 accumulation matches [`super::scalar`] operation for operation.
//!
//! The only `unsafe` here is loading from / storing to references of known size and alignment,
//! and calling `#[target_feature]` functions behind a token that proves the features exist.
#![allow(unsafe_code)]
// The AVX-512 intrinsics are stable since Rust 1.89, above the workspace's declared 1.85; candle-core
// 0.11 already uses them unconditionally on x86_64, so 1.89 is the real floor either way.
#![allow(clippy::incompatible_msrv)]

use core::arch::x86_64::*;

use super::layout::{Line, Packed, QKind, QuantActs, Scales16, BLOCK, GROUP, MAX_MT};

/// Proof that the CPU has AVX-512 F/BW/VNNI.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Vnni(());

impl Avx512Vnni {
    pub(crate) fn detect() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        ok.then_some(Self(()))
    }

    /// One tile: `out[i][r]` for activation rows `m0 + i` (`i < mt`) and rows `16 g + r`.
    pub(crate) fn tile(
        self,
        w: &Packed,
        acts: &QuantActs,
        g: usize,
        m0: usize,
        mt: usize,
        out: &mut [[f32; GROUP]; MAX_MT],
    ) {
        macro_rules! go {
            ($mt:literal) => {
                // SAFETY: `self` exists only when the CPU has the features these enable.
                unsafe {
                    match w.kind {
                        QKind::Q4_0 => q4_avx512::<$mt, false>(w, acts, g, m0, out),
                        QKind::Q4_1 => q4_avx512::<$mt, true>(w, acts, g, m0, out),
                        QKind::Q8_0 => q8_avx512::<$mt>(w, acts, g, m0, out),
                    }
                }
            };
        }
        match mt {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            _ => panic!("tile of {mt} activation rows"),
        }
    }
}

/// Proof that the CPU has AVX2, FMA and F16C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(Self(()))
    }

    /// Same contract as [`Avx512Vnni::tile`]; runs the group as two halves of 8 rows and at
    /// most 2 activation rows at a time (16 vector registers).
    pub(crate) fn tile(
        self,
        w: &Packed,
        acts: &QuantActs,
        g: usize,
        m0: usize,
        mt: usize,
        out: &mut [[f32; GROUP]; MAX_MT],
    ) {
        let mut i = 0;
        while i < mt {
            let n = (mt - i).min(2);
            for h in 0..2 {
                let mut half = [[0f32; 8]; 2];
                // SAFETY: `self` exists only when the CPU has the features these enable.
                unsafe {
                    match (w.kind, n) {
                        (QKind::Q4_0, 1) => q4_avx2::<1, false>(w, acts, g, h, m0 + i, &mut half),
                        (QKind::Q4_0, _) => q4_avx2::<2, false>(w, acts, g, h, m0 + i, &mut half),
                        (QKind::Q4_1, 1) => q4_avx2::<1, true>(w, acts, g, h, m0 + i, &mut half),
                        (QKind::Q4_1, _) => q4_avx2::<2, true>(w, acts, g, h, m0 + i, &mut half),
                        (QKind::Q8_0, 1) => q8_avx2::<1>(w, acts, g, h, m0 + i, &mut half),
                        (QKind::Q8_0, _) => q8_avx2::<2>(w, acts, g, h, m0 + i, &mut half),
                    }
                }
                for (k, row) in half.iter().enumerate().take(n) {
                    out[i + k][8 * h..8 * h + 8].copy_from_slice(row);
                }
            }
            i += n;
        }
    }
}

/// Four activation bytes starting at `k`, as the i32 to broadcast.
#[inline(always)]
fn word(a: &[i8; BLOCK], k: usize) -> i32 {
    i32::from_le_bytes([a[k] as u8, a[k + 1] as u8, a[k + 2] as u8, a[k + 3] as u8])
}

/// Per activation row `m0 + i` of a tile: its quants, block scales and sums.
struct TileActs<'a, const MT: usize> {
    qs: [&'a [i8]; MT],
    d: [&'a [f32]; MT],
    sum: [&'a [i32]; MT],
    dsum: [&'a [f32]; MT],
}

impl<'a, const MT: usize> TileActs<'a, MT> {
    #[inline(always)]
    fn new(acts: &'a QuantActs, m0: usize) -> Self {
        let (cols, nb) = (acts.cols, acts.num_blocks);
        Self {
            qs: core::array::from_fn(|i| &acts.qs[(m0 + i) * cols..][..cols]),
            d: core::array::from_fn(|i| &acts.d[(m0 + i) * nb..][..nb]),
            sum: core::array::from_fn(|i| &acts.sum[(m0 + i) * nb..][..nb]),
            dsum: core::array::from_fn(|i| &acts.dsum[(m0 + i) * nb..][..nb]),
        }
    }

    #[inline(always)]
    fn block(&self, i: usize, b: usize) -> &'a [i8; BLOCK] {
        self.qs[i][b * BLOCK..][..BLOCK]
            .try_into()
            .expect("block of 32")
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_line(line: &Line) -> __m512i {
    prefetch_ahead(line);
    // SAFETY: a `Line` is 64 readable bytes aligned to 64.
    unsafe { _mm512_load_si512((line as *const Line).cast()) }
}

/// How far ahead of the line being read to prefetch. Lines are read in storage order, so this is
/// a plain stream; prefetching it lets one thread read at close to the DRAM bandwidth (the
/// hardware prefetchers alone leave ~20% on the table for matrix-vector products).
const PREFETCH_BYTES: usize = 4096;

#[inline]
#[target_feature(enable = "sse")]
fn prefetch_ahead(line: &Line) {
    // A prefetch never faults, so the address may lie past the end of the lines; it is computed
    // with wrapping arithmetic and never dereferenced.
    let p = (line as *const Line)
        .cast::<i8>()
        .wrapping_add(PREFETCH_BYTES);
    _mm_prefetch::<_MM_HINT_T0>(p);
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_scales(s: &Scales16) -> __m512 {
    // SAFETY: a `Scales16` is 32 readable bytes aligned to 32.
    _mm512_cvtph_ps(unsafe { _mm256_load_si256((s as *const Scales16).cast()) })
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store16(acc: __m512, out: &mut [f32; GROUP]) {
    // SAFETY: `out` is 16 writable f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q4_avx512<const MT: usize, const Q4_1: bool>(
    w: &Packed,
    acts: &QuantActs,
    g: usize,
    m0: usize,
    out: &mut [[f32; GROUP]; MAX_MT],
) {
    let ta = TileActs::<MT>::new(acts, m0);
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..w.num_blocks {
        let lines = w.block_lines(g, b);
        let scales = w.block_scales(g, b);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for ((lo, hi), line) in lo.iter_mut().zip(hi.iter_mut()).zip(lines) {
            let v = load_line(line);
            *lo = _mm512_and_si512(v, mask);
            *hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        }
        let d_w = load_scales(&scales[0]);
        let m_w = if Q4_1 {
            load_scales(&scales[1])
        } else {
            _mm512_setzero_ps()
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = ta.block(i, b);
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for j in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, lo[j], _mm512_set1_epi32(word(a, 4 * j)));
                s1 = _mm512_dpbusd_epi32(s1, hi[j], _mm512_set1_epi32(word(a, 16 + 4 * j)));
            }
            let mut isum = _mm512_add_epi32(s0, s1);
            if !Q4_1 {
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * ta.sum[i][b]));
            }
            let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(ta.d[i][b]));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
            if Q4_1 {
                *acc = _mm512_fmadd_ps(m_w, _mm512_set1_ps(ta.dsum[i][b]), *acc);
            }
        }
    }
    for (acc, out) in acc.iter().zip(out.iter_mut()) {
        store16(*acc, out);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q8_avx512<const MT: usize>(
    w: &Packed,
    acts: &QuantActs,
    g: usize,
    m0: usize,
    out: &mut [[f32; GROUP]; MAX_MT],
) {
    let ta = TileActs::<MT>::new(acts, m0);
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..w.num_blocks {
        let lines = w.block_lines(g, b);
        let mut wq = [_mm512_setzero_si512(); 8];
        for (wq, line) in wq.iter_mut().zip(lines) {
            *wq = _mm512_xor_si512(load_line(line), flip);
        }
        let d_w = load_scales(&w.block_scales(g, b)[0]);
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = ta.block(i, b);
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for j in 0..4 {
                let (je, jo) = (2 * j, 2 * j + 1);
                s0 = _mm512_dpbusd_epi32(s0, wq[je], _mm512_set1_epi32(word(a, 4 * je)));
                s1 = _mm512_dpbusd_epi32(s1, wq[jo], _mm512_set1_epi32(word(a, 4 * jo)));
            }
            let isum = _mm512_sub_epi32(
                _mm512_add_epi32(s0, s1),
                _mm512_set1_epi32(128 * ta.sum[i][b]),
            );
            let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(ta.d[i][b]));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
        }
    }
    for (acc, out) in acc.iter().zip(out.iter_mut()) {
        store16(*acc, out);
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_half(line: &Line, h: usize) -> __m256i {
    prefetch_ahead(line);
    let half: &[u8; 32] = line.0[32 * h..][..32].try_into().expect("half line");
    // SAFETY: `half` is 32 readable bytes, 32-aligned (a 64-aligned line, offset 0 or 32).
    unsafe { _mm256_load_si256(half.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn load_half_scales(s: &Scales16, h: usize) -> __m256 {
    let half: &[u16; 8] = s.0[8 * h..][..8].try_into().expect("half scales");
    // SAFETY: `half` is 16 readable bytes, 16-aligned (a 32-aligned array, offset 0 or 16).
    _mm256_cvtph_ps(unsafe { _mm_load_si128(half.as_ptr().cast()) })
}

#[inline]
#[target_feature(enable = "avx2")]
fn store8(acc: __m256, out: &mut [f32; 8]) {
    // SAFETY: `out` is 8 writable f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_avx2<const MT: usize, const Q4_1: bool>(
    w: &Packed,
    acts: &QuantActs,
    g: usize,
    h: usize,
    m0: usize,
    out: &mut [[f32; 8]; 2],
) {
    let ta = TileActs::<MT>::new(acts, m0);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MT];
    for b in 0..w.num_blocks {
        let lines = w.block_lines(g, b);
        let scales = w.block_scales(g, b);
        let mut lo = [_mm256_setzero_si256(); 4];
        let mut hi = [_mm256_setzero_si256(); 4];
        for ((lo, hi), line) in lo.iter_mut().zip(hi.iter_mut()).zip(lines) {
            let v = load_half(line, h);
            *lo = _mm256_and_si256(v, mask);
            *hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        }
        let d_w = load_half_scales(&scales[0], h);
        let m_w = if Q4_1 {
            load_half_scales(&scales[1], h)
        } else {
            _mm256_setzero_ps()
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = ta.block(i, b);
            // Each maddubs pair is at most 2 * 15 * 127; eight of them fit in i16.
            let mut p = _mm256_setzero_si256();
            for j in 0..4 {
                let alo = _mm256_set1_epi32(word(a, 4 * j));
                let ahi = _mm256_set1_epi32(word(a, 16 + 4 * j));
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[j], alo));
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[j], ahi));
            }
            let mut isum = _mm256_madd_epi16(p, ones);
            if !Q4_1 {
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * ta.sum[i][b]));
            }
            let scale = _mm256_mul_ps(d_w, _mm256_set1_ps(ta.d[i][b]));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            if Q4_1 {
                *acc = _mm256_fmadd_ps(m_w, _mm256_set1_ps(ta.dsum[i][b]), *acc);
            }
        }
    }
    for (acc, out) in acc.iter().zip(out.iter_mut()) {
        store8(*acc, out);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_avx2<const MT: usize>(
    w: &Packed,
    acts: &QuantActs,
    g: usize,
    h: usize,
    m0: usize,
    out: &mut [[f32; 8]; 2],
) {
    let ta = TileActs::<MT>::new(acts, m0);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); MT];
    for b in 0..w.num_blocks {
        let lines = w.block_lines(g, b);
        let d_w = load_half_scales(&w.block_scales(g, b)[0], h);
        for (i, acc) in acc.iter_mut().enumerate() {
            let a = ta.block(i, b);
            let mut isum = _mm256_setzero_si256();
            for (j, line) in lines.iter().enumerate() {
                let wq = load_half(line, h);
                let av = _mm256_set1_epi32(word(a, 4 * j));
                // |w| * sign(a, w): each pair is at most 2 * 128 * 127, inside i16.
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(av, wq));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
            }
            let scale = _mm256_mul_ps(d_w, _mm256_set1_ps(ta.d[i][b]));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
        }
    }
    for (acc, out) in acc.iter().zip(out.iter_mut()) {
        store8(*acc, out);
    }
}
