//! The image tower: patch embedding, class token, pre-LN encoder layers pooled at the class
//! token, and the visual projection.

use super::layers::{load_layers, with_f32s, EncoderLayer, LayerDims, Linear, Norm};
use super::ops::repeat_rows;
use super::{fused, WeightSource};
use crate::config::VisionConfig;
use crate::manifest::{layer_prefix, vision_tensors, VISUAL_PROJECTION};
use crate::{ClipError, Result};
use candle_core::Tensor;

/// Takes each linear layer's input (`[B, N, in]`) with the names of the weights that read it.
pub type Recorder<'a> = dyn FnMut(&[String], &Tensor) -> Result<()> + 'a;

/// Largest batch one CPU inference pass runs; larger ones go in chunks of this size, whose
/// activations stay in cache and in glibc's heap (B/32 at batch 256: 13.9 images/s in one pass,
/// 17.8 at batch 32).
const CPU_CHUNK: usize = 32;

/// The image tower (+ visual projection when present).
#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: VisionConfig,
    class_embedding: Tensor,
    patch: Linear,
    position: Tensor,
    pre: Norm,
    layers: Vec<EncoderLayer>,
    post: Norm,
    projection: Option<Linear>,
}

impl VisionTower {
    /// Builds the tower from `src`, checking every tensor's shape. With `projection_dim`, the
    /// visual projection is required and applied.
    pub fn new(
        cfg: &VisionConfig,
        projection_dim: Option<usize>,
        src: &dyn WeightSource,
    ) -> Result<Self> {
        let specs = vision_tensors(cfg, projection_dim.unwrap_or(0));
        let get = |i: usize| src.get(&specs[i].name, &specs[i].shape);
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let eps = cfg.layer_norm_eps;
        let projection = match projection_dim {
            Some(pd) => {
                Some(Linear::new(src.get(VISUAL_PROJECTION, &[pd, d])?, None)?.packed_for(src)?)
            }
            None => None,
        };
        Ok(VisionTower {
            cfg: cfg.clone(),
            class_embedding: get(0)?,
            // Stride = kernel = patch size, so the conv is a matmul over flattened patches.
            patch: Linear::new(get(1)?.reshape((d, c * p * p))?, None)?.packed_for(src)?,
            position: get(2)?,
            pre: Norm::load(src, "vision_model.pre_layrnorm", d, eps)?,
            layers: load_layers(
                src,
                layer_prefix,
                cfg.num_hidden_layers,
                &LayerDims {
                    d,
                    m: cfg.intermediate_size,
                    heads: cfg.num_attention_heads,
                    act: cfg.hidden_act,
                    eps,
                },
            )?,
            post: Norm::load(src, "vision_model.post_layernorm", d, eps)?,
            projection,
        })
    }

