//! Fused CPU ops with their own backward, for learning: LayerNorm, softmax over the last
//! dimension, and a linear layer's epilogues (bias + quick_gelu, bias + residual); the linear
//! product itself is in [`linear`] and multi-head attention in [`attention`]. Built from
//! primitive candle ops, each of these is 3–10 passes over memory forward and more backward,
//! each pass allocating; here each direction is one pass, and the bias and LayerNorm-affine
//! gradients are column sums in the same pass. f32 and f64 (the gradient checks run in f64),
//! arithmetic in the tensor's dtype. The tests compare values and gradients with the primitive
//! ops; the tower's gradient tests check the whole against finite differences and PyTorch.

use crate::config::Activation;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
};
use num_traits::Float;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows handed to one rayon task at least: keeps task overhead small for short rows.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// True when the ops may run: CPU tensors of one dtype, f32 or f64.
pub fn usable(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// An activation the fused epilogue differentiates: none, or quick_gelu (erf's GELU stays on
/// the primitive path, whose erf is exact to f64).
pub fn has_grad_epilogue(act: Option<Activation>) -> bool {
    matches!(act, None | Some(Activation::QuickGelu))
}

pub(super) trait Num:
    Float + Send + Sync + std::iter::Sum + std::ops::AddAssign + 'static
{
    fn of(s: &CpuStorage) -> Result<&[Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn c(x: f64) -> Self {
        Self::from(x).expect("a float constant")
    }
    /// v ← exp(v): vectorised for f32, std for f64 (kept exact for the 1e-10 checks).
    fn exp_in_place(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp());
    }
    /// Runs `f` on this thread's scratch buffer of this type, at least `len` long; the buffer
    /// is kept for the next call, so large scratch space is not page-faulted in every time.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// `f` on the first `len` elements of `buf`, grown to `len` first when shorter. The buffer is
/// taken out while `f` runs, so that a call nested on the same thread (a rayon worker can pick
/// up another task while it waits) gets a buffer of its own instead of a borrow panic.
fn on_scratch<T: Num, R>(buf: &RefCell<Vec<T>>, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let mut v = buf.take();
    if v.len() < len {
        v.resize(len, T::zero());
    }
    let r = f(&mut v[..len]);
    buf.replace(v);
    r
}

impl Num for f32 {
    fn of(s: &CpuStorage) -> Result<&[Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("fused op: mixed dtypes"),
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn exp_in_place(v: &mut [Self]) {
        super::fast_math::exp_in_place(v)
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        SCRATCH_F32.with(|b| on_scratch(b, len, f))
    }
}

impl Num for f64 {
    fn of(s: &CpuStorage) -> Result<&[Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("fused op: mixed dtypes"),
        }
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
        SCRATCH_F64.with(|b| on_scratch(b, len, f))
    }
}

/// Calls `$f::<T>(args)` with T the float type of storage `$s`.
macro_rules! by_float {
    ($s:expr, $f:ident($($arg:expr),*)) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*)?,
            CpuStorage::F64(_) => $f::<f64>($($arg),*)?,
            other => candle_core::bail!("fused op takes f32 or f64, not {:?}", other.dtype()),
        }
    };
}

pub mod attention;
mod linear;

pub use linear::{backward_with_weight_sink, matmul_wt, matmul_wt_bias, WeightGradSink};

/// The contiguous data of `s` under layout `l`.
fn slice<'a, T: Num>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::of(s)?[a..b]),
        None => candle_core::bail!("fused op: input must be contiguous"),
    }
}

/// The last dimension of `l`, checked against a vector of `n`.
fn row_len(l: &Layout, n: usize) -> Result<usize> {
    let last = l.dims().last().copied().unwrap_or(0);
    if last != n || n == 0 {
        candle_core::bail!("fused op: last dimension {last} does not match a vector of {n}");
    }
    Ok(n)
}

fn rows_per_task(n: usize) -> usize {
    MIN_ELEMS_PER_TASK.div_ceil(n.max(1))
}

/// Fills `out` (rows of `n`) with `f(row index, row)`, in parallel over row groups.
fn map_rows<T: Num>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let per = rows_per_task(n);
    out.par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(n).enumerate() {
                f(c * per + r, row)
            }
        });
}

