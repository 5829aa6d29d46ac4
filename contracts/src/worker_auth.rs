//! How a gateway proves to a ChatModel's workers that it may use them, defined once for the three processes
//! involved: the operator (which hands each ChatModel's workers their token), the workers (which check it on every
//! gRPC call) and the gateway (which derives the same token and sends it).
//!
//! One install-wide secret (the chart's Secret, in the environment variable [`SECRET_ENV`] of the operator and the
//! gateway) never leaves the install's own namespace. Each ChatModel's workers get only their own token, an
//! HMAC-SHA256 of the model's `NAMESPACE/NAME` under that secret, in a Secret in the ChatModel's namespace. A
//! tenant who can read its namespace's Secrets learns its own model's token and nothing that lets it call another
//! namespace's workers: without the install's secret no other token can be derived.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The install-wide secret, in the operator's and the gateway's environment.
pub const SECRET_ENV: &str = "CAMELID_WORKER_SECRET";
/// A worker's own token, in its environment (from the Secret [`token_secret_name`]).
pub const TOKEN_ENV: &str = "CAMELID_WORKER_TOKEN";
/// The key of the token in the per-ChatModel Secret.
pub const TOKEN_KEY: &str = "token";
/// The gRPC metadata the token travels in, as `Bearer <token>`.
pub const METADATA_KEY: &str = "authorization";
/// Fewest bytes the install-wide secret may have: shorter ones are guessable.
pub const MIN_SECRET_BYTES: usize = 16;

/// Separates these tokens from any other use of the same secret (and lets a later scheme change them).
const DOMAIN: &[u8] = b"camelid-worker-v1\0";

/// The Secret, in a ChatModel's namespace, holding its workers' token.
pub fn token_secret_name(chatmodel: &str) -> String {
    format!("{chatmodel}-worker-token")
}

/// The token of the workers serving `model` (`NAMESPACE/NAME` in a cluster, the served name locally): lowercase
/// hex of HMAC-SHA256(secret, domain ‖ model).
pub fn token_for(secret: &[u8], model: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(DOMAIN);
    mac.update(model.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The metadata value a gateway sends.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Whether the `authorization` value a worker received carries `expected`, compared in constant time so that a
/// caller learns nothing from how long a wrong token takes to refuse.
pub fn is_authorized(presented: Option<&str>, expected: &str) -> bool {
    let Some(token) = presented.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    bool::from(token.as_bytes().ct_eq(expected.as_bytes()))
}

/// The install-wide secret, checked for length, with a `Debug` that never shows it (it sits in settings that are
/// logged).
#[derive(Clone, PartialEq, Eq)]
pub struct InstallSecret(String);

impl std::fmt::Debug for InstallSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstallSecret(<redacted>)")
    }
}

impl InstallSecret {
    /// Refuses a secret shorter than [`MIN_SECRET_BYTES`] (surrounding whitespace, as a file's newline, ignored).
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "{SECRET_ENV} has {} bytes; it needs at least {MIN_SECRET_BYTES} (the chart generates 48)",
                secret.len()
            ));
        }
        Ok(Self(secret.to_string()))
    }

    /// The secret in [`SECRET_ENV`], or `None` when that is unset or empty.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var(SECRET_ENV) {
            Ok(s) if !s.trim().is_empty() => Self::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// The token of `model`'s workers.
    pub fn token_for(&self, model: &str) -> String {
        token_for(self.0.as_bytes(), model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_by_model_and_secret_and_are_stable() {
        let secret = b"0123456789abcdef0123";
        let a = token_for(secret, "team-a/smol");
        assert_eq!(a, token_for(secret, "team-a/smol"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, token_for(secret, "team-b/smol"));
        assert_ne!(a, token_for(b"another secret, 20 bytes", "team-a/smol"));
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let token = token_for(b"0123456789abcdef", "ns/m");
        assert!(is_authorized(Some(&bearer(&token)), &token));
        assert!(!is_authorized(None, &token));
        assert!(!is_authorized(Some(&token), &token), "without the Bearer scheme");
        assert!(!is_authorized(Some("Bearer "), &token));
        assert!(!is_authorized(Some(&bearer(&token[..63])), &token));
        let other = token_for(b"0123456789abcdef", "ns/other");
        assert!(!is_authorized(Some(&bearer(&other)), &token));
    }

    #[test]
    fn short_secrets_are_refused_and_none_is_ever_printed() {
        assert!(InstallSecret::new("short").is_err());
        let secret = InstallSecret::new("  0123456789abcdef\n").unwrap();
        assert_eq!(secret.token_for("m"), token_for(b"0123456789abcdef", "m"));
        assert!(!format!("{secret:?}").contains("0123"));
    }
}
