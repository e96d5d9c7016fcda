//! Uploaded images: base64 decoding, and decoding with atlas-clip's preprocessing (which checks
//! the header before any pixel is decoded: a small file may claim a huge image), with errors
//! that name the image.

use super::error::{ApiError, ApiResult};
use atlas_clip::ClipError;
use base64::Engine as _;

pub fn b64(s: &str, what: &str) -> ApiResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| ApiError::bad(format!("{what} is not valid base64: {e}")))
}

/// A 400 naming the image: `what` and the reason its bytes were refused.
pub fn refused(what: &str, e: ClipError) -> ApiError {
    match e {
        ClipError::Image(reason) => ApiError::bad(format!("{what}: {reason}")),
        other => ApiError::bad(format!("{what}: {other}")),
    }
}

/// Checks, decodes and preprocesses images on the blocking pool, in parallel.
pub async fn preprocess(
    images: Vec<(String, Vec<u8>)>,
    image_size: usize,
    max_pixels: u64,
) -> ApiResult<Vec<Vec<f32>>> {
    tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        let pre = atlas_clip::preprocess::Preprocess {
            max_pixels,
            ..atlas_clip::preprocess::Preprocess::from_config(image_size)
        };
        images
            .par_iter()
            .map(|(what, bytes)| pre.from_bytes(bytes).map_err(|e| refused(what, e)))
            .collect()
    })
    .await
    .map_err(ApiError::internal)?
}
