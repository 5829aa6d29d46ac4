//! Chat templates: the model's own Jinja `chat_template` (rendered by minijinja with the options transformers uses)
//! and FastChat's `vicuna_v1.1`, reproduced byte for byte.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// FastChat's `vicuna_v1.1` system prompt.
pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// How a conversation becomes the prompt text.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// FastChat `vicuna_v1.1`: `SYSTEM USER: u ASSISTANT: a</s>USER: ...`, open slot `ASSISTANT:`.
    Vicuna,
    /// A Jinja template as shipped in `tokenizer_config.json` or GGUF `tokenizer.chat_template`.
    Jinja {
        source: String,
        bos_token: String,
        eos_token: String,
    },
}

impl ChatTemplate {
    /// Resolves a template name: `vicuna_v1.1`, or anything else is taken as Jinja source.
    pub fn named(name: &str) -> Option<Self> {
        matches!(name, "vicuna_v1.1" | "vicuna").then_some(ChatTemplate::Vicuna)
    }

    pub fn name(&self) -> &'static str {
        match self {
            ChatTemplate::Vicuna => "vicuna_v1.1",
            ChatTemplate::Jinja { .. } => "jinja",
        }
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::Template(
                "a conversation needs at least one message".into(),
            ));
        }
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(_, m)| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
        {
            return Err(ModelError::Template(format!(
                "messages[{i}].role is {:?}; expected system, user or assistant",
                m.role
            )));
        }
        match self {
            ChatTemplate::Vicuna => render_vicuna(messages, add_generation_prompt),
            ChatTemplate::Jinja {
                source,
                bos_token,
                eos_token,
            } => render_jinja(source, bos_token, eos_token, messages, add_generation_prompt),
        }
    }
}

fn render_vicuna(messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
    let (system, turns) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (first.content.as_str(), rest),
        _ => (VICUNA_SYSTEM, messages),
    };
    // FastChat's SeparatorStyle.ADD_COLON_TWO with sep " " and sep2 "</s>".
    let mut out =
        String::with_capacity(system.len() + turns.iter().map(|m| m.content.len() + 16).sum::<usize>());
    out.push_str(system);
    out.push(' ');
    for (i, m) in turns.iter().enumerate() {
        let (expected, role, sep) = if i % 2 == 0 {
            ("user", "USER", " ")
        } else {
            ("assistant", "ASSISTANT", "</s>")
        };
        if m.role != expected {
            return Err(ModelError::Template(format!(
                "vicuna_v1.1 needs user and assistant turns to alternate, starting with user; turn {i} is {:?}",
                m.role
            )));
        }
        out.push_str(role);
        if m.content.is_empty() {
            out.push(':');
        } else {
            out.push_str(": ");
            out.push_str(&m.content);
            out.push_str(sep);
        }
    }
    if add_generation_prompt && turns.len() % 2 == 1 {
        out.push_str("ASSISTANT:");
    }
    Ok(out)
}

fn render_jinja(
    source: &str,
    bos_token: &str,
    eos_token: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks, and Python string methods (.strip(), .startswith()).
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", source)
        .map_err(|e| ModelError::Template(format!("cannot parse: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| ModelError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| ModelError::Template(format!("cannot render: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(turns: &[&str]) -> Vec<ChatMessage> {
        turns
            .iter()
            .enumerate()
            .map(|(i, t)| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, t))
            .collect()
    }

    #[test]
    fn vicuna_open_slot_and_separators() {
        let text = ChatTemplate::Vicuna
            .render(&conv(&["Hi", "Hello!", "How are you?"]), true)
            .unwrap();
        assert_eq!(
            text,
            format!("{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:")
        );
    }

    #[test]
    fn vicuna_custom_system_replaces_default() {
        let mut msgs = vec![ChatMessage::new("system", "Be brief.")];
        msgs.extend(conv(&["Hi"]));
        assert_eq!(
            ChatTemplate::Vicuna.render(&msgs, true).unwrap(),
            "Be brief. USER: Hi ASSISTANT:"
        );
    }

    #[test]
    fn vicuna_rejects_out_of_order_roles() {
        let msgs = vec![ChatMessage::new("assistant", "x")];
        let err = ChatTemplate::Vicuna.render(&msgs, true).unwrap_err().to_string();
        assert!(err.contains("turn 0"), "{err}");
        let err = ChatTemplate::Vicuna
            .render(&[ChatMessage::new("tool", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("messages[0].role"), "{err}");
    }

    #[test]
    fn jinja_errors_name_the_problem() {
        let t = ChatTemplate::Jinja {
            source: "{{ raise_exception('no system role') }}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        assert!(
            t.render(&conv(&["x"]), true)
                .unwrap_err()
                .to_string()
                .contains("no system role")
        );
        let t = ChatTemplate::Jinja {
            source: "{% for %}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        assert!(
            t.render(&conv(&["x"]), true)
                .unwrap_err()
                .to_string()
                .contains("cannot parse")
        );
    }

    #[test]
    fn jinja_supports_python_string_methods() {
        let t = ChatTemplate::Jinja {
            source: "{{ bos_token }}{% for m in messages %}[{{ m.role.upper() }}]{{ m.content.strip() }}\n{% endfor %}".into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        assert_eq!(t.render(&conv(&["  hi  "]), false).unwrap(), "<s>[USER]hi\n");
    }
}
