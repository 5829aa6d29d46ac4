//! Moderation: providers that classify text, and profiles that combine them for input (before any worker sees a
//! prompt) and output (checked in windows while a reply streams).
//!
//! Input moderation sees every turn the client wrote (system, user and assistant alike: a client can write an
//! "earlier reply" that the model then reads as its own) and, for a conversation of more than one turn, the whole
//! conversation as one text, so a phrase split across messages is seen whole ([`Turn`], [`conversation_texts`]).
//!
//! A profile fails closed: a provider that cannot answer turns the request into a 503, unless that provider is
//! configured `fail_open`. Flagged text is never logged unless `log_flagged_text` is set.

pub mod builtin;
pub mod guard;
mod guard_prompt;
pub mod normalize;
pub mod output;
pub mod remote;
pub mod rules;

pub use normalize::normalize;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ApiError;
use crate::metrics::{Metrics, ModerationLabels, ProviderLabels};
use crate::validate::Input;

/// One client-written text of a request: a message (any role) or the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// The request field it came from (`messages[2].content`, `prompt`), named in a content-filter error.
    pub param: String,
    /// `system`, `user` or `assistant` (`user` for a prompt).
    pub role: String,
    pub text: String,
}

/// The field named when the whole conversation (and no single turn) is flagged.
pub const WHOLE_CONVERSATION: &str = "messages";

/// Every client-written text of a request, in order; no role is skipped.
pub fn input_turns(input: &Input) -> Vec<Turn> {
    match input {
        Input::Chat(messages) => messages
            .iter()
            .enumerate()
            .map(|(i, (role, text))| Turn {
                param: format!("messages[{i}].content"),
                role: role.clone(),
                text: text.clone(),
            })
            .collect(),
        Input::Prompt(p) => vec![Turn {
            param: "prompt".into(),
            role: "user".into(),
            text: p.clone(),
        }],
    }
}

/// What a provider checks for a conversation: each turn, then (for more than one turn) all of them joined by
/// newlines, so a phrase or a spelled-out word split over messages is one text.
pub fn conversation_texts(turns: &[Turn]) -> Vec<String> {
    let mut texts: Vec<String> = turns.iter().map(|t| t.text.clone()).collect();
    if turns.len() > 1 {
        texts.push(texts.join("\n"));
    }
    texts
}

/// The request field of each of [`conversation_texts`].
fn conversation_params(turns: &[Turn]) -> Vec<String> {
    let mut params: Vec<String> = turns.iter().map(|t| t.param.clone()).collect();
    if turns.len() > 1 {
        params.push(WHOLE_CONVERSATION.into());
    }
    params
}

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
    /// Independent texts (`/v1/moderations` inputs, output windows).
    fn check<'a>(&'a self, texts: &'a [String]) -> CheckFuture<'a>;
    /// A request's turns: one verdict per text of [`conversation_texts`]. By default those texts through
    /// [`Provider::check`]; a provider that reads a conversation better whole (a guard model) answers for it in as
    /// few calls as it can, leaving the turns' own verdicts unflagged.
    fn check_conversation<'a>(&'a self, turns: &'a [Turn]) -> CheckFuture<'a> {
        Box::pin(async move {
            let texts = conversation_texts(turns);
            self.check(&texts).await
        })
    }
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
        run_each(providers, texts.len(), direction, metrics, |p| p.check(texts)).await
    }

    /// Checks a request's turns with the input providers (see [`Provider::check_conversation`]). The error is
    /// the client's: 400 `content_filter` naming the flagged turn (or `messages`, the whole conversation), or 503
    /// `moderation_unavailable`.
    pub async fn check_turns(&self, turns: &[Turn], metrics: &Metrics) -> Result<(), ApiError> {
        let texts = conversation_texts(turns);
        let verdicts = run_each(&self.input, texts.len(), "input", metrics, |p| {
            p.check_conversation(turns)
        })
        .await
        .map_err(|e| e.to_api_error(None))?;
        self.first_flagged(&texts, verdicts).map_err(|e| {
            let param = match &e {
                ModerationError::Flagged { index, .. } => conversation_params(turns).get(*index).cloned(),
                ModerationError::Unavailable { .. } => None,
            };
            e.to_api_error(param)
        })
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

/// Runs every provider (`call` asks one) for `count` texts: merged verdicts, one per text. Provider failures fail
/// closed unless that provider is `fail_open`.
async fn run_each<'a, F>(
    providers: &'a [NamedProvider],
    count: usize,
    direction: &'static str,
    metrics: &Metrics,
    call: F,
) -> Result<Vec<TextVerdict>, ModerationError>
where
    F: Fn(&'a dyn Provider) -> CheckFuture<'a>,
{
    let mut merged = vec![TextVerdict::default(); count];
    if count == 0 {
        return Ok(merged);
    }
    for named in providers {
        let started = Instant::now();
        let result = call(named.provider.as_ref()).await;
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
            Ok(verdicts) if verdicts.len() == count => {
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
                    Ok(v) => ProviderError::Unavailable(format!("{} verdicts for {} texts", v.len(), count)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
