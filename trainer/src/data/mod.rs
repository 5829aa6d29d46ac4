//! Everything between a dataset file and the micro-batches a step trains on, in pipeline order:
//! - this module reads conversation files and cleans them (with [`markdown`] repairing scraped HTML),
//! - [`tokenize`] renders the cleaned conversations with the chat template, splits them to fit and labels them,
//! - [`batching`] orders the samples into micro-batches and collates them into tensors.
//!
//! Reading: ShareGPT (`{"id", "conversations": [{"from", "value"}]}`) and OpenAI-style
//! (`{"messages": [{"role", "content"}]}`), as a JSON array or JSON Lines.
//!
//! A file that is not valid JSON, or a record that does not have either shape, stops the run with an error naming
//! the file and line: that is a broken file, not a bad sample. Conversations that parse but cannot be trained on
//! (wrong role order, empty turns, duplicates, blocklisted text) are dropped and counted by reason in a
//! [`DataReport`], as FastChat's `clean_sharegpt` drops them, except that nothing goes uncounted.

pub mod batching;
pub mod markdown;
pub mod tokenize;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use camelid_model::ChatMessage;
use serde::{Deserialize, Serialize};

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

#[derive(Deserialize)]
struct ShareGptTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    ShareGpt {
        id: Option<serde_json::Value>,
        conversations: Vec<ShareGptTurn>,
    },
    OpenAi {
        id: Option<serde_json::Value>,
        messages: Vec<OpenAiMessage>,
    },
}

/// Maps the role names found in ShareGPT dumps and OpenAI files to `system`, `user` and `assistant`.
fn normalize_role(role: &str) -> Option<&'static str> {
    match role.to_ascii_lowercase().as_str() {
        "system" => Some("system"),
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => Some("assistant"),
        _ => None,
    }
}

fn record_to_conversation(
    value: serde_json::Value,
    line: usize,
    path: &Path,
) -> Result<Conversation, DataError> {
    let record_error = |detail: String| DataError::Record {
        path: path.to_path_buf(),
        line,
        detail,
    };
    let record: Record = serde_json::from_value(value).map_err(|_| {
        record_error(
            "not a conversation: expected {\"conversations\": [{\"from\", \"value\"}]} (ShareGPT) or \
             {\"messages\": [{\"role\", \"content\"}]} (OpenAI)"
                .into(),
        )
    })?;
    let (id, turns): (Option<serde_json::Value>, Vec<(String, String)>) = match record {
        Record::ShareGpt { id, conversations } => {
            (id, conversations.into_iter().map(|t| (t.from, t.value)).collect())
        }
        Record::OpenAi { id, messages } => (id, messages.into_iter().map(|m| (m.role, m.content)).collect()),
    };
    let mut messages = Vec::with_capacity(turns.len());
    for (i, (role, content)) in turns.into_iter().enumerate() {
        let role = normalize_role(&role).ok_or_else(|| {
            record_error(format!(
                "turn {i} has role {role:?}; expected system, human/user or gpt/assistant"
            ))
        })?;
        messages.push(ChatMessage::new(role, &content));
    }
    let id = match id {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => format!("line-{line}"),
    };
    Ok(Conversation { id, line, messages })
}

/// Reads a JSON array or JSON Lines file of conversations (the format is taken from the first non-blank byte).
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let trimmed = text.trim_start();
    let conversations = if trimmed.starts_with('[') {
        read_json_array(&text, path)?
    } else {
        read_json_lines(&text, path)?
    };
    if conversations.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(conversations)
}

fn read_json_lines(text: &str, path: &Path) -> Result<Vec<Conversation>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            line,
            detail: format!("invalid JSON: {e}"),
        })?;
        out.push(record_to_conversation(value, line, path)?);
    }
    Ok(out)
}

/// The line each top-level array element starts on, found by walking the array once with a streaming parser.
fn read_json_array(text: &str, path: &Path) -> Result<Vec<Conversation>, DataError> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| DataError::Record {
        path: path.to_path_buf(),
        line: e.line(),
        detail: format!("invalid JSON: {e}"),
    })?;
    let starts = element_start_lines(text);
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| record_to_conversation(v, starts.get(i).copied().unwrap_or(1), path))
        .collect()
}

/// 1-based lines where the elements of a top-level JSON array begin (depth-1 values), skipping strings.
fn element_start_lines(text: &str) -> Vec<usize> {
    let (mut depth, mut line, mut in_string, mut escaped, mut expecting) =
        (0usize, 1usize, false, false, false);
    let mut starts = Vec::new();
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expecting && !c.is_whitespace() && c != ']' {
            starts.push(line);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    starts
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
        for m in &mut conv.messages {
            let (text, changes) = markdown::normalize(&m.content);
            report.html_converted_messages += usize::from(changes.html_converted);
            report.code_blocks_repaired_messages += usize::from(changes.code_blocks_repaired);
            m.content = text;
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
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("camelid-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_sharegpt_arrays_and_openai_jsonl_with_their_lines() {
        let array = write(
            "a.json",
            "[\n  {\"id\": \"x\", \"conversations\": [{\"from\": \"human\", \"value\": \"hi [\\\"]\"},\n    {\"from\": \"gpt\", \"value\": \"yo\"}]},\n  {\"id\": 7, \"conversations\": []}\n]\n",
        );
        let convs = read_conversations(&array).unwrap();
        assert_eq!(convs.len(), 2);
        assert_eq!((convs[0].id.as_str(), convs[0].line), ("x", 2));
        assert_eq!(
            convs[0].messages,
            [
                ChatMessage::new("user", "hi [\"]"),
                ChatMessage::new("assistant", "yo")
            ]
        );
        assert_eq!((convs[1].id.as_str(), convs[1].line), ("7", 4));

        let lines = write(
            "b.jsonl",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"u\"}]}\n\n{\"messages\": []}\n",
        );
        let convs = read_conversations(&lines).unwrap();
        assert_eq!(
            (convs[0].id.as_str(), convs[0].line, convs[1].line),
            ("line-1", 1, 3)
        );
        assert_eq!(convs[0].messages[0], ChatMessage::new("system", "s"));
    }

    #[test]
    fn broken_files_name_the_file_and_line() {
        let bad_json = write("c.jsonl", "{\"messages\": []}\n{\"messages\": [}\n");
        let err = read_conversations(&bad_json).unwrap_err().to_string();
        assert!(
            err.contains("c.jsonl:2:") && err.contains("invalid JSON"),
            "{err}"
        );

        let bad_schema = write("d.jsonl", "{\"messages\": []}\n\n{\"prompt\": \"x\"}\n");
        let err = read_conversations(&bad_schema).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:3:") && err.contains("ShareGPT"), "{err}");

        let bad_role = write(
            "e.json",
            "[\n{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}]",
        );
        let err = read_conversations(&bad_role).unwrap_err().to_string();
        assert!(err.contains("e.json:2:") && err.contains("\"robot\""), "{err}");

        let truncated = write("f.json", "[\n{\"conversations\": [\n");
        assert!(
            read_conversations(&truncated)
                .unwrap_err()
                .to_string()
                .contains("f.json:")
        );

        let empty = write("g.jsonl", "\n  \n");
        assert_eq!(
            read_conversations(&empty).unwrap_err().category(),
            "empty_dataset"
        );
        let missing = Path::new("/nonexistent/data.json");
        assert!(
            read_conversations(missing)
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/data.json")
        );
    }

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
}
