//! API keys: bearer keys stored only as SHA-256 hashes, looked up with a constant-time comparison against every
//! entry, each with its allowed models, request rate per minute (`governor`'s GCRA bucket, a minute's worth of
//! burst), token rate per minute (a [`TokenBucket`] that takes back what a request did not use) and moderation
//! profile. Two entries with one hash are refused: the later would decide, so a copy could undo a revocation. Keys never appear in logs: only the entry's name does.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::tokens::{Charge, Refused, TokenBucket};

/// One key as configured (in the config file's `keys`, or a keys file such as a mounted Kubernetes Secret).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Who the key belongs to: shown in logs and metrics instead of the key.
    pub name: String,
    /// Hex SHA-256 of the key (`camelid-gateway new-key` prints a key and its hash).
    pub sha256: String,
    /// Models the key may use; all when absent.
    pub models: Option<Vec<String>>,
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute: an upper bound of the prompt ([`crate::tokens::prompt_bound`]) plus `max_tokens` are
    /// reserved at admission, and what the worker did not use is given back at the end.
    pub tokens_per_minute: Option<NonZeroU32>,
    /// `max_tokens` for this key's requests that set none (sent to the worker, so a generation never runs to the
    /// end of the context unasked); the gateway's `limits.default_max_tokens` when absent.
    pub default_max_tokens: Option<NonZeroU32>,
    /// The moderation profile for this key's requests (instead of the model's).
    pub moderation: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug)]
struct Limiters {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<Arc<TokenBucket>>,
}

/// A configured key.
#[derive(Debug)]
pub struct Key {
    pub spec: KeySpec,
    hash: [u8; 32],
    limiters: Arc<Limiters>,
}

impl Key {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// 403 unless the key may use `model` (a served id: a ChatModel's is `NAMESPACE/NAME`). An entry `NAME`
    /// allows that name in any namespace; `NAMESPACE/NAME` only that one.
    pub fn allow_model(&self, model: &str) -> Result<(), ApiError> {
        let bare = model.rsplit_once('/').map_or(model, |(_, name)| name);
        match &self.spec.models {
            Some(models)
                if !models
                    .iter()
                    .any(|m| m == model || m == "*" || (!m.contains('/') && m == bare)) =>
            {
                Err(ApiError::model_not_allowed(model))
            }
            _ => Ok(()),
        }
    }

    /// Takes one request from the key's request rate; 429 with the wait when it is used up.
    pub fn take_request(&self) -> Result<(), ApiError> {
        if let Some(limiter) = &self.limiters.requests {
            limiter.check().map_err(|not_until| {
                ApiError::rate_limited(
                    "requests per minute",
                    not_until.wait_time_from(DefaultClock::default().now()),
                )
            })?;
        }
        Ok(())
    }

    /// The key's tokens-per-minute bucket, if it has a token rate.
    pub fn token_bucket(&self) -> Option<&Arc<TokenBucket>> {
        self.limiters.tokens.as_ref()
    }

    /// Reserves `tokens` (an upper bound of the request) from the key's token rate: the [`Charge`] settles with
    /// the real use when dropped; `None` when the key has no token rate. 429 with the wait, or 400 when one
    /// request could never fit.
    pub fn reserve_tokens(&self, tokens: u32) -> Result<Option<Charge>, ApiError> {
        let Some(bucket) = &self.limiters.tokens else {
            return Ok(None);
        };
        match bucket.take(tokens) {
            Ok(()) => Ok(Some(Charge::new(bucket.clone(), tokens))),
            Err(Refused::Later(wait)) => Err(ApiError::rate_limited("tokens per minute", wait)),
            Err(Refused::Never) => Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "this request may use up to {tokens} tokens (its prompt's bound plus `max_tokens`), more than \
                     this key's tokens_per_minute ({}); lower `max_tokens` or shorten the prompt",
                    bucket.per_minute()
                ),
            )),
        }
    }
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: Vec<Arc<Key>>,
}

