//! What every handler shares about one request: authenticating its key (counting refusals), reading its body
//! under the size limit, and the metrics that follow it ([`RequestRecord`] for the request as a whole,
//! [`InFlightGauge`] while it runs). Below the handlers, so that [`super::chat`], [`super::respond`] and
//! [`super::moderations`] use it without using each other.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;
use crate::keys::Key;
use crate::metrics::{Metrics, ModelLabels, RefusalLabels, RequestLabels, RouteLabels};
use crate::policy::Policy;
use crate::state::AppState;
use crate::tokens::Charge;

/// Times a whole request and records it once, under a bounded model label.
pub(crate) struct RequestRecord {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) model: String,
    pub(crate) route: &'static str,
    pub(crate) received: Instant,
    /// The tokens reserved against the key's `tokens_per_minute`; settled with the worker's count when the record
    /// is dropped (the request's end).
    pub(crate) charge: Option<Charge>,
}

impl RequestRecord {
    /// The tokens the worker reports as used so far (prompt plus generated).
    pub(crate) fn used_tokens(&self, prompt: usize, completion: usize) {
        if let Some(charge) = &self.charge {
            charge.set_used(prompt.saturating_add(completion));
        }
    }

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

/// Reads the whole body, up to `limit` bytes, within the body timeout [`super::guard`] set on it.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let shown = e.to_string();
        if shown.contains("length limit") {
            ApiError::too_large(limit)
        } else if shown.contains(super::guard::BODY_TIMEOUT) {
            ApiError::body_timeout()
        } else {
            ApiError::malformed_json(format!("could not read the body: {e}"))
        }
    })
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
