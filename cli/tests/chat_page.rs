//! The gateway's chat page at `/` in real headless Chromium (Debian's `chromium` and `chromium-driver`), against
//! `camelid serve` with an API key and rules moderation from a config file: a wrong key is reported, the right
//! one lists the model, a message gets a streamed answer, a flagged one shows the moderation notice. The
//! browser is driven by `tests/python/chat_page_e2e.py` over WebDriver; the screenshot is `target/chat_page.png`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{python, serve, workspace};

const KEY: &str = "sk-camelid-chat-page-test";

#[test]
fn the_chat_page_works_in_a_real_browser() {
    let dir = workspace().join("target/chat-page-test");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    let hash = camelid_gateway::keys::hash_key(KEY);
    let hash: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        &config,
        format!(
            "moderation:\n  providers:\n    rules: {{type: rules, categories: {{violence: [kill], self-harm: [hurt myself]}}}}\n  \
             profiles:\n    default: {{input: [rules]}}\n  default_profile: default\nkeys:\n  - {{name: browser, sha256: {hash}}}\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let (_server, port, _) = serve(&["--served-model-name", "smol", "--config", &config]);
    let screenshot = workspace().join("target/chat_page.png");
    let status = Command::new(python())
        .arg(workspace().join("tests/python/chat_page_e2e.py"))
        .args(["--base-url", &format!("http://127.0.0.1:{port}")])
        .args(["--key", KEY, "--model", "smol"])
        .arg("--screenshot")
        .arg(&screenshot)
        .status()
        .expect("run tests/python/chat_page_e2e.py");
    assert!(
        status.success(),
        "chat_page_e2e.py failed (its output above says which check)"
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 1000,
        "no screenshot"
    );
}
