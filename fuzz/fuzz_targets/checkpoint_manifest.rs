//! A checkpoint's `manifest.json`: whatever parses names only plain files inside the checkpoint folder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = camelid_trainer::checkpoint::parse_manifest(data) {
        for name in manifest.files.keys() {
            assert!(
                camelid_trainer::checkpoint::check_file_name(name).is_ok(),
                "an accepted manifest names {name:?}"
            );
        }
    }
});
