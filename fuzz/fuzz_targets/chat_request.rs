//! A client's request body through the gateway's parsing and validation, chat and completions: an OpenAI-shaped
//! error or a validated request, never a panic.
#![no_main]

use camelid_gateway::validate::{self, Limits};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(r) = validate::parse_chat(data) {
        let _ = validate::chat(r, &limits);
    }
    if let Ok(r) = validate::parse_completion(data) {
        let _ = validate::completion(r, &limits);
    }
});
