//! DARE (Yu et al. 2023) as FusionBench's `dare.utils.param_random_drop_`: each element of
//! each input is kept when a uniform draw exceeds `sparsity_ratio`, and kept elements are
//! divided by 1 − sparsity_ratio when `rescale` is set.
//!
//! With `only_on_linear_weights`, only linear layers' weights are dropped (and rescaled): the
//! 2-D tensors named `*.weight`, except embeddings (a name with `embed`), as transformers names
//! them; every other tensor is kept whole.
//!
//! The draws are a function of (seed, input position, element index in the flattened
//! manifest) only, so a merge is repeatable and can run block by block. torch's generator
//! cannot be reproduced here; tests give both implementations the same masks instead.

use super::params::Params;
use crate::parts::splitmix64;
use crate::{Result, TensorSpec};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Dare {
    pub sparsity_ratio: f64,
    pub rescale: bool,
    pub only_on_linear_weights: bool,
    pub seed: u64,
}

/// Which elements survive the drop.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a> {
    /// Drawn from this seed.
    Seeded(u64),
    /// Given: one mask per input over the flattened manifest.
    Given(&'a [Vec<bool>]),
}

impl Dare {
    pub(crate) fn parse(p: &mut Params) -> Result<Dare> {
        let rescale = p.boolean("rescale", true)?;
        // With rescale, 1 would divide by zero (FusionBench then yields NaN).
        let sparsity_ratio = p.number(
            "sparsity_ratio",
            0.5,
            |x| (0.0..1.0).contains(&x) || (x == 1.0 && !rescale),
            "in [0, 1) (or 1 without rescale)",
        )?;
        let only_on_linear_weights = p.boolean("only_on_linear_weights", false)?;
        let seed = p.seed("seed")?;
        Ok(Dare {
            sparsity_ratio,
            rescale,
            only_on_linear_weights,
            seed,
        })
    }

    pub fn params(&self) -> Value {
        json!({
            "sparsity_ratio": self.sparsity_ratio,
            "rescale": self.rescale,
            "only_on_linear_weights": self.only_on_linear_weights,
            "seed": self.seed,
        })
    }

    /// The masks to use: `given` when there are, else drawn from the seed.
    pub fn keep<'a>(&'a self, given: Option<&'a [Vec<bool>]>) -> (&'a Dare, Keep<'a>) {
        let keep = given.map_or(Keep::Seeded(self.seed), Keep::Given);
        (self, keep)
    }

    /// Whether the drop applies to tensor `t`.
    pub fn drops(&self, t: &TensorSpec) -> bool {
        !self.only_on_linear_weights || is_linear_weight(t)
    }

    /// Drops and rescales `values`, elements `offset..` of input `input`'s flattened row.
    pub fn drop_in_place(&self, values: &mut [f32], keep: &Keep, input: usize, offset: usize) {
        let scale = (1.0 - self.sparsity_ratio) as f32;
        for (j, x) in values.iter_mut().enumerate() {
            let kept = match keep {
                Keep::Seeded(seed) => draw(*seed, input, offset + j) > self.sparsity_ratio,
                Keep::Given(masks) => masks[input][offset + j],
            };
            // Multiply then divide, as FusionBench does: x · mask / (1 − p).
            *x *= if kept { 1.0 } else { 0.0 };
            if self.rescale {
                *x /= scale;
            }
        }
    }
}

/// A linear layer's weight by transformers' naming: 2-D, `*.weight`, not an embedding.
pub fn is_linear_weight(t: &TensorSpec) -> bool {
    t.shape.len() == 2 && t.name.ends_with(".weight") && !t.name.contains("embed")
}

/// A uniform draw in [0, 1) for element `index` of input `input`.
pub fn draw(seed: u64, input: usize, index: usize) -> f64 {
    let stream = splitmix64(seed ^ splitmix64(input as u64 + 1));
    (splitmix64(stream.wrapping_add(index as u64)) >> 11) as f64 / (1u64 << 53) as f64
}
