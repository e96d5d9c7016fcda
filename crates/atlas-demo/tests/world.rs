//! The ci world end to end: it builds from scratch in well under a minute, every task's
//! zero-shot head is above chance, fine-tuning beats zero-shot on its task, aTLAS task addition
//! beats task arithmetic with a searched scalar, 16 shots beat zero-shot on a task whose own
//! task vector is left out, and a second open loads the cached world instead of rebuilding.
//! The recipes' defaults learn (issue 19): negation lowers every target and keeps its control,
//! test-time adaptation improves or says it kept the start, and the default view does not
//! flip labels away. TIES, RegMean and Fisher merging beat task arithmetic, as in FusionBench's
//! table.

use atlas_clip::model::bf16_gemm;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{Coefficients, Layout, TaskVector};
use atlas_demo::replicate::{few_shot, shifted, task_addition, ReplicateConfig};
use atlas_demo::tasks::Example;
use atlas_demo::world::{head, labels, Quiet};
use atlas_demo::{Preset, World, WorldParams};
use atlas_learn::augment::View;
use atlas_learn::finetune::{accuracy, Labelled};
use atlas_learn::{evaluate, learn, Dataset, Job, LearnConfig, Learned, Outcome, Overrides, Task};
use candle_core::DType;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

struct Built {
    // Kept alive so the cached world stays on disk while tests run.
    _root: tempfile::TempDir,
    world: World,
    secs: f64,
    /// CPU seconds of the build, where the platform says.
    cpu_secs: Option<f64>,
}

fn built() -> &'static Built {
    static WORLD: OnceLock<Built> = OnceLock::new();
    WORLD.get_or_init(|| {
        // Tiny tensors: candle's spinning elementwise pool and rayon's matmul threads only
        // slow them down (see the `demo` command). Set before the first candle or rayon use.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let root = tempfile::tempdir().unwrap();
        let params = WorldParams::preset(Preset::Ci);
        let start = Instant::now();
        let cpu_start = cpu_secs();
        let (world, fresh) =
            World::open(&params, root.path(), &mut Quiet, &AtomicBool::new(false)).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let cpu_secs = cpu_secs().zip(cpu_start).map(|(b, a)| b - a);
        assert!(fresh);
        eprintln!(
            "ci world built in {secs:.1} s ({cpu_secs:.1?} s of CPU): {:#?}",
            world.report
        );
        Built {
            _root: root,
            world,
            secs,
            cpu_secs,
        }
    })
}

