//! A learning job's examples: each image checked and decoded, then written durably into the
//! job's directory, and the hashes that identify a request (idempotency) and its data
//! (provenance).

use crate::server::api::TaskData;
use crate::server::body::{Body, FilePart};
use crate::server::error::{ApiError, ApiResult};
use crate::server::{background, images, AppState};
use atlas_clip::preprocess::Preprocess;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

/// Hash of a request: its JSON (keys sorted by serde_json's map) and its file parts.
pub(super) fn request_hash(body: &Body) -> String {
    let mut h = Sha256::new();
    h.update(body.json.to_string().as_bytes());
    for f in &body.files {
        for part in [f.filename.as_bytes(), &f.bytes] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    hex::encode(h.finalize())
}

/// Writes every example image into the job's directory (checked and decoded first, so a corrupt
/// image is a 400 now rather than a failed job later), rewrites the request to name the files,
/// and returns the hash of the data (images and labels).
pub(crate) async fn store_examples(
    s: &AppState,
    id: &str,
    tasks: &mut [TaskData],
    what: &(dyn Fn(usize, usize) -> String + Sync),
    files: Vec<FilePart>,
    image_size: usize,
) -> ApiResult<String> {
    let mut items = Vec::new();
    for (i, t) in tasks.iter_mut().enumerate() {
        for (j, e) in t.examples.iter_mut().enumerate() {
            let what = what(i, j);
            let bytes = match (&e.image, &e.file) {
                (Some(b), None) => images::b64(b, &what)?,
                (None, Some(f)) => files
                    .iter()
                    .find(|p| &p.filename == f)
                    .map(|p| p.bytes.clone())
                    .ok_or_else(|| ApiError::bad(format!("{what}: no multipart file named {f:?}")))?,
                _ => {
                    return Err(ApiError::bad(format!(
                        "{what}: give exactly one of \"image\" (base64) or \"file\" (a multipart filename)"
                    )))
                }
            };
            let name = format!("t{i}-e{j}");
            e.image = None;
            e.file = Some(name.clone());
            items.push((what, name, bytes, e.label));
        }
    }
    let dir = s.store.job_dir(id);
    let bounds = Bounds {
        max_pixels: s.config.max_image_pixels,
        max_job_mib: s.config.max_job_mib,
        pre: Preprocess::from_config(image_size),
    };
    tokio::task::spawn_blocking(move || write_examples(&dir, items, &bounds))
        .await
        .map_err(ApiError::internal)?
}

type Item = (String, String, Vec<u8>, Option<u32>);

/// What a job's examples may take: pixels per upload, and memory once kept at the model's
/// input size (what the job holds while it learns).
struct Bounds {
    max_pixels: u64,
    max_job_mib: usize,
    pre: Preprocess,
}

/// Bytes the examples take once kept for learning, from their headers alone.
fn kept_bytes(items: &[Item], b: &Bounds) -> ApiResult<usize> {
    let mut total = 0usize;
    for (what, _, bytes, _) in items {
        let (w, h) = atlas_clip::preprocess::check_header(bytes, b.max_pixels)
            .map_err(|e| images::refused(what, e))?;
        let (w, h) = b.pre.kept_size(w, h);
        total = total.saturating_add(3 * w as usize * h as usize);
    }
    Ok(total)
}

fn write_examples(dir: &std::path::Path, items: Vec<Item>, b: &Bounds) -> ApiResult<String> {
    use rayon::prelude::*;
    let kept = kept_bytes(&items, b)?;
    if kept > b.max_job_mib << 20 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the examples take {} MiB at the model's input size; a job may hold {} MiB \
                 (max_job_mib): send fewer or smaller images",
                kept.div_ceil(1 << 20),
                b.max_job_mib
            ),
        ));
    }
    let max_pixels = b.max_pixels;
    background::run(background::Pool::Images, || {
        items.par_iter().try_for_each(|(what, _, bytes, _)| {
            atlas_clip::preprocess::decode_limited(bytes, max_pixels)
                .map(|_| ())
                .map_err(|e| images::refused(what, e))
        })
    })?;
    let tmp = dir.with_extension("tmp");
    let written = write_all(&tmp, &items).and_then(|digest| {
        // The directory appears whole or not at all; the job row is inserted only after it.
        std::fs::rename(&tmp, dir).map_err(ApiError::io)?;
        Ok(digest)
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Writes every example into `tmp` (made afresh), each file synced; returns their digest.
fn write_all(tmp: &std::path::Path, items: &[Item]) -> ApiResult<String> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(ApiError::io)?;
    let mut hash = Sha256::new();
    for (_, name, bytes, label) in items {
        write_synced(&tmp.join(name), bytes)?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
        hash.update(label.map_or(-1i64, i64::from).to_le_bytes());
    }
    Ok(hex::encode(hash.finalize()))
}

fn write_synced(path: &std::path::Path, bytes: &[u8]) -> ApiResult<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(ApiError::io)?;
    f.write_all(bytes).map_err(ApiError::io)?;
    f.sync_all().map_err(ApiError::io)
}
