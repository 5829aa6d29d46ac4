//! Attacks on the checkpoint folder: truncated and corrupt files, manifests naming files outside the folder,
//! symbolic links. Checkpoints are built by hand here (files of bytes and a manifest), without tensors.

use std::path::{Path, PathBuf};

use camelid_test_support::truncate_half;

use super::*;
use crate::optim::AdamWConfig;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camelid-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn manifest(step: u64) -> Manifest {
    Manifest {
        format_version: 1,
        step,
        micro_step: 0,
        data_position: step,
        data_seed: 0,
        epoch: 0,
        optimizer_step: step,
        optimizer: AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        partial_loss_sum: 0.0,
        partial_tokens: 0,
        config_hash: "h".into(),
        config: serde_json::json!({}),
        created: "2026-01-01T00:00:00Z".into(),
        files: BTreeMap::new(),
        world_size: 1,
    }
}

/// A complete checkpoint of `step` under `root`, written as [`write`] writes one (temporary folder, manifest last,
/// rename), with two files of bytes.
fn checkpoint(root: &Path, step: u64) -> PathBuf {
    let name = folder_name(step, 0);
    let temp = root.join(format!("{TEMP_PREFIX}{name}"));
    fresh_dir(root, &temp).unwrap();
    let mut m = manifest(step);
    for (file, len) in [
        ("model.safetensors", 4096 + step as usize),
        ("optimizer.safetensors", 8192),
    ] {
        let path = temp.join(file);
        std::fs::write(&path, vec![step as u8; len]).unwrap();
        m.files.insert(file.into(), sha256_file(&path).unwrap());
    }
    publish(root, &temp, &name, &m).unwrap()
}

/// Rewrites the manifest of `dir` with `edit` applied, bypassing every check (as an attacker would).
fn tamper(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
}

fn steps(root: &Path) -> Vec<u64> {
    let mut found: Vec<u64> = list(root)
        .unwrap()
        .iter()
        .filter_map(|d| parse_folder_name(&d.file_name()?.to_string_lossy()).map(|(s, _)| s))
        .collect();
    found.sort_unstable();
    found
}

fn latest_step(root: &Path) -> Option<u64> {
    latest(root).unwrap().map(|(_, m)| m.step)
}

/// The attack: the newest checkpoint's files are truncated (its manifest still parses). Pruning used to count it
/// as complete and delete the last good one; now the newest checkpoint that verifies survives and is resumed.
#[test]
fn a_truncated_newest_checkpoint_never_costs_the_last_verified_one() {
    let root = scratch("truncated");
    for step in 1..=4 {
        checkpoint(&root, step);
    }
    truncate_half(&root.join("step-00000004/model.safetensors"));
    prune(&root, 1).unwrap();
    assert_eq!(
        steps(&root),
        [3, 4],
        "step 3 (verified) is kept; the corrupt step 4 newer than it too"
    );
    assert_eq!(latest_step(&root), Some(3));
    let err = verify(&root.join("step-00000004")).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors has 2050 bytes, the manifest says 4100 (truncated?)"),
        "{err}"
    );

    // Every newer one corrupt, including a same-size flipped byte only the checksum catches: the oldest survives.
    let root = scratch("all-corrupt");
    for step in 1..=4 {
        checkpoint(&root, step);
    }
    truncate_half(&root.join("step-00000004/optimizer.safetensors"));
    std::fs::remove_file(root.join("step-00000003/model.safetensors")).unwrap();
    let flipped = root.join("step-00000002/model.safetensors");
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&flipped, bytes).unwrap();
    prune(&root, 1).unwrap();
    assert_eq!(steps(&root), [1, 2, 3, 4]);
    assert_eq!(latest_step(&root), Some(1));
}

#[test]
fn prune_keeps_the_newest_verified_and_deletes_corrupt_ones_between_them() {
    let root = scratch("keep-two");
    for step in 1..=5 {
        checkpoint(&root, step);
    }
    truncate_half(&root.join("step-00000004/model.safetensors"));
    std::fs::create_dir_all(root.join(".tmp-step-00000006-1")).unwrap();
    prune(&root, 2).unwrap();
    assert_eq!(
        steps(&root),
        [3, 5],
        "4 is corrupt and older than a verified one; 1 and 2 are past keep"
    );
    assert!(!root.join(".tmp-step-00000006-1").exists());
    assert_eq!(latest_step(&root), Some(5));
}

