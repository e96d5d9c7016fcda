//! The learner on the tiny fixture CLIP (tests/fixtures/tiny, made with transformers) and its
//! three task vectors: a planted merge must be recovered better than by isotropic task
//! arithmetic, a stopped run must resume to the same Λ, and every objective must move its
//! validation metric the right way.

use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{Coefficients, Layout, StorageDType, TaskVector};
use atlas_learn::augment::View;
use atlas_learn::budget::{self, Budget};
#[allow(unused_imports)]
use atlas_learn::eval::{logits, metrics};
use atlas_learn::{
    learn, Dataset, EventKind, Job, LearnConfig, LearnError, Objective, Outcome, Overrides, Task,
};
use candle_core::D;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CLASSES: [&str; 5] = [
    "red circle",
    "blue square",
    "green forest",
    "number seven",
    "dog toy",
];

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn setup() -> (Backbone, Vec<Arc<TaskVector>>) {
    let bb = Backbone::load(
        tiny().join("clip").to_str().unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let tvs = ["ft_a", "ft_b", "ft_c"]
        .iter()
        .map(|n| {
            let ck = Checkpoint::open(tiny().join(n).to_str().unwrap()).unwrap();
            Arc::new(
                bb.task_vector_from_checkpoint(ck, n, StorageDType::F32)
                    .unwrap(),
            )
        })
        .collect();
    (bb, tvs)
}

/// Smooth random images (a few random colour blobs), so embeddings differ meaningfully.
fn images(n: usize, seed: u64) -> Vec<RgbImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let base: [f32; 3] = [rng.gen(), rng.gen(), rng.gen()];
            let blobs: Vec<(f32, f32, f32, [f32; 3])> = (0..3)
                .map(|_| {
                    (
                        rng.gen_range(0.0..32.0),
                        rng.gen_range(0.0..32.0),
                        rng.gen_range(3.0..12.0),
                        [rng.gen(), rng.gen(), rng.gen()],
                    )
                })
                .collect();
            RgbImage::from_fn(32, 32, |x, y| {
                let mut c = base;
                for (bx, by, r, col) in &blobs {
                    let d2 = (x as f32 - bx).powi(2) + (y as f32 - by).powi(2);
                    let w = (-d2 / (r * r)).exp();
                    for k in 0..3 {
                        c[k] = c[k] * (1.0 - w) + col[k] * w;
                    }
                }
                image::Rgb(c.map(|v| (v * 255.0) as u8))
            })
        })
        .collect()
}

fn classes() -> Vec<String> {
    CLASSES.iter().map(|s| s.to_string()).collect()
}

