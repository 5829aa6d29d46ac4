//! The operator's errors, each with a stable category for metrics and logs: [`Error`] for a reconcile (a foreign
//! object in a child's place included), and [`BuildError`] for building the children of either controller's
//! objects.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building children: {0}")]
    Build(#[from] BuildError),
    /// The spec asks for something that cannot be done; retrying will not help until it changes.
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// A child's name is taken by an object this resource does not control: the operator neither applies over
    /// it nor deletes it, and looks again later (it may be deleted or renamed).
    #[error(
        "{kind} {name} already exists and is not controlled by this {owner}: rename one of them or delete it"
    )]
    NotOwned {
        kind: String,
        name: String,
        owner: String,
    },
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => "invalid_spec",
            Error::Kube(_) => "api",
            Error::Build(e) => e.category(),
            Error::Invalid(_) => "invalid_spec",
            Error::NotOwned { .. } => "not_owned",
        }
    }

    /// Retrying cannot help until the object changes.
    pub fn is_invalid_spec(&self) -> bool {
        self.category() == "invalid_spec"
    }
}

/// Why the children of a FineTuneJob or ChatModel could not be built (pure; no API calls).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// The object has no UID yet (not read from the API server), so children cannot be owned by it.
    #[error("the object has no uid; its children need an owner reference")]
    NoOwner,
    /// The trainer's settings cannot be written as flags (a path that is not UTF-8).
    #[error("the trainer settings cannot be written as flags: {0}")]
    Settings(String),
}

impl BuildError {
    pub fn category(&self) -> &'static str {
        match self {
            BuildError::NoOwner | BuildError::Settings(_) => "invalid_spec",
        }
    }
}
