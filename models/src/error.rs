use std::path::PathBuf;

/// Errors of the models crate. `kind()` is a stable label for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Candle(_) => "tensor",
            Error::Io { .. } => "io",
            Error::Config(_) => "config",
            Error::Unsupported(_) => "unsupported",
            Error::MissingWeight(_) => "missing_weight",
            Error::Tokenizer(_) => "tokenizer",
            Error::ChatTemplate(_) => "chat_template",
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
