//! The portable kernel: the reference for the SIMD paths and the fallback on other CPUs.
//!
//! Per (output row, block) it forms the exact integer dot product of the weight quants with the
//! activation quants, then accumulates in f32 in the same order and with the same fused
//! multiply-adds as the SIMD lanes, so every path gives bit-identical results.
use super::layout::{f16_bits, Packed, QKind, QuantActs, BLOCK, GROUP};

/// `out[r]` = row `16 g + r` of W dotted with activation row `mi`, for the 16 rows of group `g`.
pub(crate) fn group_row(w: &Packed, acts: &QuantActs, g: usize, mi: usize, out: &mut [f32; GROUP]) {
    let nb = w.num_blocks;
    let a_row = &acts.qs[mi * w.cols..][..w.cols];
    let d_a = &acts.d[mi * nb..][..nb];
    let sum_a = &acts.sum[mi * nb..][..nb];
    let dsum_a = &acts.dsum[mi * nb..][..nb];
    let mut acc = [0f32; GROUP];
    for b in 0..nb {
        let a: &[i8; BLOCK] = a_row[b * BLOCK..][..BLOCK].try_into().expect("block of 32");
        let lines = w.block_lines(g, b);
        let scales = w.block_scales(g, b);
        for (r, acc) in acc.iter_mut().enumerate() {
            let isum = match w.kind {
                QKind::Q4_0 | QKind::Q4_1 => {
                    let mut s = 0i32;
                    for (j, line) in lines.iter().enumerate() {
                        for (t, &byte) in line.0[4 * r..4 * r + 4].iter().enumerate() {
                            let lo = i32::from(byte & 0x0F);
                            let hi = i32::from(byte >> 4);
                            s += lo * i32::from(a[4 * j + t]) + hi * i32::from(a[16 + 4 * j + t]);
                        }
                    }
                    if w.kind == QKind::Q4_0 {
                        // Q4_0 quants are stored with +8 offset.
                        s - 8 * sum_a[b]
                    } else {
                        s
                    }
                }
                QKind::Q8_0 => {
                    let mut s = 0i32;
                    for (j, line) in lines.iter().enumerate() {
                        for (t, &byte) in line.0[4 * r..4 * r + 4].iter().enumerate() {
                            s += i32::from(byte as i8) * i32::from(a[4 * j + t]);
                        }
                    }
                    s
                }
            };
            let d_w = f16_bits(scales[0].0[r]);
            *acc = (isum as f32).mul_add(d_w * d_a[b], *acc);
            if w.kind == QKind::Q4_1 {
                *acc = f16_bits(scales[1].0[r]).mul_add(dsum_a[b], *acc);
            }
        }
    }
    *out = acc;
}
