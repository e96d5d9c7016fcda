//! The CUDA side of the fused inference ops (`kernels/fused.cu`): one launch each, inputs in
//! the tensor's dtype, f32 arithmetic. LayerNorm and softmax give each row one warp; the
//! epilogues are elementwise over the whole tensor.

use super::check_last_dim;
use crate::config::Activation;
use crate::cuda_kernels::{grid, view, FUSED};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

const MODULE: &str = "atlas_fused";

/// Blocks of a launch that is not grid-stride: as many as the work needs.
const NO_CAP: u32 = i32::MAX as u32;

/// Calls `$f::<T>(kernel name, args..)` for the storage's dtype (`$base` + `_f32` etc.).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident, $base:literal, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>(concat!($base, "_f32"), $($arg),*),
            DType::F16 => $f::<f16>(concat!($base, "_f16"), $($arg),*),
            DType::BF16 => $f::<bf16>(concat!($base, "_bf16"), $($arg),*),
            d => candle_core::bail!("fused kernels take f32, f16 or bf16, not {d:?}"),
        }
    };
}

/// Rows of length `n` in a tensor of layout `l`.
fn rows(l: &Layout, n: usize) -> usize {
    l.shape().elem_count() / n
}

pub fn layer_norm(
    eps: f32,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let n = l2.shape().elem_count();
    check_last_dim(l1, n, "fused-layer-norm")?;
    let out = by_dtype!(
        s1.dtype(),
        layer_norm_t,
        "layer_norm",
        (s1, l1),
        (s2, l2),
        (s3, l3),
        n,
        eps
    )?;
    Ok((out, l1.shape().clone()))
}

fn layer_norm_t<T: CudaDType + DeviceRepr>(
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    n: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let op = "fused-layer-norm";
    let (x, w, b) = (
        view::<T>(s1, l1, op)?,
        view::<T>(s2, l2, op)?,
        view::<T>(s3, l3, op)?,
    );
    let dev = &s1.device;
    let r = rows(l1, n);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(r * n)? };
    let func = dev.get_or_load_custom_func(name, MODULE, FUSED)?;
    let mut bld = func.builder();
    bld.arg(&x);
    bld.arg(&w);
    bld.arg(&b);
    bld.arg(&y);
    candle_core::builder_arg!(bld, r as u32, n as u32, eps);
    // SAFETY: the arguments match `layer_norm_*` in fused.cu; one warp per row.
    unsafe { bld.launch(grid(r * 32, NO_CAP)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub fn softmax(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let n = l.dims().last().copied().unwrap_or(0);
    if n == 0 {
        candle_core::bail!("fused-softmax: empty last dimension");
    }
    let out = by_dtype!(s.dtype(), softmax_t, "softmax", s, l, n)?;
    Ok((out, l.shape().clone()))
}

fn softmax_t<T: CudaDType + DeviceRepr>(
    name: &str,
    s: &CudaStorage,
    l: &Layout,
    n: usize,
) -> Result<CudaStorage> {
    let x = view::<T>(s, l, "fused-softmax")?;
    let dev = &s.device;
    let r = rows(l, n);
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(r * n)? };
    let func = dev.get_or_load_custom_func(name, MODULE, FUSED)?;
    let mut bld = func.builder();
    bld.arg(&x);
    bld.arg(&y);
    candle_core::builder_arg!(bld, r as u32, n as u32);
    // SAFETY: the arguments match `softmax_*` in fused.cu; one warp per row.
    unsafe { bld.launch(grid(r * 32, NO_CAP)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The activation as `fused.cu` numbers it.
fn act_code(a: Option<Activation>) -> i32 {
    match a {
        None => 0,
        Some(Activation::QuickGelu) => 1,
        Some(Activation::Gelu) => 2,
    }
}

pub fn bias_act(
    a: Option<Activation>,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let n = l2.shape().elem_count();
    check_last_dim(l1, n, "fused-bias-act")?;
    let out = by_dtype!(s1.dtype(), bias_act_t, "bias_act", (s1, l1), (s2, l2), n, a)?;
    Ok((out, l1.shape().clone()))
}

fn bias_act_t<T: CudaDType + DeviceRepr>(
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    n: usize,
    a: Option<Activation>,
) -> Result<CudaStorage> {
    let op = "fused-bias-act";
    let (x, b) = (view::<T>(s1, l1, op)?, view::<T>(s2, l2, op)?);
    let dev = &s1.device;
    let numel = l1.shape().elem_count();
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(numel)? };
    let func = dev.get_or_load_custom_func(name, MODULE, FUSED)?;
    let mut bld = func.builder();
    bld.arg(&x);
    bld.arg(&b);
    bld.arg(&y);
    candle_core::builder_arg!(bld, numel, n as u32, act_code(a));
    // SAFETY: the arguments match `bias_act_*` in fused.cu (grid-stride).
    unsafe { bld.launch(grid(numel, 1 << 16)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub fn bias_residual(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let n = l2.shape().elem_count();
    check_last_dim(l1, n, "fused-bias-residual")?;
    if l1.shape() != l3.shape() {
        candle_core::bail!(
            "fused-bias-residual: output {:?} and residual {:?} differ",
            l1.shape(),
            l3.shape()
        );
    }
    let out = by_dtype!(
        s1.dtype(),
        bias_residual_t,
        "bias_residual",
        (s1, l1),
        (s2, l2),
        (s3, l3),
        n
    )?;
    Ok((out, l1.shape().clone()))
}

fn bias_residual_t<T: CudaDType + DeviceRepr>(
    name: &str,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    n: usize,
) -> Result<CudaStorage> {
    let op = "fused-bias-residual";
    let (x, b, r) = (
        view::<T>(s1, l1, op)?,
        view::<T>(s2, l2, op)?,
        view::<T>(s3, l3, op)?,
    );
    let dev = &s1.device;
    let numel = l1.shape().elem_count();
    // SAFETY: every element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(numel)? };
    let func = dev.get_or_load_custom_func(name, MODULE, FUSED)?;
    let mut bld = func.builder();
    bld.arg(&x);
    bld.arg(&b);
    bld.arg(&r);
    bld.arg(&y);
    candle_core::builder_arg!(bld, numel, n as u32);
    // SAFETY: the arguments match `bias_residual_*` in fused.cu (grid-stride).
    unsafe { bld.launch(grid(numel, 1 << 16)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}
