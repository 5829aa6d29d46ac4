//! Chat templates: the model's own Jinja `chat_template` (rendered by minijinja with the options transformers uses)
//! and FastChat's `vicuna_v1.1`, reproduced byte for byte.

use std::ops::Range;

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

/// `vicuna_v1.1` as a transformers chat template, written into exported models so that transformers renders
/// them as FastChat does; camelid loads this exact text back as [`ChatTemplate::Vicuna`].
pub const VICUNA_JINJA: &str = "{#- camelid vicuna_v1.1 (FastChat) -#}\n\
{%- if messages and messages[0]['role'] == 'system' -%}\
{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}\
{%- else -%}\
{%- set system = 'A chat between a curious user and an artificial intelligence assistant. The assistant gives \
helpful, detailed, and polite answers to the user\\'s questions.' -%}{%- set turns = messages -%}\
{%- endif -%}\
{{ system }}{{ ' ' }}\
{%- for m in turns -%}\
{%- if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}</s>{% endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt and turns|length is odd %}ASSISTANT:{% endif -%}";

/// A conversation rendered for training: the text and the byte ranges the model learns to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// For each assistant message: its content and the template's end-of-turn marker after it (`</s>` for
    /// `vicuna_v1.1`, the EOS token for Jinja templates), but not the role prefix before it.
    pub assistant_spans: Vec<Range<usize>>,
}

/// A conversation rendered as a prompt, with where the messages' contents are in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub text: String,
    /// The byte ranges of `text` that are some message's content: text the client wrote, in which special-token
    /// text must not become special tokens. `None` when the template rewrites contents (a Jinja template that
    /// trims or splits them) so that where they are cannot be told exactly.
    pub content_spans: Option<Vec<Range<usize>>>,
}

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

impl ChatTemplate {
    /// Renders the conversation as [`ChatTemplate::render`] does, and finds where each message's content is in it.
    ///
    /// For a Jinja template the conversation is rendered a second time with each non-empty content replaced by a
    /// sentinel; putting the contents back in place of the sentinels must give exactly the first rendering, else
    /// the template rewrote a content and the spans are `None`.
    pub fn render_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedPrompt> {
        let text = self.render(messages, add_generation_prompt)?;
        let content_spans = match self {
            ChatTemplate::Vicuna => Some(render_vicuna_spans(messages, add_generation_prompt)?.content_spans),
            ChatTemplate::Jinja { .. } => {
                let stand_ins: Vec<ChatMessage> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| ChatMessage {
                        role: m.role.clone(),
                        content: if m.content.is_empty() {
                            String::new()
                        } else {
                            sentinel(i)
                        },
                    })
                    .collect();
                let skeleton = self.render(&stand_ins, add_generation_prompt)?;
                fill_sentinels(&skeleton, messages)
                    .filter(|(filled, _)| *filled == text)
                    .map(|(_, spans)| spans)
            }
        };
        Ok(RenderedPrompt { text, content_spans })
    }
}

const SENTINEL_OPEN: char = '\u{F8F0}';
const SENTINEL_CLOSE: char = '\u{F8F1}';

/// Message `i`'s stand-in: private-use characters around the index, which no template trims or changes the case of.
fn sentinel(i: usize) -> String {
    format!("{SENTINEL_OPEN}{i}{SENTINEL_CLOSE}")
}

/// `skeleton` with each sentinel replaced by its message's content, and the byte ranges the contents took.
fn fill_sentinels(skeleton: &str, messages: &[ChatMessage]) -> Option<(String, Vec<Range<usize>>)> {
    let mut out =
        String::with_capacity(skeleton.len() + messages.iter().map(|m| m.content.len()).sum::<usize>());
    let mut spans = Vec::new();
    let mut rest = skeleton;
    while let Some(open) = rest.find(SENTINEL_OPEN) {
        out.push_str(&rest[..open]);
        let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
        let close = after.find(SENTINEL_CLOSE)?;
        let index: usize = after[..close].parse().ok()?;
        let content = &messages.get(index)?.content;
        spans.push(out.len()..out.len() + content.len());
        out.push_str(content);
        rest = &after[close + SENTINEL_CLOSE.len_utf8()..];
    }
    out.push_str(rest);
    Some((out, spans))
}

fn render_vicuna(messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
    Ok(render_vicuna_spans(messages, add_generation_prompt)?.text)
}

/// FastChat `vicuna_v1.1` rendered, with where the messages' contents are.
struct VicunaRendering {
    text: String,
    /// Each assistant message's content and its `</s>`.
    assistant_spans: Vec<Range<usize>>,
    /// Every message's content (a custom system prompt included).
    content_spans: Vec<Range<usize>>,
}

/// FastChat `vicuna_v1.1` with the byte range of each message's content and of each assistant reply with its `</s>`.
fn render_vicuna_spans(messages: &[ChatMessage], add_generation_prompt: bool) -> Result<VicunaRendering> {
    let mut content_spans = Vec::new();
    let (system, turns) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => {
            content_spans.push(0..first.content.len());
            (first.content.as_str(), rest)
        }
        _ => (VICUNA_SYSTEM, messages),
    };
    // FastChat's SeparatorStyle.ADD_COLON_TWO with sep " " and sep2 "</s>".
    let mut out =
        String::with_capacity(system.len() + turns.iter().map(|m| m.content.len() + 16).sum::<usize>());
    out.push_str(system);
    out.push(' ');
    let mut spans = Vec::new();
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
            let start = out.len();
            out.push_str(&m.content);
            content_spans.push(start..out.len());
            out.push_str(sep);
            if expected == "assistant" {
                spans.push(start..out.len());
            }
        }
    }
    if add_generation_prompt && turns.len() % 2 == 1 {
        out.push_str("ASSISTANT:");
    }
    Ok(VicunaRendering {
        text: out,
        assistant_spans: spans,
        content_spans,
    })
}

