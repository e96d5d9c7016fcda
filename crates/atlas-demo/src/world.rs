//! The demo world: its parameters and presets, building it (pre-train a tiny CLIP, fine-tune
//! one task vector per task, measure zero-shot and fine-tuned accuracy), and caching the result
//! on disk keyed by a hash of the parameters.
//!
//! Cache layout: `<root>/demo/<preset>-<hash>/` with `backbone/` (a Hugging Face `CLIPModel`
//! directory: config.json, model.safetensors, tokenizer.json), `task_vectors/<task>.safetensors`
//! and `world.json` (parameters, hash, build report). A build writes into a temporary sibling
//! directory and renames it into place, so readers never see a half-built world. Task data is
//! not stored: it is regenerated from the seed, which is deterministic.

use crate::digits::{self, Digit, Pools};
use crate::pretrain::{
    pretrain, Batch, ModelParams, PretrainParams, PretrainStep, TinyClip, LOGIT_SCALE_INIT,
};
use crate::scene::{caption, matches, render, Attrs, Mention};
use crate::tasks::{generate, pretrain_scene, split_seed, task_specs, Example, Split, TaskSpec};
use crate::vocab::{self, Vocab};
use crate::{DemoError, Result};
use atlas_clip::preprocess::Preprocess;
use atlas_clip::tokenizer::ClipTokenizer;
use atlas_clip::{Backbone, LoadOptions, ZeroShotHead};
use atlas_core::{StorageDType, TaskVector};
use atlas_learn::finetune::{accuracy, finetune, FinetuneConfig, Labelled};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Bumped whenever generation or training code changes what a build produces, so old caches
/// are not reused.
pub const WORLD_VERSION: u32 = 1;

/// Images per forward pass when measuring accuracy.
const EVAL_BATCH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The served demo world: minutes to build on 2 cores (release).
    Full,
    /// A smaller world that builds in under a minute: for tests and CI.
    Ci,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Full => "full",
            Preset::Ci => "ci",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Some(Preset::Full),
            "ci" => Some(Preset::Ci),
            _ => None,
        }
    }
}

/// Examples per class in each split of every task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataParams {
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub test_per_class: usize,
    /// Share of digit scenes in pre-training.
    pub digit_fraction: f64,
    /// Share of single-shape scenes (the ones with a position) among pre-training shape
    /// scenes; the rest have 2–4 shapes.
    pub single_fraction: f64,
    /// How often pre-training captions mention each attribute.
    pub mention: Mention,
    /// Independent captions drawn per pre-training image (more text signal per image pass;
    /// the text tower is the cheap one).
    pub captions_per_image: usize,
}

/// Fine-tuning settings of the world's task vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneParams {
    pub epochs: usize,
    pub batch_size: usize,
    /// 1e-3: the papers' 1e-5 is for large pre-trained ViTs; this tiny model trained from
    /// scratch needs a larger step.
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup: f64,
    pub store: StorageDType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldParams {
    pub preset: Preset,
    pub seed: u64,
    pub model: ModelParams,
    pub pretrain: PretrainParams,
    pub data: DataParams,
    pub finetune: FinetuneParams,
}

