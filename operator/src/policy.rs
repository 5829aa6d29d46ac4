//! The operator's policy over what a FineTuneJob or ChatModel author may put into the pods the operator creates
//! for them (pure). The operator creates pods with its own ServiceAccount's rights, so without a policy anyone who
//! may write a FineTuneJob or ChatModel, but not a pod, would choose the image, the priority class and the
//! tolerations of pods that run in their namespace: a confused deputy. The cluster admin sets the policy (the
//! chart's `policy` values, the operator's `--allowed-*` flags); a spec outside it is refused before anything is
//! built, naming the field, and waits for a change.
//!
//! Node selectors are not policed: they only narrow where a pod may go among the nodes its tolerations admit,
//! and tainted pools (GPU, spot, system) stay closed without a toleration the policy allows.

use camelid_crds::common::{ModelSource, SpotPolicy};
use camelid_crds::{ChatModel, FineTuneJob};
use k8s_openapi::api::core::v1::Toleration;

use crate::settings::Settings;

/// The largest model download when the operator is given no `--max-model-bytes`: 256 GiB.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 256 << 30;

/// What the pods the operator creates may be given by a spec's author.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Image prefixes a spec's `image` may start with (a registry and path, e.g. `ghcr.io/camelid-dev/`). The
    /// operator's own images (its `--*-image` flags) are always allowed.
    pub image_prefixes: Vec<String>,
    /// PriorityClasses a FineTuneJob's `priorityClassName` may name (none by default).
    pub priority_classes: Vec<String>,
    /// Taint keys a spec's `spot.tolerations` may tolerate; `*` allows any key, and only it allows a toleration
    /// without a key (which tolerates every taint).
    pub toleration_keys: Vec<String>,
    /// Whether a model `uri` may be `http://` (in-cluster mirrors, tests); otherwise only `https://`.
    pub allow_http_uris: bool,
    /// The most bytes a model download may have; a spec's `maxBytes` may only lower it.
    pub max_model_bytes: u64,
}

impl Default for Policy {
    /// The chart's images, no priority classes, the taints the operator itself tolerates (the spot pools' and
    /// the GPU nodes'), https only, 256 GiB.
    fn default() -> Self {
        Self {
            image_prefixes: vec!["ghcr.io/camelid-dev/".into()],
            priority_classes: Vec::new(),
            toleration_keys: crate::placement::OPERATOR_TAINTS
                .iter()
                .map(|k| k.to_string())
                .collect(),
            allow_http_uris: false,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
        }
    }
}

/// Why a spec is refused: the field (its path in the spec) and what the policy allows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct Denied {
    /// The field's path, e.g. `spec.spot.tolerations[1].key`.
    pub field: String,
    pub why: String,
}

