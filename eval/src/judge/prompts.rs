//! FastChat's judge prompts (`judge_prompts.jsonl`), which one a question gets, and how it is filled.
//!
//! The prompts are FastChat's own, copied verbatim (Apache-2.0, `eval/prompts/LICENSE-FastChat`) and embedded, so a
//! judgment of ours and one of FastChat's ask the judge the same words and their scores compare. A caller may pass
//! its own file in the same format (a newer FastChat's, a translation).
//!
//! Filling follows Python's `str.format` with keyword arguments only, which is what FastChat calls: `{name}` is
//! replaced, `{{` and `}}` are literal braces, the filled-in texts are never parsed again (an answer full of code
//! braces is safe), and a placeholder with no value is an error, as Python's `KeyError` is. Conversions, format
//! specs and attribute or index lookups (`{a!r}`, `{a:>9}`, `{a.b}`, `{a[0]}`) appear in no FastChat prompt and are
//! refused rather than half-implemented.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::JudgeError;
use crate::jsonl;

/// FastChat's categories whose questions have one right answer, judged against a reference answer
/// (`common.NEED_REF_CATS`).
pub const NEED_REF_CATS: [&str; 4] = ["math", "reasoning", "coding", "arena-hard-200"];

/// FastChat 0.2.36's `data/judge_prompts.jsonl`.
const EMBEDDED: &str = include_str!("../../prompts/judge_prompts.jsonl");

/// What [`JudgePrompts::origin`] says for the embedded prompts.
pub const EMBEDDED_ORIGIN: &str = "embedded (FastChat 0.2.36)";

/// The two ways FastChat judges: two answers against each other, or one answer graded 1 to 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JudgeMode {
    Pairwise,
    Single,
}

impl JudgeMode {
    /// FastChat's `type` field of the prompts for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            JudgeMode::Pairwise => "pairwise",
            JudgeMode::Single => "single",
        }
    }

    /// The verdict format this mode's prompts must ask for (the only one per mode we parse).
    pub fn output_format(self) -> &'static str {
        match self {
            JudgeMode::Pairwise => "[[A]]",
            JudgeMode::Single => "[[rating]]",
        }
    }

    /// The four prompts this mode may use, as [`prompt_name`] picks them.
    pub fn prompt_names(self) -> [&'static str; 4] {
        [(false, false), (false, true), (true, false), (true, true)]
            .map(|(reference, multi_turn)| prompt_name(self, reference, multi_turn))
    }
}

/// FastChat's choice of prompt (`gen_judgment.make_judge_pairwise` / `make_judge_single`): the reference-guided
/// one for a question in [`NEED_REF_CATS`] that has a reference, the multi-turn one for turn 2.
pub fn prompt_name(mode: JudgeMode, reference_guided: bool, multi_turn: bool) -> &'static str {
    match (mode, reference_guided, multi_turn) {
        (JudgeMode::Pairwise, false, false) => "pair-v2",
        (JudgeMode::Pairwise, false, true) => "pair-v2-multi-turn",
        (JudgeMode::Pairwise, true, false) => "pair-math-v1",
        (JudgeMode::Pairwise, true, true) => "pair-math-v1-multi-turn",
        (JudgeMode::Single, false, false) => "single-v1",
        (JudgeMode::Single, false, true) => "single-v1-multi-turn",
        (JudgeMode::Single, true, false) => "single-math-v1",
        (JudgeMode::Single, true, true) => "single-math-v1-multi-turn",
    }
}

/// Whether FastChat judges this category against a reference answer.
pub fn needs_reference(category: &str) -> bool {
    NEED_REF_CATS.contains(&category)
}

/// One line of `judge_prompts.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgePrompt {
    pub name: String,
    /// `pairwise` or `single`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub system_prompt: String,
    pub prompt_template: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub category: String,
    /// `[[A]]` or `[[rating]]` for the prompts we use.
    pub output_format: String,
}

impl JudgePrompt {
    /// The template filled with `values`, as Python's `prompt_template.format(**values)` would fill it. Values
    /// the template does not name are ignored, as Python ignores unused keyword arguments.
    pub fn fill(&self, values: &[(&str, &str)]) -> Result<String, JudgeError> {
        format_like_python(&self.prompt_template, values).map_err(|detail| JudgeError::Template {
            prompt: self.name.clone(),
            detail,
        })
    }

    /// A digest of what reaches the judge and how its answer is read (system prompt, template, output format), so
    /// a judgment file records which words produced it.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.system_prompt, &self.prompt_template, &self.output_format] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex(&h.finalize())
    }
}

/// A set of judge prompts by name.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgePrompts {
    by_name: BTreeMap<String, JudgePrompt>,
    origin: String,
}

