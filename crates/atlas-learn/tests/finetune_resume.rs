//! Fine-tuning resumed from an epoch checkpoint (`finetune_from`) on the tiny fixture CLIP:
//! it continues the step count and the schedule where the checkpoint left off, reports only
//! the epochs it runs, and a run resumed after its last epoch makes the checkpoint's task
//! vector.

use atlas_clip::{templates, Backbone, LoadOptions, ZeroShotHead};
use atlas_core::StorageDType;
use atlas_learn::finetune::{finetune_from, EpochDone, FinetuneConfig, Labelled, Resume, Step};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn setup() -> (Backbone, ZeroShotHead, Vec<Vec<f32>>, Vec<u32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/clip");
    let bb = Backbone::load(dir.to_str().unwrap(), LoadOptions::default()).unwrap();
    let classes = vec!["red circle".to_string(), "blue square".to_string()];
    let head = ZeroShotHead::build(&bb, &classes, templates::default_templates()).unwrap();
    let v = &bb.config.vision;
    let n = v.num_channels * v.image_size * v.image_size;
    let pixels: Vec<Vec<f32>> = (0..6)
        .map(|i| {
            (0..n)
                .map(|j| ((i * 31 + j) % 17) as f32 / 17.0 - 0.5)
                .collect()
        })
        .collect();
    let labels = (0..6).map(|i| i % 2).collect();
    (bb, head, pixels, labels)
}

#[test]
fn a_resumed_run_continues_the_schedule_and_ends_on_its_checkpoint() {
    let (bb, head, pixels, labels) = setup();
    let data = Labelled {
        pixels: &pixels,
        labels: &labels,
    };
    let config = FinetuneConfig {
        epochs: 3,
        batch_size: 4,
        store: StorageDType::F32,
        ..FinetuneConfig::default()
    };
    let cancel = AtomicBool::new(false);
    let run = |resume: Option<Resume>| {
        let mut steps: Vec<Step> = Vec::new();
        let mut saved: Vec<(usize, HashMap<String, Tensor>)> = Vec::new();
        let mut progress = |s: &Step| steps.push(*s);
        let mut on_epoch = |d: &EpochDone<'_>| {
            let copy = d
                .weights
                .iter()
                .map(|(k, t)| (k.clone(), t.copy().unwrap()));
            saved.push((d.epochs_done, copy.collect()));
            Ok(())
        };
        let out = finetune_from(
            &bb,
            &head,
            data,
            &config,
            resume,
            &mut progress,
            &mut on_epoch,
            &cancel,
        )
        .unwrap();
        (out, steps, saved)
    };

    let (full, steps, saved) = run(None);
    assert_eq!(steps.len(), 6, "2 steps per epoch, 3 epochs");
    let epochs: Vec<usize> = saved.iter().map(|s| s.0).collect();
    assert_eq!(epochs, [1, 2, 3]);

    // From the first epoch's checkpoint: epochs 2 and 3 only, steps 3 to 6 at the same rates.
    let (_, resumed, saved_after) = run(Some(Resume {
        epochs_done: 1,
        weights: saved[0].1.clone(),
    }));
    let numbers: Vec<usize> = resumed.iter().map(|s| s.step).collect();
    assert_eq!(numbers, [3, 4, 5, 6]);
    for (a, b) in resumed.iter().zip(&steps[2..]) {
        assert_eq!((a.epoch, a.lr), (b.epoch, b.lr));
    }
    let epochs: Vec<usize> = saved_after.iter().map(|s| s.0).collect();
    assert_eq!(epochs, [2, 3]);

    // From the last epoch's checkpoint: no step, and the task vector of the full run.
    let (last, none, _) = run(Some(Resume {
        epochs_done: 3,
        weights: saved[2].1.clone(),
    }));
    assert!(none.is_empty());
    assert_eq!(last.task_vector.digest(), full.task_vector.digest());
}
