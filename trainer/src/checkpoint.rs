//! Checkpoints that survive a preemption at any instant.
//!
//! A checkpoint is a folder `step-NNNNNNNN` (or `step-NNNNNNNN-micro-NNNNN` when written between the
//! micro-batches of a step) holding safetensors files and `manifest.json`. It is written into a temporary folder,
//! every file fsynced, the manifest written last, then renamed into place and the parent fsynced. A checkpoint is
//! complete only when its manifest parses and every file it lists has the recorded size and SHA-256, so a
//! half-written or half-uploaded folder (a rename that is not atomic on an object-store mount) is never resumed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::optim::AdamWConfig;

pub const MANIFEST: &str = "manifest.json";
const FORMAT_VERSION: u32 = 1;
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is incomplete or corrupt: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("checkpoint {path}: {source}")]
    Tensors {
        path: PathBuf,
        #[source]
        source: camelid_model::ModelError,
    },
    #[error(
        "checkpoint {path} belongs to a different run (config hash {found}, this run {expected}); {hint}"
    )]
    ConfigMismatch {
        path: PathBuf,
        found: String,
        expected: String,
        hint: String,
    },
}

impl CheckpointError {
    pub fn category(&self) -> &'static str {
        match self {
            CheckpointError::Io { .. } => "io",
            CheckpointError::Invalid { .. } | CheckpointError::Tensors { .. } => "corrupt_checkpoint",
            CheckpointError::ConfigMismatch { .. } => "config_mismatch",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
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

/// The file `base` (`model`, `optimizer`, `gradients`) of rank `rank` of `world`.
pub fn shard_file(base: &str, rank: usize, world: usize) -> String {
    if world == 1 {
        format!("{base}.safetensors")
    } else {
        format!("{base}.rank-{rank:05}-of-{world:05}.safetensors")
    }
}

/// One checkpoint's state in memory.
#[derive(Debug)]
pub struct State {
    pub manifest: Manifest,
    /// File name → named tensors (`model.safetensors`, `optimizer.safetensors`, `gradients.safetensors`).
    pub files: Vec<(String, Vec<(String, Tensor)>)>,
}

/// The folder name of a checkpoint.
pub fn folder_name(step: u64, micro_step: u64) -> String {
    if micro_step == 0 {
        format!("step-{step:08}")
    } else {
        format!("step-{step:08}-micro-{micro_step:05}")
    }
}

fn parse_folder_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("step-")?;
    match rest.split_once("-micro-") {
        Some((s, m)) => Some((s.parse().ok()?, m.parse().ok()?)),
        None => Some((rest.parse().ok()?, 0)),
    }
}

fn sha256_file(path: &Path) -> Result<FileEntry, CheckpointError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let digest = hasher.finalize();
    Ok(FileEntry {
        bytes,
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `state` under `root` atomically and returns its folder.
pub fn write(root: &Path, state: State) -> Result<PathBuf, CheckpointError> {
    let State { mut manifest, files } = state;
    let name = folder_name(manifest.step, manifest.micro_step);
    let _span = tracing::info_span!("checkpoint_write", name = %name).entered();
    let temp = root.join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()));
    fresh_dir(root, &temp)?;
    manifest.files = write_files(&temp, files)?;
    publish(root, &temp, &name, &manifest)
}

/// Creates `temp` under `root`, empty (a leftover of an earlier attempt is removed).
fn fresh_dir(root: &Path, temp: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    if temp.exists() {
        std::fs::remove_dir_all(temp).map_err(io_err(temp))?;
    }
    std::fs::create_dir(temp).map_err(io_err(temp))
}

/// Writes each file's tensors into `dir`; returns their sizes and checksums.
fn write_files(
    dir: &Path,
    files: Vec<(String, Vec<(String, Tensor)>)>,
) -> Result<BTreeMap<String, FileEntry>, CheckpointError> {
    let mut entries = BTreeMap::new();
    for (file, tensors) in files {
        let path = dir.join(&file);
        camelid_model::weights::write_safetensors(&path, &tensors).map_err(|source| {
            CheckpointError::Tensors {
                path: path.clone(),
                source,
            }
        })?;
        entries.insert(file, sha256_file(&path)?);
    }
    Ok(entries)
}

/// Writes `manifest` last into the finished temporary folder `temp` and renames it to `root/name`.
fn publish(root: &Path, temp: &Path, name: &str, manifest: &Manifest) -> Result<PathBuf, CheckpointError> {
    write_synced(&temp.join(MANIFEST), manifest, true)?;
    fsync_dir(temp)?;
    let final_path = root.join(name);
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(io_err(&final_path))?;
    }
    std::fs::rename(temp, &final_path).map_err(io_err(&final_path))?;
    fsync_dir(root)?;
    Ok(final_path)
}

