//! The resident backbone: the pre-trained image tower kept as composable blocks (θ0), the frozen
//! text tower, the logit scale and the tokenizer; builds image towers over θ0 or over a
//! composition θ0 + Σ Λ τ, and task vectors relative to θ0.

use crate::checkpoint::Checkpoint;
use crate::config::{ClipConfig, VisionConfig};
use crate::device_compose::DeviceComposer;
use crate::manifest::{vision_manifest, vision_tensors, QkvBlocks, VISUAL_PROJECTION};
use crate::model::{bf16_gemm, Bf16Matmuls, TextTower, VisionTower, WeightSource};
use crate::tokenizer::ClipTokenizer;
use crate::{openclip, ClipError, Result};
use atlas_core::safetensors_io::{self, RawTensor};
use atlas_core::task_vector::{float_deltas, Delta};
use atlas_core::{
    compose, Coefficients, Manifest, Real, StorageDType, TaskVector, TaskVectorMeta, TensorSpec,
};
use candle_core::{DType, Device, Tensor, WithDType};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the towers (f32, f16 or bf16); composition always runs in f32.
    pub dtype: DType,
    pub qkv: QkvBlocks,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            qkv: QkvBlocks::Separate,
        }
    }
}

pub struct Backbone {
    pub id: String,
    pub config: ClipConfig,
    manifest: Arc<Manifest>,
    base: Vec<Vec<f32>>,
    base_digest: String,
    text: Option<TextTower>,
    logit_scale: f64,
    tokenizer: Option<ClipTokenizer>,
    opts: LoadOptions,
    /// θ0 and the task vectors resident on a CUDA device, made at the first composition there.
    device_composer: Mutex<Option<Arc<DeviceComposer>>>,
}

impl Backbone {
    /// Loads a full `CLIPModel` checkpoint (directory or hub id).
    pub fn load(model: &str, opts: LoadOptions) -> Result<Self> {
        Self::from_checkpoint(Checkpoint::open(model)?, opts)
    }

