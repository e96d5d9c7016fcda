//! The primitive ops of the towers: LayerNorm, softmax, activations, the causal mask and row
//! normalisation. LayerNorm and softmax take the fused kernels when no graph is recorded, and
//! plain differentiable candle ops otherwise.

use super::{fused, fused_grad};
use crate::config::Activation;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

/// `x + v` or `x * v` with `v` repeated over the leading dimensions of `x` (`v`'s shape is
/// the trailing part of `x`'s). When `v` is learned, `v` is first repeated by a matmul with a
/// column of ones, so that its gradient is a GEMM: candle's backward of a broadcast sums over
/// leading dimensions with an index division per element, which took a fifth of a training
/// step. Same values either way.
pub(super) fn repeat_rows(x: &Tensor, v: &Tensor, mul: bool) -> Result<Tensor> {
    if !v.track_op() {
        return Ok(if mul {
            x.broadcast_mul(v)?
        } else {
            x.broadcast_add(v)?
        });
    }
    let len = v.elem_count();
    let ones = Tensor::ones((x.elem_count() / len, 1), v.dtype(), v.device())?;
    let repeated = ones.matmul(&v.reshape((1, len))?)?.reshape(x.shape())?;
    Ok(if mul {
        (x * repeated)?
    } else {
        (x + repeated)?
    })
}

/// LayerNorm from primitive ops (differentiable), computed in at least f32.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::usable(&[x, w, b]) {
        let eps = eps as f32;
        return Ok(x
            .contiguous()?
            .apply_op3_no_bwd(w, b, &fused::LayerNorm { eps })?);
    }
    if fused_grad::usable(&[x, w, b]) {
        return Ok(x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            fused_grad::LayerNorm { eps },
        )?);
    }
    layer_norm_ops(x, w, b, eps)
}

/// LayerNorm from primitive ops: the path for devices and dtypes the fused ops don't take.
pub(super) fn layer_norm_ops(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = repeat_rows(&repeat_rows(&xn, &upcast(w)?, true)?, &upcast(b)?, false)?;
    Ok(y.to_dtype(dtype)?)
}

/// Softmax over the last dimension from primitive ops, computed in at least f32. The max is
/// detached: softmax is shift invariant, so the gradient is unchanged.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::usable(&[x]) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&fused::Softmax)?);
    }
    if fused_grad::usable(&[x]) {
        return Ok(x.contiguous()?.apply_op1(fused_grad::Softmax)?);
    }
    softmax_ops(x)
}

/// Softmax from primitive ops: the path for devices and dtypes the fused ops don't take.
pub(crate) fn softmax_ops(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(dtype)?)
}

pub(super) fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

pub(super) fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        // quick_gelu(x) = x·σ(1.702x) = silu(1.702x) / 1.702
        Activation::QuickGelu => ((x * 1.702)?.silu()? / 1.702)?,
        Activation::Gelu => x.gelu_erf()?,
    })
}