/// Writes `value` as JSON into `path` and fsyncs it.
fn write_synced(path: &Path, value: &impl Serialize, pretty: bool) -> Result<(), CheckpointError> {
    let text = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    }
    .map_err(|e| CheckpointError::Invalid {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    std::io::Write::write_all(&mut f, &text).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Reads and verifies the manifest of the checkpoint in `dir` (sizes and checksums of every file).
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let invalid = |detail: String| CheckpointError::Invalid {
        path: dir.to_path_buf(),
        detail,
    };
    let manifest_path = dir.join(MANIFEST);
    let text = match std::fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid("no manifest.json (the write did not finish)".into()));
        }
        Err(e) => return Err(io_err(&manifest_path)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("manifest.json does not parse: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {} (this trainer reads {FORMAT_VERSION})",
            manifest.format_version
        )));
    }
    for (file, expected) in &manifest.files {
        let path = dir.join(file);
        if !path.exists() {
            return Err(invalid(format!("{file} is missing")));
        }
        let found = sha256_file(&path)?;
        if found.bytes != expected.bytes {
            return Err(invalid(format!(
                "{file} has {} bytes, the manifest says {} (truncated?)",
                found.bytes, expected.bytes
            )));
        }
        if found.sha256 != expected.sha256 {
            return Err(invalid(format!("{file} does not match its SHA-256 checksum")));
        }
    }
    Ok(manifest)
}

/// Checkpoint folders under `root`, newest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut found: Vec<((u64, u64), PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            parse_folder_name(&name).map(|key| (key, e.path()))
        })
        .collect();
    found.sort_by_key(|(key, _)| std::cmp::Reverse(*key));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The newest complete checkpoint under `root`; incomplete or corrupt ones are skipped with a warning.
pub fn latest(root: &Path) -> Result<Option<(PathBuf, Manifest)>, CheckpointError> {
    for dir in list(root)? {
        match verify(&dir) {
            Ok(manifest) => return Ok(Some((dir, manifest))),
            Err(e @ CheckpointError::Invalid { .. }) => {
                tracing::warn!("skipping checkpoint: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Loads the tensors of a verified checkpoint file.
pub fn read_tensors(dir: &Path, file: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let path = dir.join(file);
    let mut out = camelid_model::weights::Weights::new();
    camelid_model::weights::read_safetensors(&path, camelid_model::LoadOptions::default(), &mut out)
        .map_err(|source| CheckpointError::Tensors { path, source })?;
    let mut v: Vec<(String, Tensor)> = out.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Deletes all but the newest `keep` checkpoints with a manifest, incomplete checkpoints older than the newest
/// complete one, and leftover temporary folders. (Only manifests are read here: checksums are verified when a
/// checkpoint is resumed, not on every write.)
pub fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let mut complete = 0;
    for dir in list(root)? {
        let ok = std::fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
            .is_some();
        if ok && complete < keep.max(1) {
            complete += 1;
            continue;
        }
        if ok || complete > 0 {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                std::fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
            }
        }
    }
    Ok(())
}

/// Writes this rank's part of a checkpoint that all ranks of `comm` write together into one shared folder: rank 0
/// prepares the temporary folder, every rank writes its files and a list of their sizes and checksums, and after
/// a barrier rank 0 writes the manifest (naming every rank's files) last and renames the folder into place. A
/// checkpoint is therefore complete for every rank or has no manifest and is never resumed. The checkpoint
/// folder must be shared by all ranks (one volume, or one node).
pub fn write_sharded(
    root: &Path,
    state: State,
    comm: &crate::torchrun::Comm,
) -> Result<PathBuf, crate::TrainError> {
    let State { mut manifest, files } = state;
    let name = folder_name(manifest.step, manifest.micro_step);
    let _span = tracing::info_span!("checkpoint_write", name = %name, rank = comm.rank()).entered();
    let temp = root.join(format!("{TEMP_PREFIX}{name}"));
    if comm.is_leader() {
        fresh_dir(root, &temp)?;
    }
    comm.barrier()?;
    let mine = write_files(&temp, files)?;
    let list = |rank: usize| temp.join(format!("files.rank-{rank:05}.json"));
    write_synced(&list(comm.rank()), &mine, false)?;
    comm.barrier()?;
    let final_path = root.join(&name);
    if comm.is_leader() {
        manifest.files.clear();
        manifest.world_size = comm.world() as u64;
        for rank in 0..comm.world() {
            let path = list(rank);
            let text = std::fs::read(&path).map_err(io_err(&path))?;
            let entries: BTreeMap<String, FileEntry> =
                serde_json::from_slice(&text).map_err(|e| CheckpointError::Invalid {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            manifest.files.extend(entries);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        publish(root, &temp, &name, &manifest)?;
    }
    comm.barrier()?;
    Ok(final_path)
}
