//! The gateway's one error type and the one place errors become responses (OpenAI's error shape), with the
//! `Retry-After` seconds they carry. The lowest layer of the gateway: it depends only on the wire types.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openai::{ErrorBody, ErrorDetail};

/// An error a client sees: status, OpenAI `type`, `code`, the request field it is about, and the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds for `Retry-After` (overload, no ready worker, rate limits).
    pub retry_after: Option<u32>,
    /// The flagged moderation categories of a `content_filter` error.
    pub categories: Option<Box<[String]>>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: Some(code.to_string()),
            param: None,
            message: message.into(),
            retry_after: None,
            categories: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into()).filter(|p: &String| !p.is_empty());
        self
    }

    /// A value that is well-formed but not acceptable (400).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message,
        )
        .with_param(param)
    }

    /// A feature we do not serve (400).
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "unsupported_parameter",
            message,
        )
        .with_param(param)
    }

    /// The body is not JSON at all (400).
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            message,
        )
    }

    /// JSON of the wrong shape: a missing field or a wrong type (422).
    pub fn wrong_shape(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "invalid_type",
            message,
        )
        .with_param(param)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than this gateway's limit of {limit} bytes"),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{model}` does not exist; GET /v1/models lists the served models"),
        )
        .with_param("model")
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("no route {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed on this route",
        )
    }

    pub fn overloaded(model: &str) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                "overloaded",
                format!("every worker of `{model}` is at capacity; retry shortly"),
            )
        }
    }

    pub fn no_ready_worker(model: &str) -> Self {
        Self {
            retry_after: Some(2),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "no_ready_worker",
                format!("no worker of `{model}` is ready"),
            )
        }
    }

    /// A held request whose model had no ready worker within the hold time.
    pub fn model_starting(model: &str, waited: std::time::Duration) -> Self {
        Self {
            retry_after: Some(10),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "model_starting",
                format!(
                    "no worker of `{model}` became ready within {}s (it may be scaling up from zero): retry later",
                    waited.as_secs()
                ),
            )
        }
    }

    /// Too many requests are already held for models without a ready worker.
    pub fn too_many_waiting(model: &str) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "too_many_waiting",
                format!(
                    "no worker of `{model}` is ready and the gateway holds as many waiting requests as it may"
                ),
            )
        }
    }

    pub fn worker_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", "worker_failed", message)
    }

    /// A flagged input (400 `content_filter`): never forwarded to a model.
    pub fn content_filter(categories: Vec<String>, param: String) -> Self {
        let message = format!(
            "the request was rejected by content moderation (flagged: {})",
            categories.join(", ")
        );
        Self {
            categories: Some(categories.into_boxed_slice()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "content_filter",
                message,
            )
        }
        .with_param(param)
    }

    /// A moderation provider could not answer and fails closed (503).
    pub fn moderation_unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "moderation_unavailable",
                format!("{}; the request was not forwarded", message.into()),
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn model_not_allowed(model: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "model_not_allowed",
            format!("this API key may not use the model `{model}`"),
        )
        .with_param("model")
    }

    pub fn rate_limited(what: &str, wait: std::time::Duration) -> Self {
        let secs = retry_after_secs(wait);
        Self {
            retry_after: Some(secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!("this API key's {what} limit is used up; retry in {secs} s"),
            )
        }
    }

    /// A stable label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match (self.status.as_u16(), self.code.as_deref()) {
            (400, Some("content_filter")) => "content_filter",
            (400 | 422, _) => "invalid_request",
            (401, _) => "unauthorized",
            (403, _) => "forbidden",
            (404, _) => "not_found",
            (413, _) => "too_large",
            (429, Some("rate_limit_exceeded")) => "rate_limited",
            (429, _) => "overloaded",
            (503, Some("moderation_unavailable")) => "moderation_unavailable",
            (503, _) => "unavailable",
            _ => "server_error",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.clone(),
                categories: self.categories.as_deref().map(<[String]>::to_vec),
            },
        }
    }
}

/// Seconds for `Retry-After`: at least one.
pub fn retry_after_secs(wait: std::time::Duration) -> u32 {
    let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
