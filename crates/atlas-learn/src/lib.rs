//! atlas-learn: learning aTLAS coefficients Λ for θ = θ0 + Σ Λ τ from few labelled images or
//! from unlabelled ones, and fine-tuning image towers to make task vectors.

pub mod finetune;
