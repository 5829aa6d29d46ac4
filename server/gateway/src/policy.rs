//! The guardrail policy: API keys and moderation profiles, as configured (the `moderation`, `keys` and `keys_file`
//! parts of the config file) and as built for serving. A built [`Policy`] is immutable; a config reload builds a
//! new one and swaps it in, so requests in flight finish under the policy they started with.
//!
//! Moderation is on unless switched off explicitly: the built-in profile `builtin` ([`builtin`]) is the default
//! profile of a config without `moderation`, or whose `moderation` has no `default_profile`; `default_profile: none`
//! leaves models without a profile unmoderated, and `moderation: none` (or `--no-moderation`) has no moderation at
//! all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::keys::{Key, KeySpec, KeyStore};
use crate::moderation::guard::{self, Guard, GuardConfig, GuardPrompt};
use crate::moderation::remote::{Remote, RemoteConfig};
use crate::moderation::rules::{RuleCategories, Rules};
use crate::moderation::{NamedProvider, Profile, Provider, builtin};
use crate::routing::Router;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModerationSpec {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSpec>,
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileSpec>,
    /// The profile of every model without one in `models`: absent, the built-in `builtin`; `none`, no profile.
    pub default_profile: Option<String>,
    /// Model → profile.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// Log the text of flagged requests (off: only categories and the provider are logged).
    #[serde(default)]
    pub log_flagged_text: bool,
    /// `moderation: none`: no moderation at all, not even the built-in default.
    #[serde(skip)]
    pub off: bool,
}

impl ModerationSpec {
    /// No moderation (`moderation: none`, `--no-moderation`).
    pub fn off() -> Self {
        Self {
            off: true,
            ..Self::default()
        }
    }
}

