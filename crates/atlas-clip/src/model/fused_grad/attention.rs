//! Multi-head attention with its own backward, on the CPU (f32, f64): softmax(s·Q Kᵀ) V per
//! head, straight from the q, k and v projections ([B, N, D], heads side by side in D) to the
//! context ([B, Nq, D]). Learning runs it on the separate projections; inference (f32) on q, k
//! and v cut from the stacked projection, with the scale already in q (bench/results has the
//! figures). Built from candle ops, this split and merged the heads with copies, scaled q in its
//! own pass and ran 3 × B·H small batched matmuls forward and 4 × B·H backward, far below gemm's
//! speed on large matrices; here each (image, head) pair is one task that
//! calls gemm on strided views, and the backward recomputes the N×N probabilities instead of
//! keeping them.

use super::{slice, softmax_in_place, Num};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// True when [`attention`] can run: CPU tensors of one dtype (f32 or f64), q [B, Nq, D],
/// k and v [B, Nk, D], D a multiple of `heads`, no mask.
pub fn usable(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> bool {
    super::usable(&[q, k, v]) && Dims::of(q.dims(), k.dims(), v.dims(), heads).is_ok()
}

/// softmax(scale · Q Kᵀ) V per head: the context [B, Nq, D], differentiable in q, k and v.
/// Without a graph, q, k and v may be row-strided views (cut from the stacked projection):
/// the forward reads them in place instead of copying each.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let plain = !(q.track_op() || k.track_op() || v.track_op());
    let ready = |t: &Tensor| -> Result<Tensor> {
        if plain && row_stride(t.layout()).is_some() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (ready(q)?, ready(k)?, ready(v)?);
    q.apply_op3(&k, &v, Attention { heads, scale })
}

/// The distance between rows of a [B, N, D] layout whose rows are contiguous and evenly spaced
/// (a contiguous tensor, or a slice of the last dimension of one). Strides of dimensions of
/// size 1 are arbitrary (candle counts such a layout as contiguous).
fn row_stride(l: &Layout) -> Option<usize> {
    match (l.dims(), l.stride()) {
        (&[1, 1, d], _) => Some(d),
        (&[_, 1, d], &[s0, _, 1]) if s0 >= d => Some(s0),
        (&[1, _, d], &[_, s1, 1]) if s1 >= d => Some(s1),
        (&[_, n, d], &[s0, s1, 1]) if s0 == n * s1 && s1 >= d => Some(s1),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    nq: usize,
    nk: usize,
    d: usize,
    heads: usize,
    /// Row strides of q, k and v in the forward (d when contiguous).
    rs: [usize; 3],
}

impl Dims {
    fn of(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<Dims> {
        let (&[b, nq, d], &[bk, nk, dk]) = (q, k) else {
            candle_core::bail!("fused-attention: q {q:?} and k {k:?} must be [B, N, D]");
        };
        if bk != b || dk != d || v != k || heads == 0 || d % heads != 0 || nq == 0 || nk == 0 {
            candle_core::bail!(
                "fused-attention: q {q:?}, k {k:?}, v {v:?} do not fit {heads} heads"
            );
        }
        Ok(Dims {
            b,
            nq,
            nk,
            d,
            heads,
            rs: [d; 3],
        })
    }

    /// The forward reads rows of d values `rs` apart: the slices must reach the last one.
    fn check_extent(&self, q: usize, k: usize, v: usize) -> Result<()> {
        let need = |n: usize, rs: usize| (self.b * n - 1) * rs + self.d;
        let [qs, ks, vs] = self.rs;
        if q < need(self.nq, qs) || k < need(self.nk, ks) || v < need(self.nk, vs) {
            candle_core::bail!("fused-attention: a strided input is shorter than its layout");
        }
        Ok(())
    }

    fn hd(&self) -> usize {
        self.d / self.heads
    }

    /// Offsets of head `h` of image `b` in a [B, N, D] tensor with `n` rows per image.
    fn at(&self, pair: usize, n: usize) -> usize {
        self.at_rows(pair, n, self.d)
    }

    /// As [`Dims::at`], with rows `rs` apart.
    fn at_rows(&self, pair: usize, n: usize, rs: usize) -> usize {
        let (b, h) = (pair / self.heads, pair % self.heads);
        b * n * rs + h * self.hd()
    }
}

/// A row-major matrix view: base pointer, row stride and column stride, in elements.
#[derive(Clone, Copy)]
struct View<T>(*const T, isize, isize);

/// dst (rows × cols, row stride `dst_rs`) = beta · lhs · rhs, single-threaded: the caller runs
/// one (image, head) pair per rayon task.
///
/// # Safety
/// The views must address `rows × inner` and `inner × cols` valid elements, `dst` rows × cols
/// writable ones that no other thread touches.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Num>(
    dst: *mut T,
    dst_rs: usize,
    (rows, inner, cols): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) {
    #[cfg(target_arch = "x86_64")]
    if head_product(dst, dst_rs, (rows, inner, cols), lhs, rhs, beta) {
        return;
    }
    gemm(
        rows,
        cols,
        inner,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        T::zero(),
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Whether `product`'s f32 products take the AVX-512 kernels (the tests turn them off to
/// compare against gemm).
#[cfg(target_arch = "x86_64")]
pub(in crate::model) static HEAD_KERNELS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// True when T is f32, the CPU has AVX-512F and the tests have not turned the kernels off.
#[cfg(target_arch = "x86_64")]
fn on_head_kernels<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && HEAD_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
        && crate::model::small_gemm::usable()
}

/// `product` on `small_gemm`'s kernels when they run (`on_head_kernels`); false when the caller
/// must run gemm.
///
/// # Safety
/// As `product`.
#[cfg(target_arch = "x86_64")]
unsafe fn head_product<T: Num>(
    dst: *mut T,
    dst_rs: usize,
    (rows, inner, cols): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) -> bool {
    use crate::model::small_gemm::{a_b, a_bt, Operand};
    if !on_head_kernels::<T>() {
        return false;
    }
    let s = beta.to_f32().unwrap_or(f32::NAN);
    let (dst, a) = (
        dst.cast::<f32>(),
        Operand(lhs.0.cast(), lhs.1 as usize, lhs.2 as usize),
    );
    if rhs.2 == 1 && cols.is_multiple_of(16) {
        a_b(
            dst,
            dst_rs,
            (rows, inner, cols),
            a,
            Operand(rhs.0.cast(), rhs.1 as usize, 1),
            s,
        );
    } else {
        // B = rhsᵀ: B[j, c] is rhs[c, j].
        let b = Operand(rhs.0.cast(), rhs.2 as usize, rhs.1 as usize);
        a_bt(dst, dst_rs, (rows, inner, cols), a, b, s, false);
    }
    true
}

/// P = softmax(scale · Q_h K_hᵀ) into `p` (Nq × Nk).
///
/// # Safety
/// `q` and `k` point at the pair's head in [B, N, D] tensors of the sizes in `dims`.
unsafe fn probabilities<T: Num>(p: &mut [T], q: *const T, k: *const T, dims: &Dims, scale: T) {
    let (hd, nq, nk) = (dims.hd(), dims.nq, dims.nk);
    #[cfg(target_arch = "x86_64")]
    if on_head_kernels::<T>() {
        use crate::model::small_gemm::{a_bt, Operand};
        let [qs, ks, _] = dims.rs;
        let (q, k) = (Operand(q.cast(), qs, 1), Operand(k.cast(), ks, 1));
        let s = scale.to_f32().unwrap_or(f32::NAN);
        return a_bt(p.as_mut_ptr().cast(), nk, (nq, hd, nk), q, k, s, true);
    }
    let [qs, ks, _] = dims.rs.map(|s| s as isize);
    // Kᵀ: element (c, j) is K[j, c].
    product(
        p.as_mut_ptr(),
        nk,
        (nq, hd, nk),
        View(q, qs, 1),
        View(k, 1, ks),
        scale,
    );
    for row in p.chunks_exact_mut(nk) {
        softmax_in_place(row);
    }
}

/// A pointer that rayon tasks may share: each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the tasks that share it write disjoint elements and the owner outlives them (the
// parallel loop returns before the buffer is read or freed).
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as for Send: no two tasks touch the same element.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets inside the allocation the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

fn forward<T: Num>(q: &[T], k: &[T], v: &[T], dims: Dims, scale: f64) -> Vec<T> {
    let (d, hd, nq, nk) = (dims.d, dims.hd(), dims.nq, dims.nk);
    // Not zeroed: the pairs write every element (their heads' columns of every row).
    let len = dims.b * nq * d;
    let mut out = Vec::with_capacity(len);
    let o = Shared(out.as_mut_ptr());
    (0..dims.b * dims.heads).into_par_iter().for_each_init(
        || vec![T::zero(); nq * nk],
        |p, pair| {
            let [qs, ks, vs] = dims.rs;
            let (qo, ko) = (dims.at_rows(pair, nq, qs), dims.at_rows(pair, nk, ks));
            let (vo, oo) = (dims.at_rows(pair, nk, vs), dims.at(pair, nq));
            // SAFETY: the offsets address this pair's head in tensors of `dims`' sizes; the
            // pair's head columns of `out` are written by this task alone.
            unsafe {
                probabilities(
                    p,
                    q.as_ptr().add(qo),
                    k.as_ptr().add(ko),
                    &dims,
                    T::c(scale),
                );
                let p = View(p.as_ptr(), nk as isize, 1);
                let v = View(v.as_ptr().add(vo), vs as isize, 1);
                product(o.at(oo), d, (nq, nk, hd), p, v, T::one());
            }
        },
    );
    // SAFETY: every element was written above.
    unsafe { out.set_len(len) };
    out
}

/// The gradients of q, k and v from ∂out, packed as rows: [B·Nq + 2·B·Nk, D].
fn backward<T: Num>(q: &[T], k: &[T], v: &[T], g: &[T], dims: Dims, scale: f64) -> Vec<T> {
    let (b, d, hd, nq, nk) = (dims.b, dims.d, dims.hd(), dims.nq, dims.nk);
    // Not zeroed, as in `forward`: each pair writes its head's columns of ∂q, ∂k and ∂v.
    let len = (b * nq + 2 * b * nk) * d;
    let mut out = Vec::with_capacity(len);
    let (dq, dk, dv) = (0, b * nq * d, (b * nq + b * nk) * d);
    let o = Shared(out.as_mut_ptr());
    (0..b * dims.heads).into_par_iter().for_each_init(
        || vec![T::zero(); 2 * nq * nk],
        |scratch, pair| {
            let (qo, ko) = (dims.at(pair, nq), dims.at(pair, nk));
            let (p, dp) = scratch.split_at_mut(nq * nk);
            let di = d as isize;
            // SAFETY: as in `forward`; this task writes its pair's head columns of ∂q, ∂k, ∂v.
            unsafe {
                let (qh, kh, vh) = (q.as_ptr().add(qo), k.as_ptr().add(ko), v.as_ptr().add(ko));
                let gh = g.as_ptr().add(qo);
                probabilities(p, qh, kh, &dims, T::c(scale));
                let pt = View(p.as_ptr(), 1, nk as isize);
                // ∂V = Pᵀ ∂O, ∂P = ∂O Vᵀ.
                product(
                    o.at(dv + ko),
                    d,
                    (nk, nq, hd),
                    pt,
                    View(gh, di, 1),
                    T::one(),
                );
                product(
                    dp.as_mut_ptr(),
                    nk,
                    (nq, hd, nk),
                    View(gh, di, 1),
                    View(vh, 1, di),
                    T::one(),
                );
                // ∂S = P ⊙ (∂P − ⟨∂P, P⟩) per row.
                for (dp, p) in dp.chunks_exact_mut(nk).zip(p.chunks_exact(nk)) {
                    let dot = dp.iter().zip(p).map(|(&a, &b)| a * b).sum::<T>();
                    dp.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - dot));
                }
                // ∂Q = s·∂S K, ∂K = s·∂Sᵀ Q.
                let ds = View(dp.as_ptr(), nk as isize, 1);
                let dst = View(dp.as_ptr(), 1, nk as isize);
                let s = T::c(scale);
                product(o.at(dq + qo), d, (nq, nk, hd), ds, View(kh, di, 1), s);
                product(o.at(dk + ko), d, (nk, nq, hd), dst, View(qh, di, 1), s);
            }
        },
    );
    // SAFETY: every element was written above.
    unsafe { out.set_len(len) };
    out
}

struct Attention {
    heads: usize,
    scale: f64,
}

impl Attention {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        Dims::of(l1.dims(), l2.dims(), l3.dims(), self.heads)
    }
}

