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
use std::time::Instant;

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
        let blocks: Vec<Vec<T>> = compose(backbone.manifest(), backbone.base_blocks(), tvs, coefs)?;
        Self::from_blocks(backbone, blocks)
    }

    /// Wraps composed blocks (manifest order) as [`Var`]s.
    fn from_blocks<T: Real + WithDType>(backbone: &Backbone, blocks: Vec<Vec<T>>) -> Result<Self> {
        let manifest = backbone.manifest();
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

/// Wall time of each phase of one [`coefficient_gradient`] call, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// θ = θ0 + Σ Λ τ on the host.
    pub compose_ms: f64,
    /// Composed blocks wrapped as candle `Var` leaves.
    pub wrap_ms: f64,
    /// Building the tower over the leaves and evaluating the loss.
    pub forward_ms: f64,
    /// `backward()` to the leaves (and dropping the graph).
    pub backward_ms: f64,
    /// Reading ∂L/∂θ out of the gradient store.
    pub copy_out_ms: f64,
    /// ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block and part, then folding to `coefs`' layout.
    pub reduce_ms: f64,
}

impl StepPhases {
    pub fn total_ms(&self) -> f64 {
        self.compose_ms
            + self.wrap_ms
            + self.forward_ms
            + self.backward_ms
            + self.copy_out_ms
            + self.reduce_ms
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
    let (value, grad, _) = coefficient_gradient_timed::<T>(backbone, tvs, coefs, loss)?;
    Ok((value, grad))
}

/// [`coefficient_gradient`], with the time each phase took.
pub fn coefficient_gradient_timed<T: Real + WithDType>(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    loss: impl FnOnce(&VisionTower) -> Result<Tensor>,
) -> Result<(f64, Vec<f64>, StepPhases)> {
    let mut ph = StepPhases::default();
    let mut clock = Instant::now();
    let mut lap = |slot: &mut f64| {
        let now = Instant::now();
        *slot = (now - clock).as_secs_f64() * 1e3;
        clock = now;
    };
    let manifest = backbone.manifest();
    let blocks: Vec<Vec<T>> = compose(manifest, backbone.base_blocks(), tvs, coefs)?;
    lap(&mut ph.compose_ms);
    let leaves = Leaves::from_blocks(backbone, blocks)?;
    lap(&mut ph.wrap_ms);
    let tower = backbone.vision(&leaves)?;
    let l = loss(&tower)?;
    let value = l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    lap(&mut ph.forward_ms);
    let grads = l.backward()?;
    drop(tower);
    drop(l);
    lap(&mut ph.backward_ms);
    let block_grads = leaves.block_grads::<T>(manifest, &grads)?;
    drop(grads);
    lap(&mut ph.copy_out_ms);
    let full = reduce_gradient(manifest, &block_grads, tvs, coefs)?;
    let folded = coefs.fold_gradient(&full);
    lap(&mut ph.reduce_ms);
    Ok((value, folded, ph))
}
