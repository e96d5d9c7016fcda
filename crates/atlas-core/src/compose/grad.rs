//! The gradient of the composition with respect to its coefficients, per block, task vector
//! and part: ∂L/∂Λ[i,b,p] = Σ_{j in part p} ∂L/∂θ^(b)_j · τ_i^(b)_j, streamed over blocks in
//! chunks like the composition.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{check, check_coefs, part_ids, part_keys, simd_available, Real, CHUNK, SIMD_MAX_PARTS};
use crate::coefficients::Coefficients;
use crate::manifest::Manifest;
use crate::task_vector::TaskVector;
use crate::{CoreError, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Reduces ∂L/∂θ (per block, as [`compose`] lays blocks out) against every task vector: returns
/// ∂L/∂Λ over the full `[n_tv, n_blocks, K]` grid of `coefs`' layout, to be folded with
/// [`Coefficients::fold_gradient`].
pub fn reduce_gradient<T: Real, G: AsRef<[T]> + Sync>(
    manifest: &Manifest,
    grads: &[G],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Result<Vec<f64>> {
    let lens: Vec<usize> = grads.iter().map(|g| g.as_ref().len()).collect();
    check(manifest, tvs, coefs, &lens)?;
    let pieces: Vec<Vec<(usize, &[T])>> = grads.iter().map(|g| vec![(0, g.as_ref())]).collect();
    reduce_gradient_pieces(manifest, &pieces, tvs, coefs)
}

/// [`reduce_gradient`] with each block's gradient given as pieces `(offset in the block,
/// values)`, in increasing order and not overlapping (e.g. one per tensor, read in place from
/// the gradient tensors); elements no piece covers have zero gradient.
pub fn reduce_gradient_pieces<T: Real>(
    manifest: &Manifest,
    grads: &[Vec<(usize, &[T])>],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Result<Vec<f64>> {
    check_coefs(manifest, tvs, coefs)?;
    if grads.len() != manifest.len() {
        return Err(CoreError::Invalid(format!(
            "{} blocks given, the manifest has {}",
            grads.len(),
            manifest.len()
        )));
    }
    for (block, pieces) in manifest.blocks().iter().zip(grads) {
        let mut end = 0;
        for &(offset, g) in pieces {
            if offset < end || offset + g.len() > block.numel() {
                return Err(CoreError::tensor(
                    &block.name,
                    format!(
                        "gradient piece {offset}..{} overlaps another or lies outside the \
                         block's {} elements",
                        offset + g.len(),
                        block.numel()
                    ),
                ));
            }
            end = offset + g.len();
        }
    }
    let k = coefs.parts();
    let n_blocks = manifest.len();
    let keys = part_keys(manifest, coefs.layout);
    let items: Vec<(usize, usize, &[T])> = grads
        .iter()
        .enumerate()
        .flat_map(|(b, pieces)| {
            pieces.iter().flat_map(move |&(offset, g)| {
                g.chunks(CHUNK)
                    .enumerate()
                    .map(move |(c, s)| (b, offset + c * CHUNK, s))
            })
        })
        .collect();
    let partials: Vec<(usize, Vec<f64>)> = items
        .into_par_iter()
        .map(|(b, start, g)| (b, dot_chunk(b, start, g, tvs, k, keys[b])))
        .collect();
    let mut full = vec![0.0; tvs.len() * n_blocks * k];
    for (b, acc) in partials {
        for i in 0..tvs.len() {
            for p in 0..k {
                full[(i * n_blocks + b) * k + p] += acc[i * k + p];
            }
        }
    }
    Ok(full)
}

/// ⟨g, τ_i⟩ over one chunk of block `b` from element `start`, per task vector and part:
/// `[n_tv * k]`.
fn dot_chunk<T: Real>(
    b: usize,
    start: usize,
    g: &[T],
    tvs: &[Arc<TaskVector>],
    k: usize,
    key: u64,
) -> Vec<f64> {
    let n = g.len();
    let mut acc = vec![0.0; tvs.len() * k];
    let mut parts = [0u8; CHUNK];
    if k > 1 {
        part_ids(key, k, start, &mut parts[..n]);
    }
    let parts = &parts[..n];
    let fast = k <= SIMD_MAX_PARTS && simd_available();
    let mut tau = [0f32; CHUNK];
    for (i, tv) in tvs.iter().enumerate() {
        let buf = tv.block(b);
        if buf.is_zero() {
            continue;
        }
        let acc = &mut acc[i * k..(i + 1) * k];
        #[cfg(target_arch = "x86_64")]
        if fast {
            if let Some(g) = T::as_f32(g) {
                // SAFETY: AVX2, FMA and F16C are supported (simd_available).
                unsafe { simd::dot_f32(g, buf, start, parts, acc) };
                continue;
            }
        }
        let _ = fast;
        buf.read_f32(start, &mut tau[..n]);
        dot_portable(g, &tau[..n], parts, acc);
    }
    acc
}

/// acc[p] += Σ_{j in part p} g[j] · t[j] (`parts` unused when `acc` has one entry).
fn dot_portable<T: Real>(g: &[T], t: &[f32], parts: &[u8], acc: &mut [f64]) {
    if acc.len() == 1 {
        acc[0] += dot(g, t);
        return;
    }
    let mut sums = vec![T::default(); acc.len()];
    for ((&gj, &x), &p) in g.iter().zip(t).zip(parts) {
        sums[p as usize] += gj * T::from_f32(x);
    }
    for (a, s) in acc.iter_mut().zip(sums) {
        *a += s.to_f64();
    }
}

/// Dot product with eight independent accumulators so the compiler can vectorise it.
fn dot<T: Real>(g: &[T], t: &[f32]) -> f64 {
    let mut lanes = [T::default(); 8];
    let gc = g.chunks_exact(8);
    let tc = t.chunks_exact(8);
    let tail: f64 = gc
        .remainder()
        .iter()
        .zip(tc.remainder())
        .map(|(&a, &b)| (a * T::from_f32(b)).to_f64())
        .sum();
    for (ga, ta) in gc.zip(tc) {
        for l in 0..8 {
            lanes[l] += ga[l] * T::from_f32(ta[l]);
        }
    }
    lanes.iter().map(|x| x.to_f64()).sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::super::tests::{coefs_for, layouts, manifest, odd_manifest, pseudo, tv, tv_at};
    use super::*;
    use crate::buffer::StorageDType;
    use crate::compose::compose;

    /// The composition is linear in Λ, so the reduction must equal the exact directional
    /// derivative: ⟨g, θ(Λ + e_ibp) − θ(Λ)⟩ for every unit vector e.
    #[test]
    fn reduction_is_the_gradient_of_the_composition() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| vec![0.0; bl.numel()]).collect();
        let g: Vec<Vec<f64>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| {
                pseudo(50 + b as u64, bl.numel())
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            })
            .collect();
        let tvs = vec![tv(&m, 1), tv(&m, 2)];
        for c in layouts(m.len()) {
            let full = reduce_gradient(&m, &g, &tvs, &c).unwrap();
            let got = c.fold_gradient(&full);
            let f = |c: &Coefficients| -> f64 {
                let th: Vec<Vec<f64>> = compose(&m, &base, &tvs, c).unwrap();
                th.iter()
                    .zip(&g)
                    .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())
                    .sum()
            };
            for idx in 0..c.values.len() {
                let mut v = c.values.clone();
                v[idx] += 1.0;
                let want = f(&c.with_values(v).unwrap()) - f(&c);
                assert!(
                    (got[idx] - want).abs() < 1e-9 * (1.0 + want.abs()),
                    "{:?}[{idx}]: {} vs {want}",
                    c.layout,
                    got[idx]
                );
            }
        }
    }

    /// The f32 reduction kernels agree with the f64 portable path (the definition) to f32
    /// accuracy, for every store type, K = 1, K ≤ 8 (masked lanes) and K > 8 (portable).
    #[test]
    fn f32_reduction_kernels_match_the_f64_path() {
        let m = odd_manifest();
        let g32: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(70 + b as u64, bl.numel()))
            .collect();
        let g64: Vec<Vec<f64>> = g32
            .iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        for store in [StorageDType::F16, StorageDType::BF16, StorageDType::F32] {
            let tvs = vec![tv_at(&m, 1, store), tv_at(&m, 2, store)];
            for k in [1, 2, 3, 8, 9] {
                let c = coefs_for(&m, tvs.len(), k);
                let got = reduce_gradient(&m, &g32, &tvs, &c).unwrap();
                let want = reduce_gradient(&m, &g64, &tvs, &c).unwrap();
                // Scale of the sums: the largest block has 21003 terms of size ≤ 1.
                for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-3,
                        "{store:?}, k {k}, [{idx}]: {a} vs {b}"
                    );
                }
                assert!(want.iter().any(|w| w.abs() > 1.0));
            }
        }
    }

    /// Gradient pieces (per tensor, some missing) reduce like the whole blocks with zeros where
    /// no piece is given; overlapping or out-of-range pieces are refused.
    #[test]
    fn reduce_gradient_pieces_matches_whole_blocks() {
        let m = odd_manifest();
        let tvs = vec![
            tv_at(&m, 1, StorageDType::F16),
            tv_at(&m, 2, StorageDType::BF16),
        ];
        let mut whole: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(30 + b as u64, bl.numel()))
            .collect();
        // Block 3 ("qkv"): only its second tensor ("k", 36 values from offset 21) has a gradient.
        whole[3][..21].fill(0.0);
        for k in [1, 3] {
            let c = coefs_for(&m, tvs.len(), k);
            let pieces: Vec<Vec<(usize, &[f32])>> = whole
                .iter()
                .enumerate()
                .map(|(b, g)| {
                    if b == 3 {
                        vec![(21, &g[21..])]
                    } else {
                        vec![(0, &g[..])]
                    }
                })
                .collect();
            let got = reduce_gradient_pieces(&m, &pieces, &tvs, &c).unwrap();
            let want = reduce_gradient(&m, &whole, &tvs, &c).unwrap();
            // Equal up to f32 rounding: lanes line up differently from another offset.
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "k {k}: {a} vs {b}");
            }
            let mut bad = pieces.clone();
            bad[3] = vec![(0, &whole[3][..22]), (21, &whole[3][21..])];
            assert!(reduce_gradient_pieces(&m, &bad, &tvs, &c).is_err());
            bad[3] = vec![(22, &whole[3][21..])];
            assert!(reduce_gradient_pieces(&m, &bad, &tvs, &c).is_err());
        }
    }
}
