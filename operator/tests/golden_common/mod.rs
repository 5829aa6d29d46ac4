//! Shared by the golden tests (`golden.rs`, `golden_chatmodel.rs`): the examples users start from, given a uid so
//! that their children have an owner to point at, and the YAML snapshots in `tests/golden/` that what they build
//! is compared with.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::Path;

use kube::Resource;
use serde::de::DeserializeOwned;

/// `examples/<file>`, with uid `uid`.
pub fn example<K: Resource + DeserializeOwned>(file: &str, uid: &str) -> K {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let mut object: K = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    object.meta_mut().uid = Some(uid.into());
    object
}

/// Asserts that `actual` is the snapshot `tests/golden/<name>`; with `UPDATE_GOLDEN` set, rewrites the snapshot
/// instead, for review like code.
pub fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 rewrites it):\n{actual}",
        path.display()
    );
}
