//! The HTTP surface: the axum router ([`app`]) and its handlers, one file per endpoint group. The chat and
//! completions pipeline ([`chat`]) answers through [`respond`]; [`moderations`] is the `/v1/moderations` endpoint
//! (its providers live in [`crate::moderation`]); [`request`] holds what handlers share about a request.

pub mod chat;
pub mod health;
pub mod models;
pub mod moderations;
pub mod page;
pub mod request;
pub mod respond;

use axum::http::Uri;
use axum::routing::{get, post};

use crate::error::ApiError;
use crate::state::AppState;

/// The gateway's routes over `state`; unknown routes and methods get OpenAI-shaped 404 and 405 errors.
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(models::list_models))
        .route("/v1/moderations", post(moderations::moderations))
        .route("/", get(page::chat_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route(camelid_contracts::load::PATH, get(health::load))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}
