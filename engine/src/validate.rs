//! Parse, don't validate: a [`GenerateRequest`] (API-neutral) becomes a [`ValidRequest`] only
//! here, with the prompt tokenized and every parameter checked. Each rejection names the
//! parameter and says what would be accepted.
use std::sync::Arc;

use pagoda_models::chat_template::ChatMessage;
use pagoda_models::tokenizer::ModelTokenizer;

use crate::sampling_params::{MAX_TOKENS_AUTO, MAX_TOP_LOGPROBS};
use crate::{EngineError, SamplingParams};

/// What to complete.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the model's special tokens (BOS) where it wants them.
    Text(String),
    /// Token ids as given.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the model's chat template and a generation prompt.
    Chat(Vec<ChatMessage>),
}

/// A generation request in the engine's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// Stop strings (matched on the text at the edge; not part of the output).
    pub stop: Vec<String>,
    pub skip_special_tokens: bool,
    /// A LoRA adapter by name; `None` runs the base model.
    pub adapter: Option<String>,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            stop: Vec::new(),
            skip_special_tokens: true,
            adapter: None,
        }
    }
}

/// A request that passed validation. Only [`Validator::validate`] builds one.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    prompt_tokens: Vec<u32>,
    params: SamplingParams,
    stop: Vec<String>,
    skip_special_tokens: bool,
}

impl ValidRequest {
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.prompt_tokens
    }
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }
    pub fn stop(&self) -> &[String] {
        &self.stop
    }
    pub fn skip_special_tokens(&self) -> bool {
        self.skip_special_tokens
    }
    pub(crate) fn into_parts(self) -> (Vec<u32>, SamplingParams, Vec<String>, bool) {
        (
            self.prompt_tokens,
            self.params,
            self.stop,
            self.skip_special_tokens,
        )
    }
}

/// The most stop strings a request may give, and how long each may be.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_STRING_LEN: usize = 256;
/// Most logit_bias entries.
pub const MAX_LOGIT_BIAS: usize = 1024;

pub struct Validator {
    pub tokenizer: Arc<ModelTokenizer>,
    pub vocab_size: usize,
    /// Model context length.
    pub max_context_len: usize,
    /// Tokens the whole KV pool holds: a longer request could never run.
    pub max_pool_tokens: usize,
}

fn check_range(param: &'static str, v: f32, lo: f32, hi: f32) -> Result<(), EngineError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(EngineError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ))
    }
}

impl Validator {
    pub fn validate(&self, req: GenerateRequest) -> Result<ValidRequest, EngineError> {
        let p = &req.params;
        check_range("temperature", p.temperature, 0.0, 100.0)?;
        if !(p.top_p.is_finite() && p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(EngineError::invalid(
                "top_p",
                format!("`top_p` must be in (0, 1], got {}", p.top_p),
            ));
        }
        check_range("min_p", p.min_p, 0.0, 1.0)?;
        if !(p.repetition_penalty.is_finite()
            && p.repetition_penalty > 0.0
            && p.repetition_penalty <= 10.0)
        {
            return Err(EngineError::invalid(
                "repetition_penalty",
                format!(
                    "`repetition_penalty` must be in (0, 10], got {}",
                    p.repetition_penalty
                ),
            ));
        }
        check_range("presence_penalty", p.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?;
        if p.top_k > self.vocab_size {
            return Err(EngineError::invalid(
                "top_k",
                format!(
                    "`top_k` must be at most the vocabulary size {}, got {}",
                    self.vocab_size, p.top_k
                ),
            ));
        }
        if p.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(EngineError::invalid(
                "logit_bias",
                format!("at most {MAX_LOGIT_BIAS} `logit_bias` entries"),
            ));
        }
        for &(token, bias) in &p.logit_bias {
            self.check_token("logit_bias", token)?;
            check_range("logit_bias", bias, -100.0, 100.0)?;
        }
        for &token in &p.stop_token_ids {
            self.check_token("stop_token_ids", token)?;
        }
        if let Some(n) = p.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(EngineError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {n}"),
                ));
            }
        }
        if p.max_tokens == 0 {
            return Err(EngineError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ));
        }
        if p.min_tokens > p.max_tokens {
            return Err(EngineError::invalid(
                "min_tokens",
                format!(
                    "`min_tokens` ({}) must not exceed `max_tokens` ({})",
                    p.min_tokens, p.max_tokens
                ),
            ));
        }
        if req.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::invalid(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings"),
            ));
        }
        if req
            .stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_STRING_LEN)
        {
            return Err(EngineError::invalid(
                "stop",
                format!("stop strings must be non-empty and at most {MAX_STOP_STRING_LEN} bytes"),
            ));
        }

        let prompt_tokens = self.tokenize(&req.prompt)?;
        if prompt_tokens.is_empty() {
            return Err(EngineError::invalid("prompt", "the prompt is empty"));
        }
        let mut req = req;
        if req.params.max_tokens == MAX_TOKENS_AUTO {
            let room = self
                .max_context_len
                .min(self.max_pool_tokens)
                .saturating_sub(prompt_tokens.len());
            req.params.max_tokens = room.max(1);
            req.params.min_tokens = req.params.min_tokens.min(req.params.max_tokens);
        }
        let p = &req.params;
        let total = prompt_tokens.len().saturating_add(p.max_tokens);
        if total > self.max_context_len {
            return Err(EngineError::ContextLength(format!(
                "this model's maximum context length is {} tokens, but the request has {} prompt tokens and asks for {} more ({total} in all); shorten the prompt or lower max_tokens",
                self.max_context_len,
                prompt_tokens.len(),
                p.max_tokens
            )));
        }
        if total > self.max_pool_tokens {
            return Err(EngineError::ContextLength(format!(
                "the KV cache holds {} tokens, but the request needs {} prompt tokens plus {} to generate ({total} in all); shorten the prompt or lower max_tokens",
                self.max_pool_tokens,
                prompt_tokens.len(),
                p.max_tokens
            )));
        }
        Ok(ValidRequest {
            prompt_tokens,
            params: req.params,
            stop: req.stop,
            skip_special_tokens: req.skip_special_tokens,
        })
    }

    fn check_token(&self, param: &'static str, token: u32) -> Result<(), EngineError> {
        if (token as usize) < self.vocab_size {
            Ok(())
        } else {
            Err(EngineError::invalid(
                param,
                format!(
                    "token id {token} is outside the vocabulary (size {})",
                    self.vocab_size
                ),
            ))
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Tokens(ids) => {
                for &t in ids {
                    self.check_token("prompt", t)?;
                }
                Ok(ids.clone())
            }
            Prompt::Text(text) => self
                .tokenizer
                .encode(text, true)
                .map_err(|e| EngineError::invalid("prompt", e.to_string())),
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::invalid(
                        "messages",
                        "`messages` must contain at least one message",
                    ));
                }
                let text = self
                    .tokenizer
                    .apply_chat_template(messages, true)
                    .map_err(|e| EngineError::invalid("messages", e.to_string()))?;
                self.tokenizer
                    .encode(&text, false)
                    .map_err(|e| EngineError::invalid("messages", e.to_string()))
            }
        }
    }
}
