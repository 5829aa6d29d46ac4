//! The HTTP surface and the request pipeline: read → parse → validate → guardrails → route → respond (a JSON
//! body, or SSE chunks ending with `data: [DONE]`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use camelid_proto::v1::{self, generate_response};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::guardrails::Guardrails;
use crate::metrics::{Metrics, ModelLabels, RequestLabels, RouteLabels};
use crate::openai::{self, Delta, Usage};
use crate::routing::{Router, Started, is_transport_failure};
use crate::validate::{self, Api, Limits, Validated};

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub guardrails: Guardrails,
    pub limits: Limits,
    pub created: u64,
}

/// Times a whole request and records it once, under a bounded model label.
struct RequestRecord {
    metrics: Arc<Metrics>,
    model: String,
    route: &'static str,
    received: Instant,
}

impl RequestRecord {
    fn finish(&self, status: StatusCode) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                model: self.model.clone(),
                route: self.route,
                status: status.as_u16(),
            })
            .inc();
        self.metrics
            .latency
            .get_or_create(&RouteLabels {
                model: self.model.clone(),
                route: self.route,
            })
            .observe(self.received.elapsed().as_secs_f64());
    }
}

/// Counts a request in flight for its model while it lives.
struct InFlightGauge(Arc<Metrics>, String);

impl InFlightGauge {
    fn new(metrics: &Arc<Metrics>, model: &str) -> Self {
        metrics
            .in_flight
            .get_or_create(&ModelLabels { model: model.into() })
            .inc();
        Self(metrics.clone(), model.into())
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0
            .in_flight
            .get_or_create(&ModelLabels {
                model: self.1.clone(),
            })
            .dec();
    }
}

pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// Seconds since the Unix epoch, for the `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if e.to_string().contains("length limit") {
            ApiError::too_large(limit)
        } else {
            ApiError::malformed_json(format!("could not read the body: {e}"))
        }
    })
}

async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    handle(state, Api::Chat, body, validate::parse_chat, validate::chat).await
}

async fn completions(State(state): State<AppState>, body: Body) -> Response {
    handle(
        state,
        Api::Completions,
        body,
        validate::parse_completion,
        validate::completion,
    )
    .await
}

async fn handle<T: DeserializeOwned>(
    state: AppState,
    api: Api,
    body: Body,
    parse: fn(&[u8]) -> Result<T, ApiError>,
    validate: fn(T, &Limits) -> Result<Validated, ApiError>,
) -> Response {
    let mut record = RequestRecord {
        metrics: state.metrics.clone(),
        model: "unknown".into(),
        route: api.route(),
        received: Instant::now(),
    };
    let validated = async {
        let bytes = read_body(body, state.limits.max_body_bytes).await?;
        validate(parse(&bytes)?, &state.limits)
    }
    .await;
    let result = match validated {
        Ok(request) => {
            if state.router.knows(&request.model) {
                record.model = request.model.clone();
            }
            pipeline(&state, request, record).await
        }
        Err(e) => Err((e, record)),
    };
    match result {
        Ok(response) => response,
        Err((e, record)) => {
            tracing::debug!(category = e.category(), status = e.status.as_u16(), error = %e, "request refused");
            record.finish(e.status);
            e.into_response()
        }
    }
}

/// Guardrails, routing and the response. Streams record their metrics when they end.
async fn pipeline(
    state: &AppState,
    request: Validated,
    record: RequestRecord,
) -> Result<Response, (ApiError, RequestRecord)> {
    if let Err(e) = state.guardrails.check(&request).await {
        return Err((e, record));
    }
    let prefix = if request.api == Api::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let gauge = InFlightGauge::new(&state.metrics, &record.model);
    let mut tried = Vec::new();
    if request.stream {
        let started = match state.router.start_generation(&request, &id, &mut tried).await {
            Ok(started) => started,
            Err(e) => return Err((e, record)),
        };
        let writer = ChunkWriter::new(&request, id, unix_now());
        return Ok(stream_response(state.clone(), started, writer, record, gauge));
    }
    // Nothing reaches the client before the whole answer, so a worker lost mid-way is retried on another.
    loop {
        let started = match state.router.start_generation(&request, &id, &mut tried).await {
            Ok(started) => started,
            Err(e) => return Err((e, record)),
        };
        let backend = started.in_flight.backend().clone();
        match collect(state, started, &record).await {
            Ok(done) => {
                drop(gauge);
                record.finish(StatusCode::OK);
                return Ok(whole_response(&request, id, unix_now(), done));
            }
            Err(Collected::Broken(why)) => {
                tracing::warn!(endpoint = %backend.addr, why, "worker failed mid-request; retrying elsewhere");
                state.router.eject(&backend, &why);
            }
            Err(Collected::Failed(e)) => return Err((e, record)),
        }
    }
}

struct Done {
    text: String,
    finish_reason: &'static str,
    usage: Usage,
}

enum Collected {
    /// The worker went away: another may serve the request.
    Broken(String),
    Failed(ApiError),
}

fn finish_reason(f: &v1::Finished) -> &'static str {
    if f.reason == v1::FinishReason::Length as i32 {
        "length"
    } else {
        "stop"
    }
}

