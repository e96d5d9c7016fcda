//! Fused inference attention: ctx = softmax(q kᵀ + mask) v per head, straight from the stacked
//! q/k/v projection output [B, N, 3·D] (q already scaled by 1/√hd, see `Qkv::new`) to ctx as
//! [B, N, D], in one launch on a CUDA device (`kernels/attention.cu`). The plain path it replaces
//! copies qkv to [3, B, H, N, hd], runs two batched matmuls and a softmax, and copies the result
//! back to [B, N, D]. Records no backward op: `model.rs` calls it only for CUDA tensors outside
//! any graph. The CPU fallback is a straightforward f32 loop, there for the tests and for
//! `atlas-serve bench kernels --device cpu`; CPU inference keeps the matmul path, which is faster.
//!
//! Head dims up to 128, multiples of 8 (the kernel's 8-value loads and its per-lane registers);
//! any sequence length; an optional additive mask [N, N] in the same dtype (the text tower's
//! causal mask).

use super::fused;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// The largest head dim the kernel holds in registers.
pub const MAX_HEAD_DIM: usize = 128;

/// Attention over the stacked projection output; as a `CustomOp2` the second input is the
/// additive mask [N, N].
pub struct Attention {
    pub heads: usize,
}

/// (batch, tokens, model dim, head dim) of a qkv tensor, or why the op cannot take it.
fn dims(qkv: &Shape, heads: usize, mask: Option<&Shape>) -> Result<(usize, usize, usize, usize)> {
    let op = "fused-attention";
    let &[b, n, d3] = qkv.dims() else {
        candle_core::bail!("{op}: qkv must be [B, N, 3·D], not {qkv:?}");
    };
    if heads == 0 || d3 == 0 || !d3.is_multiple_of(3 * heads) {
        candle_core::bail!("{op}: last dim {d3} is not 3 · {heads} heads · head dim");
    }
    let hd = d3 / 3 / heads;
    if !hd.is_multiple_of(8) || hd > MAX_HEAD_DIM {
        candle_core::bail!(
            "{op}: head dim {hd} must be a multiple of 8 and at most {MAX_HEAD_DIM}"
        );
    }
    if let Some(m) = mask {
        if m.dims() != [n, n] {
            candle_core::bail!("{op}: mask {m:?} is not [{n}, {n}]");
        }
    }
    Ok((b, n, d3 / 3, hd))
}

/// True when `model.rs` should take the fused op: CUDA tensors outside any graph (the CPU keeps
/// the matmul path), f32/f16/bf16, a head dim the kernel supports, a mask of the same dtype.
pub fn usable(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> bool {
    cfg!(feature = "cuda")
        && qkv.device().is_cuda()
        && fused::usable(&[qkv])
        && mask.is_none_or(|m| fused::usable(&[m]) && m.dtype() == qkv.dtype())
        && dims(qkv.shape(), heads, mask.map(|m| m.shape())).is_ok()
}

/// ctx [B, N, D] from qkv [B, N, 3·D] through the fused op (the kernel on CUDA, the f32 loop on
/// the CPU).
pub fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let op = Attention { heads };
    let qkv = qkv.contiguous()?;
    match mask {
        None => qkv.apply_op1_no_bwd(&op),
        Some(m) => qkv.apply_op2_no_bwd(&m.contiguous()?, &op),
    }
}

/// The same math in plain candle ops, as `EncoderLayer::attention` computes it for stacked
/// projections, with `softmax` over the last dimension of the scores: the reference of the
/// tests and of the kernel check (`crate::kernel_check`).
pub fn reference<E>(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    softmax: impl Fn(&Tensor) -> std::result::Result<Tensor, E>,
) -> crate::Result<Tensor>
where
    crate::ClipError: From<E>,
{
    let (b, n, d, hd) = dims(qkv.shape(), heads, mask.map(|m| m.shape()))?;
    let t = qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let mut scores = t.get(0)?.matmul(&t.get(1)?.t()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let ctx = softmax(&scores)?.matmul(&t.get(2)?)?;
    Ok(ctx.transpose(1, 2)?.contiguous()?.reshape((b, n, d))?)
}

/// The contiguous data of `s` under `l` as f32.
fn f32_data(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((a, z)) = l.contiguous_offsets() else {
        candle_core::bail!("fused-attention: input must be contiguous");
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..z].to_vec(),
        CpuStorage::F16(v) => v[a..z].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..z].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!(
            "fused-attention takes f32, f16 or bf16, not {:?}",
            other.dtype()
        ),
    })
}

