//! Fused CPU kernels for inference: LayerNorm, softmax over the last dimension, and the
//! epilogues of a linear layer (bias + activation, bias + residual). Each replaces several
//! candle ops (one pass over memory and one allocation instead of three to six) and records
//! no backward op, so `model.rs` calls them only when no input is part of an autograd graph
//! and the tensors live on the CPU (or, with the `cuda` feature, on a CUDA device: each op's
//! `cuda_fwd` launches its kernel from `kernels/fused.cu`, see `fused_cuda.rs`); everything else
//! takes the primitive-op path. The tests in `model.rs` compare every CPU kernel with that path;
//! `atlas-serve bench kernels --device cuda` compares the CUDA kernels with it on the GPU.

use super::fast_math::{exp_in_place, quick_gelu_in_place, quick_gelu_loop, with_scratch};
use super::fused_grad::softmax_in_place;
use crate::config::Activation;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2,
    InplaceOp3, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
#[path = "fused_cuda.rs"]
mod cuda;

/// Rows handed to one rayon task at least: keeps task overhead small for short rows.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// True when the fused kernels may run: f32/f16/bf16 tensors on the CPU (or, with the `cuda`
/// feature, on a CUDA device), none of them recorded in a graph (f64 stays on the primitive
/// path, which the gradient checks use as their reference).
pub fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        has_kernels(t.device())
            && !t.track_op()
            && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
    })
}

/// Whether the fused ops have a kernel for tensors on `d`.
pub fn has_kernels(d: &candle_core::Device) -> bool {
    d.is_cpu() || (cfg!(feature = "cuda") && d.is_cuda() && crate::cuda_kernels_on())
}

/// An element type the kernels read and write; arithmetic is always f32.
pub(super) trait Elem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
    /// The values themselves when they are f32, for kernels with an f32 path of their own.
    fn f32s(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
    fn f32s(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
    fn f32s_mut(v: &mut [f32]) -> Option<&mut [f32]> {
        Some(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The contiguous data of `s` under layout `l`, or an error naming the op.
fn slice<'a, T>(s: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Applies `f(src_row, dst_row)` to every row of length `n`, in parallel over row groups.
fn rows<T: Elem>(src: &[T], n: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let mut dst = vec![T::put(0.0); src.len()];
    let per_task = n * MIN_ELEMS_PER_TASK.div_ceil(n.max(1));
    src.par_chunks(per_task)
        .zip(dst.par_chunks_mut(per_task))
        .for_each(|(s, d)| {
            for (s, d) in s.chunks_exact(n).zip(d.chunks_exact_mut(n)) {
                f(s, d)
            }
        });
    dst
}

/// Applies `f(row)` to every row of length `n` of `dst` in place, in parallel over row groups.
fn rows_in_place<T: Elem>(dst: &mut [T], n: usize, f: impl Fn(&mut [T]) + Sync) {
    let per_task = n * MIN_ELEMS_PER_TASK.div_ceil(n.max(1));
    dst.par_chunks_mut(per_task)
        .for_each(|d| d.chunks_exact_mut(n).for_each(&f));
}

/// The contiguous data of `s` under layout `l`, writable, or an error naming the op.
fn slice_mut<'a, T>(s: &'a mut [T], l: &Layout, op: &str) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs a generic in-place kernel on the float storage it is given.
macro_rules! by_dtype_mut {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F16($v) => $body,
            CpuStorage::BF16($v) => $body,
            other => candle_core::bail!(
                "fused kernels take f32, f16 or bf16, not {:?}",
                other.dtype()
            ),
        }
    };
}

/// Dispatches a generic kernel over the float storages of the same dtype.
macro_rules! by_dtype {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F16($v) => CpuStorage::F16($body),
            CpuStorage::BF16($v) => CpuStorage::BF16($body),
            other => candle_core::bail!(
                "fused kernels take f32, f16 or bf16, not {:?}",
                other.dtype()
            ),
        }
    };
}

/// An in-place kernel `f` run on a contiguous copy of y: the out-of-place form of an op.
fn on_a_copy(
    y: &CpuStorage,
    l: &Layout,
    op: &str,
    f: impl FnOnce(&mut CpuStorage, &Layout) -> Result<()>,
) -> Result<(CpuStorage, Shape)> {
    let mut out = by_dtype!(y, |v| slice(v, l, op)?.to_vec());
    f(&mut out, &Layout::contiguous(l.shape()))?;
    Ok((out, l.shape().clone()))
}

/// The same-dtype slice of `s`, or an error.
trait Same: Sized {
    fn of(s: &CpuStorage) -> Result<&[Self]>;
}

