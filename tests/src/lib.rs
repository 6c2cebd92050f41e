//! Shared helpers for the end-to-end and model tests.
use std::path::PathBuf;

use candle_core::Tensor;
use pagoda_kernels::AttentionMetadata;
use pagoda_models::{ForwardBatch, Model, PagedKvCache};

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