/// The text tower's attention mask `[l, l]`: 0 on and below the diagonal, −∞ above (a token
/// attends to itself and earlier tokens only).
pub(crate) fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l * l)
        .map(|k| {
            if k % l > k / l {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(m, (l, l), device)?.to_dtype(dtype)?)
}

/// L2-normalises rows.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    //! The fused inference kernels against the primitive-op path they replace. A `Var` input
    //! records a graph, which forces the primitive path on the same values.
    use super::*;
    use crate::model::test_values::{max_diff, rand, tracked};

    #[test]
    fn fused_layer_norm_matches_primitive_ops_with_a_large_mean() {
        let (x, w, b) = (
            rand(&[3, 5, 48], 50.0, 1),
            rand(&[48], 1.0, 2),
            rand(&[48], 0.0, 3),
        );
        let fast = layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert!(!fast.track_op());
        let slow = layer_norm(&tracked(&x), &w, &b, 1e-5).unwrap();
        assert!(slow.track_op());
        assert!(max_diff(&fast, &slow) < 1e-4, "{}", max_diff(&fast, &slow));
    }

    #[test]
    fn fused_softmax_matches_primitive_ops_under_a_causal_mask() {
        let x = (rand(&[2, 3, 6, 6], 0.0, 4) * 10.0)
            .unwrap()
            .broadcast_add(&causal_mask(6, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let fast = softmax_last(&x).unwrap();
        let slow = softmax_last(&tracked(&x)).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-6);
        let rows = fast.sum_keepdim(D::Minus1).unwrap().flatten_all().unwrap();
        for s in rows.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-5);
        }
    }

    /// The inference epilogues write over the product they are given (no new buffer) and give
    /// what the primitive ops give, at every dtype and activation.
    #[test]
    fn in_place_epilogues_match_primitive_ops_and_reuse_the_product() {
        let data_ptr = |t: &Tensor| {
            let (s, _) = t.storage_and_layout();
            match &*s {
                candle_core::Storage::Cpu(c) => match c {
                    candle_core::CpuStorage::F32(v) => v.as_ptr() as usize,
                    candle_core::CpuStorage::F16(v) => v.as_ptr() as usize,
                    candle_core::CpuStorage::BF16(v) => v.as_ptr() as usize,
                    _ => unreachable!("float storages only"),
                },
                _ => unreachable!("CPU only"),
            }
        };
        // 3 × 1500 rows: more than one rayon task per op (MIN_ELEMS_PER_TASK).
        let (y0, b, r) = (
            rand(&[3, 1500, 24], 0.0, 5),
            rand(&[24], 0.0, 6),
            rand(&[3, 1500, 24], 0.0, 7),
        );
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tol = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
            // A copy of its own: to_dtype at the same dtype shares the storage, which the
            // in-place ops would then write through.
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap().copy().unwrap();
            for act in [None, Some(Activation::QuickGelu), Some(Activation::Gelu)] {
                let y = cast(&y0);
                let at = data_ptr(&y);
                let fast = fused::bias_act(y, &cast(&b), act).unwrap();
                assert_eq!(data_ptr(&fast), at, "{dtype:?} {act:?}: not in place");
                let mut slow = upcast(&cast(&y0))
                    .unwrap()
                    .broadcast_add(&upcast(&cast(&b)).unwrap())
                    .unwrap();
                if let Some(a) = act {
                    slow = activate(&slow, a).unwrap();
                }
                let d = max_diff(&upcast(&fast).unwrap(), &slow);
                assert!(d < tol, "{dtype:?} {act:?}: {d}");
            }
            let y = cast(&y0);
            let at = data_ptr(&y);
            let fast = fused::bias_residual(y, &cast(&b), &cast(&r)).unwrap();
            assert_eq!(data_ptr(&fast), at, "{dtype:?}: not in place");
            let slow = (upcast(&cast(&y0))
                .unwrap()
                .broadcast_add(&upcast(&cast(&b)).unwrap())
                .unwrap()
                + upcast(&cast(&r)).unwrap())
            .unwrap();
            let d = max_diff(&upcast(&fast).unwrap(), &slow);
            assert!(d < tol, "{dtype:?} residual: {d}");
        }
    }

    #[test]
    fn fused_kernels_reject_mismatched_shapes() {
        let y = rand(&[4, 8], 0.0, 1);
        let short = rand(&[7], 0.0, 2);
        assert!(y.apply_op2_no_bwd(&short, &fused::BiasAct(None)).is_err());
        let r = rand(&[4, 7], 0.0, 3);
        let b = rand(&[8], 0.0, 4);
        assert!(y.apply_op3_no_bwd(&b, &r, &fused::BiasResidual).is_err());
        assert!(fused::bias_act(y.clone(), &short, None).is_err());
        assert!(fused::bias_residual(y.clone(), &b, &r).is_err());
        // A view that is not contiguous is refused, not written through.
        assert!(fused::bias_act(y.t().unwrap(), &rand(&[4], 0.0, 5), None).is_err());
        assert!(y
            .apply_op3_no_bwd(&short, &short, &fused::LayerNorm { eps: 1e-5 })
            .is_err());
    }
}