impl JudgePrompts {
    /// FastChat's prompts, embedded in the binary.
    pub fn embedded() -> Result<Self, JudgeError> {
        let mut by_name = BTreeMap::new();
        for (i, line) in EMBEDDED.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let prompt: JudgePrompt = serde_json::from_str(line)
                .map_err(|source| JudgeError::EmbeddedPrompts { line: i + 1, source })?;
            by_name.insert(prompt.name.clone(), prompt);
        }
        Ok(Self {
            by_name,
            origin: EMBEDDED_ORIGIN.to_string(),
        })
    }

    /// The prompts of a file in FastChat's format; a later line with the same name replaces an earlier one, as
    /// FastChat's `load_judge_prompts` does.
    pub fn from_file(path: &Path) -> Result<Self, JudgeError> {
        let mut by_name = BTreeMap::new();
        for line in jsonl::read::<JudgePrompt>(path, false).map_err(JudgeError::PromptFile)? {
            by_name.insert(line.record.name.clone(), line.record);
        }
        Ok(Self {
            by_name,
            origin: path.display().to_string(),
        })
    }

    /// The prompt called `name`.
    pub fn get(&self, name: &str) -> Result<&JudgePrompt, JudgeError> {
        self.by_name.get(name).ok_or_else(|| JudgeError::MissingPrompt {
            name: name.to_string(),
            origin: self.origin.clone(),
        })
    }

    /// Where the prompts came from: [`EMBEDDED_ORIGIN`] or the file's path.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The four prompts of `mode`, checked to be of that type and to ask for the verdict format we parse, so a
    /// wrong prompt file fails before the first request rather than as a file of unparseable verdicts.
    pub fn for_mode(&self, mode: JudgeMode) -> Result<BTreeMap<&'static str, &JudgePrompt>, JudgeError> {
        let mut out = BTreeMap::new();
        for name in mode.prompt_names() {
            let prompt = self.get(name)?;
            if prompt.kind != mode.as_str() || prompt.output_format != mode.output_format() {
                return Err(JudgeError::PromptMismatch {
                    name: name.to_string(),
                    expected: format!(
                        "type {:?}, output_format {:?}",
                        mode.as_str(),
                        mode.output_format()
                    ),
                    found: format!("type {:?}, output_format {:?}", prompt.kind, prompt.output_format),
                });
            }
            out.insert(name, prompt);
        }
        Ok(out)
    }
}

/// The keyword arguments FastChat's `run_judge_pair` passes for one game: the question and both answers (turn 1),
/// or the whole two-turn conversation of each (turn 2), plus the reference answer's turns when judged against one.
/// `None` when a text the turn needs is missing.
pub fn pair_values<'a>(
    question: &'a [String],
    answer_a: &'a [String],
    answer_b: &'a [String],
    reference: Option<&'a [String]>,
    turn: u32,
) -> Option<Vec<(&'static str, &'a str)>> {
    let at = |texts: &'a [String], i: usize| texts.get(i).map(String::as_str);
    let mut v = reference_values(reference, turn)?;
    if turn == 2 {
        v.extend([
            ("question_1", at(question, 0)?),
            ("question_2", at(question, 1)?),
            ("answer_a_1", at(answer_a, 0)?),
            ("answer_b_1", at(answer_b, 0)?),
            ("answer_a_2", at(answer_a, 1)?),
            ("answer_b_2", at(answer_b, 1)?),
        ]);
    } else {
        v.extend([
            ("question", at(question, 0)?),
            ("answer_a", at(answer_a, 0)?),
            ("answer_b", at(answer_b, 0)?),
        ]);
    }
    Some(v)
}

/// The keyword arguments FastChat's `run_judge_single` passes: as [`pair_values`] with one answer.
pub fn single_values<'a>(
    question: &'a [String],
    answer: &'a [String],
    reference: Option<&'a [String]>,
    turn: u32,
) -> Option<Vec<(&'static str, &'a str)>> {
    let at = |texts: &'a [String], i: usize| texts.get(i).map(String::as_str);
    let mut v = reference_values(reference, turn)?;
    if turn == 2 {
        v.extend([
            ("question_1", at(question, 0)?),
            ("question_2", at(question, 1)?),
            ("answer_1", at(answer, 0)?),
            ("answer_2", at(answer, 1)?),
        ]);
    } else {
        v.extend([("question", at(question, 0)?), ("answer", at(answer, 0)?)]);
    }
    Some(v)
}

/// `ref_answer_1`, and `ref_answer_2` for turn 2, as FastChat passes them; empty without a reference.
fn reference_values(reference: Option<&[String]>, turn: u32) -> Option<Vec<(&'static str, &str)>> {
    let Some(r) = reference else {
        return Some(Vec::new());
    };
    let mut v = vec![("ref_answer_1", r.first()?.as_str())];
    if turn == 2 {
        v.push(("ref_answer_2", r.get(1)?.as_str()));
    }
    Some(v)
}

