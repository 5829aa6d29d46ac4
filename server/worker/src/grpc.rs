//! The worker's gRPC service over a [`WorkerHandle`]: requests and events translated between the wire types and the
//! engine's, worker errors as gRPC statuses, and the serve loop. The HTTP side is [`crate::http`].

use std::net::SocketAddr;
use std::pin::Pin;

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
        WorkerError::NotReady | WorkerError::ShuttingDown | WorkerError::LoadFailed(_) => {
            Status::unavailable(message)
        }
        WorkerError::Overloaded { .. } => Status::resource_exhausted(message),
        WorkerError::InvalidRequest { .. } => Status::invalid_argument(message),
        WorkerError::Model(_) => Status::internal(message),
    };
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
    }
}

fn event_message(event: Event) -> Result<v1::GenerateResponse, Status> {
    let event = match event {
        Event::Started { prompt_tokens } => generate_response::Event::Started(v1::Started {
            prompt_tokens: prompt_tokens as u32,
        }),
        Event::Chunk { text, tokens } => generate_response::Event::Chunk(v1::Chunk {
            text,
            tokens: tokens as u32,
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
        let input = match &r.input {
            Some(generate_request::Input::Chat(c)) => Input::Chat(
                c.messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect(),
            ),
            Some(generate_request::Input::Prompt(p)) => Input::Prompt(p.clone()),
            None => {
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
            prompt_tokens: generation.prompt_tokens,
        }));
        let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(generation.events).map(event_message);
        Ok(Response::new(Box::pin(started.chain(rest))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        let (running, waiting) = self.handle.load();
        Ok(Response::new(v1::HealthResponse {
            ready: self.handle.info().is_ok(),
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
        }))
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves, letting running streams finish.
pub async fn serve_grpc(
    handle: WorkerHandle,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(WorkerService::new(handle).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}
