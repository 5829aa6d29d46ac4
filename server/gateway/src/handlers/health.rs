//! The endpoints for operators rather than clients: `/readyz` (some worker is ready), `/metrics` (OpenMetrics),
//! and the load report the operator's autoscaler reads. `/healthz` is a constant in the router.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    if state.router.any_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no ready worker").into_response()
    }
}

/// Each model's requests in flight and held, for the operator's autoscaler (summed over gateways there).
pub(super) async fn load(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(camelid_contracts::LoadReport {
        models: state.router.load(),
    })
}

pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
