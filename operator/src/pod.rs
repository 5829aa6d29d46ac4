//! Pieces of the pods both controllers build: where claims and downloads are mounted, the init container that
//! downloads a model given by URI, the restricted security contexts every pod gets ([`harden`]), and environment
//! variables. At the crate root so that a FineTuneJob's trainers and a ChatModel's workers are built from the
//! same parts.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PodSecurityContext, PodSpec, SeccompProfile,
    SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::settings::Settings;

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
/// `DOWNLOAD_DIR/model.gguf`: over https only (redirects too) unless the operator's policy allows http, at most
/// the policy's size (the spec's `maxBytes` may lower it), checked against the spec's `sha256` when it has one.
/// The file gets its name only once complete and verified. The URI and checksum reach the shell as environment
/// variables, never as script text. The operator has checked them ([`crate::policy::Policy::check_source`]).
pub fn download(
    settings: &Settings,
    uri: &str,
    sha256: Option<&str>,
    max_bytes: Option<i64>,
) -> (Volume, VolumeMount, Container) {
    let max = settings.policy.max_bytes(max_bytes);
    let volume = Volume {
        name: "download".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            // The kubelet evicts a pod whose download outgrows its limit (plus room for the part file's end).
            size_limit: Some(Quantity(max.saturating_add(1 << 20).to_string())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "download".into(),
        mount_path: DOWNLOAD_DIR.into(),
        ..VolumeMount::default()
    };
    let protocols = if settings.policy.allow_http_uris {
        "=http,https"
    } else {
        "=https"
    };
    let fetch = Container {
        name: "fetch-model".into(),
        image: Some(settings.fetch_image.clone()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), FETCH_SCRIPT.into()]),
        env: Some(vec![
            env_var("MODEL_URI", uri),
            env_var("MODEL_SHA256", sha256.unwrap_or_default()),
            env_var("MODEL_MAX_BYTES", max.to_string()),
            env_var("MODEL_PROTOCOLS", protocols),
            env_var("MODEL_FILE", format!("{DOWNLOAD_DIR}/model.gguf")),
        ]),
        volume_mounts: Some(vec![mount.clone()]),
        security_context: Some(restricted()),
        ..Container::default()
    };
    (volume, mount, fetch)
}

/// The fetch container's script (POSIX sh, curl and sha256sum: the curl image has both).
const FETCH_SCRIPT: &str = r#"set -eu
curl -fsSL --retry 5 --max-redirs 5 --proto "$MODEL_PROTOCOLS" --proto-redir "$MODEL_PROTOCOLS" --max-filesize "$MODEL_MAX_BYTES" -o "$MODEL_FILE.part" "$MODEL_URI"
size=$(wc -c < "$MODEL_FILE.part")
if [ "$size" -gt "$MODEL_MAX_BYTES" ]; then echo "the model is $size bytes, over the limit of $MODEL_MAX_BYTES" >&2; exit 1; fi
if [ -n "$MODEL_SHA256" ]; then echo "$MODEL_SHA256  $MODEL_FILE.part" | sha256sum -c -; fi
mv "$MODEL_FILE.part" "$MODEL_FILE"
"#;

/// camelid's images run as user 1000, never root, under the runtime's default seccomp profile.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        run_as_group: Some(1000),
        fs_group: Some(1000),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// A container that cannot escalate its privileges, has no capabilities, runs non-root and cannot write its
/// root filesystem (what it writes goes to its volumes and the `/tmp` emptyDir, [`harden`]).
pub fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    }
}

/// Where a container's scratch files go on a read-only root filesystem: an emptyDir, also its `HOME` (CUDA's
/// and other libraries' caches live under it).
pub const SCRATCH_DIR: &str = "/tmp";

/// The ServiceAccount of one resource's pods (a FineTuneJob's trainers and evaluation, a ChatModel's workers):
/// their own, so that whatever a namespace's `default` account has been granted (a RoleBinding, a cloud identity)
/// is never theirs, and so that a user can bind one model's or job's identity alone. No token is mounted.
pub fn service_account(metadata: ObjectMeta) -> ServiceAccount {
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// What every pod the operator builds gets, whichever controller builds it: its own ServiceAccount `account`
/// ([`service_account`]) without a token (none of the trainer, worker, fetch and evaluation containers talks to
/// the API server), the restricted security contexts, and a scratch emptyDir at [`SCRATCH_DIR`] (also `HOME`) in
/// every container, since their root filesystems are read-only.
pub fn harden(spec: &mut PodSpec, account: &str) {
    spec.service_account_name = Some(account.into());
    spec.automount_service_account_token = Some(false);
    spec.security_context = Some(pod_security());
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "scratch".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    let containers = spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut());
    for c in containers {
        c.security_context = Some(restricted());
        c.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
            name: "scratch".into(),
            mount_path: SCRATCH_DIR.into(),
            ..VolumeMount::default()
        });
        c.env
            .get_or_insert_with(Vec::new)
            .push(env_var("HOME", SCRATCH_DIR));
    }
}
