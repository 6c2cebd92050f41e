//! LoRA adapters: parsed from PEFT folders, kept in a registry with generations, and placed in
//! the model's device slots for the steps that use them.
//!
//! - [`LoraAdapter`]: one immutable generation of an adapter (`adapter_config.json` +
//!   `adapter_model.safetensors`), checked against the base model's [`LoraShapes`] and kept in
//!   host memory as the [`pagoda_models::LoraWeights`] its slot receives. A request holds an
//!   `Arc` to the generation it resolved (its lease) until it finishes.
//! - [`AdapterRegistry`]: name → current generation. Loading a name again replaces it for new
//!   requests only; unloading stops new requests (404) while running ones finish. Limits on
//!   count, rank and host memory; runtime paths confined to one directory ([`confine_path`]).
//! - [`AdapterSlots`]: the engine thread's LRU over the model's device slots; every adapter in a
//!   step gets a slot, the least recently used adapters not in the step make room.
//!
//! [`LoraShapes`]: pagoda_models::LoraShapes
mod error;
mod peft;
mod registry;
mod slots;

pub use error::AdapterError;
pub use peft::{AdapterId, LoraAdapter};
pub use registry::{confine_path, AdapterInfo, AdapterLimits, AdapterRegistry, RegistryStats};
pub use slots::AdapterSlots;
