//! The answer file and the settings recorded next to it (`<out>.settings.json`): checked before a run resumes,
//! moved aside when a run starts over, and the file sorted by question at the end the way FastChat's
//! `reorg_answer_file` does, so a resumed run's file and an uninterrupted run's differ only in `tstamp`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::AnswerError;
use super::settings::Fingerprint;
use crate::format::ModelAnswer;
use crate::jsonl::{self, JsonlError};

/// `<out>.settings.json`.
pub fn settings_path(out: &Path) -> PathBuf {
    with_suffix(out, ".settings.json")
}

/// `<out>.old`, where a run that starts over moves the previous answers.
pub fn old_path(out: &Path) -> PathBuf {
    with_suffix(out, ".old")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes `out` ready for a run under `fingerprint`: resumes when the recorded settings match (or there is
/// nothing yet); otherwise refuses, listing what changed, or with `force_new` moves the old answers and their
/// settings aside to `<out>.old` and `<out>.old.settings.json`. Then records `fingerprint`.
pub(super) fn prepare(out: &Path, fingerprint: &Fingerprint, force_new: bool) -> Result<(), AnswerError> {
    let sidecar = settings_path(out);
    let wanted = to_map(fingerprint)?;
    let recorded = read_recorded(&sidecar)?;
    let has_answers = std::fs::metadata(out).is_ok_and(|m| m.len() > 0);
    let conflict = match &recorded {
        Some(old) if *old == wanted => return Ok(()),
        Some(old) => Some(AnswerError::SettingsChanged {
            sidecar: sidecar.clone(),
            changes: changes(old, &wanted),
        }),
        None if has_answers => Some(AnswerError::UnknownOutput {
            path: out.to_path_buf(),
        }),
        None => None,
    };
    if let Some(conflict) = conflict {
        if !force_new {
            return Err(conflict);
        }
        tracing::warn!(out = %out.display(), reason = %conflict, "starting over; the old answers move to .old");
        move_aside(out)?;
    }
    write_recorded(&sidecar, fingerprint)
}

/// The recorded settings, None when there are none yet.
fn read_recorded(sidecar: &Path) -> Result<Option<Map<String, Value>>, AnswerError> {
    let text = match std::fs::read_to_string(sidecar) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(sidecar, source)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| AnswerError::SettingsUnreadable {
            path: sidecar.to_path_buf(),
            source,
        })
}

/// Writes the settings through a temporary file renamed over the old, so a kill leaves the old or the new.
fn write_recorded(sidecar: &Path, fingerprint: &Fingerprint) -> Result<(), AnswerError> {
    if let Some(dir) = sidecar.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut text =
        serde_json::to_string_pretty(fingerprint).map_err(|e| io(sidecar, std::io::Error::other(e)))?;
    text.push('\n');
    let tmp = with_suffix(sidecar, ".tmp");
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, sidecar).map_err(|e| io(sidecar, e))
}

/// Moves the answers and their settings (whichever exist) to `<out>.old` and `<out>.old.settings.json`,
/// replacing an earlier `.old`.
fn move_aside(out: &Path) -> Result<(), AnswerError> {
    let old = old_path(out);
    for (from, to) in [
        (out.to_path_buf(), old.clone()),
        (settings_path(out), settings_path(&old)),
    ] {
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&from, e)),
        }
    }
    Ok(())
}

/// Every field that differs, as `field: old → new`, in the field order of the new settings (then fields only
/// the old had).
pub(super) fn changes(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<String> {
    let show = |v: Option<&Value>| match v {
        None => "(absent)".to_string(),
        Some(Value::Null) => "none".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let keys = new.keys().chain(old.keys().filter(|k| !new.contains_key(*k)));
    keys.filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("{k}: {} → {}", show(old.get(k)), show(new.get(k))))
        .collect()
}

fn to_map(fingerprint: &Fingerprint) -> Result<Map<String, Value>, AnswerError> {
    match serde_json::to_value(fingerprint) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(AnswerError::InvalidSettings {
            detail: format!("the settings record is not an object: {other}"),
        }),
        Err(e) => Err(AnswerError::InvalidSettings {
            detail: e.to_string(),
        }),
    }
}

