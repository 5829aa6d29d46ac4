//! `POST /v1/moderations`: the gateway's own moderation, with the configured providers and OpenAI's response
//! shape, so clients can check text before sending it. `model` names a moderation profile; without it the key's
//! profile or the default one is used.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::request::{authenticate, read_body, refused};
use crate::error::ApiError;
use crate::openai::{
    ModerationInput, ModerationPart, ModerationRequest, ModerationResponse, ModerationResult,
};
use crate::state::AppState;
use crate::validate;

/// Most texts in one moderation request.
pub const MAX_INPUTS: usize = 64;

#[tracing::instrument(name = "moderations", skip_all)]
pub async fn moderations(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match moderate(&state, &headers, body).await {
        Ok(response) => axum::Json(response).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn moderate(state: &AppState, headers: &HeaderMap, body: Body) -> Result<ModerationResponse, ApiError> {
    let policy = state.policy.current();
    let key = authenticate(state, &policy, headers)?;
    if let Some(key) = &key {
        key.take_request().map_err(|e| refused(state, Some(key), e))?;
    }
    let bytes = read_body(body, state.limits.max_body_bytes).await?;
    let request: ModerationRequest = validate::parse(&bytes)?;
    let texts = texts(request.input, state.limits.max_prompt_chars)?;
    let profile = match &request.model {
        Some(name) => policy.profiles.get(name).cloned().ok_or_else(|| {
            let known: Vec<&String> = policy.profiles.keys().collect();
            ApiError::invalid("model", format!("no moderation profile `{name}`; this gateway has {known:?}"))
        })?,
        None => policy.profile_for(key.as_deref(), "").ok_or_else(|| {
            ApiError::invalid(
                "model",
                "this gateway has no default moderation profile; name one in `model` or configure `moderation`",
            )
        })?,
    };
    let verdicts = profile
        .run(&profile.input, &texts, "input", &state.metrics)
        .await
        .map_err(|e| e.to_api_error(None))?;
    Ok(ModerationResponse {
        id: format!("modr-{}", uuid::Uuid::new_v4().simple()),
        model: profile.name.clone(),
        results: verdicts
            .into_iter()
            .map(|v| ModerationResult {
                flagged: v.flagged,
                categories: v.categories,
                category_scores: v.scores,
            })
            .collect(),
    })
}

fn texts(input: ModerationInput, max_chars: usize) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        ModerationInput::One(text) => vec![text],
        ModerationInput::Many(parts) => parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| match part {
                ModerationPart::Text(text) => Ok(text),
                ModerationPart::Typed {
                    kind,
                    text: Some(text),
                } if kind == "text" => Ok(text),
                ModerationPart::Typed { kind, .. } => Err(ApiError::unsupported(
                    &format!("input[{i}].type"),
                    format!("input type {kind:?} is not supported; only text"),
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    if texts.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "`input` must contain at least one text",
        ));
    }
    if texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("`input` has {} texts; the limit is {MAX_INPUTS}", texts.len()),
        ));
    }
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    if chars > max_chars {
        return Err(ApiError::invalid(
            "input",
            format!("`input` has {chars} characters; the limit is {max_chars}"),
        ));
    }
    Ok(texts)
}