/// Reads the config's `moderation`: a section, `none` (moderation off), or nothing (the built-in default).
pub fn deserialize_moderation<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ModerationSpec>, D::Error> {
    struct Setting;
    impl<'de> Visitor<'de> for Setting {
        type Value = Option<ModerationSpec>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a moderation section, or `none` to switch moderation off")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v == builtin::NONE {
                Ok(Some(ModerationSpec::off()))
            } else {
                Err(E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            ModerationSpec::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(Setting)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderSpec {
    Rules {
        /// A YAML file of category → patterns (relative to the config file).
        file: Option<PathBuf>,
        /// Or the rules inline.
        categories: Option<RuleCategories>,
        #[serde(default)]
        fail_open: bool,
    },
    /// An OpenAI-compatible `/v1/moderations` endpoint.
    Openai {
        url: String,
        /// The environment variable holding its key.
        api_key_env: Option<String>,
        model: Option<String>,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        #[serde(default)]
        thresholds: BTreeMap<String, f64>,
        #[serde(default)]
        fail_open: bool,
    },
    /// Another model served through this gateway, asked Llama-Guard style.
    GuardModel {
        model: String,
        #[serde(default)]
        prompt: PromptSpec,
        #[serde(default)]
        on_unparseable: Unparseable,
        /// Code → category name (default: Llama Guard 3's S1–S14).
        categories: Option<BTreeMap<String, String>>,
        #[serde(default = "default_guard_tokens")]
        max_tokens: u32,
        /// The deadline of one check, every generation of it together; past it the check fails (closed unless
        /// `fail_open`).
        #[serde(default = "default_guard_timeout_ms")]
        timeout_ms: u64,
        /// Quoted characters of a conversation judged in one generation.
        #[serde(default = "default_guard_batch_chars")]
        max_batch_chars: usize,
        /// Generations of one check running at once.
        #[serde(default = "default_guard_concurrency")]
        max_concurrency: usize,
        #[serde(default)]
        fail_open: bool,
    },
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PromptSpec {
    #[default]
    Task,
    Conversation,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Unparseable {
    #[default]
    Flag,
    Error,
}

fn default_timeout_ms() -> u64 {
    2000
}

fn default_guard_tokens() -> u32 {
    16
}

fn default_guard_timeout_ms() -> u64 {
    5000
}

fn default_guard_batch_chars() -> usize {
    16_000
}

fn default_guard_concurrency() -> usize {
    4
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    #[serde(default)]
    pub input: Vec<String>,
    #[serde(default)]
    pub output: Vec<String>,
    #[serde(default = "default_window")]
    pub output_window_chars: usize,
}

fn default_window() -> usize {
    120
}

/// Everything the policy is built from, with file references resolved against the config file's folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicySpec {
    pub moderation: ModerationSpec,
    pub keys: Vec<KeySpec>,
    /// The config's folder, for relative paths.
    pub base: PathBuf,
}

/// The keys and moderation a request is checked against.
#[derive(Debug, Default)]
pub struct Policy {
    /// No keys: anonymous access.
    pub keys: KeyStore,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    pub default_profile: Option<Arc<Profile>>,
    pub model_profiles: BTreeMap<String, Arc<Profile>>,
}

impl Policy {
    /// Builds the policy; every error names the field. `previous` keeps the keys' rate buckets across reloads.
    pub fn build(spec: &PolicySpec, router: &Arc<Router>, previous: Option<&Policy>) -> Result<Self, String> {
        let m = &spec.moderation;
        let (provider_specs, profile_specs) = with_builtin(m)?;
        let mut providers: BTreeMap<&str, NamedProvider> = BTreeMap::new();
        for (name, p) in &provider_specs {
            let at = format!("moderation.providers.{name}");
            let (provider, fail_open) =
                build_provider(p, &spec.base, router).map_err(|e| format!("`{at}`: {e}"))?;
            providers.insert(
                name,
                NamedProvider {
                    name: name.clone(),
                    provider,
                    fail_open,
                },
            );
        }
        let mut profiles = BTreeMap::new();
        for (name, p) in &profile_specs {
            let at = format!("moderation.profiles.{name}");
            let pick = |list: &[String], field: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, n)| {
                        providers
                            .get(n.as_str())
                            .cloned()
                            .ok_or_else(|| format!("`{at}.{field}[{i}]`: no provider named {n:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            if p.output_window_chars < 16 {
                return Err(format!("`{at}.output_window_chars` must be at least 16"));
            }
            let profile = Profile {
                name: name.clone(),
                input: pick(&p.input, "input")?,
                output: pick(&p.output, "output")?,
                output_window_chars: p.output_window_chars,
                log_flagged_text: m.log_flagged_text,
            };
            profiles.insert(name.clone(), Arc::new(profile));
        }
        let find = |name: &str, at: &str| {
            profiles
                .get(name)
                .cloned()
                .ok_or_else(|| format!("`{at}`: no profile named {name:?}"))
        };
        let default_profile = match m.default_profile.as_deref() {
            _ if m.off => None,
            None => Some(find(builtin::PROFILE, "moderation.default_profile")?),
            Some(builtin::NONE) => None,
            Some(name) => Some(find(name, "moderation.default_profile")?),
        };
        let mut model_profiles = BTreeMap::new();
        for (model, name) in &m.models {
            model_profiles.insert(model.clone(), find(name, &format!("moderation.models.{model}"))?);
        }
        for (i, key) in spec.keys.iter().enumerate() {
            if let Some(name) = &key.moderation {
                find(name, &format!("keys[{i}].moderation"))?;
            }
        }
        let keys = KeyStore::new(&spec.keys, previous.map(|p| &p.keys))?;
        Ok(Self {
            keys,
            profiles,
            default_profile,
            model_profiles,
        })
    }

    /// The profile for a request: the key's, else the model's, else the default; none means unmoderated.
    pub fn profile_for(&self, key: Option<&Key>, model: &str) -> Option<Arc<Profile>> {
        key.and_then(|k| k.spec.moderation.as_ref())
            .and_then(|name| self.profiles.get(name).cloned())
            .or_else(|| self.model_profiles.get(model).cloned())
            .or_else(|| self.default_profile.clone())
    }
}

type ProviderSpecs = BTreeMap<String, ProviderSpec>;
type ProfileSpecs = BTreeMap<String, ProfileSpec>;

/// The configured providers and profiles, with the built-in ones added under `builtin` (unless moderation is off
/// or the config has its own of that name).
fn with_builtin(m: &ModerationSpec) -> Result<(ProviderSpecs, ProfileSpecs), String> {
    let (mut providers, mut profiles) = (m.providers.clone(), m.profiles.clone());
    if !m.off {
        if !providers.contains_key(builtin::PROFILE) {
            let rules = ProviderSpec::Rules {
                file: None,
                categories: Some(builtin::categories()?),
                fail_open: false,
            };
            providers.insert(builtin::PROFILE.into(), rules);
        }
        profiles
            .entry(builtin::PROFILE.into())
            .or_insert_with(|| ProfileSpec {
                input: vec![builtin::PROFILE.into()],
                output: vec![builtin::PROFILE.into()],
                output_window_chars: builtin::OUTPUT_WINDOW_CHARS,
            });
    }
    Ok((providers, profiles))
}

fn build_provider(
    p: &ProviderSpec,
    base: &Path,
    router: &Arc<Router>,
) -> Result<(Arc<dyn Provider>, bool), String> {
    Ok(match p {
        ProviderSpec::Rules {
            file,
            categories,
            fail_open,
        } => (
            rules_provider(file.as_deref(), categories.as_ref(), base)?,
            *fail_open,
        ),
        ProviderSpec::Openai {
            url,
            api_key_env,
            model,
            timeout_ms,
            thresholds,
            fail_open,
        } => {
            let config = RemoteConfig {
                url: url.clone(),
                api_key: None,
                model: model.clone(),
                timeout: Duration::from_millis((*timeout_ms).max(1)),
                thresholds: thresholds.clone(),
            };
            (remote_provider(config, api_key_env.as_deref())?, *fail_open)
        }
        ProviderSpec::GuardModel {
            model,
            prompt,
            on_unparseable,
            categories,
            max_tokens,
            timeout_ms,
            max_batch_chars,
            max_concurrency,
            fail_open,
        } => {
            let categories = categories.clone().unwrap_or_else(guard::default_categories);
            let config = GuardConfig {
                model: model.clone(),
                prompt: match prompt {
                    PromptSpec::Task => GuardPrompt::Task,
                    PromptSpec::Conversation => GuardPrompt::Conversation,
                },
                categories,
                flag_unparseable: *on_unparseable == Unparseable::Flag,
                max_tokens: (*max_tokens).clamp(1, 256),
                timeout: Duration::from_millis((*timeout_ms).max(1)),
                max_batch_chars: (*max_batch_chars).max(256),
                max_concurrency: (*max_concurrency).clamp(1, 64),
            };
            (guard_provider(config, router)?, *fail_open)
        }
    })
}

/// A rules provider from exactly one of a rules file (relative to `base`) and inline categories.
fn rules_provider(
    file: Option<&Path>,
    categories: Option<&RuleCategories>,
    base: &Path,
) -> Result<Arc<dyn Provider>, String> {
    let rules = match (file, categories) {
        (Some(file), None) => {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("`file`: reading {}: {e}", path.display()))?;
            let de = serde_yaml_ng::Deserializer::from_str(&text);
            let rules: RuleFile = serde_path_to_error::deserialize(de)
                .map_err(|e| format!("{}: `{}`: {}", path.display(), e.path(), e.inner()))?;
            Rules::new(&rules.categories).map_err(|e| format!("{}: categories: {e}", path.display()))?
        }
        (None, Some(categories)) => Rules::new(categories).map_err(|e| format!("`categories`: {e}"))?,
        _ => return Err("a rules provider needs exactly one of `file` and `categories`".into()),
    };
    Ok(Arc::new(rules))
}

/// An OpenAI-compatible moderation endpoint; its key is read from the environment variable `api_key_env`.
fn remote_provider(mut config: RemoteConfig, api_key_env: Option<&str>) -> Result<Arc<dyn Provider>, String> {
    let url = &config.url;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("`url` must start with http:// or https://, got {url:?}"));
    }
    if let Some((c, t)) = config.thresholds.iter().find(|(_, t)| !(0.0..=1.0).contains(*t)) {
        return Err(format!("`thresholds.{c}` must be in [0, 1], got {t}"));
    }
    config.api_key = match api_key_env {
        Some(var) => Some(
            std::env::var(var)
                .map_err(|_| format!("`api_key_env`: the environment variable {var} is not set"))?,
        ),
        None => None,
    };
    Ok(Arc::new(Remote::new(config)?))
}

/// A guard model served by this gateway's own router; its category codes are upper case without commas.
fn guard_provider(config: GuardConfig, router: &Arc<Router>) -> Result<Arc<dyn Provider>, String> {
    if config.categories.is_empty() {
        return Err("`categories` is empty".into());
    }
    if let Some(code) = config
        .categories
        .keys()
        .find(|c| c.to_ascii_uppercase() != **c || c.contains(','))
    {
        return Err(format!(
            "`categories`: codes are upper case without commas, got {code:?}"
        ));
    }
    Ok(Arc::new(Guard::new(config, router.clone())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    categories: RuleCategories,
}

/// The policy in force, swapped whole on reload.
#[derive(Debug, Default)]
pub struct PolicyCell(RwLock<Arc<Policy>>);

impl PolicyCell {
    pub fn new(policy: Policy) -> Self {
        Self(RwLock::new(Arc::new(policy)))
    }

    pub fn current(&self) -> Arc<Policy> {
        match self.0.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, policy: Policy) {
        match self.0.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
    }
}