fn storage_of(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// The f32 fallback: per batch element (in parallel), per head and query row, scores, softmax
/// and the weighted sum of v, written in place in [N, D].
fn cpu_attention(
    s: &CpuStorage,
    l: &Layout,
    mask: Option<(&CpuStorage, &Layout)>,
    heads: usize,
) -> Result<(CpuStorage, Shape)> {
    let (b, n, d, hd) = dims(l.shape(), heads, mask.map(|(_, ml)| ml.shape()))?;
    if let Some((ms, _)) = mask {
        if ms.dtype() != s.dtype() {
            candle_core::bail!(
                "fused-attention: mask {:?}, qkv {:?}",
                ms.dtype(),
                s.dtype()
            );
        }
    }
    let qkv = f32_data(s, l)?;
    let mask = mask.map(|(ms, ml)| f32_data(ms, ml)).transpose()?;
    let mut out = vec![0f32; b * n * d];
    out.par_chunks_mut(n * d)
        .zip(qkv.par_chunks(n * 3 * d))
        .for_each(|(o, x)| {
            let mut p = vec![0f32; n];
            for h in 0..heads {
                let at = |row: usize, part: usize| &x[row * 3 * d + part * d + h * hd..][..hd];
                for i in 0..n {
                    let q = at(i, 0);
                    for (j, pj) in p.iter_mut().enumerate() {
                        let dot: f32 = q.iter().zip(at(j, 1)).map(|(a, b)| a * b).sum();
                        *pj = dot + mask.as_ref().map_or(0.0, |m| m[i * n + j]);
                    }
                    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for pj in p.iter_mut() {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    let ctx = &mut o[i * d + h * hd..][..hd];
                    for (j, pj) in p.iter().enumerate() {
                        for (c, v) in ctx.iter_mut().zip(at(j, 2)) {
                            *c += pj * v;
                        }
                    }
                    for c in ctx.iter_mut() {
                        *c /= sum;
                    }
                }
            }
        });
    Ok((storage_of(out, s.dtype()), Shape::from((b, n, d))))
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_attention(s, l, None, self.heads)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::attention(self.heads, (s, l), None)
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention-masked"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_attention(s1, l1, Some((s2, l2)), self.heads)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::attention(self.heads, (s1, l1), Some((s2, l2)))
    }
}

/// The launch of `kernels/attention.cu`, glue as in `fused_cuda.rs`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::dims;
    use crate::cuda_kernels::{view, ATTENTION};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};
    use half::{bf16, f16};

    const MODULE: &str = "atlas_attention";
    // These match ATTN_WARPS, ATTN_ROWS and the shared-memory carve-up in attention.cu.
    const WARPS: usize = 4;
    const ROWS: usize = 16;
    const KEY_TILE: usize = 32;

    /// Floats of dynamic shared memory: a K tile (rows padded by 4), a V tile, the block's
    /// query rows and each warp's probabilities; 43.5 KB at hd = 128, under the 48 KB default.
    fn smem_floats(hd: usize) -> usize {
        KEY_TILE * (hd + 4) + KEY_TILE * hd + ROWS * hd + ROWS * KEY_TILE
    }

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub fn attention(
        heads: usize,
        (s, l): Input,
        mask: Option<Input>,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = dims(l.shape(), heads, mask.map(|(_, ml)| ml.shape()))?;
        if let Some((ms, _)) = mask {
            if ms.dtype() != s.dtype() {
                candle_core::bail!(
                    "fused-attention: mask {:?}, qkv {:?}",
                    ms.dtype(),
                    s.dtype()
                );
            }
        }
        let out = match s.dtype() {
            DType::F32 => launch::<f32>("attention_f32", (s, l), mask, heads, dims)?,
            DType::F16 => launch::<f16>("attention_f16", (s, l), mask, heads, dims)?,
            DType::BF16 => launch::<bf16>("attention_bf16", (s, l), mask, heads, dims)?,
            d => candle_core::bail!("fused-attention takes f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, Shape::from((dims.0, dims.1, dims.2))))
    }

    fn launch<T: CudaDType + DeviceRepr>(
        name: &str,
        (s, l): Input,
        mask: Option<Input>,
        heads: usize,
        (b, n, d, hd): (usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        let op = "fused-attention";
        let x = view::<T>(s, l, op)?;
        let m = match mask {
            Some((ms, ml)) => Some(view::<T>(ms, ml, op)?),
            None => None,
        };
        let blocks = b * heads * n.div_ceil(ROWS);
        if blocks > i32::MAX as usize {
            candle_core::bail!("{op}: {blocks} blocks is more than one launch takes");
        }
        let dev = &s.device;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(b * n * d)? };
        if blocks == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
        }
        let func = dev.get_or_load_custom_func(name, MODULE, ATTENTION)?;
        let mut bld = func.builder();
        bld.arg(&x);
        // Without a mask the kernel never reads this argument.
        bld.arg(m.as_ref().unwrap_or(&x));
        bld.arg(&y);
        candle_core::builder_arg!(bld, n as u32, heads as u32, hd as u32, m.is_some() as i32);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: (smem_floats(hd) * 4) as u32,
        };
        // SAFETY: the arguments match `attention_*` in attention.cu; `dims` checked hd ≤ 128
        // and a multiple of 8, and the mask's shape [N, N].
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{causal_mask, softmax_ops};
    use candle_core::Device;

    fn values(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values without a global RNG: a sine of the index.
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f64 + 1.0) * (0.7 + seed as f64)).sin() as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn causal(n: usize) -> Tensor {
        causal_mask(n, DType::F32, &Device::Cpu).unwrap()
    }

    /// The CPU fallback against the plain-op math on f32 copies of the same values, cast back:
    /// both round the same f32 result once, so the error is a unit in the last place or so.
    #[test]
    fn cpu_fallback_matches_plain_attention() {
        // (batch, tokens, heads, head dim, causal mask): odd sizes, a head dim that is not a
        // multiple of 32, ViT-B/32's 50 tokens, the largest head dim.
        let cases = [
            (3, 5, 2, 8, false),
            (2, 33, 3, 40, true),
            (1, 50, 2, 64, false),
            (2, 17, 1, 128, true),
        ];
        for (b, n, h, hd, masked) in cases {
            let d = h * hd;
            let qkv = values(&[b, n, 3 * d], (n + hd) as u64);
            let mask = masked.then(|| causal(n));
            for (dtype, tol) in [
                (DType::F32, 1e-5),
                (DType::F16, 2e-3),
                (DType::BF16, 1.6e-2),
            ] {
                let x = qkv.to_dtype(dtype).unwrap();
                let m = mask.as_ref().map(|m| m.to_dtype(dtype).unwrap());
                let got = attention(&x, h, m.as_ref()).unwrap();
                assert_eq!(got.dims(), &[b, n, d]);
                assert_eq!(got.dtype(), dtype);
                let x32 = x.to_dtype(DType::F32).unwrap();
                let m32 = m.as_ref().map(|m| m.to_dtype(DType::F32).unwrap());
                let want = reference(&x32, h, m32.as_ref(), softmax_ops)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let err = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err <= tol, "{dtype:?} b{b} n{n} h{h} hd{hd}: {err}");
            }
        }
    }

    #[test]
    fn unsupported_shapes_are_errors() {
        let mask = causal(4);
        // Head dim 12 (not a multiple of 8), 136 (over 128), 3·D not divisible by the heads.
        for (last, heads) in [(36, 1), (3 * 136, 1), (3 * 64, 5)] {
            let x = values(&[2, 4, last], 1);
            assert!(attention(&x, heads, None).is_err(), "{last} / {heads}");
        }
        let x = values(&[2, 4, 3 * 16], 1);
        assert!(attention(&x, 2, Some(&causal(5))).is_err());
        assert!(attention(&x, 2, Some(&mask.to_dtype(DType::F16).unwrap())).is_err());
        assert!(attention(&x.reshape((8, 48)).unwrap(), 2, None).is_err());
        assert!(attention(&x, 2, Some(&mask)).is_ok());
        // The CPU keeps the matmul path in the model.
        assert!(!usable(&x, 2, None));
    }
}
