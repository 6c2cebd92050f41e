//! The contract between the engine and a model: one forward over a flattened varlen batch that
//! reads and writes keys and values only through the paged cache.
use candle_core::{DType, Device, Tensor};
use pagoda_kernels::{AttentionMetadata, LoraIndices, PagedKvLayer};

use crate::lora::{LoraShapes, LoraWeights};

use crate::Result;

/// What a KV block costs for this model; the engine sizes its pool from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Bytes of K and V for one block over all layers.
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        2 * self.num_layers
            * block_size
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.size_in_bytes()
    }
}

/// The paged KV cache of all layers.
pub struct PagedKvCache {
    pub layers: Vec<PagedKvLayer>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl PagedKvCache {
    pub fn new(
        spec: &KvCacheSpec,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..spec.num_layers)
            .map(|_| {
                PagedKvLayer::zeros(
                    num_blocks,
                    block_size,
                    spec.num_kv_heads,
                    spec.head_dim,
                    spec.dtype,
                    device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            block_size,
            num_blocks,
        })
    }
}

/// One step's input: every scheduled token of every sequence, flattened, no padding.
#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    /// `[num_tokens]`.
    pub input_ids: Vec<u32>,
    /// Positions, slots and block tables of those tokens.
    pub attention: AttentionMetadata,
    /// Indices into the flattened tokens whose logits are wanted (usually each sequence's last
    /// scheduled token, when it will sample).
    pub logits_indices: Vec<u32>,
    /// Each token's LoRA slot (`pagoda_kernels::NO_SLOT` for none); `None` when no token of the
    /// step uses an adapter.
    pub lora: Option<LoraIndices>,
}

/// A causal language model over the paged cache.
pub trait Model: Send {
    fn kv_cache_spec(&self) -> KvCacheSpec;
    /// Longest sequence (prompt + output) the model supports.
    fn max_context_len(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> &Device;
    /// Peak activation bytes one token of a step needs (an estimate for sizing the KV pool).
    fn activation_bytes_per_token(&self) -> usize;
    /// Logits `[logits_indices.len(), vocab]`, f32.
    fn forward(&self, batch: &ForwardBatch, cache: &mut PagedKvCache) -> Result<Tensor>;
    /// The projections adapters may target and their shapes.
    fn lora_shapes(&self) -> LoraShapes;
    /// Allocates `num_slots` device slots of rank up to `max_rank` for every target (once,
    /// before the KV pool is sized).
    fn init_lora_slots(&mut self, num_slots: usize, max_rank: usize) -> Result<()>;
    /// Device bytes the LoRA slots take.
    fn lora_slot_bytes(&self) -> usize;
    /// Copies an adapter into `slot` (`None` clears it).
    fn set_lora_slot(&mut self, slot: usize, weights: Option<&LoraWeights>) -> Result<()>;
}
