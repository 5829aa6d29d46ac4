//! The moderation normalizer (NFKD, confusables, invisible characters, split letters, base64) on any text: it
//! ends, and every view it gives is bounded by the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let views = camelid_gateway::moderation::normalize::views(text);
        let total: usize = views.iter().map(String::len).sum();
        assert!(
            total <= 64 * text.len() + 4096,
            "{} bytes of views from {} bytes",
            total,
            text.len()
        );
    }
});
