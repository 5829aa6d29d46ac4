//! Everything between a dataset file and the micro-batches a step trains on, in pipeline order:
//! - this module reads conversation files (`read.rs`) and cleans them (with [`markdown`] repairing scraped HTML),
//! - [`tokenize`] renders the cleaned conversations with the chat template, splits them to fit and labels them,
//! - [`batching`] orders the samples into micro-batches and collates them into tensors.
//!
//! Reading: ShareGPT (`{"id", "conversations": [{"from", "value"}]}`) and OpenAI-style
//! (`{"messages": [{"role", "content"}]}`), as a JSON array or JSON Lines.
//!
//! A file that is not UTF-8 or not valid JSON, or a record that does not have either shape, stops the run with an
//! error naming the file and line: that is a broken file, not a bad sample. Conversations that parse but cannot be
//! trained on (wrong role order, empty turns, duplicates, blocklisted text, HTML nested too deep to convert) are
//! dropped and counted by reason in a [`DataReport`], as FastChat's `clean_sharegpt` drops them, except that
//! nothing goes uncounted.
//!
//! The dataset is hostile input (a tenant's file): reading and cleaning are pure functions of its bytes
//! ([`parse_conversations`], [`clean`]) that never panic or recurse without bound, and fuzz targets call them.

pub mod batching;
pub mod markdown;
mod read;
pub mod tokenize;

pub use read::{parse_conversations, read_conversations};

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use camelid_model::ChatMessage;
use serde::Serialize;

/// A file that cannot be read as a conversation dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {detail}")]
    Record {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{path}: the file holds no conversations")]
    Empty { path: PathBuf },
}

impl DataError {
    /// A short, stable name for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            DataError::Io { .. } => "io",
            DataError::Record { .. } => "malformed_record",
            DataError::Empty { .. } => "empty_dataset",
        }
    }
}

/// One conversation as read, before cleaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    /// 1-based line of the record in its file.
    pub line: usize,
    pub messages: Vec<ChatMessage>,
}

/// Why a conversation was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// No user/assistant exchange at all.
    NoExchange,
    /// Turns do not alternate user, assistant, user, ... after an optional leading system message.
    WrongRoleOrder,
    /// A user or assistant turn is empty or only whitespace.
    EmptyTurn,
    /// A turn is shorter than the configured minimum.
    TooShort,
    /// Another conversation with the same id came first.
    DuplicateId,
    /// Another conversation with the same first exchange came first.
    DuplicateFirstExchange,
    /// A turn contains a blocklisted phrase.
    Blocklisted,
    /// A turn's HTML nests deeper than [`markdown::MAX_HTML_DEPTH`] (crafted to exhaust the converter's stack).
    HtmlTooDeep,
}

/// Every decision the cleaner made, for the JSON data report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    pub input_conversations: usize,
    pub kept_conversations: usize,
    pub dropped: BTreeMap<DropReason, usize>,
    /// The first few dropped conversations per reason, as `id (line N)`, so a user can look them up.
    pub examples: BTreeMap<DropReason, Vec<String>>,
    /// Messages whose scraped HTML was turned into markdown.
    pub html_converted_messages: usize,
    /// Messages whose code fences were repaired (language name and "Copy code" label removed from the code).
    pub code_blocks_repaired_messages: usize,
}

const EXAMPLES_PER_REASON: usize = 5;

impl DataReport {
    fn drop(&mut self, reason: DropReason, conv: &Conversation) {
        *self.dropped.entry(reason).or_default() += 1;
        let examples = self.examples.entry(reason).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(format!("{} (line {})", conv.id, conv.line));
        }
    }

    pub fn dropped_total(&self) -> usize {
        self.dropped.values().sum()
    }
}

/// What the cleaner removes.
#[derive(Debug, Clone, Default)]
pub struct CleanOptions {
    /// Turns with fewer characters (after trimming) are dropped; 0 keeps any non-empty turn.
    pub min_turn_chars: usize,
    /// Case-insensitive phrases; a conversation containing one is dropped.
    pub blocklist: Vec<String>,
}

fn drop_reason(conv: &Conversation, opts: &CleanOptions, blocklist: &[String]) -> Option<DropReason> {
    let turns = match conv.messages.split_first() {
        Some((first, rest)) if first.role == "system" => rest,
        _ => &conv.messages[..],
    };
    if turns.len() < 2 {
        return Some(if turns.iter().any(|m| m.role != "user") {
            DropReason::WrongRoleOrder
        } else {
            DropReason::NoExchange
        });
    }
    for (i, m) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            return Some(DropReason::WrongRoleOrder);
        }
    }
    if turns.iter().any(|m| m.content.trim().is_empty()) {
        return Some(DropReason::EmptyTurn);
    }
    if turns
        .iter()
        .any(|m| m.content.trim().chars().count() < opts.min_turn_chars)
    {
        return Some(DropReason::TooShort);
    }
    if !blocklist.is_empty()
        && conv.messages.iter().any(|m| {
            let lower = m.content.to_lowercase();
            blocklist.iter().any(|b| lower.contains(b.as_str()))
        })
    {
        return Some(DropReason::Blocklisted);
    }
    None
}

/// Turns the scraped HTML of every message of `conv` into markdown, counting the changes in `report`; on an error
/// (which names the turn) `conv` and `report` are left as they were.
fn normalize_messages(conv: &mut Conversation, report: &mut DataReport) -> Result<(), String> {
    let mut converted = Vec::with_capacity(conv.messages.len());
    for (i, m) in conv.messages.iter().enumerate() {
        converted.push(markdown::normalize(&m.content).map_err(|e| format!("turn {i}: {e}"))?);
    }
    for (m, (text, changes)) in conv.messages.iter_mut().zip(converted) {
        report.html_converted_messages += usize::from(changes.html_converted);
        report.code_blocks_repaired_messages += usize::from(changes.code_blocks_repaired);
        m.content = text;
    }
    Ok(())
}

