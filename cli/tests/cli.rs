//! The `camelid` binary as users run it: completions on stdout, one clear error line and exit code 2 on bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn camelid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args(args)
        .env("CAMELID_LOG", "warn")
        .output()
        .expect("run camelid")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit 2, a single `error:` line, no panic or backtrace.
fn assert_user_error(out: &Output, mentions: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 || err.contains("Usage"),
        "expected one error line, got: {err}"
    );
    assert!(
        err.to_lowercase().contains(&mentions.to_lowercase()),
        "expected {mentions:?} in: {err}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
}

#[test]
fn greedy_generate_prints_only_the_completion() {
    // f32: the GGUF's blocks dequantized, as transformers runs them (the default computes on the Q4_1 blocks with
    // 8-bit activations, as llama.cpp does, and this prompt's first token is a near-tie there).
    let out = camelid(&[
        "generate",
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--prompt",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The same completion transformers produces for this prompt (model/tests/parity.rs checks it token by token).
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "The capital of France is Paris.\n"
    );
}

#[test]
fn chat_streams_and_keeps_the_conversation() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args([
            "chat",
            "--dtype",
            "f32",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ])
        .env("CAMELID_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nRepeat your last answer word for word.\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(answers.len() >= 2, "two answers expected: {text:?}");
    assert!(answers[0].contains("Paris"), "{text:?}");
    assert!(
        answers[1..].iter().any(|a| a.contains("Paris")),
        "the second answer sees the first turn: {text:?}"
    );
}

#[test]
fn template_flag_switches_to_vicuna_and_rejects_unknown_names() {
    let out = camelid(&[
        "generate",
        "--template",
        "vicuna_v1.1",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--prompt",
        "Hi",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!out.stdout.is_empty());
    let out = camelid(&["generate", "--template", "no-such-template", "--prompt", "Hi"]);
    assert_user_error(&out, "no-such-template");
}

#[test]
fn missing_model_path_is_one_clear_error() {
    let out = camelid(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert_user_error(&out, "/nonexistent/model.gguf");
}

#[test]
fn non_llama_model_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("camelid-cli-gpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2", "n_layer": 2}"#).unwrap();
    let out = camelid(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"]);
    assert_user_error(&out, "gpt2");
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    let out = camelid(&[
        "generate",
        "--model",
        dir.join("notes.txt").to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_user_error(&out, "neither an HF model directory nor a .gguf file");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let prompt = "llama ".repeat(9000);
    let out = camelid(&["generate", "--prompt", &prompt]);
    assert_user_error(&out, "context");
}

#[test]
fn bad_flag_values_name_the_flag() {
    assert_user_error(
        &camelid(&["generate", "--temperature", "-1", "--prompt", "hi"]),
        "temperature",
    );
    assert_user_error(&camelid(&["generate", "--top-p", "0", "--prompt", "hi"]), "top_p");
    assert_user_error(
        &camelid(&["generate", "--max-tokens", "0", "--prompt", "hi"]),
        "--max-tokens",
    );
    assert_eq!(
        camelid(&["generate", "--max-tokens", "many", "--prompt", "hi"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        camelid(&["generate"]).status.code(),
        Some(2),
        "--prompt is required"
    );
}
