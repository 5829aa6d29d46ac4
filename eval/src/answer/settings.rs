//! What an answer run is asked to do, and the parts of it that decide what the answers are: those are recorded
//! next to the answers (the fingerprint) so a resumed run never mixes answers given under different settings, and
//! they key each answer's id so a resumed run writes the same ids as an uninterrupted one.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::client::{Endpoint, RetryPolicy};
use crate::format::QuestionId;
use crate::questions::{QuestionFile, Selection};

/// FastChat's `gen_api_answer.py` default for `--max-tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// Questions in flight at once by default: enough to keep a batching server busy, few enough not to trip a shared
/// endpoint's rate limit.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// The most questions in flight at once: more is a denial of service, not an evaluation.
pub const MAX_CONCURRENCY: usize = 1024;

/// How hot each question is sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TemperaturePolicy {
    /// FastChat's `temperature_config`: 0 where there is one right answer (math, coding, extraction, reasoning),
    /// 0.1 for knowledge (stem, humanities), 0.7 for writing, roleplay and anything unlisted.
    ByCategory,
    /// One temperature for every question (FastChat's `--force-temperature`).
    Fixed(f32),
}

impl TemperaturePolicy {
    /// The temperature of a question of `category`.
    pub fn for_category(&self, category: &str) -> f32 {
        match self {
            TemperaturePolicy::ByCategory => fastchat_temperature(category),
            TemperaturePolicy::Fixed(t) => *t,
        }
    }
}

impl fmt::Display for TemperaturePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemperaturePolicy::ByCategory => f.write_str("fastchat-by-category"),
            TemperaturePolicy::Fixed(t) => write!(f, "{t}"),
        }
    }
}

/// FastChat's `temperature_config` (`fastchat/llm_judge/common.py`), 0.7 for a category it does not list.
pub fn fastchat_temperature(category: &str) -> f32 {
    match category {
        "writing" | "roleplay" => 0.7,
        "extraction" | "math" | "coding" | "reasoning" | "arena-hard-200" => 0.0,
        "stem" | "humanities" => 0.1,
        _ => 0.7,
    }
}

/// Everything one answer run needs besides the questions and the output path.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerSettings {
    /// The contestant's server; `endpoint.model` is the `model` of each request.
    pub endpoint: Endpoint,
    /// The `model_id` written with each answer (and the name the judge and report know the contestant by); the
    /// request's model name when not given.
    pub model_id: Option<String>,
    pub temperature: TemperaturePolicy,
    pub max_tokens: u32,
    /// Questions in flight at once (each question's turns are asked one after another).
    pub concurrency: usize,
    /// The sha256 of the question file's bytes ([`QuestionFile::sha256`]).
    pub questions_sha256: String,
    /// Which of the file's questions are asked.
    pub selection: Selection,
    /// A system message before the first turn. None sends none, so the server's chat template applies its own
    /// (Vicuna's, for our models), which is what the model was trained with.
    pub system_prompt: Option<String>,
    /// The run's seed; each question is sent a seed derived from it and the question id, so a question sampled
    /// hot comes out the same when asked again of a server that honours `seed`. None sends no seed (for servers
    /// that refuse the field).
    pub seed: Option<u64>,
    pub retry: RetryPolicy,
    /// Start over, moving an existing output aside, when it was written under other settings (or under settings
    /// not on record); without it such a run is refused. With unchanged settings the run resumes either way.
    pub force_new: bool,
}

impl AnswerSettings {
    /// FastChat's defaults (per-category temperature, 1024 tokens), [`DEFAULT_CONCURRENCY`], seed 0, no system
    /// prompt, for the questions `selection` picks of `questions`.
    pub fn new(endpoint: Endpoint, questions: &QuestionFile, selection: Selection) -> Self {
        Self {
            endpoint,
            model_id: None,
            temperature: TemperaturePolicy::ByCategory,
            max_tokens: DEFAULT_MAX_TOKENS,
            concurrency: DEFAULT_CONCURRENCY,
            questions_sha256: questions.sha256.clone(),
            selection,
            system_prompt: None,
            seed: Some(0),
            retry: RetryPolicy::default(),
            force_new: false,
        }
    }

    /// The name the answers are written under.
    pub fn model_id(&self) -> &str {
        self.model_id.as_deref().unwrap_or(&self.endpoint.model)
    }