impl WorldParams {
    pub fn preset(preset: Preset) -> Self {
        // Tuned on 2 cores: rarely mentioned attributes are learned late or never, and the
        // easy ones (colour, count) crowd the others out when mentioned often.
        let mention = Mention {
            colour: 0.3,
            shape: 0.7,
            texture: 0.5,
            count: 0.2,
            position: 0.9,
            digit: 0.9,
            max: 0,
            rare: 1.0,
        };
        let data = DataParams {
            train_per_class: 200,
            val_per_class: 30,
            test_per_class: 60,
            digit_fraction: 0.4,
            single_fraction: 0.4,
            mention,
            captions_per_image: 1,
        };
        let pretrain = PretrainParams {
            steps: 1000,
            batch_size: 128,
            lr: 2e-3,
            weight_decay: 0.1,
            warmup_steps: 100,
            logit_scale_init: LOGIT_SCALE_INIT,
            text_lr_scale: 0.1,
            position_init_std: 0.3,
        };
        let finetune = FinetuneParams {
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.1,
            warmup: 0.1,
            store: StorageDType::F16,
        };
        match preset {
            Preset::Full => WorldParams {
                preset,
                seed: 0,
                model: ModelParams {
                    image_size: 32,
                    patch_size: 8,
                    vision_hidden: 64,
                    vision_layers: 4,
                    vision_heads: 4,
                    text_hidden: 64,
                    text_layers: 2,
                    text_heads: 4,
                    mlp_ratio: 4,
                    projection_dim: 32,
                    max_text_len: 32,
                },
                pretrain,
                // At the rates above every attribute is learned from its captions, and the
                // larger model ends near 100% zero-shot on colour, texture and position,
                // leaving task vectors nothing to add. Lowering one attribute's rate flips it
                // between learned and unlearned at a sharp threshold (texture learns from a few
                // hundred mentions in 128k captions). Never naming half of each attribute's
                // classes instead (the upper half: rare words, as in a web corpus's long
                // tail) leaves every task above chance but far from perfect zero-shot: the
                // heads know the common classes only, and fine-tuning teaches the rest.
                data: DataParams {
                    mention: Mention {
                        rare: 0.0,
                        ..data.mention.clone()
                    },
                    ..data.clone()
                },
                finetune,
            },
            Preset::Ci => WorldParams {
                preset,
                seed: 0,
                model: ModelParams {
                    image_size: 32,
                    patch_size: 8,
                    vision_hidden: 48,
                    vision_layers: 3,
                    vision_heads: 4,
                    text_hidden: 32,
                    text_layers: 1,
                    text_heads: 2,
                    mlp_ratio: 2,
                    projection_dim: 32,
                    max_text_len: 32,
                },
                pretrain: PretrainParams {
                    steps: 500,
                    batch_size: 64,
                    lr: 3e-3,
                    warmup_steps: 50,
                    ..pretrain
                },
                data: DataParams {
                    train_per_class: 60,
                    val_per_class: 10,
                    test_per_class: 30,
                    ..data
                },
                // Fewer images, more epochs: shape gains nothing in 5 epochs of 80 per class.
                finetune: FinetuneParams {
                    epochs: 8,
                    lr: 2e-3,
                    ..finetune
                },
            },
        }
    }

    /// First 16 hex digits of SHA-256 over the world version and the parameters (JSON).
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).expect("parameters serialise");
        let mut h = Sha256::new();
        h.update(format!("atlas-demo world v{WORLD_VERSION}\n"));
        h.update(json);
        hex::encode(h.finalize())[..16].to_string()
    }

    /// `<preset>-<hash>`: the world's directory name in the cache.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.preset.name(), self.hash())
    }
}

/// `$ATLAS_CACHE`, else `$XDG_CACHE_HOME/atlas-serve`, else `~/.cache/atlas-serve`.
pub fn default_cache_root() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("ATLAS_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("atlas-serve"));
    }
    var("HOME")
        .map(|h| h.join(".cache").join("atlas-serve"))
        .ok_or_else(|| DemoError::Invalid("no cache directory: set ATLAS_CACHE or HOME".into()))
}

/// Where a world with `params` lives under a cache root.
pub fn world_dir(root: &Path, params: &WorldParams) -> PathBuf {
    root.join("demo").join(params.dir_name())
}

/// Progress of a build, for progress bars.
pub trait Progress {
    /// A new stage with `total` units of work.
    fn stage(&mut self, name: &str, total: u64);
    /// `done` units of the current stage are finished.
    fn tick(&mut self, done: u64, message: &str);
    /// A line of information.
    fn note(&mut self, line: &str);
}

/// Discards progress.
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&mut self, _: &str, _: u64) {}
    fn tick(&mut self, _: u64, _: &str) {}
    fn note(&mut self, _: &str) {}
}

/// Accuracy of one task, on its test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub name: String,
    pub classes: usize,
    pub zero_shot: f64,
    pub finetuned: f64,
    pub finetune_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildReport {
    pub pretrain_secs: f64,
    pub pretrain_loss: f32,
    pub total_secs: f64,
    pub tasks: Vec<TaskReport>,
}

#[derive(Serialize, Deserialize)]
struct WorldFile {
    version: u32,
    hash: String,
    params: WorldParams,
    report: BuildReport,
}

/// One task's data: the spec and its three splits (images with labels).
pub struct TaskData {
    pub spec: TaskSpec,
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub test: Vec<Example>,
}

impl TaskData {
    pub fn split(&self, split: Split) -> &[Example] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }
}

