//! Request and response types of the HTTP API (JSON; images as base64 strings).

use atlas_core::Layout;
use serde::{Deserialize, Serialize};

/// Prompt templates: a data-set name ("MNIST", "default") or explicit templates with "{}".
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum Templates {
    Named(String),
    List(Vec<String>),
}

impl Default for Templates {
    fn default() -> Self {
        Templates::Named("default".into())
    }
}

#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    /// A composition id; absent means the pre-trained model.
    #[serde(default)]
    pub composition: Option<String>,
    pub classes: Vec<String>,
    #[serde(default)]
    pub templates: Templates,
    /// Base64-encoded JPEG, PNG or WebP bytes.
    pub images: Vec<String>,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    5
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct Prediction {
    pub class: String,
    pub score: f32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClassifyResponse {
    pub composition: Option<String>,
    pub predictions: Vec<Vec<Prediction>>,
}

/// One labelled (or unlabelled) example of a learning job.
#[derive(Debug, Deserialize)]
pub struct Example {
    pub image: String,
    #[serde(default)]
    pub label: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct TaskData {
    #[serde(default)]
    pub name: Option<String>,
    pub classes: Vec<String>,
    #[serde(default)]
    pub templates: Templates,
    pub examples: Vec<Example>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    FewShot,
    MultiTask,
    Negation,
    Entropy,
    Ufm,
}

/// Settings of a learning job that override the objective's recipe.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
pub struct LearnOverrides {
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub batch_size: Option<usize>,
    pub seed: Option<u64>,
    pub val_fraction: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CompositionRequest {
    /// Explicit coefficients: `values` has n_tv (isotropic), n_tv × n_blocks (per block) or
    /// n_tv × n_blocks × K (per part) numbers, row-major.
    Explicit {
        #[serde(default)]
        name: Option<String>,
        task_vectors: Vec<String>,
        layout: Layout,
        values: Vec<f64>,
    },
    /// A learning job on uploaded images.
    Learn {
        #[serde(default)]
        name: Option<String>,
        objective: Objective,
        task_vectors: Vec<String>,
        #[serde(default = "default_layout")]
        layout: Layout,
        /// One task (few-shot, entropy, UFM), several (multi-task), or target then control
        /// (negation).
        tasks: Vec<TaskData>,
        #[serde(default)]
        config: LearnOverrides,
    },
}

fn default_layout() -> Layout {
    Layout::PerBlock
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Ready,
    Failed,
    Cancelled,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct CompositionView {
    pub id: String,
    pub name: Option<String>,
    pub status: Status,
    pub task_vectors: Vec<String>,
    pub layout: Layout,
    /// Number of coefficients.
    pub n_coefficients: usize,
    /// The latest progress event of a learning job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<atlas_learn::Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
