/// Errors of the engine crate. `kind()` is a stable label; the server maps kinds to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid; the message says which parameter and why.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// Prompt plus requested tokens exceed what the model or the KV pool can hold.
    #[error("{0}")]
    ContextLength(String),
    /// Too many requests waiting.
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    /// The engine thread is gone (shutdown or crash).
    #[error("the engine is not running")]
    Unavailable,
    #[error("model error: {0}")]
    Model(#[from] pagoda_models::Error),
    /// A step or the detokenizer failed; the request is gone.
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error(transparent)]
    Adapter(Box<pagoda_adapters::AdapterError>),
}

impl EngineError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidRequest { .. } => "invalid_request",
            EngineError::ContextLength(_) => "context_length_exceeded",
            EngineError::QueueFull(_) => "queue_full",
            EngineError::Unavailable => "unavailable",
            EngineError::Model(_) => "model",
            EngineError::Generation(_) => "generation",
            EngineError::Config(_) => "config",
            EngineError::Adapter(e) => e.kind(),
        }
    }

    pub fn param(&self) -> Option<&'static str> {
        match self {
            EngineError::InvalidRequest { param, .. } => *param,
            EngineError::ContextLength(_) => Some("messages"),
            _ => None,
        }
    }
}

impl From<pagoda_adapters::AdapterError> for EngineError {
    fn from(e: pagoda_adapters::AdapterError) -> Self {
        EngineError::Adapter(Box::new(e))
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(pagoda_models::Error::from(e))
    }
}
