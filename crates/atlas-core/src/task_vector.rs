//! Task vectors τ = θ_ft − θ0 over a manifest: validated on the way in, stored at half precision
//! (or f32), written as safetensors with their provenance in the metadata.

use crate::buffer::{Buffer, StorageDType};
use crate::manifest::{Manifest, TensorSpec};
use crate::safetensors_io::{self, is_float, printable, OutTensor, RawTensor};
use crate::{CoreError, Result};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Where a task vector came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskVectorMeta {
    pub name: String,
    /// Id of the pre-trained model the deltas are relative to (e.g. a hub id).
    pub base_model: String,
    /// Digest of the base image-tower weights.
    pub base_digest: String,
    /// What the fine-tuned weights were (a path, a hub id, "delta file ...").
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct TaskVector {
    pub meta: TaskVectorMeta,
    manifest_digest: String,
    dtype: StorageDType,
    blocks: Vec<Buffer>,
    digest: String,
}

/// A named delta, f32.
pub struct Delta {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl From<RawTensor> for Delta {
    fn from(t: RawTensor) -> Self {
        Delta {
            name: t.name,
            shape: t.shape,
            data: t.data,
        }
    }
}

const FORMAT: &str = "atlas-task-vector/1";

/// Longest task-vector name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// A task-vector name is listed, used in requests and may end up in a file name, so it must
/// be 1 to [`MAX_NAME_CHARS`] characters with no control characters (NUL, newlines) and no
/// path separators, and not be `.` or `..`.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(CoreError::Invalid(format!(
            "task vector name \"{}\" {why}",
            printable(name)
        )))
    };
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return bad(&format!(
            "has {chars} characters, allowed are 1 to {MAX_NAME_CHARS}"
        ));
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if name.contains(['/', '\\']) || name == "." || name == ".." {
        return bad("must not be a path (no /, \\, . or ..)");
    }
    Ok(())
}

impl TaskVector {
    /// Builds a task vector from named deltas. Every delta must name a manifest tensor with the
    /// manifest's shape; a manifest tensor with no delta is an error unless `may_be_missing`
    /// says it is absent from such checkpoints (it is then a zero delta).
    pub fn from_deltas(
        manifest: &Manifest,
        meta: TaskVectorMeta,
        dtype: StorageDType,
        deltas: impl IntoIterator<Item = Delta>,
        may_be_missing: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        check_name(&meta.name)?;
        let mut by_name: HashMap<String, Delta> = HashMap::new();
        for d in deltas {
            let spec = check_spec(manifest, &d.name, &d.shape)?;
            if d.data.len() != spec.numel() {
                return Err(CoreError::tensor(
                    &d.name,
                    "data length does not match its shape",
                ));
            }
            if let Some(i) = d.data.iter().position(|x| !x.is_finite()) {
                return Err(CoreError::tensor(
                    &d.name,
                    format!("element {i} is not finite"),
                ));
            }
            // A finite f32 can still overflow half precision (65504 for f16) and be stored
            // as an infinity that would poison every composition.
            if let Some(i) = d.data.iter().position(|&x| !fits(dtype, x)) {
                return Err(CoreError::tensor(
                    &d.name,
                    format!(
                        "element {i} is {}, beyond the range of {dtype:?} storage",
                        d.data[i]
                    ),
                ));
            }
            let name = d.name.clone();
            if by_name.insert(name.clone(), d).is_some() {
                return Err(CoreError::tensor(name, "appears twice"));
            }
        }
        let mut blocks = Vec::with_capacity(manifest.len());
        for block in manifest.blocks() {
            let mut data = Vec::with_capacity(block.numel());
            for t in &block.tensors {
                match by_name.remove(&t.name) {
                    Some(d) => data.extend_from_slice(&d.data),
                    None if may_be_missing(&t.name) => data.resize(data.len() + t.numel(), 0.0),
                    None => {
                        return Err(CoreError::tensor(
                            &t.name,
                            format!("missing from {}", meta.source),
                        ))
                    }
                }
            }
            blocks.push(Buffer::from_f32(&data, dtype));
        }
        Ok(Self::assemble(manifest, meta, dtype, blocks))
    }

