//! `GET /v1/models`: the models this gateway routes to, less those the caller's key may not use.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::request::authenticate;
use crate::openai;
use crate::state::AppState;

pub(super) async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
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