impl KeyStore {
    /// Builds the store, keeping the rate buckets of keys whose name and rates did not change since `previous` (so
    /// a reload does not hand out a fresh minute). Errors name the entry.
    pub fn new(specs: &[KeySpec], previous: Option<&KeyStore>) -> Result<Self, String> {
        let mut keys: Vec<Arc<Key>> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let at = format!("keys[{i}]");
            if spec.name.trim().is_empty() {
                return Err(format!("`{at}.name` is empty"));
            }
            if keys.iter().any(|k| k.spec.name == spec.name) {
                return Err(format!("`{at}.name`: {:?} is used twice", spec.name));
            }
            let bytes = hex::decode(spec.sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("`{at}.sha256` must be 64 hex digits (the SHA-256 of the key)"))?;
            if let Some((j, other)) = keys.iter().enumerate().find(|(_, k)| k.hash == bytes) {
                return Err(format!(
                    "`{at}.sha256`: the same key as `keys[{j}]` ({:?}); one key must have one entry, or a copy \
                     could undo its revocation",
                    other.spec.name
                ));
            }
            let reused = previous.and_then(|p| {
                p.keys.iter().find(|k| {
                    k.spec.name == spec.name
                        && k.spec.requests_per_minute == spec.requests_per_minute
                        && k.spec.tokens_per_minute == spec.tokens_per_minute
                })
            });
            let limiters = match reused {
                Some(k) => k.limiters.clone(),
                None => Arc::new(Limiters {
                    requests: spec
                        .requests_per_minute
                        .map(|n| RateLimiter::direct(Quota::per_minute(n))),
                    tokens: spec.tokens_per_minute.map(|n| Arc::new(TokenBucket::new(n))),
                }),
            };
            keys.push(Arc::new(Key {
                spec: spec.clone(),
                hash: bytes,
                limiters,
            }));
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name())
    }

    /// The key of an `Authorization: Bearer …` header: 401 when missing, unknown or revoked. The hash of the
    /// presented key is compared in constant time with every entry, so timing tells nothing about which matched.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Key>, ApiError> {
        let Some(header) = authorization else {
            return Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                let (scheme, key) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <key>`"))?;
        let hash = hash_key(presented);
        let mut found: Option<&Arc<Key>> = None;
        for key in &self.keys {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some(key);
            }
        }
        match found {
            None => Err(ApiError::unauthorized("invalid API key")),
            Some(key) if key.spec.revoked => Err(ApiError::unauthorized("this API key has been revoked")),
            Some(key) => Ok(key.clone()),
        }
    }
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key (244 bits from the OS) and its hex SHA-256, for `camelid-gateway new-key`.
pub fn new_key() -> (String, String) {
    let key = format!(
        "sk-camelid-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let hash = hex::encode(hash_key(&key));
    (key, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, key: &str) -> KeySpec {
        KeySpec {
            name: name.into(),
            sha256: hex::encode(hash_key(key)),
            models: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            default_max_tokens: None,
            moderation: None,
            revoked: false,
        }
    }

    #[test]
    fn keys_authenticate_by_hash_and_bad_ones_are_401() {
        let mut revoked = spec("old", "sk-old");
        revoked.revoked = true;
        let store = KeyStore::new(&[spec("alice", "sk-alice"), revoked], None).unwrap();
        assert_eq!(
            store.authenticate(Some(b"Bearer sk-alice")).unwrap().name(),
            "alice"
        );
        assert_eq!(
            store.authenticate(Some(b"bearer  sk-alice ")).unwrap().name(),
            "alice"
        );
        for (header, why) in [
            (None, "missing"),
            (Some(&b"sk-alice"[..]), "Bearer"),
            (Some(b"Basic sk-alice"), "Bearer"),
            (Some(b"Bearer "), "Bearer"),
            (Some(b"Bearer sk-bob"), "invalid"),
            (Some(b"Bearer sk-old"), "revoked"),
            (Some(b"Bearer \xff\xfe"), "Bearer"),
        ] {
            let e = store.authenticate(header).unwrap_err();
            assert_eq!(e.status.as_u16(), 401, "{header:?}");
            assert!(e.message.contains(why), "{header:?}: {}", e.message);
            assert!(
                !e.message.contains("sk-"),
                "the key is never echoed: {}",
                e.message
            );
        }
    }

    #[test]
    fn bad_entries_name_the_field() {
        let mut bad = spec("a", "k");
        bad.sha256 = "abc".into();
        assert!(
            KeyStore::new(&[bad], None)
                .unwrap_err()
                .contains("keys[0].sha256")
        );
        let e = KeyStore::new(&[spec("a", "k"), spec("a", "j")], None).unwrap_err();
        assert!(e.contains("keys[1].name"), "{e}");
    }

    /// The attack: a revoked key's hash copied into a second, live entry (a keys file merged with the config's
    /// `keys`), hoping the copy wins. The store refuses it, naming both entries.
    #[test]
    fn a_duplicate_hash_cannot_override_a_revocation() {
        let mut revoked = spec("old", "sk-old");
        revoked.revoked = true;
        let copy = spec("old-copy", "sk-old");
        let e = KeyStore::new(&[revoked, copy], None).unwrap_err();
        assert!(
            e.contains("keys[1].sha256") && e.contains("keys[0]") && e.contains("old"),
            "{e}"
        );
    }

    #[test]
    fn models_are_allowed_by_list() {
        let mut s = spec("a", "k");
        s.models = Some(vec!["smol".into()]);
        let store = KeyStore::new(&[s], None).unwrap();
        let key = store.authenticate(Some(b"Bearer k")).unwrap();
        assert!(key.allow_model("smol").is_ok());
        assert_eq!(key.allow_model("big").unwrap_err().status.as_u16(), 403);
    }

    #[test]
    fn rates_run_out_and_reloads_keep_the_buckets() {
        let mut s = spec("a", "k");
        s.requests_per_minute = NonZeroU32::new(3);
        s.tokens_per_minute = NonZeroU32::new(100);
        let store = KeyStore::new(std::slice::from_ref(&s), None).unwrap();
        let key = store.authenticate(Some(b"Bearer k")).unwrap();
        for _ in 0..3 {
            key.take_request().unwrap();
        }
        let e = key.take_request().unwrap_err();
        assert_eq!(e.status.as_u16(), 429);
        assert!(
            e.retry_after.is_some_and(|s| (1..=20).contains(&s)),
            "{:?}",
            e.retry_after
        );
        let held = key.reserve_tokens(60).unwrap();
        assert_eq!(key.reserve_tokens(60).unwrap_err().status.as_u16(), 429);
        assert_eq!(key.reserve_tokens(101).unwrap_err().status.as_u16(), 400);
        drop(held);
        let again = key.reserve_tokens(60);
        assert!(again.is_ok(), "an unused reservation is given back");
        let reloaded = KeyStore::new(&[s], Some(&store)).unwrap();
        let key = reloaded.authenticate(Some(b"Bearer k")).unwrap();
        assert_eq!(
            key.take_request().unwrap_err().status.as_u16(),
            429,
            "a reload is not a fresh minute"
        );
    }

    /// The example key files hold hashes of random keys nobody has: none is the hash of a word someone would try
    /// (its own name among them), so copying the example opens no door.
    #[test]
    fn example_keys_are_not_guessable_words() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let text = std::fs::read_to_string(root.join("examples/gateway/keys.yaml")).unwrap();
        let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let entries = file["keys"].as_sequence().unwrap();
        let common = [
            "alice", "bob", "carol", "admin", "demo", "test", "secret", "password", "changeme", "key",
        ];
        for entry in entries {
            let name = entry["name"].as_str().unwrap();
            let hash = entry["sha256"].as_str().unwrap();
            for word in common.iter().copied().chain([name]) {
                for guess in [
                    word.to_string(),
                    format!("sk-{word}"),
                    format!("sk-camelid-{word}"),
                ] {
                    assert_ne!(
                        hex::encode(hash_key(&guess)),
                        hash,
                        "the key of {name} is {guess:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn new_keys_are_random_and_hash_to_their_entry() {
        let (k1, h1) = new_key();
        let (k2, _) = new_key();
        assert_ne!(k1, k2);
        assert!(k1.len() > 70);
        assert_eq!(hex::encode(hash_key(&k1)), h1);
    }
}