type Input<'a> = (&'a CpuStorage, &'a Layout);

/// The data from a row-strided input's first element, and its row stride.
fn rows<T: Num>((s, l): Input<'_>) -> Result<(&[T], usize)> {
    match row_stride(l) {
        Some(rs) => Ok((&T::of(s)?[l.start_offset()..], rs)),
        None => candle_core::bail!("fused-attention: rows must be contiguous"),
    }
}

/// Runs the forward on (q, k, v), or the backward on (∂out, q, [k; v]).
fn run<T: Num>(
    (a, b, c): (Input, Input, Input),
    dims: Dims,
    scale: f64,
    back: bool,
) -> Result<CpuStorage> {
    if !back {
        let ((q, qs), (k, ks), (v, vs)) = (rows::<T>(a)?, rows::<T>(b)?, rows::<T>(c)?);
        let dims = Dims {
            rs: [qs, ks, vs],
            ..dims
        };
        dims.check_extent(q.len(), k.len(), v.len())?;
        return Ok(T::wrap(forward(q, k, v, dims, scale)));
    }
    let (a, b, c) = (
        slice::<T>(a.0, a.1)?,
        slice::<T>(b.0, b.1)?,
        slice::<T>(c.0, c.1)?,
    );
    let (k, v) = c.split_at(c.len() / 2);
    Ok(T::wrap(backward(b, k, v, a, dims, scale)))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2, l3)?;
        let out = by_float!(
            s1,
            run(((s1, l1), (s2, l2), (s3, l3)), dims, self.scale, false)
        );
        Ok((out, Shape::from((dims.b, dims.nq, dims.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(q.dims(), k.dims(), v.dims(), self.heads)?;
        // Four inputs: k and v travel stacked ([2, B, Nk, D]), a copy of two small tensors.
        let kv = Tensor::stack(&[k, v], 0)?;
        let back = AttentionBack {
            dims,
            scale: self.scale,
        };
        let packed = g.contiguous()?.apply_op3_no_bwd(q, &kv, &back)?;
        let (b, nq, nk) = (dims.b, dims.nq, dims.nk);
        let part = |start: usize, n: usize| -> Result<Tensor> {
            packed.narrow(0, start, b * n)?.reshape((b, n, dims.d))
        };
        let (dq, dk, dv) = (part(0, nq)?, part(b * nq, nk)?, part(b * (nq + nk), nk)?);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Attention's backward from (∂out, q, [k; v]).
struct AttentionBack {
    dims: Dims,
    scale: f64,
}

impl CustomOp3 for AttentionBack {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { b, nq, nk, d, .. } = self.dims;
        let kv = [2, b, nk, d];
        if l1.dims() != [b, nq, d] || l2.dims() != [b, nq, d] || l3.dims() != kv {
            candle_core::bail!("fused-attention-backward: shapes differ from the forward's");
        }
        let out = by_float!(
            s1,
            run(((s1, l1), (s2, l2), (s3, l3)), self.dims, self.scale, true)
        );
        Ok((out, Shape::from((b * nq + 2 * b * nk, d))))
    }
}
