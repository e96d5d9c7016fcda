//! Explicit compositions: coefficients given in the request (a scalar, a per-block row, per-part
//! rows or a map by block name per task vector), checked and stored; servable at once (201).

use super::{check_name, insert_bound, new_id, provenance, select};
use crate::server::api::*;
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::now;
use crate::server::{AppState, Model};
use atlas_core::{Coefficients, Layout, Manifest};

pub(super) fn explicit(
    s: &AppState,
    model: &Model,
    req: ExplicitRequest,
) -> ApiResult<Composition> {
    check_name(&req.name)?;
    if req.task_vectors.is_empty() {
        return Err(ApiError::bad("give at least one task vector"));
    }
    let tvs = select(model, &req.task_vectors)?;
    if req.coefficients.len() != tvs.len() {
        return Err(ApiError::bad(format!(
            "give one coefficients entry per task vector: {} task vectors, {} entries",
            tvs.len(),
            req.coefficients.len()
        )));
    }
    let coefs = explicit_coefficients(
        &req.coefficients,
        &req.task_vectors,
        model.backbone.manifest(),
        req.parts_seed,
        s.config.max_parts,
    )?;
    let t = now();
    let c = Composition {
        id: new_id(),
        name: req.name,
        kind: "explicit".into(),
        status: Status::Succeeded,
        task_vectors: req.task_vectors,
        layout: coefs.layout,
        coefficients: Some(coefs.values),
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance: provenance(model, &tvs),
        request: None,
        created_at: t,
        updated_at: t,
    };
    insert_bound(s, model, &c, None, None)?;
    Ok(c)
}

/// Row-major Λ from per-task-vector entries: scalars, per-block rows, per-part rows or maps by
/// block name. Scalars and maps widen to per block when any entry is per block.
pub fn explicit_coefficients(
    entries: &[TvCoefficients],
    names: &[String],
    manifest: &Manifest,
    seed: u64,
    max_parts: usize,
) -> ApiResult<Coefficients> {
    let n_blocks = manifest.len();
    let k = entries.iter().find_map(|e| match e {
        TvCoefficients::PerPart(rows) => Some(rows.first().map_or(0, Vec::len)),
        _ => None,
    });
    let any_block = entries
        .iter()
        .any(|e| matches!(e, TvCoefficients::PerBlock(_) | TvCoefficients::ByName(_)));
    let layout = match k {
        Some(k) if k == 0 || k > max_parts => {
            return Err(ApiError::bad(format!(
                "parts per block must be between 1 and {max_parts}, got {k}"
            )))
        }
        Some(k) => Layout::PerPart { k, seed },
        None if any_block => Layout::PerBlock,
        None => Layout::Isotropic,
    };
    let mut values = Vec::with_capacity(layout.len(entries.len(), n_blocks));
    for (e, name) in entries.iter().zip(names) {
        values.extend(entry_values(e, name, manifest, layout)?);
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(ApiError::bad(format!(
            "coefficient {i} is not a finite number"
        )));
    }
    if let Some(v) = values.iter().find(|v| v.abs() > 1e6) {
        return Err(ApiError::bad(format!(
            "coefficient {v} is out of range (|λ| ≤ 1e6)"
        )));
    }
    Coefficients::new(layout, entries.len(), n_blocks, values)
        .map_err(|e| ApiError::bad(e.to_string()))
}

fn entry_values(
    e: &TvCoefficients,
    tv: &str,
    manifest: &Manifest,
    layout: Layout,
) -> ApiResult<Vec<f64>> {
    let n_blocks = manifest.len();
    let per = layout.parts();
    let wrong = |what: &str| {
        ApiError::bad(format!(
            "task vector {tv:?}: {what}; the backbone has {n_blocks} blocks (GET /task-vectors/{{name}} lists them)"
        ))
    };
    let widen = |v: f64| match layout {
        Layout::Isotropic => vec![v],
        _ => vec![v; n_blocks * per],
    };
    match e {
        TvCoefficients::Scalar(v) => Ok(widen(*v)),
        TvCoefficients::PerBlock(row) if matches!(layout, Layout::PerPart { .. }) => {
            Err(wrong(&format!(
                "a per-block row beside per-part entries ({} values)",
                row.len()
            )))
        }
        TvCoefficients::PerBlock(row) if row.len() != n_blocks => {
            Err(wrong(&format!("{} values given", row.len())))
        }
        TvCoefficients::PerBlock(row) => Ok(row.clone()),
        TvCoefficients::PerPart(rows) => {
            if rows.len() != n_blocks || rows.iter().any(|r| r.len() != per) {
                return Err(wrong(&format!(
                    "per-part rows must be {n_blocks} rows of {per} values"
                )));
            }
            Ok(rows.concat())
        }
        TvCoefficients::ByName(map) => {
            let default = map.get("*").copied().unwrap_or(0.0);
            let mut row = vec![default; n_blocks];
            for (name, v) in map.iter().filter(|(n, _)| n.as_str() != "*") {
                let b = manifest
                    .block_index(name)
                    .ok_or_else(|| wrong(&format!("no block named {name:?}")))?;
                row[b] = *v;
            }
            Ok(row.into_iter().flat_map(|v| vec![v; per]).collect())
        }
    }
}
