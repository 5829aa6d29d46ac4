//! The operator's errors, each with a stable category for metrics and logs.

use kube::runtime::controller::Action;

use crate::finetunejob::build::BuildError;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building children: {0}")]
    Build(#[from] BuildError),
    /// The spec asks for something that cannot be done; retrying will not help until it changes.
    #[error("invalid spec: {0}")]
    Invalid(String),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => "invalid_spec",
            Error::Kube(_) => "api",
            Error::Build(_) | Error::Invalid(_) => "invalid_spec",
        }
    }

    /// Retrying cannot help until the object changes.
    pub fn is_invalid_spec(&self) -> bool {
        self.category() == "invalid_spec"
    }

    /// What a controller does after this error reconciling `kind` `name`: counted and logged; an invalid spec
    /// waits for a change, anything else is retried in 5 s.
    pub fn retry_policy(&self, kind: &str, name: &str, metrics: &Metrics) -> Action {
        metrics.reconcile_error(self.category());
        tracing::warn!(kind, name, category = self.category(), error = %self, "reconcile failed");
        if self.is_invalid_spec() {
            Action::await_change()
        } else {
            Action::requeue(std::time::Duration::from_secs(5))
        }
    }
}
