//! Answers: the whole JSON response, or SSE chunks ending with `data: [DONE]`; with output moderation, generated
//! text is held back and released only after its window passed (see [`crate::moderation::output`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use camelid_proto::v1;
use tokio::sync::mpsc;

use super::request::{InFlightGauge, RequestRecord};
use crate::error::ApiError;
use crate::metrics::ModelLabels;
use crate::moderation::output::OutputGate;
use crate::moderation::{ModerationError, Profile};
use crate::openai::{self, Delta, Usage};
use crate::routing::{Generation, Next};
use crate::state::AppState;
use crate::validate::{Api, Validated};

/// The finish reason when output moderation stopped a reply.
pub const CONTENT_FILTER: &str = "content_filter";

pub(crate) struct Done {
    text: String,
    finish_reason: &'static str,
    usage: Usage,
}

fn finish_reason(f: &v1::Finished) -> &'static str {
    if f.reason == v1::FinishReason::Length as i32 {
        "length"
    } else {
        "stop"
    }
}

/// The whole text of a generation (on however many workers it ran).
pub(crate) async fn collect(
    state: &AppState,
    mut generation: Generation,
    record: &RequestRecord,
) -> Result<Done, ApiError> {
    let mut text = String::new();
    let mut first = true;
    let mut completion_tokens = 0usize;
    record.used_tokens(generation.prompt_tokens, 0);
    loop {
        match generation.next().await? {
            Next::Text { text: t, tokens } => {
                if first {
                    first = false;
                    observe_ttft(state, record);
                }
                completion_tokens = completion_tokens.saturating_add(tokens);
                record.used_tokens(generation.prompt_tokens, completion_tokens);
                text.push_str(&t);
            }
            Next::Finished(f) => {
                record.used_tokens(f.prompt_tokens as usize, f.completion_tokens as usize);
                return Ok(Done {
                    text,
                    finish_reason: finish_reason(&f),
                    usage: Usage::new(f.prompt_tokens as usize, f.completion_tokens as usize),
                });
            }
        }
    }
}