/// Like [`map_rows`] over the first `m` rows of `out`; `f` also adds into `extra` column sums
/// (`extra` rows of `n`), which land in the `extra` rows after the first `m`.
fn map_rows_summing<T: Num>(
    out: &mut [T],
    m: usize,
    n: usize,
    extra: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    let per = rows_per_task(n);
    let (rows, sums) = out.split_at_mut(m * n);
    let total = rows
        .par_chunks_mut(per * n)
        .enumerate()
        .map(|(c, chunk)| {
            let mut acc = vec![T::zero(); extra * n];
            for (r, row) in chunk.chunks_exact_mut(n).enumerate() {
                f(c * per + r, row, &mut acc)
            }
            acc
        })
        .reduce(
            || vec![T::zero(); extra * n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += *b);
                a
            },
        );
    sums.copy_from_slice(&total);
}

/// The mean and 1/√(var + eps) of a row, variance from centred values (two passes).
fn moments<T: Num>(x: &[T], eps: T) -> (T, T) {
    let n = T::c(x.len() as f64);
    let mean = x.iter().copied().sum::<T>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    (mean, (var + eps).sqrt().recip())
}

/// LayerNorm over the last dimension with weight and bias: y = (x − μ)/σ · w + b.
pub struct LayerNorm {
    pub eps: f64,
}

fn layer_norm_fwd<T: Num>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    eps: f64,
) -> Result<CpuStorage> {
    let (x, w, b) = (
        slice::<T>(x.0, x.1)?,
        slice::<T>(w.0, w.1)?,
        slice::<T>(b.0, b.1)?,
    );
    let n = w.len();
    if b.len() != n || x.len() % n.max(1) != 0 || n == 0 {
        candle_core::bail!("fused-layer-norm: weight {n}, bias {} over rows", b.len());
    }
    let mut out = vec![T::zero(); x.len()];
    map_rows(&mut out, n, |r, y| {
        let x = &x[r * n..(r + 1) * n];
        let (mean, inv) = moments(x, T::c(eps));
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * inv * w + b;
        }
    });
    Ok(T::wrap(out))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
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
        row_len(l1, l2.shape().elem_count())?;
        let out = by_float!(s1, layer_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.eps));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let m = x.elem_count() / n;
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBack { eps: self.eps })?;
        let dx = packed.narrow(0, 0, m)?.reshape(x.shape())?;
        // Copied out: a view would keep the whole buffer alive for as long as the parameter's
        // gradient is kept (to the end of the backward pass, for a variable).
        let dw = packed.narrow(0, m, 1)?.reshape(n)?.force_contiguous()?;
        let db = packed.narrow(0, m + 1, 1)?.reshape(n)?.force_contiguous()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm's backward from (x, w, ∂y): `[m + 2, n]` rows ∂x, then ∂w, then ∂b.
struct LayerNormBack {
    eps: f64,
}

fn layer_norm_bwd<T: Num>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
    eps: f64,
) -> Result<CpuStorage> {
    let (x, w, g) = (
        slice::<T>(x.0, x.1)?,
        slice::<T>(w.0, w.1)?,
        slice::<T>(g.0, g.1)?,
    );
    let n = w.len();
    let m = x.len() / n;
    let mut out = vec![T::zero(); (m + 2) * n];
    let nf = T::c(n as f64);
    map_rows_summing(&mut out, m, n, 2, |r, dx, acc| {
        let (x, g) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let (mean, inv) = moments(x, T::c(eps));
        let (mut a, mut c) = (T::zero(), T::zero());
        for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
            let xh = (x - mean) * inv;
            a += g * w;
            c += g * w * xh;
        }
        let (a, c) = (a / nf, c / nf);
        let (dw, db) = acc.split_at_mut(n);
        for (j, dx) in dx.iter_mut().enumerate() {
            let xh = (x[j] - mean) * inv;
            *dx = inv * (g[j] * w[j] - a - xh * c);
            dw[j] += g[j] * xh;
            db[j] += g[j];
        }
    });
    Ok(T::wrap(out))
}

impl CustomOp3 for LayerNormBack {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
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
        let n = row_len(l1, l2.shape().elem_count())?;
        if l1.shape() != l3.shape() {
            candle_core::bail!("fused-layer-norm-backward: x and ∂y differ in shape");
        }
        let m = l1.shape().elem_count() / n;
        let out = by_float!(s1, layer_norm_bwd((s1, l1), (s2, l2), (s3, l3), self.eps));
        Ok((out, Shape::from((m + 2, n))))
    }
}

