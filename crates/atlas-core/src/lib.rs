//! atlas-core: the block manifest, task vectors and their library, coefficient layouts,
//! composition θ = θ0 + Σ_i Λ_i τ_i and the per-block gradient reduction ⟨∂L/∂θ, τ⟩.
//!
//! Nothing here knows about CLIP or HTTP: a model crate describes its composable tensors as a
//! [`Manifest`], and this crate stores deltas against it and combines them.

pub mod buffer;
pub mod coefficients;
pub mod compose;
pub mod error;
pub mod library;
pub mod manifest;
pub mod merge;
pub mod parts;
pub mod random;
pub mod safetensors_io;
pub mod task_vector;

pub use buffer::{Buffer, StorageDType};
pub use coefficients::{Coefficients, Layout};
pub use compose::{compose, compose_into, reduce_gradient, Real};
pub use error::{CoreError, Result};
pub use library::Library;
pub use manifest::{Block, Manifest, TensorSpec};
pub use task_vector::{TaskVector, TaskVectorMeta};
