//! The settings sidecar `<output>.settings.json`: what produced a judgment file, so a resumed run never mixes
//! judgments of another judge, other prompts or other answers into it without saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::JudgeError;

/// What the judgments of one file depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSettings {
    /// `pairwise` or `single`.
    pub mode: String,
    /// The judge's name as recorded in each judgment (`judge[0]`).
    pub judge_model: String,
    /// The judge endpoint's base URL.
    pub judge_url: String,
    /// The `model` sent to the judge endpoint.
    pub judge_endpoint_model: String,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Each prompt this mode may use, by name, with its [`super::prompts::JudgePrompt::sha256`].
    pub prompts: BTreeMap<String, String>,
    /// Each judged model's answers, by model, with their sha256. Models are added as runs judge new ones.
    pub answers: BTreeMap<String, String>,
    /// The reference answer file's sha256, when one was given.
    pub references: Option<String>,
}

/// Where the settings of `output` are kept.
pub fn sidecar_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_os_string();
    s.push(".settings.json");
    PathBuf::from(s)
}

/// The differences that make `old`'s judgments incomparable with `new`'s, one line each (`what: old → new`). A
/// model judged in one run and not the other is no difference: its judgments stand on their own.
pub fn changes(old: &JudgeSettings, new: &JudgeSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name}: {a} → {b}"));
        }
    };
    field("mode", old.mode.clone(), new.mode.clone());
    field("judge model", old.judge_model.clone(), new.judge_model.clone());
    field("judge URL", old.judge_url.clone(), new.judge_url.clone());
    field(
        "judge endpoint model",
        old.judge_endpoint_model.clone(),
        new.judge_endpoint_model.clone(),
    );
    field(
        "temperature",
        old.temperature.to_string(),
        new.temperature.to_string(),
    );
    field(
        "max_tokens",
        old.max_tokens.to_string(),
        new.max_tokens.to_string(),
    );
    let opt = |d: &Option<String>| d.as_deref().map_or_else(|| "none".to_string(), short);
    field("reference answers", opt(&old.references), opt(&new.references));
    let names: std::collections::BTreeSet<&String> = old.prompts.keys().chain(new.prompts.keys()).collect();
    for name in names {
        let get =
            |m: &BTreeMap<String, String>| m.get(name).map_or_else(|| "absent".to_string(), |d| short(d));
        field(&format!("prompt {name}"), get(&old.prompts), get(&new.prompts));
    }
    for (model, digest) in &new.answers {
        if let Some(before) = old.answers.get(model) {
            field(&format!("answers of {model}"), short(before), short(digest));
        }
    }
    out
}

/// A digest's first 12 hex digits, enough to tell two apart in a message.
fn short(digest: &str) -> String {
    digest.chars().take(12).collect()
}

/// Checks `output`'s sidecar against `current` before a run and records `current` in it.
///
/// With no output yet, the sidecar is (re)written. With an output and a sidecar that differs, the run is refused
/// with the list of changes, unless `force_new`: then the old output and sidecar are moved aside to `*.old`
/// (replacing earlier ones) and the run starts a new file. An output without a sidecar (FastChat's, or an older
/// camelid's) is resumed with a warning, as nothing says what made it.
pub(crate) fn reconcile(output: &Path, current: &JudgeSettings, force_new: bool) -> Result<(), JudgeError> {
    let sidecar = sidecar_path(output);
    let mut record = current.clone();
    if output.exists() {
        match read(&sidecar)? {
            Some(old) => {
                let changed = changes(&old, current);
                if !changed.is_empty() {
                    if !force_new {
                        return Err(JudgeError::SettingsChanged {
                            path: output.to_path_buf(),
                            changes: changed,
                        });
                    }
                    tracing::warn!(output = %output.display(), changes = ?changed, "settings changed: starting a new file");
                    for path in [output, sidecar.as_path()] {
                        let mut aside = path.as_os_str().to_os_string();
                        aside.push(".old");
                        std::fs::rename(path, PathBuf::from(aside)).map_err(|source| JudgeError::Write {
                            path: path.to_path_buf(),
                            source,
                        })?;
                    }
                } else {
                    for (model, digest) in old.answers {
                        record.answers.entry(model).or_insert(digest);
                    }
                }
            }
            None => {
                tracing::warn!(output = %output.display(), "no settings recorded for the existing judgments; resuming them as they are");
            }
        }
    }
    write(&sidecar, &record)
}

/// The sidecar at `path`, if there is one.
fn read(path: &Path) -> Result<Option<JudgeSettings>, JudgeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JudgeError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| JudgeError::SettingsParse {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes the sidecar through a temporary file renamed over it.
fn write(path: &Path, settings: &JudgeSettings) -> Result<(), JudgeError> {
    let io = |source| JudgeError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut text = serde_json::to_string_pretty(settings).map_err(|e| io(std::io::Error::other(e)))?;
    text.push('\n');
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> JudgeSettings {
        JudgeSettings {
            mode: "pairwise".into(),
            judge_model: "gpt-4".into(),
            judge_url: "http://a/v1".into(),
            judge_endpoint_model: "gpt-4".into(),
            temperature: 0.0,
            max_tokens: 2048,
            prompts: [("pair-v2".to_string(), "aaaaaaaaaaaaaaaa".to_string())].into(),
            answers: [("m1".to_string(), "1111111111111111".to_string())].into(),
            references: None,
        }
    }

    #[test]
    fn changes_name_each_difference_old_to_new() {
        let old = settings();
        let mut new = settings();
        assert!(changes(&old, &new).is_empty());
        new.judge_url = "http://b/v1".into();
        new.prompts.insert("pair-v2".into(), "bbbbbbbbbbbbbbbb".into());
        new.answers.insert("m1".into(), "2222222222222222".into());
        new.answers.insert("m2".into(), "3333".into());
        new.references = Some("cccc".into());
        let c = changes(&old, &new);
        assert_eq!(
            c,
            [
                "judge URL: http://a/v1 → http://b/v1",
                "reference answers: none → cccc",
                "prompt pair-v2: aaaaaaaaaaaa → bbbbbbbbbbbb",
                "answers of m1: 111111111111 → 222222222222",
            ]
        );
    }

    #[test]
    fn the_sidecar_sits_next_to_the_output() {
        assert_eq!(
            sidecar_path(Path::new("d/gpt-4_pair.jsonl")),
            PathBuf::from("d/gpt-4_pair.jsonl.settings.json")
        );
    }
}
