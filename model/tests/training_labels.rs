//! Training labels on the real SmolLM2 tokenizer: exactly the assistant's replies and their end-of-turn markers
//! carry the loss, with SmolLM2's own template and with `vicuna_v1.1`, on 1-, 2- and multi-turn conversations with
//! system prompts, unicode and code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use camelid_model::{ChatMessage, ChatTemplate, LoadOptions, LoadedModel};

fn conversations() -> Vec<Vec<ChatMessage>> {
    let m = ChatMessage::new;
    vec![
        vec![m("user", "Hi"), m("assistant", "Hello! How can I help?")],
        vec![
            m("system", "You answer in French."),
            m("user", "Say thanks"),
            m("assistant", "Merci beaucoup, c'est déjà fait ✨"),
            m("user", "And in Japanese?"),
            m("assistant", "ありがとうございます 🙏"),
        ],
        vec![
            m("user", "Write code"),
            m("assistant", "```python\ndef add(a, b):\n    return a + b\n```"),
            m("user", "Shorter"),
            m("assistant", "`add = lambda a, b: a + b`"),
            m("user", "Thanks"),
            m("assistant", "You're welcome."),
        ],
    ]
}

/// The decoded text of each run of consecutive labelled tokens.
fn labelled_runs(loaded: &LoadedModel, messages: &[ChatMessage]) -> Vec<String> {
    let t = loaded.training_tokens(messages).unwrap();
    assert_eq!(t.ids.len(), t.labels.len());
    let mut runs = vec![];
    let mut current: Vec<u32> = vec![];
    for (&id, &label) in t.ids.iter().zip(&t.labels) {
        if label {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(
                loaded
                    .tokenizer
                    .decode(&std::mem::take(&mut current), false)
                    .unwrap(),
            );
        }
    }
    if !current.is_empty() {
        runs.push(loaded.tokenizer.decode(&current, false).unwrap());
    }
    runs
}

fn replies(messages: &[ChatMessage]) -> Vec<&str> {
    messages
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
        .collect()
}

#[test]
fn smollm2_template_labels_exactly_the_replies_and_im_end() {
    let path = camelid_model::default_model_path().expect("the SmolLM2 GGUF (run `make test`)");
    let loaded = camelid_model::load(&path, LoadOptions::default()).unwrap();
    for conv in conversations() {
        let expected: Vec<String> = replies(&conv).iter().map(|r| format!("{r}<|im_end|>")).collect();
        assert_eq!(labelled_runs(&loaded, &conv), expected);
    }
}

#[test]
fn vicuna_template_labels_exactly_the_replies_and_end_marker() {
    let path = camelid_model::default_model_path().expect("the SmolLM2 GGUF (run `make test`)");
    let mut loaded = camelid_model::load(&path, LoadOptions::default()).unwrap();
    loaded.template = ChatTemplate::Vicuna;
    for conv in conversations() {
        let runs = labelled_runs(&loaded, &conv);
        // A byte-level token carries the space after "ASSISTANT:" with the reply's first word.
        let runs: Vec<&str> = runs.iter().map(|r| r.strip_prefix(' ').unwrap_or(r)).collect();
        let expected: Vec<String> = replies(&conv).iter().map(|r| format!("{r}</s>")).collect();
        assert_eq!(runs, expected);
    }
}
