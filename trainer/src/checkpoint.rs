//! Checkpoints that survive a preemption at any instant.
//!
//! A checkpoint is a folder `step-NNNNNNNN` (or `step-NNNNNNNN-micro-NNNNN` when written between the
//! micro-batches of a step) holding safetensors files and `manifest.json`. It is written into a temporary folder,
//! every file fsynced, the manifest written last, then renamed into place and the parent fsynced. A checkpoint is
//! complete only when its manifest parses and every file it lists has the recorded size and SHA-256, so a
//! half-written or half-uploaded folder (a rename that is not atomic on an object-store mount) is never resumed.
//!
//! The folder may be shared or tampered with, so what it holds is untrusted: the manifest's file names are plain
//! names inside the folder (`manifest.rs`), a checkpoint file or manifest that is a symbolic link is refused, and
//! pruning keeps the newest checkpoints that verify (never deleting the last verified one because a newer one is
//! corrupt) and deletes only whole folders under the root, never following a link.

mod manifest;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tch::Tensor;

pub use manifest::{FileEntry, Manifest, ManifestError, check_file_name, parse_manifest};

pub const MANIFEST: &str = "manifest.json";
const TEMP_PREFIX: &str = ".tmp-";
/// A larger `manifest.json` is refused unread (a real one is a few KiB, plus about 150 bytes per file and rank).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

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
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    sha256_of(file, path)
}

fn sha256_of(mut file: std::fs::File, path: &Path) -> Result<FileEntry, CheckpointError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
        bytes += n as u64;
    }
    let digest = hasher.finalize();
    Ok(FileEntry {
        bytes,
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

fn invalid(dir: &Path, detail: String) -> CheckpointError {
    CheckpointError::Invalid {
        path: dir.to_path_buf(),
        detail,
    }
}

/// The metadata of `name` inside `dir`, which must be a confined name (see [`check_file_name`]) of a regular file,
/// not a symbolic link (a link could point anywhere: a file outside the folder, a device).
fn confined_metadata(dir: &Path, name: &str) -> Result<std::fs::Metadata, CheckpointError> {
    check_file_name(name).map_err(|e| invalid(dir, e.to_string()))?;
    let path = dir.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(dir, format!("{name} is missing")));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(invalid(
            dir,
            format!("{name} is a symbolic link; checkpoint files must be regular files inside the folder"),
        ));
    }
    if !meta.is_file() {
        return Err(invalid(dir, format!("{name} is not a regular file")));
    }
    Ok(meta)
}

/// Opens `name` inside `dir` as [`confined_metadata`] allows, making sure the file opened is the one checked (not a
/// link swapped in between).
fn open_confined(dir: &Path, name: &str) -> Result<std::fs::File, CheckpointError> {
    open_checked(dir, name, &confined_metadata(dir, name)?)
}

/// Opens `dir/name`, refusing it unless it is the file `checked` describes.
fn open_checked(
    dir: &Path,
    name: &str,
    checked: &std::fs::Metadata,
) -> Result<std::fs::File, CheckpointError> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(io_err(&path))?;
    let opened = file.metadata().map_err(io_err(&path))?;
    if (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) {
        return Err(invalid(dir, format!("{name} was replaced while it was opened")));
    }
    Ok(file)
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
        check_file_name(&file).map_err(|e| invalid(dir, e.to_string()))?;
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

/// Reads and checks `dir`'s manifest (see [`parse_manifest`]) without looking at the files it names.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(dir, "no manifest.json (the write did not finish)".into()));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    if !meta.is_file() {
        return Err(invalid(
            dir,
            "manifest.json is not a regular file (a symbolic link?)".into(),
        ));
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(invalid(
            dir,
            format!(
                "manifest.json has {} bytes, more than {MAX_MANIFEST_BYTES}",
                meta.len()
            ),
        ));
    }
    let mut text = Vec::new();
    open_checked(dir, MANIFEST, &meta)?
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut text)
        .map_err(io_err(&path))?;
    parse_manifest(&text).map_err(|e| invalid(dir, e.to_string()))
}

