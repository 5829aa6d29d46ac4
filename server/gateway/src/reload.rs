//! Reloading the config file while serving: its files (the config, its keys file, its rules files) are re-read
//! every interval; when any changed, the config is parsed and validated again and, if good, the new keys,
//! moderation and endpoints replace the old ones whole. A bad edit is logged and counted and the old config stays.
//! Requests in flight keep the policy they started with, so nothing is dropped.
//!
//! Polling the contents (not file events) follows Kubernetes ConfigMap and Secret volumes, which change by
//! swapping a symlink.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, GatewayConfig};
use crate::metrics::ReloadLabels;
use crate::policy::Policy;
use crate::state::AppState;

/// Applied to every freshly read config: the command line's flags, which override the file.
pub type Overrides = Arc<dyn Fn(&mut GatewayConfig) -> Result<(), ConfigError> + Send + Sync>;

/// The bytes of each watched file (`None` when unreadable), to tell a change.
fn snapshot(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}

/// Reads and checks the config at `path`, and swaps it in. Returns the files to watch from now on.
pub fn reload_once(
    path: &Path,
    overrides: &Overrides,
    state: &AppState,
    running: &GatewayConfig,
) -> Result<GatewayConfig, String> {
    let mut config = GatewayConfig::from_file(path).map_err(|e| e.to_string())?;
    overrides(&mut config).map_err(|e| e.to_string())?;
    let current = state.policy.current();
    let policy = Policy::build(&config.policy, &state.router, Some(&current))
        .map_err(|m| format!("{}: {m}", path.display()))?;
    crate::serve::anonymous_check(running.listen, !policy.keys.is_empty(), config.allow_anonymous)?;
    if config.listen != running.listen {
        tracing::warn!(old = %running.listen, new = %config.listen, "`listen` changes only on restart");
    }
    if config.admin_listen != running.admin_listen {
        tracing::warn!(old = %running.admin_listen, new = %config.admin_listen, "`admin_listen` changes only on restart");
    }
    if config.limits != running.limits
        || config.probe_interval != running.probe_interval
        || config.server != running.server
    {
        tracing::warn!("`limits`, `server` and `probe_interval_ms` change only on restart");
    }
    state.policy.replace(policy);
    state.endpoints.set(config.endpoints.clone());
    state.router.set_adapter_sources(config.adapters.clone());
    Ok(config)
}

/// Watches `path` every `interval` until the process ends.
pub fn spawn(
    path: PathBuf,
    overrides: Overrides,
    state: AppState,
    running: GatewayConfig,
    interval: Duration,
) {
    // Taken now, not when the task first runs, so an edit made meanwhile is not mistaken for the start state.
    let mut seen = snapshot(&running.files);
    tokio::spawn(async move {
        let mut running = running;
        loop {
            tokio::time::sleep(interval).await;
            let now = snapshot(&running.files);
            if now == seen {
                continue;
            }
            seen = now;
            let result = match reload_once(&path, &overrides, &state, &running) {
                Ok(config) => {
                    running = GatewayConfig {
                        listen: running.listen,
                        admin_listen: running.admin_listen,
                        server: running.server,
                        limits: running.limits,
                        hold: running.hold,
                        hold_per_key: running.hold_per_key,
                        probe_interval: running.probe_interval,
                        ..config
                    };
                    // A keys or rules file may have been added: watch what this config names.
                    seen = snapshot(&running.files);
                    let policy = state.policy.current();
                    tracing::info!(
                        keys = policy.keys.names().count(),
                        profiles = policy.profiles.len(),
                        "config reloaded"
                    );
                    "ok"
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload refused; the previous config stays in force");
                    "error"
                }
            };
            state
                .metrics
                .config_reloads
                .get_or_create(&ReloadLabels { result })
                .inc();
        }
    });
}
