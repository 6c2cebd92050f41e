//! The sampler over a 128k vocabulary (Llama 3's 128,256): top-p 0.95 at temperature 0.8, with
//! top-k 50, and greedy for reference. Logits are fixed pseudo-random normals with σ 3 (a
//! moderately peaked distribution; top-p then keeps a few thousand candidates).
//!
//!   cargo bench -p pagoda-benches --bench sampler
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pagoda_engine::sampler::SequenceSampler;
use pagoda_engine::SamplingParams;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 128_256;

fn logits() -> Vec<f32> {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    (0..VOCAB / 2)
        .flat_map(|_| {
            // Box-Muller: two normals per draw.
            let (u1, u2): (f32, f32) = (rng.random(), rng.random());
            let r = (-2.0 * (1.0 - u1).ln()).sqrt() * 3.0;
            let a = std::f32::consts::TAU * u2;
            [r * a.cos(), r * a.sin()]
        })
        .collect()
}

fn sampler(c: &mut Criterion) {
    let logits = logits();
    let cases = [
        (
            "top_p_0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: Some(1),
                ..Default::default()
            },
        ),
        (
            "top_k_50",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                seed: Some(1),
                ..Default::default()
            },
        ),
        ("greedy", SamplingParams::default()),
    ];
    let mut g = c.benchmark_group("sampler_128k_vocab");
    for (name, params) in cases {
        let mut sampler = SequenceSampler::new(&params, &[]);
        g.bench_function(name, |b| {
            // The sampler uses the logits as scratch: a fresh copy each time (not timed).
            b.iter_batched_ref(
                || logits.clone(),
                |l| sampler.sample(l, &params, &[], &[]),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, sampler);
criterion_main!(benches);
