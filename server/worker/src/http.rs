//! The worker's HTTP side, beside its gRPC port: `/metrics` (OpenMetrics), `/healthz` (the process is up) and
//! `/readyz` (the model is loaded and the worker is not draining). Apart from [`crate::grpc`] because it is a different server: the worker's
//! binary serves it on its own port, and `camelid serve` nests it under the gateway.

use axum::http::{StatusCode, header};
use axum::routing::get;

use crate::handle::WorkerHandle;

/// `/metrics`, `/healthz` (the process is up) and `/readyz` (the model is loaded and the worker is not draining).
pub fn http_router(handle: WorkerHandle) -> axum::Router {
    let metrics = handle.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                match handle.info() {
                    Ok(_) if handle.is_ready() => (StatusCode::OK, "ready".to_string()),
                    Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "draining".to_string()),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.metrics().encode(),
                )
            }),
        )
}