/// The answers already in `out` (none when it does not exist), a torn last line dropped.
pub(super) fn read_answers(out: &Path) -> Result<Vec<ModelAnswer>, AnswerError> {
    if !out.exists() {
        return Ok(Vec::new());
    }
    let lines = jsonl::read::<ModelAnswer>(out, true).map_err(AnswerError::Output)?;
    Ok(lines.into_iter().map(|l| l.record).collect())
}

/// Rewrites an answer file sorted by question id, one answer per question (the last written wins), as FastChat's
/// `reorg_answer_file` does. Returns how many answers it holds.
pub fn reorganize(path: &Path) -> Result<usize, JsonlError> {
    let mut by_id = BTreeMap::new();
    for line in jsonl::read::<ModelAnswer>(path, true)? {
        by_id.insert(line.record.question_id.clone(), line.record);
    }
    let answers: Vec<ModelAnswer> = by_id.into_values().collect();
    jsonl::write_all(path, &answers)?;
    Ok(answers.len())
}

fn io(path: &Path, source: std::io::Error) -> AnswerError {
    AnswerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::format::{Choice, QuestionId};

    fn fingerprint(max_tokens: u32) -> Fingerprint {
        Fingerprint {
            base_url: "http://x/v1".into(),
            model: "m".into(),
            model_id: "m".into(),
            temperature: "fastchat-by-category".into(),
            max_tokens,
            system_prompt: None,
            seed: Some(0),
            questions_sha256: "abc".into(),
            question_begin: None,
            question_end: None,
            max_questions: None,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("camelid-answer-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn answer(id: i64, text: &str) -> ModelAnswer {
        ModelAnswer {
            question_id: QuestionId::Number(id),
            answer_id: format!("a{id}"),
            model_id: "m".into(),
            choices: vec![Choice {
                index: 0,
                turns: vec![text.into()],
            }],
            tstamp: 1.0,
        }
    }

    #[test]
    fn changes_name_every_field_with_both_values() {
        let mut new = to_map(&fingerprint(128)).unwrap();
        let old = to_map(&fingerprint(64)).unwrap();
        new.insert("seed".into(), Value::Null);
        let c = changes(&old, &new);
        assert_eq!(c, ["max_tokens: 64 → 128", "seed: 0 → none"]);
        let mut older = old.clone();
        older.insert("retired".into(), Value::String("x".into()));
        assert_eq!(changes(&older, &old), ["retired: x → (absent)"]);
    }

    #[test]
    fn prepare_resumes_refuses_or_moves_aside() {
        let out = dir("prepare").join("m.jsonl");
        prepare(&out, &fingerprint(64), false).unwrap();
        std::fs::write(&out, "{}\n").unwrap();
        prepare(&out, &fingerprint(64), false).unwrap();
        let err = prepare(&out, &fingerprint(128), false).unwrap_err();
        assert_eq!(err.category(), "settings_changed");
        assert!(err.to_string().contains("max_tokens: 64 → 128"), "{err}");
        prepare(&out, &fingerprint(128), true).unwrap();
        assert!(!out.exists());
        assert_eq!(std::fs::read_to_string(old_path(&out)).unwrap(), "{}\n");
        assert!(settings_path(&old_path(&out)).exists());
        std::fs::remove_file(settings_path(&out)).unwrap();
        std::fs::write(&out, "{}\n").unwrap();
        assert_eq!(
            prepare(&out, &fingerprint(128), false).unwrap_err().category(),
            "unknown_output"
        );
        std::fs::write(settings_path(&out), "{not json").unwrap();
        assert_eq!(
            prepare(&out, &fingerprint(128), false).unwrap_err().category(),
            "settings_unreadable"
        );
    }

    #[test]
    fn reorganize_sorts_and_keeps_the_last_answer_per_question() {
        let out = dir("reorg").join("m.jsonl");
        let lines: Vec<_> = [answer(3, "c"), answer(1, "a"), answer(3, "c2"), answer(2, "b")]
            .iter()
            .map(|a| serde_json::to_string(a).unwrap() + "\n")
            .collect();
        std::fs::write(&out, lines.concat() + "{\"question_id\": 9, \"answ").unwrap();
        assert_eq!(reorganize(&out).unwrap(), 3);
        let back = read_answers(&out).unwrap();
        let got: Vec<_> = back
            .iter()
            .map(|a| (a.question_id.to_string(), a.choices[0].turns[0].clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("1".into(), "a".into()),
                ("2".into(), "b".into()),
                ("3".into(), "c2".into())
            ]
        );
    }
}
