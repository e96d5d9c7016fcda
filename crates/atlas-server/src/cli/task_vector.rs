//! `atlas-serve task-vector`: build a task vector τ = θ_ft − θ0 from a fine-tuned checkpoint,
//! convert a delta file (Hugging Face or open_clip naming) to our format, or inspect one.
//!
//! Our format is a safetensors file in the backbone's image-tower tensor names, at the storage
//! dtype, with provenance (name, base model, base digest, source, digests) in its metadata.

use anyhow::Context;
use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::buffer::sum_of_squares;
use atlas_core::safetensors_io::{self, RawTensor};
use atlas_core::{Manifest, StorageDType, TaskVector};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build τ = θ_ft − θ0 from a fine-tuned checkpoint (CLIPVisionModel or CLIPModel).
    Build {
        /// The pre-trained CLIPModel: a directory with config.json and model.safetensors, or a
        /// hub id (org/name[@revision]).
        #[arg(long)]
        base: String,
        /// The fine-tuned checkpoint: a directory or a hub id.
        #[arg(long)]
        finetuned: String,
        /// Name of the task vector (stored in the file's metadata).
        #[arg(long)]
        name: String,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype: f16, bf16 or f32.
        #[arg(long, default_value = "f16")]
        store: StorageDType,
    },
    /// Convert a delta safetensors file (Hugging Face or open_clip naming) to our format.
    Convert {
        /// The pre-trained CLIPModel (directory or hub id) the delta is relative to.
        #[arg(long)]
        base: String,
        /// The delta file.
        #[arg(long)]
        delta: PathBuf,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Name (default: the file's metadata, else its file stem).
        #[arg(long)]
        name: Option<String>,
        /// Storage dtype: f16, bf16 or f32.
        #[arg(long, default_value = "f16")]
        store: StorageDType,
    },
    /// Print a task vector's name, provenance, digest and per-block norms.
    Inspect {
        /// The task vector file.
        file: PathBuf,
        /// The pre-trained CLIPModel (directory or hub id, or `demo` / `demo:ci`) it is
        /// relative to.
        #[arg(long)]
        base: String,
        /// How many of the largest blocks (by norm) to list.
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Build {
            base,
            finetuned,
            name,
            out,
            store,
        } => {
            let backbone = load_backbone(&base)?;
            let ft = Checkpoint::open(&finetuned)
                .with_context(|| format!("loading the fine-tuned checkpoint {finetuned}"))?;
            let tv = backbone
                .task_vector_from_checkpoint(ft, &name, store)
                .with_context(|| {
                    format!("building task vector {name} from {finetuned} against {base}")
                })?;
            save(&tv, &out, backbone.manifest())?;
            print_summary(&tv, &out, backbone.manifest());
            Ok(())
        }
        Command::Convert {
            base,
            delta,
            out,
            name,
            store,
        } => {
            let backbone = load_backbone(&base)?;
            let tv = backbone
                .load_task_vector(&delta, name.as_deref(), store)
                .with_context(|| format!("converting {}", delta.display()))?;
            save(&tv, &out, backbone.manifest())?;
            print_summary(&tv, &out, backbone.manifest());
            Ok(())
        }
        Command::Inspect { file, base, top } => inspect(&file, &base, top),
    }
}

/// A checkpoint's backbone, or the demo world's (`demo`, `demo:ci`): task vectors of the demo
/// world are inspected against it.
pub(super) fn load_backbone(base: &str) -> anyhow::Result<Backbone> {
    super::model::load(base, LoadOptions::default())
        .map(|(backbone, _)| backbone)
        .with_context(|| format!("loading the pre-trained backbone {base}"))
}

pub(super) fn save(tv: &TaskVector, out: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    tv.save(out, manifest)
        .with_context(|| format!("writing {}", out.display()))
}

