//! atlas-learn: learning aTLAS coefficients Λ for θ = θ0 + Σ Λ τ from few labelled images or
//! from unlabelled ones, and fine-tuning image towers to make task vectors.
//!
//! An [`Objective`] says what to learn (few-shot, multi-task merge, negation, test-time adaptation
//! by entropy or UFM pseudo-labelling) and a [`Job`] pairs it with data; [`LearnConfig::recipe`]
//! gives the paper's defaults for it and [`Overrides`] what a caller changes;
//! [`learn`] runs AdamW over Λ with memory-lean gradients (atlas-clip's composed leaves plus
//! atlas-core's block reduction), reporting [`Event`]s, honouring cancellation, and writing a
//! resumable checkpoint every epoch.

pub mod augment;
pub mod budget;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod finetune;
pub mod job;
pub mod learner;
pub mod merge_data;
pub mod optim;
pub mod output;
pub mod recipe;

pub use data::Dataset;
pub use error::{LearnError, Result};
pub use eval::{accuracy, evaluate};
pub use job::{Job, Objective, Task};
pub use learner::{learn, Event, EventKind, Learned, Outcome};
pub use optim::AdamWConfig;
pub use recipe::{LearnConfig, Overrides};
