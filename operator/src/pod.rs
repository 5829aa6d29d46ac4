//! Pieces of the pods both controllers build: where claims and downloads are mounted, the init container that
//! downloads a model given by URI, the non-root security contexts, and environment variables. At the crate root
//! so that a FineTuneJob's trainers and a ChatModel's workers are built from the same parts.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PodSecurityContext, SecurityContext, Volume,
    VolumeMount,
};

/// Where each claim is mounted.
pub const VOLUMES_ROOT: &str = "/camelid/volumes";
/// Where a model given by URI is downloaded.
pub const DOWNLOAD_DIR: &str = "/camelid/download";

/// The path of `path` on `claim`, as mounted under [`VOLUMES_ROOT`].
pub fn on_claim(claim: &str, path: &str) -> String {
    format!("{VOLUMES_ROOT}/{claim}/{}", path.trim_start_matches('/'))
}

/// An environment variable with a literal value.
pub fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The emptyDir, its mount and the init container that download a model given by URI to
/// `DOWNLOAD_DIR/model.gguf`.
pub fn download(fetch_image: &str, uri: &str) -> (Volume, VolumeMount, Container) {
    let volume = Volume {
        name: "download".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "download".into(),
        mount_path: DOWNLOAD_DIR.into(),
        ..VolumeMount::default()
    };
    let fetch = Container {
        name: "fetch-model".into(),
        image: Some(fetch_image.to_string()),
        args: Some(vec![
            "-fsSL".into(),
            "--retry".into(),
            "5".into(),
            "-o".into(),
            format!("{DOWNLOAD_DIR}/model.gguf"),
            uri.to_string(),
        ]),
        volume_mounts: Some(vec![mount.clone()]),
        security_context: Some(restricted()),
        ..Container::default()
    };
    (volume, mount, fetch)
}

/// camelid's images run as user 1000, never root.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        fs_group: Some(1000),
        ..PodSecurityContext::default()
    }
}

/// A container that cannot escalate its privileges and has no capabilities.
pub fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..SecurityContext::default()
    }
}