impl Denied {
    fn new(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// Whether `image` is under `prefix`: a prefix ending in `/`, `:` or `@` is a plain prefix; any other must be
/// the whole repository (`ghcr.io/camelid-dev` allows `ghcr.io/camelid-dev/x` and `ghcr.io/camelid-dev:1`, not
/// `ghcr.io/camelid-dev-evil/x`).
fn under(image: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    match image.strip_prefix(prefix) {
        None => false,
        Some(rest) => {
            prefix.ends_with(['/', ':', '@']) || rest.is_empty() || rest.starts_with(['/', ':', '@'])
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl Policy {
    /// `image` at `field`, allowed when it is one of the operator's own images or under an allowed prefix.
    pub fn check_image(&self, field: &str, image: &str, settings: &Settings) -> Result<(), Denied> {
        let own = [
            &settings.trainer_image,
            &settings.worker_image,
            &settings.eval_image,
            &settings.fetch_image,
        ];
        if own.iter().any(|i| i.as_str() == image) || self.image_prefixes.iter().any(|p| under(image, p)) {
            return Ok(());
        }
        Err(Denied::new(
            field,
            format!(
                "image {image:?} is not allowed by the operator's policy (allowed: the operator's own images and \
                 images under {})",
                list(&self.image_prefixes)
            ),
        ))
    }

    pub fn check_priority_class(&self, field: &str, class: &str) -> Result<(), Denied> {
        if self.priority_classes.iter().any(|c| c == class) {
            return Ok(());
        }
        Err(Denied::new(
            field,
            format!(
                "PriorityClass {class:?} is not allowed by the operator's policy (allowed: {})",
                list(&self.priority_classes)
            ),
        ))
    }

    /// The user's tolerations (the operator adds its own spot and GPU ones itself).
    pub fn check_tolerations(&self, field: &str, tolerations: &[Toleration]) -> Result<(), Denied> {
        let any = self.toleration_keys.iter().any(|k| k == "*");
        for (i, t) in tolerations.iter().enumerate() {
            let allowed = match t.key.as_deref() {
                None | Some("") => any,
                Some(key) => any || self.toleration_keys.iter().any(|k| k == key),
            };
            if !allowed {
                let what = match t.key.as_deref() {
                    None | Some("") => "a toleration without a key tolerates every taint; it".to_string(),
                    Some(key) => format!("the taint key {key:?}"),
                };
                return Err(Denied::new(
                    format!("{field}[{i}].key"),
                    format!(
                        "{what} is not allowed by the operator's policy (allowed keys: {})",
                        list(&self.toleration_keys)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A model source's download: `https://` (or `http://` when allowed), a host, and a size limit within the
    /// operator's. `field` is the source's path (`spec.model`).
    pub fn check_source(&self, field: &str, source: &ModelSource) -> Result<(), Denied> {
        if let Some(uri) = &source.uri {
            self.check_uri(&format!("{field}.uri"), uri)?;
        }
        if let Some(max) = source.max_bytes {
            let fits = u64::try_from(max).is_ok_and(|m| m >= 1 && m <= self.max_model_bytes);
            if !fits {
                return Err(Denied::new(
                    format!("{field}.maxBytes"),
                    format!(
                        "{max} is not within 1..={} (the operator's --max-model-bytes)",
                        self.max_model_bytes
                    ),
                ));
            }
        }
        if let Some(sha) = &source.sha256
            && !(sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(Denied::new(
                format!("{field}.sha256"),
                "must be 64 lowercase hex digits",
            ));
        }
        Ok(())
    }

    /// A download URI: its scheme, and a host without credentials or characters a shell or curl would read.
    pub fn check_uri(&self, field: &str, uri: &str) -> Result<(), Denied> {
        let rest = if let Some(rest) = uri.strip_prefix("https://") {
            rest
        } else if let Some(rest) = uri.strip_prefix("http://") {
            if !self.allow_http_uris {
                return Err(Denied::new(
                    field,
                    format!(
                        "{uri:?} is plain http: it can be read and changed on the way; use https (the operator \
                         allows http only with --allow-http-model-uris)"
                    ),
                ));
            }
            rest
        } else {
            return Err(Denied::new(field, format!("{uri:?} is not an https:// URL")));
        };
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() || host.contains('@') {
            return Err(Denied::new(
                field,
                format!("{uri:?} has no host, or credentials in it (put none in a spec)"),
            ));
        }
        if uri.chars().any(|c| c.is_whitespace() || c.is_control()) || uri.len() > 2048 {
            return Err(Denied::new(
                field,
                "the URL has spaces or control characters, or is over 2048 bytes",
            ));
        }
        Ok(())
    }

    fn check_spot(&self, field: &str, spot: &SpotPolicy) -> Result<(), Denied> {
        self.check_tolerations(&format!("{field}.tolerations"), &spot.tolerations)
    }

    /// Everything a FineTuneJob's author chooses for its pods: the trainer image, the evaluation image, the
    /// priority class, the spot tolerations and the base model's download.
    pub fn check_finetunejob(&self, job: &FineTuneJob, settings: &Settings) -> Result<(), Denied> {
        let s = &job.spec;
        if let Some(image) = &s.image {
            self.check_image("spec.image", image, settings)?;
        }
        if let Some(image) = s.evaluation.as_ref().and_then(|e| e.image.as_ref()) {
            self.check_image("spec.evaluation.image", image, settings)?;
        }
        if let Some(class) = &s.priority_class_name {
            self.check_priority_class("spec.priorityClassName", class)?;
        }
        self.check_spot("spec.spot", &s.spot)?;
        self.check_source("spec.baseModel", &s.base_model)
    }

    /// Everything a ChatModel's author chooses for its workers: the image, the spot tolerations and the model's
    /// download.
    pub fn check_chatmodel(&self, model: &ChatModel, settings: &Settings) -> Result<(), Denied> {
        let s = &model.spec;
        if let Some(image) = &s.image {
            self.check_image("spec.image", image, settings)?;
        }
        self.check_spot("spec.spot", &s.spot)?;
        self.check_source("spec.model", &s.model)
    }

    /// The download limit of `source`: its own `maxBytes` within the operator's.
    pub fn max_bytes(&self, source_max: Option<i64>) -> u64 {
        source_max
            .and_then(|m| u64::try_from(m).ok())
            .map_or(self.max_model_bytes, |m| m.min(self.max_model_bytes))
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
