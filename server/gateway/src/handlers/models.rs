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
    let rules = state.rules.read().map(|r| r.clone()).unwrap_or_default();
    // A model is listed when the caller's key may use it: the key's own `models`, and a ChatModel's
    // `allowedKeys` (which a request would be refused by too).
    let usable = |id: &str| {
        let by_key = key.as_ref().is_none_or(|k| k.allow_model(id).is_ok());
        let by_model = rules.get(id).is_none_or(|rule| {
            rule.allowed_keys.is_empty()
                || key
                    .as_ref()
                    .is_some_and(|k| rule.allowed_keys.iter().any(|n| n == k.name()))
        });
        by_key && by_model
    };
    let models = state.router.public_ids();
    let card = |id: String, parent: Option<String>| openai::ModelCard {
        id,
        object: "model",
        created: state.created,
        owned_by: "camelid",
        parent,
    };
    // An adapter is listed under its base's rules, with the base's shown name as its parent.
    let adapters = state
        .router
        .public_adapters()
        .into_iter()
        .filter_map(|(shown, base)| {
            let parent = models.iter().find(|(_, id)| *id == base)?.0.clone();
            usable(&base).then(|| card(shown, Some(parent)))
        });
    let data = models
        .iter()
        .filter(|(_, id)| usable(id))
        .map(|(shown, _)| card(shown.clone(), None))
        .chain(adapters)
        .collect();
    axum::Json(openai::ModelList { object: "list", data }).into_response()
}
