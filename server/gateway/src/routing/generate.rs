//! The gRPC generate call: turning a [`Validated`] request into the worker's `GenerateRequest`, sending it to the
//! worker its prefix maps to and waiting until one accepts it (skipping workers that are down or overloaded while
//! nothing has been sent), and mapping the worker's statuses back to [`ApiError`]s. What follows `Started` is
//! [`super::generation`]'s.

use camelid_proto::v1::{self, generate_response};
use tonic::{Code, Status};

use std::sync::Arc;

use super::generation::{Generation, Next};
use super::router::{InFlight, Router};
use crate::error::ApiError;
use crate::validate::{Input, Validated};

/// A stream a worker has accepted (tokenized and queued), with its `Started`.
#[derive(Debug)]
pub(super) struct Opened {
    pub started: v1::Started,
    pub stream: tonic::Streaming<v1::GenerateResponse>,
    pub in_flight: InFlight,
}

/// Whether a status means the worker itself is gone or broken (eject it and try another).
pub fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

impl Router {
    /// Sends `request` to a worker of its model and waits until one accepts it. A worker that is down or
    /// overloaded is skipped for another; `tried` collects the workers used (so a caller can retry elsewhere).
    /// The [`Generation`] then goes on on another worker should this one drain or die.
    pub async fn start_generation(
        self: &Arc<Self>,
        request: &Validated,
        request_id: &str,
        tried: &mut Vec<String>,
    ) -> Result<Generation, ApiError> {
        // Clients' requests are resolved at admission. A guard model is named exactly in the config: a bare name is
        // not resolved, or another namespace's ChatModel of that name could make it ambiguous (switching the guard
        // off under `fail_open`) or, once the real guard is gone, write the verdicts itself.
        let model = request.model.clone();
        if !self.knows(&model) {
            return Err(ApiError::model_not_found(&request.model));
        }
        let message = to_proto(request, request_id);
        let key = super::affinity::prefix_key(request);
        let opened = self.open(&model, &message, key, tried).await?;
        Ok(Generation::new(self.clone(), model, key, message, opened))
    }

    /// Sends `message` to a healthy worker of `model` (the one `key` maps to first), skipping `tried` and any that
    /// is down or overloaded, until one answers `Started`.
    pub(super) async fn open(
        &self,
        model: &str,
        message: &v1::GenerateRequest,
        key: u64,
        tried: &mut Vec<String>,
    ) -> Result<Opened, ApiError> {
        let mut overloaded = false;
        // Adapters found evicted on a worker (each may be loaded there again, a bounded number of times).
        let mut reloads = 0;
        loop {
            let Some(backend) = self.pick(model, &message.adapter, tried, key) else {
                return Err(if overloaded {
                    ApiError::overloaded(model)
                } else {
                    ApiError::no_ready_worker(model)
                });
            };
            tried.push(backend.addr.clone());
            if !self.ensure_adapter(&backend, model, &message.adapter).await? {
                continue;
            }
            let in_flight = InFlight::new(backend.clone());
            let mut client = backend.client.clone();
            let first = match client.generate(message.clone()).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    stream.message().await.map(|m| (m, stream))
                }
                Err(status) => Err(status),
            };
            match first {
                Ok((
                    Some(v1::GenerateResponse {
                        event: Some(generate_response::Event::Started(started)),
                    }),
                    stream,
                )) => {
                    return Ok(Opened {
                        started,
                        stream,
                        in_flight,
                    });
                }
                Ok(_) => {
                    return Err(ApiError::worker_failed(
                        "the worker's stream did not start with `Started`",
                    ));
                }
                Err(status) => match status.code() {
                    // The worker evicted the adapter since it last said it held it: load it again or go elsewhere.
                    Code::InvalidArgument if !message.adapter.is_empty() && is_model_not_found(&status) => {
                        backend.note_adapter(&message.adapter, false);
                        reloads += 1;
                        if reloads <= 2 {
                            tried.pop();
                        }
                    }
                    Code::InvalidArgument => return Err(invalid_from_status(&status)),
                    Code::ResourceExhausted => overloaded = true,
                    _ if is_transport_failure(&status) => {
                        backend.set_healthy(false, &self.metrics, status.message());
                    }
                    _ => return Err(ApiError::worker_failed(status.message().to_string())),
                },
            }
        }
    }

    /// Runs `request` to the end and returns its text (for the guard-model provider), with the same worker
    /// choice, retries and continuation as clients get.
    pub async fn complete_text(self: &Arc<Self>, request: &Validated) -> Result<String, ApiError> {
        let id = format!("guard-{}", uuid::Uuid::new_v4().simple());
        let mut tried = Vec::new();
        let mut generation = self.start_generation(request, &id, &mut tried).await?;
        let mut text = String::new();
        loop {
            match generation.next().await? {
                Next::Text { text: t, .. } => text.push_str(&t),
                Next::Finished(_) => return Ok(text),
            }
        }
    }
}

fn is_model_not_found(status: &Status) -> bool {
    status
        .metadata()
        .get(camelid_proto::ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
        == Some("model_not_found")
}

fn invalid_from_status(status: &Status) -> ApiError {
    let meta = |key| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut e = ApiError::invalid(
        &meta(camelid_proto::ERROR_PARAM_KEY).unwrap_or_default(),
        status.message(),
    );
    if let Some(code) = meta(camelid_proto::ERROR_CODE_KEY) {
        e.code = Some(code);
    }
    e
}

fn to_proto(v: &Validated, request_id: &str) -> v1::GenerateRequest {
    let p = &v.params;
    let input = match &v.input {
        Input::Chat(messages) => v1::generate_request::Input::Chat(v1::Conversation {
            messages: messages
                .iter()
                .map(|(role, content)| v1::ChatMessage {
                    role: role.clone(),
                    content: content.clone(),
                })
                .collect(),
        }),
        Input::Prompt(prompt) => v1::generate_request::Input::Prompt(prompt.clone()),
    };
    v1::GenerateRequest {
        request_id: request_id.to_string(),
        input: Some(input),
        max_tokens: p.max_tokens.unwrap_or(0),
        sampling: Some(v1::Sampling {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            // A sampled request without a seed gets one here, so that a continuation on another worker draws
            // what the first would have.
            seed: p.seed.or_else(|| (p.temperature > 0.0).then(rand::random::<u64>)),
        }),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        cache_salt: v.cache_salt.clone(),
        continuation: None,
        adapter: v.adapter.clone(),
    }
}