macro_rules! same {
    ($t:ty, $v:ident) => {
        impl Same for $t {
            fn of(s: &CpuStorage) -> Result<&[Self]> {
                match s {
                    CpuStorage::$v(v) => Ok(v),
                    _ => candle_core::bail!("fused kernel: mixed dtypes"),
                }
            }
        }
    };
}
same!(f32, F32);
same!(f16, F16);
same!(bf16, BF16);

/// LayerNorm over the last dimension: two passes over each row in f32 (mean, then variance of
/// the centred values, as the primitive path does), so large means lose no precision.
pub struct LayerNorm {
    pub eps: f32,
}

/// Σ f(v) over s in 16 interleaved partial sums: a single running sum is one dependent add
/// per element and does not vectorise (it made LayerNorm 9 % of a bf16 B/32 layer).
#[inline(always)]
fn lane_sum<T: Elem>(s: &[T], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = s.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|v| f(v.get())).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(v.get());
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// d ← LayerNorm(s) with weight w and bias b, arithmetic in f32: one row of the fused op, and
/// the row transform the packed bf16 matmul applies while rounding its input
/// (`bf16_gemm::PackedWeight::round_with`).
#[inline(always)]
pub(super) fn layer_norm_row<T: Elem>(s: &[T], w: &[T], b: &[T], eps: f32, d: &mut [T]) {
    let n = s.len();
    let mean = lane_sum(s, |v| v) / n as f32;
    let var = lane_sum(s, |v| (v - mean) * (v - mean)) / n as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for (((d, s), w), b) in d.iter_mut().zip(s).zip(w).zip(b) {
        *d = T::put((s.get() - mean) * inv * w.get() + b.get());
    }
}

fn layer_norm_rows<T: Elem + Same>(x: &[T], w: &[T], b: &[T], eps: f32) -> Vec<T> {
    rows(x, w.len(), |s, d| layer_norm_row(s, w, b, eps, d))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let out = by_dtype!(s1, |x| {
            let x = slice(x, l1, self.name())?;
            let w = slice(Same::of(s2)?, l2, self.name())?;
            let b = slice(Same::of(s3)?, l3, self.name())?;
            check_last_dim(l1, w.len(), self.name())?;
            layer_norm_rows(x, w, b, self.eps)
        });
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::layer_norm(self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

fn check_last_dim(l: &Layout, n: usize, op: &str) -> Result<()> {
    let last = l.dims().last().copied().unwrap_or(0);
    if last != n || n == 0 {
        candle_core::bail!("{op}: last dimension {last} does not match a vector of {n}");
    }
    Ok(())
}

/// Softmax over the last dimension, in f32.
pub struct Softmax;

fn softmax_rows<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    rows(x, n, |s, d| {
        with_scratch(n, |e| {
            for (e, s) in e.iter_mut().zip(s) {
                *e = s.get();
            }
            softmax_in_place(e);
            for (d, &e) in d.iter_mut().zip(e.iter()) {
                *d = T::put(e);
            }
        })
    })
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(0);
        if n == 0 {
            candle_core::bail!("fused-softmax: empty last dimension");
        }
        let out = by_dtype!(s, |x| softmax_rows(slice(x, l, self.name())?, n));
        Ok((out, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax(s, l)
    }
}

/// The epilogue ops' names, for errors.
const BIAS_ACT: &str = "fused-bias-act";
const BIAS_RESIDUAL: &str = "fused-bias-residual";

/// y + b, then the activation when there is one: the epilogue of fc1 (and of a linear layer
/// with a bias and no activation).
pub struct BiasAct(pub Option<Activation>);

#[inline(always)]
fn act(v: f32, a: Option<Activation>) -> f32 {
    match a {
        None => v,
        // x·σ(1.702x), as transformers' quick_gelu.
        Some(Activation::QuickGelu) => v / (1.0 + (-1.702 * v).exp()),
        Some(Activation::Gelu) => 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2)),
    }
}

/// v ← act(v) over f32 values: the epilogue of the packed bf16 matmul (`bf16_gemm`), applied to
/// a block while it is in cache. Inlined, so that it vectorises for the caller's features.
#[inline(always)]
pub(super) fn activate_in_place(v: &mut [f32], a: Option<Activation>) {
    match a {
        None => {}
        Some(Activation::QuickGelu) => quick_gelu_loop(v),
        Some(_) => v.iter_mut().for_each(|x| *x = act(*x, a)),
    }
}

/// The standard library has no erf; Abramowitz–Stegun 7.1.26 is accurate to 1.5e-7 (absolute),
/// about f32 resolution.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t
            * (-x * x).exp();
    y.copysign(x)
}

