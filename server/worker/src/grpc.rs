//! The worker's gRPC service over a [`WorkerHandle`]: requests and events translated between the wire types and the
//! engine's, worker errors as gRPC statuses, and the serve loop. The HTTP side is [`crate::http`].

use std::net::SocketAddr;
use std::pin::Pin;

use camelid_contracts::{worker_auth, worker_limits as max};
use camelid_model::{ChatMessage, FinishReason, SamplingParams};
use camelid_proto::v1::worker_server::{Worker, WorkerServer};
use camelid_proto::v1::{self, generate_request, generate_response};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::engine::{Event, GenParams, Input};
use crate::error::WorkerError;
use crate::handle::WorkerHandle;

#[derive(Debug, Clone)]
pub struct WorkerService {
    handle: WorkerHandle,
}

impl WorkerService {
    pub fn new(handle: WorkerHandle) -> Self {
        Self { handle }
    }

    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
    }
}

/// The gRPC status for a worker error, with the OpenAI error code and field in metadata.
pub fn to_status(e: &WorkerError) -> Status {
    let message = e.to_string();
    let mut status = match e {
        WorkerError::NotReady
        | WorkerError::ShuttingDown
        | WorkerError::Draining
        | WorkerError::LoadFailed(_) => Status::unavailable(message),
        WorkerError::Overloaded { .. } => Status::resource_exhausted(message),
        WorkerError::InvalidRequest { .. } => Status::invalid_argument(message),
        WorkerError::Model(_) => Status::internal(message),
    };
    if let WorkerError::Draining = e {
        status.metadata_mut().insert(
            camelid_proto::ERROR_CODE_KEY,
            tonic::metadata::MetadataValue::from_static(camelid_proto::DRAINING_CODE),
        );
    }
    if let WorkerError::InvalidRequest { code, param, .. } = e {
        let meta = status.metadata_mut();
        meta.insert(
            camelid_proto::ERROR_CODE_KEY,
            tonic::metadata::MetadataValue::from_static(code),
        );
        if let Some(param) = param {
            meta.insert(
                camelid_proto::ERROR_PARAM_KEY,
                tonic::metadata::MetadataValue::from_static(param),
            );
        }
    }
    status
}

fn params(r: &v1::GenerateRequest) -> GenParams {
    let s = r.sampling.unwrap_or_default();
    GenParams {
        max_tokens: (r.max_tokens > 0).then_some(r.max_tokens as usize),
        sampling: SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            repetition_penalty: if s.repetition_penalty == 0.0 {
                1.0
            } else {
                s.repetition_penalty
            },
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        },
        stop: r.stop.clone(),
        ignore_eos: r.ignore_eos,
        cache_salt: r.cache_salt.clone(),
        adapter: (!r.adapter.is_empty()).then(|| r.adapter.clone()),
    }
}

