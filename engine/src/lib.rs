//! Engine: validation, scheduler, KV bookkeeping, runner, sampler, detokenizer and the
//! [`EngineHandle`] through which everything else talks to the engine thread.
//!
//! - [`validate`]: [`GenerateRequest`] (API-neutral) → [`validate::ValidRequest`].
//! - [`scheduler::Scheduler`]: continuous batching over [`kv::KvCacheManager`] (logical
//!   blocks); chunked prefill and recompute preemption fall out of `num_computed_tokens`.
//! - [`runner`]: scheduler output → [`pagoda_models::ForwardBatch`] → logits → sampled tokens.
//! - [`engine::Engine`]: `step()` = schedule → execute → update, owned by one thread.
//! - [`EngineHandle`] / [`RequestStream`]: submit, abort, stream text with stop strings.
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod handle;
pub mod kv;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod stop;
pub mod stream;
pub mod validate;

pub use engine::{Engine, EngineConfig, EngineStats};
pub use error::EngineError;
pub use handle::{EngineHandle, ModelInfo};
pub use request::{FinishReason, RequestId};
pub use sampling_params::SamplingParams;
pub use scheduler::SchedulerConfig;
pub use stream::{RequestStream, StreamOutput, TokenInfo};
pub use validate::{GenerateRequest, Prompt};