    /// Assembles a task vector from per-block buffers already in manifest layout (used to mix
    /// blocks of several task vectors).
    pub fn from_buffers(
        manifest: &Manifest,
        meta: TaskVectorMeta,
        dtype: StorageDType,
        blocks: Vec<Buffer>,
    ) -> Result<Self> {
        check_name(&meta.name)?;
        if blocks.len() != manifest.len() {
            return Err(CoreError::Invalid(format!(
                "{} blocks given, the manifest has {}",
                blocks.len(),
                manifest.len()
            )));
        }
        for (block, buf) in manifest.blocks().iter().zip(&blocks) {
            if buf.len() != block.numel() {
                return Err(CoreError::tensor(
                    &block.name,
                    format!("has {} elements, expected {}", buf.len(), block.numel()),
                ));
            }
        }
        Ok(Self::assemble(manifest, meta, dtype, blocks))
    }

    fn assemble(
        manifest: &Manifest,
        meta: TaskVectorMeta,
        dtype: StorageDType,
        blocks: Vec<Buffer>,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(manifest.digest());
        h.update(format!("{dtype:?}"));
        for (block, buf) in manifest.blocks().iter().zip(&blocks) {
            h.update(&block.name);
            h.update(buf.le_bytes());
        }
        let digest = hex::encode(h.finalize());
        TaskVector {
            meta,
            manifest_digest: manifest.digest().to_string(),
            dtype,
            blocks,
            digest,
        }
    }

    /// Loads a delta safetensors file written in the manifest's tensor names. Integer tensors
    /// (buffers such as position ids) are skipped; other non-float tensors are errors.
    pub fn load(
        path: &Path,
        manifest: &Manifest,
        dtype: StorageDType,
        may_be_missing: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| CoreError::file(path, e))?;
        let defaults = TaskVectorMeta {
            name: file_stem(path),
            source: path.display().to_string(),
            ..TaskVectorMeta::default()
        };
        Self::from_bytes(&bytes, manifest, dtype, may_be_missing, defaults)
            .map_err(|e| in_file(e, path))
    }

    /// Parses a task vector from safetensors bytes in the manifest's tensor names (an upload
    /// or a file's contents). The file's metadata gives the provenance; `defaults` fills what
    /// it lacks. Integer tensors that are not manifest tensors (buffers such as position ids)
    /// are skipped. Every tensor's name, dtype and shape are checked against the manifest
    /// before its data is converted, so memory stays within a small multiple of the input.
    pub fn from_bytes(
        bytes: &[u8],
        manifest: &Manifest,
        dtype: StorageDType,
        may_be_missing: &dyn Fn(&str) -> bool,
        defaults: TaskVectorMeta,
    ) -> Result<Self> {
        let (st, md) = safetensors_io::parse(bytes)?;
        let field = |key: &str, default: String| md.get(key).cloned().unwrap_or(default);
        let meta = TaskVectorMeta {
            name: field("name", defaults.name),
            base_model: field("base_model", defaults.base_model),
            base_digest: field("base_digest", defaults.base_digest),
            source: field("source", defaults.source),
        };
        check_name(&meta.name)?;
        let deltas = checked_deltas(&st, manifest)?;
        Self::from_deltas(manifest, meta, dtype, deltas, may_be_missing)
    }

    /// Writes the task vector as safetensors at its storage dtype, with provenance metadata.
    pub fn save(&self, path: &Path, manifest: &Manifest) -> Result<()> {
        self.check_manifest(manifest)?;
        let st_dtype = match self.dtype {
            StorageDType::F32 => Dtype::F32,
            StorageDType::F16 => Dtype::F16,
            StorageDType::BF16 => Dtype::BF16,
        };
        let mut out = Vec::new();
        for (block, buf) in manifest.blocks().iter().zip(&self.blocks) {
            let stored = Buffer::from_f32(&buf.to_f32_vec(), self.dtype);
            let bytes = match stored {
                Buffer::Zero(n) => vec![0u8; n * self.dtype.size_in_bytes()],
                b => b.le_bytes(),
            };
            let mut offset = 0;
            for t in &block.tensors {
                let n = t.numel() * self.dtype.size_in_bytes();
                out.push(OutTensor {
                    name: t.name.clone(),
                    dtype: st_dtype,
                    shape: t.shape.clone(),
                    bytes: bytes[offset..offset + n].to_vec(),
                });
                offset += n;
            }
        }
        let md = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("name".to_string(), self.meta.name.clone()),
            ("base_model".to_string(), self.meta.base_model.clone()),
            ("base_digest".to_string(), self.meta.base_digest.clone()),
            ("source".to_string(), self.meta.source.clone()),
            ("manifest_digest".to_string(), self.manifest_digest.clone()),
            ("digest".to_string(), self.digest.clone()),
        ]);
        safetensors_io::write_file(path, &out, md)
    }

    pub fn check_manifest(&self, manifest: &Manifest) -> Result<()> {
        if self.manifest_digest != manifest.digest() {
            return Err(CoreError::Invalid(format!(
                "task vector {} was built for another block manifest",
                self.meta.name
            )));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }
    pub fn block(&self, b: usize) -> &Buffer {
        &self.blocks[b]
    }
    pub fn blocks(&self) -> &[Buffer] {
        &self.blocks
    }
    /// ‖τ_b‖ for every block b, in manifest order.
    pub fn block_norms(&self) -> Vec<f64> {
        self.blocks.iter().map(Buffer::l2_norm).collect()
    }
    pub fn dtype(&self) -> StorageDType {
        self.dtype
    }
    /// SHA-256 of the stored deltas (and the manifest they are over).
    pub fn digest(&self) -> &str {
        &self.digest
    }
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }
    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        self.blocks.iter().map(Buffer::nbytes).sum()
    }
    /// The delta of one tensor, as f32.
    pub fn tensor_f32(&self, manifest: &Manifest, name: &str) -> Option<Vec<f32>> {
        let loc = manifest.locate(name)?;
        let mut out = vec![0.0; loc.numel];
        self.blocks.get(loc.block)?.read_f32(loc.offset, &mut out);
        Some(out)
    }
}

