//! Image decoding (JPEG / PNG / WebP) and OpenAI CLIP preprocessing of arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = atlas_fuzz::clip_harness::image(data);
});