/// The attack: a manifest naming a file outside its folder (`../x`, an absolute path) with that file's real size
/// and checksum, so that verifying would read it and report the checkpoint complete.
#[test]
fn manifest_names_outside_the_folder_are_refused_when_verifying_and_pruning() {
    let base = scratch("escape");
    let root = base.join("checkpoints");
    let outside = base.join("outside.bin");
    std::fs::write(&outside, b"secret").unwrap();
    let entry = sha256_file(&outside).unwrap();
    checkpoint(&root, 1);
    for (step, name) in [
        (2, "../outside.bin".to_string()),
        (3, outside.display().to_string()),
    ] {
        let dir = checkpoint(&root, step);
        tamper(&dir, |m| {
            m.files.insert(name.clone(), entry.clone());
        });
        let err = verify(&dir).unwrap_err();
        assert_eq!(err.category(), "corrupt_checkpoint");
        let text = err.to_string();
        assert!(
            text.contains(&format!("step-0000000{step} is incomplete or corrupt"))
                && text.contains(&format!("names the file {name:?}"))
                && text.contains("plain names of files inside the checkpoint folder"),
            "{text}"
        );
    }
    assert_eq!(latest_step(&root), Some(1));
    prune(&root, 1).unwrap();
    assert_eq!(
        steps(&root),
        [1, 2, 3],
        "unverified checkpoints newer than the verified one are left"
    );
    checkpoint(&root, 4);
    prune(&root, 1).unwrap();
    assert_eq!(steps(&root), [4]);
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        b"secret",
        "nothing outside the folder is touched"
    );

    let err = read_tensors(&root.join("step-00000004"), "../outside.bin").unwrap_err();
    assert!(err.to_string().contains("is a path, not a file name"), "{err}");
}

/// The attack: checkpoint files, a manifest and a checkpoint folder that are symbolic links out of the root.
#[test]
fn symbolic_links_are_refused_and_pruning_never_follows_them() {
    let base = scratch("symlink");
    let root = base.join("checkpoints");
    let elsewhere = base.join("elsewhere");
    checkpoint(&elsewhere, 9);
    let outside_file = elsewhere.join("step-00000009/model.safetensors");

    checkpoint(&root, 1);
    let linked_file = checkpoint(&root, 2);
    std::fs::remove_file(linked_file.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(&outside_file, linked_file.join("model.safetensors")).unwrap();
    let entry = sha256_file(&outside_file).unwrap();
    tamper(&linked_file, |m| {
        m.files.insert("model.safetensors".into(), entry);
    });
    let err = verify(&linked_file).unwrap_err().to_string();
    assert!(err.contains("model.safetensors is a symbolic link"), "{err}");

    let linked_manifest = checkpoint(&root, 3);
    std::fs::remove_file(linked_manifest.join(MANIFEST)).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("step-00000009").join(MANIFEST),
        linked_manifest.join(MANIFEST),
    )
    .unwrap();
    let err = verify(&linked_manifest).unwrap_err().to_string();
    assert!(err.contains("manifest.json is not a regular file"), "{err}");

    // A whole checkpoint folder that is a link to a valid checkpoint elsewhere is not resumed.
    std::os::unix::fs::symlink(elsewhere.join("step-00000009"), root.join("step-00000004")).unwrap();
    assert_eq!(latest_step(&root), Some(1));

    checkpoint(&root, 5);
    prune(&root, 1).unwrap();
    assert_eq!(steps(&root), [5]);
    assert!(
        std::fs::symlink_metadata(root.join("step-00000004")).is_err(),
        "the link itself is removed"
    );
    assert!(outside_file.exists() && elsewhere.join("step-00000009").join(MANIFEST).exists());
    assert_eq!(verify(&elsewhere.join("step-00000009")).unwrap().step, 9);
}
