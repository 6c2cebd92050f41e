//! The edge of the engine: a request's token events become text, with incremental
//! detokenization and stop strings held back across token boundaries.
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::detokenizer::IncrementalDetokenizer;
use crate::handle::{EngineEvent, EngineHandle};
use crate::request::{FinishReason, RequestId};
use crate::stop::StopMatcher;
use crate::EngineError;

/// One generated token with its log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What one engine event adds to the answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamOutput {
    /// Newly final text (may be empty while text is held back).
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub finish_reason: Option<FinishReason>,
}

/// A request in flight. Dropping it aborts the request.
pub struct RequestStream {
    id: RequestId,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    handle: EngineHandle,
    detokenizer: IncrementalDetokenizer,
    stop: StopMatcher,
    finished: bool,
    num_prompt_tokens: usize,
    num_generated_tokens: usize,
    _permit: OwnedSemaphorePermit,
}

impl RequestStream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: RequestId,
        events: mpsc::UnboundedReceiver<EngineEvent>,
        handle: EngineHandle,
        permit: OwnedSemaphorePermit,
        prompt_tail: &[u32],
        num_prompt_tokens: usize,
        stop: Vec<String>,
        skip_special_tokens: bool,
    ) -> Self {
        let tokenizer = Arc::clone(&handle.tokenizer().tokenizer);
        Self {
            id,
            events,
            detokenizer: IncrementalDetokenizer::new(tokenizer, prompt_tail, skip_special_tokens),
            handle,
            stop: StopMatcher::new(stop),
            finished: false,
            num_prompt_tokens,
            num_generated_tokens: 0,
            _permit: permit,
        }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }

    pub fn num_generated_tokens(&self) -> usize {
        self.num_generated_tokens
    }

    /// The next piece of the answer; `None` after the one carrying `finish_reason`.
    pub async fn next(&mut self) -> Option<Result<StreamOutput, EngineError>> {
        if self.finished {
            return None;
        }
        let event = self.events.recv().await;
        Some(self.on_event(event))
    }

    fn on_event(&mut self, event: Option<EngineEvent>) -> Result<StreamOutput, EngineError> {
        let (token, mut finish) = match event {
            Some(EngineEvent::Token(token, finish)) => (token, finish),
            Some(EngineEvent::Error(message)) => {
                self.finished = true;
                return Err(EngineError::Generation(message));
            }
            Some(EngineEvent::Aborted) | None => {
                self.finished = true;
                return Ok(StreamOutput {
                    finish_reason: Some(FinishReason::Abort),
                    ..Default::default()
                });
            }
        };
        self.num_generated_tokens += 1;
        let mut piece = self
            .detokenizer
            .push(token.token)
            .map_err(|e| EngineError::Generation(e.to_string()))?;
        if finish.is_some() {
            piece.push_str(
                &self
                    .detokenizer
                    .flush()
                    .map_err(|e| EngineError::Generation(e.to_string()))?,
            );
        }
        let outcome = self.stop.push(&piece);
        let mut text = outcome.text;
        if outcome.stopped {
            if finish.is_none() {
                self.handle.abort(self.id);
            }
            finish = Some(FinishReason::Stop);
        } else if finish.is_some() {
            text.push_str(&self.stop.flush());
        }
        self.finished = finish.is_some();
        let info = TokenInfo {
            id: token.token,
            logprob: token.logprob,
            top_logprobs: token.top_logprobs,
        };
        Ok(StreamOutput {
            text,
            tokens: vec![info],
            finish_reason: finish,
        })
    }

    /// Runs the request to the end and returns the whole answer.
    pub async fn collect(mut self) -> Result<StreamOutput, EngineError> {
        let mut all = StreamOutput::default();
        while let Some(piece) = self.next().await {
            let piece = piece?;
            all.text.push_str(&piece.text);
            all.tokens.extend(piece.tokens);
            all.finish_reason = piece.finish_reason;
        }
        Ok(all)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            self.handle.abort(self.id);
        }
    }
}