/// The float tensors of a parsed file as deltas, each checked against the manifest before
/// conversion; integer tensors that are not manifest tensors are skipped.
fn checked_deltas(st: &SafeTensors<'_>, manifest: &Manifest) -> Result<Vec<Delta>> {
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (name, view) in views {
        let float = is_float(view.dtype());
        if !float && manifest.locate(&name).is_none() {
            continue;
        }
        check_spec(manifest, &name, view.shape())?;
        if !float {
            return Err(CoreError::tensor(
                &name,
                format!("has dtype {:?}, expected a float type", view.dtype()),
            ));
        }
        out.push(Delta {
            data: safetensors_io::to_f32(&view),
            shape: view.shape().to_vec(),
            name,
        });
    }
    Ok(out)
}

/// Whether the finite `x` stays finite when stored at `dtype`.
pub(crate) fn fits(dtype: StorageDType, x: f32) -> bool {
    match dtype {
        StorageDType::F32 => true,
        StorageDType::F16 => half::f16::from_f32(x).is_finite(),
        StorageDType::BF16 => half::bf16::from_f32(x).is_finite(),
    }
}

/// A delta's name must be a manifest tensor and its shape the manifest's.
fn check_spec<'m>(manifest: &'m Manifest, name: &str, shape: &[usize]) -> Result<&'m TensorSpec> {
    let spec = manifest.spec(name).ok_or_else(|| {
        CoreError::tensor(
            printable(name),
            "is not a tensor of the backbone's image tower",
        )
    })?;
    if spec.shape != shape {
        return Err(CoreError::tensor(
            name,
            format!(
                "has shape {}, the backbone has {:?}",
                printable(&format!("{shape:?}")),
                spec.shape
            ),
        ));
    }
    Ok(spec)
}

/// Keeps float tensors; skips integer buffers that are not manifest tensors.
pub fn float_deltas(tensors: Vec<RawTensor>, manifest: &Manifest) -> Result<Vec<Delta>> {
    let mut out = Vec::new();
    for t in tensors {
        if t.is_float() {
            out.push(Delta::from(t));
        } else if manifest.locate(&t.name).is_some() {
            return Err(CoreError::tensor(
                &t.name,
                format!("has dtype {:?}, expected a float type", t.dtype),
            ));
        }
    }
    Ok(out)
}

fn in_file(e: CoreError, path: &Path) -> CoreError {
    match e {
        CoreError::File { .. } => e,
        other => CoreError::file(path, other),
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
