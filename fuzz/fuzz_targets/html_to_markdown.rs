//! ShareGPT's HTML turned into Markdown, on any text (deep nesting, broken tags, entities).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = camelid_trainer::data::markdown::normalize(text);
    }
});
