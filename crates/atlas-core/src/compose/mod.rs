//! Composition θ^(b) = θ0^(b) + Σ_i Λ[i,b,part] · τ_i^(b); its gradient reduction
//! ∂L/∂Λ[i,b,p] = Σ_{j in part p} ∂L/∂θ^(b)_j · τ_i^(b)_j is in `grad`, the x86-64 kernels of
//! both in `simd`.
//!
//! Both stream over blocks in chunks of [`CHUNK`] elements on the rayon pool: each chunk of the
//! output (or gradient) stays in cache while every task vector's matching chunk is read once, so
//! no task-vector-sized temporary is ever made and the task vectors are read exactly once.
//!
//! A block may be given as several consecutive pieces (one per tensor of a multi-tensor block),
//! so callers can compose straight into, and reduce straight from, per-tensor storage.

use crate::buffer::Buffer;
use crate::coefficients::{Coefficients, Layout};
use crate::manifest::Manifest;
use crate::parts::{block_key, fill_parts};
use crate::task_vector::TaskVector;
use crate::{CoreError, Result};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Mul};
use std::sync::Arc;

mod grad;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use grad::{reduce_gradient, reduce_gradient_pieces};

/// Elements per work item: large enough to amortise scheduling, small enough to balance.
pub const CHUNK: usize = 8192;

/// Elements per inner tile of the portable path: the output tile and one converted τ tile
/// (2 × 8 KiB in f32) stay in L1 while every task vector is added in.
const TILE: usize = 2048;

/// The most parts the vectorised kernels handle (one coefficient or accumulator per lane).
const SIMD_MAX_PARTS: usize = 8;

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

    /// `s` viewed as f32 when `Self` is f32 (lets the f32 kernels be picked), else None.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }

    /// As [`Real::as_f32`], for an output not yet written.
    fn as_f32_uninit(_s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
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

    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    fn as_f32_uninit(s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(s)
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

/// Whether the x86-64 kernels (`simd`) can run here (AVX2, FMA and F16C, detected at run time).
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Part ids of block elements `start..start + out.len()`, as [`fill_parts`] gives them,
/// vectorised where AVX2 is available (hashing every element is otherwise a large share
/// of per-part composition and reduction).
fn part_ids(key: u64, k: usize, start: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C are supported (simd_available).
        return unsafe { simd::fill_parts_avx2(key, k, start, out) };
    }
    fill_parts(key, k, start, out)
}

/// One task vector's share of a block: its stored τ and its coefficients (one per part).
struct Term<'a, T> {
    tau: &'a Buffer,
    c: Vec<T>,
}

fn check_coefs(manifest: &Manifest, tvs: &[Arc<TaskVector>], coefs: &Coefficients) -> Result<()> {
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
    Ok(())
}

fn check(
    manifest: &Manifest,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    lens: &[usize],
) -> Result<()> {
    check_coefs(manifest, tvs, coefs)?;
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

/// `s` as not-yet-written memory, for the compose paths that only write.
fn as_uninit<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout; the callers only ever write initialised values
    // through the result, so `s` stays initialised.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut MaybeUninit<T>, s.len()) }
}