/// y ← act(y + b) over each row of y (b.len() values).
fn bias_act_in_place<T: Elem>(y: &mut [T], b: &[T], a: Option<Activation>) {
    if a == Some(Activation::QuickGelu) {
        return bias_quick_gelu_in_place(y, b);
    }
    rows_in_place(y, b.len(), |d| {
        for (d, b) in d.iter_mut().zip(b) {
            *d = T::put(act(d.get() + b.get(), a));
        }
    })
}

/// act(y + b) for quick_gelu, (y + b)·σ(1.702(y + b)): f32 in one pass over each row
/// (`quick_gelu_in_place`), f16 and bf16 through f32 scratch with the vectorised exp.
fn bias_quick_gelu_in_place<T: Elem>(y: &mut [T], b: &[T]) {
    let n = b.len();
    if let (Some(y), Some(b)) = (T::f32s_mut(y), T::f32s(b)) {
        return rows_in_place(y, n, |d| {
            d.iter_mut().zip(b).for_each(|(d, b)| *d += b);
            quick_gelu_in_place(d);
        });
    }
    rows_in_place(y, n, |d| {
        with_scratch(2 * n, |buf| {
            let (v, e) = buf.split_at_mut(n);
            for (((v, e), d), b) in v.iter_mut().zip(e.iter_mut()).zip(d.iter()).zip(b) {
                *v = d.get() + b.get();
                *e = -1.702 * *v;
            }
            exp_in_place(e);
            for ((d, v), e) in d.iter_mut().zip(v.iter()).zip(e.iter()) {
                *d = T::put(v / (1.0 + e));
            }
        })
    })
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        BIAS_ACT
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        by_dtype_mut!(s1, |y| {
            let y = slice_mut(y, l1, BIAS_ACT)?;
            let b = slice(Same::of(s2)?, l2, BIAS_ACT)?;
            check_last_dim(l1, b.len(), BIAS_ACT)?;
            bias_act_in_place(y, b, self.0);
        });
        Ok(())
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        BIAS_ACT
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_a_copy(s1, l1, BIAS_ACT, |y, l| {
            InplaceOp2::cpu_fwd(self, y, l, s2, l2)
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bias_act(self.0, (s1, l1), (s2, l2))
    }
}

/// act(y + b) for a product y that nothing else holds: written over y on the CPU (no new
/// buffer to allocate and zero), into a new tensor elsewhere. Every tensor sharing y's storage
/// sees the change (a clone, or `to_dtype` at y's own dtype), hence "nothing else holds".
pub(super) fn bias_act(y: Tensor, b: &Tensor, a: Option<Activation>) -> Result<Tensor> {
    if !y.device().is_cpu() {
        return y.apply_op2_no_bwd(b, &BiasAct(a));
    }
    y.inplace_op2(b, &BiasAct(a))?;
    Ok(y)
}

/// y + b + r for a product y that nothing else holds, as [`bias_act`].
pub(super) fn bias_residual(y: Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor> {
    if !y.device().is_cpu() {
        return y.apply_op3_no_bwd(b, r, &BiasResidual);
    }
    y.inplace_op3(b, r, &BiasResidual)?;
    Ok(y)
}

/// y + b + r: the epilogue of the attention output projection and of fc2, with the residual.
pub struct BiasResidual;

/// y ← y + b + r, row by row (b.len() values per row; r is shaped as y).
fn bias_residual_in_place<T: Elem>(y: &mut [T], b: &[T], r: &[T]) {
    let n = b.len();
    let per_task = n * MIN_ELEMS_PER_TASK.div_ceil(n);
    y.par_chunks_mut(per_task)
        .zip(r.par_chunks(per_task))
        .for_each(|(y, r)| {
            for (y, r) in y.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                for ((y, b), r) in y.iter_mut().zip(b).zip(r) {
                    *y = T::put(y.get() + b.get() + r.get());
                }
            }
        });
}

impl InplaceOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        BIAS_RESIDUAL
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        if l1.shape() != l3.shape() {
            candle_core::bail!(
                "fused-bias-residual: output {:?} and residual {:?} differ",
                l1.shape(),
                l3.shape()
            );
        }
        by_dtype_mut!(s1, |y| {
            let y = slice_mut(y, l1, BIAS_RESIDUAL)?;
            let b = slice(Same::of(s2)?, l2, BIAS_RESIDUAL)?;
            let r = slice(Same::of(s3)?, l3, BIAS_RESIDUAL)?;
            check_last_dim(l1, b.len(), BIAS_RESIDUAL)?;
            bias_residual_in_place(y, b, r);
        });
        Ok(())
    }
}

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        BIAS_RESIDUAL
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
        on_a_copy(s1, l1, BIAS_RESIDUAL, |y, l| {
            InplaceOp3::cpu_fwd(self, y, l, s2, l2, s3, l3)
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bias_residual((s1, l1), (s2, l2), (s3, l3))
    }
}
