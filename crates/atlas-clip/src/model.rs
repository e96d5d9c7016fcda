//! The CLIP towers with the Hugging Face math (pre-LN transformer, quick_gelu, class token,
//! causal text mask, EOS pooling), written with primitive candle ops only.
//!
//! candle's fused LayerNorm and softmax kernels record no backward op, so gradients through
//! them are silently dropped; everything here is differentiable end to end, which the learner
//! relies on when the composed image-tower weights are the gradient leaves.
//!
//! Inference takes a faster path: when no input of an op is part of an autograd graph (plain
//! weights, not `Var`s or tensors built from them) and the tensors are on the CPU, LayerNorm,
//! softmax and the bias/activation/residual epilogues run as fused kernels (`fused`), and the
//! q/k/v projections of a tower built from such weights are one matmul. Learning never sees
//! that path: its weights are `Var`s, so every op records its backward.

//!
//! The module splits as candle's models do: `ops` (LayerNorm, softmax, activations, masks),
//! `layers` (linear, norm, attention and encoder layers), `vision` and `text` (the towers).

pub(crate) mod attention;
pub mod bf16_gemm;
mod fast_math;
pub(crate) mod fused;
pub(crate) mod fused_grad;
mod layers;
mod ops;
#[cfg(target_arch = "x86_64")]
mod small_gemm;
mod text;
mod vision;

pub(crate) use ops::{causal_mask, softmax_ops};
pub use ops::{layer_norm, normalize, softmax_last};
pub use text::TextTower;
pub use vision::{Recorder, VisionTower};

use crate::{ClipError, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// Where tower weights come from: a loaded checkpoint, or a composition.
pub trait WeightSource {
    /// The tensor called `name`, or None when absent.
    fn find(&self, name: &str) -> Option<Tensor>;

    /// The tensor called `name` with the expected shape; the error names the tensor.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .find(name)
            .ok_or_else(|| ClipError::tensor(name, "missing from the checkpoint"))?;
        if t.dims() != shape {
            return Err(ClipError::tensor(
                name,
                format!("has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        Ok(t)
    }

    /// The bf16 kernel that towers built from this source run their CPU matmuls on (packed
    /// weights, f32 activations, bf16 products, f32 sums); None for the f32 path.
    fn bf16_kernel(&self) -> Option<bf16_gemm::Kernel> {
        None
    }
}

/// `src` with its towers' CPU matmuls on a bf16 kernel when one is given (the caller has
/// checked the CPU has it: `bf16_gemm::available`), on the f32 path otherwise.
pub struct Bf16Matmuls<'a>(pub &'a dyn WeightSource, pub Option<bf16_gemm::Kernel>);

impl WeightSource for Bf16Matmuls<'_> {
    fn find(&self, name: &str) -> Option<Tensor> {
        self.0.find(name)
    }
    fn bf16_kernel(&self) -> Option<bf16_gemm::Kernel> {
        self.1
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn find(&self, name: &str) -> Option<Tensor> {
        self.get(name).cloned()
    }
}

/// Deterministic test inputs and comparisons shared by the model's tests.
#[cfg(test)]
mod test_values {
    use candle_core::{Device, Tensor, Var};

    /// Deterministic values without a global RNG: a scaled sine of the index.
    pub fn rand(shape: &[usize], mean: f64, seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (mean + ((i as f64 + 1.0) * (0.7 + seed as f64)).sin()) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `t` as a graph leaf: ops on it record their backward, which forces the primitive path.
    pub fn tracked(t: &Tensor) -> Tensor {
        Var::from_tensor(t).unwrap().as_tensor().clone()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