/// Softmax over the last dimension; rows of −∞ but one entry are fine (causal masks).
pub struct Softmax;

/// x ← softmax(x) over one row, shifted by the row's max so that exp cannot overflow; the
/// slice-level kernel of every CPU softmax here (inference, learning, attention).
pub(super) fn softmax_in_place<T: Num>(x: &mut [T]) {
    let max = x.iter().copied().fold(T::neg_infinity(), T::max);
    x.iter_mut().for_each(|v| *v = *v - max);
    T::exp_in_place(x);
    let inv = x.iter().copied().sum::<T>().recip();
    x.iter_mut().for_each(|v| *v = *v * inv);
}

fn softmax_fwd<T: Num>(s: &CpuStorage, l: &Layout, n: usize) -> Result<CpuStorage> {
    let x = slice::<T>(s, l)?;
    let mut out = vec![T::zero(); x.len()];
    map_rows(&mut out, n, |r, y| {
        y.copy_from_slice(&x[r * n..(r + 1) * n]);
        softmax_in_place(y);
    });
    Ok(T::wrap(out))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(0);
        if n == 0 {
            candle_core::bail!("fused-softmax: empty last dimension");
        }
        Ok((by_float!(s, softmax_fwd(s, l, n)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBack)?))
    }
}

/// Softmax's backward from (y, ∂y): ∂x = y ⊙ (∂y − ⟨∂y, y⟩) per row.
struct SoftmaxBack;

fn softmax_bwd<T: Num>(
    y: (&CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
    n: usize,
) -> Result<CpuStorage> {
    let (y, g) = (slice::<T>(y.0, y.1)?, slice::<T>(g.0, g.1)?);
    let mut out = vec![T::zero(); y.len()];
    map_rows(&mut out, n, |r, dx| {
        let (y, g) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let dot = y.iter().zip(g).map(|(&y, &g)| y * g).sum::<T>();
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *dx = y * (g - dot);
        }
    });
    Ok(T::wrap(out))
}

impl CustomOp2 for SoftmaxBack {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused-softmax-backward: y and ∂y differ in shape");
        }
        let n = l1.dims().last().copied().unwrap_or(0);
        Ok((
            by_float!(s1, softmax_bwd((s1, l1), (s2, l2), n)),
            l1.shape().clone(),
        ))
    }
}

const QUICK_GELU_K: f64 = 1.702;

/// e[j] ← exp(−1.702·(y[j] + b[j])), the input to σ in quick_gelu.
fn quick_gelu_exp<T: Num>(e: &mut [T], y: &[T], b: &[T]) {
    let k = T::c(QUICK_GELU_K);
    for ((e, &y), &b) in e.iter_mut().zip(y).zip(b) {
        *e = -k * (y + b);
    }
    T::exp_in_place(e);
}

/// act(y + b) over the last dimension: the epilogue of fc1 (quick_gelu) and of the q/k/v
/// projections (no activation).
pub struct BiasAct(pub Option<Activation>);

impl BiasAct {
    fn gelu(&self) -> bool {
        self.0.is_some()
    }
}

fn bias_act_fwd<T: Num>(
    y: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    gelu: bool,
) -> Result<CpuStorage> {
    let (y, b) = (slice::<T>(y.0, y.1)?, slice::<T>(b.0, b.1)?);
    let n = b.len();
    let mut out = vec![T::zero(); y.len()];
    map_rows(&mut out, n, |r, o| {
        let y = &y[r * n..(r + 1) * n];
        if !gelu {
            o.iter_mut()
                .zip(y)
                .zip(b)
                .for_each(|((o, &y), &b)| *o = y + b);
            return;
        }
        // quick_gelu(v) = v·σ(1.702v), σ(1.702v) = 1 / (1 + e).
        quick_gelu_exp(o, y, b);
        for ((o, &y), &b) in o.iter_mut().zip(y).zip(b) {
            *o = (y + b) / (T::one() + *o);
        }
    });
    Ok(T::wrap(out))
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "fused-bias-act-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !has_grad_epilogue(self.0) {
            candle_core::bail!("fused-bias-act: no fused gradient for {:?}", self.0);
        }
        row_len(l1, l2.shape().elem_count())?;
        let out = by_float!(s1, bias_act_fwd((s1, l1), (s2, l2), self.gelu()));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let m = y.elem_count() / n;
        let packed = y.apply_op3_no_bwd(b, &g.contiguous()?, &BiasActBack(self.gelu()))?;
        let dy = packed.narrow(0, 0, m)?.reshape(y.shape())?;
        // Copied out, as LayerNorm's parameter gradients are.
        let db = packed.narrow(0, m, 1)?.reshape(n)?.force_contiguous()?;
        Ok((Some(dy), Some(db)))
    }
}

