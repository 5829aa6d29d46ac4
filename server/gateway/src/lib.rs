//! camelid's OpenAI-compatible gateway (no libtorch): `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! health and metrics, routing each request to the least-busy ready worker of its model over gRPC.
//!
//! The request pipeline ([`api`]): read the body (size-limited) → parse ([`openai`] wire types) → validate
//! ([`validate::Validated`], errors naming the field) → guardrails ([`guardrails`]) → route ([`routing`]) →
//! respond or stream. [`error::ApiError`] is the one place errors become OpenAI-shaped responses.

pub mod api;
pub mod config;
pub mod error;
pub mod guardrails;
pub mod metrics;
pub mod openai;
pub mod routing;
pub mod validate;

use std::sync::Arc;

pub use config::GatewayConfig;

/// Builds the gateway's state for `config` and starts following its endpoints.
pub fn state(config: &GatewayConfig, guardrails: guardrails::Guardrails) -> api::AppState {
    let metrics = Arc::new(metrics::Metrics::new());
    let source = routing::StaticEndpoints::new(config.endpoints.clone());
    let router = routing::Router::start(&source, metrics.clone(), config.probe_interval);
    api::AppState {
        router,
        metrics,
        guardrails,
        limits: config.limits,
        created: api::unix_now(),
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    state: api::AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
