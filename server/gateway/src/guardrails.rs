//! The guardrail step of the request pipeline: checks that run after validation and before a request is routed
//! to any worker (moderation, keys and limits plug in here). A failing check ends the request with its error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::ApiError;
use crate::validate::Validated;

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send + 'a>>;

/// One check of a validated request.
pub trait Guardrail: Send + Sync {
    /// A short stable name for logs and metrics.
    fn name(&self) -> &'static str;
    fn check<'a>(&'a self, request: &'a Validated) -> CheckFuture<'a>;
}

/// The configured checks, run in order; the first failure wins.
#[derive(Clone, Default)]
pub struct Guardrails(Vec<Arc<dyn Guardrail>>);

impl std::fmt::Debug for Guardrails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|g| g.name())).finish()
    }
}

impl Guardrails {
    pub fn new(checks: Vec<Arc<dyn Guardrail>>) -> Self {
        Self(checks)
    }

    pub async fn check(&self, request: &Validated) -> Result<(), ApiError> {
        for guardrail in &self.0 {
            guardrail.check(request).await?;
        }
        Ok(())
    }
}