    /// Image embeddings (projected when the tower has a projection), not normalised:
    /// `pixels` is `[B, C, H, W]` at the config's image size.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        if pixels.device().is_cpu() {
            // On a rayon worker, each parallel kernel of the pass splits on this thread and wakes
            // the other workers; from outside the pool every kernel is injected into it and this
            // thread sleeps until it is woken again (B/32 at batch 1 with bf16 matmuls on two
            // Xeon cores: 14.6 against 12.6 ms per image).
            return rayon::scope(|_| self.forward_here(pixels));
        }
        self.forward_here(pixels)
    }

    fn forward_here(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        let b = pixels.dim(0)?;
        if b > CPU_CHUNK
            && self.patch.cpu_inference()
            && fused::usable(&[pixels])
            && pixels.device().is_cpu()
        {
            let parts = (0..b)
                .step_by(CPU_CHUNK)
                .map(|s| self.forward_here(&pixels.narrow(0, s, CPU_CHUNK.min(b - s))?))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let mut x = self.embed(pixels)?;
        if let Some((last, rest)) = self.layers.split_last() {
            for layer in rest {
                x = layer.forward(&x, None)?;
            }
            x = last.forward_rows(&x, None, true)?;
        }
        self.pool(&x)
    }

    /// As [`VisionTower::forward`], unfused, handing each encoder linear layer's input
    /// (`[B, N, in]`) to `record` with the names of the weights that read it: RegMean's
    /// statistics. The patch embedding (a convolution) and the projection are not recorded.
    pub fn forward_recording(&self, pixels: &Tensor, record: &mut Recorder) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        let mut x = self.embed(pixels)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward_recording(&x, &layer_prefix(i), record)?;
        }
        self.pool(&x)
    }

    /// Encoder layers, for passes that go layer by layer.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Encoder layer `l` on `x` (`[B, N, D]`, every token), handing each of its linear layers'
    /// inputs to `record` when given (as [`VisionTower::forward_recording`]).
    pub fn forward_layer(
        &self,
        l: usize,
        x: &Tensor,
        record: Option<&mut Recorder>,
    ) -> Result<Tensor> {
        let layer = self.layers.get(l).ok_or_else(|| {
            ClipError::Config(format!(
                "the tower has {} layers, not {}",
                self.layers.len(),
                l + 1
            ))
        })?;
        match record {
            Some(r) => layer.forward_recording(x, &layer_prefix(l), r),
            None => layer.forward(x, None),
        }
    }

    fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let (_, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || h != s || w != s {
            return Err(ClipError::Image(format!(
                "pixel batch has shape {:?}, expected [B, {}, {s}, {s}]",
                pixels.dims(),
                self.cfg.num_channels
            )));
        }
        Ok(())
    }

    /// Patch and position embeddings with the class token, after the pre-LayerNorm: the first
    /// encoder layer's input, `[B, N, D]`.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.check_pixels(pixels)?;
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let pixels = pixels.to_dtype(self.patch.input_dtype())?;
        let (gh, gw) = (h / p, w / p);
        let tokens = match self.packed_patches(&pixels)? {
            Some(t) => t,
            None => {
                let patches = pixels
                    .reshape((b, c, gh, p, gw, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .contiguous()?
                    .reshape((b, gh * gw, c * p * p))?;
                self.patch.forward(&patches)?
            }
        };
        let d = self.cfg.hidden_size;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = repeat_rows(&Tensor::cat(&[&cls, &tokens], 1)?, &self.position, false)?;
        self.pre.forward(&x)
    }

    /// The patch embedding [B, N, D] when its weight is packed for a bf16 kernel, each patch
    /// rounded straight from the pixels (the patches' f32 copy was 19 MB at B/32 batch 32).
    fn packed_patches(&self, pixels: &Tensor) -> Result<Option<Tensor>> {
        if !self.patch.is_packed() {
            return Ok(None);
        }
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let gw = w / p;
        let n = (h / p) * gw;
        let tokens = with_f32s([pixels], [], |[px], []| {
            // Row i is patch i % n of image i / n: (channel, row, column) of its p × p pixels.
            let row = |i: usize, buf: &mut [f32]| {
                let (img, at) = (i / n, i % n);
                let (y0, x0) = ((at / gw) * p, (at % gw) * p);
                for ch in 0..c {
                    for dy in 0..p {
                        let src = ((img * c + ch) * h + y0 + dy) * w + x0;
                        buf[(ch * p + dy) * p..][..p].copy_from_slice(&px[src..src + p]);
                    }
                }
            };
            self.patch.packed_rows(b * n, &row, pixels.device())
        })??;
        Ok(tokens
            .map(|t| t.reshape((b, n, self.cfg.hidden_size)))
            .transpose()?)
    }

    /// The class token after the post-LayerNorm, projected when the tower has a projection.
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = self.post.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        match &self.projection {
            Some(proj) => Ok(proj.forward(&pooled)?),
            None => Ok(pooled),
        }
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Qkv;
    use crate::model::test_values::{max_diff, rand, tracked};
    use std::collections::HashMap;

    fn tiny_weights(track: bool) -> HashMap<String, Tensor> {
        let cfg = tiny();
        vision_tensors(&cfg, 8)
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                // Unit scale: at 0.3 the attention was so near uniform that a wrong scale in the
                // fused attention moved the embeddings by 6e-6 and this test still passed.
                let t = rand(&spec.shape, 0.0, i as u64);
                (spec.name, if track { tracked(&t) } else { t })
            })
            .collect()
    }

    fn tiny() -> VisionConfig {
        VisionConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 8,
            patch_size: 4,
            ..VisionConfig::default()
        }
    }

    #[test]
    fn inference_tower_matches_the_differentiable_tower() {
        let fast = VisionTower::new(&tiny(), Some(8), &tiny_weights(false)).unwrap();
        let slow = VisionTower::new(&tiny(), Some(8), &tiny_weights(true)).unwrap();
        assert!(matches!(fast.layers[0].qkv, Qkv::Stacked(_)));
        assert!(matches!(slow.layers[0].qkv, Qkv::Separate { .. }));
        let px = rand(&[3, 3, 8, 8], 0.0, 9);
        let (a, b) = (fast.forward(&px).unwrap(), slow.forward(&px).unwrap());
        assert!(!a.track_op() && b.track_op());
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    }

    /// The recording pass computes what the fused passes compute (stacked and separate q/k/v)
    /// and hands over each encoder linear layer's input, named by the weights that read it.
    #[test]
    fn the_recording_pass_matches_forward_and_names_every_linear_input() {
        for track in [false, true] {
            let tower = VisionTower::new(&tiny(), Some(8), &tiny_weights(track)).unwrap();
            let px = rand(&[3, 3, 8, 8], 0.0, 11);
            let mut seen: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
            let recorded = tower
                .forward_recording(&px, &mut |names, x| {
                    seen.push((names.to_vec(), x.dims().to_vec()));
                    Ok(())
                })
                .unwrap();
            let d = max_diff(&recorded, &tower.forward(&px).unwrap());
            assert!(d < 1e-5, "track {track}: {d}");
            assert_eq!(seen.len(), 8);
            let l1 = "vision_model.encoder.layers.1";
            assert_eq!(
                seen[4].0,
                ["q_proj", "k_proj", "v_proj"].map(|p| format!("{l1}.self_attn.{p}.weight"))
            );
            assert_eq!(seen[4].1, [3, 5, 16]);
            assert_eq!(seen[7].0, [format!("{l1}.mlp.fc2.weight")]);
            assert_eq!(seen[7].1, [3, 5, 32]);
        }
    }

    /// Patches rounded straight from the pixels equal the plain path's copied patches through
    /// the same packed weight, bit for bit, on every bf16 kernel this CPU has.
    #[test]
    fn packed_patches_match_the_copied_patches() {
        let w = tiny_weights(false);
        let kernels = crate::model::bf16_gemm::available();
        if kernels.is_empty() {
            eprintln!("no bf16 kernel on this CPU: patches are always copied");
        }
        for kernel in kernels {
            let src = crate::model::Bf16Matmuls(&w, Some(kernel));
            let tower = VisionTower::new(&tiny(), Some(8), &src).unwrap();
            let px = rand(&[3, 3, 8, 8], 0.0, 12);
            let fast = tower.packed_patches(&px).unwrap().expect("packed");
            let patches = px
                .reshape((3, 3, 2, 4, 2, 4))
                .unwrap()
                .permute((0, 2, 4, 1, 3, 5))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((3, 4, 48))
                .unwrap();
            let slow = tower.patch.forward(&patches).unwrap();
            assert_eq!(max_diff(&fast, &slow), 0.0, "{kernel:?}");
        }
        let plain = VisionTower::new(&tiny(), Some(8), &w).unwrap();
        assert!(plain
            .packed_patches(&rand(&[1, 3, 8, 8], 0.0, 1))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_large_batch_runs_in_chunks_with_the_same_result() {
        let tower = VisionTower::new(&tiny(), Some(8), &tiny_weights(false)).unwrap();
        assert!(tower.patch.cpu_inference());
        let n = 2 * CPU_CHUNK + 5;
        let px = rand(&[n, 3, 8, 8], 0.0, 10);
        let all = tower.forward(&px).unwrap();
        assert_eq!(all.dims(), &[n, 8]);
        for i in [0, CPU_CHUNK - 1, CPU_CHUNK, n - 1] {
            let one = tower.forward(&px.narrow(0, i, 1).unwrap()).unwrap();
            let d = max_diff(&all.narrow(0, i, 1).unwrap(), &one);
            assert!(d < 1e-5, "image {i}: {d}");
        }
    }
}
