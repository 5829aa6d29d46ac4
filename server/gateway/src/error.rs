//! The gateway's one error type and the one place errors become responses (OpenAI's error shape), with the
//! `Retry-After` seconds they carry. The lowest layer of the gateway: it depends only on the wire types.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::openai::{ErrorBody, ErrorDetail};

/// Whose share of the requests held for models without a ready worker is used up: one 503 code serves both,
/// and only its message tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldFull {
    /// The gateway's, over all models and keys.
    Gateway,
    /// The calling API key's.
    Key,
}

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

    /// A POST whose body is not declared JSON (415): what makes a cross-site form POST impossible.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "the body must be JSON: send `Content-Type: application/json`",
        )
    }

    /// A request refused for its `Host` or `Origin` header (403); `header` is named in `param`.
    pub fn forbidden_origin(header: &str, message: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "forbidden_origin",
            format!("`{header}`: {message}"),
        )
        .with_param(header)
    }

    /// The body did not arrive within the body timeout (408).
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive within the gateway's body timeout",
        )
    }

    /// A bare model name that ChatModels of several namespaces have (400): it must be qualified.
    pub fn model_ambiguous(model: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model_ambiguous",
            format!(
                "several namespaces serve a model named `{model}`: name it as `NAMESPACE/{model}` (GET /v1/models \
                 lists the ids your key may use)"
            ),
        )
        .with_param("model")
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

    /// Too many requests are already held for models without a ready worker (503): `full` says whose share is
    /// used up, and the message tells the client.
    pub fn too_many_waiting(model: &str, full: HoldFull) -> Self {
        let who = match full {
            HoldFull::Gateway => "the gateway holds as many waiting requests as it may",
            HoldFull::Key => "this API key already has as many requests waiting as one key may",
        };
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "too_many_waiting",
                format!("no worker of `{model}` is ready and {who}"),
            )
        }
    }

    /// A worker failed (502). `detail` (which may name the worker's address or carry its internal error) is
    /// logged, never shown: the client learns only that the model failed.
    pub fn worker_failed(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::warn!(detail = %detail, "worker failed; the client sees a generic error");
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "worker_failed",
            "the model's worker failed; retry the request",
        )
    }

    /// A LoRA adapter its workers refuse to load (502 `adapter_unavailable`): the files are at fault, so no retry
    /// helps. The worker's reason (which names paths) goes to the log, not to the client.
    pub fn adapter_unavailable(adapter: &str, detail: &str) -> Self {
        tracing::warn!(adapter, detail, "a LoRA adapter could not be loaded");
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "adapter_unavailable",
            format!(
                "the adapter `{adapter}` cannot be loaded by this model's workers; ask the model's operator"
            ),
        )
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
            (403, Some("forbidden_origin")) => "forbidden_origin",
            (403, _) => "forbidden",
            (404, _) => "not_found",
            (408, _) => "timeout",
            (413, _) => "too_large",
            (415, _) => "invalid_request",
            (429, Some("rate_limit_exceeded")) => "rate_limited",
            (429, _) => "overloaded",
            (503, Some("moderation_unavailable")) => "moderation_unavailable",
            (503, _) => "unavailable",
            _ => "server_error",
        }
    }

    /// The body the client gets. A server-side error's message may quote what failed inside (a provider's URL,
    /// a worker's address): those are logged where they happen, and withheld here.
    pub fn body(&self) -> ErrorBody {
        let message = if self.status.is_server_error() {
            withhold_addresses(&self.message)
        } else {
            self.message.clone()
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.clone(),
                categories: self.categories.as_deref().map(<[String]>::to_vec),
            },
        }
    }
}

/// `text` with URLs and IP addresses (with their ports) replaced by `[internal address]`.
pub fn withhold_addresses(text: &str) -> String {
    static ADDRESS: std::sync::LazyLock<Option<regex::Regex>> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)\b[a-z][a-z0-9+.-]*://[^\s,;)]+|\[[0-9a-f:.]+\](:\d+)?|\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b",
        )
        .ok()
    });
    match &*ADDRESS {
        Some(re) => re.replace_all(text, "[internal address]").into_owned(),
        None => text.to_string(),
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

    /// The attack: make a worker fail (a transport error carries its address, a panic its message) and read the
    /// error for the cluster's internal addresses.
    #[test]
    fn worker_failures_never_show_internal_addresses() {
        let e = ApiError::worker_failed(
            "transport error: connection refused (http://10.1.2.3:50051/camelid.worker.v1.Worker/Generate)",
        );
        let body = serde_json::to_string(&e.body()).unwrap();
        assert!(!body.contains("10.1.2.3") && !body.contains("http://"), "{body}");
        assert_eq!(e.status.as_u16(), 502);
        let e = ApiError::moderation_unavailable(
            "moderation provider `remote` is unavailable: cannot reach http://guard.internal:8080/v1/moderations: \
             connection refused (10.0.0.7:8080, [fd00::1]:443)",
        );
        let message = e.body().error.message;
        assert!(message.contains("`remote` is unavailable"), "{message}");
        for secret in ["guard.internal", "10.0.0.7", "fd00::1", "8080"] {
            assert!(!message.contains(secret), "{secret} in {message}");
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