    pub fn from_checkpoint(ckpt: Checkpoint, opts: LoadOptions) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let text_cfg = cfg.text.clone().ok_or_else(|| {
            ClipError::file(
                &ckpt.files.config,
                "is a vision-only config; the backbone needs a full CLIPModel",
            )
        })?;
        let manifest = Arc::new(vision_manifest(&cfg.vision, cfg.projection_dim, opts.qkv));
        let mut by_name: HashMap<String, RawTensor> = ckpt
            .tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let base = base_blocks(&manifest, &mut by_name)?;
        let base_digest = digest_base(
            &manifest,
            &base,
            &vision_tensors(&cfg.vision, cfg.projection_dim),
        );
        let logit_scale = match by_name.get("logit_scale") {
            Some(t) if t.data.len() == 1 => t.data[0] as f64,
            _ => {
                return Err(ClipError::tensor(
                    "logit_scale",
                    "missing from the checkpoint or not a scalar",
                ))
            }
        };
        let text_src = RawSource {
            tensors: &by_name,
            device: &opts.device,
            dtype: opts.tensor_dtype(),
        };
        let text = TextTower::new(&text_cfg, cfg.projection_dim, &opts.source(&text_src))?;
        let tokenizer = match &ckpt.files.tokenizer {
            Some(p) => Some(ClipTokenizer::from_file(p)?),
            None => None,
        };
        Ok(Backbone {
            id: ckpt.files.id.clone(),
            config: cfg,
            manifest,
            base,
            base_digest,
            text: Some(text),
            logit_scale,
            tokenizer,
            opts,
            device_composer: Mutex::default(),
        })
    }

    /// A backbone with only an image tower, from θ0 given per block (benchmarks and tests on
    /// random weights; no text tower, so no zero-shot heads).
    pub fn from_vision_blocks(
        id: &str,
        config: ClipConfig,
        base: Vec<Vec<f32>>,
        opts: LoadOptions,
    ) -> Result<Self> {
        let manifest = Arc::new(vision_manifest(
            &config.vision,
            config.projection_dim,
            opts.qkv,
        ));
        if base.len() != manifest.len()
            || base
                .iter()
                .zip(manifest.blocks())
                .any(|(b, m)| b.len() != m.numel())
        {
            return Err(ClipError::Config(
                "the base blocks do not match the image tower's manifest".into(),
            ));
        }
        let base_digest = digest_base(
            &manifest,
            &base,
            &vision_tensors(&config.vision, config.projection_dim),
        );
        Ok(Backbone {
            id: id.to_string(),
            config,
            manifest,
            base,
            base_digest,
            text: None,
            logit_scale: 100f64.ln(),
            tokenizer: None,
            opts,
            device_composer: Mutex::default(),
        })
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }
    /// SHA-256 of θ0 (the image-tower blocks as f32).
    pub fn base_digest(&self) -> &str {
        &self.base_digest
    }
    /// θ0, one vector per block (tensors of a block concatenated).
    pub fn base_blocks(&self) -> &[Vec<f32>] {
        &self.base
    }
    pub fn text(&self) -> Option<&TextTower> {
        self.text.as_ref()
    }
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.tokenizer.as_ref()
    }
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }
    pub fn device(&self) -> &Device {
        &self.opts.device
    }
    pub fn dtype(&self) -> DType {
        self.opts.dtype
    }
    /// The bf16 kernel the towers' CPU matmuls (and a learning step's products) run on.
    pub fn bf16_kernel(&self) -> Option<bf16_gemm::Kernel> {
        self.opts.bf16_kernel()
    }

    /// The image tower over any weight source that has the manifest's tensors.
    pub fn vision(&self, src: &dyn WeightSource) -> Result<VisionTower> {
        let src = self.opts.source(src);
        VisionTower::new(&self.config.vision, Some(self.config.projection_dim), &src)
    }

    /// The pre-trained image tower.
    pub fn base_vision(&self) -> Result<VisionTower> {
        let w = block_tensors(
            &self.manifest,
            self.base.clone(),
            &self.opts.device,
            self.opts.tensor_dtype(),
        )?;
        self.vision(&w)
    }

    /// θ0 + Σ Λ τ as tensors, composed in f32 without an autograd graph: on the CPU, or on a
    /// CUDA device by one kernel over task vectors kept resident there.
    pub fn compose(
        &self,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
    ) -> Result<HashMap<String, Tensor>> {
        if self.opts.device.is_cuda() && crate::cuda_kernels_on() {
            return self.device_composer()?.compose(tvs, coefs, self.opts.dtype);
        }
        let blocks: Vec<Vec<f32>> = compose(&self.manifest, &self.base, tvs, coefs)?;
        block_tensors(
            &self.manifest,
            blocks,
            &self.opts.device,
            self.opts.tensor_dtype(),
        )
    }

    /// The composer on this backbone's device (θ0 uploaded on first use).
    pub fn device_composer(&self) -> Result<Arc<DeviceComposer>> {
        let mut slot = self
            .device_composer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(dc) = slot.as_ref() {
            return Ok(dc.clone());
        }
        let dc = Arc::new(DeviceComposer::new(
            self.manifest.clone(),
            &self.base,
            &self.opts.device,
        )?);
        *slot = Some(dc.clone());
        Ok(dc)
    }

    /// The image tower of a composition.
    pub fn composed_vision(
        &self,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
    ) -> Result<VisionTower> {
        self.vision(&self.compose(tvs, coefs)?)
    }

    /// A task vector τ = θ_ft − θ0 from a fine-tuned checkpoint (a `CLIPVisionModel` or a full
    /// `CLIPModel`; only image-tower tensors are used, a missing visual projection is a zero
    /// delta).
    pub fn task_vector_from_checkpoint(
        &self,
        ft: Checkpoint,
        name: &str,
        dtype: StorageDType,
    ) -> Result<TaskVector> {
        if !same_tower(&ft.config.vision, &self.config.vision) {
            return Err(ClipError::file(
                &ft.files.config,
                "the image tower's configuration differs from the backbone's",
            ));
        }
        let path = ft.files.weights.clone();
        let deltas: Vec<Delta> = ft
            .tensors
            .into_iter()
            .filter(|t| t.name.starts_with("vision_model.") || t.name == VISUAL_PROJECTION)
            .filter(|t| t.is_float() || self.manifest.locate(&t.name).is_some())
            .map(|t| self.delta_from_weights(t))
            .collect::<Result<_>>()
            .map_err(|e| ClipError::file(&path, e))?;
        let meta = self.meta(name, &ft.files.id);
        Ok(TaskVector::from_deltas(
            &self.manifest,
            meta,
            dtype,
            deltas,
            &may_be_missing,
        )?)
    }

    fn delta_from_weights(&self, t: RawTensor) -> Result<Delta> {
        let loc = self
            .manifest
            .locate(&t.name)
            .ok_or_else(|| ClipError::tensor(&t.name, "is not an image-tower tensor"))?;
        if !t.is_float() {
            return Err(ClipError::tensor(
                &t.name,
                format!("has dtype {:?}, expected a float type", t.dtype),
            ));
        }
        let spec = self.manifest.spec(&t.name).expect("located");
        if spec.shape != t.shape {
            return Err(ClipError::tensor(
                &t.name,
                format!("has shape {:?}, the backbone has {:?}", t.shape, spec.shape),
            ));
        }
        let base = &self.base[loc.block][loc.offset..loc.offset + loc.numel];
        let data = t.data.iter().zip(base).map(|(f, b)| f - b).collect();
        Ok(Delta {
            name: t.name,
            shape: t.shape,
            data,
        })
    }

    /// Loads a delta safetensors file, in Hugging Face or open_clip naming.
    pub fn load_task_vector(
        &self,
        path: &Path,
        name: Option<&str>,
        dtype: StorageDType,
    ) -> Result<TaskVector> {
        let (tensors, md) = safetensors_io::read_file(path)?;
        let name = name
            .map(str::to_string)
            .or_else(|| md.get("name").cloned())
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let deltas = if openclip::is_open_clip(&tensors) {
            openclip::to_hf(tensors)
        } else {
            float_deltas(tensors, &self.manifest).map_err(ClipError::from)
        }
        .map_err(|e| ClipError::file(path, e))?;
        let mut meta = self.meta(
            &name,
            md.get("source").map_or(&path.display().to_string(), |s| s),
        );
        if let Some(d) = md.get("base_digest") {
            meta.base_digest = d.clone();
        }
        if let Some(m) = md.get("base_model") {
            meta.base_model = m.clone();
        }
        TaskVector::from_deltas(&self.manifest, meta, dtype, deltas, &may_be_missing)
            .map_err(|e| ClipError::file(path, e))
    }

    fn meta(&self, name: &str, source: &str) -> TaskVectorMeta {
        TaskVectorMeta {
            name: name.to_string(),
            base_model: self.id.clone(),
            base_digest: self.base_digest.clone(),
            source: source.to_string(),
        }
    }
}

