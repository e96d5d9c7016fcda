//! FusionBench's merge results on the tiny fixtures (tests/fixtures/merge, written by its
//! generate.py): `{case}/{tensor}` is θ_merged − θ0 at f32.

use std::collections::HashMap;
use std::io::Read;

/// Every f32 tensor of `case`, by tensor name.
pub fn case(case: &str) -> HashMap<String, Vec<f32>> {
    let path = super::fixtures().join("../merge/oracle.safetensors.gz");
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prefix = format!("{case}/");
    st.tensors()
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(&prefix)?;
            let f32s = v.dtype() == safetensors::Dtype::F32 && !name.contains('/');
            f32s.then(|| {
                let data = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (name.to_string(), data)
            })
        })
        .collect()
}
