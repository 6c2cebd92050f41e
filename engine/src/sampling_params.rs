//! Per-request generation settings, in token space (stop strings live at the edge).

/// `max_tokens` value meaning "as many as fit".
pub const MAX_TOKENS_AUTO: usize = usize::MAX;

/// The largest `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How one request samples its tokens and when it stops.
///
/// The defaults are greedy decoding with no penalties: `temperature == 0` means argmax.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off; > 1 discourages tokens seen in prompt or output (HF/vLLM semantics).
    pub repetition_penalty: f32,
    /// 0.0 = off; subtracted once from every token present in the output (OpenAI semantics).
    pub presence_penalty: f32,
    /// 0.0 = off; subtracted per occurrence in the output (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Added to the logit of the token before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same tokens, whatever else shares the batch. `None` = random.
    pub seed: Option<u64>,
    /// Most tokens to generate; [`MAX_TOKENS_AUTO`] means as many as the context and the KV
    /// pool leave room for (the validator fills in the number).
    pub max_tokens: usize,
    /// End-of-generation tokens are suppressed until this many tokens were generated.
    pub min_tokens: usize,
    /// Extra token ids that end generation (kept in the output, like EOS).
    pub stop_token_ids: Vec<u32>,
    /// Don't stop on the model's EOS tokens.
    pub ignore_eos: bool,
    /// Return the sampled token's logprob plus this many top alternatives (`None` = no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Greedy with nothing that needs the whole logit row on the host (no bias, penalties,
    /// logprobs or pending `min_tokens`): the next token is the argmax of the raw logits, which
    /// the runner takes where the logits are.
    pub fn is_plain_greedy(&self, num_output_tokens: usize) -> bool {
        self.is_greedy()
            && self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logprobs.is_none()
            && num_output_tokens >= self.min_tokens
    }
}