async fn collect(state: &AppState, mut started: Started, record: &RequestRecord) -> Result<Done, Collected> {
    let mut text = String::new();
    let mut first = true;
    loop {
        match started.stream.message().await {
            Ok(Some(v1::GenerateResponse { event: Some(event) })) => match event {
                generate_response::Event::Chunk(c) => {
                    if first {
                        first = false;
                        observe_ttft(state, record);
                    }
                    text.push_str(&c.text);
                }
                generate_response::Event::Finished(f) => {
                    return Ok(Done {
                        text,
                        finish_reason: finish_reason(&f),
                        usage: Usage::new(f.prompt_tokens as usize, f.completion_tokens as usize),
                    });
                }
                generate_response::Event::Started(_) => {}
            },
            Ok(Some(_)) => {}
            Ok(None) => return Err(Collected::Broken("the worker's stream ended early".into())),
            Err(status) if is_transport_failure(&status) => {
                return Err(Collected::Broken(status.message().to_string()));
            }
            Err(status) => {
                return Err(Collected::Failed(ApiError::worker_failed(
                    status.message().to_string(),
                )));
            }
        }
    }
}

fn observe_ttft(state: &AppState, record: &RequestRecord) {
    state
        .metrics
        .time_to_first_token
        .get_or_create(&ModelLabels {
            model: record.model.clone(),
        })
        .observe(record.received.elapsed().as_secs_f64());
}

fn whole_response(request: &Validated, id: String, created: u64, done: Done) -> Response {
    let model = request.model.clone();
    match request.api {
        Api::Chat => axum::Json(openai::ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![openai::ChatChoice {
                index: 0,
                message: openai::AssistantMessage {
                    role: "assistant",
                    content: done.text,
                },
                finish_reason: Some(done.finish_reason),
                logprobs: None,
            }],
            usage: done.usage,
        })
        .into_response(),
        Api::Completions => axum::Json(openai::Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices: vec![openai::CompletionChoice {
                index: 0,
                text: done.text,
                finish_reason: Some(done.finish_reason),
                logprobs: None,
            }],
            usage: Some(Some(done.usage)),
        })
        .into_response(),
    }
}

/// Writes the JSON of each SSE chunk for one streamed response.
struct ChunkWriter {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkWriter {
    fn new(request: &Validated, id: String, created: u64) -> Self {
        Self {
            api: request.api,
            id,
            created,
            model: request.model.clone(),
            include_usage: request.include_usage,
        }
    }

    fn usage_field(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(usage)
    }

    /// One chunk's JSON: `choice` (none for the final usage chunk) and `usage` (when the client asked for it).
    fn json(
        &self,
        choice: Option<(bool, Option<String>, Option<&'static str>)>,
        usage: Option<Usage>,
    ) -> String {
        let usage = self.usage_field(usage);
        let json = match self.api {
            Api::Chat => serde_json::to_string(&openai::ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: choice
                    .map(|(role, content, finish_reason)| openai::ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: role.then_some("assistant"),
                            content,
                        },
                        finish_reason,
                        logprobs: None,
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
            Api::Completions => serde_json::to_string(&openai::Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: choice
                    .map(|(_, text, finish_reason)| openai::CompletionChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        finish_reason,
                        logprobs: None,
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
        };
        json.unwrap_or_default()
    }

    fn chunk(&self, role: bool, text: Option<String>, finish: Option<&'static str>) -> String {
        self.json(Some((role, text, finish)), None)
    }

    /// The final chunk OpenAI sends with `include_usage`: no choices, the usage.
    fn usage(&self, usage: Usage) -> String {
        self.json(None, Some(usage))
    }
}

fn stream_response(
    state: AppState,
    mut started: Started,
    writer: ChunkWriter,
    record: RequestRecord,
    gauge: InFlightGauge,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _gauge = gauge;
        let send = |data: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(data))).await.is_ok() }
        };
        // A client that went away drops the receiver; returning drops the worker stream, which cancels it.
        if writer.api == Api::Chat && !send(writer.chunk(true, Some(String::new()), None)).await {
            return record.finish(StatusCode::OK);
        }
        let mut first = true;
        loop {
            let message = started.stream.message().await;
            let keep_going = match message {
                Ok(Some(v1::GenerateResponse {
                    event: Some(generate_response::Event::Chunk(c)),
                })) => {
                    if first {
                        first = false;
                        observe_ttft(&state, &record);
                    }
                    send(writer.chunk(false, Some(c.text), None)).await
                }
                Ok(Some(v1::GenerateResponse {
                    event: Some(generate_response::Event::Finished(f)),
                })) => {
                    if send(writer.chunk(false, None, Some(finish_reason(&f)))).await && writer.include_usage
                    {
                        let usage = Usage::new(f.prompt_tokens as usize, f.completion_tokens as usize);
                        let _ = send(writer.usage(usage)).await;
                    }
                    false
                }
                Ok(Some(_)) => true,
                Ok(None) | Err(_) => {
                    let why = match &message {
                        Err(status) => status.message().to_string(),
                        _ => "the worker's stream ended early".to_string(),
                    };
                    if message.as_ref().err().is_none_or(is_transport_failure) {
                        state.router.eject(started.in_flight.backend(), &why);
                    }
                    tracing::warn!(endpoint = %started.in_flight.backend().addr, why, "stream broke");
                    let e = ApiError::worker_failed(format!("the worker failed while streaming: {why}"));
                    let _ = send(serde_json::to_string(&e.body()).unwrap_or_default()).await;
                    false
                }
            };
            if !keep_going {
                break;
            }
        }
        let _ = send("[DONE]".into()).await;
        record.finish(StatusCode::OK);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut response = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

async fn list_models(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(openai::ModelList {
        object: "list",
        data: state
            .router
            .models()
            .into_iter()
            .map(|id| openai::ModelCard {
                id,
                object: "model",
                created: state.created,
                owned_by: "camelid",
            })
            .collect(),
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.router.any_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no ready worker").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
