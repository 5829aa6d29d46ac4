//! The data pipeline on SmolLM2's real tokenizer and template: long conversations split at exchange boundaries
//! with every segment kept, over-long exchanges truncated and counted, and `prepare`'s JSON report counting every
//! drop reason and every HTML repair.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use camelid_model::{ChatMessage, LoadOptions, LoadedModel};
use camelid_trainer::data::Conversation;
use camelid_trainer::data::tokenize::{Sample, tokenize};
use common::*;
use serde_json::json;

fn smollm2() -> LoadedModel {
    camelid_model::load(
        &camelid_model::default_model_path().unwrap(),
        LoadOptions::default(),
    )
    .unwrap()
}

fn conversation(id: &str, messages: Vec<ChatMessage>) -> Conversation {
    Conversation {
        id: id.into(),
        line: 1,
        messages,
    }
}

/// The decoded text of the labelled tokens of a sample.
fn labelled_text(model: &LoadedModel, s: &Sample) -> String {
    let ids: Vec<u32> = s
        .ids
        .iter()
        .zip(&s.labels)
        .filter(|(_, l)| **l)
        .map(|(i, _)| *i)
        .collect();
    model.tokenizer.decode(&ids, false).unwrap()
}

#[test]
fn long_conversations_are_split_at_exchanges_and_nothing_is_lost() {
    let model = smollm2();
    let m = ChatMessage::new;
    let mut messages = vec![m("system", "You are terse.")];
    let replies: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "Reply {i}: {}",
                "the quick brown fox jumps over the lazy dog ".repeat(3)
            )
        })
        .collect();
    for (i, r) in replies.iter().enumerate() {
        messages.push(m("user", &format!("Question {i} about foxes and dogs?")));
        messages.push(m("assistant", r));
    }
    let whole = model.training_tokens(&messages).unwrap().ids.len();
    let seq_len = whole / 3;
    let (samples, report) = tokenize(&[conversation("long", messages)], &model, seq_len).unwrap();
    assert_eq!(report.split_conversations, 1);
    assert!(samples.len() >= 3, "{report:?}");
    assert_eq!(report.segments_from_splits, samples.len());
    assert_eq!(
        (report.truncated_exchanges, report.dropped_no_trainable_tokens),
        (0, 0)
    );
    let mut learned = String::new();
    for (i, s) in samples.iter().enumerate() {
        assert!(s.ids.len() <= seq_len, "segment {i} has {} tokens", s.ids.len());
        assert_eq!(s.id, format!("long#{i}"));
        let text = model.tokenizer.decode(&s.ids, false).unwrap();
        assert!(
            text.contains("You are terse."),
            "segment {i} lost the system prompt: {text}"
        );
        learned.push_str(&labelled_text(&model, s));
    }
    // Every reply, the last one included, is learned exactly once, each followed by its end-of-turn token.
    let expected: String = replies.iter().map(|r| format!("{r}<|im_end|>")).collect();
    assert_eq!(learned, expected);
}

#[test]
fn an_exchange_longer_than_the_limit_is_truncated_and_counted() {
    let model = smollm2();
    let m = ChatMessage::new;
    let long_reply = "word ".repeat(300);
    let convs = [
        conversation("ok", vec![m("user", "Hi"), m("assistant", "Hello!")]),
        conversation("long-reply", vec![m("user", "Talk"), m("assistant", &long_reply)]),
        conversation(
            "long-question",
            vec![m("user", &long_reply), m("assistant", "Ok.")],
        ),
    ];
    let (samples, report) = tokenize(&convs, &model, 64).unwrap();
    assert_eq!(report.truncated_exchanges, 2, "{report:?}");
    // The long question leaves no room for the answer: dropped, counted, named.
    assert_eq!(report.dropped_no_trainable_tokens, 1, "{report:?}");
    assert!(
        report.examples.iter().any(|e| e.starts_with("long-question#0")),
        "{report:?}"
    );
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[1].ids.len(), 64);
    assert!(labelled_text(&model, &samples[1]).starts_with("word word"));
    assert_eq!(report.samples, 2);
    assert_eq!(
        report.trainable_tokens,
        samples.iter().map(Sample::trainable_tokens).sum::<usize>()
    );
}

#[test]
fn prepare_reports_every_drop_reason_and_repair() {
    let dir = scratch("prepare");
    let turn = |from: &str, value: &str| json!({"from": from, "value": value});
    let ok = |id: &str, q: &str| json!({"id": id, "conversations": [turn("human", q), turn("gpt", "Sure thing.")]});
    let records = [
        ok("a", "first"),
        json!({"id": "html", "conversations": [turn("human", "Format?"),
            turn("gpt", "<div><p>Use <strong>bold</strong>:</p><pre><code>python Copy code print(1)\n</code></pre></div>")]}),
        json!({"id": "no-exchange", "conversations": [turn("human", "alone")]}),
        json!({"id": "order", "conversations": [turn("gpt", "hi"), turn("human", "hey")]}),
        json!({"id": "empty", "conversations": [turn("human", "q"), turn("gpt", "  ")]}),
        json!({"id": "short", "conversations": [turn("human", "q"), turn("gpt", "k")]}),
        ok("a", "another question"),
        ok("dup-first", "first"),
        json!({"id": "blocked", "conversations": [turn("human", "q?"), turn("gpt", "As an AI language model, no.")]}),
    ];
    let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
    let out = dir.join("out");
    let run = trainer()
        .arg("prepare")
        .arg("--data")
        .arg(dir.join("data.jsonl"))
        .arg("--output")
        .arg(&out)
        .args([
            "--min-turn-chars",
            "2",
            "--blocklist",
            "as an ai language model",
            "--max-length",
            "128",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data_report.json")).unwrap()).unwrap();
    let cleaning = &report["cleaning"];
    assert_eq!(cleaning["input_conversations"], 9);
    assert_eq!(cleaning["kept_conversations"], 2);
    assert_eq!(
        cleaning["dropped"],
        json!({"no_exchange": 1, "wrong_role_order": 1, "empty_turn": 1, "too_short": 1, "duplicate_id": 1,
               "duplicate_first_exchange": 1, "blocklisted": 1})
    );
    assert_eq!(cleaning["examples"]["duplicate_id"], json!(["a (line 7)"]));
    assert_eq!(cleaning["html_converted_messages"], 1);
    assert_eq!(report["tokenization"]["samples"], 2);
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2);
    let html: serde_json::Value = serde_json::from_str(samples.lines().nth(1).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(html["ids"].clone()).unwrap();
    let text = smollm2().tokenizer.decode(&ids, false).unwrap();
    assert!(
        text.contains("Use **bold**:") && text.contains("```python\nprint(1)\n```"),
        "{text}"
    );
}
