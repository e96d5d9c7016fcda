//! Uploaded images: base64 decoding and a pixel-count check from the header alone, before any
//! pixel is decoded (a small file may claim a huge image).

use super::error::{ApiError, ApiResult};
use base64::Engine as _;
use std::io::Cursor;

pub fn b64(s: &str, what: &str) -> ApiResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| ApiError::bad(format!("{what} is not valid base64: {e}")))
}

/// Refuses images whose header claims more than `max_pixels`, and bytes that are no image.
pub fn check(bytes: &[u8], max_pixels: u64, what: &str) -> ApiResult<()> {
    if bytes.is_empty() {
        return Err(ApiError::bad(format!("{what} is empty")));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad(format!("{what}: cannot read image bytes: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::bad(format!(
            "{what} is not a JPEG, PNG or WebP image ({} bytes)",
            bytes.len()
        )));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::bad(format!("{what}: cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(ApiError::bad(format!("{what} has no pixels ({w}x{h})")));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(ApiError::bad(format!(
            "{what} is {w}x{h} pixels, more than the {max_pixels} allowed"
        )));
    }
    Ok(())
}

/// Checks, decodes and preprocesses images on the blocking pool, in parallel.
pub async fn preprocess(
    images: Vec<(String, Vec<u8>)>,
    image_size: usize,
    max_pixels: u64,
) -> ApiResult<Vec<Vec<f32>>> {
    tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        let pre = atlas_clip::preprocess::Preprocess::from_config(image_size);
        images
            .par_iter()
            .map(|(what, bytes)| {
                check(bytes, max_pixels, what)?;
                pre.from_bytes(bytes)
                    .map_err(|e| ApiError::bad(format!("{what}: {e}")))
            })
            .collect()
    })
    .await
    .map_err(ApiError::internal)?
}
