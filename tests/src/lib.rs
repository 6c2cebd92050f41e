//! Shared helpers for the end-to-end and model tests.
use std::path::PathBuf;

use candle_core::Tensor;
use pagoda_kernels::AttentionMetadata;
use pagoda_kernels::LoraIndices;
use pagoda_models::{ForwardBatch, Model, PagedKvCache};
use serde::Deserialize;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Every device this build can run on: the CPU, plus the GPU when compiled with `cuda` and
/// one is present. Model tests run one body on each.
pub fn devices() -> Vec<candle_core::Device> {
    let mut out = vec![candle_core::Device::Cpu];
    if let Ok(s) = pagoda_kernels::select_device(pagoda_kernels::DeviceChoice::Cuda) {
        out.push(s.device);
    }
    out
}

/// The default model; tests that need it fail (not skip) when `scripts/fetch-model` didn't run.
pub fn default_model() -> PathBuf {
    pagoda_models::resolve_model_path(None)
        .expect("the default model is missing: run scripts/fetch-model")
}

/// Runs one sequence through a model chunk by chunk over a paged cache, as the engine would,
/// using a deliberately scrambled block table. Returns the logits of every token.
pub struct PagedRunner {
    pub cache: PagedKvCache,
    /// Every token's LoRA slot, when set.
    pub lora_slot: Option<u32>,
    table: Vec<u32>,
    tokens: Vec<u32>,
}

impl PagedRunner {
    pub fn new(model: &dyn Model, num_blocks: usize, block_size: usize) -> Self {
        let cache = PagedKvCache::new(
            &model.kv_cache_spec(),
            num_blocks,
            block_size,
            model.device(),
        )
        .unwrap();
        // Blocks in a non-trivial order: odd ones descending, then even ones.
        let mut table: Vec<u32> = (0..num_blocks as u32)
            .filter(|b| b % 2 == 1)
            .rev()
            .collect();
        table.extend((0..num_blocks as u32).filter(|b| b % 2 == 0));
        Self {
            cache,
            lora_slot: None,
            table,
            tokens: Vec::new(),
        }
    }

    /// Appends `new` tokens and returns the logits of each, `[new.len(), vocab]`.
    pub fn feed(&mut self, model: &dyn Model, new: &[u32]) -> Vec<Vec<f32>> {
        let bs = self.cache.block_size;
        let start = self.tokens.len();
        self.tokens.extend_from_slice(new);
        let end = self.tokens.len();
        let num_blocks = end.div_ceil(bs);
        let attention = AttentionMetadata::new(
            (start..end)
                .map(|p| self.table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect(),
            vec![0, new.len() as u32],
            vec![end as u32],
            self.table[..num_blocks].to_vec(),
            num_blocks,
        );
        let batch = ForwardBatch {
            input_ids: new.to_vec(),
            attention,
            logits_indices: (0..new.len() as u32).collect(),
            lora: self.lora_slot.map(|s| LoraIndices::new(vec![s; new.len()])),
        };
        let logits: Tensor = model.forward(&batch, &mut self.cache).unwrap();
        logits.to_vec2().unwrap()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Deserialize)]
pub struct Step {
    pub token: u32,
    pub logits: Vec<f32>,
}

#[derive(Deserialize)]
pub struct Expected {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<Vec<f32>>,
    pub decode: Vec<Step>,
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub const TOL: f32 = 1e-4;

/// Prefill in chunks of `chunk` tokens, then decode the reference's greedy tokens, comparing
/// every logit row (and, when `greedy`, that our argmax picks the same tokens).
pub fn check(
    model: &dyn Model,
    exp: &Expected,
    chunk: usize,
    block_size: usize,
    tol: f32,
    greedy: bool,
) {
    check_with_lora(model, exp, (chunk, block_size), tol, greedy, None)
}

/// [`check`] with every token on LoRA slot `lora_slot`.
pub fn check_with_lora(
    model: &dyn Model,
    exp: &Expected,
    (chunk, block_size): (usize, usize),
    tol: f32,
    greedy: bool,
    lora_slot: Option<u32>,
) {
    let mut runner = PagedRunner::new(model, 16, block_size);
    runner.lora_slot = lora_slot;
    let mut rows = Vec::new();
    for part in exp.prompt_ids.chunks(chunk) {
        rows.extend(runner.feed(model, part));
    }
    for (i, (got, want)) in rows.iter().zip(&exp.prefill_logits).enumerate() {
        let d = max_abs_diff(got, want);
        assert!(
            d < tol,
            "prefill position {i}: max abs diff {d} (chunk {chunk}, block size {block_size})"
        );
    }
    let mut last = rows.last().unwrap().clone();
    for (i, step) in exp.decode.iter().enumerate() {
        if greedy {
            assert_eq!(argmax(&last), step.token, "greedy token at decode step {i}");
        }
        last = runner.feed(model, &[step.token]).pop().unwrap();
        let d = max_abs_diff(&last, &step.logits);
        assert!(d < tol, "decode step {i}: max abs diff {d}");
    }
}
