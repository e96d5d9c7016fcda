//! Image sets for learning: decoded once and kept at the model's input size (so memory per
//! image is bounded whatever was uploaded), labelled or not, loaded from an ImageFolder layout
//! (one subfolder per class) or from memory; deterministic stratified splits and k-shot subsets.

use crate::{LearnError, Result};
use atlas_clip::preprocess::{decode, Preprocess};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Item {
    pub image: Arc<RgbImage>,
    /// None for unlabelled images.
    pub label: Option<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub classes: Vec<String>,
    pub items: Vec<Item>,
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

impl Dataset {
    pub fn from_images(classes: Vec<String>, items: Vec<(RgbImage, Option<u32>)>) -> Result<Self> {
        let items = items
            .into_iter()
            .map(|(img, label)| Item {
                image: Arc::new(img),
                label,
            })
            .collect();
        Self::checked(classes, items)
    }

    /// Decodes encoded images (JPEG, PNG, WebP) in parallel, each kept as `pre` keeps it
    /// ([`Preprocess::kept`]); the error names the bad one.
    pub fn from_bytes(
        classes: Vec<String>,
        items: Vec<(Vec<u8>, Option<u32>)>,
        pre: &Preprocess,
    ) -> Result<Self> {
        let items = items
            .par_iter()
            .enumerate()
            .map(|(i, (bytes, label))| {
                let img = decode(bytes).map_err(|e| LearnError::Data(format!("image {i}: {e}")))?;
                Ok(Item {
                    image: Arc::new(pre.kept(img)),
                    label: *label,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::checked(classes, items)
    }

    /// One subfolder per class (sorted by name, as torchvision's ImageFolder does); files with
    /// image extensions inside are that class's examples, kept as `pre` keeps them.
    pub fn from_image_folder(dir: &Path, pre: &Preprocess) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| LearnError::Data(format!("{}: {e}", dir.display()));
        let mut classes: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| err(&e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(err(
                &"no class subfolders (expected one folder of images per class)",
            ));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut paths: Vec<_> = std::fs::read_dir(dir.join(class))
                .map_err(|e| err(&e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| has_image_extension(p))
                .collect();
            paths.sort();
            files.extend(paths.into_iter().map(|p| (p, label as u32)));
        }
        let items = files
            .par_iter()
            .map(|(path, label)| {
                let bytes = std::fs::read(path)
                    .map_err(|e| LearnError::Data(format!("{}: {e}", path.display())))?;
                let img = decode(&bytes)
                    .map_err(|e| LearnError::Data(format!("{}: {e}", path.display())))?;
                Ok(Item {
                    image: Arc::new(pre.kept(img)),
                    label: Some(*label),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::checked(classes.iter().map(|c| c.replace('_', " ")).collect(), items)
    }

    fn checked(classes: Vec<String>, items: Vec<Item>) -> Result<Self> {
        if let Some(bad) = items
            .iter()
            .find_map(|it| it.label.filter(|&l| l as usize >= classes.len()))
        {
            return Err(LearnError::Data(format!(
                "label {bad} is out of range for {} classes",
                classes.len()
            )));
        }
        Ok(Dataset { classes, items })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn is_labelled(&self) -> bool {
        !self.items.is_empty() && self.items.iter().all(|it| it.label.is_some())
    }
    /// The same images with labels dropped.
    pub fn unlabelled(&self) -> Self {
        let items = self
            .items
            .iter()
            .map(|it| Item {
                image: it.image.clone(),
                label: None,
            })
            .collect();
        Dataset {
            classes: self.classes.clone(),
            items,
        }
    }
    fn subset(&self, idx: &[usize]) -> Self {
        Dataset {
            classes: self.classes.clone(),
            items: idx.iter().map(|&i| self.items[i].clone()).collect(),
        }
    }

    /// Indices per class (unlabelled items under class 0).
    fn by_class(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.classes.len().max(1)];
        for (i, it) in self.items.iter().enumerate() {
            out[it.label.unwrap_or(0) as usize].push(i);
        }
        out
    }

    /// Stratified split into (train, held-out): `fraction` of each class is held out, keeping at
    /// least one example per class in train. A class with a single example stays in train only.
    pub fn split(&self, fraction: f64, seed: u64) -> (Self, Self) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for mut idx in self.by_class() {
            idx.shuffle(&mut rng);
            let n_held =
                ((idx.len() as f64 * fraction).round() as usize).min(idx.len().saturating_sub(1));
            held.extend_from_slice(&idx[..n_held]);
            train.extend_from_slice(&idx[n_held..]);
        }
        train.sort_unstable();
        held.sort_unstable();
        (self.subset(&train), self.subset(&held))
    }

    /// `k` examples per class (fewer where a class has fewer), chosen by `seed`.
    pub fn k_shot(&self, k: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut keep = Vec::new();
        for mut idx in self.by_class() {
            idx.shuffle(&mut rng);
            keep.extend_from_slice(&idx[..k.min(idx.len())]);
        }
        keep.sort_unstable();
        self.subset(&keep)
    }

    pub fn labels(&self) -> Vec<u32> {
        self.items.iter().map(|it| it.label.unwrap_or(0)).collect()
    }
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}
