//! `atlas-serve finetune`: fine-tune a CLIP image tower on an ImageFolder directory and write
//! the task vector τ = θ_ft − θ0.

use anyhow::{bail, Context};
use atlas_clip::preprocess::{decode, Preprocess};
use atlas_clip::templates::default_templates;
use atlas_clip::{LoadOptions, ZeroShotHead};
use atlas_core::StorageDType;
use atlas_learn::finetune::{accuracy, finetune, FinetuneConfig, Labelled, Step};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

#[derive(clap::Args)]
pub struct Args {
    /// Pre-trained CLIP: a Hugging Face CLIPModel directory or hub id, or `demo` /
    /// `demo:full` / `demo:ci` for the offline demo world's (built first if needed).
    #[arg(long, visible_alias = "model")]
    base: String,
    /// ImageFolder directory: one subfolder per class, named by the class.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the task vector (safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Peak learning rate. 1e-5 is the papers' value for pre-trained ViTs; small models trained
    /// from scratch (the demo world's) want about 1e-3.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage dtype of the task vector: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    store: StorageDType,
    /// Name recorded in the task vector (default: the data directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Prompt template with `{}` for the class name; repeat for several (default: OpenAI's
    /// generic ImageNet ensemble).
    #[arg(long)]
    template: Vec<String>,
    /// Share of each class held out to report accuracy before and after (0 to skip).
    #[arg(long, default_value_t = 0.1)]
    holdout: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.holdout) {
        bail!("--holdout must be in [0, 1), got {}", a.holdout);
    }
    let (backbone, _) = super::model::load(&a.base, LoadOptions::default())?;
    let pre = Preprocess::from_config(backbone.config.vision.image_size);
    let folder = read_image_folder(&a.data, &pre)?;
    let templates: Vec<&str> = if a.template.is_empty() {
        default_templates().to_vec()
    } else {
        a.template.iter().map(String::as_str).collect()
    };
    let head = ZeroShotHead::build(&backbone, &folder.classes, &templates)?;
    let (train, held) = folder.split(a.holdout);
    eprintln!(
        "{} classes, {} training images, {} held out",
        folder.classes.len(),
        train.len(),
        held.len()
    );
    let config = FinetuneConfig {
        name: a.name.clone().unwrap_or_else(|| dir_name(&a.data)),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
        store: a.store,
        ..FinetuneConfig::default()
    };
    let (train_px, train_y) = folder.take(&train);
    let (held_px, held_y) = folder.take(&held);
    let held_data = Labelled {
        pixels: &held_px,
        labels: &held_y,
    };
    if !held.is_empty() {
        let acc = accuracy(&backbone.base_vision()?, &head, held_data, 64)?;
        eprintln!(
            "zero-shot accuracy on the held-out images: {:.1}%",
            100.0 * acc
        );
    }
    let mut bar = super::progress::Progress::new("atlas-serve: finetune");
    bar.stage(
        "fine-tuning",
        (train.len().div_ceil(a.batch_size) * a.epochs) as u64,
    );
    let mut progress = |s: &Step| {
        let message = format!("epoch {} loss {:.4} lr {:.2e}", s.epoch + 1, s.loss, s.lr);
        bar.tick(s.step as u64, &message);
    };
    let data = Labelled {
        pixels: &train_px,
        labels: &train_y,
    };
    let ft = finetune(
        &backbone,
        &head,
        data,
        &config,
        &mut progress,
        &AtomicBool::new(false),
    )?;
    bar.finish();
    if !held.is_empty() {
        let acc = accuracy(&backbone.vision(&ft.weights)?, &head, held_data, 64)?;
        eprintln!(
            "fine-tuned accuracy on the held-out images: {:.1}%",
            100.0 * acc
        );
    }
    ft.task_vector
        .save(&a.out, backbone.manifest())
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote task vector {:?} to {}", config.name, a.out.display());
    Ok(())
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "task".into())
}

/// An ImageFolder read into memory: class names (sorted subfolder names) and preprocessed
/// images with their class index.
struct ImageFolder {
    classes: Vec<String>,
    pixels: Vec<Vec<f32>>,
    labels: Vec<u32>,
}

fn read_image_folder(dir: &Path, pre: &Preprocess) -> anyhow::Result<ImageFolder> {
    let mut classes: Vec<String> = Vec::new();
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        let mut images: Vec<PathBuf> = std::fs::read_dir(&sub)
            .with_context(|| format!("reading {}", sub.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        if images.is_empty() {
            continue;
        }
        images.sort();
        let label = classes.len() as u32;
        classes.push(dir_name(&sub));
        files.extend(images.into_iter().map(|p| (p, label)));
    }
    if classes.len() < 2 {
        bail!(
            "{}: an ImageFolder needs at least two class subfolders with images ({} found)",
            dir.display(),
            classes.len()
        );
    }
    let pixels = files
        .par_iter()
        .map(|(p, _)| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let img = decode(&bytes).with_context(|| format!("decoding {}", p.display()))?;
            Ok(pre.pixels(&img))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ImageFolder {
        classes,
        pixels,
        labels: files.iter().map(|(_, l)| *l).collect(),
    })
}

fn is_image(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl ImageFolder {
    /// Indices of training and held-out images: the last `share` of each class (files are
    /// sorted), at least one image per class kept for training.
    fn split(&self, share: f64) -> (Vec<usize>, Vec<usize>) {
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for c in 0..self.classes.len() as u32 {
            let idx: Vec<usize> = (0..self.labels.len())
                .filter(|&i| self.labels[i] == c)
                .collect();
            let n_held = ((idx.len() as f64 * share).floor() as usize).min(idx.len() - 1);
            let cut = idx.len() - n_held;
            train.extend_from_slice(&idx[..cut]);
            held.extend_from_slice(&idx[cut..]);
        }
        (train, held)
    }

    fn take(&self, idx: &[usize]) -> (Vec<Vec<f32>>, Vec<u32>) {
        (
            idx.iter().map(|&i| self.pixels[i].clone()).collect(),
            idx.iter().map(|&i| self.labels[i]).collect(),
        )
    }
}