/// A built world, loaded.
pub struct World {
    pub dir: PathBuf,
    pub params: WorldParams,
    pub backbone: Backbone,
    pub tasks: Vec<TaskData>,
    /// One per task, in task order.
    pub task_vectors: Vec<Arc<TaskVector>>,
    pub report: BuildReport,
}

impl World {
    /// The world for `params` under `root`: loaded if cached, else built first. Returns it and
    /// whether it was built now.
    pub fn open(
        params: &WorldParams,
        root: &Path,
        progress: &mut dyn Progress,
        cancel: &AtomicBool,
    ) -> Result<(World, bool)> {
        World::open_with(params, root, progress, cancel, LoadOptions::default())
    }

    /// [`World::open`] with the backbone loaded under `opts` (a device or compute dtype); the
    /// world is built, and kept, at f32 on the CPU.
    pub fn open_with(
        params: &WorldParams,
        root: &Path,
        progress: &mut dyn Progress,
        cancel: &AtomicBool,
        opts: LoadOptions,
    ) -> Result<(World, bool)> {
        let dir = world_dir(root, params);
        if dir.join("world.json").is_file() {
            return Ok((World::load_with(&dir, opts)?, false));
        }
        build(params, &dir, progress, cancel)?;
        Ok((World::load_with(&dir, opts)?, true))
    }

    /// Loads a built world directory.
    pub fn load(dir: &Path) -> Result<World> {
        World::load_with(dir, LoadOptions::default())
    }

    /// [`World::load`] with the backbone loaded under `opts`.
    pub fn load_with(dir: &Path, opts: LoadOptions) -> Result<World> {
        let path = dir.join("world.json");
        let text = std::fs::read_to_string(&path).map_err(|e| DemoError::file(&path, e))?;
        let file: WorldFile = serde_json::from_str(&text).map_err(|e| DemoError::file(&path, e))?;
        if file.version != WORLD_VERSION || file.hash != file.params.hash() {
            return Err(DemoError::file(
                &path,
                format!(
                    "built by another version of the demo (world v{}, this is v{WORLD_VERSION}); delete it to rebuild",
                    file.version
                ),
            ));
        }
        let backbone = load_backbone(&dir.join("backbone"), opts)?;
        let tasks = task_data(&file.params)?;
        let task_vectors = tasks
            .iter()
            .map(|t| {
                let p = tv_path(dir, t.spec.name);
                let tv =
                    backbone.load_task_vector(&p, Some(t.spec.name), file.params.finetune.store)?;
                Ok(Arc::new(tv))
            })
            .collect::<Result<_>>()?;
        Ok(World {
            dir: dir.to_path_buf(),
            params: file.params,
            backbone,
            tasks,
            task_vectors,
            report: file.report,
        })
    }

    /// The zero-shot head of task `i` (its class names and templates).
    pub fn head(&self, i: usize) -> Result<ZeroShotHead> {
        head(&self.backbone, &self.tasks[i].spec)
    }

    /// Preprocessed pixels of examples, at the model's image size.
    pub fn pixels(&self, examples: &[Example]) -> Vec<Vec<f32>> {
        pixels(&self.params, examples)
    }
}

fn tv_path(dir: &Path, task: &str) -> PathBuf {
    dir.join("task_vectors").join(format!("{task}.safetensors"))
}

fn load_backbone(dir: &Path, opts: LoadOptions) -> Result<Backbone> {
    let s = dir
        .to_str()
        .ok_or_else(|| DemoError::file(dir, "path is not UTF-8"))?;
    Ok(Backbone::load(s, opts)?)
}

/// All tasks' splits, regenerated from the seed.
pub fn task_data(params: &WorldParams) -> Result<Vec<TaskData>> {
    let all = digits::load()?;
    let pools = digits::pools(&all, params.seed);
    let d = &params.data;
    Ok(task_specs()
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let gen = |split, n| {
                generate(
                    &spec,
                    split,
                    n,
                    split_seed(params.seed, i, split),
                    &all,
                    &pools,
                )
            };
            TaskData {
                train: gen(Split::Train, d.train_per_class),
                val: gen(Split::Val, d.val_per_class),
                test: gen(Split::Test, d.test_per_class),
                spec: spec.clone(),
            }
        })
        .collect())
}

