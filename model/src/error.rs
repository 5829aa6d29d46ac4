//! Errors of the model crate, one enum with a stable category for each variant.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed {what}: {detail}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{path}: tensor {name}: {detail}")]
    Tensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("prompt has {prompt_tokens} tokens but the model's context is {context} tokens")]
    ContextOverflow { prompt_tokens: usize, context: usize },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    /// A short, stable name for metrics, events and HTTP error types.
    pub fn category(&self) -> &'static str {
        match self {
            ModelError::Io { .. } => "io",
            ModelError::Malformed { .. } => "malformed",
            ModelError::Unsupported(_) => "unsupported",
            ModelError::Tensor { .. } => "tensor",
            ModelError::Tokenizer(_) => "tokenizer",
            ModelError::Template(_) => "template",
            ModelError::InvalidRequest(_) => "invalid_request",
            ModelError::ContextOverflow { .. } => "context_overflow",
            ModelError::Torch(_) => "torch",
        }
    }

    /// True when the error comes from what the user asked for (a path, a file, a flag), not from the machine.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, ModelError::Torch(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, what: &'static str, detail: impl Into<String>) -> Self {
        ModelError::Malformed {
            path: path.into(),
            what,
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
