//! Request and response types of the HTTP API (JSON; images as base64 strings or multipart
//! file parts). openapi.yaml describes the same shapes; tests/openapi.rs keeps them in step.

use atlas_core::Layout;
pub use atlas_learn::{Objective, Overrides};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// A composition id, or "base" (the default) for the pre-trained model.
    #[serde(default)]
    pub composition: Option<String>,
    /// A head id from POST /heads; or give `classes` (and `templates`).
    #[serde(default)]
    pub head: Option<String>,
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    #[serde(default)]
    pub templates: Templates,
    /// Base64-encoded JPEG, PNG or WebP bytes.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    5
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub probability: f32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClassifyResponse {
    pub composition: String,
    pub head: String,
    /// Per image, the top-k labels, most probable first.
    pub predictions: Vec<Vec<Prediction>>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeadRequest {
    pub classes: Vec<String>,
    #[serde(default)]
    pub templates: Templates,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
pub struct HeadView {
    /// Content hash of the class names and resolved templates.
    pub id: String,
    pub classes: Vec<String>,
    pub templates: Vec<String>,
}

/// One labelled (or unlabelled) example: base64 bytes, or the filename of a multipart part.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Example {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub label: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TaskData {
    #[serde(default)]
    pub name: Option<String>,
    /// Required by every objective and by Fisher merging (its head); RegMean reads images only.
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default)]
    pub templates: Templates,
    pub examples: Vec<Example>,
}

/// A coefficient layout as callers write it: "isotropic", "blockwise", or {"parts": K}.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(untagged)]
pub enum LayoutSpec {
    Named(String),
    Parts(PartsSpec),
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartsSpec {
    pub parts: usize,
    #[serde(default)]
    pub seed: u64,
}

impl Default for LayoutSpec {
    fn default() -> Self {
        LayoutSpec::Named("blockwise".into())
    }
}

/// A learning request (`objective` present).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LearnRequest {
    #[serde(default)]
    pub name: Option<String>,
    pub objective: Objective,
    /// Task-vector names; absent means all of the library.
    #[serde(default)]
    pub task_vectors: Option<Vec<String>>,
    #[serde(default)]
    pub layout: LayoutSpec,
    /// One task (few-shot, entropy, UFM), several (task addition), or target then control
    /// (negation).
    pub tasks: Vec<TaskData>,
    #[serde(default)]
    pub config: Overrides,
    /// Budget selection before learning: keep only the best task vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
}

/// A learning budget: one gradient pass at Λ = 0 ranks the task vectors by accumulated
/// |∂L/∂Λ|; the job then learns over the top `task_vectors` of them, whole, or per block
/// (`blockwise`: each block takes the blocks of its own top ones).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    pub task_vectors: usize,
    #[serde(default)]
    pub blockwise: bool,
}

/// What a budget kept, recorded before training so a resumed job learns over the same.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct BudgetSelection {
    pub task_vectors: usize,
    pub blockwise: bool,
    /// The task vectors kept (blockwise: those whose blocks any block kept), best first.
    pub kept: Vec<String>,
    /// Blockwise: per block, in manifest order, the names of the task vectors kept there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<BlockSelection>>,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct BlockSelection {
    pub block: String,
    pub task_vectors: Vec<String>,
}

/// Coefficients of one task vector in an explicit composition.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum TvCoefficients {
    /// One scalar (task arithmetic).
    Scalar(f64),
    /// One value per block, in manifest order.
    PerBlock(Vec<f64>),
    /// K values per block (per-part layout; give `parts_seed` too).
    PerPart(Vec<Vec<f64>>),
    /// Values by block name; "*" sets the default for blocks not named (else 0).
    ByName(BTreeMap<String, f64>),
}

/// Explicit coefficients (no `objective`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitRequest {
    #[serde(default)]
    pub name: Option<String>,
    pub task_vectors: Vec<String>,
    /// One entry per task vector.
    pub coefficients: Vec<TvCoefficients>,
    /// Seed of the part assignment of a per-part layout.
    #[serde(default)]
    pub parts_seed: u64,
}

