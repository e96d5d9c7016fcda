//! ∂L/∂Λ without putting the composition in the autograd graph: compose θ = θ0 + Σ Λ τ with no
//! graph, make the composed tensors the leaves, back-propagate the loss to them, then reduce
//! ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block (and part) with atlas-core's fused reduction. On the CPU the
//! linear layers' weight gradients are reduced one at a time as the backward produces them
//! (`StepReduction`), so peak memory is one copy of θ, the activations and the small
//! gradients, whatever the number of task vectors. Off the CPU the same step composes and
//! reduces on the device (`device_gradient`), with the resident task vectors.

use crate::backbone::Backbone;
use crate::model::fused_grad::{backward_with_weight_sink, WeightGradSink};
use crate::model::{VisionTower, WeightSource};
use crate::Result;
use atlas_core::compose::{compose_into_uninit, reduce_gradient_pieces};
use atlas_core::{Coefficients, Manifest, Real, TaskVector};
use candle_core::{
    backprop::GradStore, DType, Storage, StorageRef, Tensor, TensorId, Var, WithDType,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::rc::Rc;
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

/// ⟨∂L/∂θ, τ_i⟩ of the linear layers' weights, reduced one weight at a time as the backward
/// produces each gradient (still in cache), which is then dropped: the step never holds every
/// weight gradient at once. The other leaves' gradients stay in candle's store.
struct StepReduction<T> {
    manifest: Manifest,
    tvs: Vec<Arc<TaskVector>>,
    coefs: Coefficients,
    /// Leaf id → (block, offset in the block).
    at: HashMap<TensorId, (usize, usize)>,
    /// [`reduce_gradient_pieces`]' layout, summed over the gradients taken.
    full: Vec<f64>,
    dtype: PhantomData<T>,
}

impl<T> StepReduction<T> {
    fn new(
        manifest: &Manifest,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
        leaves: &Leaves,
    ) -> Self {
        let mut vars = leaves.vars.iter();
        let mut at = HashMap::new();
        for (b, block) in manifest.blocks().iter().enumerate() {
            let mut offset = 0;
            for spec in &block.tensors {
                let (_, var) = vars.next().expect("one leaf per tensor");
                at.insert(var.id(), (b, offset));
                offset += spec.numel();
            }
        }
        StepReduction {
            manifest: manifest.clone(),
            tvs: tvs.to_vec(),
            coefs: coefs.clone(),
            at,
            full: vec![0.0; tvs.len() * manifest.len() * coefs.parts()],
            dtype: PhantomData,
        }
    }
}

impl<T: Real + WithDType> WeightGradSink for StepReduction<T> {
    fn take(&mut self, w: &Tensor, dw: Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(&(b, offset)) = self.at.get(&w.id()) else {
            return Ok(Some(dw));
        };
        let view = GradView::<T>::of(&dw).map_err(candle_core::Error::wrap)?;
        let mut pieces = vec![Vec::new(); self.manifest.len()];
        pieces[b].push((offset, view.as_slice().map_err(candle_core::Error::wrap)?));
        let part = reduce_gradient_pieces(&self.manifest, &pieces, &self.tvs, &self.coefs)
            .map_err(candle_core::Error::wrap)?;
        self.full.iter_mut().zip(part).for_each(|(a, p)| *a += p);
        Ok(None)
    }
}

/// Per block, `(offset in the block, gradient values)` pieces.
type BlockPieces<'v, T> = Vec<Vec<(usize, &'v [T])>>;

/// One leaf's gradient, readable as a slice: in place in candle's CPU storage when it is
/// contiguous and of the compute type (the usual case), else a converted copy.
enum GradView<'a, T> {
    InPlace(StorageRef<'a>, usize, usize),
    Copied(Vec<T>),
}

impl<'a, T: WithDType> GradView<'a, T> {
    /// `g`'s values: in place when they can be, else converted.
    fn of(g: &'a Tensor) -> Result<Self> {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(_), Some((start, end)), true) = (
            &*storage,
            layout.contiguous_offsets(),
            g.dtype() == T::DTYPE,
        ) {
            return Ok(GradView::InPlace(storage, start, end));
        }
        drop(storage);
        Ok(GradView::Copied(
            g.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?,
        ))
    }

    fn as_slice(&self) -> Result<&[T]> {
        Ok(match self {
            GradView::InPlace(storage, start, end) => match &**storage {
                Storage::Cpu(cpu) => &cpu.as_slice::<T>()?[*start..*end],
                _ => unreachable!("only CPU storage is viewed in place"),
            },
            GradView::Copied(v) => v,
        })
    }
}