    /// Settings no server could honour, refused before anything is sent or written.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoint.model.trim().is_empty() {
            return Err("the endpoint's model name is empty".into());
        }
        if self.model_id().trim().is_empty() {
            return Err("model_id is empty".into());
        }
        if let TemperaturePolicy::Fixed(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(format!("temperature {t} is outside 0..=2"));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens is 0".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!(
                "concurrency {} is outside 1..={MAX_CONCURRENCY}",
                self.concurrency
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err("retry.max_attempts is 0".into());
        }
        Ok(())
    }

    /// The settings that decide the answers, as recorded next to them.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            base_url: self.endpoint.base_url.trim_end_matches('/').to_string(),
            model: self.endpoint.model.clone(),
            model_id: self.model_id().to_string(),
            temperature: self.temperature.to_string(),
            max_tokens: self.max_tokens,
            system_prompt: self.system_prompt.clone(),
            seed: self.seed,
            questions_sha256: self.questions_sha256.clone(),
            question_begin: self.selection.begin,
            question_end: self.selection.end,
            max_questions: self.selection.max_questions,
        }
    }

    /// The seed sent with `id`'s requests: the run's seed and the question id hashed, kept under 2^63 because
    /// servers read `seed` as a signed 64-bit integer (our gateway, vLLM).
    pub fn question_seed(&self, id: &QuestionId) -> Option<u64> {
        let seed = self.seed?;
        let mut h = Sha256::new();
        field(&mut h, "camelid-eval-seed");
        field(&mut h, &seed.to_string());
        field(&mut h, &id_key(id));
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Some(u64::from_be_bytes(first) & (i64::MAX as u64))
    }

    /// `id`'s answer id: the first 22 hex digits of a hash of the model, the question and every setting that
    /// shapes the answer (not the URL or the selection, which do not change what the model says).
    pub fn answer_id(&self, id: &QuestionId) -> String {
        let mut h = Sha256::new();
        for part in [
            "camelid-eval-answer",
            self.model_id(),
            &id_key(id),
            &self.endpoint.model,
            &self.temperature.to_string(),
            &self.max_tokens.to_string(),
            &optional(self.system_prompt.as_deref()),
            &optional(self.seed.map(|s| s.to_string()).as_deref()),
            &self.questions_sha256,
        ] {
            field(&mut h, part);
        }
        h.finalize().iter().take(11).map(|b| format!("{b:02x}")).collect()
    }
}

/// The settings recorded in `<out>.settings.json`: a resumed run must match them field for field. Concurrency,
/// retries and the API key are left out: they change how fast answers come, not what they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub base_url: String,
    pub model: String,
    pub model_id: String,
    pub temperature: String,
    pub max_tokens: u32,
    pub system_prompt: Option<String>,
    pub seed: Option<u64>,
    pub questions_sha256: String,
    pub question_begin: Option<usize>,
    pub question_end: Option<usize>,
    pub max_questions: Option<usize>,
}

/// Hashes `s` length-prefixed, so no two field lists hash alike by shifting bytes between fields.
fn field(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// A question id with its kind, so question 7 and question "7" differ.
fn id_key(id: &QuestionId) -> String {
    match id {
        QuestionId::Number(n) => format!("n:{n}"),
        QuestionId::Text(s) => format!("s:{s}"),
    }
}

/// An optional value with None distinct from every string.
fn optional(value: Option<&str>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("+{v}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn settings() -> AnswerSettings {
        let file = QuestionFile {
            path: "q.jsonl".into(),
            sha256: "abc".into(),
            questions: Vec::new(),
        };
        let endpoint = Endpoint {
            base_url: "http://x/v1/".into(),
            model: "vicuna".into(),
            api_key: None,
        };
        AnswerSettings::new(endpoint, &file, Selection::ALL)
    }

    #[test]
    fn fastchat_temperature_table() {
        for (category, t) in [
            ("writing", 0.7),
            ("roleplay", 0.7),
            ("extraction", 0.0),
            ("math", 0.0),
            ("coding", 0.0),
            ("reasoning", 0.0),
            ("stem", 0.1),
            ("humanities", 0.1),
            ("arena-hard-200", 0.0),
            ("generic", 0.7),
            ("", 0.7),
        ] {
            assert_eq!(
                TemperaturePolicy::ByCategory.for_category(category),
                t,
                "{category}"
            );
        }
        assert_eq!(TemperaturePolicy::Fixed(0.3).for_category("math"), 0.3);
    }

    #[test]
    fn ids_and_seeds_are_stable_and_keyed_by_what_shapes_the_answer() {
        let s = settings();
        let id = QuestionId::Number(81);
        let a = s.answer_id(&id);
        assert_eq!(a.len(), 22);
        assert_eq!(a, s.answer_id(&id));
        assert_ne!(a, s.answer_id(&QuestionId::Text("81".into())));
        let mut t = s.clone();
        t.max_tokens = 7;
        assert_ne!(a, t.answer_id(&id));
        let mut u = s.clone();
        u.endpoint.base_url = "http://elsewhere/v1".into();
        u.concurrency = 1;
        assert_eq!(
            a,
            u.answer_id(&id),
            "the URL and the concurrency do not change the answer"
        );
        let seed = s.question_seed(&id).unwrap();
        assert!(seed <= i64::MAX as u64);
        assert_ne!(Some(seed), s.question_seed(&QuestionId::Number(82)));
        assert_eq!(Some(seed), s.question_seed(&id));
        u.seed = None;
        assert_eq!(u.question_seed(&id), None);
    }

    #[test]
    fn hopeless_settings_are_refused() {
        assert!(settings().validate().is_ok());
        let mut s = settings();
        s.concurrency = 0;
        assert!(s.validate().unwrap_err().contains("concurrency"));
        let mut s = settings();
        s.temperature = TemperaturePolicy::Fixed(f32::NAN);
        assert!(s.validate().unwrap_err().contains("temperature"));
        let mut s = settings();
        s.max_tokens = 0;
        assert!(s.validate().unwrap_err().contains("max_tokens"));
        assert_eq!(settings().fingerprint().base_url, "http://x/v1");
        assert_eq!(settings().fingerprint().temperature, "fastchat-by-category");
    }
}