fn event_message(event: Event) -> Result<v1::GenerateResponse, Status> {
    let event = match event {
        Event::Started { prompt } => generate_response::Event::Started(v1::Started {
            prompt_tokens: prompt.len() as u32,
            prompt_token_ids: prompt,
        }),
        Event::Chunk { text, token_ids } => generate_response::Event::Chunk(v1::Chunk {
            text,
            tokens: token_ids.len() as u32,
            token_ids,
        }),
        Event::Interrupted => generate_response::Event::Interrupted(v1::Interrupted {
            reason: v1::InterruptReason::Draining as i32,
        }),
        Event::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } => generate_response::Event::Finished(v1::Finished {
            reason: match reason {
                FinishReason::Length => v1::FinishReason::Length,
                _ => v1::FinishReason::Stop,
            } as i32,
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: completion_tokens as u32,
        }),
        Event::Failed(e) => return Err(to_status(&e)),
    };
    Ok(v1::GenerateResponse { event: Some(event) })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        check_limits(&r).map_err(|e| to_status(&e))?;
        let input = match (&r.continuation, &r.input) {
            (Some(c), _) => Input::Continue {
                prompt: c.prompt_token_ids.clone(),
                generated: c.generated_token_ids.clone(),
            },
            (None, Some(generate_request::Input::Chat(c))) => Input::Chat(
                c.messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect(),
            ),
            (None, Some(generate_request::Input::Prompt(p))) => Input::Prompt(p.clone()),
            (None, None) => {
                return Err(Status::invalid_argument(
                    "the request has neither chat nor prompt",
                ));
            }
        };
        let span = tracing::info_span!("generate", request_id = %r.request_id);
        let generation = tracing::Instrument::instrument(self.handle.generate(input, params(&r)), span)
            .await
            .map_err(|e| to_status(&e))?;
        let started = tokio_stream::once(event_message(Event::Started {
            prompt: generation.prompt,
        }));
        let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(generation.events).map(event_message);
        Ok(Response::new(Box::pin(started.chain(rest))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        let (running, waiting) = self.handle.load();
        Ok(Response::new(v1::HealthResponse {
            ready: self.handle.is_ready(),
            running: running as u32,
            waiting: waiting as u32,
        }))
    }

    async fn model_info(
        &self,
        _: Request<v1::ModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfoResponse>, Status> {
        let info = self.handle.info().map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::ModelInfoResponse {
            name: info.name,
            source: info.source,
            context_length: info.context_length as u32,
            template: info.template,
            dtype: info.dtype,
            device: info.device,
            max_batch: info.max_batch as u32,
            adapters: self
                .handle
                .adapters()
                .into_iter()
                .map(|a| v1::AdapterInfo {
                    name: a.name,
                    source: a.source,
                })
                .collect(),
        }))
    }

    async fn load_adapter(
        &self,
        request: Request<v1::LoadAdapterRequest>,
    ) -> Result<Response<v1::LoadAdapterResponse>, Status> {
        let r = request.into_inner();
        self.handle
            .load_adapter(&r.name, std::path::Path::new(&r.path))
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::LoadAdapterResponse {}))
    }

    async fn unload_adapter(
        &self,
        request: Request<v1::UnloadAdapterRequest>,
    ) -> Result<Response<v1::UnloadAdapterResponse>, Status> {
        let r = request.into_inner();
        self.handle
            .unload_adapter(&r.name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(v1::UnloadAdapterResponse {}))
    }
}

/// Refuses a request over [`camelid_contracts::worker_limits`] before any of it is tokenized: the worker's own
/// limits, whatever its caller checked.
pub fn check_limits(r: &v1::GenerateRequest) -> Result<(), WorkerError> {
    let over = |param: &'static str, what: String| WorkerError::invalid(what, Some(param));
    if r.request_id.len() > max::MAX_REQUEST_ID_BYTES {
        return Err(over(
            "request_id",
            format!(
                "the request id is longer than {} bytes",
                max::MAX_REQUEST_ID_BYTES
            ),
        ));
    }
    if r.stop.len() > max::MAX_STOP_SEQUENCES {
        return Err(over(
            "stop",
            format!(
                "at most {} stop sequences, got {}",
                max::MAX_STOP_SEQUENCES,
                r.stop.len()
            ),
        ));
    }
    if let Some(i) = r.stop.iter().position(|s| s.len() > max::MAX_STOP_BYTES) {
        return Err(over(
            "stop",
            format!("stop sequence {i} is longer than {} bytes", max::MAX_STOP_BYTES),
        ));
    }
    let (param, bytes) = match &r.input {
        Some(generate_request::Input::Chat(c)) => {
            if c.messages.len() > max::MAX_MESSAGES {
                return Err(over(
                    "messages",
                    format!("at most {} messages, got {}", max::MAX_MESSAGES, c.messages.len()),
                ));
            }
            if let Some(i) = c.messages.iter().position(|m| m.role.len() > max::MAX_ROLE_BYTES) {
                return Err(over(
                    "messages",
                    format!(
                        "the role of message {i} is longer than {} bytes",
                        max::MAX_ROLE_BYTES
                    ),
                ));
            }
            (
                "messages",
                c.messages.iter().map(|m| m.content.len()).sum::<usize>(),
            )
        }
        Some(generate_request::Input::Prompt(p)) => ("prompt", p.len()),
        None => ("prompt", 0),
    };
    if let Some(c) = &r.continuation {
        let ids = c.prompt_token_ids.len() + c.generated_token_ids.len();
        if ids > max::MAX_CONTINUATION_TOKENS {
            return Err(over(
                "continuation",
                format!(
                    "the continuation has {ids} token ids, more than this worker's {}",
                    max::MAX_CONTINUATION_TOKENS
                ),
            ));
        }
        if c.prompt_token_ids.is_empty() {
            return Err(over(
                "continuation",
                "the continuation has no prompt token ids".into(),
            ));
        }
    }
    if bytes > max::MAX_PROMPT_BYTES {
        return Err(over(
            param,
            format!(
                "the input has {bytes} bytes, more than this worker's {}",
                max::MAX_PROMPT_BYTES
            ),
        ));
    }
    Ok(())
}

