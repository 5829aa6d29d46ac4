//! A GGUF file's header and metadata (nested arrays, sizes, offsets) from any bytes: an error or a header, never a
//! panic, an abort or an allocation the bytes do not justify.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = camelid_model::gguf::read_header(data);
});
