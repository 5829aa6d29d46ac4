//! A ShareGPT dataset file (JSON or JSON Lines, any encoding errors) through the trainer's reader, HTML
//! conversion included.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = camelid_trainer::data::parse_conversations(data, std::path::Path::new("fuzz.jsonl"));
});