impl Leaves {
    /// Composes θ in `T` (f32, or f64 for checks) and wraps every tensor as a [`Var`].
    pub fn compose<T: Real + WithDType>(
        backbone: &Backbone,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
    ) -> Result<Self> {
        Self::from_tensors(backbone, compose_tensors::<T>(backbone, tvs, coefs)?)
    }

    /// Wraps composed tensors (manifest order) as [`Var`]s: on the CPU, candle takes each
    /// vector as the tensor's storage without a copy.
    fn from_tensors<T: Real + WithDType>(backbone: &Backbone, data: Vec<Vec<T>>) -> Result<Self> {
        let mut vars = Vec::with_capacity(data.len());
        for ((spec, _), v) in backbone.manifest().tensor_specs().zip(data) {
            vars.push((
                spec.name.clone(),
                Var::from_vec(v, spec.shape.as_slice(), backbone.device())?,
            ));
        }
        let by_name = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Ok(Leaves { vars, by_name })
    }

    /// Each leaf's gradient (None where the loss does not reach it), read in place where
    /// possible.
    fn grad_views<'a, T: Real + WithDType>(
        &self,
        grads: &'a GradStore,
    ) -> Result<Vec<Option<GradView<'a, T>>>> {
        self.vars
            .iter()
            .map(|(_, var)| grads.get(var.as_tensor()).map(GradView::of).transpose())
            .collect()
    }

    /// Per block, the gradient pieces `(offset in the block, values)` of its tensors that have
    /// one, as [`reduce_gradient_pieces`] takes them.
    fn block_pieces<'v, T: WithDType>(
        manifest: &Manifest,
        views: &'v [Option<GradView<'_, T>>],
    ) -> Result<BlockPieces<'v, T>> {
        let mut it = views.iter();
        manifest
            .blocks()
            .iter()
            .map(|block| {
                let mut pieces = Vec::new();
                let mut offset = 0;
                for spec in &block.tensors {
                    if let Some(view) = it.next().expect("one view per tensor") {
                        pieces.push((offset, view.as_slice()?));
                    }
                    offset += spec.numel();
                }
                Ok(pieces)
            })
            .collect()
    }

    /// ∂L/∂θ per block (tensors of a block concatenated), zeros where the loss does not reach.
    pub fn block_grads<T: Real + WithDType>(
        &self,
        manifest: &Manifest,
        grads: &GradStore,
    ) -> Result<Vec<Vec<T>>> {
        let views = self.grad_views::<T>(grads)?;
        let pieces = Self::block_pieces(manifest, &views)?;
        Ok(manifest
            .blocks()
            .iter()
            .zip(pieces)
            .map(|(block, pieces)| {
                let mut out = vec![T::default(); block.numel()];
                for (offset, g) in pieces {
                    out[offset..offset + g.len()].copy_from_slice(g);
                }
                out
            })
            .collect())
    }
}

