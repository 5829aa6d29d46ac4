//! Operator-wide settings (images, the termination grace period, the policy) that the children of both controllers depend
//! on. At the crate root because neither controller owns them: `run` fills them from the command line once and
//! hands a copy to each controller.

/// Operator-wide settings the children depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The trainer image when a job names none.
    pub trainer_image: String,
    /// The image that downloads a model given by URI.
    pub fetch_image: String,
    /// Seconds between SIGTERM and SIGKILL: the trainer writes its termination checkpoint in this time.
    pub termination_grace_seconds: i64,
    /// The worker image when a ChatModel names none.
    pub worker_image: String,
    /// The image of a FineTuneJob's evaluation pod (`camelid serve` for both models, `camelid eval gate`) when
    /// its `evaluation.image` is unset.
    pub eval_image: String,
    /// What specs may choose for the pods (images, priority classes, tolerations, model downloads).
    pub policy: crate::policy::Policy,
    /// The install's secret workers' tokens derive from (the gateway has the same); without it, workers run
    /// without authentication, and say so on their command line.
    pub worker_secret: Option<camelid_contracts::worker_auth::InstallSecret>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trainer_image: "ghcr.io/camelid-dev/camelid-trainer:0.1.0".into(),
            fetch_image: "curlimages/curl:8.11.1".into(),
            termination_grace_seconds: 180,
            worker_image: "ghcr.io/camelid-dev/camelid-worker:0.1.0".into(),
            // The worker image has the `camelid` command too.
            eval_image: "ghcr.io/camelid-dev/camelid-worker:0.1.0".into(),
            policy: crate::policy::Policy::default(),
            worker_secret: None,
        }
    }
}
