//! `manifest.json`, the record of a checkpoint, and the rules it must follow before any file it names is opened.
//!
//! The manifest is read from a folder that may be shared or tampered with (an object-store mount, a volume other
//! pods write), so it is untrusted input: [`parse_manifest`] is pure and total on any bytes, and every file name it
//! accepts is a plain name of a file directly inside the checkpoint folder (no `..`, no `/`, no absolute path, no
//! hidden or temporary name), so nothing it names can reach outside the folder.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;

/// The format this trainer writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A file name longer than this is refused (the longest the trainer writes is under 60 bytes).
const MAX_FILE_NAME: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

/// Everything needed to continue a run exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches of step `step` (0-based) already added into the saved gradients; 0 at a step boundary.
    pub micro_step: u64,
    /// Index of the next micro-batch in the endless sequence of epochs (see [`crate::data::batching`]).
    pub data_position: u64,
    /// The data order's random state: it is reseeded per epoch from `seed` and the epoch number.
    pub data_seed: u64,
    pub epoch: u64,
    /// Optimizer steps AdamW has taken (bias correction) and its hyper-parameters.
    pub optimizer_step: u64,
    pub optimizer: AdamWConfig,
    /// Summed loss and trainable tokens of the micro-batches already in the saved gradients.
    pub partial_loss_sum: f64,
    pub partial_tokens: u64,
    pub config_hash: String,
    /// The run's settings, so a mismatch can be explained.
    pub config: serde_json::Value,
    /// RFC 3339 time the checkpoint was written.
    pub created: String,
    /// File name (see [`check_file_name`]) → its size and checksum.
    pub files: BTreeMap<String, FileEntry>,
    /// Ranks that wrote it; each rank's files are named `NAME.rank-R-of-W.safetensors` when more than one.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Why a manifest is refused (the caller names the checkpoint folder).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest.json does not parse: {0}")]
    Parse(String),
    #[error("format version {0} (this trainer reads {FORMAT_VERSION})")]
    FormatVersion(u32),
    #[error(
        "manifest.json names the file {name:?}, which {reason}; checkpoint files must be plain names of files inside the checkpoint folder"
    )]
    FileName { name: String, reason: &'static str },
    #[error(
        "manifest.json records {name:?} with the checksum {sha256:?}, which is not a lowercase hex SHA-256"
    )]
    Checksum { name: String, sha256: String },
}

impl ManifestError {
    /// A short, stable name for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            ManifestError::Parse(_) => "manifest_parse",
            ManifestError::FormatVersion(_) => "manifest_version",
            ManifestError::FileName { .. } => "manifest_file_name",
            ManifestError::Checksum { .. } => "manifest_checksum",
        }
    }
}

/// Parses and checks a manifest: the format version, every file name (see [`check_file_name`]) and every checksum's
/// form. Pure and total on any bytes (no panics; `serde_json` bounds the nesting), so a fuzz target can call it.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(ManifestError::FormatVersion(manifest.format_version));
    }
    for (name, entry) in &manifest.files {
        check_file_name(name)?;
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if entry.sha256.len() != 64 || !entry.sha256.chars().all(hex) {
            return Err(ManifestError::Checksum {
                name: name.clone(),
                sha256: entry.sha256.chars().take(80).collect(),
            });
        }
    }
    Ok(manifest)
}

/// Accepts only what the trainer itself writes: a name of ASCII letters, digits, `.`, `_` and `-` that does not
/// start with `.` (so not `.`, `..`, a hidden or a temporary name) and is not `manifest.json`. A name is one path
/// component, so `dir.join(name)` stays inside `dir` (an absolute name would replace `dir` in `join`).
pub fn check_file_name(name: &str) -> Result<(), ManifestError> {
    let refuse = |reason| {
        Err(ManifestError::FileName {
            name: name.chars().take(MAX_FILE_NAME + 8).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("is empty");
    }
    if name.len() > MAX_FILE_NAME {
        return refuse("is too long");
    }
    if name.starts_with('/') {
        return refuse("is an absolute path");
    }
    if name.contains('/') || name.contains('\\') {
        return refuse("is a path, not a file name");
    }
    if name.starts_with('.') {
        return refuse("starts with '.' (`..`, a hidden or a temporary file)");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return refuse("has characters other than letters, digits, '.', '_' and '-'");
    }
    if name == super::MANIFEST {
        return refuse("is the manifest itself");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with_file(name: &str, sha256: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "format_version": 1, "step": 1, "micro_step": 0, "data_position": 1, "data_seed": 0, "epoch": 0,
            "optimizer_step": 1, "optimizer": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
            "partial_loss_sum": 0.0, "partial_tokens": 0, "config_hash": "h", "config": {}, "created": "now",
            "files": {name: {"bytes": 1, "sha256": sha256}}
        }))
        .unwrap()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// The attack: a manifest naming files outside its folder. Each is refused by the parser, naming the file.
    #[test]
    fn file_names_that_leave_the_folder_are_refused() {
        for (name, reason) in [
            ("../x", "is a path"),
            ("../../etc/passwd", "is a path"),
            ("/etc/passwd", "is an absolute path"),
            ("sub/model.safetensors", "is a path"),
            ("..", "starts with '.'"),
            (".", "starts with '.'"),
            (".tmp-step-1", "starts with '.'"),
            ("", "is empty"),
            ("a\\..\\b", "is a path"),
            ("model\0.safetensors", "characters other than"),
            ("mödel.safetensors", "characters other than"),
            ("manifest.json", "the manifest itself"),
        ] {
            let err = parse_manifest(&manifest_with_file(name, SHA)).unwrap_err();
            assert_eq!(err.category(), "manifest_file_name", "{name:?}");
            let text = err.to_string();
            assert!(
                text.contains(reason) && text.contains(&format!("{name:?}")),
                "{name:?}: {text}"
            );
        }
        let long = "a".repeat(200);
        assert!(parse_manifest(&manifest_with_file(&long, SHA)).is_err());
    }

    #[test]
    fn what_the_trainer_writes_is_accepted() {
        for name in [
            "model.safetensors",
            "optimizer.rank-00003-of-00008.safetensors",
            "gradients.safetensors",
        ] {
            let manifest = parse_manifest(&manifest_with_file(name, SHA)).unwrap();
            assert_eq!(manifest.world_size, 1);
            assert!(manifest.files.contains_key(name));
        }
    }

    #[test]
    fn bad_checksums_versions_and_bytes_are_refused() {
        for sha in ["", "ABCDEF", &SHA.to_uppercase(), &format!("{SHA}00"), "../../x"] {
            let err = parse_manifest(&manifest_with_file("model.safetensors", sha)).unwrap_err();
            assert_eq!(err.category(), "manifest_checksum", "{sha}");
        }
        let mut v: serde_json::Value =
            serde_json::from_slice(&manifest_with_file("model.safetensors", SHA)).unwrap();
        v["format_version"] = 2.into();
        let err = parse_manifest(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err, ManifestError::FormatVersion(2));
        for bytes in [
            &b""[..],
            b"\xff\xfe",
            b"{",
            b"null",
            &[b'['; 100_000],
            b"{\"files\": 1}",
        ] {
            assert_eq!(parse_manifest(bytes).unwrap_err().category(), "manifest_parse");
        }
    }
}