/// θ = θ0 + Σ Λ τ per tensor (manifest order), composed straight into each tensor's own vector:
/// no block-sized intermediate, no copy for blocks of several tensors, and no zero-fill of
/// memory the composition overwrites anyway.
fn compose_tensors<T: Real>(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Result<Vec<Vec<T>>> {
    let manifest = backbone.manifest();
    let mut tensors: Vec<Vec<T>> = manifest
        .tensor_specs()
        .map(|(spec, _)| Vec::with_capacity(spec.numel()))
        .collect();
    {
        let mut it = tensors.iter_mut();
        let mut pieces: Vec<Vec<&mut [MaybeUninit<T>]>> = manifest
            .blocks()
            .iter()
            .map(|block| {
                block
                    .tensors
                    .iter()
                    .map(|spec| {
                        let v = it.next().expect("one vector per tensor");
                        &mut v.spare_capacity_mut()[..spec.numel()]
                    })
                    .collect()
            })
            .collect();
        compose_into_uninit(manifest, backbone.base_blocks(), tvs, coefs, &mut pieces)?;
    }
    for (v, (spec, _)) in tensors.iter_mut().zip(manifest.tensor_specs()) {
        // SAFETY: compose_into_uninit returned Ok, so it wrote every element of every piece.
        unsafe { v.set_len(spec.numel()) };
    }
    Ok(tensors)
}

/// Wall time of each phase of one [`coefficient_gradient`] call, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepPhases {
    /// θ = θ0 + Σ Λ τ (on the host; off the CPU, on the device).
    pub compose_ms: f64,
    /// Composed blocks wrapped as candle `Var` leaves.
    pub wrap_ms: f64,
    /// Building the tower over the leaves and evaluating the loss.
    pub forward_ms: f64,
    /// `backward()` to the leaves; on the CPU it includes the reduction of the linear layers'
    /// weight gradients, taken as the backward produces them.
    pub backward_ms: f64,
    /// Getting at ∂L/∂θ in the gradient store (in place; a copy only for odd layouts; off the
    /// CPU, concatenated flat on the device).
    pub copy_out_ms: f64,
    /// ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block and part (on the CPU, of the gradients the backward did
    /// not reduce: biases, norms, embeddings), then folding to `coefs`' layout.
    pub reduce_ms: f64,
    /// Dropping the graph, the gradients and the leaves.
    pub free_ms: f64,
}

impl StepPhases {
    pub fn total_ms(&self) -> f64 {
        self.compose_ms
            + self.wrap_ms
            + self.forward_ms
            + self.backward_ms
            + self.copy_out_ms
            + self.reduce_ms
            + self.free_ms
    }
}

/// The loss at Λ and ∂L/∂Λ in `coefs`' layout. `loss` maps the composed image tower to a
/// scalar tensor.
pub fn coefficient_gradient<T: Real + WithDType>(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    loss: impl FnOnce(&VisionTower) -> Result<Tensor> + Send,
) -> Result<(f64, Vec<f64>)> {
    let (value, grad, _) = coefficient_gradient_timed::<T>(backbone, tvs, coefs, loss)?;
    Ok((value, grad))
}

/// [`coefficient_gradient`], with the time each phase took.
pub fn coefficient_gradient_timed<T: Real + WithDType>(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    loss: impl FnOnce(&VisionTower) -> Result<Tensor> + Send,
) -> Result<(f64, Vec<f64>, StepPhases)> {
    if backbone.device().is_cpu() {
        // On a rayon worker, as `VisionTower::forward`: the step's parallel kernels split on
        // this thread instead of each being injected into the pool.
        return rayon::scope(|_| step::<T>(backbone, tvs, coefs, loss));
    }
    step::<T>(backbone, tvs, coefs, loss)
}

fn step<T: Real + WithDType>(
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
    if !backbone.device().is_cpu() && T::DTYPE == DType::F32 && crate::cuda_kernels_on() {
        return device_gradient(backbone, tvs, coefs, loss);
    }
    let manifest = backbone.manifest();
    let tensors = compose_tensors::<T>(backbone, tvs, coefs)?;
    lap(&mut ph.compose_ms);
    let leaves = Leaves::from_tensors(backbone, tensors)?;
    lap(&mut ph.wrap_ms);
    let tower = backbone.vision(&leaves)?;
    let l = loss(&tower)?;
    let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    lap(&mut ph.forward_ms);
    let reduction = Rc::new(RefCell::new(StepReduction::<T>::new(
        manifest, tvs, coefs, &leaves,
    )));
    let grads = backward_with_weight_sink(&l, reduction.clone())?;
    lap(&mut ph.backward_ms);
    drop(tower);
    drop(l);
    lap(&mut ph.free_ms);
    let views = leaves.grad_views::<T>(&grads)?;
    let pieces = Leaves::block_pieces(manifest, &views)?;
    lap(&mut ph.copy_out_ms);
    let mut full = reduce_gradient_pieces(manifest, &pieces, tvs, coefs)?;
    let taken = &reduction.borrow().full;
    full.iter_mut().zip(taken).for_each(|(a, t)| *a += t);
    let folded = coefs.fold_gradient(&full);
    lap(&mut ph.reduce_ms);
    drop(pieces);
    drop(views);
    drop(grads);
    drop(leaves);
    let mut freed = 0.0;
    lap(&mut freed);
    ph.free_ms += freed;
    Ok((value, folded, ph))
}

