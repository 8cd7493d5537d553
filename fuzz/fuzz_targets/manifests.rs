//! Manifest files as a user (or a broken tool) may write them: parsed or
//! refused with errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = strait_control_plane::manifests::parse_file(text);
    }
});
