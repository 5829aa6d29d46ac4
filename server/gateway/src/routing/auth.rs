//! The gateway's half of worker authentication ([`camelid_contracts::worker_auth`]): it holds the install-wide
//! secret and sends each model's workers the token derived for that model, so a worker serves only gateways of its
//! own install, and a tenant's token opens no other tenant's workers.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use camelid_contracts::worker_auth;

/// A worker client that sends its model's token on every call.
pub type WorkerClient = camelid_proto::v1::worker_client::WorkerClient<InterceptedService<Channel, Bearer>>;

/// The install-wide secret, or none (workers on loopback, or run without authentication).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerSecret(Option<worker_auth::InstallSecret>);

impl WorkerSecret {
    /// A secret checked for length ([`worker_auth::InstallSecret::new`]).
    pub fn new(secret: &str) -> Result<Self, String> {
        Ok(Self(Some(worker_auth::InstallSecret::new(secret)?)))
    }

    /// The secret in [`worker_auth::SECRET_ENV`], or none when it is unset or empty.
    pub fn from_env() -> Result<Self, String> {
        Ok(Self(worker_auth::InstallSecret::from_env()?))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// What calls to `model`'s workers carry.
    pub fn bearer(&self, model: &str) -> Bearer {
        let value = self.0.as_ref().and_then(|secret| {
            let token = secret.token_for(model);
            // Hex is always a valid header value.
            worker_auth::bearer(&token).parse().ok()
        });
        Bearer(value)
    }
}

/// Adds a model's token to each call (nothing when there is no secret).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(..)")
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert(worker_auth::METADATA_KEY, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_model_gets_its_own_token_and_none_without_a_secret() {
        let secret = WorkerSecret::new("0123456789abcdef0123456789abcdef").unwrap();
        let header = |b: Bearer| b.0.map(|v| v.to_str().unwrap().to_string());
        let a = header(secret.bearer("team-a/smol")).unwrap();
        let expected = worker_auth::token_for(b"0123456789abcdef0123456789abcdef", "team-a/smol");
        assert!(worker_auth::is_authorized(Some(&a), &expected));
        assert_ne!(Some(a), header(secret.bearer("team-b/smol")));
        assert_eq!(header(WorkerSecret::default().bearer("team-a/smol")), None);
        assert!(WorkerSecret::new("short").is_err());
    }
}