/// [`coefficient_gradient_timed`] off the CPU (f32): θ composed on the device from the resident
/// task vectors ([`crate::device_compose::DeviceComposer::compose_flat`]), one [`Var`] per tensor (a view into the flat
/// θ, with no op of its own, so backward makes no full-size zeros per view), the gradients
/// concatenated on the device in the flat layout (zeros where the loss does not reach) and
/// reduced there ([`crate::device_compose::DeviceComposer::reduce_flat`]): only the loss and the `[n_tv, n_blocks, K]`
/// dot products come back to the host. Each phase ends with the device synchronised.
fn device_gradient(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    loss: impl FnOnce(&VisionTower) -> Result<Tensor>,
) -> Result<(f64, Vec<f64>, StepPhases)> {
    let mut ph = StepPhases::default();
    let device = backbone.device().clone();
    let mut clock = Instant::now();
    let mut lap = |slot: &mut f64| -> Result<()> {
        device.synchronize()?;
        let now = Instant::now();
        *slot = (now - clock).as_secs_f64() * 1e3;
        clock = now;
        Ok(())
    };
    let dc = backbone.device_composer()?;
    let flat = dc.compose_flat(tvs, coefs, DType::F32)?;
    lap(&mut ph.compose_ms)?;
    let layout = dc.layout();
    let mut vars = Vec::new();
    for (b, block) in backbone.manifest().blocks().iter().enumerate() {
        let mut offset = layout.block(b).start;
        for spec in &block.tensors {
            let n = spec.numel();
            let view = flat.narrow(0, offset, n)?.reshape(spec.shape.as_slice())?;
            vars.push((spec.name.clone(), Var::from_tensor(&view)?));
            offset += n;
        }
    }
    let by_name = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let leaves = Leaves { vars, by_name };
    lap(&mut ph.wrap_ms)?;
    let tower = backbone.vision(&leaves)?;
    let l = loss(&tower)?;
    let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    lap(&mut ph.forward_ms)?;
    let grads = l.backward()?;
    lap(&mut ph.backward_ms)?;
    drop(tower);
    drop(l);
    lap(&mut ph.free_ms)?;
    // ∂L/∂θ flat: per block its tensors' gradients then the padding, as the composition lays θ.
    let mut pieces = Vec::with_capacity(leaves.vars.len() + layout.n_blocks());
    let mut it = leaves.vars.iter();
    for (b, block) in backbone.manifest().blocks().iter().enumerate() {
        for spec in &block.tensors {
            let (_, var) = it.next().expect("one leaf per tensor");
            pieces.push(match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(spec.numel(), DType::F32, &device)?,
            });
        }
        let r = layout.block(b);
        let end = if b + 1 < layout.n_blocks() {
            layout.block(b + 1).start
        } else {
            layout.total()
        };
        if end > r.end {
            pieces.push(Tensor::zeros(end - r.end, DType::F32, &device)?);
        }
    }
    let grad = Tensor::cat(&pieces, 0)?;
    drop(pieces);
    lap(&mut ph.copy_out_ms)?;
    let full = dc.reduce_flat(&grad, tvs, coefs)?;
    let folded = coefs.fold_gradient(&full);
    lap(&mut ph.reduce_ms)?;
    drop(grad);
    drop(grads);
    drop(leaves);
    drop(flat);
    let mut freed = 0.0;
    lap(&mut freed)?;
    ph.free_ms += freed;
    Ok((value, folded, ph))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{vision_manifest, ClipConfig, LoadOptions, QkvBlocks, VisionConfig};
    use atlas_core::parts::splitmix64;
    use atlas_core::{compose, reduce_gradient, Buffer, Layout, StorageDType, TaskVectorMeta};
    use candle_core::Device;

    fn pseudo(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|j| {
                let u = (splitmix64(seed * 1_000_003 + j as u64) % 2001) as f32 / 1000.0 - 1.0;
                u * scale
            })
            .collect()
    }

    /// A tiny image tower with fused q/k/v blocks (blocks of several tensors) and two f16 task
    /// vectors.
    fn setup() -> (Backbone, Vec<Arc<TaskVector>>) {
        setup_in(DType::F32)
    }

    /// The tiny tower with its towers in `dtype` (bf16 on the CPU: bf16 matmuls).
    fn setup_in(dtype: DType) -> (Backbone, Vec<Arc<TaskVector>>) {
        let vision = VisionConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            projection_dim: 8,
            ..VisionConfig::default()
        };
        let manifest = vision_manifest(&vision, 8, QkvBlocks::Fused);
        assert!(manifest.blocks().iter().any(|b| b.tensors.len() > 1));
        let base = manifest
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(b as u64, bl.numel(), 0.3))
            .collect();
        let cfg = ClipConfig {
            vision,
            text: None,
            projection_dim: 8,
        };
        let opts = LoadOptions {
            qkv: QkvBlocks::Fused,
            dtype,
            ..LoadOptions::default()
        };
        let bb = Backbone::from_vision_blocks("tiny", cfg, base, opts).unwrap();
        let tvs = (0..2)
            .map(|i| {
                let blocks = bb
                    .manifest()
                    .blocks()
                    .iter()
                    .enumerate()
                    .map(|(b, bl)| {
                        let seed = 1000 * (i + 1) + b as u64;
                        Buffer::from_f32(&pseudo(seed, bl.numel(), 0.05), StorageDType::F16)
                    })
                    .collect();
                let meta = TaskVectorMeta {
                    name: format!("tv{i}"),
                    ..Default::default()
                };
                let tv = TaskVector::from_buffers(bb.manifest(), meta, StorageDType::F16, blocks);
                Arc::new(tv.unwrap())
            })
            .collect();
        (bb, tvs)
    }

    fn layouts(nb: usize) -> Vec<Coefficients> {
        let block = Coefficients::new(
            Layout::PerBlock,
            2,
            nb,
            (0..2 * nb).map(|x| (x % 7) as f64 * 0.1 - 0.3).collect(),
        );
        let part = Coefficients::new(
            Layout::PerPart { k: 3, seed: 5 },
            2,
            nb,
            (0..6 * nb).map(|x| (x % 5) as f64 * 0.1 - 0.2).collect(),
        );
        vec![block.unwrap(), part.unwrap()]
    }

    /// Composing straight into per-tensor storage gives the blocks [`compose`] gives, split at
    /// the tensor boundaries.
    #[test]
    fn leaves_hold_the_composed_blocks() {
        let (bb, tvs) = setup();
        for coefs in layouts(bb.manifest().len()) {
            let leaves = Leaves::compose::<f32>(&bb, &tvs, &coefs).unwrap();
            let want: Vec<Vec<f32>> =
                compose(bb.manifest(), bb.base_blocks(), &tvs, &coefs).unwrap();
            let mut it = leaves.vars.iter();
            for (block, want) in bb.manifest().blocks().iter().zip(want) {
                let mut got = Vec::new();
                for spec in &block.tensors {
                    let (name, var) = it.next().unwrap();
                    assert_eq!(name, &spec.name);
                    assert_eq!(var.dims(), spec.shape.as_slice());
                    got.extend(var.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                assert_eq!(got, want, "{}", block.name);
            }
        }
    }

    /// The f32 step (gradients read in place, f32 kernels) matches gradients copied out to f64
    /// and reduced by the portable f64 path, per block and per part, over fused q/k/v blocks.
    #[test]
    fn in_place_f32_gradient_matches_the_copied_f64_reduction() {
        let (bb, tvs) = setup();
        let pixels = Tensor::new(pseudo(9, 2 * 3 * 8 * 8, 1.0), &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 8, 8))
            .unwrap();
        let loss = |t: &VisionTower| Ok(t.forward(&pixels)?.sqr()?.sum_all()?);
        for coefs in layouts(bb.manifest().len()) {
            let (value, got) = coefficient_gradient::<f32>(&bb, &tvs, &coefs, loss).unwrap();
            let leaves = Leaves::compose::<f32>(&bb, &tvs, &coefs).unwrap();
            let l = loss(&bb.vision(&leaves).unwrap()).unwrap();
            assert_eq!(value, l.to_scalar::<f32>().unwrap() as f64);
            // The reference: a plain backward, every gradient in candle's store.
            let grads = l.backward().unwrap();
            let views = leaves.grad_views::<f32>(&grads).unwrap();
            let in_place = views
                .iter()
                .filter(|v| matches!(v, Some(GradView::InPlace(..))))
                .count();
            // The fast path is exercised (non-contiguous gradients would fall back to a copy).
            assert!(in_place > 0, "no gradient was read in place");
            drop(views);
            let blocks = leaves.block_grads::<f64>(bb.manifest(), &grads).unwrap();
            let full = reduce_gradient(bb.manifest(), &blocks, &tvs, &coefs).unwrap();
            let want = coefs.fold_gradient(&full);
            let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
            assert!(scale > 0.0);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{:?}[{i}]: {a} vs {b}",
                    coefs.layout
                );
            }
        }
    }

    /// The device step (composition and reduction by the custom ops, here their CPU
    /// fallbacks; leaves as views into the flat θ; gradients concatenated flat with padding)
    /// gives the loss and ∂L/∂Λ of the host step.
    #[test]
    fn device_step_matches_the_host_step() {
        let (bb, tvs) = setup();
        let pixels = Tensor::new(pseudo(11, 3 * 3 * 8 * 8, 1.0), &Device::Cpu)
            .unwrap()
            .reshape((3, 3, 8, 8))
            .unwrap();
        let loss = |t: &VisionTower| Ok(t.forward(&pixels)?.sqr()?.sum_all()?);
        for coefs in layouts(bb.manifest().len()) {
            let (v_host, g_host, _) =
                coefficient_gradient_timed::<f32>(&bb, &tvs, &coefs, loss).unwrap();
            let (v_dev, g_dev, ph) = device_gradient(&bb, &tvs, &coefs, loss).unwrap();
            assert!(ph.total_ms() >= 0.0);
            assert!(
                (v_host - v_dev).abs() <= 1e-5 * v_host.abs(),
                "{v_host} vs {v_dev}"
            );
            assert_eq!(g_host.len(), g_dev.len());
            let scale = g_host.iter().fold(0f64, |m, w| m.max(w.abs()));
            assert!(scale > 0.0);
            for (i, (a, b)) in g_dev.iter().zip(&g_host).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{:?}[{i}]: {a} vs {b}",
                    coefs.layout
                );
            }
        }
    }

    /// With bf16 on a CPU that has a bf16 kernel the step's linear products run on it
    /// (autocast): ∂L/∂Λ stays within bf16's rounding of the f32 step's, and is not it. On a
    /// CPU without one (or with `ATLAS_CPU_BF16=off`) the step is the f32 step.
    #[test]
    fn a_bf16_backbone_learns_with_bf16_products_close_to_f32() {
        let (bb32, tvs) = setup();
        let (bb16, _) = setup_in(DType::BF16);
        let pixels = Tensor::new(pseudo(13, 4 * 3 * 8 * 8, 1.0), &Device::Cpu)
            .unwrap()
            .reshape((4, 3, 8, 8))
            .unwrap();
        let loss = |t: &VisionTower| Ok(t.forward(&pixels)?.sqr()?.sum_all()?);
        for coefs in layouts(bb32.manifest().len()) {
            let (v32, g32) = coefficient_gradient::<f32>(&bb32, &tvs, &coefs, loss).unwrap();
            let (v16, g16) = coefficient_gradient::<f32>(&bb16, &tvs, &coefs, loss).unwrap();
            let Some(kernel) = bb16.bf16_kernel() else {
                assert_eq!((v16, &g16), (v32, &g32));
                continue;
            };
            assert!((v16 - v32).abs() <= 1e-2 * v32.abs(), "{v16} vs {v32}");
            let scale = g32.iter().fold(0f64, |m, w| m.max(w.abs()));
            let worst = g16
                .iter()
                .zip(&g32)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 2e-2 * scale, "{kernel:?}: {worst} of {scale}");
            assert!(worst > 0.0, "{kernel:?}: the step did not run in bf16");
        }
    }
}
