//! Composition θ^(b) = θ0^(b) + Σ_i Λ[i,b,part] · τ_i^(b) and its gradient reduction
//! ∂L/∂Λ[i,b,p] = Σ_{j in part p} ∂L/∂θ^(b)_j · τ_i^(b)_j.
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

/// Whether the x86-64 kernels below can run here (AVX2, FMA and F16C, detected at run time).
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
        // SAFETY: AVX2 is supported (simd_available).
        return unsafe { simd::fill_parts_avx2(key, k, start, out) };
    }
    fill_parts(key, k, start, out)
}

/// One task vector's share of a block: its stored τ and its coefficients (one per part).
struct Term<'a, T> {
    tau: &'a Buffer,
    c: Vec<T>,
}

/// x86-64 kernels chosen at run time (the build targets baseline x86-64). Composition is the
/// scalar loop `d += c * t` in task-vector order (a multiply, then an add: no FMA, so every
/// path rounds alike); the reduction may use FMA (it is compared with a tolerance).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::Term;
    use crate::buffer::Buffer;
    use half::{bf16, f16};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2")]
    pub unsafe fn axpy_f32(dst: &mut [f32], c: f32, x: &[f32]) {
        for (d, &t) in dst.iter_mut().zip(x) {
            *d += c * t;
        }
    }

    /// 8 lanes at a time: `load8` gives the 8 τ values at an index as f32.
    #[target_feature(enable = "avx2,f16c")]
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
            unsafe { load_f16(p) }
        })
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn axpy_bf16(dst: &mut [f32], c: f32, x: &[bf16]) {
        axpy_with(dst, c, x, |p| {
            // SAFETY: as above.
            unsafe { load_bf16(p) }
        })
    }

    /// 8 half-precision values at `p` as f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// 8 bfloat16 values at `p` as f32: bf16 is the top half of an f32, widen and shift left 16.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
    }

    /// The 8 part ids at `p` as i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_parts(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// τ[j] as f32 (exact), for the scalar tails.
    #[inline]
    fn tau_at(tau: &Buffer, j: usize) -> f32 {
        match tau {
            Buffer::Zero(_) => 0.0,
            Buffer::F32(v) => v[j],
            Buffer::F16(v) => v[j].to_f32(),
            Buffer::BF16(v) => v[j].to_f32(),
        }
    }

    /// The low 64 bits of a · m per lane, for a constant m given as `m_lo` (m with lanes of
    /// the 32 low bits, as `mul_epu32` reads) and `m_hi` (m >> 32): AVX2 has no 64-bit multiply.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mullo_epi64(a: __m256i, m_lo: __m256i, m_hi: __m256i) -> __m256i {
        let lo = _mm256_mul_epu32(a, m_lo);
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m_lo),
            _mm256_mul_epu32(a, m_hi),
        );
        _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(cross))
    }

    /// splitmix64(x) >> 32 per 64-bit lane (the bits the part id uses).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn splitmix_hi(x: __m256i) -> __m256i {
        const M1: u64 = 0xBF58_476D_1CE4_E5B9;
        const M2: u64 = 0x94D0_49BB_1331_11EB;
        let c = |v: u64| _mm256_set1_epi64x(v as i64);
        let mut z = _mm256_add_epi64(x, c(0x9E37_79B9_7F4A_7C15));
        z = mullo_epi64(
            _mm256_xor_si256(z, _mm256_srli_epi64::<30>(z)),
            c(M1),
            c(M1 >> 32),
        );
        z = mullo_epi64(
            _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z)),
            c(M2),
            c(M2 >> 32),
        );
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z));
        _mm256_srli_epi64::<32>(z)
    }

    /// [`crate::parts::fill_parts`], 8 elements per step as two vectors of 4 (splitmix64 with
    /// an emulated 64-bit multiply); the same ids exactly.
    ///
    /// Safety: AVX2 must be supported.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fill_parts_avx2(key: u64, k: usize, start: usize, out: &mut [u8]) {
        let n = out.len();
        // Even elements in one vector, odd in the other, so the packs below come out in order.
        let even = _mm256_set_epi64x(6, 4, 2, 0);
        let odd = _mm256_set_epi64x(7, 5, 3, 1);
        let kv = _mm256_set1_epi64x(k as i64);
        let mut j = 0;
        while j + 8 <= n {
            let x = _mm256_set1_epi64x(key.wrapping_add((start + j) as u64) as i64);
            // ((z >> 32) * k) >> 32: a 32 × 32 → 64-bit product, exact. An id (< 256) is the
            // product's high half: shifted down for the even elements, masked in place for the
            // odd ones, so OR-ing them gives i32 lanes holding elements 0, 1, ... 7 in order.
            let pe = _mm256_srli_epi64::<32>(_mm256_mul_epu32(
                splitmix_hi(_mm256_add_epi64(x, even)),
                kv,
            ));
            let po = _mm256_mul_epu32(splitmix_hi(_mm256_add_epi64(x, odd)), kv);
            let po = _mm256_and_si256(po, _mm256_set1_epi64x(!0xFFFF_FFFFu64 as i64));
            let q = _mm256_or_si256(pe, po);
            // i32 lanes [e0 e1 e2 e3 | e4 e5 e6 e7] → u16 → u8.
            let w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            let b = _mm_packus_epi16(w, w);
            // SAFETY: j + 8 <= n; the low 8 bytes are stored.
            _mm_storel_epi64(out.as_mut_ptr().add(j) as *mut __m128i, b);
            j += 8;
        }
        crate::parts::fill_parts(key, k, start + j, &mut out[j..]);
    }

    /// dst = base + Σ_i c_i[part] · τ_i[start..] in task-vector order, the running sum in a
    /// register: one pass over the output instead of one per task vector. At most
    /// `SIMD_MAX_PARTS` parts (`parts` empty for one part): each lane picks its coefficient
    /// from a table with a permute.
    ///
    /// Safety: AVX2 and F16C must be supported. Slices are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn compose_f32(
        dst: &mut [MaybeUninit<f32>],
        base: &[f32],
        terms: &[Term<f32>],
        start: usize,
        parts: &[u8],
    ) {
        let n = dst.len();
        assert!(base.len() >= n && (parts.is_empty() || parts.len() >= n));
        let per_part = !parts.is_empty();
        let mut tabs = Vec::with_capacity(terms.len());
        for t in terms {
            assert!(t.tau.len() >= start + n && t.c.len() <= super::SIMD_MAX_PARTS);
            let mut tab = [t.c[0]; 8];
            tab[..t.c.len()].copy_from_slice(&t.c);
            tabs.push(_mm256_loadu_ps(tab.as_ptr()));
        }
        let out = dst.as_mut_ptr() as *mut f32;
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY (all loads and the store): j + 8 <= n, and every slice holds n elements
            // from its offset (asserted above).
            let mut acc = _mm256_loadu_ps(base.as_ptr().add(j));
            let idx = if per_part {
                load_parts(parts.as_ptr().add(j))
            } else {
                _mm256_setzero_si256()
            };
            for (t, &tab) in terms.iter().zip(&tabs) {
                let c = if per_part {
                    _mm256_permutevar8x32_ps(tab, idx)
                } else {
                    tab
                };
                let x = match t.tau {
                    Buffer::F16(v) => load_f16(v.as_ptr().add(start + j)),
                    Buffer::BF16(v) => load_bf16(v.as_ptr().add(start + j)),
                    Buffer::F32(v) => _mm256_loadu_ps(v.as_ptr().add(start + j)),
                    Buffer::Zero(_) => continue,
                };
                acc = _mm256_add_ps(acc, _mm256_mul_ps(c, x));
            }
            _mm256_storeu_ps(out.add(j), acc);
            j += 8;
        }
        for j in j..n {
            let mut d = base[j];
            for t in terms {
                let p = if per_part { parts[j] as usize } else { 0 };
                d += t.c[p] * tau_at(t.tau, start + j);
            }
            dst[j].write(d);
        }
    }

    /// acc[p] += Σ_{j in part p} g[j] · τ[start + j], `acc.len()` parts (at most
    /// `SIMD_MAX_PARTS`; `parts` empty for one part), f32 lanes within the span.
    ///
    /// Safety: AVX2, FMA and F16C must be supported. Slices are checked here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(g: &[f32], tau: &Buffer, start: usize, parts: &[u8], acc: &mut [f64]) {
        let n = g.len();
        let k = acc.len();
        assert!(tau.len() >= start + n && k <= super::SIMD_MAX_PARTS);
        assert!(k == 1 || parts.len() >= n);
        match tau {
            Buffer::Zero(_) => {}
            Buffer::F16(v) => dot_with(g, &v[start..start + n], parts, acc, |p| unsafe {
                load_f16(p)
            }),
            Buffer::BF16(v) => dot_with(g, &v[start..start + n], parts, acc, |p| unsafe {
                load_bf16(p)
            }),
            Buffer::F32(v) => dot_with(g, &v[start..start + n], parts, acc, |p| unsafe {
                _mm256_loadu_ps(p)
            }),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_with<T: Copy + Into<f32>>(
        g: &[f32],
        x: &[T],
        parts: &[u8],
        acc: &mut [f64],
        load8: impl Fn(*const T) -> __m256,
    ) {
        let n = g.len();
        match acc.len() {
            1 => {}
            2 => return dot_parts::<2, T>(g, x, parts, acc, load8),
            3 => return dot_parts::<3, T>(g, x, parts, acc, load8),
            4 => return dot_parts::<4, T>(g, x, parts, acc, load8),
            5 => return dot_parts::<5, T>(g, x, parts, acc, load8),
            6 => return dot_parts::<6, T>(g, x, parts, acc, load8),
            7 => return dot_parts::<7, T>(g, x, parts, acc, load8),
            8 => return dot_parts::<8, T>(g, x, parts, acc, load8),
            _ => unreachable!("at most SIMD_MAX_PARTS parts"),
        }
        let mut j = 0;
        // Four independent accumulators hide the FMA latency.
        let mut a = [_mm256_setzero_ps(); 4];
        while j + 32 <= n {
            // SAFETY: j + 32 <= n = g.len() = x.len().
            for (u, a) in a.iter_mut().enumerate() {
                let o = j + 8 * u;
                *a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(g.as_ptr().add(o)),
                    load8(x.as_ptr().add(o)),
                    *a,
                );
            }
            j += 32;
        }
        while j + 8 <= n {
            a[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(g.as_ptr().add(j)),
                load8(x.as_ptr().add(j)),
                a[0],
            );
            j += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        let mut sum: f64 = lanes.iter().map(|&v| v as f64).sum();
        for j in j..n {
            sum += (g[j] * x[j].into()) as f64;
        }
        acc[0] += sum;
    }

    /// The K-part case of [`dot_with`]: the gradient masked to each part's lanes, so one τ
    /// load feeds every part. K is a constant so the K accumulators stay in registers.
    /// (Masking once per chunk into a K-times larger buffer was slower: it leaves L1.)
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_parts<const K: usize, T: Copy + Into<f32>>(
        g: &[f32],
        x: &[T],
        parts: &[u8],
        acc: &mut [f64],
        load8: impl Fn(*const T) -> __m256,
    ) {
        let n = g.len();
        assert!(x.len() >= n && parts.len() >= n && acc.len() == K);
        let mut a = [_mm256_setzero_ps(); K];
        let ids: [__m256i; K] = std::array::from_fn(|p| _mm256_set1_epi32(p as i32));
        let mut j = 0;
        while j + 8 <= n {
            // SAFETY: j + 8 <= n, within g, x and parts (asserted above).
            let gv = _mm256_loadu_ps(g.as_ptr().add(j));
            let xv = load8(x.as_ptr().add(j));
            let idx = load_parts(parts.as_ptr().add(j));
            for p in 0..K {
                let m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, ids[p]));
                a[p] = _mm256_fmadd_ps(_mm256_and_ps(gv, m), xv, a[p]);
            }
            j += 8;
        }
        let mut lanes = [0f32; 8];
        for (p, a) in a.iter().enumerate() {
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            acc[p] += lanes.iter().map(|&v| v as f64).sum::<f64>();
        }
        for j in j..n {
            acc[parts[j] as usize] += (g[j] * x[j].into()) as f64;
        }
    }
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

    /// Blocks whose sizes are not multiples of 8 or of the chunk, and a block of two tensors.
    fn odd_manifest() -> Manifest {
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

    fn coefs_for(m: &Manifest, n_tv: usize, k: usize) -> Coefficients {
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
            vec![StoreDType::F16; 3],
            vec![StoreDType::BF16; 3],
            vec![StoreDType::F32; 3],
            vec![StoreDType::F16, StoreDType::F32, StoreDType::BF16],
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
        for store in [StoreDType::F16, StoreDType::BF16, StoreDType::F32] {
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
        let tvs = vec![tv_at(&m, 1, StoreDType::F16), tv_at(&m, 2, StoreDType::F16)];
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

    /// Gradient pieces (per tensor, some missing) reduce like the whole blocks with zeros where
    /// no piece is given; overlapping or out-of-range pieces are refused.
    #[test]
    fn reduce_gradient_pieces_matches_whole_blocks() {
        let m = odd_manifest();
        let tvs = vec![
            tv_at(&m, 1, StoreDType::F16),
            tv_at(&m, 2, StoreDType::BF16),
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
