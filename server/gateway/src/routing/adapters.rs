//! LoRA adapters behind the models: a request names an adapter in `model`, and the gateway sends it to a worker
//! of the adapter's base model with the adapter named in the call, preferring workers that already hold it
//! (their `ModelInfo` says which) and loading it on another one when its source is known (a ChatModel's
//! `status.adapters`, or the config's `adapters`).
//!
//! Adapter names live in their base model's namespace: a bare name resolves when exactly one model has an adapter
//! of that name, and a name a model is served under always means the model, so no worker can capture another
//! model's name by reporting an adapter.

use std::collections::BTreeMap;
use std::time::Duration;

use camelid_proto::v1;

use super::router::{Backend, Router, resolve_in};
use crate::error::ApiError;

/// Base model id → adapter name → the adapter's directory as its workers see it.
pub type AdapterSources = BTreeMap<String, BTreeMap<String, String>>;

/// Reads the adapter sources another part keeps (discovery's ChatModel rules) when they are needed.
pub struct SourceReader(pub Box<dyn Fn() -> AdapterSources + Send + Sync>);

impl std::fmt::Debug for SourceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceReader")
    }
}

/// How long a worker may take to load an adapter (reading a few to a few hundred megabytes).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What a client's `model` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The served model id (the adapter's base).
    pub model: String,
    /// The adapter, empty for the base model.
    pub adapter: String,
}

impl Router {
    /// Replaces the config's adapter sources (at start and on a reload).
    pub fn set_adapter_sources(&self, sources: AdapterSources) {
        if let Ok(mut s) = self.adapter_sources.write() {
            *s = sources;
        }
    }

    /// Also takes adapter sources from `reader` (discovery's ChatModels), read when needed.
    pub fn follow_adapter_sources(&self, reader: SourceReader) {
        let _ = self.discovered_adapters.set(reader);
    }

    /// The config's sources and the discovered ones.
    fn sources(&self) -> [AdapterSources; 2] {
        let config = self.adapter_sources.read().map(|s| s.clone()).unwrap_or_default();
        let found = self
            .discovered_adapters
            .get()
            .map(|read| (read.0)())
            .unwrap_or_default();
        [config, found]
    }

    pub(super) fn adapter_source(&self, model: &str, adapter: &str) -> Option<String> {
        self.sources()
            .iter()
            .find_map(|s| s.get(model)?.get(adapter).cloned())
    }

    /// Every adapter known per base model: reported by a worker, or loadable from a source.
    fn adapter_index(&self) -> BTreeMap<String, Vec<String>> {
        let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let sources = self.sources();
        for model in self.models() {
            let mut names: Vec<String> = self
                .backends_of(&model)
                .iter()
                .flat_map(|b| b.adapters())
                .collect();
            for known in sources.iter().filter_map(|s| s.get(&model)) {
                names.extend(known.keys().cloned());
            }
            names.sort();
            names.dedup();
            index.insert(model, names);
        }
        index
    }

    /// The model, or base model and adapter, a client's `asked` name means. A served model's name wins; else an
    /// adapter, as `NAMESPACE/ADAPTER` or bare when one model alone has it (400 `model_ambiguous` when several
    /// do); else `asked` itself (routing answers 404).
    pub fn resolve_target(&self, asked: &str) -> Result<Target, ApiError> {
        let model = self.resolve(asked)?;
        if self.knows(&model) {
            return Ok(Target {
                model,
                adapter: String::new(),
            });
        }
        // Adapters as `NAMESPACE/ADAPTER` ids (the base's namespace), resolved as model names are.
        let mut ids: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (base, names) in self.adapter_index() {
            let namespace = base.rsplit_once('/').map(|(ns, _)| format!("{ns}/"));
            for name in names {
                let id = format!("{}{name}", namespace.clone().unwrap_or_default());
                ids.insert(id, (base.clone(), name));
            }
        }
        let id = resolve_in(ids.keys().map(String::as_str), asked)?;
        Ok(match ids.remove(&id) {
            Some((model, adapter)) => Target { model, adapter },
            None => Target {
                model: asked.to_string(),
                adapter: String::new(),
            },
        })
    }

    /// `(shown name, base model id)` of every adapter, for `/v1/models`: bare while it resolves to itself alone.
    pub fn public_adapters(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (base, names) in self.adapter_index() {
            for name in names {
                let unique = self
                    .resolve_target(&name)
                    .is_ok_and(|t| t.model == base && t.adapter == name);
                let shown = match base.rsplit_once('/') {
                    Some((ns, _)) if !unique => format!("{ns}/{name}"),
                    _ => name.clone(),
                };
                out.push((shown, base.clone()));
            }
        }
        out
    }

    /// Makes `backend` hold `adapter` of `model`, loading it from its source when it does not; Err with the
    /// worker's reason when the adapter itself is refused (it would be everywhere), Ok(false) when this worker
    /// could not load it (try another).
    pub(super) async fn ensure_adapter(
        &self,
        backend: &Backend,
        model: &str,
        adapter: &str,
    ) -> Result<bool, ApiError> {
        if adapter.is_empty() || backend.holds(adapter) {
            return Ok(true);
        }
        let Some(path) = self.adapter_source(model, adapter) else {
            return Ok(false);
        };
        let mut client = backend.client.clone();
        let request = v1::LoadAdapterRequest {
            name: adapter.to_string(),
            path: path.clone(),
        };
        match tokio::time::timeout(LOAD_TIMEOUT, client.load_adapter(request)).await {
            Ok(Ok(_)) => {
                tracing::info!(model, adapter, endpoint = %backend.addr, "LoRA adapter loaded on the worker");
                backend.note_adapter(adapter, true);
                Ok(true)
            }
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                Err(ApiError::adapter_unavailable(adapter, status.message()))
            }
            Ok(Err(status)) => {
                tracing::warn!(model, adapter, endpoint = %backend.addr, error = status.message(), "loading an adapter failed");
                Ok(false)
            }
            Err(_) => Ok(false),
        }
    }
}
