//! RegMean, RegMean++ and Fisher merging of the tiny fine-tunes run in process by the
//! library: what the server's jobs and the CLI must write.

use super::fixtures;
use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::{Backbone, LoadOptions, ZeroShotHead};
use atlas_core::merge::{Merged, Method};
use atlas_core::StorageDType;
use atlas_learn::merge_data::{merge_on_data, Watch};
use atlas_learn::Dataset;
use std::sync::Arc;

/// The tiny CLIP backbone the fixtures' fine-tunes were made from.
pub fn backbone() -> Backbone {
    Backbone::load(
        fixtures().join("clip").to_str().unwrap(),
        LoadOptions::default(),
    )
    .unwrap()
}

/// `method` at its defaults over ft_a, ft_b and ft_c, input i reading `data[i]` (heads from
/// its classes and the default templates): the merged delta per block.
pub fn merged(bb: &Backbone, method: &str, data: &[Dataset]) -> Vec<Vec<f32>> {
    let tvs: Vec<_> = ["ft_a", "ft_b", "ft_c"]
        .iter()
        .map(|n| {
            let ck = Checkpoint::open(fixtures().join(n).to_str().unwrap()).unwrap();
            Arc::new(
                bb.task_vector_from_checkpoint(ck, n, StorageDType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let method = Method::parse(method, &serde_json::Map::new(), tvs.len()).unwrap();
    let templates = atlas_clip::templates::default_templates();
    let heads: Vec<ZeroShotHead> = data
        .iter()
        .map(|d| ZeroShotHead::build(bb, &d.classes, templates).unwrap())
        .collect();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let merged = merge_on_data(
        bb,
        &method,
        &tvs,
        &data.iter().collect::<Vec<_>>(),
        &heads.iter().collect::<Vec<_>>(),
        Watch {
            progress: &mut |_, _| {},
            cancel: &cancel,
        },
    )
    .unwrap();
    match merged {
        Merged::Delta { blocks, .. } => blocks,
        other => panic!("a delta, not {other:?}"),
    }
}
