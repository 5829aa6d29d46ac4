//! Moderation: providers that classify text, and profiles that combine them for input (before any worker sees a
//! prompt) and output (checked in windows while a reply streams).
//!
//! A profile fails closed: a provider that cannot answer turns the request into a 503, unless that provider is
//! configured `fail_open`. Flagged text is never logged unless `log_flagged_text` is set.

pub mod guard;
pub mod output;
pub mod remote;
pub mod rules;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ApiError;
use crate::metrics::{Metrics, ModerationLabels, ProviderLabels};

/// What one provider (or a whole profile) says about one text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextVerdict {
    pub flagged: bool,
    /// Every category the provider knows, true where this text is flagged for it.
    pub categories: BTreeMap<String, bool>,
    /// Scores in [0, 1] where the provider gives them (rules: 1 for a match, 0 otherwise).
    pub scores: BTreeMap<String, f64>,
    /// The providers that flagged it (for errors and logs).
    pub flagged_by: Vec<String>,
}

impl TextVerdict {
    pub fn flagged_categories(&self) -> Vec<String> {
        self.categories
            .iter()
            .filter(|(_, flagged)| **flagged)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Folds another provider's verdict in: flagged by either, the higher score.
    fn merge(&mut self, other: TextVerdict) {
        self.flagged |= other.flagged;
        self.flagged_by.extend(other.flagged_by);
        for (category, flagged) in other.categories {
            *self.categories.entry(category).or_default() |= flagged;
        }
        for (category, score) in other.scores {
            let s = self.scores.entry(category).or_default();
            *s = s.max(score);
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not be asked: down, slow, or an answer of the wrong shape.
    #[error("{0}")]
    Unavailable(String),
    /// A guard model answered something that is not a verdict (and is configured to treat that as an error).
    #[error("the guard model's answer is not a verdict: {0}")]
    Unparseable(String),
}

impl ProviderError {
    pub fn category(&self) -> &'static str {
        match self {
            ProviderError::Unavailable(_) => "unavailable",
            ProviderError::Unparseable(_) => "unparseable",
        }
    }
}

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<TextVerdict>, ProviderError>> + Send + 'a>>;

/// A moderation provider: one verdict per text, in order.
pub trait Provider: Send + Sync {
    /// `rules`, `openai` or `guard_model` (a metrics label).
    fn kind(&self) -> &'static str;
    fn check<'a>(&'a self, texts: &'a [String]) -> CheckFuture<'a>;
}

/// A configured provider and how its failures are treated.
#[derive(Clone)]
pub struct NamedProvider {
    pub name: String,
    pub provider: Arc<dyn Provider>,
    pub fail_open: bool,
}

impl std::fmt::Debug for NamedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name, self.provider.kind())
    }
}

/// Providers for the input and (optionally) the output of requests.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub input: Vec<NamedProvider>,
    pub output: Vec<NamedProvider>,
    /// Output is held back and checked in windows of about this many characters.
    pub output_window_chars: usize,
    pub log_flagged_text: bool,
}

/// Why a text did not pass.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModerationError {
    #[error("flagged by `{provider}` for {}", categories.join(", "))]
    Flagged {
        /// Which text (index into the checked texts).
        index: usize,
        provider: String,
        categories: Vec<String>,
    },
    #[error("moderation provider `{provider}` is unavailable: {source}")]
    Unavailable {
        provider: String,
        #[source]
        source: ProviderError,
    },
}