/// A merge of task vectors by a FusionBench method (a body with `method`).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    #[serde(default)]
    pub name: Option<String>,
    /// FusionBench's method name, e.g. `ties_merging`.
    pub method: String,
    pub task_vectors: Vec<String>,
    /// The method's parameters by FusionBench's names; absent ones take its defaults.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Name of the derived task vector a delta-producing merge adds to the library.
    #[serde(default)]
    pub task_vector: Option<String>,
    /// Data-dependent merges (regmean, fisher_merging): one task per task vector, in order,
    /// its images read by that task vector's model (Fisher merging also uses its classes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskData>,
}

/// How a merged composition was made: the method, every parameter used (defaults included)
/// and its inputs, by name and digest.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct MergeRecord {
    pub method: String,
    pub params: serde_json::Value,
    pub inputs: Vec<String>,
    pub input_digests: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// Where a composition came from: enough to reproduce it.
#[derive(Debug, Serialize, Deserialize, Clone, Default)]
pub struct Provenance {
    pub backbone: String,
    pub backbone_digest: String,
    pub task_vector_digests: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<atlas_learn::LearnConfig>,
    /// The budget selection of a learning job with a budget, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSelection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeRecord>,
}

/// A composition: explicit (succeeded at once) or learned (a job moving through its states).
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Composition {
    pub id: String,
    pub name: Option<String>,
    /// "explicit" or the learning objective.
    pub kind: String,
    pub status: Status,
    pub task_vectors: Vec<String>,
    pub layout: Layout,
    /// Row-major Λ, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coefficients: Option<Vec<f64>>,
    /// The latest progress event of a learning job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<atlas_learn::Event>,
    /// Epoch events (training loss, validation metric) so far, and resumptions after restarts.
    #[serde(default)]
    pub history: Vec<atlas_learn::Event>,
    /// Summary of a learning job: metric before and after, best epoch, outcome (`improved` or
    /// `kept_start`) and warnings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub provenance: Provenance,
    /// The job's request without its images (to resume after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<JobRequest>,
    pub created_at: f64,
    pub updated_at: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CompositionPage {
    pub items: Vec<Composition>,
    /// Offset of the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskVectorSummary {
    pub name: String,
    pub dtype: String,
    pub digest: String,
    pub bytes: usize,
    pub source: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BlockInfo {
    pub name: String,
    pub numel: usize,
    /// L2 norm of the block's delta.
    pub norm: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskVectorDetail {
    #[serde(flatten)]
    pub summary: TaskVectorSummary,
    pub blocks: Vec<BlockInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskVectorList {
    pub backbone: String,
    pub backbone_digest: String,
    pub blocks: usize,
    pub task_vectors: Vec<TaskVectorSummary>,
}

/// What a job runs: a learning request, a fine-tuning request of `POST /task-vectors`, or a
/// merge whose method takes minutes on a real model.
#[derive(Debug, Serialize, Deserialize, Clone)]
#[serde(untagged)]
pub enum JobRequest {
    Learn(LearnRequest),
    Finetune(FinetuneJob),
    Merge(MergeRequest),
}

/// Labelled images to fine-tune the image tower on, making a new task vector (a job).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FinetuneRequest {
    pub classes: Vec<String>,
    #[serde(default)]
    pub templates: Templates,
    pub examples: Vec<Example>,
    #[serde(default)]
    pub config: FinetuneOverrides,
}

/// Overrides of the fine-tuning defaults; absent keeps the default.
#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct FinetuneOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Fraction of the steps spent warming up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A fine-tuning job as stored: the task vector to make, the request (its images replaced by
/// the names of their stored copies) and the full settings.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FinetuneJob {
    pub task_vector: String,
    pub finetune: FinetuneRequest,
    pub config: atlas_learn::finetune::FinetuneConfig,
}

/// POST /task-vectors: exactly one source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskVectorRequest {
    pub name: String,
    /// A fine-tuned CLIP checkpoint (hub id or directory under the library directory); the task
    /// vector is its image tower minus the backbone's.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// A task-vector file name inside the configured library directory.
    #[serde(default)]
    pub file: Option<String>,
    /// Base64 safetensors of the deltas (HF or open_clip naming).
    #[serde(default)]
    pub safetensors: Option<String>,
    /// Fine-tune the image tower on labelled images: a job (202).
    #[serde(default)]
    pub finetune: Option<FinetuneRequest>,
}

/// RFC 9457 problem details: every error of the API.
#[derive(Debug, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}
