//! An OpenAI-compatible chat-completions client for the contestants and the judge: any server that speaks
//! `POST {base}/chat/completions` (our gateway, vLLM, OpenAI). Retries what a busy server asks to be retried (429,
//! 5xx, connection failures), after the server's `Retry-After` (or `retry-after-ms`) when it sends one and with
//! exponential backoff otherwise; a request the server refuses for good (400, 401, 404, ...) fails at once, naming
//! the endpoint and the server's message.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a model is served. Its `Debug` hides the key, so no log line carries it.
#[derive(Clone, PartialEq)]
pub struct Endpoint {
    /// The base URL, ending in `/v1` (a trailing `/` is ignored).
    pub base_url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How hard to try.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries per request, the first included.
    pub max_attempts: u32,
    /// The first backoff; doubled after each failure up to `max_delay`.
    pub base_delay: Duration,
    /// The longest wait between tries, also the cap on a server's `Retry-After`.
    pub max_delay: Duration,
    /// The longest one request may take.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// The sampling of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub max_tokens: u32,
    /// Sent as OpenAI's `seed`, so a sampled answer can be asked again and come out the same where the server
    /// honours it.
    pub seed: Option<u64>,
}

/// Why a request gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} sent a response that is not a chat completion: {detail}")]
    BadResponse { url: String, detail: String },
    #[error("gave up after {attempts} tries; the last: {last}")]
    Exhausted { attempts: u32, last: Box<ClientError> },
}

impl ClientError {
    /// A stable category, for logs and reports.
    pub fn category(&self) -> &'static str {
        match self {
            ClientError::Build(_) => "client",
            ClientError::Transport { .. } => "transport",
            ClientError::Status { .. } => "status",
            ClientError::BadResponse { .. } => "bad_response",
            ClientError::Exhausted { .. } => "exhausted",
        }
    }

    /// Whether trying again may help: the connection failed, or the server said it is busy or broken.
    fn retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            _ => false,
        }
    }
}

/// A client for one endpoint.
#[derive(Debug, Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    retry: RetryPolicy,
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: &'a [Message],
    temperature: f32,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    stream: bool,
}

#[derive(Deserialize)]
struct Response {
    choices: Vec<ResponseChoice>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    message: ResponseMessage,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

impl ChatClient {
    pub fn new(endpoint: Endpoint, retry: RetryPolicy) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(retry.request_timeout)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            endpoint,
            retry,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The assistant's reply to `messages`, retried as the policy allows.
    pub async fn complete(&self, messages: &[Message], sampling: Sampling) -> Result<String, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (error, retry_after) = match self.once(messages, sampling).await {
                Ok(text) => return Ok(text),
                Err(failure) => failure,
            };
            if !error.retryable() {
                return Err(error);
            }
            if attempt >= self.retry.max_attempts {
                return Err(ClientError::Exhausted {
                    attempts: attempt,
                    last: Box::new(error),
                });
            }
            let delay = retry_after
                .unwrap_or_else(|| backoff(&self.retry, attempt))
                .min(self.retry.max_delay);
            tracing::warn!(url = %self.url(), attempt, delay_ms = delay.as_millis() as u64, error = %error, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.endpoint.base_url.trim_end_matches('/')
        )
    }

    /// One try: the reply, or the error and how long the server asked us to wait.
    async fn once(
        &self,
        messages: &[Message],
        sampling: Sampling,
    ) -> Result<String, (ClientError, Option<Duration>)> {
        let url = self.url();
        let body = Request {
            model: &self.endpoint.model,
            messages,
            temperature: sampling.temperature,
            max_tokens: sampling.max_tokens,
            seed: sampling.seed,
            stream: false,
        };
        let mut request = self.http.post(&url).json(&body);
        if let Some(key) = &self.endpoint.api_key {
            request = request.bearer_auth(key);
        }
        let transport = |source| {
            (
                ClientError::Transport {
                    url: url.clone(),
                    source,
                },
                None,
            )
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = match read_capped(response).await {
            Ok(text) => text,
            Err(ReadError::Transport(e)) => return Err(transport(e)),
            Err(ReadError::TooLarge) => {
                let detail = format!("a body over {MAX_RESPONSE_BYTES} bytes");
                return Err((ClientError::BadResponse { url, detail }, None));
            }
        };
        if !status.is_success() {
            let message = error_message(&text);
            return Err((
                ClientError::Status {
                    url,
                    status: status.as_u16(),
                    message,
                },
                retry_after,
            ));
        }
        let parsed: Response = serde_json::from_str(&text).map_err(|e| {
            (
                ClientError::BadResponse {
                    url: url.clone(),
                    detail: e.to_string(),
                },
                None,
            )
        })?;
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err((
                ClientError::BadResponse {
                    url,
                    detail: "no choices".into(),
                },
                None,
            ));
        };
        Ok(choice.message.content.unwrap_or_default())
    }
}

/// The largest response body read: a chat completion of any sane `max_tokens` is far smaller, and a server that
/// streams without end must not fill memory.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

/// The body as text, refused past [`MAX_RESPONSE_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<String, ReadError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `base · 2^(attempt-1)`, capped.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    policy.base_delay.saturating_mul(factor).min(policy.max_delay)
}

/// The wait a server asked for: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds. An HTTP-date
/// `Retry-After` is not parsed; the backoff applies then.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    // Clamped before the conversion: a server's `retry-after-ms: 1e30` must not overflow a Duration.
    if let Some(ms) = value("retry-after-ms").filter(|v| v.is_finite() && *v >= 0.0) {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    value("retry-after")
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
}

/// The server's own words: OpenAI's `error.message` when the body has one, else the body's start.
fn error_message(body: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    match parsed.as_ref().and_then(|v| v["error"]["message"].as_str()) {
        Some(m) => m.to_string(),
        None => body.chars().take(300).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(backoff(&p, 1), Duration::from_millis(100));
        assert_eq!(backoff(&p, 3), Duration::from_millis(400));
        assert_eq!(backoff(&p, 30), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_prefers_milliseconds_and_ignores_dates_and_junk() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "250".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut d = reqwest::header::HeaderMap::new();
        d.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(retry_after(&d), None);
        let mut huge = reqwest::header::HeaderMap::new();
        huge.insert(
            "retry-after-ms",
            "1e30".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(
            retry_after(&huge),
            Some(Duration::from_secs(86_400)),
            "clamped, no overflow panic"
        );
        d.insert("retry-after", "-5".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(retry_after(&d), None);
    }

    #[test]
    fn only_busy_or_broken_servers_are_retried() {
        let status = |s| ClientError::Status {
            url: "u".into(),
            status: s,
            message: String::new(),
        };
        assert!(status(429).retryable());
        assert!(status(503).retryable());
        assert!(!status(400).retryable());
        assert!(!status(401).retryable());
        assert!(!status(404).retryable());
    }
}
