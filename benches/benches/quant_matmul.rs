//! Quantized matrix products on the CPU: ours (`pagoda_kernels::cpu_quant::CpuQMatrix`, the
//! fastest SIMD path this CPU has) against candle's `QMatMul`, for Q4_0, Q4_1 and Q8_0 weights
//! of SmolLM2-135M's MLP up projection (1536 × 576) and a Llama-3-8B-sized square (4096 × 4096),
//! at 1 activation row (decode) and 16 (a small batch). Random weights, quantized by candle.
//!
//!   cargo bench -p pagoda-benches --bench quant_matmul
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagoda_kernels::cpu_quant::{CpuQMatrix, KernelPath};

fn matmul(c: &mut Criterion) {
    let device = Device::Cpu;
    eprintln!("quant_matmul: kernel path {:?}", KernelPath::detect());
    for (shape_name, rows, cols) in [("1536x576", 1536, 576), ("4096x4096", 4096, 4096)] {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &device).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = CpuQMatrix::from_qtensor(&q)
                .unwrap()
                .expect("a format we repack");
            let candle = QMatMul::from_qtensor(q).unwrap();
            let mut g = c.benchmark_group(format!("quant_matmul_{dtype:?}_{shape_name}"));
            for m in [1usize, 16] {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &device).unwrap();
                // Elements are multiply-adds.
                g.throughput(Throughput::Elements((rows * cols * m) as u64));
                g.bench_function(format!("pagoda_m{m}"), |b| {
                    b.iter(|| ours.forward(&x).unwrap())
                });
                g.bench_function(format!("candle_m{m}"), |b| {
                    b.iter(|| candle.forward(&x).unwrap())
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, matmul);
criterion_main!(benches);