/// Output moderation of a whole reply, window by window as if it streamed: a flagged window cuts the reply there
/// with `finish_reason: "content_filter"`.
pub(crate) async fn moderate_whole(
    state: &AppState,
    profile: &Profile,
    mut done: Done,
) -> Result<Done, ApiError> {
    let mut gate = OutputGate::new(profile.output_window_chars);
    let mut released = String::new();
    let chars: Vec<char> = done.text.chars().collect();
    let mut pieces = chars.chunks(profile.output_window_chars).peekable();
    while let Some(piece) = pieces.next() {
        let full = gate.push(&piece.iter().collect::<String>());
        if !full && pieces.peek().is_some() {
            continue;
        }
        match profile.check_output(gate.to_check(), &state.metrics).await {
            Ok(()) => released.push_str(&gate.release(pieces.peek().is_none())),
            Err(ModerationError::Flagged { .. }) => {
                done.text = released;
                done.finish_reason = CONTENT_FILTER;
                return Ok(done);
            }
            Err(e) => return Err(e.to_api_error(None)),
        }
    }
    Ok(done)
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

pub(crate) fn whole_response(request: &Validated, id: String, created: u64, done: Done) -> Response {
    let model = request.shown_model();
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
pub(crate) struct ChunkWriter {
    pub(crate) api: Api,
    id: String,
    created: u64,
    pub(crate) model: String,
    include_usage: bool,
}

impl ChunkWriter {
    pub(crate) fn new(request: &Validated, id: String, created: u64) -> Self {
        Self {
            api: request.api,
            id,
            created,
            model: request.shown_model(),
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

/// The SSE events of one streamed response, in order.
struct Events(mpsc::Sender<Result<SseEvent, Infallible>>);

impl Events {
    /// Sends one `data:` event; `false` once the client went away.
    async fn send(&self, data: String) -> bool {
        self.0.send(Ok(SseEvent::default().data(data))).await.is_ok()
    }

    /// Sends an error in OpenAI's shape (a client that went away needs no error).
    async fn error(&self, e: &ApiError) {
        let body = serde_json::to_string(&e.body()).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
        });
        self.send(body).await;
    }
}

/// Streams the generation `start` begins. `start` may first wait for a worker (a model at zero replicas):
/// meanwhile the stream is open and gets a comment every `hold.keepalive`; if it fails, the stream carries the
/// error (OpenAI's shape) and ends with `[DONE]`.
pub(crate) fn stream_response(
    state: AppState,
    start: impl std::future::Future<Output = Result<Generation, ApiError>> + Send + 'static,
    writer: ChunkWriter,
    record: RequestRecord,
    gauge: InFlightGauge,
    output: Option<Arc<Profile>>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let keepalive = state.hold.keepalive;
    tokio::spawn(async move {
        let _gauge = gauge;
        let events = Events(tx);
        let status = run_stream(&state, start, &writer, &record, output.as_deref(), &events).await;
        record.finish(status);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// Waits for the generation to start, relays it and ends the stream; returns the status to record.
async fn run_stream(
    state: &AppState,
    start: impl std::future::Future<Output = Result<Generation, ApiError>>,
    writer: &ChunkWriter,
    record: &RequestRecord,
    output: Option<&Profile>,
    events: &Events,
) -> StatusCode {
    let mut generation = tokio::select! {
        started = start => match started {
            Ok(generation) => generation,
            Err(e) => {
                events.error(&e).await;
                let _ = events.send("[DONE]".into()).await;
                return e.status;
            }
        },
        // The client left while its request waited.
        () = events.0.closed() => return StatusCode::OK,
    };
    // A client that went away drops the receiver; returning drops the worker stream, which cancels it.
    if writer.api == Api::Chat && !events.send(writer.chunk(true, Some(String::new()), None)).await {
        return StatusCode::OK;
    }
    relay(state, &mut generation, writer, record, output, events).await;
    let _ = events.send("[DONE]".into()).await;
    StatusCode::OK
}

/// Sends the generation's text to the client until it finishes (on however many workers), fails, the client
/// leaves or output moderation cuts it.
async fn relay(
    state: &AppState,
    generation: &mut Generation,
    writer: &ChunkWriter,
    record: &RequestRecord,
    output: Option<&Profile>,
    events: &Events,
) {
    let mut gate = output.map(|p| OutputGate::new(p.output_window_chars));
    let mut first = true;
    let mut completion_tokens = 0usize;
    record.used_tokens(generation.prompt_tokens, 0);
    loop {
        let next = tokio::select! {
            next = generation.next() => next,
            // The client left (perhaps while the generation waited for a worker to continue on).
            () = events.0.closed() => return,
        };
        let (text, finished) = match next {
            Ok(Next::Text { text, tokens }) => {
                if first {
                    first = false;
                    observe_ttft(state, record);
                }
                completion_tokens += tokens;
                record.used_tokens(generation.prompt_tokens, completion_tokens);
                (text, None)
            }
            Ok(Next::Finished(f)) => {
                record.used_tokens(f.prompt_tokens as usize, f.completion_tokens as usize);
                (String::new(), Some(f))
            }
            Err(e) => {
                tracing::warn!(endpoint = %generation.backend().addr, error = %e.message, "stream failed");
                return events.error(&e).await;
            }
        };
        // What may go to the client now: everything, or with output moderation what passed its window.
        let released = match (&mut gate, output) {
            (Some(gate), Some(profile)) => {
                moderate_window(state, gate, profile, &text, finished.is_some()).await
            }
            _ => Ok(text),
        };
        match released {
            Ok(text) if !text.is_empty() => {
                if !events.send(writer.chunk(false, Some(text), None)).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(ModerationError::Flagged { categories, .. }) => {
                tracing::info!(model = %writer.model, categories = ?categories, "output flagged; stream cut");
                if events.send(writer.chunk(false, None, Some(CONTENT_FILTER))).await && writer.include_usage
                {
                    let usage = Usage::new(generation.prompt_tokens, completion_tokens);
                    let _ = events.send(writer.usage(usage)).await;
                }
                return;
            }
            Err(e) => return events.error(&e.to_api_error(None)).await,
        }
        if let Some(f) = finished {
            if events
                .send(writer.chunk(false, None, Some(finish_reason(&f))))
                .await
                && writer.include_usage
            {
                let usage = Usage::new(f.prompt_tokens as usize, f.completion_tokens as usize);
                let _ = events.send(writer.usage(usage)).await;
            }
            return;
        }
    }
}

/// Adds `text` to the output window and, once the window is full (or the reply is over with text pending),
/// moderates it: the text that passed, or nothing yet.
async fn moderate_window(
    state: &AppState,
    gate: &mut OutputGate,
    profile: &Profile,
    text: &str,
    last: bool,
) -> Result<String, ModerationError> {
    let due = gate.push(text) || (last && gate.has_pending());
    if due {
        profile
            .check_output(gate.to_check(), &state.metrics)
            .await
            .map(|()| gate.release(last))
    } else {
        Ok(String::new())
    }
}
