/// Errors of the adapters crate. `kind()` is a stable label; the server maps kinds to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// No adapter of that name is loaded.
    #[error("the model `{0}` does not exist")]
    NotFound(String),
    /// The adapter files are missing, unreadable or do not fit the base model.
    #[error("invalid LoRA adapter: {0}")]
    Invalid(String),
    /// A path outside the allowed directory, or runtime loading is off.
    #[error("{0}")]
    PathNotAllowed(String),
    /// Count, rank or memory limit.
    #[error("{0}")]
    Limit(String),
    #[error("LoRA slot error: {0}")]
    Model(#[from] pagoda_models::Error),
}

impl AdapterError {
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterError::NotFound(_) => "adapter_not_found",
            AdapterError::Invalid(_) => "invalid_adapter",
            AdapterError::PathNotAllowed(_) => "adapter_path_not_allowed",
            AdapterError::Limit(_) => "adapter_limit",
            AdapterError::Model(_) => "model",
        }
    }
}

impl From<candle_core::Error> for AdapterError {
    fn from(e: candle_core::Error) -> Self {
        AdapterError::Model(pagoda_models::Error::from(e))
    }
}
