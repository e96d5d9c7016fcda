//! The block manifest: the ordered composable tensors of a model, grouped into blocks.
//!
//! A block is the unit that gets one coefficient per task vector. Usually a block is one tensor;
//! a block may also group several tensors (fused q/k/v in open_clip naming), whose elements are
//! then concatenated in the listed order.

use crate::{CoreError, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
}

impl Block {
    /// A block made of one tensor, named after it.
    pub fn single(spec: TensorSpec) -> Self {
        Block {
            name: spec.name.clone(),
            tensors: vec![spec],
        }
    }
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }
}

/// Where a tensor lives: its block, and its element offset inside the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub block: usize,
    pub offset: usize,
    pub numel: usize,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    blocks: Vec<Block>,
    tensors: HashMap<String, Location>,
    digest: String,
}

impl Manifest {
    pub fn new(blocks: Vec<Block>) -> Result<Self> {
        let mut tensors = HashMap::new();
        let mut hasher = Sha256::new();
        for (b, block) in blocks.iter().enumerate() {
            if block.tensors.is_empty() {
                return Err(CoreError::Invalid(format!(
                    "block {} has no tensors",
                    block.name
                )));
            }
            hasher.update(format!("block {}\n", block.name));
            let mut offset = 0;
            for t in &block.tensors {
                let loc = Location {
                    block: b,
                    offset,
                    numel: t.numel(),
                };
                if tensors.insert(t.name.clone(), loc).is_some() {
                    return Err(CoreError::tensor(&t.name, "appears twice in the manifest"));
                }
                hasher.update(format!("{} {:?}\n", t.name, t.shape));
                offset += t.numel();
            }
        }
        let digest = hex::encode(hasher.finalize());
        Ok(Manifest {
            blocks,
            tensors,
            digest,
        })
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
    /// Total number of elements over all blocks.
    pub fn numel(&self) -> usize {
        self.blocks.iter().map(Block::numel).sum()
    }
    pub fn locate(&self, tensor: &str) -> Option<Location> {
        self.tensors.get(tensor).copied()
    }
    pub fn spec(&self, tensor: &str) -> Option<&TensorSpec> {
        let loc = self.locate(tensor)?;
        self.blocks[loc.block]
            .tensors
            .iter()
            .find(|t| t.name == tensor)
    }
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }
    /// Every tensor in order, with its location.
    pub fn tensor_specs(&self) -> impl Iterator<Item = (&TensorSpec, Location)> + '_ {
        self.blocks
            .iter()
            .flat_map(move |b| b.tensors.iter().map(move |t| (t, self.tensors[&t.name])))
    }
    /// SHA-256 over block names, tensor names and shapes: two manifests with the same digest
    /// accept the same task vectors.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_tensors_in_grouped_blocks() {
        let m = Manifest::new(vec![
            Block::single(TensorSpec::new("a", &[2, 3])),
            Block {
                name: "qkv".into(),
                tensors: vec![TensorSpec::new("q", &[4]), TensorSpec::new("k", &[4])],
            },
        ])
        .unwrap();
        assert_eq!(m.numel(), 14);
        assert_eq!(
            m.locate("k"),
            Some(Location {
                block: 1,
                offset: 4,
                numel: 4
            })
        );
        assert_eq!(m.block_index("qkv"), Some(1));
        assert!(m.locate("v").is_none());
    }

    #[test]
    fn rejects_duplicate_tensor() {
        let err = Manifest::new(vec![
            Block::single(TensorSpec::new("a", &[2])),
            Block::single(TensorSpec::new("a", &[2])),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("tensor a"), "{err}");
    }
}
