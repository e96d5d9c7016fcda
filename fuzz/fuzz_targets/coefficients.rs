//! Coefficient JSON (explicit requests and stored coefficients) checked against a library.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = atlas_fuzz::core_harness::coefficients(data);
});
