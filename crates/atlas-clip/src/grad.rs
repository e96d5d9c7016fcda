//! ∂L/∂Λ without putting the composition in the autograd graph: compose θ = θ0 + Σ Λ τ with no
//! graph, make the composed tensors the leaves, back-propagate the loss to them, then reduce
//! ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block (and part) with atlas-core's fused reduction. Peak memory is
//! one copy of θ and its gradient, whatever the number of task vectors.

use crate::backbone::Backbone;
use crate::model::{VisionTower, WeightSource};
use crate::Result;
use atlas_core::{compose, reduce_gradient, Coefficients, Manifest, Real, TaskVector};
use candle_core::{backprop::GradStore, Tensor, Var, WithDType};
use std::collections::HashMap;
use std::sync::Arc;

/// The composed image-tower tensors as gradient leaves, in manifest order.
pub struct Leaves {
    vars: Vec<(String, Var)>,
    by_name: HashMap<String, Tensor>,
}

impl WeightSource for Leaves {
    fn find(&self, name: &str) -> Option<Tensor> {
        self.by_name.get(name).cloned()
    }
}

impl Leaves {
    /// Composes θ in `T` (f32, or f64 for checks) and wraps every tensor as a [`Var`].
    pub fn compose<T: Real + WithDType>(
        backbone: &Backbone,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
    ) -> Result<Self> {
        let manifest = backbone.manifest();
        let blocks: Vec<Vec<T>> = compose(manifest, backbone.base_blocks(), tvs, coefs)?;
        let mut vars = Vec::new();
        for (block, data) in manifest.blocks().iter().zip(blocks) {
            if let [spec] = block.tensors.as_slice() {
                // One tensor: hand the composed vector over without a copy.
                vars.push((
                    spec.name.clone(),
                    Var::from_vec(data, spec.shape.as_slice(), backbone.device())?,
                ));
                continue;
            }
            let mut offset = 0;
            for spec in &block.tensors {
                let n = spec.numel();
                vars.push((
                    spec.name.clone(),
                    Var::from_slice(
                        &data[offset..offset + n],
                        spec.shape.as_slice(),
                        backbone.device(),
                    )?,
                ));
                offset += n;
            }
        }
        let by_name = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok(Leaves { vars, by_name })
    }

    /// ∂L/∂θ per block (tensors of a block concatenated), zeros where the loss does not reach.
    pub fn block_grads<T: Real + WithDType>(
        &self,
        manifest: &Manifest,
        grads: &GradStore,
    ) -> Result<Vec<Vec<T>>> {
        let mut it = self.vars.iter();
        manifest
            .blocks()
            .iter()
            .map(|block| {
                let mut out = Vec::with_capacity(block.numel());
                for _ in &block.tensors {
                    let (_, var) = it.next().expect("one var per tensor");
                    match grads.get(var.as_tensor()) {
                        Some(g) => out.extend(g.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?),
                        None => out.resize(out.len() + var.elem_count(), T::default()),
                    }
                }
                Ok(out)
            })
            .collect()
    }
}

/// The loss at Λ and ∂L/∂Λ in `coefs`' layout. `loss` maps the composed image tower to a
/// scalar tensor.
pub fn coefficient_gradient<T: Real + WithDType>(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    loss: impl FnOnce(&VisionTower) -> Result<Tensor>,
) -> Result<(f64, Vec<f64>)> {
    let leaves = Leaves::compose::<T>(backbone, tvs, coefs)?;
    let tower = backbone.vision(&leaves)?;
    let l = loss(&tower)?;
    let value = l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let grads = l.backward()?;
    drop(tower);
    let block_grads = leaves.block_grads::<T>(backbone.manifest(), &grads)?;
    drop(grads);
    let full = reduce_gradient(backbone.manifest(), &block_grads, tvs, coefs)?;
    Ok((value, coefs.fold_gradient(&full)))
}
