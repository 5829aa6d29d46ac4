//! Reading conversation files: ShareGPT (`{"id", "conversations": [{"from", "value"}]}`) and OpenAI-style
//! (`{"messages": [{"role", "content"}]}`), as a JSON array or JSON Lines, each record remembering its line.

use std::path::Path;

use camelid_model::ChatMessage;
use serde::Deserialize;

use super::{Conversation, DataError};

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
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_conversations(&bytes, path)
}

/// [`read_conversations`] on the file's bytes, without the file system: `path` only names the file in errors.
/// Pure and total on any bytes (no panics, no recursion past `serde_json`'s limit), so a fuzz target can call it.
///
/// A byte that is not UTF-8 refuses the whole file with the line, column and byte offset where it is: like
/// invalid JSON, it means a damaged or mis-encoded file (every record after it is suspect), not one bad sample.
/// A leading UTF-8 byte-order mark is ignored.
pub fn parse_conversations(bytes: &[u8], path: &Path) -> Result<Vec<Conversation>, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| invalid_utf8(bytes, e.valid_up_to(), path))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    let conversations = if trimmed.starts_with('[') {
        read_json_array(text, path)?
    } else {
        read_json_lines(text, path)?
    };
    if conversations.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(conversations)
}

/// The error for the first byte of `bytes` that is not UTF-8, at `offset`, naming its line and column.
fn invalid_utf8(bytes: &[u8], offset: usize, path: &Path) -> DataError {
    let before = bytes.get(..offset).unwrap_or_default();
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let column = 1 + before.iter().rev().take_while(|&&b| b != b'\n').count();
    let byte = bytes.get(offset).copied().unwrap_or_default();
    DataError::Record {
        path: path.to_path_buf(),
        line,
        detail: format!(
            "invalid UTF-8: byte 0x{byte:02x} at column {column} (byte offset {offset} of the file); dataset files \
             must be UTF-8 (re-encode it, e.g. with iconv, or remove the damaged record)"
        ),
    }
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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

    /// The attack: one byte that is not UTF-8 in an otherwise good file. The whole file is refused (a damaged
    /// file), with the file, the line and the byte offset of the bad byte.
    #[test]
    fn a_byte_that_is_not_utf8_is_refused_naming_the_file_line_and_offset() {
        let good = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n";
        let mut jsonl = good.repeat(2).into_bytes();
        jsonl.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n");
        jsonl.extend_from_slice(good.as_bytes());
        let offset = 2 * good.len() + 46;
        assert_eq!(jsonl[offset], 0xe9);
        let err = parse_conversations(&jsonl, Path::new("data/bad.jsonl")).unwrap_err();
        assert_eq!(err.category(), "malformed_record");
        let text = err.to_string();
        assert!(
            text.starts_with("data/bad.jsonl:3: invalid UTF-8: byte 0xe9 at column 47")
                && text.contains(&format!("byte offset {offset} of the file")),
            "{text}"
        );

        let mut array =
            b"[\n  {\"conversations\": []},\n  {\"conversations\": [{\"from\": \"human\", \"value\": \""
                .to_vec();
        let offset = array.len();
        array.extend_from_slice(b"\xff\xfe\"}]}\n]\n");
        let err = parse_conversations(&array, Path::new("a.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("a.json:3: invalid UTF-8: byte 0xff")
                && err.contains(&format!("byte offset {offset} of the file")),
            "{err}"
        );

        // Read from disk, the same.
        let path = write("bad-utf8.jsonl", "");
        std::fs::write(&path, &jsonl).unwrap();
        let err = read_conversations(&path).unwrap_err().to_string();
        assert!(err.contains("bad-utf8.jsonl:3: invalid UTF-8"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_ignored_and_any_bytes_are_refused_without_panicking() {
        let with_bom = "\u{feff}{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n";
        let convs = parse_conversations(with_bom.as_bytes(), Path::new("bom.jsonl")).unwrap();
        assert_eq!((convs.len(), convs[0].line), (1, 1));
        for bytes in [
            &b""[..],
            b"\xff",
            b"[",
            b"[[[[",
            b"\n\n\xc3",
            b"{\"id\": 1e999}",
            &[b'['; 10_000],
        ] {
            assert!(parse_conversations(bytes, Path::new("x")).is_err(), "{bytes:?}");
        }
    }
}
