//! A request as the engine thread owns it: token ids, progress and sampling state.
use std::sync::Arc;

use pagoda_adapters::{AdapterId, LoraAdapter};

use crate::sampler::SequenceSampler;
use crate::SamplingParams;

/// Engine-wide request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// Why a request stopped generating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token (or, at the edge, a stop string).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// Aborted (client gone, shutdown).
    Abort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
}

/// One generation. `num_computed_tokens` chases `num_tokens()`: there is no prefill or decode
/// mode; a request whose computed tokens reach its length samples one more.
pub struct Request {
    pub id: RequestId,
    pub prompt_tokens: Vec<u32>,
    pub output_tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub num_computed_tokens: usize,
    pub params: SamplingParams,
    pub sampler: SequenceSampler,
    pub status: RequestStatus,
    /// Generation ends here at the latest (prompt + max_tokens, capped by the context length).
    pub max_total_tokens: usize,
    pub num_preemptions: usize,
    /// The LoRA adapter generation the request runs with (held until it finishes), if any.
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl Request {
    pub fn new(
        id: RequestId,
        prompt_tokens: Vec<u32>,
        params: SamplingParams,
        max_context_len: usize,
    ) -> Self {
        let max_total_tokens = prompt_tokens
            .len()
            .saturating_add(params.max_tokens)
            .min(max_context_len);
        Self {
            id,
            sampler: SequenceSampler::new(&params, &prompt_tokens),
            prompt_tokens,
            output_tokens: Vec::new(),
            num_computed_tokens: 0,
            params,
            status: RequestStatus::Waiting,
            max_total_tokens,
            num_preemptions: 0,
            adapter: None,
        }
    }

    pub fn adapter_id(&self) -> Option<AdapterId> {
        self.adapter.as_ref().map(|a| a.id)
    }

    pub fn num_tokens(&self) -> usize {
        self.prompt_tokens.len() + self.output_tokens.len()
    }

    /// Token `i` of prompt followed by output.
    pub fn token(&self, i: usize) -> u32 {
        let p = self.prompt_tokens.len();
        if i < p {
            self.prompt_tokens[i]
        } else {
            self.output_tokens[i - p]
        }
    }
}