/// Keeps the conversations that can be trained on, in their original order, and reports every drop.
///
/// A trailing user turn without a reply is kept as part of the conversation (it carries no loss), as FastChat does.
pub fn clean(conversations: Vec<Conversation>, opts: &CleanOptions) -> (Vec<Conversation>, DataReport) {
    let blocklist: Vec<String> = opts
        .blocklist
        .iter()
        .map(|b| b.to_lowercase())
        .filter(|b| !b.is_empty())
        .collect();
    let mut report = DataReport {
        input_conversations: conversations.len(),
        ..DataReport::default()
    };
    let mut seen_ids = HashSet::new();
    let mut seen_first = HashSet::new();
    let mut kept = Vec::with_capacity(conversations.len());
    for mut conv in conversations {
        if let Err(e) = normalize_messages(&mut conv, &mut report) {
            tracing::warn!(id = %conv.id, line = conv.line, "dropping a conversation: {e}");
            report.drop(DropReason::HtmlTooDeep, &conv);
            continue;
        }
        if let Some(reason) = drop_reason(&conv, opts, &blocklist) {
            report.drop(reason, &conv);
            continue;
        }
        if !seen_ids.insert(conv.id.clone()) {
            report.drop(DropReason::DuplicateId, &conv);
            continue;
        }
        let first_exchange: Vec<&str> = conv
            .messages
            .iter()
            .filter(|m| m.role != "system")
            .take(2)
            .map(|m| m.content.trim())
            .collect();
        if !seen_first.insert(first_exchange.join("\u{0}")) {
            report.drop(DropReason::DuplicateFirstExchange, &conv);
            continue;
        }
        kept.push(conv);
    }
    report.kept_conversations = kept.len();
    (kept, report)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn conv(id: &str, line: usize, turns: &[(&str, &str)]) -> Conversation {
        Conversation {
            id: id.into(),
            line,
            messages: turns.iter().map(|(r, c)| ChatMessage::new(r, c)).collect(),
        }
    }

    #[test]
    fn report_counts_every_drop_reason() {
        let convs = vec![
            conv(
                "ok",
                1,
                &[
                    ("system", "s"),
                    ("user", "Hello there"),
                    ("assistant", "General Kenobi"),
                ],
            ),
            conv("no-exchange", 2, &[("user", "alone")]),
            conv("order", 3, &[("assistant", "first"), ("user", "second")]),
            conv("empty", 4, &[("user", "q"), ("assistant", "  ")]),
            conv("short", 5, &[("user", "ab"), ("assistant", "long enough")]),
            conv(
                "ok",
                6,
                &[("user", "another question"), ("assistant", "another answer")],
            ),
            conv(
                "dup-first",
                7,
                &[
                    ("user", "Hello there "),
                    ("assistant", "General Kenobi"),
                    ("user", "more"),
                ],
            ),
            conv(
                "blocked",
                8,
                &[
                    ("user", "tell me"),
                    ("assistant", "As an AI LANGUAGE MODEL, I ..."),
                ],
            ),
            conv(
                "tail-user",
                9,
                &[("user", "why?"), ("assistant", "yes."), ("user", "unanswered")],
            ),
        ];
        let opts = CleanOptions {
            min_turn_chars: 3,
            blocklist: vec!["as an ai language model".into()],
        };
        let (kept, report) = clean(convs, &opts);
        let ids: Vec<&str> = kept.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["ok", "tail-user"]);
        assert_eq!(report.input_conversations, 9);
        assert_eq!(
            report.kept_conversations + report.dropped_total(),
            9,
            "every conversation is accounted for"
        );
        use DropReason::*;
        let expected: BTreeMap<DropReason, usize> = [
            (NoExchange, 1),
            (WrongRoleOrder, 1),
            (EmptyTurn, 1),
            (TooShort, 1),
            (DuplicateId, 1),
            (DuplicateFirstExchange, 1),
            (Blocklisted, 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(report.dropped, expected);
        assert_eq!(report.examples[&DuplicateId], ["ok (line 6)"]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["dropped"]["duplicate_first_exchange"], 1);
    }

    /// The attack: a ShareGPT file of 220 KB whose answer is nested `<div>`s overflowed the stack of `prepare`.
    /// Now that conversation is dropped, counted and named (id and line); the rest of the file is trained on.
    #[test]
    fn a_sharegpt_file_with_220_kb_of_nested_html_drops_that_conversation_and_names_it() {
        let bomb = format!("{}x{}", "<div>".repeat(22_000), "</div>".repeat(22_000));
        let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
        let good = serde_json::json!({"id": "good", "conversations": [
            turn("human", "<p>Hi <strong>there</strong></p>"), turn("gpt", "Hello")]});
        let bad = serde_json::json!({"id": "bomb", "conversations": [
            turn("human", "<p>What?</p>"), turn("gpt", &bomb)]});
        let file = format!("[\n{good},\n{bad}\n]\n");
        assert!(file.len() > 220_000);
        let conversations = parse_conversations(file.as_bytes(), Path::new("sharegpt.json")).unwrap();
        let (kept, report) = clean(conversations, &CleanOptions::default());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].messages[0].content, "Hi **there**");
        assert_eq!(report.dropped, BTreeMap::from([(DropReason::HtmlTooDeep, 1)]));
        assert_eq!(report.examples[&DropReason::HtmlTooDeep], ["bomb (line 3)"]);
        assert_eq!(
            report.html_converted_messages, 1,
            "the dropped conversation's turns are not counted"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["dropped"]["html_too_deep"], 1);
    }
}
