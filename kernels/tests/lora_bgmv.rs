//! Batched LoRA against a per-token reference (`y + x Aᵀ B'` per packed part), with mixed
//! slots, tokens without an adapter, ranks below the stack's maximum, parts an adapter leaves
//! out and a cleared slot, on every compiled device and dtype.
use candle_core::{DType, Device, IndexOp, Tensor};
use pagoda_kernels::{lora_apply, LoraIndices, LoraStack, NO_SLOT};

fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if let Ok(d) = Device::new_cuda(0) {
        out.push(d);
    }
    out
}

#[test]
fn bgmv_matches_per_token_reference() {
    // Widths that allow the CUDA kernels' 16-byte vectors, and widths that don't.
    check_against_reference(48, [40, 24, 16], 8, 9);
    check_against_reference(30, [13, 7, 5], 7, 9);
    // A prefill-sized batch.
    check_against_reference(48, [40, 24, 16], 8, 600);
}

fn check_against_reference(in_f: usize, parts: [usize; 3], max_rank: usize, num_tokens: usize) {
    let num_slots = 4;
    let total: usize = parts.iter().sum();
    // (slot, part) -> rank; slot 1 leaves part 2 out, slot 3 is filled then cleared.
    let ranks = [[max_rank, 3, 5], [2, 6, 0], [5, 5, 1]];
    for device in devices() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2), (DType::F16, 5e-3)] {
            let mut stack =
                LoraStack::zeros(num_slots, max_rank, in_f, &parts, dtype, &device).unwrap();
            let mut weights = vec![vec![None; parts.len()]; num_slots];
            for (slot, rs) in ranks.iter().enumerate() {
                for (j, &r) in rs.iter().enumerate() {
                    if r == 0 {
                        continue;
                    }
                    let a = Tensor::randn(0f32, 1.0, (r, in_f), &device).unwrap();
                    let bt = Tensor::randn(0f32, 0.2, (r, parts[j]), &device).unwrap();
                    stack.set_slot(slot, j, Some((&a, &bt))).unwrap();
                    weights[slot][j] = Some((a, bt));
                }
            }
            let (a0, b0) = weights[0][0].clone().unwrap();
            stack.set_slot(3, 0, Some((&a0, &b0))).unwrap();
            stack.set_slot(3, 0, None).unwrap();
            let pattern = [1, NO_SLOT, 0, 0, 2, 3, 1, NO_SLOT, 2];
            let slots: Vec<u32> = pattern.iter().copied().cycle().take(num_tokens).collect();
            let t = slots.len();
            let x = Tensor::randn(0f32, 1.0, (t, in_f), &device).unwrap();
            let y = Tensor::randn(0f32, 1.0, (t, total), &device).unwrap();
            // A copy: `lora_apply` writes into `yd`, and `to_dtype` to the same type shares storage.
            let (xd, yd) = (
                x.to_dtype(dtype).unwrap(),
                y.to_dtype(dtype).unwrap().copy().unwrap(),
            );
            lora_apply(&yd, &xd, &stack, &LoraIndices::new(slots.clone())).unwrap();
            let got = yd.to_dtype(DType::F32).unwrap();
            // The reference sees the same rounded inputs as the op.
            let r = |v: &Tensor| v.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (x, y) = (r(&x), r(&y));
            for (i, &s) in slots.iter().enumerate() {
                let mut col = 0;
                for (j, &out_f) in parts.iter().enumerate() {
                    let yi = y.i((i, col..col + out_f)).unwrap();
                    let want = match weights.get(s as usize).and_then(|w| w[j].as_ref()) {
                        Some((a, bt)) => {
                            let xi = x.i(i..i + 1).unwrap();
                            let v = xi.matmul(&r(a).t().unwrap()).unwrap();
                            (yi + v.matmul(&r(bt)).unwrap().squeeze(0).unwrap()).unwrap()
                        }
                        None => yi,
                    };
                    let g = got.i((i, col..col + out_f)).unwrap();
                    let diff = max_abs(&(g - &want).unwrap());
                    let scale = max_abs(&want);
                    assert!(
                        diff <= tol * scale.max(1.0),
                        "{device:?} {dtype:?} token {i} slot {s} part {j}: max diff {diff}"
                    );
                    col += out_f;
                }
            }
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn bad_shapes_and_slots_are_errors() {
    let dev = Device::Cpu;
    let mut stack = LoraStack::zeros(2, 4, 8, &[6], DType::F32, &dev).unwrap();
    let a = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
    let bt = Tensor::zeros((5, 6), DType::F32, &dev).unwrap();
    assert!(
        stack.set_slot(0, 0, Some((&a, &bt))).is_err(),
        "rank above max"
    );
    assert!(stack.set_slot(2, 0, None).is_err(), "slot out of range");
    assert!(stack.set_slot(0, 1, None).is_err(), "part out of range");
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let y = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0, 2])).is_err());
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0])).is_err());
    let strided = Tensor::zeros((6, 2), DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    assert!(lora_apply(&strided, &x, &stack, &LoraIndices::new(vec![0, 0])).is_err());
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0, NO_SLOT])).is_ok());
}
