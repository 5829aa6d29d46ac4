//! `POST /v1/chat/completions` and `POST /v1/completions`: the request pipeline. Authenticate → read → parse →
//! validate → model permission and rate limits → input moderation → route → respond (a JSON body, or SSE chunks
//! ending with `data: [DONE]`, with output moderation where the profile has it; see [`super::respond`]). No
//! request reaches a worker without passing every step.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::request::{InFlightGauge, RequestRecord, authenticate, read_body, refused};
use super::respond::{ChunkWriter, collect, moderate_whole, stream_response, whole_response};
use crate::error::ApiError;
use crate::keys::Key;
use crate::moderation::Profile;
use crate::policy::Policy;
use crate::state::{AppState, unix_now};
use crate::tokens::{self, Charge};
use crate::validate::{self, Api, Limits, Validated};

pub(super) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(
        state,
        Api::Chat,
        &headers,
        body,
        validate::parse_chat,
        validate::chat,
    )
    .await
}

pub(super) async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    handle(
        state,
        Api::Completions,
        &headers,
        body,
        validate::parse_completion,
        validate::completion,
    )
    .await
}

/// One request through the whole pipeline, in one span (exported over OTLP when the gateway has an endpoint).
#[tracing::instrument(name = "request", skip_all, fields(api = ?api))]
async fn handle<T: DeserializeOwned>(
    state: AppState,
    api: Api,
    headers: &HeaderMap,
    body: Body,
    parse: fn(&[u8]) -> Result<T, ApiError>,
    validate: fn(T, &Limits) -> Result<Validated, ApiError>,
) -> Response {
    let mut record = RequestRecord {
        metrics: state.metrics.clone(),
        model: "unknown".into(),
        route: api.route(),
        received: Instant::now(),
        charge: None,
    };
    // The policy a request starts under is the one it finishes under, whatever reloads happen meanwhile.
    let policy = state.policy.current();
    let validated = async {
        let key = authenticate(&state, &policy, headers)?;
        let bytes = read_body(body, state.limits.max_body_bytes).await?;
        Ok::<_, ApiError>((key, validate(parse(&bytes)?, &state.limits)?))
    }
    .await;
    let result = match validated {
        Ok((key, mut request)) => {
            // A bare ChatModel name becomes its `NAMESPACE/NAME` id (see `discovery`), before any rule is looked up.
            // An adapter's name becomes its base model's id and the adapter the call names.
            let resolved = state.router.resolve_target(&request.model).map(|target| {
                request.model = target.model;
                request.adapter = target.adapter;
            });
            if state.router.knows(&request.model) {
                record.model = request.model.clone();
            }
            let admitted = match resolved {
                Ok(()) => admit(&state, &policy, key.as_deref(), &mut request).await,
                Err(e) => Err(e),
            };
            match admitted {
                Ok((output, charge)) => {
                    record.charge = charge;
                    let holder = key.as_ref().map(|k| k.name().to_string());
                    pipeline(&state, request, record, output, holder).await
                }
                Err(e) => Err((e, record)),
            }
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

/// The guardrails between validation and routing: the key's model permission and rates, then input moderation.
/// Returns the profile whose output moderation applies to the reply, and the tokens reserved (settled when the
/// request's record is dropped). Sets `max_tokens` when the request has none (see [`max_tokens`]).
async fn admit(
    state: &AppState,
    policy: &Policy,
    key: Option<&Key>,
    request: &mut Validated,
) -> Result<(Option<Arc<Profile>>, Option<Charge>), ApiError> {
    let rule = state
        .rules
        .read()
        .ok()
        .and_then(|r| r.get(&request.model).cloned())
        .unwrap_or_default();
    if !rule.allowed_keys.is_empty() && !key.is_some_and(|k| rule.allowed_keys.iter().any(|n| n == k.name()))
    {
        return Err(refused(state, key, ApiError::model_not_allowed(&request.model)));
    }
    let prompt = tokens::prompt_bound(&request.input);
    request.params.max_tokens = Some(max_tokens(request.params.max_tokens, key, &state.limits, prompt));
    request.cache_salt = key.map(|k| k.name().to_string()).unwrap_or_default();
    let mut charge = None;
    if let Some(key) = key {
        let limits = key
            .allow_model(&request.model)
            .and_then(|()| key.take_request())
            .and_then(|()| key.reserve_tokens(prompt.saturating_add(request.params.max_tokens.unwrap_or(0))));
        charge = limits.map_err(|e| refused(state, Some(key), e))?;
    }
    let named = match (key.and_then(|k| k.spec.moderation.as_ref()), &rule.moderation) {
        (None, Some(name)) => Some(policy.profiles.get(name).cloned().ok_or_else(|| {
            ApiError::moderation_unavailable(format!(
                "the model's moderation profile `{name}` is not in the gateway's config"
            ))
        })?),
        _ => None,
    };
    let Some(profile) = named.or_else(|| policy.profile_for(key, &request.model)) else {
        return Ok((None, charge));
    };
    // Every turn the client wrote (its "assistant" turns too) and the conversation whole.
    let turns = crate::moderation::input_turns(&request.input);
    profile.check_turns(&turns, &state.metrics).await?;
    Ok(((!profile.output.is_empty()).then_some(profile), charge))
}

/// The `max_tokens` sent to the worker: the request's own, or else the key's `default_max_tokens` (the gateway's
/// `limits.default_max_tokens` without one), lowered so that the prompt's bound plus it fits the key's
/// `tokens_per_minute` (a request that sets none should not be refused for a default it did not choose).
pub(crate) fn max_tokens(asked: Option<u32>, key: Option<&Key>, limits: &Limits, prompt_bound: u32) -> u32 {
    if let Some(n) = asked {
        return n;
    }
    let default = key
        .and_then(|k| k.spec.default_max_tokens)
        .map_or(limits.default_max_tokens, NonZeroU32::get);
    let room = key
        .and_then(Key::token_bucket)
        .map_or(u32::MAX, |b| b.per_minute().saturating_sub(prompt_bound));
    default.min(room).max(1)
}

/// Routing and the response. Streams record their metrics when they end.
#[tracing::instrument(name = "route", skip_all, fields(model = %record.model))]
async fn pipeline(
    state: &AppState,
    request: Validated,
    record: RequestRecord,
    output: Option<Arc<Profile>>,
    holder: Option<String>,
) -> Result<Response, (ApiError, RequestRecord)> {
    let prefix = if request.api == Api::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let gauge = InFlightGauge::new(&state.metrics, &record.model);
    let mut tried = Vec::new();
    // Only a ChatModel's requests wait: the operator starts its workers when they queue. A model of the static
    // config with no ready worker gets 503 at once (nothing would start one).
    let scaled = state.rules.read().is_ok_and(|r| r.contains_key(&request.model));
    let waiting = scaled && !state.router.has_ready(&request.model);
    if waiting {
        let held = match state.router.hold(
            &request.model,
            state.hold.max_requests,
            holder.as_deref(),
            state.hold_per_key,
        ) {
            Ok(held) => held,
            Err(e) => return Err((e, record)),
        };
        if request.stream {
            // Headers go now and comments keep the stream open while a worker starts; the answer follows.
            let writer = ChunkWriter::new(&request, id.clone(), unix_now());
            let st = state.clone();
            let start = async move {
                held.until_ready(st.hold.timeout).await?;
                st.router.start_generation(&request, &id, &mut tried).await
            };
            return Ok(stream_response(
                state.clone(),
                start,
                writer,
                record,
                gauge,
                output,
            ));
        }
        if let Err(e) = held.until_ready(state.hold.timeout).await {
            return Err((e, record));
        }
    }
    if request.stream {
        let started = match state.router.start_generation(&request, &id, &mut tried).await {
            Ok(started) => started,
            Err(e) => return Err((e, record)),
        };
        let writer = ChunkWriter::new(&request, id, unix_now());
        return Ok(stream_response(
            state.clone(),
            std::future::ready(Ok(started)),
            writer,
            record,
            gauge,
            output,
        ));
    }
    whole(state, &request, &id, tried, record, gauge, output.as_deref()).await
}

/// A non-streamed answer: the whole text, moderated, in one response. A worker that drains or dies mid-way is
/// followed by its [`crate::routing::Generation`] like a stream's.
async fn whole(
    state: &AppState,
    request: &Validated,
    id: &str,
    mut tried: Vec<String>,
    record: RequestRecord,
    gauge: InFlightGauge,
    output: Option<&Profile>,
) -> Result<Response, (ApiError, RequestRecord)> {
    let generation = match state.router.start_generation(request, id, &mut tried).await {
        Ok(generation) => generation,
        Err(e) => return Err((e, record)),
    };
    let done = match collect(state, generation, &record).await {
        Ok(done) => done,
        Err(e) => return Err((e, record)),
    };
    let done = match output {
        Some(profile) => match moderate_whole(state, profile, done).await {
            Ok(done) => done,
            Err(e) => return Err((e, record)),
        },
        None => done,
    };
    drop(gauge);
    record.finish(StatusCode::OK);
    Ok(whole_response(request, id.to_string(), unix_now(), done))
}