/// BiasAct's backward from (y, b, ∂out): `[m + 1, n]` rows ∂y, then ∂b.
struct BiasActBack(bool);

fn bias_act_bwd<T: Num>(
    y: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
    gelu: bool,
) -> Result<CpuStorage> {
    let (y, b, g) = (
        slice::<T>(y.0, y.1)?,
        slice::<T>(b.0, b.1)?,
        slice::<T>(g.0, g.1)?,
    );
    let n = b.len();
    let m = y.len() / n;
    let mut out = vec![T::zero(); (m + 1) * n];
    let k = T::c(QUICK_GELU_K);
    map_rows_summing(&mut out, m, n, 1, |r, dy, db| {
        let (y, g) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        if gelu {
            // quick_gelu'(v) = σ + 1.702·v·σ·(1 − σ), σ = 1 / (1 + e).
            quick_gelu_exp(dy, y, b);
            for j in 0..n {
                let (v, s) = (y[j] + b[j], (T::one() + dy[j]).recip());
                dy[j] = g[j] * (s + k * v * s * (T::one() - s));
            }
        } else {
            dy.copy_from_slice(g);
        }
        dy.iter().zip(db.iter_mut()).for_each(|(&d, db)| *db += d);
    });
    Ok(T::wrap(out))
}

impl CustomOp3 for BiasActBack {
    fn name(&self) -> &'static str {
        "fused-bias-act-backward"
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
        let n = row_len(l1, l2.shape().elem_count())?;
        if l1.shape() != l3.shape() {
            candle_core::bail!("fused-bias-act-backward: y and ∂out differ in shape");
        }
        let m = l1.shape().elem_count() / n;
        let out = by_float!(s1, bias_act_bwd((s1, l1), (s2, l2), (s3, l3), self.0));
        Ok((out, Shape::from((m + 1, n))))
    }
}

/// y + b + r: the epilogue of the attention output projection and of fc2, with the residual.
pub struct BiasResidual;

fn bias_residual_fwd<T: Num>(
    y: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    r: (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let (y, b, r) = (
        slice::<T>(y.0, y.1)?,
        slice::<T>(b.0, b.1)?,
        slice::<T>(r.0, r.1)?,
    );
    let n = b.len();
    let mut out = vec![T::zero(); y.len()];
    map_rows(&mut out, n, |i, o| {
        let rows = i * n..(i + 1) * n;
        for (((o, &y), &b), &r) in o.iter_mut().zip(&y[rows.clone()]).zip(b).zip(&r[rows]) {
            *o = y + b + r;
        }
    });
    Ok(T::wrap(out))
}

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "fused-bias-residual-grad"
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
        row_len(l1, l2.shape().elem_count())?;
        if l1.shape() != l3.shape() {
            candle_core::bail!(
                "fused-bias-residual: output {:?} and residual {:?} differ",
                l1.shape(),
                l3.shape()
            );
        }
        let out = by_float!(s1, bias_residual_fwd((s1, l1), (s2, l2), (s3, l3)));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _r: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum(b.elem_count()))?;
        Ok((Some(g.clone()), Some(db), Some(g)))
    }
}

/// Σ over rows of `[m, n]` (the leading dimensions flattened): `[n]`.
struct ColumnSum(usize);