pub fn head(backbone: &Backbone, spec: &TaskSpec) -> Result<ZeroShotHead> {
    Ok(ZeroShotHead::build(
        backbone,
        &spec.classes,
        &spec.templates,
    )?)
}

pub fn pixels(params: &WorldParams, examples: &[Example]) -> Vec<Vec<f32>> {
    let pre = Preprocess::from_config(params.model.image_size);
    examples.par_iter().map(|e| pre.pixels(&e.image)).collect()
}

pub fn labels(examples: &[Example]) -> Vec<u32> {
    examples.iter().map(|e| e.label).collect()
}

/// Builds the world for `params` into `dir` (atomically: a temporary sibling, then a rename).
/// If another process finishes the same world first, its result is kept.
pub fn build(
    params: &WorldParams,
    dir: &Path,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<BuildReport> {
    let parent = dir
        .parent()
        .ok_or_else(|| DemoError::file(dir, "has no parent directory"))?;
    std::fs::create_dir_all(parent).map_err(|e| DemoError::file(parent, e))?;
    let tmp = parent.join(format!(
        ".build-{}-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("world"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result =
        build_into(params, &tmp, progress, cancel).and_then(|report| {
            match std::fs::rename(&tmp, dir) {
                Ok(()) => Ok(report),
                Err(_) if dir.join("world.json").is_file() => Ok(report),
                Err(e) => Err(DemoError::file(dir, e)),
            }
        });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn build_into(
    params: &WorldParams,
    dir: &Path,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<BuildReport> {
    let start = Instant::now();
    let bb_dir = dir.join("backbone");
    let tv_dir = dir.join("task_vectors");
    for d in [&bb_dir, &tv_dir] {
        std::fs::create_dir_all(d).map_err(|e| DemoError::file(d, e))?;
    }
    let vocab = vocab::tokenizer()?;
    let (model, pretrain_loss) = pretrain_model(params, &vocab, progress, cancel)?;
    model.save(&bb_dir, &vocab.json)?;
    let pretrain_secs = start.elapsed().as_secs_f64();
    let backbone = load_backbone(&bb_dir, LoadOptions::default())?;
    let tasks = task_data(params)?;
    let mut reports = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let (report, tv) = finetune_task(params, &backbone, task, i, progress, cancel)?;
        tv.save(&tv_path(dir, task.spec.name), backbone.manifest())?;
        progress.note(&format!(
            "{:<9} zero-shot {:5.1}%  fine-tuned {:5.1}%",
            report.name,
            100.0 * report.zero_shot,
            100.0 * report.finetuned
        ));
        reports.push(report);
    }
    let report = BuildReport {
        pretrain_secs,
        pretrain_loss,
        total_secs: start.elapsed().as_secs_f64(),
        tasks: reports,
    };
    let file = WorldFile {
        version: WORLD_VERSION,
        hash: params.hash(),
        params: params.clone(),
        report: report.clone(),
    };
    let json =
        serde_json::to_string_pretty(&file).map_err(|e| DemoError::Invalid(e.to_string()))?;
    crate::pretrain::write_text(&dir.join("world.json"), &json)?;
    Ok(report)
}

fn pretrain_model(
    params: &WorldParams,
    vocab: &Vocab,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<(TinyClip, f32)> {
    let cfg = params.model.clip_config(vocab.size, vocab.bos, vocab.eos);
    let model = TinyClip::init(&cfg, &params.pretrain.init(params.seed))?;
    let tokenizer =
        ClipTokenizer::from_bytes(vocab.json.as_bytes())?.with_max_len(params.model.max_text_len);
    let mut sampler = CaptionSampler::new(params)?;
    let mut next = |n: usize| sampler.batch(n, &tokenizer);
    progress.stage("pre-training", params.pretrain.steps as u64);
    let mut report = |s: &PretrainStep| {
        let msg = format!("loss {:.3}  scale {:.1}", s.loss, s.logit_scale.exp());
        progress.tick(s.step as u64, &msg);
    };
    let cancelled = || cancel.load(std::sync::atomic::Ordering::Relaxed);
    let loss = pretrain(&model, &params.pretrain, &mut next, &mut report, &cancelled)?;
    Ok((model, loss))
}

fn finetune_task(
    params: &WorldParams,
    backbone: &Backbone,
    task: &TaskData,
    index: usize,
    progress: &mut dyn Progress,
    cancel: &AtomicBool,
) -> Result<(TaskReport, TaskVector)> {
    let head = head(backbone, &task.spec)?;
    let train_px = pixels(params, &task.train);
    let train_y = labels(&task.train);
    let test_px = pixels(params, &task.test);
    let test_y = labels(&task.test);
    let test = Labelled {
        pixels: &test_px,
        labels: &test_y,
    };
    let zero_shot = accuracy(&backbone.base_vision()?, &head, test, EVAL_BATCH)?;
    let f = &params.finetune;
    let config = FinetuneConfig {
        name: task.spec.name.to_string(),
        epochs: f.epochs,
        batch_size: f.batch_size,
        lr: f.lr,
        weight_decay: f.weight_decay,
        warmup: f.warmup,
        grad_clip: Some(1.0),
        seed: params.seed.wrapping_add(index as u64),
        store: f.store,
    };
    let steps = task.train.len().div_ceil(f.batch_size) * f.epochs;
    progress.stage(&format!("fine-tuning {}", task.spec.name), steps as u64);
    let start = Instant::now();
    let train = Labelled {
        pixels: &train_px,
        labels: &train_y,
    };
    let mut report = |s: &atlas_learn::finetune::Step| {
        progress.tick(s.step as u64, &format!("loss {:.3}", s.loss));
    };
    let ft =
        finetune(backbone, &head, train, &config, &mut report, cancel).map_err(|e| match e {
            atlas_learn::finetune::FinetuneError::Cancelled => DemoError::Cancelled,
            e => e.into(),
        })?;
    let finetune_secs = start.elapsed().as_secs_f64();
    let finetuned = accuracy(&backbone.vision(&ft.weights)?, &head, test, EVAL_BATCH)?;
    let report = TaskReport {
        name: task.spec.name.to_string(),
        classes: task.spec.num_classes(),
        zero_shot,
        finetuned,
        finetune_secs,
    };
    Ok((report, ft.task_vector))
}

/// Captioned pre-training batches, an endless deterministic stream for a seed.
pub struct CaptionSampler {
    rng: ChaCha8Rng,
    digits: Vec<Digit>,
    pools: Pools,
    pre: Preprocess,
    digit_fraction: f64,
    single_fraction: f64,
    mention: Mention,
    captions: usize,
}

impl CaptionSampler {
    pub fn new(params: &WorldParams) -> Result<Self> {
        let digits = digits::load()?;
        let pools = digits::pools(&digits, params.seed);
        Ok(CaptionSampler {
            rng: ChaCha8Rng::seed_from_u64(params.seed ^ 0xC1A9),
            digits,
            pools,
            pre: Preprocess::from_config(params.model.image_size),
            digit_fraction: params.data.digit_fraction,
            single_fraction: params.data.single_fraction,
            mention: params.data.mention.clone(),
            captions: params.data.captions_per_image.max(1),
        })
    }

    /// `n` images with `captions_per_image` captions each, as a [`Batch`].
    pub fn batch(&mut self, n: usize, tokenizer: &ClipTokenizer) -> Result<Batch> {
        let mut pixels = Vec::new();
        let mut texts = Vec::with_capacity(n * self.captions);
        let mut truth: Vec<Attrs> = Vec::with_capacity(n);
        let mut said: Vec<Attrs> = Vec::with_capacity(n * self.captions);
        for _ in 0..n {
            let scene = pretrain_scene(
                &mut self.rng,
                &self.digits,
                &self.pools,
                self.digit_fraction,
                self.single_fraction,
            );
            let img = render(&scene, &self.digits, &mut self.rng);
            pixels.extend(self.pre.pixels(&img));
            for _ in 0..self.captions {
                let (text, s) = caption(&scene, &self.mention, &mut self.rng);
                texts.push(text);
                said.push(s);
            }
            truth.push(scene.attrs());
        }
        let targets = truth
            .iter()
            .flat_map(|t| {
                said.iter()
                    .map(move |s| if matches(s, t) { 1.0 } else { 0.0 })
            })
            .collect();
        let s = self.pre.crop;
        let pixels = Tensor::from_vec(pixels, (n, 3, s, s), &Device::Cpu)?;
        let ids = tokenizer.encode_padded(&texts, &Device::Cpu)?;
        Ok(Batch {
            pixels,
            ids,
            targets,
        })
    }
}