impl LoadOptions {
    /// bf16 on the CPU means bf16 matmuls over f32 activations: the towers' tensors are made
    /// in f32 and their matmul weights packed in bf16 (`Bf16Matmuls`).
    fn cpu_bf16(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::BF16
    }

    /// The dtype the towers' tensors are made in.
    pub fn tensor_dtype(&self) -> DType {
        if self.cpu_bf16() {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The bf16 kernel the towers' CPU matmuls run on: with bf16 on a CPU that has one (the
    /// f32 path otherwise).
    pub fn bf16_kernel(&self) -> Option<bf16_gemm::Kernel> {
        bf16_gemm::chosen().filter(|_| self.cpu_bf16())
    }

    /// `src` as the towers read it: with packed bf16 matmuls where `bf16_kernel` names one.
    pub fn source<'a>(&self, src: &'a dyn WeightSource) -> Bf16Matmuls<'a> {
        Bf16Matmuls(src, self.bf16_kernel())
    }
}

/// Whether two configs describe the same image tower. `projection_dim` is left out: it sizes a
/// head a `CLIPVisionModel` does not have (configs that omit it read as 512), and a projection
/// that is present has its shape checked against the manifest.
fn same_tower(a: &VisionConfig, b: &VisionConfig) -> bool {
    let a = VisionConfig {
        projection_dim: b.projection_dim,
        ..a.clone()
    };
    a == *b
}

/// Fine-tuned `CLIPVisionModel` checkpoints have no visual projection: it stays θ0's.
pub fn may_be_missing(name: &str) -> bool {
    name == VISUAL_PROJECTION
}

fn base_blocks(
    manifest: &Manifest,
    by_name: &mut HashMap<String, RawTensor>,
) -> Result<Vec<Vec<f32>>> {
    manifest
        .blocks()
        .iter()
        .map(|block| {
            let mut data = Vec::with_capacity(block.numel());
            for spec in &block.tensors {
                let t = by_name
                    .remove(&spec.name)
                    .ok_or_else(|| ClipError::tensor(&spec.name, "missing from the checkpoint"))?;
                if t.shape != spec.shape {
                    return Err(ClipError::tensor(
                        &spec.name,
                        format!("has shape {:?}, expected {:?}", t.shape, spec.shape),
                    ));
                }
                if !t.is_float() {
                    return Err(ClipError::tensor(
                        &spec.name,
                        format!("has dtype {:?}, expected a float type", t.dtype),
                    ));
                }
                data.extend_from_slice(&t.data);
            }
            Ok(data)
        })
        .collect()
}

/// SHA-256 of θ0's tensors in Hugging Face parameter order (`order`), whatever the q/k/v block
/// grouping: a task vector saved over one layout is relative to the same base under the other.
fn digest_base(manifest: &Manifest, blocks: &[Vec<f32>], order: &[TensorSpec]) -> String {
    let mut h = Sha256::new();
    for spec in order {
        let loc = manifest.locate(&spec.name).expect("manifest tensor");
        for x in &blocks[loc.block][loc.offset..loc.offset + loc.numel] {
            h.update(x.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Splits per-block vectors (as atlas-core lays them out) into named tensors.
pub fn block_tensors<T: Real + WithDType>(
    manifest: &Manifest,
    blocks: Vec<Vec<T>>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (block, data) in manifest.blocks().iter().zip(blocks) {
        if block.tensors.len() == 1 {
            let spec = &block.tensors[0];
            let t = Tensor::from_vec(data, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
            out.insert(spec.name.clone(), t);
            continue;
        }
        let mut offset = 0;
        for spec in &block.tensors {
            let n = spec.numel();
            let t = Tensor::from_slice(&data[offset..offset + n], spec.shape.as_slice(), device)?
                .to_dtype(dtype)?;
            out.insert(spec.name.clone(), t);
            offset += n;
        }
    }
    Ok(out)
}

/// Weights straight from a checkpoint's raw tensors.
struct RawSource<'a> {
    tensors: &'a HashMap<String, RawTensor>,
    device: &'a Device,
    dtype: DType,
}

impl WeightSource for RawSource<'_> {
    fn find(&self, name: &str) -> Option<Tensor> {
        let t = self.tensors.get(name)?;
        Tensor::from_slice(&t.data, t.shape.as_slice(), self.device)
            .ok()?
            .to_dtype(self.dtype)
            .ok()
    }
}
