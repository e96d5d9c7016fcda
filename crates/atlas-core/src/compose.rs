//! Composition θ^(b) = θ0^(b) + Σ_i Λ[i,b,part] · τ_i^(b) and its gradient reduction
//! ∂L/∂Λ[i,b,p] = Σ_{j in part p} ∂L/∂θ^(b)_j · τ_i^(b)_j.
//!
//! Both stream over blocks in chunks of [`CHUNK`] elements on the rayon pool: each chunk of the
//! output stays in cache while every task vector's matching chunk is read once and added in, so
//! no task-vector-sized temporary is ever made and the task vectors are read exactly once.

use crate::buffer::Buffer;
use crate::coefficients::{Coefficients, Layout};
use crate::manifest::Manifest;
use crate::parts::{block_key, fill_parts};
use crate::task_vector::TaskVector;
use crate::{CoreError, Result};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Mul};
use std::sync::Arc;

/// Elements per work item: large enough to amortise scheduling, small enough to balance.
pub const CHUNK: usize = 8192;

/// Elements per inner tile of a work item: the output tile and one converted τ tile (2 × 8 KiB
/// in f32) stay in L1 while every task vector is added in.
const TILE: usize = 2048;

/// The compute types composition supports (f32 for serving and learning, f64 for checks).
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialEq
    + Add<Output = Self>
    + Mul<Output = Self>
    + AddAssign
    + 'static
{
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;

    /// dst += c · x, element by element (no fused multiply-add, so every path rounds alike).
    fn axpy(dst: &mut [Self], c: Self, x: &[f32]) {
        for (d, &t) in dst.iter_mut().zip(x) {
            *d += c * Self::from_f32(t);
        }
    }

    /// dst += c · τ[start..start + dst.len()] for a stored τ; `scratch` (dst.len() long) holds
    /// τ converted to f32 when the type has no direct path.
    fn axpy_stored(dst: &mut [Self], c: Self, tau: &Buffer, start: usize, scratch: &mut [f32]) {
        tau.read_f32(start, scratch);
        Self::axpy(dst, c, scratch);
    }
}

impl Real for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn axpy(dst: &mut [Self], c: Self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { simd::axpy_f32(dst, c, x) };
        }
        for (d, &t) in dst.iter_mut().zip(x) {
            *d += c * t;
        }
    }

    /// Reads half-precision τ straight into the multiply-add (no f32 copy of τ): the
    /// conversion is exact, so the result is the same as through `scratch`.
    fn axpy_stored(dst: &mut [Self], c: Self, tau: &Buffer, start: usize, scratch: &mut [f32]) {
        let n = dst.len();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: AVX2 and F16C are supported, checked just above; slices are bounds-checked.
            match tau {
                Buffer::F16(v) => return unsafe { simd::axpy_f16(dst, c, &v[start..start + n]) },
                Buffer::BF16(v) => return unsafe { simd::axpy_bf16(dst, c, &v[start..start + n]) },
                _ => {}
            }
        }
        match tau {
            Buffer::F32(v) => Self::axpy(dst, c, &v[start..start + n]),
            _ => {
                tau.read_f32(start, scratch);
                Self::axpy(dst, c, scratch);
            }
        }
    }
}

/// x86-64 kernels chosen at run time (the build targets baseline x86-64). Each is the scalar
/// loop `d += c * t` (a multiply, then an add: no FMA, so every path rounds alike).
#[cfg(target_arch = "x86_64")]
mod simd {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn axpy_f32(dst: &mut [f32], c: f32, x: &[f32]) {
        for (d, &t) in dst.iter_mut().zip(x) {
            *d += c * t;
        }
    }