/// Composes every block: returns θ per block (tensors of a block concatenated in manifest order)
/// in the compute type `T`; θ0 is given per block as f32.
pub fn compose<T: Real, B: AsRef<[f32]> + Sync>(
    manifest: &Manifest,
    base: &[B],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Result<Vec<Vec<T>>> {
    // Uninitialised: the composition writes every element, so zero-filling first (a memset
    // once the allocator reuses freed memory) would be wasted work.
    let mut out: Vec<Vec<T>> = base
        .iter()
        .map(|b| Vec::with_capacity(b.as_ref().len()))
        .collect();
    {
        let mut pieces: Vec<Vec<&mut [MaybeUninit<T>]>> = out
            .iter_mut()
            .zip(base)
            .map(|(v, b)| {
                let s = &mut v.spare_capacity_mut()[..b.as_ref().len()];
                advise_huge_pages(s);
                vec![s]
            })
            .collect();
        compose_into_uninit(manifest, base, tvs, coefs, &mut pieces)?;
    }
    for (v, b) in out.iter_mut().zip(base) {
        // SAFETY: compose_into_uninit returned Ok, so it wrote all b.len() elements.
        unsafe { v.set_len(b.as_ref().len()) };
    }
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
    let mut pieces: Vec<Vec<&mut [MaybeUninit<T>]>> =
        out.iter_mut().map(|v| vec![as_uninit(v)]).collect();
    compose_into_uninit(manifest, base, tvs, coefs, &mut pieces)
}

/// [`compose`] into memory that need not be initialised, each block given as consecutive
/// pieces whose lengths add up to the block's size (e.g. one piece per tensor of the block, the
/// storage of separate tensors). On `Ok`, every element of every piece has been written; on
/// `Err`, nothing has.
pub fn compose_into_uninit<T: Real, B: AsRef<[f32]> + Sync>(
    manifest: &Manifest,
    base: &[B],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    out: &mut [Vec<&mut [MaybeUninit<T>]>],
) -> Result<()> {
    let lens: Vec<usize> = base.iter().map(|b| b.as_ref().len()).collect();
    check(manifest, tvs, coefs, &lens)?;
    let out_lens: Vec<usize> = out
        .iter()
        .map(|pieces| pieces.iter().map(|p| p.len()).sum())
        .collect();
    if out_lens != lens {
        return Err(CoreError::Invalid(
            "output buffers do not match the manifest's block sizes".into(),
        ));
    }
    let keys = part_keys(manifest, coefs.layout);
    // One work item: a chunk of block `b` starting at block element `start`.
    let mut items: Vec<(usize, usize, &mut [MaybeUninit<T>])> = Vec::new();
    for (b, pieces) in out.iter_mut().enumerate() {
        let mut offset = 0;
        for piece in pieces.iter_mut() {
            let len = piece.len();
            for (c, s) in piece.chunks_mut(CHUNK).enumerate() {
                items.push((b, offset + c * CHUNK, s));
            }
            offset += len;
        }
    }
    items.into_par_iter().for_each(|(b, start, dst)| {
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

/// One work item: dst = θ0 + Σ_i c_i τ_i over `dst.len()` elements of block `b` from `start`.
fn compose_chunk<T: Real>(
    b: usize,
    start: usize,
    dst: &mut [MaybeUninit<T>],
    base: &[f32],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    key: u64,
) {
    let k = coefs.parts();
    let n = dst.len();
    // The task vectors that touch this block, with their coefficients in T.
    let terms: Vec<Term<T>> = tvs
        .iter()
        .enumerate()
        .filter_map(|(i, tv)| {
            let c = coefs.block(i, b);
            let tau = tv.block(b);
            let skip = tau.is_zero() || c.iter().all(|&x| x == 0.0);
            (!skip).then(|| Term {
                tau,
                c: c.iter().map(|&x| T::from_f64(x)).collect(),
            })
        })
        .collect();
    let mut parts = [0u8; CHUNK];
    if k > 1 {
        part_ids(key, k, start, &mut parts[..n]);
    }
    let parts: &[u8] = if k > 1 { &parts[..n] } else { &[] };
    #[cfg(target_arch = "x86_64")]
    if k <= SIMD_MAX_PARTS && simd_available() {
        if let Some(dst) = T::as_f32_uninit(dst) {
            let terms: Vec<Term<f32>> = terms
                .iter()
                .map(|t| Term {
                    tau: t.tau,
                    c: t.c.iter().map(|&x| x.to_f64() as f32).collect(),
                })
                .collect();
            // SAFETY: AVX2, FMA and F16C are supported (simd_available).
            return unsafe { simd::compose_f32(dst, base, &terms, start, parts) };
        }
    }
    compose_span_portable(dst, base, &terms, start, parts);
}

/// The portable composition of one span, a [`TILE`] at a time so the running sum stays in L1.
fn compose_span_portable<T: Real>(
    dst: &mut [MaybeUninit<T>],
    base: &[f32],
    terms: &[Term<T>],
    start: usize,
    parts: &[u8],
) {
    let mut tau = [0f32; TILE];
    for (t, tile) in dst.chunks_mut(TILE).enumerate() {
        let off = t * TILE;
        let n = tile.len();
        for (d, &x) in tile.iter_mut().zip(&base[off..off + n]) {
            d.write(T::from_f32(x));
        }
        // SAFETY: every element of `tile` was written just above.
        let tile =
            unsafe { std::slice::from_raw_parts_mut(tile.as_mut_ptr() as *mut T, tile.len()) };
        for term in terms {
            if parts.is_empty() {
                T::axpy_stored(tile, term.c[0], term.tau, start + off, &mut tau[..n]);
            } else {
                term.tau.read_f32(start + off, &mut tau[..n]);
                for ((d, &x), &p) in tile.iter_mut().zip(&tau[..n]).zip(&parts[off..off + n]) {
                    *d += term.c[p as usize] * T::from_f32(x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::StorageDType;
    use crate::manifest::{Block, TensorSpec};
    use crate::parts::part_of;
    use crate::task_vector::{Delta, TaskVectorMeta};

    pub(super) fn manifest() -> Manifest {
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

    pub(super) fn pseudo(seed: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| {
                (crate::parts::splitmix64(seed * 1_000_003 + j as u64) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    pub(super) fn tv(m: &Manifest, seed: u64) -> Arc<TaskVector> {
        tv_at(m, seed, StorageDType::F32)
    }

    pub(super) fn tv_at(m: &Manifest, seed: u64, store: StorageDType) -> Arc<TaskVector> {
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

    pub(super) fn layouts(n_blocks: usize) -> Vec<Coefficients> {
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
        for store in [StorageDType::F16, StorageDType::BF16, StorageDType::F32] {
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

    /// Blocks whose sizes are not multiples of 8 or of the chunk, and a block of two tensors.
    pub(super) fn odd_manifest() -> Manifest {
        Manifest::new(vec![
            Block::single(TensorSpec::new("w", &[3, 7001])),
            Block::single(TensorSpec::new("b", &[5])),
            Block::single(TensorSpec::new("e", &[8193])),
            Block {
                name: "qkv".into(),
                tensors: vec![TensorSpec::new("q", &[7, 3]), TensorSpec::new("k", &[4, 9])],
            },
        ])
        .unwrap()
    }

    pub(super) fn coefs_for(m: &Manifest, n_tv: usize, k: usize) -> Coefficients {
        let layout = if k == 1 {
            Layout::PerBlock
        } else {
            Layout::PerPart { k, seed: 3 }
        };
        let n = layout.len(n_tv, m.len());
        Coefficients::new(
            layout,
            n_tv,
            m.len(),
            (0..n).map(|x| (x % 13) as f64 * 0.21 - 1.3).collect(),
        )
        .unwrap()
    }

    /// The f32 composition kernels (τ at f16, bf16, f32, mixed; one part, K ≤ 8 parts through
    /// the lane permute, K > 8 through the portable path; odd sizes) give bit for bit the scalar
    /// loop θ = θ0, then θ += c_i[part] · τ_i in task-vector order.
    #[test]
    fn f32_per_part_kernels_match_the_scalar_loop_exactly() {
        let m = odd_manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| pseudo(11, bl.numel())).collect();
        let stores = [
            vec![StorageDType::F16; 3],
            vec![StorageDType::BF16; 3],
            vec![StorageDType::F32; 3],
            vec![StorageDType::F16, StorageDType::F32, StorageDType::BF16],
        ];
        for store in &stores {
            let tvs: Vec<_> = store
                .iter()
                .enumerate()
                .map(|(i, &s)| tv_at(&m, i as u64 + 1, s))
                .collect();
            for k in [1, 2, 3, 8, 9] {
                let c = coefs_for(&m, tvs.len(), k);
                let got: Vec<Vec<f32>> = compose(&m, &base, &tvs, &c).unwrap();
                for (b, block) in m.blocks().iter().enumerate() {
                    let key = block_key(3, &block.name);
                    let mut want = base[b].clone();
                    for (i, t) in tvs.iter().enumerate() {
                        let cs = c.block(i, b);
                        for (j, (w, x)) in want.iter_mut().zip(t.block(b).to_f32_vec()).enumerate()
                        {
                            let p = if k > 1 { part_of(key, j, k) } else { 0 };
                            *w += cs[p] as f32 * x;
                        }
                    }
                    assert_eq!(got[b], want, "{store:?}, k {k}, block {b}");
                }
            }
        }
    }

    /// The vectorised part ids are the reference hash's, for any key, offset, K and length.
    #[test]
    fn part_ids_match_fill_parts() {
        for (key, start) in [(0u64, 0usize), (u64::MAX - 3, 5), (block_key(7, "w"), 8191)] {
            for k in [2, 3, 8, 9, 255] {
                for n in [0, 1, 7, 8, 9, 100, 8192] {
                    let mut got = vec![0u8; n];
                    let mut want = vec![0u8; n];
                    part_ids(key, k, start, &mut got);
                    fill_parts(key, k, start, &mut want);
                    assert_eq!(got, want, "key {key}, start {start}, k {k}, n {n}");
                }
            }
        }
    }

    /// Composing into per-tensor pieces of uninitialised memory gives what [`compose`] gives.
    #[test]
    fn compose_into_uninit_pieces_matches_compose() {
        let m = odd_manifest();
        let base: Vec<Vec<f32>> = m.blocks().iter().map(|bl| pseudo(9, bl.numel())).collect();
        let tvs = vec![
            tv_at(&m, 1, StorageDType::F16),
            tv_at(&m, 2, StorageDType::F16),
        ];
        for k in [1, 3] {
            let c = coefs_for(&m, tvs.len(), k);
            let mut tensors: Vec<Vec<f64>> = m
                .tensor_specs()
                .map(|(t, _)| Vec::with_capacity(t.numel()))
                .collect();
            {
                let mut it = tensors.iter_mut();
                let mut pieces: Vec<Vec<&mut [MaybeUninit<f64>]>> = m
                    .blocks()
                    .iter()
                    .map(|bl| {
                        bl.tensors
                            .iter()
                            .map(|t| {
                                let v = it.next().unwrap();
                                &mut v.spare_capacity_mut()[..t.numel()]
                            })
                            .collect()
                    })
                    .collect();
                compose_into_uninit(&m, &base, &tvs, &c, &mut pieces).unwrap();
            }
            for (v, (t, _)) in tensors.iter_mut().zip(m.tensor_specs()) {
                // SAFETY: compose_into_uninit wrote every element.
                unsafe { v.set_len(t.numel()) };
            }
            let want: Vec<f64> = compose::<f64, _>(&m, &base, &tvs, &c).unwrap().concat();
            assert_eq!(tensors.concat(), want);
            let mut short: Vec<f64> = Vec::with_capacity(3);
            let mut bad: Vec<Vec<&mut [MaybeUninit<f64>]>> =
                m.blocks().iter().map(|_| Vec::new()).collect();
            bad[1].push(&mut short.spare_capacity_mut()[..3]);
            assert!(compose_into_uninit(&m, &base, &tvs, &c, &mut bad).is_err());
        }
    }
}
