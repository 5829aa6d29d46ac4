//! The HTTP surface and the request pipeline: authenticate → read → parse → validate → model permission and
//! rate limits → input moderation → route → respond (a JSON body, or SSE chunks ending with `data: [DONE]`, with
//! output moderation where the profile has it). No request reaches a worker without passing every step.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;

use crate::discovery::ModelRules;
use crate::error::ApiError;
use crate::keys::{Key, estimate_tokens};
use crate::metrics::{Metrics, ModelLabels, RefusalLabels, RequestLabels, RouteLabels};
use crate::moderation::Profile;
use crate::openai;
use crate::policy::{Policy, PolicyCell};
use crate::respond::{ChunkWriter, Collected, collect, moderate_whole, stream_response, whole_response};
use crate::routing::{HoldLimits, Router, StaticEndpoints};
use crate::validate::{self, Api, Limits, Validated};

/// Everything a handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub router: Arc<Router>,
    /// The configured endpoints the router follows (a reload sends new ones).
    pub endpoints: Arc<StaticEndpoints>,
    pub metrics: Arc<Metrics>,
    /// Keys and moderation; replaced whole when the config file changes.
    pub policy: Arc<PolicyCell>,
    pub limits: Limits,
    /// How requests wait for a model with no ready worker.
    pub hold: HoldLimits,
    /// What ChatModels ask besides routing (their moderation profile and keys); empty outside a cluster.
    pub rules: ModelRules,
    pub created: u64,
}

/// Times a whole request and records it once, under a bounded model label.
pub(crate) struct RequestRecord {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) model: String,
    pub(crate) route: &'static str,
    pub(crate) received: Instant,
}

impl RequestRecord {
    pub(crate) fn finish(&self, status: StatusCode) {
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
pub(crate) struct InFlightGauge(Arc<Metrics>, String);

impl InFlightGauge {
    pub(crate) fn new(metrics: &Arc<Metrics>, model: &str) -> Self {
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
        .route("/v1/moderations", post(crate::moderations::moderations))
        .route("/", get(chat_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(camelid_contracts::load::PATH, get(load))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// The chat page; it may not be framed by other sites (the key is typed into it).
async fn chat_page() -> impl IntoResponse {
    (
        [
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(crate::CHAT_PAGE),
    )
}

/// Seconds since the Unix epoch, for the `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if e.to_string().contains("length limit") {
            ApiError::too_large(limit)
        } else {
            ApiError::malformed_json(format!("could not read the body: {e}"))
        }
    })
}

async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
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

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
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
        Ok((key, request)) => {
            if state.router.knows(&request.model) {
                record.model = request.model.clone();
            }
            match admit(&state, &policy, key.as_deref(), &request).await {
                Ok(output) => pipeline(&state, request, record, output).await,
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

/// The request's key, or none when the gateway has no keys (anonymous access). Refusals are counted.
pub(crate) fn authenticate(
    state: &AppState,
    policy: &Policy,
    headers: &HeaderMap,
) -> Result<Option<Arc<Key>>, ApiError> {
    if policy.keys.is_empty() {
        return Ok(None);
    }
    let header = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    policy
        .keys
        .authenticate(header)
        .map(Some)
        .map_err(|e| refused(state, None, e))
}

/// Counts a refusal by keys or limits under the key's name (never the key).
pub(crate) fn refused(state: &AppState, key: Option<&Key>, e: ApiError) -> ApiError {
    state
        .metrics
        .refusals
        .get_or_create(&RefusalLabels {
            key: key.map_or("none", Key::name).to_string(),
            reason: e.category(),
        })
        .inc();
    e
}

/// The guardrails between validation and routing: the key's model permission and rates, then input moderation.
/// Returns the profile whose output moderation applies to the reply.
async fn admit(
    state: &AppState,
    policy: &Policy,
    key: Option<&Key>,
    request: &Validated,
) -> Result<Option<Arc<Profile>>, ApiError> {
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
    if let Some(key) = key {
        let limits = key
            .allow_model(&request.model)
            .and_then(|()| key.take_request())
            .and_then(|()| {
                key.take_tokens(estimate_tokens(request.input.chars(), request.params.max_tokens))
            });
        limits.map_err(|e| refused(state, Some(key), e))?;
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
        return Ok(None);
    };
    let (params, texts) = request.input.moderated_texts();
    profile.check_input(&texts, &state.metrics).await.map_err(|e| {
        let param = match &e {
            crate::moderation::ModerationError::Flagged { index, .. } => params.get(*index).cloned(),
            _ => None,
        };
        e.to_api_error(param)
    })?;
    Ok((!profile.output.is_empty()).then_some(profile))
}

/// Routing and the response. Streams record their metrics when they end.
async fn pipeline(
    state: &AppState,
    request: Validated,
    record: RequestRecord,
    output: Option<Arc<Profile>>,
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
        let held = match state.router.hold(&request.model, state.hold.max_requests) {
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
    // Nothing reaches the client before the whole answer, so a worker lost mid-way is retried on another.
    loop {
        let started = match state.router.start_generation(&request, &id, &mut tried).await {
            Ok(started) => started,
            Err(e) => return Err((e, record)),
        };
        let backend = started.in_flight.backend().clone();
        match collect(state, started, &record).await {
            Ok(done) => {
                let done = match &output {
                    Some(profile) => match moderate_whole(state, profile, done).await {
                        Ok(done) => done,
                        Err(e) => return Err((e, record)),
                    },
                    None => done,
                };
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

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let policy = state.policy.current();
    let key = match authenticate(&state, &policy, &headers) {
        Ok(key) => key,
        Err(e) => return e.into_response(),
    };
    axum::Json(openai::ModelList {
        object: "list",
        data: state
            .router
            .models()
            .into_iter()
            .filter(|m| key.as_ref().is_none_or(|k| k.allow_model(m).is_ok()))
            .map(|id| openai::ModelCard {
                id,
                object: "model",
                created: state.created,
                owned_by: "camelid",
            })
            .collect(),
    })
    .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.router.any_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no ready worker").into_response()
    }
}

/// Each model's requests in flight and held, for the operator's autoscaler (summed over gateways there).
async fn load(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(camelid_contracts::LoadReport {
        models: state.router.load(),
    })
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
