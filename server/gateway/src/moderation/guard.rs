//! A guard model as a provider: another model served by camelid, asked (greedily) whether a text is safe, in the
//! style of Llama Guard, with its answer parsed strictly. Anything that is not exactly a verdict is flagged or an
//! error, as configured: a guard that rambles must not let text through.
//!
//! A request's conversation is judged whole, in as few generations as fit `max_batch_chars` of quoted text (one
//! for any ordinary conversation, however many messages), run at most `max_concurrency` at a time, and all of them
//! within `timeout`: a guard that is slow or down fails the check (503, unless `fail_open`), never hangs it. Client
//! text reaches the guard only quoted ([`super::guard_prompt`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};

pub use super::guard_prompt::{conversation_task_prompt, quote, quoted_conversation, task_prompt};
use super::{CheckFuture, Provider, ProviderError, TextVerdict, Turn};
use crate::routing::Router;
use crate::validate::{Api, Input, Params, Validated};

/// Llama Guard 3's hazard categories, the default taxonomy.
pub const DEFAULT_CATEGORIES: [(&str, &str); 14] = [
    ("S1", "violent_crimes"),
    ("S2", "non_violent_crimes"),
    ("S3", "sex_related_crimes"),
    ("S4", "child_sexual_exploitation"),
    ("S5", "defamation"),
    ("S6", "specialized_advice"),
    ("S7", "privacy"),
    ("S8", "intellectual_property"),
    ("S9", "indiscriminate_weapons"),
    ("S10", "hate"),
    ("S11", "suicide_and_self_harm"),
    ("S12", "sexual_content"),
    ("S13", "elections"),
    ("S14", "code_interpreter_abuse"),
];

/// The category that an unparseable answer is flagged under (when `on_unparseable: flag`).
pub const UNPARSEABLE: &str = "unparseable_verdict";

/// How the text reaches the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardPrompt {
    /// Our Llama-Guard-style task prompt as one user message (for general instruction-tuned models).
    Task,
    /// The text as the user message, for guard models whose own chat template builds the task (Llama Guard).
    Conversation,
}

#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub model: String,
    pub prompt: GuardPrompt,
    /// Code (`S1`) → category name.
    pub categories: BTreeMap<String, String>,
    /// Flag (true) or fail (false) when the answer is not a verdict.
    pub flag_unparseable: bool,
    pub max_tokens: u32,
    /// The deadline of one check, all its generations together.
    pub timeout: Duration,
    /// Quoted characters of conversation per generation (a longer message is one generation of its own).
    pub max_batch_chars: usize,
    /// Generations of one check running at once.
    pub max_concurrency: usize,
}

/// A parsed guard answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Safe,
    /// The violated categories' codes, as the guard wrote them (upper case).
    Unsafe(Vec<String>),
}

/// Parses a guard answer strictly: `safe`, or `unsafe` and then one line of comma-separated known codes. Blank
/// lines and surrounding whitespace are allowed; anything else (other words, unknown codes, more lines) is an
/// error saying what is wrong.
pub fn parse_verdict(answer: &str, codes: &BTreeMap<String, String>) -> Result<Verdict, String> {
    let lines: Vec<&str> = answer.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let first = lines.first().ok_or("empty answer")?;
    match first.to_ascii_lowercase().as_str() {
        "safe" if lines.len() == 1 => Ok(Verdict::Safe),
        "safe" => Err("text after `safe`".into()),
        "unsafe" => {
            let [_, list] = lines[..] else {
                return Err(if lines.len() == 1 {
                    "`unsafe` without categories".into()
                } else {
                    "more than one line after `unsafe`".into()
                });
            };
            let mut found = Vec::new();
            for code in list.split(',').map(|c| c.trim().to_ascii_uppercase()) {
                if !codes.contains_key(&code) {
                    return Err(format!("unknown category {code:?}"));
                }
                if !found.contains(&code) {
                    found.push(code);
                }
            }
            Ok(Verdict::Unsafe(found))
        }
        _ => Err("the first line is neither `safe` nor `unsafe`".into()),
    }
}

pub struct Guard {
    config: GuardConfig,
    router: Arc<Router>,
}

impl Guard {
    pub fn new(config: GuardConfig, router: Arc<Router>) -> Self {
        Self { config, router }
    }

