//! Storage of one block of a task vector: half precision (f16 or bf16) or f32, converted to the
//! compute type a chunk at a time. An all-zero block takes no memory.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use serde::{Deserialize, Serialize};

/// The dtype task vectors are stored at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageDType {
    F32,
    #[default]
    F16,
    BF16,
}

impl std::str::FromStr for StorageDType {
    type Err = String;

    /// `f16` (also `float16`, `half`), `bf16` (`bfloat16`) or `f32` (`float32`), any case.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(StorageDType::F32),
            "f16" | "float16" | "half" => Ok(StorageDType::F16),
            "bf16" | "bfloat16" => Ok(StorageDType::BF16),
            _ => Err(format!("unknown storage dtype {s:?} (f16, bf16 or f32)")),
        }
    }
}

impl StorageDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            StorageDType::F32 => 4,
            StorageDType::F16 | StorageDType::BF16 => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    Zero(usize),
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buffer {
    /// Stores `data` at `dtype`; all zeros become [`Buffer::Zero`].
    pub fn from_f32(data: &[f32], dtype: StorageDType) -> Self {
        if data.iter().all(|&x| x == 0.0) {
            return Buffer::Zero(data.len());
        }
        match dtype {
            StorageDType::F32 => Buffer::F32(data.to_vec()),
            StorageDType::F16 => Buffer::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            StorageDType::BF16 => Buffer::BF16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buffer::Zero(n) => *n,
            Buffer::F32(v) => v.len(),
            Buffer::F16(v) => v.len(),
            Buffer::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_zero(&self) -> bool {
        matches!(self, Buffer::Zero(_))
    }
    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            Buffer::Zero(_) => 0,
            Buffer::F32(v) => v.len() * 4,
            Buffer::F16(v) => v.len() * 2,
            Buffer::BF16(v) => v.len() * 2,
        }
    }

    /// Writes elements `start..start + out.len()` into `out` as f32.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Buffer::Zero(_) => out.fill(0.0),
            Buffer::F32(v) => out.copy_from_slice(&v[start..end]),
            Buffer::F16(v) => v[start..end].convert_to_f32_slice(out),
            Buffer::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }

    /// The L2 norm, accumulated in f64, read a chunk at a time.
    pub fn l2_norm(&self) -> f64 {
        let mut chunk = [0f32; 4096];
        let mut sum = 0.0;
        for start in (0..self.len()).step_by(chunk.len()) {
            let part = &mut chunk[..(self.len() - start).min(4096)];
            self.read_f32(start, part);
            sum += sum_of_squares(part);
        }
        sum.sqrt()
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_f32(0, &mut out);
        out
    }

    /// The stored bytes, little-endian, as safetensors wants them (empty for a zero block).
    pub fn le_bytes(&self) -> Vec<u8> {
        match self {
            Buffer::Zero(_) => Vec::new(),
            Buffer::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Buffer::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Buffer::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Σ x², accumulated in f64.
pub fn sum_of_squares(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| (x as f64) * (x as f64)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_norm_spans_chunks_in_every_dtype() {
        let data: Vec<f32> = (0..5000)
            .map(|i| if i % 2 == 0 { 1.0 } else { -2.0 })
            .collect();
        let want = (2500.0f64 * 1.0 + 2500.0 * 4.0).sqrt();
        for dtype in [StorageDType::F32, StorageDType::F16, StorageDType::BF16] {
            let b = Buffer::from_f32(&data, dtype);
            assert!((b.l2_norm() - want).abs() < 1e-9, "{dtype:?}");
        }
        assert_eq!(Buffer::Zero(7).l2_norm(), 0.0);
    }

    #[test]
    fn half_storage_round_trips_within_precision() {
        let data: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 1e-3).collect();
        for dtype in [StorageDType::F16, StorageDType::BF16] {
            let buf = Buffer::from_f32(&data, dtype);
            assert_eq!(buf.nbytes(), 2000);
            let back = buf.to_f32_vec();
            for (a, b) in data.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= a.abs() * 8e-3 + 1e-7,
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
        let mut part = [0.0f32; 3];
        Buffer::from_f32(&data, StorageDType::F32).read_f32(10, &mut part);
        assert_eq!(part, [data[10], data[11], data[12]]);
    }

    #[test]
    fn zeros_take_no_memory() {
        let buf = Buffer::from_f32(&[0.0; 16], StorageDType::F16);
        assert!(buf.is_zero());
        assert_eq!(buf.nbytes(), 0);
        assert_eq!(buf.to_f32_vec(), vec![0.0; 16]);
    }
}