/// Reads and verifies the checkpoint in `dir`: its manifest, then every file it names (confined to `dir`, regular
/// files) for the recorded size (all sizes first: cheap, and the usual damage) and SHA-256.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(dir)?;
    for (file, expected) in &manifest.files {
        let found = confined_metadata(dir, file)?.len();
        if found != expected.bytes {
            return Err(truncated(dir, file, found, expected.bytes));
        }
    }
    for (file, expected) in &manifest.files {
        let found = sha256_of(open_confined(dir, file)?, &dir.join(file))?;
        if found.bytes != expected.bytes {
            return Err(truncated(dir, file, found.bytes, expected.bytes));
        }
        if found.sha256 != expected.sha256 {
            return Err(invalid(
                dir,
                format!("{file} does not match its SHA-256 checksum"),
            ));
        }
    }
    Ok(manifest)
}

fn truncated(dir: &Path, file: &str, found: u64, expected: u64) -> CheckpointError {
    invalid(
        dir,
        format!("{file} has {found} bytes, the manifest says {expected} (truncated?)"),
    )
}

/// [`verify`] for a folder found under the checkpoint root, which must be a real folder: a symbolic link named like a
/// checkpoint could point anywhere and is not resumed.
fn verify_listed(dir: &Path) -> Result<Manifest, CheckpointError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(invalid(
            dir,
            "it is a symbolic link; checkpoints under the checkpoint directory must be real folders".into(),
        )),
        Ok(m) if !m.is_dir() => Err(invalid(dir, "it is not a folder".into())),
        Ok(_) => verify(dir),
        Err(e) => Err(io_err(dir)(e)),
    }
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
        match verify_listed(&dir) {
            Ok(manifest) => return Ok(Some((dir, manifest))),
            Err(e @ CheckpointError::Invalid { .. }) => {
                tracing::warn!("skipping checkpoint: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Loads the tensors of a verified checkpoint file (a confined name of a regular file, as [`verify`] checked).
pub fn read_tensors(dir: &Path, file: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    confined_metadata(dir, file)?;
    let path = dir.join(file);
    let mut out = camelid_model::weights::Weights::new();
    camelid_model::weights::read_safetensors(&path, camelid_model::LoadOptions::default(), &mut out)
        .map_err(|source| CheckpointError::Tensors { path, source })?;
    let mut v: Vec<(String, Tensor)> = out.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Keeps the newest `keep` (at least 1) checkpoints that [`verify`] (sizes and checksums), and any corrupt or
/// incomplete checkpoint newer than the newest verified one (a write that may still be read, or looked into);
/// deletes the rest and leftover temporary folders. A newer corrupt checkpoint therefore never costs the last good
/// one. Verifying reads the kept checkpoints in full (their size in I/O per checkpoint written; only until `keep`
/// verify: older ones are deleted unread). A checkpoint that cannot be read (an I/O error, not corruption) is kept
/// and not counted. Deleting removes a folder under `root`, or a link in its place, never what a link points to.
pub fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let keep = keep.max(1);
    let mut verified = 0;
    for dir in list(root)? {
        if verified >= keep {
            remove_entry(&dir)?;
            continue;
        }
        match verify_listed(&dir) {
            Ok(_) => verified += 1,
            Err(e @ CheckpointError::Invalid { .. }) if verified > 0 => {
                tracing::warn!("pruning checkpoint: {e}");
                remove_entry(&dir)?;
            }
            Err(e) => tracing::warn!("keeping checkpoint that does not verify: {e}"),
        }
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                remove_entry(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Removes `path` itself: a folder with everything in it (`remove_dir_all` does not follow links inside), or a
/// link or file, unlinked without following it.
fn remove_entry(path: &Path) -> Result<(), CheckpointError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .map_err(io_err(path))
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