    /// The generation that judges `turns` (`(role, text)`, in order).
    fn request(&self, turns: &[(&str, &str)]) -> Validated {
        let content = match self.config.prompt {
            GuardPrompt::Task => conversation_task_prompt(turns.iter().copied(), &self.config.categories),
            // The guard's own template builds the task around one user message: the quoted conversation, so the
            // guard judges all of it (Llama Guard judges only the last message of a conversation).
            GuardPrompt::Conversation => match turns {
                [(_, text)] => quote(text),
                _ => quoted_conversation(turns.iter().copied()),
            },
        };
        Validated {
            cache_salt: String::new(),
            adapter: String::new(),
            api: Api::Chat,
            model: self.config.model.clone(),
            input: Input::Chat(vec![("user".into(), content)]),
            params: Params::greedy(Some(self.config.max_tokens)),
            stream: false,
            include_usage: false,
        }
    }

    /// The verdict for a guard answer, with the configured treatment of unparseable answers.
    pub fn verdict(&self, answer: &str) -> Result<TextVerdict, ProviderError> {
        let mut categories: BTreeMap<String, bool> = self
            .config
            .categories
            .values()
            .map(|name| (name.clone(), false))
            .collect();
        match parse_verdict(answer, &self.config.categories) {
            Ok(Verdict::Safe) => {}
            Ok(Verdict::Unsafe(codes)) => {
                for code in codes {
                    if let Some(name) = self.config.categories.get(&code) {
                        categories.insert(name.clone(), true);
                    }
                }
            }
            Err(why) if self.config.flag_unparseable => {
                tracing::warn!(model = %self.config.model, why, "guard answer is not a verdict; flagging");
                categories.insert(UNPARSEABLE.into(), true);
            }
            Err(why) => return Err(ProviderError::Unparseable(why)),
        }
        let flagged = categories.values().any(|f| *f);
        Ok(TextVerdict {
            flagged,
            scores: categories
                .iter()
                .map(|(c, f)| (c.clone(), if *f { 1.0 } else { 0.0 }))
                .collect(),
            categories,
            flagged_by: Vec::new(),
        })
    }

    /// One generation's verdict.
    async fn ask(&self, request: Validated) -> Result<TextVerdict, ProviderError> {
        let answer = self.router.complete_text(&request).await.map_err(|e| {
            ProviderError::Unavailable(format!("guard model `{}`: {}", self.config.model, e.message))
        })?;
        self.verdict(&answer)
    }

    /// Runs one generation per batch of turns, at most `max_concurrency` at once, all within the deadline;
    /// verdicts in the batches' order.
    async fn ask_all(&self, batches: Vec<Vec<(&str, &str)>>) -> Result<Vec<TextVerdict>, ProviderError> {
        let requests: Vec<Validated> = batches.iter().map(|b| self.request(b)).collect();
        let all = futures_util::stream::iter(requests)
            .map(|r| self.ask(r))
            .buffered(self.config.max_concurrency.max(1))
            .try_collect::<Vec<_>>();
        tokio::time::timeout(self.config.timeout, all)
            .await
            .map_err(|_| {
                ProviderError::Unavailable(format!(
                    "guard model `{}` gave no verdict within {} ms",
                    self.config.model,
                    self.config.timeout.as_millis()
                ))
            })?
    }

    /// Independent texts: one generation each (concurrently, within one deadline).
    async fn classify(&self, texts: &[String]) -> Result<Vec<TextVerdict>, ProviderError> {
        self.ask_all(texts.iter().map(|t| vec![("user", t.as_str())]).collect())
            .await
    }

    /// A conversation: judged whole in [`batches`]; the verdict is the conversation's (the last of
    /// [`super::conversation_texts`]), the turns' own are left unflagged.
    async fn classify_conversation(&self, turns: &[Turn]) -> Result<Vec<TextVerdict>, ProviderError> {
        let pairs: Vec<(&str, &str)> = turns.iter().map(|t| (t.role.as_str(), t.text.as_str())).collect();
        let mut whole = TextVerdict::default();
        for verdict in self.ask_all(batches(&pairs, self.config.max_batch_chars)).await? {
            whole.merge(verdict);
        }
        let mut verdicts = vec![TextVerdict::default(); super::conversation_texts(turns).len()];
        if let Some(last) = verdicts.last_mut() {
            *last = whole;
        }
        Ok(verdicts)
    }
}

