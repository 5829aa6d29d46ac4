//! A safetensors file's header (length prefix, JSON, dtypes, shapes, offsets) from any bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = camelid_model::weights::read_safetensors_header(data);
});
