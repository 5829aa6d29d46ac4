//! The gateway's configuration: flags, or a YAML file, validated at start with errors that name the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keys::KeySpec;
use crate::policy::{ModerationSpec, PolicySpec, ProviderSpec};
use crate::routing::{Endpoints, HoldLimits, MigrationLimits};
use crate::serve::ServerLimits;
use crate::validate::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("--backend {value:?}: {message}")]
    Backend { value: String, message: String },
}

/// Everything the gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Where `/metrics` and `/internal/load` are served (never on `listen`): loopback by default, all interfaces
    /// in a cluster (the operator and Prometheus read it).
    pub admin_listen: SocketAddr,
    /// Connection limits: header timeout (also the keep-alive idle timeout) and most connections open.
    pub server: ServerLimits,
    pub endpoints: Endpoints,
    /// Where each model's LoRA adapters load from: model → adapter name → directory on its workers.
    pub adapters: crate::routing::adapters::AdapterSources,
    pub limits: Limits,
    pub probe_interval: Duration,
    /// How requests wait for a model with no ready worker.
    pub hold: HoldLimits,
    /// Most held requests of one key (`hold.max_requests_per_key`; a quarter of `hold.max_requests` by default).
    pub hold_per_key: usize,
    /// How far a generation follows its workers when one drains or dies mid-answer.
    pub migration: MigrationLimits,
    /// Keys and moderation.
    pub policy: PolicySpec,
    /// Serve without keys on a non-loopback address.
    pub allow_anonymous: bool,
    /// The install-wide secret workers' tokens derive from (never in the YAML: from the environment, see
    /// [`crate::routing::WorkerSecret::from_env`]).
    pub worker_secret: crate::routing::WorkerSecret,
    /// The files this config was read from (the config file, its keys file and rules files), watched for reloads.
    pub files: Vec<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], camelid_contracts::names::GATEWAY_PORT)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], camelid_contracts::names::GATEWAY_ADMIN_PORT)),
            server: ServerLimits::default(),
            endpoints: Endpoints::new(),
            adapters: Default::default(),
            limits: Limits::default(),
            probe_interval: Duration::from_secs(2),
            hold: HoldLimits::default(),
            hold_per_key: HoldLimits::default().max_requests / 4,
            migration: MigrationLimits::default(),
            policy: PolicySpec::default(),
            allow_anonymous: false,
            worker_secret: Default::default(),
            files: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_body_bytes: Option<usize>,
    max_messages: Option<usize>,
    max_prompt_chars: Option<usize>,
    default_max_tokens: Option<u32>,
    body_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    header_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHold {
    timeout_ms: Option<u64>,
    max_requests: Option<usize>,
    max_requests_per_key: Option<usize>,
    keepalive_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMigration {
    max_per_request: Option<u32>,
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Holding requests for a model with no ready worker (scaled to zero, or starting).
    hold: Option<FileHold>,
    /// Continuing generations on another worker when theirs drains or dies.
    migration: Option<FileMigration>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    /// Connection limits.
    server: Option<FileServer>,
    /// Model name → worker addresses.
    #[serde(default)]
    models: Endpoints,
    /// Model name → LoRA adapter name → its directory as the model's workers see it (loaded on demand).
    #[serde(default)]
    adapters: crate::routing::adapters::AdapterSources,
    limits: Option<FileLimits>,
    probe_interval_ms: Option<u64>,
    /// A moderation section, or `none` for no moderation; absent: the built-in profile (see [`crate::policy`]).
    #[serde(default, deserialize_with = "crate::policy::deserialize_moderation")]
    moderation: Option<ModerationSpec>,
    /// API keys inline.
    keys: Option<Vec<KeySpec>>,
    /// A YAML file with `keys: [...]` (for example a mounted Kubernetes Secret), relative to this file.
    keys_file: Option<PathBuf>,
    allow_anonymous: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeySpec>,
}

/// Parses YAML, errors naming the file and the field.
fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
        path: shown,
        message: format!("`{}`: {}", e.path(), e.inner()),
    })
}