    /// 8 lanes at a time: `load8` gives the 8 τ values at an index as f32.
    #[target_feature(enable = "avx2")]
    unsafe fn axpy_with<T: Copy + Into<f32>>(
        dst: &mut [f32],
        c: f32,
        x: &[T],
        load8: impl Fn(*const T) -> __m256,
    ) {
        let n = dst.len().min(x.len());
        let cv = _mm256_set1_ps(c);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, within both slices.
            let t = load8(x.as_ptr().add(i));
            let d = _mm256_loadu_ps(dst.as_ptr().add(i));
            _mm256_storeu_ps(
                dst.as_mut_ptr().add(i),
                _mm256_add_ps(d, _mm256_mul_ps(cv, t)),
            );
            i += 8;
        }
        for j in i..n {
            dst[j] += c * x[j].into();
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn axpy_f16(dst: &mut [f32], c: f32, x: &[f16]) {
        axpy_with(dst, c, x, |p| {
            // SAFETY: the caller reads 8 values in bounds; F16C is enabled for this function.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        })
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn axpy_bf16(dst: &mut [f32], c: f32, x: &[bf16]) {
        axpy_with(dst, c, x, |p| {
            // SAFETY: as above. bf16 is the top half of an f32: widen and shift left 16.
            unsafe {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
            }
        })
    }
}

impl Real for f64 {
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

fn check(
    manifest: &Manifest,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    lens: &[usize],
) -> Result<()> {
    if coefs.n_tv != tvs.len() || coefs.n_blocks != manifest.len() {
        return Err(CoreError::Coefficients(format!(
            "coefficients are for {} task vectors × {} blocks, the composition has {} × {}",
            coefs.n_tv,
            coefs.n_blocks,
            tvs.len(),
            manifest.len()
        )));
    }
    for tv in tvs {
        tv.check_manifest(manifest)?;
    }
    if lens.len() != manifest.len() {
        return Err(CoreError::Invalid(format!(
            "{} blocks given, the manifest has {}",
            lens.len(),
            manifest.len()
        )));
    }
    for (block, &n) in manifest.blocks().iter().zip(lens) {
        if n != block.numel() {
            return Err(CoreError::tensor(
                &block.name,
                format!("has {n} elements, expected {}", block.numel()),
            ));
        }
    }
    Ok(())
}

/// One work item: a chunk of block `block` starting at element `start`.
fn chunks<S>(out: &mut [Vec<S>]) -> Vec<(usize, usize, &mut [S])> {
    out.iter_mut()
        .enumerate()
        .flat_map(|(b, v)| {
            v.chunks_mut(CHUNK)
                .enumerate()
                .map(move |(c, s)| (b, c * CHUNK, s))
        })
        .collect()
}

fn part_keys(manifest: &Manifest, layout: Layout) -> Vec<u64> {
    match layout {
        Layout::PerPart { seed, .. } => manifest
            .blocks()
            .iter()
            .map(|b| block_key(seed, &b.name))
            .collect(),
        _ => vec![0; manifest.len()],
    }
}

/// Composes every block: returns θ per block (tensors of a block concatenated in manifest order)
/// in the compute type `T`; θ0 is given per block as f32.
pub fn compose<T: Real, B: AsRef<[f32]> + Sync>(
    manifest: &Manifest,
    base: &[B],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Result<Vec<Vec<T>>> {
    let mut out: Vec<Vec<T>> = base
        .iter()
        .map(|b| {
            // Zeroed allocations of this size are fresh, untouched pages: the composition
            // faults them in, in parallel, and huge pages make that 512× fewer faults.
            let mut v = vec![T::default(); b.as_ref().len()];
            advise_huge_pages(&mut v);
            v
        })
        .collect();
    compose_into(manifest, base, tvs, coefs, &mut out)?;
    Ok(out)
}

/// Asks Linux for transparent huge pages over the 2 MiB-aligned part of `v` (a hint: a kernel
/// with THP off, or another OS, ignores it). Faulting in θ page by page otherwise costs more
/// than composing into it.
fn advise_huge_pages<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let start = v.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(v);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `v`'s allocation; MADV_HUGEPAGE changes no contents
            // and its failure is harmless, so the result is ignored.
            unsafe { madvise(a as *mut std::ffi::c_void, b - a, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// [`compose`] into buffers the caller keeps (one per block, manifest sizes): a model cache or a
/// learning loop that recomposes every step saves allocating and first-touching θ each time.
pub fn compose_into<T: Real, B: AsRef<[f32]> + Sync>(
    manifest: &Manifest,
    base: &[B],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    out: &mut [Vec<T>],
) -> Result<()> {
    let lens: Vec<usize> = base.iter().map(|b| b.as_ref().len()).collect();
    check(manifest, tvs, coefs, &lens)?;
    let out_lens: Vec<usize> = out.iter().map(Vec::len).collect();
    if out_lens != lens {
        return Err(CoreError::Invalid(
            "output buffers do not match the manifest's block sizes".into(),
        ));
    }
    let keys = part_keys(manifest, coefs.layout);
    chunks(out).into_par_iter().for_each(|(b, start, dst)| {
        compose_chunk(
            b,
            start,
            dst,
            &base[b].as_ref()[start..],
            tvs,
            coefs,
            keys[b],
        );
    });
    Ok(())
}

/// One work item: dst = θ0 + Σ_i c_i τ_i over `dst.len()` elements of block `b` from `start`,
/// a [`TILE`] at a time so the running sum never leaves L1.
fn compose_chunk<T: Real>(
    b: usize,
    start: usize,
    dst: &mut [T],
    base: &[f32],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    key: u64,
) {
    let k = coefs.parts();
    // The task vectors that touch this block, with their coefficients in T.
    let active: Vec<(&Buffer, Vec<T>)> = tvs
        .iter()
        .enumerate()
        .filter_map(|(i, tv)| {
            let c = coefs.block(i, b);
            let buf = tv.block(b);
            let skip = buf.is_zero() || c.iter().all(|&x| x == 0.0);
            (!skip).then(|| (buf, c.iter().map(|&x| T::from_f64(x)).collect()))
        })
        .collect();
    let mut tau = [0f32; TILE];
    let mut parts = [0u8; TILE];
    for (t, tile) in dst.chunks_mut(TILE).enumerate() {
        let off = t * TILE;
        let n = tile.len();
        for (d, &x) in tile.iter_mut().zip(&base[off..off + n]) {
            *d = T::from_f32(x);
        }
        if k > 1 {
            fill_parts(key, k, start + off, &mut parts[..n]);
        }
        for (buf, c) in &active {
            if k == 1 {
                T::axpy_stored(tile, c[0], buf, start + off, &mut tau[..n]);
            } else {
                buf.read_f32(start + off, &mut tau[..n]);
                for ((d, &x), &p) in tile.iter_mut().zip(&tau[..n]).zip(&parts[..n]) {
                    *d += c[p as usize] * T::from_f32(x);
                }
            }
        }
    }
}

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
    let k = coefs.parts();
    let n_blocks = manifest.len();
    let keys = part_keys(manifest, coefs.layout);
    let items: Vec<(usize, usize)> = lens
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| (0..n).step_by(CHUNK).map(move |s| (b, s)))
        .collect();
    let partials: Vec<(usize, Vec<f64>)> = items
        .into_par_iter()
        .map(|(b, start)| {
            let g = &grads[b].as_ref()[start..(start + CHUNK).min(lens[b])];
            (b, dot_chunk(b, start, g, tvs, k, keys[b]))
        })
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

/// ⟨g, τ_i⟩ over one chunk, per task vector and part: `[n_tv * k]`.
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
    let mut tau = [0f32; CHUNK];
    let mut parts = [0u8; CHUNK];
    if k > 1 {
        fill_parts(key, k, start, &mut parts[..n]);
    }
    for (i, tv) in tvs.iter().enumerate() {
        let buf = tv.block(b);
        if buf.is_zero() {
            continue;
        }
        read_f32(buf, start, &mut tau[..n]);
        if k == 1 {
            acc[i] = dot(g, &tau[..n]);
        } else {
            let mut sums = vec![T::default(); k];
            for ((&gj, &t), &p) in g.iter().zip(&tau[..n]).zip(&parts[..n]) {
                sums[p as usize] += gj * T::from_f32(t);
            }
            for (p, s) in sums.into_iter().enumerate() {
                acc[i * k + p] = s.to_f64();
            }
        }
    }
    acc
}

/// `buf.read_f32`, with half precision converted 8 values at a time where the CPU can.
fn read_f32(buf: &Buffer, start: usize, out: &mut [f32]) {
    let n = out.len();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
        out.fill(0.0);
        // SAFETY: AVX2 and F16C are supported, checked just above. 0 + 1·τ is τ exactly.
        match buf {
            Buffer::F16(v) => return unsafe { simd::axpy_f16(out, 1.0, &v[start..start + n]) },
            Buffer::BF16(v) => return unsafe { simd::axpy_bf16(out, 1.0, &v[start..start + n]) },
            _ => {}
        }
    }
    buf.read_f32(start, out)
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
    use super::*;
    use crate::buffer::StoreDType;
    use crate::manifest::{Block, TensorSpec};
    use crate::parts::part_of;
    use crate::task_vector::{Delta, TaskVectorMeta};

    fn manifest() -> Manifest {
        Manifest::new(vec![
            Block::single(TensorSpec::new("w", &[3, 7000])),
            Block::single(TensorSpec::new("b", &[5])),
            Block {
                name: "qkv".into(),
                tensors: vec![TensorSpec::new("q", &[4, 3]), TensorSpec::new("k", &[4, 3])],
            },
        ])
        .unwrap()
    }

    fn pseudo(seed: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| {
                (crate::parts::splitmix64(seed * 1_000_003 + j as u64) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn tv(m: &Manifest, seed: u64) -> Arc<TaskVector> {
        tv_at(m, seed, StoreDType::F32)
    }

    fn tv_at(m: &Manifest, seed: u64, store: StoreDType) -> Arc<TaskVector> {
        let deltas = m.tensor_specs().enumerate().map(|(i, (t, _))| Delta {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: pseudo(seed * 10 + i as u64, t.numel()),
        });
        let meta = TaskVectorMeta {
            name: format!("tv{seed}"),
            ..Default::default()
        };
        Arc::new(TaskVector::from_deltas(m, meta, store, deltas, &|_| false).unwrap())
    }

    /// The definition, one element at a time.
    fn naive(
        m: &Manifest,
        base: &[Vec<f32>],
        tvs: &[Arc<TaskVector>],
        c: &Coefficients,
    ) -> Vec<Vec<f64>> {
        let (k, seed) = match c.layout {
            Layout::PerPart { k, seed } => (k, seed),
            _ => (1, 0),
        };
        m.blocks()
            .iter()
            .enumerate()
            .map(|(b, block)| {
                let key = block_key(seed, &block.name);
                (0..block.numel())
                    .map(|j| {
                        let p = if k > 1 { part_of(key, j, k) } else { 0 };
                        base[b][j] as f64
                            + tvs
                                .iter()
                                .enumerate()
                                .map(|(i, t)| c.block(i, b)[p] * t.block(b).to_f32_vec()[j] as f64)
                                .sum::<f64>()
                    })
                    .collect()
            })
            .collect()
    }

    fn layouts(n_blocks: usize) -> Vec<Coefficients> {
        vec![
            Coefficients::isotropic(vec![0.3, -0.7], n_blocks).unwrap(),
            Coefficients::new(
                Layout::PerBlock,
                2,
                n_blocks,
                vec![0.5, 0.0, -1.5, 2.0, 0.25, 1.0],
            )
            .unwrap(),
            Coefficients::new(
                Layout::PerPart { k: 3, seed: 9 },
                2,
                n_blocks,
                (0..18).map(|x| x as f64 * 0.1 - 0.8).collect(),
            )
            .unwrap(),
        ]
    }

    #[test]
    fn compose_matches_the_definition() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(100 + b as u64, bl.numel()))
            .collect();
        let tvs = vec![tv(&m, 1), tv(&m, 2)];
        for c in layouts(m.len()) {
            let got: Vec<Vec<f64>> = compose(&m, &base, &tvs, &c).unwrap();
            let want = naive(&m, &base, &tvs, &c);
            for (g, w) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() < 1e-12, "{:?}: {a} vs {b}", c.layout);
                }
            }
        }
    }

    /// The vectorised f32 kernels (τ at f16, bf16, f32; blocks whose sizes are not multiples of
    /// 8) give bit for bit the scalar loop θ = θ0, then θ += c_i · τ_i in task-vector order.
    #[test]
    fn f32_kernels_match_the_scalar_loop_exactly() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| pseudo(7, bl.numel())).collect();
        for store in [StoreDType::F16, StoreDType::BF16, StoreDType::F32] {
            let tvs = vec![
                tv_at(&m, 1, store),
                tv_at(&m, 2, store),
                tv_at(&m, 3, store),
            ];
            let c = Coefficients::new(
                Layout::PerBlock,
                3,
                m.len(),
                (0..9).map(|x| x as f64 * 0.37 - 1.1).collect(),
            )
            .unwrap();
            let got: Vec<Vec<f32>> = compose(&m, &base, &tvs, &c).unwrap();
            for (b, (g, base)) in got.iter().zip(&base).enumerate() {
                let mut want = base.clone();
                for (i, t) in tvs.iter().enumerate() {
                    let ci = c.block(i, b)[0] as f32;
                    for (w, x) in want.iter_mut().zip(t.block(b).to_f32_vec()) {
                        *w += ci * x;
                    }
                }
                assert_eq!(g, &want, "{store:?}, block {b}");
            }
        }
    }

    #[test]
    fn zero_coefficients_give_the_base() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| pseudo(5, bl.numel())).collect();
        let tvs = vec![tv(&m, 1)];
        let c = Coefficients::zeros(Layout::PerBlock, 1, m.len()).unwrap();
        assert_eq!(compose::<f32, _>(&m, &base, &tvs, &c).unwrap(), base);
    }

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

    #[test]
    fn compose_into_reuses_buffers_and_matches_compose() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| pseudo(7, bl.numel())).collect();
        let tvs = vec![tv(&m, 1), tv(&m, 2)];
        let mut out: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .map(|bl| vec![f32::NAN; bl.numel()])
            .collect();
        for c in layouts(m.len()) {
            compose_into(&m, &base, &tvs, &c, &mut out).unwrap();
            assert_eq!(out, compose::<f32, _>(&m, &base, &tvs, &c).unwrap());
        }
        let mut short = vec![vec![0f32; 1]; m.len()];
        let c = Coefficients::zeros(Layout::PerBlock, 2, m.len()).unwrap();
        assert!(compose_into(&m, &base, &tvs, &c, &mut short).is_err());
    }

    #[test]
    fn rejects_mismatched_sizes() {
        let m = manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| vec![0.0; bl.numel()]).collect();
        let tvs = vec![tv(&m, 1)];
        let c = Coefficients::zeros(Layout::PerBlock, 2, m.len()).unwrap();
        assert!(compose::<f32, _>(&m, &base, &tvs, &c)
            .unwrap_err()
            .to_string()
            .contains("2 task vectors"));
        let short = vec![vec![0.0f32; 3]];
        let c = Coefficients::zeros(Layout::PerBlock, 1, m.len()).unwrap();
        assert!(compose::<f32, _>(&m, &short, &tvs, &c).is_err());
    }
}
