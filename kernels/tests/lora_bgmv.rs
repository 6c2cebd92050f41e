//! Batched LoRA against a per-token reference (`y + x Aᵀ B'`), with mixed slots, empty tokens,
//! ranks below the stack's maximum and a cleared slot, on every compiled device and dtype.
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
    let (in_f, out_f, max_rank, num_slots) = (48, 40, 8, 4);
    let ranks = [8usize, 3, 5];
    for device in devices() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2), (DType::F16, 5e-3)] {
            let mut stack =
                LoraStack::zeros(num_slots, max_rank, (in_f, out_f), dtype, &device).unwrap();
            let mut weights = Vec::new();
            for (slot, &r) in ranks.iter().enumerate() {
                let a = Tensor::randn(0f32, 1.0, (r, in_f), &device).unwrap();
                let bt = Tensor::randn(0f32, 0.2, (r, out_f), &device).unwrap();
                stack.set_slot(slot, Some((&a, &bt))).unwrap();
                weights.push((a, bt));
            }
            // Slot 3 was filled and then cleared: it must act as no adapter.
            stack
                .set_slot(3, Some((&weights[0].0, &weights[0].1)))
                .unwrap();
            stack.set_slot(3, None).unwrap();
            let slots = vec![1, NO_SLOT, 0, 0, 2, 3, 1, NO_SLOT, 2];
            let t = slots.len();
            let x = Tensor::randn(0f32, 1.0, (t, in_f), &device).unwrap();
            let y = Tensor::randn(0f32, 1.0, (t, out_f), &device).unwrap();
            let got = lora_apply(
                &y.to_dtype(dtype).unwrap(),
                &x.to_dtype(dtype).unwrap(),
                &stack,
                &LoraIndices::new(slots.clone()),
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
            // The reference sees the same rounded inputs as the op.
            let r = |v: &Tensor| v.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (x, y) = (r(&x), r(&y));
            for (i, &s) in slots.iter().enumerate() {
                let yi = y.i(i).unwrap();
                let want = match weights.get(s as usize) {
                    Some((a, bt)) if s != 3 => {
                        let xi = x.i(i..i + 1).unwrap();
                        let v = xi.matmul(&r(a).t().unwrap()).unwrap();
                        (yi + v.matmul(&r(bt)).unwrap().squeeze(0).unwrap()).unwrap()
                    }
                    _ => yi,
                };
                let diff = (got.i(i).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff <= tol * scale.max(1.0),
                    "{device:?} {dtype:?} token {i} slot {s}: max diff {diff}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_and_slots_are_errors() {
    let dev = Device::Cpu;
    let mut stack = LoraStack::zeros(2, 4, (8, 6), DType::F32, &dev).unwrap();
    let a = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
    let bt = Tensor::zeros((5, 6), DType::F32, &dev).unwrap();
    assert!(
        stack.set_slot(0, Some((&a, &bt))).is_err(),
        "rank above max"
    );
    assert!(stack.set_slot(2, None).is_err(), "slot out of range");
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let y = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0, 2])).is_err());
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0])).is_err());
    assert!(lora_apply(&y, &x, &stack, &LoraIndices::new(vec![0, NO_SLOT])).is_ok());
}
