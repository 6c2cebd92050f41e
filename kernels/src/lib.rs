//! Kernels: the custom ops the models need beyond what candle offers, each with a CPU
//! implementation (the reference) and the same API for every device.
//!
//! - [`paged`]: the paged KV cache of one layer ([`PagedKvLayer`]), writing new keys and values
//!   into their slots ([`reshape_and_cache`]) and attention of a flattened varlen batch of query
//!   tokens over the paged cache ([`paged_attention`]) — one op for prefill, chunked prefill and
//!   decode.
//!
//! - [`lora`]: batched LoRA over a flattened batch ([`lora_apply`]): every token gets the
//!   low-rank update of its own adapter slot in a [`LoraStack`], or none.
//!
//! - [`device`]: the one place that knows whether CUDA is compiled in and present.
//!
//! Every op has a CPU implementation (the reference) and, with the `cuda` feature, a CUDA one
//! (`src/cuda/*.cu`); tests run one body on each compiled device.
//!
//! Shapes (T = tokens in the step, H = query heads, KVH = key/value heads, D = head dim,
//! NB = blocks in the pool, BS = block size):
//! - queries `[T, H, D]`, new keys/values `[T, KVH, D]`;
//! - cache `[NB, BS, KVH, D]` for keys and for values;
//! - output `[T, H, D]`.
pub mod cpu_quant;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
mod float;
pub mod lora;
pub mod paged;

pub use device::{select_device, DeviceChoice};
pub use lora::{lora_apply, LoraIndices, LoraStack, NO_SLOT};
pub use paged::{paged_attention, reshape_and_cache, AttentionMetadata, PagedKvLayer};