/// Whether a gRPC call may reach the service: with a token configured, only calls that carry it (see
/// [`camelid_contracts::worker_auth`]); without one, any (a worker on loopback, or one told to run open).
#[derive(Clone)]
pub struct Authorize {
    token: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for Authorize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Authorize")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Authorize {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(Into::into),
        }
    }
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get(worker_auth::METADATA_KEY)
            .and_then(|v| v.to_str().ok());
        if worker_auth::is_authorized(presented, expected) {
            Ok(request)
        } else {
            tracing::warn!("refused a gRPC call without this worker's token");
            Err(Status::unauthenticated(
                "this worker serves only callers with its token",
            ))
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves, letting running streams finish; with `token`, only to
/// callers that present it.
pub async fn serve_grpc(
    handle: WorkerHandle,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let service = WorkerService::new(handle)
        .into_server()
        .max_decoding_message_size(max::MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            service,
            Authorize::new(token),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: usize, content: &str) -> v1::GenerateRequest {
        v1::GenerateRequest {
            input: Some(generate_request::Input::Chat(v1::Conversation {
                messages: (0..messages)
                    .map(|_| v1::ChatMessage {
                        role: "user".into(),
                        content: content.into(),
                    })
                    .collect(),
            })),
            ..Default::default()
        }
    }

    fn refused_param(r: &v1::GenerateRequest) -> Option<&'static str> {
        match check_limits(r) {
            Err(WorkerError::InvalidRequest { param, .. }) => param,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn requests_over_the_workers_own_limits_are_refused_naming_the_field() {
        assert!(check_limits(&chat(2, "hello")).is_ok());
        assert_eq!(refused_param(&chat(max::MAX_MESSAGES + 1, "")), Some("messages"));
        let big = "x".repeat(max::MAX_PROMPT_BYTES / 2 + 1);
        assert_eq!(refused_param(&chat(2, &big)), Some("messages"));
        let mut r = chat(1, "hi");
        r.stop = vec!["s".repeat(max::MAX_STOP_BYTES + 1)];
        assert_eq!(refused_param(&r), Some("stop"));
        r.stop = vec!["s".into(); max::MAX_STOP_SEQUENCES + 1];
        assert_eq!(refused_param(&r), Some("stop"));
        let mut r = chat(1, "hi");
        r.request_id = "i".repeat(max::MAX_REQUEST_ID_BYTES + 1);
        assert_eq!(refused_param(&r), Some("request_id"));
        let mut r = chat(1, "hi");
        if let Some(generate_request::Input::Chat(c)) = &mut r.input {
            c.messages[0].role = "r".repeat(max::MAX_ROLE_BYTES + 1);
        }
        assert_eq!(refused_param(&r), Some("messages"));
        let prompt = v1::GenerateRequest {
            input: Some(generate_request::Input::Prompt(
                "p".repeat(max::MAX_PROMPT_BYTES + 1),
            )),
            ..Default::default()
        };
        assert_eq!(refused_param(&prompt), Some("prompt"));
        // A continuation of more ids than any context, or with no prompt: refused before anything is decoded.
        let mut r = chat(1, "hi");
        r.continuation = Some(v1::Continuation {
            prompt_token_ids: vec![1; max::MAX_CONTINUATION_TOKENS],
            generated_token_ids: vec![2],
        });
        assert_eq!(refused_param(&r), Some("continuation"));
        r.continuation = Some(v1::Continuation::default());
        assert_eq!(refused_param(&r), Some("continuation"));
    }
}
