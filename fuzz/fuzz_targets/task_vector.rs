//! Task-vector safetensors parsing and validation against a small manifest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = atlas_fuzz::core_harness::task_vector(data);
});
