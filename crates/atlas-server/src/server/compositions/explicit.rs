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
            let row = by_name(map, manifest).map_err(|what| wrong(&what))?;
            Ok(row.into_iter().flat_map(|v| vec![v; per]).collect())
        }
    }
}

/// One value per block from a map of block names and patterns: an exact name wins over a
/// pattern, a more specific pattern (more characters besides `*`) over a less specific one,
/// and `"*"` alone is the default (0 without it). A key that matches no block is an error,
/// so a typo is never silently a 0.
fn by_name(
    map: &std::collections::BTreeMap<String, f64>,
    manifest: &Manifest,
) -> Result<Vec<f64>, String> {
    let default = map.get("*").copied().unwrap_or(0.0);
    let blocks = manifest.blocks();
    // Per block, the best key so far: (specificity, value, key, a second key of the same
    // specificity with another value). Exact names rank above every pattern.
    type Best<'a> = (usize, f64, &'a str, Option<&'a str>);
    let mut best: Vec<Option<Best>> = vec![None; blocks.len()];
    for (key, &v) in map.iter().filter(|(k, _)| k.as_str() != "*") {
        let rank = if key.contains('*') {
            key.chars().filter(|&c| c != '*').count()
        } else {
            usize::MAX
        };
        let mut matched = false;
        for (b, block) in blocks.iter().enumerate() {
            if !glob_match(key, &block.name) {
                continue;
            }
            matched = true;
            match &mut best[b] {
                Some((r, value, _, clash)) if *r == rank => {
                    if *value != v && clash.is_none() {
                        *clash = Some(key);
                    }
                }
                Some((r, ..)) if *r > rank => {}
                slot => *slot = Some((rank, v, key, None)),
            }
        }
        if !matched {
            return Err(if key.contains('*') {
                format!("pattern {key:?} matches no block")
            } else {
                format!("no block named {key:?} (a pattern such as \"{key}.*\" matches a prefix)")
            });
        }
    }
    blocks
        .iter()
        .zip(best)
        .map(|(block, best)| match best {
            None => Ok(default),
            Some((_, _, key, Some(other))) => Err(format!(
                "block {:?} is matched by {key:?} and {other:?} alike, with different values",
                block.name
            )),
            Some((_, v, ..)) => Ok(v),
        })
        .collect()
}

/// `*` matches any run of characters (dots included); every other character itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    // Where the last `*` was and how much of the name it has taken: backtrack there on a miss.
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::{by_name, glob_match};
    use atlas_core::manifest::{Block, TensorSpec};
    use atlas_core::Manifest;

    #[test]
    fn exact_names_beat_patterns_and_specific_patterns_beat_general_ones() {
        let names = [
            "emb",
            "layers.0.fc1",
            "layers.0.fc2",
            "layers.1.fc1",
            "layers.1.fc2",
        ];
        let blocks = names
            .iter()
            .map(|n| Block::single(TensorSpec::new(*n, &[2])))
            .collect();
        let m = Manifest::new(blocks).unwrap();
        let row = |pairs: &[(&str, f64)]| {
            let map = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            by_name(&map, &m)
        };
        // In key order "*" < "*.fc1" < "layers.1.*" < "layers.1.fc2": precedence, not order.
        let got = row(&[
            ("*", 0.1),
            ("*.fc1", 0.2),
            ("layers.1.*", 0.3),
            ("layers.1.fc2", 0.4),
        ]);
        assert_eq!(got.unwrap(), [0.1, 0.2, 0.1, 0.3, 0.4]);
        assert_eq!(
            row(&[("layers.0.*", 1.0)]).unwrap(),
            [0.0, 1.0, 1.0, 0.0, 0.0]
        );
        let e = row(&[("layers.9.*", 1.0)]).unwrap_err();
        assert!(e.contains("pattern \"layers.9.*\" matches no block"), "{e}");
        let e = row(&[("layers.0", 1.0)]).unwrap_err();
        assert!(e.contains("no block named \"layers.0\""), "{e}");
        // Equally specific patterns: the same value is fine, different values are refused
        // unless something more specific decides the block.
        assert!(row(&[("*.fc1", 1.0), ("layers.0.*", 1.0)]).is_ok());
        let e = row(&[("*.fc1", 1.0), ("laye*", 2.0)]).unwrap_err();
        assert!(e.contains("\"layers.0.fc1\""), "{e}");
        let decided = row(&[
            ("*.fc1", 1.0),
            ("laye*", 2.0),
            ("layers.0.fc1", 3.0),
            ("layers.1.fc1", 3.0),
        ]);
        assert_eq!(decided.unwrap(), [0.0, 3.0, 2.0, 3.0, 2.0]);
    }

    #[test]
    fn globs_match_prefixes_and_runs() {
        let name = "vision_model.encoder.layers.11.mlp.fc1.weight";
        for p in [
            name,
            "vision_model.encoder.layers.11.*",
            "*.mlp.*",
            "*",
            "*weight",
            "vision_model.*.fc1.*",
        ] {
            assert!(glob_match(p, name), "{p}");
        }
        for p in [
            "vision_model.encoder.layers.1.*",
            "vision_model.encoder.layers.11",
            "*.fc2.*",
            "",
            "weight*",
        ] {
            assert!(!glob_match(p, name), "{p}");
        }
    }
}
