//! x86-64 kernels of the composition and the gradient reduction, chosen at run time (the
//! build targets baseline x86-64). Composition is the scalar loop `d += c * t` in task-vector
//! order (a multiply, then an add: no FMA, so every path rounds alike); the reduction may use
//! FMA (it is compared with a tolerance). Every function here is `unsafe`: the caller checks
//! the CPU features first ([`super::simd_available`]).

use super::{Term, SIMD_MAX_PARTS};
use crate::buffer::Buffer;
use half::{bf16, f16};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// dst += c · x over the shorter length, compiled for AVX2 (the compiler vectorises the loop).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn axpy_f32(dst: &mut [f32], c: f32, x: &[f32]) {
    for (d, &t) in dst.iter_mut().zip(x) {
        *d += c * t;
    }
}

/// 8 lanes at a time: `load8` gives the 8 τ values at an index as f32.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `load8(p)` must only read the 8 values from `p`.
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

/// dst += c · x for f16 x, converted 8 at a time.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn axpy_f16(dst: &mut [f32], c: f32, x: &[f16]) {
    axpy_with(dst, c, x, |p| {
        // SAFETY: the caller reads 8 values in bounds; AVX2 and F16C are enabled here.
        unsafe { load_f16(p) }
    })
}

/// dst += c · x for bf16 x, converted 8 at a time.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn axpy_bf16(dst: &mut [f32], c: f32, x: &[bf16]) {
    axpy_with(dst, c, x, |p| {
        // SAFETY: the caller reads 8 values in bounds; AVX2 and F16C are enabled here.
        unsafe { load_bf16(p) }
    })
}

/// 8 half-precision values at `p` as f32 (exact).
///
/// # Safety
/// The CPU must support AVX2 and F16C, and 8 values must be readable from `p`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// 8 bfloat16 values at `p` as f32: bf16 is the top half of an f32, widen and shift left 16.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and 8 values must be readable from `p`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
}

/// The 8 part ids at `p` as i32 lanes.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and 8 bytes must be readable from `p`.
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
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the function is compiled for all three).
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
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the function is compiled for all three).
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
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the function is compiled for all three).
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
        let pe =
            _mm256_srli_epi64::<32>(_mm256_mul_epu32(splitmix_hi(_mm256_add_epi64(x, even)), kv));
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
/// # Safety
/// The CPU must support AVX2, FMA and F16C (the function is compiled for all three). Slice
/// lengths are checked here.
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
        assert!(t.tau.len() >= start + n && t.c.len() <= SIMD_MAX_PARTS);
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
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Slice lengths are checked here.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(g: &[f32], tau: &Buffer, start: usize, parts: &[u8], acc: &mut [f64]) {
    let n = g.len();
    let k = acc.len();
    assert!(tau.len() >= start + n && k <= SIMD_MAX_PARTS);
    assert!(k == 1 || parts.len() >= n);
    match tau {
        Buffer::Zero(_) => {}
        // SAFETY (the three loads): dot_with reads 8 values at indices below n, and each
        // slice holds n values; this function's caller guarantees AVX2, FMA and F16C.
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

/// acc[p] += Σ_{j in part p} g[j] · x[j] over g's length, `acc.len()` parts.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; x (and parts, for more than one part) must be at
/// least as long as g, and `load8(p)` must only read the 8 values from `p`.
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
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and `load8(p)` must only read the 8 values from
/// `p`. Slice lengths are checked here.
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