fn column_sum<T: Num>(s: &CpuStorage, l: &Layout, n: usize) -> Result<CpuStorage> {
    let g = slice::<T>(s, l)?;
    let per = rows_per_task(n) * n;
    let sum = g
        .par_chunks(per)
        .map(|chunk| {
            let mut acc = vec![T::zero(); n];
            for row in chunk.chunks_exact(n) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            acc
        })
        .reduce(
            || vec![T::zero(); n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += *b);
                a
            },
        );
    Ok(T::wrap(sum))
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = row_len(l, self.0)?;
        Ok((by_float!(s, column_sum(s, l, n)), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    //! Each op's value and gradients against the primitive ops it replaces, in f64 (to 1e-10)
    //! and f32, through a loss Σ out ⊙ R with a fixed R.
    use super::super::ops::{activate, causal_mask, layer_norm_ops, repeat_rows, softmax_ops};
    use super::*;
    use candle_core::{Device, Var};

    type Op<'a> = dyn Fn(&[Tensor]) -> crate::Result<Tensor> + 'a;

    fn rand(shape: &[usize], mean: f64, seed: u64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| mean + ((i as f64 + 1.0) * (0.7 + seed as f64)).sin())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The value of `f` and the gradient of Σ f ⊙ R with respect to each input.
    fn value_and_grads(inputs: &[Tensor], f: &Op) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        assert!(out.track_op());
        let r = rand(out.dims(), 0.0, 99, out.dtype());
        let grads = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (out, g)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.to_dtype(DType::F64)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Fused and primitive agree on the value and every gradient, within `tol`.
    fn check(inputs: &[Tensor], fused: &Op, plain: &Op, tol: f64) {
        let (a, ga) = value_and_grads(inputs, fused);
        let (b, gb) = value_and_grads(inputs, plain);
        assert!(max_diff(&a, &b) < tol, "value: {}", max_diff(&a, &b));
        for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
            assert!(max_diff(x, y) < tol, "gradient {i}: {}", max_diff(x, y));
        }
    }

    const CASES: [(DType, f64); 2] = [(DType::F64, 1e-10), (DType::F32, 2e-4)];
    /// 5·7 rows, and 700 rows that span several rayon tasks (column sums merge across tasks).
    const ROWS: [[usize; 2]; 2] = [[5, 7], [700, 1]];

    #[test]
    fn layer_norm_matches_primitive_ops() {
        for (dt, tol) in CASES {
            for [a, b] in ROWS {
                let x = rand(&[a, b, 48], 30.0, 1, dt);
                let (w, b) = (rand(&[48], 1.0, 2, dt), rand(&[48], 0.0, 3, dt));
                check(
                    &[x, w, b],
                    &|t| Ok(t[0].apply_op3(&t[1], &t[2], LayerNorm { eps: 1e-5 })?),
                    &|t| layer_norm_ops(&t[0], &t[1], &t[2], 1e-5),
                    tol,
                );
            }
        }
    }

    /// Whether `t`'s storage holds `t`'s elements and nothing more.
    fn owns_its_storage(t: &Tensor) -> bool {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>().unwrap().len() == t.elem_count(),
            _ => unreachable!("CPU tensors only"),
        }
    }

    /// A variable's gradient stays in the store to the end of the backward pass (the vendored
    /// candle-core stores a first gradient as it is): a view into the op's packed [rows + 2, n]
    /// result would keep all of it alive that long (0.46 GB by the end of a ViT-B/32 step at
    /// batch 32).
    #[test]
    fn parameter_gradients_own_their_storage() {
        let dt = DType::F32;
        let x = rand(&[70, 48], 30.0, 1, dt);
        let (w, b) = (rand(&[48], 1.0, 2, dt), rand(&[48], 0.0, 3, dt));
        let (_, g) = value_and_grads(&[x.clone(), w, b.clone()], &|t| {
            Ok(t[0].apply_op3(&t[1], &t[2], LayerNorm { eps: 1e-5 })?)
        });
        assert!(owns_its_storage(&g[1]) && owns_its_storage(&g[2]));
        let act = Some(Activation::QuickGelu);
        let (_, g) = value_and_grads(&[x, b], &|t| Ok(t[0].apply_op2(&t[1], BiasAct(act))?));
        assert!(owns_its_storage(&g[1]));
    }

    #[test]
    fn softmax_matches_primitive_ops_under_a_causal_mask() {
        for (dt, tol) in CASES {
            let mask = causal_mask(6, dt, &Device::Cpu).unwrap();
            let x = (rand(&[2, 3, 6, 6], 0.0, 4, dt) * 10.0).unwrap();
            check(
                &[x],
                &|t| Ok(t[0].broadcast_add(&mask)?.apply_op1(Softmax)?),
                &|t| softmax_ops(&t[0].broadcast_add(&mask)?),
                tol,
            );
        }
    }

    #[test]
    fn bias_and_quick_gelu_match_primitive_ops() {
        for (dt, tol) in CASES {
            for [a, b] in ROWS {
                let y = (rand(&[a, b, 40], 0.0, 5, dt) * 3.0).unwrap();
                let bias = rand(&[40], 0.0, 6, dt);
                for act in [None, Some(Activation::QuickGelu)] {
                    check(
                        &[y.clone(), bias.clone()],
                        &|t| Ok(t[0].apply_op2(&t[1], BiasAct(act))?),
                        &|t| {
                            let v = repeat_rows(&t[0], &t[1], false)?;
                            match act {
                                Some(a) => activate(&v, a),
                                None => Ok(v),
                            }
                        },
                        tol,
                    );
                }
            }
        }
    }

    #[test]
    fn bias_and_residual_match_primitive_ops() {
        for (dt, tol) in CASES {
            for [a, b] in ROWS {
                let y = rand(&[a, b, 40], 0.0, 7, dt);
                let r = rand(&[a, b, 40], 0.0, 8, dt);
                check(
                    &[y, rand(&[40], 0.0, 9, dt), r],
                    &|t| Ok(t[0].apply_op3(&t[1], &t[2], BiasResidual)?),
                    &|t| Ok((repeat_rows(&t[0], &t[1], false)? + &t[2])?),
                    tol,
                );
            }
        }
    }

    #[test]
    fn matmul_wt_matches_primitive_ops() {
        for (dt, tol) in CASES {
            // More inputs than outputs (W transposed by a copy) and fewer.
            for (inp, out) in [(24, 10), (10, 24)] {
                let x = rand(&[700, inp], 0.0, 10, dt);
                let w = rand(&[out, inp], 0.0, 11, dt);
                check(
                    &[x, w],
                    &|t| Ok(matmul_wt(&t[0], &t[1], None)?),
                    &|t| Ok(t[0].matmul(&t[1].t()?)?),
                    tol,
                );
            }
        }
    }

    #[test]
    fn matmul_wt_bias_matches_primitive_ops() {
        for (dt, tol) in CASES {
            // Through the transposed scratch (inputs >= 2 · outputs, 700 rows) and the view.
            for (inp, out) in [(24, 10), (10, 24)] {
                let x = rand(&[700, inp], 0.0, 17, dt);
                let w = rand(&[out, inp], 0.0, 18, dt);
                let b = rand(&[out], 0.5, 19, dt);
                check(
                    &[x, w, b],
                    &|t| Ok(matmul_wt_bias(&t[0], &t[1], &t[2], None)?),
                    &|t| Ok(t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2])?),
                    tol,
                );
            }
        }
    }

    /// `t` rounded to bf16 (nearest even) and widened back.
    fn bf16(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn autocast_products_are_f32_products_of_bf16_operands_on_every_kernel() {
        let kernels = crate::model::bf16_gemm::available();
        eprintln!("bf16 kernels on this CPU: {kernels:?}");
        // Padding in every dimension (rows, inputs, outputs), an odd number of inputs (a
        // pair half outside), and a transformer's shape.
        for (rows, inp, out) in [(700, 24, 10), (70, 100, 50), (33, 33, 17), (64, 96, 128)] {
            let x = rand(&[rows, inp], 0.0, 21, DType::F32);
            let w = rand(&[out, inp], 0.0, 22, DType::F32);
            let b = rand(&[out], 0.5, 23, DType::F32);
            // value_and_grads' upstream gradient.
            let r = rand(&[rows, out], 0.0, 99, DType::F32);
            let (rx, rw, rr) = (bf16(&x), bf16(&w), bf16(&r));
            let want = [
                rx.matmul(&rw.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap(),
                rr.matmul(&rw).unwrap(),
                rr.t().unwrap().matmul(&rx).unwrap(),
                r.sum(0).unwrap(),
            ];
            for &kernel in &kernels {
                let (y, g) = value_and_grads(&[x.clone(), w.clone(), b.clone()], &|t| {
                    Ok(matmul_wt_bias(&t[0], &t[1], &t[2], Some(kernel))?)
                });
                for (i, (got, want)) in [&y, &g[0], &g[1], &g[2]].into_iter().zip(&want).enumerate()
                {
                    let d = max_diff(got, want);
                    assert!(d < 1e-4, "{kernel:?} {rows}x{inp}x{out}, output {i}: {d}");
                }
                // Without the bias, from a constant input: no ∂x, the same ∂W.
                let wv = Var::from_tensor(&w).unwrap();
                let y = matmul_wt(&x, wv.as_tensor(), Some(kernel)).unwrap();
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(grads.get(&x).is_none());
                let d = max_diff(grads.get(wv.as_tensor()).unwrap(), &want[2]);
                assert!(d < 1e-4, "{kernel:?} {rows}x{inp}x{out}, ∂W alone: {d}");
                let d = max_diff(&y.broadcast_add(&b).unwrap(), &want[0]);
                assert!(d < 1e-4, "{kernel:?} {rows}x{inp}x{out}, value alone: {d}");
            }
        }
    }

    #[test]
    fn matmul_wt_skips_the_input_gradient_of_a_constant_input() {
        let x = rand(&[6, 5], 0.0, 12, DType::F64);
        let w = Var::from_tensor(&rand(&[4, 5], 0.0, 13, DType::F64)).unwrap();
        let y = matmul_wt(&x, w.as_tensor(), None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let want = Tensor::ones((6, 4), DType::F64, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap()
            .matmul(&x)
            .unwrap();
        assert!(max_diff(grads.get(w.as_tensor()).unwrap(), &want) < 1e-12);
    }

    #[test]
    fn scratch_nests_without_a_borrow_panic() {
        let sum = f32::with_scratch(4, |outer| {
            outer.fill(1.0);
            let inner = f32::with_scratch(3, |inner| {
                inner.fill(2.0);
                inner.iter().sum::<f32>()
            });
            inner + outer.iter().sum::<f32>()
        });
        assert_eq!(sum, 10.0);
    }

    /// Sums each weight's gradients, as candle's store would.
    struct Collect(std::collections::HashMap<candle_core::TensorId, Tensor>);

    impl WeightGradSink for Collect {
        fn take(&mut self, w: &Tensor, dw: Tensor) -> Result<Option<Tensor>> {
            let sum = match self.0.remove(&w.id()) {
                Some(prev) => (prev + dw)?,
                None => dw,
            };
            self.0.insert(w.id(), sum);
            Ok(None)
        }
    }

    #[test]
    fn weight_gradients_in_a_sink_match_the_store() {
        let x = Var::from_tensor(&rand(&[6, 5], 0.0, 14, DType::F64)).unwrap();
        let w = Var::from_tensor(&rand(&[4, 5], 0.0, 15, DType::F64)).unwrap();
        // W used twice: its contributions add up in the sink as they do in the store.
        let loss = || {
            let y = matmul_wt(x.as_tensor(), w.as_tensor(), None).unwrap();
            let c = rand(&[3, 6], 0.0, 16, DType::F64);
            let z = matmul_wt(&y.sqr().unwrap().t().unwrap(), &c, None).unwrap();
            let again = matmul_wt(x.as_tensor(), w.as_tensor(), None).unwrap();
            (z.sum_all().unwrap() + again.sum_all().unwrap()).unwrap()
        };
        let plain = loss().backward().unwrap();
        let sink = std::rc::Rc::new(std::cell::RefCell::new(Collect(Default::default())));
        let store = backward_with_weight_sink(&loss(), sink.clone()).unwrap();
        assert!(store.get(w.as_tensor()).is_none());
        let taken = &sink.borrow().0;
        assert_eq!(taken.len(), 1, "only the variable weight goes to the sink");
        let want = plain.get(w.as_tensor()).unwrap();
        assert!(max_diff(&taken[&w.id()], want) < 1e-12);
        let dx = (
            store.get(x.as_tensor()).unwrap(),
            plain.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(dx.0, dx.1) < 1e-12);
        // The sink is unset with the pass: the next plain backward stores W's gradient.
        assert!(loss().backward().unwrap().get(w.as_tensor()).is_some());
    }

    /// softmax(s·Q Kᵀ) V per head in primitive ops, the heads split and merged by copies.
    fn attention_ops(t: &[Tensor], heads: usize, scale: f64) -> crate::Result<Tensor> {
        let split = |x: &Tensor| -> crate::Result<Tensor> {
            let (b, n, d) = x.dims3()?;
            Ok(x.reshape((b, n, heads, d / heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(&(&t[0] * scale)?)?, split(&t[1])?, split(&t[2])?);
        let p = super::super::ops::softmax_ops(&q.matmul(&k.t()?)?)?;
        let ctx = p.matmul(&v)?.transpose(1, 2)?.contiguous()?;
        let (b, nq, _) = t[0].dims3()?;
        Ok(ctx.reshape((b, nq, ()))?)
    }

    #[test]
    fn attention_matches_primitive_ops() {
        for (dt, tol) in CASES {
            // Square, one query row (the image tower's last layer), and a B/32-like head.
            for (b, nq, nk, d, heads) in [(2, 5, 5, 12, 3), (3, 1, 7, 8, 2), (2, 50, 50, 128, 2)] {
                let q = rand(&[b, nq, d], 0.0, 21, dt);
                let (k, v) = (
                    rand(&[b, nk, d], 0.0, 22, dt),
                    rand(&[b, nk, d], 0.0, 23, dt),
                );
                let scale = 0.35;
                check(
                    &[q, k, v],
                    &|t| Ok(attention::attention(&t[0], &t[1], &t[2], heads, scale)?),
                    &|t| attention_ops(t, heads, scale),
                    tol,
                );
            }
        }
    }

    /// The AVX-512 head products and gemm give the same attention and gradients, at B/32's
    /// head (64 wide, 50 tokens), one query row, a width gemm keeps for P V (24) and B/16's 197
    /// tokens.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attention_on_the_head_kernels_matches_gemm() {
        use std::sync::atomic::Ordering;
        let kernels = &attention::HEAD_KERNELS;
        for (b, nq, nk, d, heads) in [
            (2, 50, 50, 128, 2),
            (3, 1, 50, 128, 2),
            (2, 9, 9, 48, 2),
            (1, 197, 197, 64, 1),
        ] {
            let q = rand(&[b, nq, d], 0.0, 31, DType::F32);
            let (k, v) = (
                rand(&[b, nk, d], 0.0, 32, DType::F32),
                rand(&[b, nk, d], 0.0, 33, DType::F32),
            );
            let run = |on: bool| {
                kernels.store(on, Ordering::Relaxed);
                let f = |t: &[Tensor]| Ok(attention::attention(&t[0], &t[1], &t[2], heads, 0.4)?);
                let r = value_and_grads(&[q.clone(), k.clone(), v.clone()], &f);
                kernels.store(true, Ordering::Relaxed);
                r
            };
            let ((a, ga), (g, gg)) = (run(true), run(false));
            assert!(max_diff(&a, &g) < 1e-5, "value: {}", max_diff(&a, &g));
            for (i, (x, y)) in ga.iter().zip(&gg).enumerate() {
                assert!(max_diff(x, y) < 1e-4, "gradient {i}: {}", max_diff(x, y));
            }
        }
    }

    #[test]
    fn attention_rejects_shapes_that_do_not_fit() {
        let t = |s: &[usize]| rand(s, 0.0, 1, DType::F32);
        let (q, k) = (t(&[2, 5, 12]), t(&[2, 7, 12]));
        assert!(attention::usable(&q, &k, &k, 3));
        assert!(!attention::usable(&q, &k, &k, 5));
        assert!(!attention::usable(&q, &t(&[2, 7, 8]), &t(&[2, 7, 8]), 2));
        assert!(!attention::usable(&q, &k, &t(&[2, 6, 12]), 3));
        assert!(attention::attention(&q, &k, &t(&[1, 7, 12]), 3, 1.0).is_err());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let y = rand(&[4, 8], 0.0, 1, DType::F32);
        let short = rand(&[7], 0.0, 2, DType::F32);
        assert!(y.apply_op2(&short, BiasAct(None)).is_err());
        assert!(y
            .apply_op2(&short, BiasAct(Some(Activation::Gelu)))
            .is_err());
        assert!(y
            .apply_op3(&rand(&[8], 0.0, 3, DType::F32), &short, BiasResidual)
            .is_err());
        assert!(y
            .apply_op3(&short, &short, LayerNorm { eps: 1e-5 })
            .is_err());
        let f64s = rand(&[8], 0.0, 4, DType::F64);
        assert!(y.apply_op3(&f64s, &f64s, LayerNorm { eps: 1e-5 }).is_err());
    }
}