/// Labels of `imgs` under the composition `coefs` (a teacher).
fn label_with(
    bb: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    task: &Task,
    imgs: &[RgbImage],
) -> Vec<u32> {
    let data =
        Dataset::from_images(classes(), imgs.iter().map(|i| (i.clone(), None)).collect()).unwrap();
    let tower = bb.composed_vision(tvs, coefs).unwrap();
    logits(&tower, &task.head, &data, 64, bb.device())
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn labelled(imgs: &[RgbImage], labels: &[u32]) -> Dataset {
    Dataset::from_images(
        classes(),
        imgs.iter()
            .cloned()
            .zip(labels.iter().map(|&l| Some(l)))
            .collect(),
    )
    .unwrap()
}

fn agreement(
    bb: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    task: &Task,
    data: &Dataset,
) -> f64 {
    let tower = bb.composed_vision(tvs, coefs).unwrap();
    metrics(
        &logits(&tower, &task.head, data, 64, bb.device()).unwrap(),
        data,
    )
    .unwrap()
    .accuracy
}

fn quiet() -> impl FnMut(&atlas_learn::Event) {
    |_| {}
}

/// A task whose head is the teacher's own normalised embeddings of five anchor images, so the
/// teacher splits random images into five well-populated classes.
fn anchored_task(
    bb: &Backbone,
    tvs: &[Arc<TaskVector>],
    teacher: &Coefficients,
    anchors: &[RgbImage],
) -> Task {
    let data = Dataset::from_images(
        classes(),
        anchors.iter().map(|i| (i.clone(), None)).collect(),
    )
    .unwrap();
    let tower = bb.composed_vision(tvs, teacher).unwrap();
    let pre = atlas_clip::preprocess::Preprocess::from_config(32);
    let emb = atlas_learn::eval::embed(
        &tower,
        &pre,
        &data,
        atlas_learn::eval::Views::PLAIN,
        8,
        bb.device(),
    )
    .unwrap();
    let weights = atlas_clip::model::normalize(&emb).unwrap();
    let head = atlas_clip::ZeroShotHead {
        classes: classes(),
        weights,
        scale: 100.0,
    };
    Task {
        name: "planted".into(),
        data: Dataset {
            classes: classes(),
            items: vec![],
        },
        val: None,
        head,
        reference_accuracy: None,
    }
}

fn planted_teacher(bb: &Backbone, seed: u64) -> Coefficients {
    let nb = bb.manifest().len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values = (0..3 * nb).map(|_| rng.gen_range(-3.0..5.0)).collect();
    Coefficients::new(Layout::PerBlock, 3, nb, values).unwrap()
}

#[test]
fn planted_anisotropic_merge_beats_isotropic_task_arithmetic() {
    let (bb, tvs) = setup();
    let nb = bb.manifest().len();
    let teacher = planted_teacher(&bb, 11);
    let pool = images(900, 1);
    let head_task = anchored_task(&bb, &tvs, &teacher, &pool[..5]);
    let labels = label_with(&bb, &tvs, &teacher, &head_task, &pool);
    // At most 16 training examples per class; the rest is held out.
    let mut per_class = [0usize; 5];
    let (mut train_idx, mut test_idx) = (Vec::new(), Vec::new());
    for (i, &l) in labels.iter().enumerate() {
        if per_class[l as usize] < 16 {
            per_class[l as usize] += 1;
            train_idx.push(i);
        } else {
            test_idx.push(i);
        }
    }
    let pick = |idx: &[usize]| {
        labelled(
            &idx.iter().map(|&i| pool[i].clone()).collect::<Vec<_>>(),
            &idx.iter().map(|&i| labels[i]).collect::<Vec<_>>(),
        )
    };
    let (train, test) = (pick(&train_idx), pick(&test_idx));
    println!(
        "teacher class counts in the pool: {:?}; train {} test {}",
        count(&labels),
        train.len(),
        test.len()
    );

    // Isotropic task arithmetic: θ0 + α Σ τ_i, α searched on the training examples.
    let iso = |a: f64| Coefficients::isotropic(vec![a; 3], nb).unwrap();
    let grid: Vec<f64> = (-30..=50).map(|k| k as f64 * 0.1).collect();
    let best_alpha = grid
        .iter()
        .copied()
        .max_by(|&a, &b| {
            agreement(&bb, &tvs, &iso(a), &head_task, &train).total_cmp(&agreement(
                &bb,
                &tvs,
                &iso(b),
                &head_task,
                &train,
            ))
        })
        .unwrap();
    let ta = agreement(&bb, &tvs, &iso(best_alpha), &head_task, &test);
    let zero = agreement(&bb, &tvs, &iso(0.0), &head_task, &test);

    let task = Task {
        data: train,
        ..head_task.clone()
    };
    let job = Job::FewShot(task);
    let mut cfg = LearnConfig::recipe(job.objective());
    cfg.view = View::Plain;
    cfg.epochs = 40;
    cfg.batch_size = 16;
    cfg.optimizer.weight_decay = 0.0;
    let out = learn(
        &bb,
        &tvs,
        &job,
        &cfg,
        &mut quiet(),
        &AtomicBool::new(false),
        None,
    )
    .unwrap();
    let atlas = agreement(&bb, &tvs, &out.coefs, &head_task, &test);
    println!("held-out agreement with the teacher: zero-shot {zero:.3}, task arithmetic (α = {best_alpha:.1}) {ta:.3}, aTLAS per block {atlas:.3} (best epoch {})", out.best_epoch);
    assert!(atlas >= ta + 0.1, "aTLAS {atlas} vs task arithmetic {ta}");
}

fn count(labels: &[u32]) -> [usize; 5] {
    let mut c = [0; 5];
    labels.iter().for_each(|&l| c[l as usize] += 1);
    c
}

/// A small labelled task from the planted teacher: (task with training data, held-out data).
fn planted_task(bb: &Backbone, tvs: &[Arc<TaskVector>], seed: u64, n: usize) -> (Task, Dataset) {
    let teacher = planted_teacher(bb, seed);
    let pool = images(n, seed + 100);
    let task = anchored_task(bb, tvs, &teacher, &pool[..5]);
    let labels = label_with(bb, tvs, &teacher, &task, &pool);
    let half = n / 2;
    let train = labelled(&pool[..half], &labels[..half]);
    let test = labelled(&pool[half..], &labels[half..]);
    (
        Task {
            data: train,
            ..task
        },
        test,
    )
}

fn small_config(job: &Job) -> LearnConfig {
    let mut cfg = LearnConfig::recipe(job.objective());
    cfg.view = View::Plain;
    cfg.epochs = 3;
    cfg.batch_size = 8;
    // An lr of its own, used as it is (as an lr override is): no travel raise.
    cfg.optimizer.lr = 0.05;
    cfg.travel = None;
    cfg
}

#[test]
fn a_stopped_run_resumes_to_the_same_coefficients() {
    let (bb, tvs) = setup();
    let (task, _) = planted_task(&bb, &tvs, 21, 60);
    let job = Job::FewShot(task);
    let mut cfg = small_config(&job);
    cfg.layout = Layout::PerPart { k: 2, seed: 3 };
    cfg.view = View::Train;
    let dir = tempfile::tempdir().unwrap();
    let whole = learn(
        &bb,
        &tvs,
        &job,
        &cfg,
        &mut quiet(),
        &AtomicBool::new(false),
        Some(&dir.path().join("a.json")),
    )
    .unwrap();

    let path = dir.path().join("b.json");
    let cancel = AtomicBool::new(false);
    let mut stop_after_first_epoch = |e: &atlas_learn::Event| {
        if e.kind == EventKind::Epoch && e.epoch == 1 {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let stopped = learn(
        &bb,
        &tvs,
        &job,
        &cfg,
        &mut stop_after_first_epoch,
        &cancel,
        Some(&path),
    );
    assert!(matches!(stopped, Err(LearnError::Cancelled)));
    let mut kinds = Vec::new();
    let resumed = learn(
        &bb,
        &tvs,
        &job,
        &cfg,
        &mut |e: &atlas_learn::Event| kinds.push((e.kind, e.epoch)),
        &AtomicBool::new(false),
        Some(&path),
    )
    .unwrap();
    assert_eq!(kinds[0], (EventKind::Resumed, 1));
    assert_eq!(
        resumed.coefs, whole.coefs,
        "a resumed run must give the uninterrupted run's Λ"
    );
    assert_eq!(resumed.last, whole.last);
    assert_eq!(resumed.history, whole.history);
    assert_ne!(whole.last.values, vec![0.0; whole.last.values.len()]);

    // Another job's checkpoint is refused, not silently reused.
    let mut other = cfg.clone();
    other.seed = 99;
    let err = learn(
        &bb,
        &tvs,
        &job,
        &other,
        &mut quiet(),
        &AtomicBool::new(false),
        Some(&path),
    )
    .unwrap_err();
    assert!(err.to_string().contains("another job"), "{err}");

    // An emptied checkpoint failed the job for good. It gives way to the previous one, and
    // with both unreadable the job starts again: either way it ends with the same Λ.
    let prev = path.with_extension("prev.json");
    for broken in [vec![path.clone()], vec![path.clone(), prev.clone()]] {
        for p in &broken {
            std::fs::write(p, b"").unwrap();
        }
        let again = learn(
            &bb,
            &tvs,
            &job,
            &cfg,
            &mut quiet(),
            &AtomicBool::new(false),
            Some(&path),
        )
        .unwrap();
        assert_eq!(again.coefs, whole.coefs, "with {broken:?} emptied");
    }
}

#[test]
fn every_objective_moves_its_metric_the_right_way() {
    let (bb, tvs) = setup();
    let (a, a_test) = planted_task(&bb, &tvs, 31, 80);
    let (b, b_test) = planted_task(&bb, &tvs, 41, 80);
    let go = |job: &Job, cfg: &LearnConfig| {
        learn(
            &bb,
            &tvs,
            job,
            cfg,
            &mut quiet(),
            &AtomicBool::new(false),
            None,
        )
        .unwrap()
    };
    let acc = |coefs: &Coefficients, t: &Task, d: &Dataset| agreement(&bb, &tvs, coefs, t, d);
    let zero = Coefficients::zeros(Layout::PerBlock, 3, bb.manifest().len()).unwrap();

    let job = Job::TaskAddition(vec![a.clone(), b.clone()]);
    let out = go(&job, &small_config(&job));
    let (before, after) = (
        acc(&zero, &a, &a_test) + acc(&zero, &b, &b_test),
        acc(&out.coefs, &a, &a_test) + acc(&out.coefs, &b, &b_test),
    );
    println!(
        "multi-task: mean held-out accuracy {:.3} -> {:.3} (val {:.3} -> {:.3})",
        before / 2.0,
        after / 2.0,
        out.before,
        out.after
    );
    assert!(after > before);
    assert_eq!(out.outcome, Outcome::Improved);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);

    let job = Job::Negation {
        target: a.clone(),
        control: b.clone(),
    };
    let mut cfg = small_config(&job);
    cfg.control_guard = 0.5;
    let out = go(&job, &cfg);
    let (t0, t1) = (acc(&zero, &a, &a_test), acc(&out.coefs, &a, &a_test));
    let (c0, c1) = (acc(&zero, &b, &b_test), acc(&out.coefs, &b, &b_test));
    println!("negation: target {t0:.3} -> {t1:.3}, control {c0:.3} -> {c1:.3}");
    assert!(t1 < t0 && out.after < out.before);
    assert!(out.history.iter().any(|h| h.eligible));

    for job in [
        Job::Entropy(Task {
            data: a.data.unlabelled(),
            ..a.clone()
        }),
        Job::Ufm(Task {
            data: a.data.unlabelled(),
            ..a.clone()
        }),
    ] {
        let out = go(&job, &small_config(&job));
        println!(
            "{}: validation mutual information {:.4} -> {:.4}",
            job.objective(),
            out.before,
            out.after
        );
        assert_eq!(out.metric, "mutual_information");
        // Entropy falls (UFM's loss is not comparable across epochs: its pseudo-labels are
        // redrawn each epoch); an epoch is kept only where the label-free selection metric
        // rose, else the start is, and the outcome says which.
        if let Job::Entropy(_) = job {
            let (first, last) = (&out.history[0], out.history.last().unwrap());
            assert!(last.train_loss < first.train_loss, "{:?}", out.history);
        }
        match out.outcome {
            Outcome::Improved => assert!(out.after > out.before),
            Outcome::KeptStart => {
                assert_eq!(out.after, out.before);
                assert!(out.coefs.values.iter().all(|&v| v == 0.0));
            }
        }
        assert!(
            out.warnings.iter().any(|w| w.contains("no labels")),
            "{:?}",
            out.warnings
        );
    }
}

#[test]
fn a_run_that_cannot_move_says_it_kept_the_start() {
    let (bb, tvs) = setup();
    let (task, _) = planted_task(&bb, &tvs, 31, 60);
    let job = Job::FewShot(task);
    let mut cfg = small_config(&job);
    // So small that Λ cannot change a prediction: the start must be kept, and said so.
    cfg.optimizer.lr = 1e-7;
    let out = learn(
        &bb,
        &tvs,
        &job,
        &cfg,
        &mut quiet(),
        &AtomicBool::new(false),
        None,
    )
    .unwrap();
    assert_eq!(out.outcome, Outcome::KeptStart);
    assert_eq!(out.best_epoch, 0);
    assert!(out.coefs.values.iter().all(|&v| v == 0.0));
    assert_eq!(out.after, out.before);
    let said = |what: &str| out.warnings.iter().any(|w| w.contains(what));
    assert!(
        said("kept the start") && said("barely moved"),
        "{:?}",
        out.warnings
    );
    // The recipe's travel raises a small lr on small data; an lr given explicitly is kept.
    let recipe = LearnConfig::recipe(Objective::Negation);
    assert!(recipe.lr_for(30) > 0.03 && recipe.lr_for(1_000_000) == recipe.optimizer.lr);
    let given = recipe.with(&Overrides {
        lr: Some(1e-3),
        ..Overrides::default()
    });
    assert_eq!(given.lr_for(30), 1e-3);
}

#[test]
fn budget_selection_keeps_the_most_useful_task_vectors() {
    let (bb, tvs) = setup();
    // A teacher that uses only τ_b: the whole-vector budget of one must pick it.
    let nb = bb.manifest().len();
    let mut values = vec![0.0; 3 * nb];
    values[nb..2 * nb].iter_mut().for_each(|v| *v = 4.0);
    let teacher = Coefficients::new(Layout::PerBlock, 3, nb, values).unwrap();
    let pool = images(60, 5);
    let task = anchored_task(&bb, &tvs, &teacher, &pool[..5]);
    let labels = label_with(&bb, &tvs, &teacher, &task, &pool);
    let job = Job::FewShot(Task {
        data: labelled(&pool, &labels),
        ..task
    });
    let cfg = small_config(&job);
    let whole = budget::select(&bb, &tvs, &job, &cfg, Budget::Whole(1)).unwrap();
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].name(), "ft_b");
    let mixed = budget::select(&bb, &tvs, &job, &cfg, Budget::Blockwise(2)).unwrap();
    assert_eq!(mixed.len(), 2);
    assert!(mixed[0].meta.source.contains("ft_b"));
    assert_eq!(
        budget::select(&bb, &tvs, &job, &cfg, Budget::Whole(5))
            .unwrap()
            .len(),
        3
    );
}