impl Profile {
    /// Runs `providers` over `texts`: every provider, merged verdicts, one per text. Provider failures fail closed
    /// unless that provider is `fail_open`.
    pub async fn run(
        &self,
        providers: &[NamedProvider],
        texts: &[String],
        direction: &'static str,
        metrics: &Metrics,
    ) -> Result<Vec<TextVerdict>, ModerationError> {
        let mut merged = vec![TextVerdict::default(); texts.len()];
        if texts.is_empty() {
            return Ok(merged);
        }
        for named in providers {
            let started = Instant::now();
            let result = named.provider.check(texts).await;
            let labels = |outcome: &'static str| ModerationLabels {
                provider: named.name.clone(),
                direction,
                outcome,
            };
            metrics
                .moderation_seconds
                .get_or_create(&ProviderLabels {
                    provider: named.name.clone(),
                    direction,
                })
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(verdicts) if verdicts.len() == texts.len() => {
                    for (m, mut v) in merged.iter_mut().zip(verdicts) {
                        let flagged = v.flagged;
                        if flagged {
                            v.flagged_by.push(named.name.clone());
                        }
                        for c in v.flagged_categories() {
                            metrics.count_flag(&named.name, direction, &c);
                        }
                        m.merge(v);
                        let outcome = if flagged { "flagged" } else { "passed" };
                        metrics.moderation_checks.get_or_create(&labels(outcome)).inc();
                    }
                }
                other => {
                    let source = match other {
                        Err(e) => e,
                        Ok(v) => ProviderError::Unavailable(format!(
                            "{} verdicts for {} texts",
                            v.len(),
                            texts.len()
                        )),
                    };
                    metrics
                        .moderation_checks
                        .get_or_create(&labels(source.category()))
                        .inc();
                    if named.fail_open {
                        tracing::warn!(provider = %named.name, error = %source, "moderation provider failed; passing (fail_open)");
                        continue;
                    }
                    return Err(ModerationError::Unavailable {
                        provider: named.name.clone(),
                        source,
                    });
                }
            }
        }
        Ok(merged)
    }

    /// Checks `texts` with the input providers; the first flagged text is the error.
    pub async fn check_input(&self, texts: &[String], metrics: &Metrics) -> Result<(), ModerationError> {
        let verdicts = self.run(&self.input, texts, "input", metrics).await?;
        self.first_flagged(texts, verdicts)
    }

    /// Checks a window of generated text with the output providers.
    pub async fn check_output(&self, text: &str, metrics: &Metrics) -> Result<(), ModerationError> {
        let texts = [text.to_string()];
        let verdicts = self.run(&self.output, &texts, "output", metrics).await?;
        self.first_flagged(&texts, verdicts)
    }

    fn first_flagged(&self, texts: &[String], verdicts: Vec<TextVerdict>) -> Result<(), ModerationError> {
        let Some((index, verdict)) = verdicts.into_iter().enumerate().find(|(_, v)| v.flagged) else {
            return Ok(());
        };
        let provider = verdict.flagged_by.join("+");
        if self.log_flagged_text {
            tracing::info!(profile = %self.name, text = %texts[index], "flagged text");
        }
        Err(ModerationError::Flagged {
            index,
            provider,
            categories: verdict.flagged_categories(),
        })
    }
}

impl ModerationError {
    /// The client's error: 400 `content_filter` naming the flagged field, or 503 when a provider is down.
    pub fn to_api_error(&self, param: Option<String>) -> ApiError {
        match self {
            ModerationError::Flagged { categories, .. } => {
                ApiError::content_filter(categories.clone(), param.unwrap_or_default())
            }
            ModerationError::Unavailable { .. } => ApiError::moderation_unavailable(self.to_string()),
        }
    }
}

/// Normalizes text before pattern matching: lower case, full-width ASCII folded to ASCII, and invisible characters
/// (zero-width spaces and joiners, soft hyphens, byte-order marks) removed, so they cannot split a word.
pub fn normalize(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'))
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c),
            '\u{3000}' => ' ',
            _ => c,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_what_hides_words() {
        assert_eq!(normalize("Ki\u{200B}LL"), "kill");
        assert_eq!(normalize("ｋｉｌｌ"), "kill");
        assert_eq!(normalize("so\u{00AD}ft"), "soft");
        assert_eq!(normalize("Ünïcode stays"), "ünïcode stays");
    }

    #[test]
    fn merged_verdicts_keep_every_flag_and_the_highest_score() {
        let mut a = TextVerdict {
            flagged: false,
            categories: [("hate".to_string(), false)].into(),
            scores: [("hate".to_string(), 0.2)].into(),
            flagged_by: vec![],
        };
        a.merge(TextVerdict {
            flagged: true,
            categories: [("hate".to_string(), true), ("violence".to_string(), false)].into(),
            scores: [("hate".to_string(), 0.9)].into(),
            flagged_by: vec!["rules".into()],
        });
        assert!(a.flagged);
        assert_eq!(a.flagged_categories(), ["hate"]);
        assert_eq!(a.scores["hate"], 0.9);
        assert_eq!(a.categories.len(), 2);
    }
}