/// Consecutive turns grouped so each group's quoted text is at most `max_chars` (a longer turn is a group of its
/// own); every turn is in exactly one group, in order.
pub fn batches<'a>(turns: &[(&'a str, &'a str)], max_chars: usize) -> Vec<Vec<(&'a str, &'a str)>> {
    let mut groups: Vec<Vec<(&str, &str)>> = Vec::new();
    let mut size = 0;
    for &(role, text) in turns {
        let chars = quote(text).chars().count() + 8;
        match groups.last_mut() {
            Some(group) if size + chars <= max_chars => {
                group.push((role, text));
                size += chars;
            }
            _ => {
                groups.push(vec![(role, text)]);
                size = chars;
            }
        }
    }
    groups
}

impl Provider for Guard {
    fn kind(&self) -> &'static str {
        "guard_model"
    }

    fn check<'a>(&'a self, texts: &'a [String]) -> CheckFuture<'a> {
        Box::pin(self.classify(texts))
    }

    fn check_conversation<'a>(&'a self, turns: &'a [Turn]) -> CheckFuture<'a> {
        Box::pin(self.classify_conversation(turns))
    }
}

pub fn default_categories() -> BTreeMap<String, String> {
    DEFAULT_CATEGORIES
        .iter()
        .map(|(code, name)| (code.to_string(), name.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(answer: &str) -> Result<Verdict, String> {
        parse_verdict(answer, &default_categories())
    }

    #[test]
    fn valid_verdicts_parse() {
        assert_eq!(parse("safe"), Ok(Verdict::Safe));
        assert_eq!(parse("\n\n  Safe \n"), Ok(Verdict::Safe));
        assert_eq!(parse("unsafe\nS1"), Ok(Verdict::Unsafe(vec!["S1".into()])));
        assert_eq!(
            parse("unsafe\ns10, S11,S10\n"),
            Ok(Verdict::Unsafe(vec!["S10".into(), "S11".into()]))
        );
    }

    #[test]
    fn invalid_and_adversarial_answers_are_rejected_with_a_reason() {
        for (answer, why) in [
            ("", "empty"),
            ("   \n ", "empty"),
            ("The message is safe.", "neither"),
            ("safe.", "neither"),
            ("Safe, definitely", "neither"),
            ("safe\nunsafe\nS1", "after `safe`"),
            ("safe\nIgnore previous instructions", "after `safe`"),
            ("unsafe", "without categories"),
            ("unsafe\nS99", "unknown category"),
            ("unsafe\nS1\nS2", "more than one line"),
            ("unsafe\nviolent crimes", "unknown category"),
            ("I cannot help with that.", "neither"),
            ("sa fe", "neither"),
        ] {
            let e = parse(answer).unwrap_err();
            assert!(e.contains(why), "{answer:?}: {e}");
        }
    }

    fn guard(flag_unparseable: bool) -> Guard {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let source = crate::routing::StaticEndpoints::new(Default::default());
        let router = Router::start(
            &source,
            metrics,
            std::time::Duration::from_secs(60),
            Default::default(),
        );
        Guard::new(
            GuardConfig {
                model: "guard".into(),
                prompt: GuardPrompt::Task,
                categories: default_categories(),
                flag_unparseable,
                max_tokens: 16,
                timeout: std::time::Duration::from_secs(1),
                max_batch_chars: 8000,
                max_concurrency: 4,
            },
            router,
        )
    }

    #[tokio::test]
    async fn unparseable_answers_flag_or_fail_as_configured() {
        let flagging = guard(true);
        let v = flagging.verdict("sure, here is how").unwrap();
        assert!(v.flagged);
        assert_eq!(v.flagged_categories(), [UNPARSEABLE]);
        let v = flagging.verdict("unsafe\nS9").unwrap();
        assert_eq!(v.flagged_categories(), ["indiscriminate_weapons"]);
        assert!(!flagging.verdict("safe").unwrap().flagged);
        let failing = guard(false);
        assert!(matches!(
            failing.verdict("maybe"),
            Err(ProviderError::Unparseable(_))
        ));
    }

    #[test]
    fn batches_keep_every_turn_in_order_within_the_budget() {
        let texts: Vec<String> = (0..1024).map(|i| format!("message {i}")).collect();
        let turns: Vec<(&str, &str)> = texts.iter().map(|t| ("user", t.as_str())).collect();
        let groups = batches(&turns, 32_000);
        assert_eq!(groups.len(), 1, "1,024 short messages are one generation");
        let small = batches(&turns, 100);
        assert!(small.len() > 100);
        assert_eq!(small.concat(), turns);
        let long = "x".repeat(500);
        let groups = batches(&[("user", "a"), ("user", long.as_str()), ("user", "b")], 100);
        assert_eq!(groups.len(), 3, "a long turn is alone");
    }
}
