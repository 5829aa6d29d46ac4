//! Holding requests while a model scales from zero: the [`HoldLimits`] a request waits under, the [`Held`] guard
//! that counts it (per model, for `/internal/load`, and over all models, against `max_requests`), and waiting
//! until the [`Router`] sees a ready worker. The router's probes wake held requests through its readiness signal.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::router::Router;
use crate::error::{ApiError, HoldFull};
use crate::metrics::ModelLabels;

/// How requests wait for a model that has no ready worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Longest a request waits; then 503 with `Retry-After`.
    pub timeout: Duration,
    /// Most requests waiting at once, over all models; more get 503 at once.
    pub max_requests: usize,
    /// How often a waiting stream gets an SSE comment, so proxies and clients keep it open.
    pub keepalive: Duration,
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(180),
            max_requests: 1000,
            keepalive: Duration::from_secs(10),
        }
    }
}

/// Counts a request as held for its model (and its key) while it lives.
#[derive(Debug)]
pub struct Held {
    router: Arc<Router>,
    model: String,
    /// The key's name, counted against its share of the queue.
    holder: Option<String>,
}

impl Held {
    /// Waits, counted as held, until the model has a ready worker; past `timeout`, 503 `model_starting`.
    pub async fn until_ready(self, timeout: Duration) -> Result<(), ApiError> {
        if self.router.wait_ready(&self.model, timeout).await {
            Ok(())
        } else {
            Err(ApiError::model_starting(&self.model, timeout))
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.router.held_total.fetch_sub(1, Ordering::Relaxed);
        self.router
            .metrics
            .held
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .dec();
        if let Ok(mut held) = self.router.held.lock()
            && let Some(n) = held.get_mut(&self.model)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.model);
            }
        }
        if let Some(holder) = &self.holder
            && let Ok(mut by) = self.router.held_by.lock()
            && let Some(n) = by.get_mut(holder)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(holder);
            }
        }
    }
}

impl Router {
    /// Counts a request as waiting for `model`; 503 `too_many_waiting` when `limit` requests already wait, or
    /// when `holder` (the key's name) already has `per_holder` of them: one tenant cannot fill the queue that
    /// every tenant's cold starts share.
    pub fn hold(
        self: &Arc<Self>,
        model: &str,
        limit: usize,
        holder: Option<&str>,
        per_holder: usize,
    ) -> Result<Held, ApiError> {
        if let Some(holder) = holder {
            let mut by = self
                .held_by
                .lock()
                .map_err(|_| ApiError::too_many_waiting(model, HoldFull::Gateway))?;
            let n = by.entry(holder.to_string()).or_default();
            if *n >= per_holder {
                if *n == 0 {
                    by.remove(holder);
                }
                return Err(ApiError::too_many_waiting(model, HoldFull::Key));
            }
            *n += 1;
        }
        let total = self.held_total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut held) = self.held.lock() {
            *held.entry(model.to_string()).or_default() += 1;
        }
        self.metrics
            .held
            .get_or_create(&ModelLabels { model: model.into() })
            .inc();
        // From here on, dropping `held` undoes every count above.
        let held = Held {
            router: self.clone(),
            model: model.to_string(),
            holder: holder.map(str::to_string),
        };
        if total >= limit {
            drop(held);
            return Err(ApiError::too_many_waiting(model, HoldFull::Gateway));
        }
        Ok(held)
    }

    /// Waits until `model` has a ready worker, or `timeout` passes (then `false`).
    pub async fn wait_ready(&self, model: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.readiness.subscribe();
        loop {
            if self.has_ready(model) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.has_ready(model),
            }
        }
    }
}
