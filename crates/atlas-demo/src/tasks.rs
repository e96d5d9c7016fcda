//! The world's classification tasks: one per attribute, each with class names and prompt
//! templates for zero-shot heads, and balanced train / val / test splits generated from a seed.

use crate::digits::{Digit, Pools, NAMES as DIGIT_NAMES};
use crate::scene::{
    render, sample_digit, sample_shapes, Attr, Scene, COLOURS, POSITIONS, SHAPES, TEXTURES,
};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub name: &'static str,
    /// The attribute that is the label.
    pub attr: Attr,
    pub classes: Vec<String>,
    /// Zero-shot prompt templates (`{}` is the class name).
    pub templates: Vec<&'static str>,
}

impl TaskSpec {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The six tasks, in a fixed order.
pub fn task_specs() -> Vec<TaskSpec> {
    vec![
        TaskSpec {
            name: "colour",
            attr: Attr::Colour,
            classes: names(&COLOURS),
            templates: vec![
                "a photo of a {} object.",
                "a photo of a {} shape.",
                "an image of a {} object.",
            ],
        },
        TaskSpec {
            name: "shape",
            attr: Attr::Shape,
            classes: names(&SHAPES),
            templates: vec![
                "a photo of a {}.",
                "an image of a {}.",
                "a drawing of a {}.",
            ],
        },
        TaskSpec {
            name: "texture",
            attr: Attr::Texture,
            classes: names(&TEXTURES),
            templates: vec![
                "a photo of an object on a {} background.",
                "an image of a shape on a {} background.",
            ],
        },
        TaskSpec {
            name: "count",
            attr: Attr::Count,
            classes: names(&["one object", "two objects", "three objects", "four objects"]),
            templates: vec!["a photo of {}.", "an image of {}.", "there is {}."],
        },
        TaskSpec {
            name: "position",
            attr: Attr::Position,
            classes: names(&POSITIONS),
            templates: vec![
                "a photo of an object in the {}.",
                "an image of a shape in the {}.",
            ],
        },
        TaskSpec {
            name: "digit",
            attr: Attr::Digit,
            classes: names(&DIGIT_NAMES),
            templates: vec![
                "a photo of the digit {}.",
                "a photo of the number {}.",
                "an image of the digit {}.",
            ],
        },
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    fn index(self) -> u64 {
        self as u64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: RgbImage,
    pub label: u32,
}

/// Seed of one task split, derived from the world seed (distinct for every task and split).
pub fn split_seed(world_seed: u64, task: usize, split: Split) -> u64 {
    world_seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((task as u64 + 1) * 1_000_003 + split.index() * 7919)
}

/// `per_class` examples of every class of `spec`, shuffled. Digit images come from the split's
/// own pool, so test digits are never seen in training.
pub fn generate(
    spec: &TaskSpec,
    split: Split,
    per_class: usize,
    seed: u64,
    digits: &[Digit],
    pools: &Pools,
) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pool = match split {
        Split::Train => &pools.train,
        Split::Val => &pools.val,
        Split::Test => &pools.test,
    };
    let mut out = Vec::with_capacity(per_class * spec.num_classes());
    for label in 0..spec.num_classes() as u8 {
        let mut own: Vec<usize> = match spec.attr {
            Attr::Digit => pool
                .iter()
                .copied()
                .filter(|&i| digits[i].label == label)
                .collect(),
            _ => Vec::new(),
        };
        own.shuffle(&mut rng);
        for k in 0..per_class {
            let scene = match spec.attr {
                Attr::Digit if own.is_empty() => continue,
                Attr::Digit => sample_digit(&mut rng, digits, own[k % own.len()], None, None),
                attr => sample_shapes(&mut rng, &[(attr, label)]),
            };
            out.push(Example {
                image: render(&scene, digits, &mut rng),
                label: label as u32,
            });
        }
    }
    out.shuffle(&mut rng);
    out
}

/// Samples a scene for pre-training: a digit (from the train pool) with probability
/// `digit_fraction`, else shapes, a single one (which has a position) with probability
/// `single_fraction` and 2–4 otherwise.
pub fn pretrain_scene(
    rng: &mut ChaCha8Rng,
    digits: &[Digit],
    pools: &Pools,
    digit_fraction: f64,
    single_fraction: f64,
) -> Scene {
    use rand::Rng;
    if !pools.train.is_empty() && rng.gen_bool(digit_fraction.clamp(0.0, 1.0)) {
        let i = pools.train[rng.gen_range(0..pools.train.len())];
        return sample_digit(rng, digits, i, None, None);
    }
    let count = if rng.gen_bool(single_fraction.clamp(0.0, 1.0)) {
        0
    } else {
        rng.gen_range(1..4)
    };
    sample_shapes(rng, &[(Attr::Count, count)])
}
