//! `camelid serve` on the default SmolLM2, driven by the official `openai` Python client
//! (`tests/python/openai_e2e.py`): same greedy text as `camelid generate`, streaming, usage, stop strings,
//! completions, 16 concurrent streams equal to their solo outputs, and bad input answered in OpenAI's error shape.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{http_status, python, serve, workspace};

#[test]
fn openai_client_against_camelid_serve() {
    let (_server, port, model) = serve(&[]);
    let status = Command::new(python())
        .arg(workspace().join("tests/python/openai_e2e.py"))
        .args(["--base-url", &format!("http://127.0.0.1:{port}")])
        .args(["--camelid", env!("CARGO_BIN_EXE_camelid")])
        .arg("--model-path")
        .arg(&model)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .status()
        .expect("run tests/python/openai_e2e.py");
    assert!(
        status.success(),
        "openai_e2e.py failed (its output above says which check)"
    );
    assert_eq!(http_status(port, "/healthz"), Some(200));
}
