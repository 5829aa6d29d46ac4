//! The worker's errors, each with a stable category (metrics, logs) and a gRPC status.

use camelid_model::ModelError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker is still loading its model")]
    NotReady,
    #[error("the worker could not load its model: {0}")]
    LoadFailed(String),
    #[error("the worker is shutting down")]
    ShuttingDown,
    /// Shutting down gracefully: it finishes what it runs and admits nothing more.
    #[error("the worker is draining (shutting down); send the request to another worker")]
    Draining,
    #[error("the worker is overloaded ({capacity} requests running or queued); retry later")]
    Overloaded { capacity: usize },
    /// The request cannot be served as asked; `code` is the OpenAI error code, `param` the request field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        code: &'static str,
        param: Option<&'static str>,
    },
    #[error("the model failed: {0}")]
    Model(String),
}

impl WorkerError {
    /// A label value for metrics and logs; a fixed set.
    pub fn category(&self) -> &'static str {
        match self {
            WorkerError::NotReady => "not_ready",
            WorkerError::LoadFailed(_) => "load_failed",
            WorkerError::ShuttingDown => "shutting_down",
            WorkerError::Draining => "draining",
            WorkerError::Overloaded { .. } => "overloaded",
            WorkerError::InvalidRequest { .. } => "invalid_request",
            WorkerError::Model(_) => "model",
        }
    }

    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        WorkerError::InvalidRequest {
            message: message.into(),
            code: "invalid_value",
            param,
        }
    }

    /// Maps a model error from handling one request; `prompt_field` names where the prompt came from.
    pub(crate) fn from_model(e: ModelError, prompt_field: &'static str) -> Self {
        match e {
            ModelError::ContextOverflow {
                prompt_tokens,
                context,
            } => WorkerError::InvalidRequest {
                message: format!(
                    "this model's maximum context length is {context} tokens, but the prompt has \
                     {prompt_tokens} tokens"
                ),
                code: "context_length_exceeded",
                param: Some(prompt_field),
            },
            ModelError::InvalidRequest(message) | ModelError::Template(message) => {
                WorkerError::invalid(message, Some(prompt_field))
            }
            other => WorkerError::Model(other.to_string()),
        }
    }
}
