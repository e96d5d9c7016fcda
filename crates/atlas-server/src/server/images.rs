//! Uploaded images: base64 decoding, and decoding with atlas-clip's preprocessing (which checks
//! the header before any pixel is decoded: a small file may claim a huge image), with errors
//! that name the image.

use super::error::{ApiError, ApiResult};
use atlas_clip::ClipError;
use axum::http::StatusCode;
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

/// Pixels a request's images may take: each, and all together.
pub struct PixelBounds {
    pub image: u64,
    pub request: u64,
}

/// Checks, decodes and preprocesses images in parallel on the background pool. Every header is
/// checked first, so a request over its pixel bounds costs no decoding.
pub async fn preprocess(
    images: Vec<(String, Vec<u8>)>,
    image_size: usize,
    bounds: PixelBounds,
) -> ApiResult<Vec<Vec<f32>>> {
    check_pixels(&images, &bounds)?;
    let max_pixels = bounds.image;
    tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        let pre = atlas_clip::preprocess::Preprocess {
            max_pixels,
            ..atlas_clip::preprocess::Preprocess::from_config(image_size)
        };
        super::background::run(super::background::Pool::Images, || {
            images
                .par_iter()
                .map(|(what, bytes)| pre.from_bytes(bytes).map_err(|e| refused(what, e)))
                .collect()
        })
    })
    .await
    .map_err(ApiError::internal)?
}

fn check_pixels(images: &[(String, Vec<u8>)], bounds: &PixelBounds) -> ApiResult<()> {
    let mut total = 0u64;
    for (what, bytes) in images {
        let (w, h) = atlas_clip::preprocess::check_header(bytes, bounds.image)
            .map_err(|e| refused(what, e))?;
        total = total.saturating_add(u64::from(w) * u64::from(h));
    }
    if total > bounds.request {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the images have {total} pixels together; a request may have {} \
                 (max_request_pixels): send fewer or smaller images, or split the request",
                bounds.request
            ),
        ));
    }
    Ok(())
}
