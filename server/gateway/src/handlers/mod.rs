//! The HTTP surface: the axum router ([`app`]) and its handlers, one file per endpoint group. The chat and
//! completions pipeline ([`chat`]) answers through [`respond`]; [`moderations`] is the `/v1/moderations` endpoint
//! (its providers live in [`crate::moderation`]); [`request`] holds what handlers share about a request.

pub mod chat;
pub mod guard;
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

/// The gateway's API routes over `state`; unknown routes and methods get OpenAI-shaped 404 and 405 errors. Every
/// request first passes [`guard::check`] (JSON bodies; in anonymous loopback mode, a loopback `Host` and
/// `Origin`). What only operators should see (`/metrics`, `/internal/load`) is not here but in [`admin_app`].
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(models::list_models))
        .route("/v1/moderations", post(moderations::moderations))
        .route("/", get(page::chat_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::readyz))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::check))
        .with_state(state)
}

/// The admin routes: `/metrics` (key names, endpoints, every model), `/internal/load` (the operator's
/// autoscaler), and the probes. Served on their own port ([`crate::serve::serve_admin`]), never the API's.
pub fn admin_app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route(camelid_contracts::load::PATH, get(health::load))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}
