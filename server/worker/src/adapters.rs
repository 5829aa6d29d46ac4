//! The LoRA adapters a worker serves over its base model, by name (the name clients put in `model`, as vLLM's
//! `--lora-modules` names them). Adapters load and unload while the worker runs; at most `max_loaded` stay, the
//! least recently requested leaving first.
//!
//! The registry lives on the engine thread (adapter weights are libtorch tensors, which one thread owns): a handle
//! reads and checks an adapter's files on a blocking task, then hands the adapter over with a command. A running
//! sequence holds its adapter by `Rc`, so unloading or evicting an adapter never disturbs requests already using
//! it; the handles see the list the engine publishes.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use camelid_model::lora::LoraAdapter;

use crate::error::WorkerError;

/// An adapter as a running sequence holds it.
#[derive(Debug, Clone)]
pub(crate) struct ServedAdapter {
    /// Unique per load: a reloaded adapter of the same name shares no cached prefix with its predecessor.
    pub generation: u64,
    pub weights: Rc<LoraAdapter>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    source: PathBuf,
    adapter: ServedAdapter,
}

/// The engine thread's adapters, least recently requested first.
#[derive(Debug)]
pub(crate) struct AdapterRegistry {
    loaded: Vec<Entry>,
    generations: u64,
    max_loaded: usize,
}

/// The longest adapter name accepted (names travel in requests, metric labels and logs).
const MAX_NAME: usize = 128;

impl AdapterRegistry {
    pub(crate) fn new(max_loaded: usize) -> Self {
        Self {
            loaded: Vec::new(),
            generations: 0,
            max_loaded: max_loaded.max(1),
        }
    }

    /// The most adapters kept loaded.
    pub(crate) fn max_loaded(&self) -> usize {
        self.max_loaded
    }

    /// Serves `adapter` as `name` (replacing an adapter of that name), evicting the least recently requested
    /// beyond the bound.
    pub(crate) fn insert(&mut self, name: &str, source: &Path, adapter: LoraAdapter) {
        self.generations += 1;
        self.loaded.retain(|e| e.name != name);
        self.loaded.push(Entry {
            name: name.to_string(),
            source: source.to_path_buf(),
            adapter: ServedAdapter {
                generation: self.generations,
                weights: Rc::new(adapter),
            },
        });
        while self.loaded.len() > self.max_loaded {
            let evicted = self.loaded.remove(0);
            tracing::info!(adapter = %evicted.name, "LoRA adapter evicted (least recently requested)");
        }
        tracing::info!(adapter = name, source = %source.display(), "LoRA adapter loaded");
    }

    /// Stops serving `name`; requests already running with it finish.
    pub(crate) fn remove(&mut self, name: &str) -> Result<(), WorkerError> {
        let before = self.loaded.len();
        self.loaded.retain(|e| e.name != name);
        if self.loaded.len() == before {
            return Err(not_loaded(name));
        }
        tracing::info!(adapter = name, "LoRA adapter unloaded");
        Ok(())
    }

    /// The adapter a request names, marked as the most recently requested.
    pub(crate) fn resolve(&mut self, name: &str) -> Result<ServedAdapter, WorkerError> {
        let at = self
            .loaded
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| not_loaded(name))?;
        let entry = self.loaded.remove(at);
        let adapter = entry.adapter.clone();
        self.loaded.push(entry);
        Ok(adapter)
    }

    /// `(name, source)` of every loaded adapter, by name: what the handles list.
    pub(crate) fn list(&self) -> Vec<AdapterInfo> {
        let mut out: Vec<AdapterInfo> = self
            .loaded
            .iter()
            .map(|e| AdapterInfo {
                name: e.name.clone(),
                source: e.source.display().to_string(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// A loaded adapter as `/v1/models` and `ModelInfo` list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    pub source: String,
}

pub(crate) fn not_loaded(name: &str) -> WorkerError {
    WorkerError::InvalidRequest {
        message: format!("this worker serves no LoRA adapter named {name:?}"),
        code: "model_not_found",
        param: Some("model"),
    }
}

/// Refuses names that could not travel safely in requests, labels and logs.
pub fn check_name(name: &str) -> Result<(), WorkerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(WorkerError::invalid(
            "an adapter name is 1 to 128 characters of letters, digits and - _ . : /",
            Some("lora_name"),
        ))
    }
}

/// `NAME=PATH` (vLLM's `--lora-modules` form).
pub fn parse_module(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            check_name(name).map_err(|e| format!("--lora-modules {text:?}: {e}"))?;
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("--lora-modules {text:?}: expected NAME=PATH")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use camelid_model::config::Config;
    use camelid_model::lora::LoraConfig;
    use tch::Device;

    fn adapter(config: &Config) -> LoraAdapter {
        let lora = LoraConfig::new(2, 4.0, 0.0, &["q_proj".to_string()], false).unwrap();
        LoraAdapter::init(lora, config, 1, Device::Cpu).unwrap()
    }

    #[test]
    fn adapters_resolve_evict_the_least_recently_requested_and_unload() {
        let config = Config::tiny(4, 2, true);
        let mut registry = AdapterRegistry::new(2);
        registry.insert("a", Path::new("/a"), adapter(&config));
        registry.insert("b", Path::new("/b"), adapter(&config));
        let held = registry.resolve("a").unwrap();
        registry.insert("c", Path::new("/c"), adapter(&config));
        let names: Vec<String> = registry.list().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["a", "c"], "b was the least recently requested");
        registry.remove("a").unwrap();
        assert!(registry.resolve("a").is_err());
        assert!(registry.remove("a").is_err());
        assert_eq!(
            held.weights.config().rank,
            2,
            "a request keeps its adapter after the unload"
        );
        // A reload under the same name is a new generation (no shared prefix cache with the old one).
        registry.insert("c", Path::new("/c2"), adapter(&config));
        assert_ne!(registry.resolve("c").unwrap().generation, held.generation);
    }

    #[test]
    fn hostile_names_are_refused_with_the_field_named() {
        for bad in ["", "../x\n", "a b", &"x".repeat(200)] {
            let err = check_name(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    WorkerError::InvalidRequest {
                        param: Some("lora_name"),
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
        assert!(parse_module("sql=/adapters/sql").is_ok());
        assert!(parse_module("nopath").is_err());
    }
}
