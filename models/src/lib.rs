//! Models: the engine's view of a language model and everything needed to open one.
//!
//! - [`Model`]: `forward(&ForwardBatch, &mut PagedKvCache) -> logits` over a flattened varlen
//!   batch; keys and values are read and written only through the paged cache.
//! - [`arch`]: architectures, one family per file ([`arch::llama::Llama`]: Llama 2/3, SmolLM2,
//!   Mistral, Qwen2).
//! - [`loader::load`]: a GGUF file (quantized or float) or a Hugging Face folder → model,
//!   [`tokenizer::ModelTokenizer`] and chat template.
//! - [`lora`]: what LoRA adapters may target and the weights they put into device slots.
//! - [`weights::WeightSource`]: tensors by Hugging Face name from either format.
pub mod arch;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod loader;
pub mod lora;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use loader::{load, load_weights, resolve_model_path, LoadOptions, LoadedModel};
pub use lora::{LoraPair, LoraShapes, LoraTarget, LoraWeights};
pub use model::{ForwardBatch, KvCacheSpec, Model, PagedKvCache};
