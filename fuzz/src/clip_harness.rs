//! Body of the `image_preprocess` fuzz target. Returns the error message of a rejected input
//! and panics when an accepted image breaks an invariant. Also compiled into atlas-clip's
//! `fuzz_corpus` test, which replays the committed corpus on stable.

use atlas_clip::preprocess::Preprocess;

/// Pixel cap while fuzzing: small enough that a compressed bomb under it decodes in
/// milliseconds, so the fuzzer keeps its pace; the corpus test also replays at the default.
pub const FUZZ_MAX_PIXELS: u64 = 1 << 20;

/// Decodes `data` and preprocesses it for a 32-pixel vision tower (the tiny model's).
pub fn image(data: &[u8]) -> Result<(), String> {
    image_with(data, FUZZ_MAX_PIXELS)
}

/// [`image`] with the given pixel cap.
pub fn image_with(data: &[u8], max_pixels: u64) -> Result<(), String> {
    let pre = Preprocess {
        max_pixels,
        ..Preprocess::from_config(32)
    };
    let pixels = pre.from_bytes(data).map_err(|e| e.to_string())?;
    assert_eq!(pixels.len(), 3 * 32 * 32);
    assert!(pixels.iter().all(|x| x.is_finite() && x.abs() < 3.0));
    Ok(())
}