impl GatewayConfig {
    /// Reads a YAML config file (unknown keys are errors, so typos do not pass silently).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let file: File = read_yaml(path)?;
        let mut config = Self::default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.files.push(path.to_path_buf());
        let mut keys = file.keys.unwrap_or_default();
        if let Some(keys_file) = &file.keys_file {
            let keys_path = base.join(keys_file);
            let more: KeysFile = read_yaml(&keys_path)?;
            keys.extend(more.keys);
            config.files.push(keys_path);
        }
        let moderation = file.moderation.unwrap_or_default();
        for provider in moderation.providers.values() {
            if let ProviderSpec::Rules { file: Some(f), .. } = provider {
                config.files.push(base.join(f));
            }
        }
        config.policy = PolicySpec {
            moderation,
            keys,
            base,
        };
        config.allow_anonymous = file.allow_anonymous.unwrap_or(false);
        if let Some(listen) = file.listen {
            config.listen = listen;
        }
        if let Some(admin) = file.admin_listen {
            config.admin_listen = admin;
        }
        if let Some(server) = file.server {
            let d = config.server;
            config.server = ServerLimits {
                header_timeout: server
                    .header_timeout_ms
                    .map_or(d.header_timeout, |ms| Duration::from_millis(ms.max(100))),
                max_connections: server.max_connections.unwrap_or(d.max_connections).max(1),
            };
        }
        if let Some(l) = file.limits {
            let d = config.limits;
            // Never above what a worker takes (a character is at most 4 bytes), so that a request the gateway
            // admits is one the worker serves.
            let worker = camelid_contracts::worker_limits::MAX_PROMPT_BYTES / 4;
            config.limits = Limits {
                max_body_bytes: l.max_body_bytes.unwrap_or(d.max_body_bytes),
                max_messages: l
                    .max_messages
                    .unwrap_or(d.max_messages)
                    .min(camelid_contracts::worker_limits::MAX_MESSAGES),
                max_prompt_chars: l.max_prompt_chars.unwrap_or(d.max_prompt_chars).min(worker),
                default_max_tokens: l.default_max_tokens.unwrap_or(d.default_max_tokens).max(1),
                body_timeout: l
                    .body_timeout_ms
                    .map_or(d.body_timeout, |ms| Duration::from_millis(ms.max(100))),
                ..d
            };
        }
        if let Some(ms) = file.probe_interval_ms {
            config.probe_interval = Duration::from_millis(ms.max(50));
        }
        if let Some(h) = file.hold {
            let d = config.hold;
            config.hold = HoldLimits {
                timeout: h.timeout_ms.map_or(d.timeout, Duration::from_millis),
                max_requests: h.max_requests.unwrap_or(d.max_requests),
                keepalive: h
                    .keepalive_ms
                    .map_or(d.keepalive, |ms| Duration::from_millis(ms.max(100))),
            };
            config.hold_per_key = h
                .max_requests_per_key
                .unwrap_or(config.hold.max_requests / 4)
                .max(1);
        }
        if let Some(m) = file.migration {
            let d = config.migration;
            config.migration = MigrationLimits {
                max_per_request: m.max_per_request.unwrap_or(d.max_per_request),
                wait: m.wait_ms.map_or(d.wait, Duration::from_millis),
            };
        }
        for (model, adapters) in &file.adapters {
            for (name, path) in adapters {
                let ok = !name.is_empty() && !name.contains(['/', ' ']) && path.starts_with('/');
                if !ok {
                    return Err(ConfigError::Invalid {
                        path: shown.clone(),
                        message: format!(
                            "`adapters.{model}.{name}`: an adapter is NAME: /ABSOLUTE/DIRECTORY on the workers"
                        ),
                    });
                }
            }
        }
        config.adapters = file.adapters;
        for (model, addrs) in file.models {
            config
                .add_endpoints(&model, addrs)
                .map_err(|message| ConfigError::Invalid {
                    path: shown.clone(),
                    message: format!("`models.{model}`: {message}"),
                })?;
        }
        Ok(config)
    }

    /// The config file's name for errors, or `the configuration` when it came from flags.
    pub fn shown_source(&self) -> String {
        self.files
            .first()
            .map_or_else(|| "the configuration".to_string(), |p| p.display().to_string())
    }

    /// Adds `NAME=ADDR[,ADDR...]` from the command line.
    pub fn add_backend_flag(&mut self, value: &str) -> Result<(), ConfigError> {
        let err = |message: &str| ConfigError::Backend {
            value: value.to_string(),
            message: message.to_string(),
        };
        let (name, addrs) = value
            .split_once('=')
            .ok_or_else(|| err("expected NAME=ADDR[,ADDR...]"))?;
        let addrs = addrs.split(',').map(|a| a.trim().to_string()).collect();
        self.add_endpoints(name.trim(), addrs).map_err(|m| err(&m))
    }

    fn add_endpoints(&mut self, model: &str, addrs: Vec<String>) -> Result<(), String> {
        if model.is_empty() {
            return Err("the model name is empty".into());
        }
        if addrs.is_empty() || addrs.iter().any(|a| a.is_empty()) {
            return Err("every model needs at least one worker address".into());
        }
        for addr in &addrs {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{addr:?} is not HOST:PORT"));
            }
        }
        let list = self.endpoints.entry(model.to_string()).or_default();
        for addr in addrs {
            if !list.contains(&addr) {
                list.push(addr);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_flags_parse_and_bad_ones_say_why() {
        let mut c = GatewayConfig::default();
        c.add_backend_flag("smol=127.0.0.1:50051,10.0.0.2:50051").unwrap();
        assert_eq!(c.endpoints["smol"], ["127.0.0.1:50051", "10.0.0.2:50051"]);
        for bad in ["smol", "=1.2.3.4:5", "smol=host", "smol=host:notaport"] {
            let e = c.add_backend_flag(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn config_file_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("camelid-gw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "listen: 0.0.0.0:9000\nmodels:\n  smol: [\"w1:50051\"]\nlimits:\n  max_messages: 8\n",
        )
        .unwrap();
        let c = GatewayConfig::from_file(&good).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_messages, 8);
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "limits:\n  max_mesages: 8\n").unwrap();
        let e = GatewayConfig::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("limits") && e.contains("max_mesages"), "{e}");
    }
}
