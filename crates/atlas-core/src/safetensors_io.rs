//! Reading and writing safetensors files as plain f32 tensors with their names and metadata.

use crate::{CoreError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{HashMap, HashSet};
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

/// Largest JSON header accepted. A CLIP checkpoint's header is well under 1 MiB (one short
/// entry per tensor); the safetensors crate alone would accept 100 MB, parsed into memory.
pub const MAX_HEADER_BYTES: u64 = 16 * 1024 * 1024;

/// Reads every tensor of a safetensors file. Float tensors are converted to f32; others keep
/// their name, shape and dtype with no data so callers can skip them (integer buffers).
pub fn read_file(path: &Path) -> Result<(Vec<RawTensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::file(path, e))?;
    read_bytes(&bytes).map_err(|e| CoreError::file(path, e))
}

pub fn read_bytes(bytes: &[u8]) -> Result<(Vec<RawTensor>, HashMap<String, String>)> {
    let (st, metadata) = parse(bytes)?;
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

/// Validates safetensors bytes ([`check_header`]) and returns the tensor views (no copy) and
/// the file's metadata.
pub fn parse(bytes: &[u8]) -> Result<(SafeTensors<'_>, HashMap<String, String>)> {
    check_header(bytes)?;
    let not_st = |e| CoreError::Invalid(format!("not a safetensors file: {e}"));
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(not_st)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(not_st)?;
    Ok((st, metadata))
}

/// A header's entries in file order, repeated keys kept.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// One tensor entry of a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Checks a safetensors header before the safetensors crate reads it, so that each problem
/// gets an error that names it: the header length (limit, past the end), the JSON, and for
/// each tensor its dtype, shape and data offsets (out of range, overlapping, gaps, size).
pub fn check_header(bytes: &[u8]) -> Result<()> {
    let invalid = |m: String| CoreError::Invalid(format!("not a safetensors file: {m}"));
    let Some((prefix, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(invalid(format!(
            "{} bytes is too short for the 8-byte header length",
            bytes.len()
        )));
    };
    let n = u64::from_le_bytes(*prefix);
    if n > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "header length {n} bytes is over the limit of {MAX_HEADER_BYTES}"
        )));
    }
    // n <= MAX_HEADER_BYTES fits in usize.
    let n = n as usize;
    if n > rest.len() {
        return Err(invalid(format!(
            "header length {n} bytes runs past the end of the file ({} bytes follow it)",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(n);
    let text =
        std::str::from_utf8(header).map_err(|e| invalid(format!("header is not UTF-8: {e}")))?;
    let Entries(entries) = serde_json::from_str(text)
        .map_err(|e| invalid(format!("header is not a JSON object: {}", message(e))))?;
    let mut spans = Vec::with_capacity(entries.len());
    let mut seen = HashSet::with_capacity(entries.len());
    for (name, value) in entries {
        // JSON parsers disagree on repeated keys (serde_json keeps the last): refuse them.
        if !seen.insert(name.clone()) {
            return Err(CoreError::tensor(
                printable(&name),
                "appears twice in the header",
            ));
        }
        if name == "__metadata__" {
            serde_json::from_value::<HashMap<String, String>>(value).map_err(|e| {
                invalid(format!(
                    "__metadata__ must map strings to strings: {}",
                    message(e)
                ))
            })?;
            continue;
        }
        let (start, end) = check_entry(&name, value, data.len())?;
        spans.push((start, end, name));
    }
    check_layout(spans, data.len())
}

/// Checks one tensor entry on its own: known dtype, a shape whose byte size does not overflow
/// and matches its offsets, offsets inside the data section. Returns the offsets.
fn check_entry(name: &str, value: serde_json::Value, data_len: usize) -> Result<(usize, usize)> {
    let bad = |m: String| CoreError::tensor(printable(name), m);
    let e: HeaderEntry = serde_json::from_value(value)
        .map_err(|e| bad(format!("bad header entry: {}", message(e))))?;
    let (start, end) = e.data_offsets;
    if end < start {
        return Err(bad(format!("data offsets [{start}, {end}] are reversed")));
    }
    if end > data_len {
        return Err(bad(format!(
            "data offsets [{start}, {end}] run past the end of the data ({data_len} bytes)"
        )));
    }
    let bits = e
        .shape
        .iter()
        .try_fold(e.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
        .filter(|bits| bits % 8 == 0)
        .ok_or_else(|| {
            bad(format!(
                "shape {:?} of {:?} has no whole byte size",
                e.shape, e.dtype
            ))
        })?;
    if end - start != bits / 8 {
        return Err(bad(format!(
            "shape {:?} of {:?} needs {} bytes, its data offsets [{start}, {end}] hold {}",
            e.shape,
            e.dtype,
            bits / 8,
            end - start
        )));
    }
    Ok((start, end))
}

/// Tensors' data must tile the data section exactly: no overlap, no gap, nothing after.
fn check_layout(mut spans: Vec<(usize, usize, String)>, data_len: usize) -> Result<()> {
    spans.sort();
    let mut covered = 0;
    let mut previous: Option<&str> = None;
    for (start, end, name) in &spans {
        if *start < covered {
            return Err(CoreError::tensor(
                printable(name),
                format!(
                    "data offsets [{start}, {end}] overlap tensor {}",
                    printable(previous.unwrap_or_default())
                ),
            ));
        }
        if *start > covered {
            return Err(CoreError::tensor(
                printable(name),
                format!("data starts at {start}, leaving a gap after byte {covered}"),
            ));
        }
        covered = *end;
        previous = Some(name);
    }
    if covered != data_len {
        return Err(CoreError::Invalid(format!(
            "not a safetensors file: {} bytes after the last tensor's data",
            data_len - covered
        )));
    }
    Ok(())
}

/// A name from untrusted input, fit for an error message: control characters (NUL, newlines)
/// escaped and cut to 100 characters.
pub fn printable(s: &str) -> String {
    clipped(s, 100)
}

/// A parser's message, which may quote untrusted input, cut to 300 characters.
fn message(e: impl std::fmt::Display) -> String {
    clipped(&e.to_string(), 300)
}

fn clipped(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
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

/// Writes tensors with metadata, atomically and durably (temporary file, fsync, rename, fsync
/// of the directory), so neither a crash nor a power loss leaves a half-written file under the
/// final name.
pub fn write_file(
    path: &Path,
    tensors: &[OutTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let data: Vec<(&str, &OutTensor)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let bytes = safetensors::serialize(data, Some(metadata))
        .map_err(|e| CoreError::file(path, format!("cannot serialise: {e}")))?;
    write_durably(path, &bytes).map_err(|e| CoreError::file(path, e))
}

/// `bytes` under `path`, atomically and durably: a temporary sibling written and fsynced,
/// renamed over `path`, then the directory fsynced so the rename survives a power loss.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}
