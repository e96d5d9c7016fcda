//! Reading and writing safetensors files as plain f32 tensors with their names and metadata.

use crate::{CoreError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// One tensor read from a file, converted to f32 (`data` is empty for non-float tensors).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Vec<f32>,
}

impl RawTensor {
    pub fn is_float(&self) -> bool {
        is_float(self.dtype)
    }
}

pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Reads every tensor of a safetensors file. Float tensors are converted to f32; others keep
/// their name, shape and dtype with no data so callers can skip them (integer buffers).
pub fn read_file(path: &Path) -> Result<(Vec<RawTensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::file(path, e))?;
    read_bytes(&bytes).map_err(|e| match e {
        CoreError::Invalid(m) => CoreError::file(path, m),
        other => other,
    })
}

pub fn read_bytes(bytes: &[u8]) -> Result<(Vec<RawTensor>, HashMap<String, String>)> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| CoreError::Invalid(format!("not a safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CoreError::Invalid(format!("not a safetensors file: {e}")))?;
    let mut out: Vec<RawTensor> = st
        .iter()
        .map(|(name, view)| RawTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            dtype: view.dtype(),
            data: to_f32(&view),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, metadata))
}

/// Converts a float view to f32; non-float views give an empty vector.
pub fn to_f32(view: &TensorView<'_>) -> Vec<f32> {
    let d = view.data();
    match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => Vec::new(),
    }
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl safetensors::View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors with metadata, atomically (temporary file then rename), so a crash never
/// leaves a half-written file under the final name.
pub fn write_file(
    path: &Path,
    tensors: &[OutTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let data: Vec<(&str, &OutTensor)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let bytes = safetensors::serialize(data, Some(metadata))
        .map_err(|e| CoreError::file(path, format!("cannot serialise: {e}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| CoreError::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CoreError::file(path, e))
}