pub(super) fn print_summary(tv: &TaskVector, out: &Path, manifest: &Manifest) {
    let nonzero = tv.blocks().iter().filter(|b| !b.is_zero()).count();
    let file_bytes = std::fs::metadata(out).map(|m| m.len()).ok();
    println!("wrote {}", out.display());
    println!("  name           {}", tv.name());
    println!("  base model     {}", tv.meta.base_model);
    println!("  source         {}", tv.meta.source);
    println!("  store dtype    {:?}", tv.dtype());
    println!(
        "  blocks         {} ({} non-zero), {} params",
        manifest.len(),
        nonzero,
        manifest.numel()
    );
    println!("  storage bytes  {} in memory", tv.nbytes());
    if let Some(b) = file_bytes {
        println!("  file bytes     {b}");
    }
    println!("  digest         {}", tv.digest());
}

/// The storage dtype a task-vector file was written at: that of its float tensors.
fn file_storage_dtype(tensors: &[RawTensor]) -> StorageDType {
    match tensors.iter().find(|t| t.is_float()).map(|t| t.dtype) {
        Some(Dtype::F16) => StorageDType::F16,
        Some(Dtype::BF16) => StorageDType::BF16,
        _ => StorageDType::F32,
    }
}

fn inspect(file: &Path, base: &str, top: usize) -> anyhow::Result<()> {
    let backbone = load_backbone(base)?;
    let manifest = backbone.manifest();
    // Read once for the metadata and the stored dtype, then load it as a task vector.
    let (tensors, md) = safetensors_io::read_file(file)
        .with_context(|| format!("reading task vector {}", file.display()))?;
    let store = file_storage_dtype(&tensors);
    drop(tensors);
    let tv = backbone
        .load_task_vector(file, None, store)
        .with_context(|| format!("loading task vector {}", file.display()))?;

    println!("{}", file.display());
    println!("  name           {}", tv.name());
    println!(
        "  format         {}",
        md.get("format")
            .map_or("(none: not written by atlas-serve)", |s| s)
    );
    println!("  base model     {}", tv.meta.base_model);
    println!("  source         {}", tv.meta.source);
    println!("  store dtype    {store:?}");
    let base_check = if tv.meta.base_digest.is_empty() {
        "not recorded".to_string()
    } else if tv.meta.base_digest == backbone.base_digest() {
        "matches the backbone".to_string()
    } else {
        format!(
            "DIFFERS: the task vector is relative to base {}, the backbone is {}",
            short(&tv.meta.base_digest),
            short(backbone.base_digest())
        )
    };
    println!("  base digest    {base_check}");
    let digest_check = match md.get("digest") {
        Some(d) if d == tv.digest() => " (matches the file's recorded digest)",
        Some(_) => " (DIFFERS from the file's recorded digest)",
        None => "",
    };
    println!("  digest         {}{digest_check}", tv.digest());
    println!("  storage bytes  {} in memory", tv.nbytes());

    // Per-block L2 norms, absolute and relative to θ0's block.
    let mut norms: Vec<(usize, f64, f64)> = tv
        .block_norms()
        .into_iter()
        .zip(backbone.base_blocks())
        .enumerate()
        .map(|(b, (n, base))| {
            let nb = sum_of_squares(base).sqrt();
            (b, n, if nb > 0.0 { n / nb } else { f64::NAN })
        })
        .collect();
    let zero = tv.blocks().iter().filter(|b| b.is_zero()).count();
    let total = norms.iter().map(|(_, n, _)| n * n).sum::<f64>().sqrt();
    let mut sorted: Vec<f64> = norms.iter().map(|(_, n, _)| *n).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    println!(
        "  blocks         {} ({} non-zero), {} params",
        manifest.len(),
        manifest.len() - zero,
        manifest.numel()
    );
    println!(
        "  block norms    total {:.4e}, median {:.4e}, max {:.4e}",
        total,
        median,
        sorted.last().copied().unwrap_or(0.0)
    );
    norms.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "  top {} blocks by norm (‖τ_b‖, ‖τ_b‖/‖θ0_b‖):",
        top.min(norms.len())
    );
    for (b, n, rel) in norms.iter().take(top) {
        let block = &manifest.blocks()[*b];
        println!(
            "    {:<60} {:>10} params  {:.4e}  {:.3e}",
            block.name,
            block.numel(),
            n,
            rel
        );
    }
    Ok(())
}

fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}