/// Python's `template.format(**values)` for plain keyword fields; the error says what Python would raise.
pub fn format_like_python(template: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let brace = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if after.as_bytes().first() == Some(&brace) {
            out.push(brace as char);
            rest = &after[1..];
            continue;
        }
        if brace == b'}' {
            return Err("a single '}' in the template (write '}}' for a literal brace)".into());
        }
        let Some(end) = after.find(['{', '}']) else {
            return Err("expected '}' before the end of the template".into());
        };
        if after.as_bytes()[end] == b'{' {
            return Err(format!(
                "a '{{' inside the field {{{}...}}, which is not supported",
                &after[..end]
            ));
        }
        let field = &after[..end];
        if field.is_empty() || field.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "a positional field {{{field}}}; FastChat's templates are filled by keyword"
            ));
        }
        if let Some(c) = field.chars().find(|c| matches!(c, '!' | ':' | '.' | '[')) {
            return Err(format!(
                "the field {{{field}}} uses {c:?}, which is not supported"
            ));
        }
        match values.iter().find(|(k, _)| *k == field) {
            Some((_, v)) => out.push_str(v),
            None => {
                let known: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "unknown placeholder {{{field}}} (values given: {})",
                    known.join(", ")
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Lowercase hex, for digests.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts() -> JudgePrompts {
        JudgePrompts::embedded().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_embedded_prompts_are_fastchats_eight_and_fit_their_modes() {
        let p = prompts();
        for mode in [JudgeMode::Pairwise, JudgeMode::Single] {
            let m = p.for_mode(mode).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(m.len(), 4);
        }
        assert_eq!(
            p.get("single-v1").map(|s| s.system_prompt.as_str()).ok(),
            Some("You are a helpful assistant.")
        );
        let e = p.get("pair-v9").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("pair-v9") && e.contains("embedded"), "{e}");
    }

    #[test]
    fn prompts_are_chosen_as_fastchat_chooses_them() {
        assert_eq!(
            prompt_name(JudgeMode::Pairwise, true, true),
            "pair-math-v1-multi-turn"
        );
        assert_eq!(prompt_name(JudgeMode::Single, true, false), "single-math-v1");
        assert_eq!(
            prompt_name(JudgeMode::Single, false, true),
            "single-v1-multi-turn"
        );
        assert!(needs_reference("reasoning") && needs_reference("arena-hard-200"));
        assert!(!needs_reference("writing") && !needs_reference("Math"));
    }

    #[test]
    fn braces_escape_and_values_are_not_parsed_again() {
        let v = [("question", "what is {x}?"), ("answer", "}} {{ {answer}")];
        assert_eq!(
            format_like_python("{{lit}} [{question}] {answer}}}", &v).as_deref(),
            Ok("{lit} [what is {x}?] }} {{ {answer}}")
        );
        assert_eq!(format_like_python("", &v).as_deref(), Ok(""));
        assert_eq!(format_like_python("no fields", &v).as_deref(), Ok("no fields"));
        assert_eq!(
            format_like_python("{question}{question}", &v).as_deref(),
            Ok("what is {x}?what is {x}?")
        );
    }

    #[test]
    fn malformed_templates_and_unknown_fields_are_errors() {
        let v = [("question", "q")];
        for bad in [
            "{nope}",
            "{}",
            "{0}",
            "a } b",
            "{question",
            "{question!r}",
            "{question:>5}",
            "{a.b}",
            "{a[0]}",
            "{a{b}}",
        ] {
            assert!(format_like_python(bad, &v).is_err(), "{bad}");
        }
        let p = JudgePrompt {
            name: "mine".into(),
            kind: "single".into(),
            system_prompt: String::new(),
            prompt_template: "{question} {ref_answer_1}".into(),
            description: String::new(),
            category: String::new(),
            output_format: "[[rating]]".into(),
        };
        let e = p.fill(&v).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("mine") && e.contains("{ref_answer_1}"), "{e}");
    }

    #[test]
    fn values_follow_fastchats_keywords_and_need_every_text() {
        let q = vec!["q1".to_string(), "q2".to_string()];
        let a = vec!["a1".to_string(), "a2".to_string()];
        let b = vec!["b1".to_string()];
        let r = vec!["r1".to_string(), "r2".to_string()];
        let v = pair_values(&q, &a, &a, Some(&r), 2).unwrap_or_default();
        let keys: Vec<&str> = v.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "ref_answer_1",
                "ref_answer_2",
                "question_1",
                "question_2",
                "answer_a_1",
                "answer_b_1",
                "answer_a_2",
                "answer_b_2"
            ]
        );
        assert!(pair_values(&q, &a, &b, None, 2).is_none(), "B has no second turn");
        assert!(pair_values(&q, &a, &b, None, 1).is_some());
        assert!(
            single_values(&q, &a, Some(&r[..1]), 2).is_none(),
            "the reference has no second turn"
        );
        let s = single_values(&q, &b, Some(&r[..1]), 1).unwrap_or_default();
        assert_eq!(s, [("ref_answer_1", "r1"), ("question", "q1"), ("answer", "b1")]);
    }

    #[test]
    fn the_digest_changes_with_the_words() {
        let p = prompts();
        let a = p.get("pair-v2").map(JudgePrompt::sha256).unwrap_or_default();
        let mut changed = p.get("pair-v2").cloned().unwrap_or_else(|e| panic!("{e}"));
        changed.system_prompt.push(' ');
        assert_ne!(a, changed.sha256());
        assert_eq!(a.len(), 64);
    }
}