impl ChatTemplate {
    /// Renders a whole conversation (no generation prompt) with the spans that carry the training loss.
    ///
    /// For Jinja templates the spans come from rendering prefixes of the conversation: assistant message `i` starts
    /// where `messages[..i]` with the generation prompt ends, and ends after the last EOS token inside
    /// `messages[..=i]`. Templates whose output for a prefix is not a prefix of the whole are refused.
    pub fn render_for_training(&self, messages: &[ChatMessage]) -> Result<RenderedChat> {
        let (bos_token, eos_token, source) = match self {
            ChatTemplate::Vicuna => {
                self.render(messages, false)?;
                let r = render_vicuna_spans(messages, false)?;
                return Ok(RenderedChat {
                    text: r.text,
                    assistant_spans: r.assistant_spans,
                });
            }
            ChatTemplate::Jinja {
                source,
                bos_token,
                eos_token,
            } => (bos_token, eos_token, source),
        };
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            if i == 0 {
                return Err(ModelError::Template(
                    "messages[0] is an assistant message; a conversation starts with system or user".into(),
                ));
            }
            let prefix = render_jinja(source, bos_token, eos_token, &messages[..i], true)?;
            let through = render_jinja(source, bos_token, eos_token, &messages[..=i], false)?;
            if !through.starts_with(&prefix) || !text.starts_with(&through) {
                return Err(ModelError::Template(format!(
                    "the chat template does not render messages[{i}] as a continuation of the messages before it, \
                     so its assistant span cannot be found; use vicuna_v1.1 or a prefix-stable template"
                )));
            }
            let mut end = through.len();
            if !eos_token.is_empty()
                && let Some(pos) = through[prefix.len()..].rfind(eos_token.as_str())
            {
                end = prefix.len() + pos + eos_token.len();
            }
            spans.push(prefix.len()..end);
        }
        Ok(RenderedChat {
            text,
            assistant_spans: spans,
        })
    }
}

/// Marks the tokens whose text overlaps a span: the tokens that carry the training loss.
pub fn label_mask(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, end)| {
            spans
                .iter()
                .any(|s| start < s.end && end > s.start && end > start)
        })
        .collect()
}

/// Instructions a chat template may run for one render, and more for each message: far above what real templates
/// (HF's, Llama's, Qwen's) need, and a hard stop for a model file whose template loops to burn the worker's CPU.
const TEMPLATE_FUEL: u64 = 200_000;
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 5_000;

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
    env.set_fuel(Some(
        TEMPLATE_FUEL + TEMPLATE_FUEL_PER_MESSAGE * messages.len() as u64,
    ));
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

    /// The attack: a model file whose chat template loops for ever (or close to it). The render stops with an
    /// error instead of holding the worker's CPU.
    #[test]
    fn a_template_that_loops_runs_out_of_fuel() {
        let source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x";
        // Ten billion iterations unfuelled: the test finishing at all, with the fuel error, is the point.
        let e = render_jinja(source, "<s>", "</s>", &conv(&["hi"]), true).unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
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

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn spans_text(r: &RenderedChat) -> Vec<&str> {
        r.assistant_spans.iter().map(|s| &r.text[s.clone()]).collect()
    }

    #[test]
    fn vicuna_training_spans_cover_replies_and_their_end_marker() {
        let mut msgs = vec![ChatMessage::new("system", "Be kind.")];
        msgs.extend(conv(&["Hi", "Hello! 👋", "Code?", "```rs\nfn f() {}\n```"]));
        let r = ChatTemplate::Vicuna.render_for_training(&msgs).unwrap();
        assert_eq!(r.text, ChatTemplate::Vicuna.render(&msgs, false).unwrap());
        assert_eq!(spans_text(&r), ["Hello! 👋</s>", "```rs\nfn f() {}\n```</s>"]);
    }

    #[test]
    fn jinja_training_spans_end_at_the_eos_token() {
        let t = ChatTemplate::Jinja {
            source: CHATML.into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        let mut msgs = vec![ChatMessage::new("system", "sys")];
        msgs.extend(conv(&["a", "b", "c", "déjà"]));
        let r = t.render_for_training(&msgs).unwrap();
        assert_eq!(spans_text(&r), ["b<|im_end|>", "déjà<|im_end|>"]);
        let err = t.render_for_training(&conv(&["x"])[..0]).unwrap_err().to_string();
        assert!(err.contains("at least one message"), "{err}");
        let starts_with_assistant = [ChatMessage::new("assistant", "x")];
        assert!(
            t.render_for_training(&starts_with_assistant)
                .unwrap_err()
                .to_string()
                .contains("messages[0]")
        );
    }

    #[test]
    fn templates_that_rewrite_history_are_refused_for_training() {
        // Renders only the last message: earlier renderings are not prefixes of later ones.
        let t = ChatTemplate::Jinja {
            source: "{{ messages[-1].content }}{% if add_generation_prompt %}>{% endif %}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let err = t
            .render_for_training(&conv(&["question", "answer"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("messages[1]"), "{err}");
    }

    #[test]
    fn tokens_overlapping_a_span_are_labelled() {
        let offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12)];
        let spans = vec![4..9, 20..30];
        assert_eq!(label_mask(&offsets, &spans), [false, true, true, false, false]);
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