/// CPU seconds of this process (user + system) from `/proc/self/stat` on Linux; None elsewhere.
/// The build runs on one thread (the threads variables above), so on an idle machine this is
/// its wall time, while a machine shared with other jobs does not fail the limit below.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields are counted from the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // utime and stime, fields 14 and 15 of proc(5), in USER_HZ ticks (100 on Linux).
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Seconds the ci build may take, of CPU where measured (the other tests wait for the build,
/// so the process's CPU time is the build's), else of wall time. Measured: 43 s of CPU in the
/// test profile, whose workspace crates run at opt-level 2 with debug assertions (30 s of it
/// pre-training).
const CI_BUILD_LIMIT: f64 = if cfg!(debug_assertions) { 55.0 } else { 40.0 };

/// The few-shot target (its own task vector is left out): position, which the other task
/// vectors (count, shape) help with.
const HELD_OUT: usize = 4;

#[test]
fn ci_world_builds_within_its_time_limit() {
    let b = built();
    let secs = b.cpu_secs.unwrap_or(b.secs);
    assert!(
        secs < CI_BUILD_LIMIT,
        "the ci world took {secs:.1} s to build ({:.1} s of wall time)",
        b.secs
    );
    assert_eq!(b.world.tasks.len(), 6);
    assert_eq!(b.world.task_vectors.len(), 6);
}

#[test]
fn zero_shot_is_above_chance_on_every_task() {
    for t in &built().world.report.tasks {
        let chance = 1.0 / t.classes as f64;
        assert!(
            t.zero_shot > chance + 0.05,
            "{}: zero-shot {:.3}, chance {chance:.3}",
            t.name,
            t.zero_shot
        );
    }
}

#[test]
fn fine_tuning_beats_zero_shot_on_its_task() {
    let tasks = &built().world.report.tasks;
    for t in tasks {
        // Tasks the pre-trained model already solves (colour, texture) have no room to gain.
        let clear_gain = t.finetuned > t.zero_shot + 0.05;
        let saturated = t.finetuned >= 0.95 && t.finetuned >= t.zero_shot - 0.02;
        assert!(
            clear_gain || saturated,
            "{}: fine-tuned {:.3}, zero-shot {:.3}",
            t.name,
            t.finetuned,
            t.zero_shot
        );
    }
    let gain = tasks.iter().map(|t| t.finetuned - t.zero_shot).sum::<f64>() / tasks.len() as f64;
    assert!(gain > 0.08, "mean gain {gain:.3}");
}

#[test]
fn task_vectors_reproduce_the_fine_tuned_models() {
    let w = &built().world;
    let n = w.task_vectors.len();
    let blocks = w.backbone.manifest().len();
    for (i, task) in w.tasks.iter().enumerate() {
        // θ0 + 1·τ_i (τ stored at f16) classifies like the fine-tuned model did.
        let mut values = vec![0.0; n];
        values[i] = 1.0;
        let coefs = Coefficients::new(Layout::Isotropic, n, blocks, values).unwrap();
        let tower = w.backbone.composed_vision(&w.task_vectors, &coefs).unwrap();
        let px = w.pixels(&task.test);
        let y = labels(&task.test);
        let data = Labelled {
            pixels: &px,
            labels: &y,
        };
        let acc = accuracy(&tower, &w.head(i).unwrap(), data, 256).unwrap();
        let want = w.report.tasks[i].finetuned;
        assert!(
            (acc - want).abs() < 0.03,
            "{}: {acc:.3} vs {want:.3}",
            task.spec.name
        );
    }
}

#[test]
fn a_second_open_loads_the_cache() {
    let b = built();
    let root = b.world.dir.parent().unwrap().parent().unwrap();
    let params = WorldParams::preset(Preset::Ci);
    let (again, fresh) = World::open(&params, root, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert!(!fresh);
    assert_eq!(again.report, b.world.report);
    assert_eq!(again.dir, b.world.dir);
    assert_eq!(again.backbone.base_digest(), b.world.backbone.base_digest());
    let digests = |w: &World| -> Vec<String> {
        w.task_vectors
            .iter()
            .map(|t| t.digest().to_string())
            .collect()
    };
    assert_eq!(digests(&again), digests(&b.world));
    assert!(b.world.dir.ends_with(params.dir_name()));
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn atlas_task_addition_beats_searched_task_arithmetic() {
    let w = &built().world;
    let mut config = ReplicateConfig::paper(w.tasks.len());
    config.learned = vec![Layout::PerBlock];
    let r = task_addition(w, &config, &mut Quiet, &AtomicBool::new(false)).unwrap();
    let (atlas, arithmetic) = (mean(&r.learned[0].accs), mean(&r.arithmetic));
    eprintln!(
        "task addition: zero-shot {:.3}, task arithmetic (α {}) {arithmetic:.3}, aTLAS {atlas:.3}",
        mean(&r.zero_shot),
        r.alpha
    );
    assert!(
        atlas > arithmetic + 0.01,
        "aTLAS {atlas:.3}, task arithmetic {arithmetic:.3}"
    );
}

#[test]
fn sixteen_shots_beat_zero_shot_on_a_held_out_task() {
    let w = &built().world;
    let config = ReplicateConfig::paper(w.tasks.len());
    let task = HELD_OUT;
    let (zero, sixteen) =
        few_shot(w, &config, task, 16, 0, &mut Quiet, &AtomicBool::new(false)).unwrap();
    eprintln!(
        "{}: zero-shot {zero:.3}, 16-shot {sixteen:.3}",
        w.tasks[task].spec.name
    );
    assert!(
        sixteen > zero + 0.03,
        "{}: 16-shot {sixteen:.3}, zero-shot {zero:.3}",
        w.tasks[task].spec.name
    );
}

/// Dataset of world task `i`'s examples, with or without their labels.
fn dataset(w: &World, i: usize, examples: &[Example], labelled: bool) -> Dataset {
    let items = examples
        .iter()
        .map(|e| (e.image.clone(), labelled.then_some(e.label)))
        .collect();
    Dataset::from_images(w.tasks[i].spec.classes.clone(), items).unwrap()
}

fn task(w: &World, i: usize, data: Dataset) -> Task {
    let spec = &w.tasks[i].spec;
    Task::new(&w.backbone, spec.name, data, &spec.templates).unwrap()
}

/// Runs the objective's recipe untouched, as a job that overrides nothing does.
fn learn_with_recipe(w: &World, tvs: &[Arc<TaskVector>], job: &Job) -> Learned {
    let config = LearnConfig::recipe(job.objective());
    learn(
        &w.backbone,
        tvs,
        job,
        &config,
        &mut |_| {},
        &AtomicBool::new(false),
        None,
    )
    .unwrap()
}

fn acc(w: &World, tvs: &[Arc<TaskVector>], c: &Coefficients, t: &Task, d: &Dataset) -> f64 {
    evaluate(&w.backbone, tvs, c, t, d).unwrap().accuracy
}

/// Issue 19: with lr 1e-3 negation ended with Λ within ±0.025 and no target moved. The
/// recipe must now lower every target on test while keeping the control (the guard holds on
/// the learning data by construction; on test, within 10% per task and 5% on average).
#[test]
fn negation_with_the_recipe_lowers_every_target_and_keeps_the_control() {
    let w = &built().world;
    let nb = w.backbone.manifest().len();
    let mut ratios = Vec::new();
    for i in 0..w.tasks.len() {
        // The replication's pairs: colour against shape, every other task against colour.
        let c = if i == 0 { 1 } else { 0 };
        let tv = vec![w.task_vectors[i].clone()];
        let target = task(w, i, dataset(w, i, &w.tasks[i].val, true));
        let control = task(w, c, dataset(w, c, &w.tasks[c].val, true));
        let t_test = dataset(w, i, &w.tasks[i].test, true);
        let c_test = dataset(w, c, &w.tasks[c].test, true);
        let job = Job::Negation {
            target: target.clone(),
            control: control.clone(),
        };
        let out = learn_with_recipe(w, &tv, &job);
        let zero = Coefficients::zeros(Layout::PerBlock, 1, nb).unwrap();
        let (t0, t1) = (
            acc(w, &tv, &zero, &target, &t_test),
            acc(w, &tv, &out.coefs, &target, &t_test),
        );
        let (c0, c1) = (
            acc(w, &tv, &zero, &control, &c_test),
            acc(w, &tv, &out.coefs, &control, &c_test),
        );
        let name = w.tasks[i].spec.name;
        eprintln!(
            "negation of {name}: target {t0:.3} -> {t1:.3}, control {c0:.3} -> {c1:.3}, \
             {:?} at epoch {}",
            out.outcome, out.best_epoch
        );
        assert_eq!(out.outcome, Outcome::Improved, "{name}: {:?}", out.warnings);
        assert!(t1 < t0, "{name}: target {t0:.3} -> {t1:.3}");
        let (cv0, cv1) = (
            acc(w, &tv, &zero, &control, &control.data),
            acc(w, &tv, &out.coefs, &control, &control.data),
        );
        assert!(
            cv1 >= 0.95 * cv0,
            "{name}: control on val {cv0:.3} -> {cv1:.3}"
        );
        assert!(c1 >= 0.9 * c0, "{name}: control on test {c0:.3} -> {c1:.3}");
        ratios.push(c1 / c0);
    }
    assert!(mean(&ratios) >= 0.95, "control kept {ratios:?}");
}

/// Issue 19: entropy and UFM used to keep Λ = 0 (picked by entropy, which rose) or lower
/// accuracy. On the replication's shifted task, and on colour, each must either raise test
/// accuracy above zero-shot or say that it kept the start; and something must be learned.
#[test]
fn test_time_adaptation_improves_or_says_it_kept_the_start() {
    let w = &built().world;
    let tvs = &w.task_vectors;
    let zero =
        Coefficients::zeros(Layout::PerBlock, tvs.len(), w.backbone.manifest().len()).unwrap();
    let mut improved = 0;
    for i in [ReplicateConfig::paper(w.tasks.len()).shifted_task, 0] {
        let shifted = shifted(&w.tasks[i].test);
        let scored = dataset(w, i, &shifted, true);
        let t = task(w, i, dataset(w, i, &shifted, false));
        let z = acc(w, tvs, &zero, &t, &scored);
        for job in [Job::Entropy(t.clone()), Job::Ufm(t.clone())] {
            let out = learn_with_recipe(w, tvs, &job);
            let a = acc(w, tvs, &out.coefs, &t, &scored);
            let what = format!("{} on shifted {}", job.objective(), w.tasks[i].spec.name);
            eprintln!(
                "{what}: {z:.3} -> {a:.3}, {:?} at epoch {}",
                out.outcome, out.best_epoch
            );
            assert!(out.warnings.iter().any(|m| m.contains("no labels")));
            match out.outcome {
                Outcome::Improved => {
                    assert!(a > z, "{what}: says improved, accuracy {z:.3} -> {a:.3}");
                    improved += 1;
                }
                Outcome::KeptStart => {
                    assert_eq!(out.coefs, zero, "{what}");
                    assert!(out.warnings.iter().any(|m| m.contains("kept the start")));
                }
            }
        }
    }
    assert!(improved > 0, "no test-time adaptation learned anything");
}

/// Issue 19: few-shot on digits fell from 82.7% to 34.8% with augmentation on by default. The
/// default is now none: on position, which a flip changes, it must beat crops with flips.
#[test]
fn few_shot_default_view_beats_flips_where_they_change_the_label() {
    let w = &built().world;
    let i = HELD_OUT;
    let others: Vec<Arc<TaskVector>> = (0..w.tasks.len())
        .filter(|&j| j != i)
        .map(|j| w.task_vectors[j].clone())
        .collect();
    let train = dataset(w, i, &w.tasks[i].train, true).k_shot(16, 0);
    let t = task(w, i, train).with_val(dataset(w, i, &w.tasks[i].val, true));
    let test = dataset(w, i, &w.tasks[i].test, true);
    let job = Job::FewShot(t.clone());
    let default = learn_with_recipe(w, &others, &job);
    assert_eq!(LearnConfig::recipe(job.objective()).view, View::Plain);
    let mut flips = LearnConfig::recipe(job.objective()).with(&Overrides {
        flip: Some(true),
        ..Overrides::default()
    });
    flips.seed = 0;
    let flipped = learn(
        &w.backbone,
        &others,
        &job,
        &flips,
        &mut |_| {},
        &AtomicBool::new(false),
        None,
    )
    .unwrap();
    let (a, b) = (
        acc(w, &others, &default.coefs, &t, &test),
        acc(w, &others, &flipped.coefs, &t, &test),
    );
    eprintln!("position 16-shot: default view {a:.3}, crops and flips {b:.3}");
    assert!(a > b + 0.05, "default {a:.3}, with flips {b:.3}");
}

/// Issue 22: bf16 on the CPU (bf16 matmuls on the kernel this CPU has; the f32 path where it
/// has none) keeps the tasks' mean zero-shot and fine-tuned test accuracy within half a point
/// of f32, and each task's within 2 points (a ci-world test split is 150–180 images: one
/// flipped prediction is already 0.56–0.67 points).
#[test]
fn bf16_matmuls_keep_accuracy_within_half_a_point() {
    let w = &built().world;
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    let bf16 = Backbone::load(w.dir.join("backbone").to_str().unwrap(), opts).unwrap();
    eprintln!("bf16 kernel on this CPU: {:?}", bf16_gemm::chosen());
    let nb = w.backbone.manifest().len();
    for fine_tuned in [false, true] {
        let mut gaps = Vec::new();
        for (i, t) in w.tasks.iter().enumerate() {
            let (pixels, labels) = (w.pixels(&t.test), labels(&t.test));
            let test = Labelled {
                pixels: &pixels,
                labels: &labels,
            };
            let tvs = [w.task_vectors[i].clone()];
            let own = Coefficients::isotropic(vec![1.0], nb).unwrap();
            let acc = |bb: &Backbone| {
                let tower = if fine_tuned {
                    bb.composed_vision(&tvs, &own)
                } else {
                    bb.base_vision()
                };
                accuracy(&tower.unwrap(), &head(bb, &t.spec).unwrap(), test, 64).unwrap()
            };
            let (a, b) = (acc(&w.backbone), acc(&bf16));
            eprintln!(
                "{} fine-tuned {fine_tuned}: f32 {a:.4}, bf16 {b:.4}",
                t.spec.name
            );
            gaps.push(b - a);
        }
        let (mean, worst) = (mean(&gaps), gaps.iter().fold(0f64, |m, g| m.max(g.abs())));
        eprintln!("fine-tuned {fine_tuned}: mean gap {mean:+.4}, largest {worst:.4}");
        assert!(
            mean.abs() <= 0.005,
            "fine-tuned {fine_tuned}: mean gap {mean:.4}"
        );
        assert!(
            worst <= 0.02,
            "fine-tuned {fine_tuned}: a task moved by {worst:.4}"
        );
    }
}

/// Mean test accuracy of each merge over the ci world's tasks.
fn merge_means(w: &World, names: &[&str]) -> Vec<(String, f64)> {
    atlas_demo::replicate::merges(w, names, &AtomicBool::new(false))
        .unwrap()
        .into_iter()
        .map(|r| (r.name, mean(&r.accs)))
        .collect()
}

/// FusionBench's CLIP ViT-B/32 table puts TIES (72.2), Fisher merging (70.6) and RegMean
/// (82.4) above task arithmetic (68.0). On ci worlds of seeds 1 to 4
/// (`merge_ordering_across_seeds`) at FusionBench's defaults, TIES beat task arithmetic by
/// 2.5 to 7.6 points of mean accuracy, RegMean by 5.1 to 12.1 and Fisher merging by 4.6 to
/// 14.8: asserted here with smaller margins.
#[test]
fn merges_keep_fusionbenchs_ordering_over_task_arithmetic() {
    let w = &built().world;
    let names = [
        "task_arithmetic",
        "ties_merging",
        "regmean",
        "fisher_merging",
    ];
    let means = merge_means(w, &names);
    eprintln!("merges: {means:?}");
    let ta = means[0].1;
    for ((name, m), margin) in means[1..].iter().zip([0.01, 0.02, 0.02]) {
        assert!(
            *m > ta + margin,
            "{name} {m:.3}, task arithmetic {ta:.3}: {means:?}"
        );
    }
}

/// Which of FusionBench's orderings hold on ci worlds of other seeds: run by hand
/// (`cargo test -p atlas-demo --test world merge_ordering_across_seeds -- --ignored
/// --nocapture`) to choose what `merges_keep_fusionbenchs_ordering` asserts.
#[test]
#[ignore]
fn merge_ordering_across_seeds() {
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    std::env::set_var("RAYON_NUM_THREADS", "1");
    for seed in 1..=4 {
        let root = tempfile::tempdir().unwrap();
        let params = WorldParams {
            seed,
            ..WorldParams::preset(Preset::Ci)
        };
        let (w, _) =
            World::open(&params, root.path(), &mut Quiet, &AtomicBool::new(false)).unwrap();
        let means = merge_means(&w, atlas_core::merge::METHODS);
        eprintln!("seed {seed}: {means:?}");
    }
}
