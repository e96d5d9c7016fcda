//! Measures the learning recipes' defaults on a demo world (issue 19): task negation over a grid
//! of learning rates, test-time adaptation (entropy, UFM) with test accuracy and the
//! label-free selection metric per epoch, and few-shot learning under each training view.
//!
//! `cargo run -p atlas-demo --example defaults -- ci negation 0.001,0.01,0.05`
//! (preset; `negation`, `tta`, `few_shot` or `task_addition`; learning rates, an empty entry
//! or none for the recipe's).

use atlas_core::{Coefficients, Layout, TaskVector};
use atlas_demo::replicate::shifted;
use atlas_demo::tasks::Example;
use atlas_demo::world::{default_cache_root, Quiet};
use atlas_demo::{Preset, World, WorldParams};
use atlas_learn::augment::View;
use atlas_learn::checkpoint::State;
use atlas_learn::{evaluate, learn, Dataset, Event, EventKind, Job, LearnConfig, Task};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = Preset::parse(args.first().map_or("ci", |s| s)).expect("preset: ci or full");
    let what = args.get(1).map_or("negation", |s| s).to_string();
    // An empty entry: the recipe's lr (with its travel raise).
    let lrs: Vec<Option<f64>> = args
        .get(2)
        .map_or("", |s| s)
        .split(',')
        .map(|x| (!x.is_empty()).then(|| x.parse().unwrap()))
        .collect();
    let params = WorldParams::preset(preset);
    let root = default_cache_root().unwrap();
    let (world, _) = World::open(&params, &root, &mut Quiet, &AtomicBool::new(false)).unwrap();
    match what.as_str() {
        "negation" => negation(&world, &lrs),
        "tta" => tta(&world, &lrs, args.get(3).map_or("1", |s| s)),
        "few_shot" => few_shot(&world),
        "task_addition" => task_addition(&world, &lrs),
        _ => panic!("negation, tta, few_shot or task_addition"),
    }
}

fn dataset(w: &World, i: usize, ex: &[Example], labelled: bool) -> Dataset {
    let items = ex
        .iter()
        .map(|e| (e.image.clone(), labelled.then_some(e.label)))
        .collect();
    Dataset::from_images(w.tasks[i].spec.classes.clone(), items).unwrap()
}

fn task(w: &World, i: usize, data: Dataset) -> Task {
    let t = &w.tasks[i];
    Task::new(&w.backbone, t.spec.name, data, &t.spec.templates).unwrap()
}

fn acc(w: &World, tvs: &[Arc<TaskVector>], c: &Coefficients, t: &Task, d: &Dataset) -> f64 {
    evaluate(&w.backbone, tvs, c, t, d).unwrap().accuracy
}

fn config(job: &Job, lr: Option<f64>) -> LearnConfig {
    let mut c = LearnConfig::recipe(job.objective());
    if let Some(lr) = lr {
        c.optimizer.lr = lr;
        c.travel = None;
    }
    c
}

/// Learns `job` and says the lr the run used (the recipe's, raised by its travel on small
/// data).
fn learn_reporting_lr(
    w: &World,
    tvs: &[Arc<TaskVector>],
    job: &Job,
    cfg: &LearnConfig,
) -> (atlas_learn::Learned, f64) {
    let mut lr_used = 0.0;
    let mut on = |e: &Event| {
        if e.kind == EventKind::Started {
            lr_used = e.lr;
        }
    };
    let out = learn(
        &w.backbone,
        tvs,
        job,
        cfg,
        &mut on,
        &AtomicBool::new(false),
        None,
    )
    .unwrap();
    (out, lr_used)
}

fn negation(w: &World, lrs: &[Option<f64>]) {
    let nb = w.backbone.manifest().len();
    println!("target control lr | zero-shot target control | learned target control | outcome epoch max|Λ|");
    for i in 0..w.tasks.len() {
        let c = if i == 0 { 1 } else { 0 };
        let tv = vec![w.task_vectors[i].clone()];
        let target = task(w, i, dataset(w, i, &w.tasks[i].val, true));
        let control = task(w, c, dataset(w, c, &w.tasks[c].val, true));
        let (tt, ct) = (
            dataset(w, i, &w.tasks[i].test, true),
            dataset(w, c, &w.tasks[c].test, true),
        );
        let zero = Coefficients::zeros(Layout::Isotropic, 1, nb).unwrap();
        let z = (
            acc(w, &tv, &zero, &target, &tt),
            acc(w, &tv, &zero, &control, &ct),
        );
        let job = Job::Negation {
            target: target.clone(),
            control: control.clone(),
        };
        for &lr in lrs {
            let cfg = config(&job, lr);
            let (out, lr_used) = learn_reporting_lr(w, &tv, &job, &cfg);
            let l = (
                acc(w, &tv, &out.coefs, &target, &tt),
                acc(w, &tv, &out.coefs, &control, &ct),
            );
            let max = out.coefs.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            println!(
                "{} {} {} | {:.3} {:.3} | {:.3} {:.3} (control/zs {:.2}) | {:?} {} {max:.3} {:?}",
                w.tasks[i].spec.name,
                w.tasks[c].spec.name,
                lr_used,
                z.0,
                z.1,
                l.0,
                l.1,
                l.1 / z.1,
                out.outcome,
                out.best_epoch,
                out.warnings
            );
            let h: Vec<String> = out
                .history
                .iter()
                .map(|h| {
                    format!(
                        "{}:{:.2}{}",
                        h.epoch,
                        h.val_metric,
                        if h.eligible { "" } else { "x" }
                    )
                })
                .collect();
            println!("  history {}", h.join(" "));
        }
    }
}

fn tta(w: &World, lrs: &[Option<f64>], tasks: &str) {
    let n = w.tasks.len();
    let nb = w.backbone.manifest().len();
    for i in tasks.split(',').map(|s| s.parse::<usize>().unwrap()) {
        let shifted = shifted(&w.tasks[i].test);
        let labelled = dataset(w, i, &shifted, true);
        let t = task(w, i, dataset(w, i, &shifted, false));
        let tvs = &w.task_vectors;
        let zero = Coefficients::zeros(Layout::PerBlock, n, nb).unwrap();
        let z = acc(w, tvs, &zero, &t, &labelled);
        for &lr in lrs {
            for (name, job) in [
                ("entropy", Job::Entropy(t.clone())),
                ("ufm", Job::Ufm(t.clone())),
            ] {
                let cfg = config(&job, lr);
                let dir = tempfile::tempdir().unwrap();
                let ck = dir.path().join("ck.json");
                let mut per_epoch = Vec::new();
                let mut lr_used = 0.0;
                let mut on = |e: &Event| {
                    if e.kind == EventKind::Started {
                        lr_used = e.lr;
                    }
                    if e.kind == EventKind::Epoch {
                        let s: State =
                            serde_json::from_str(&std::fs::read_to_string(&ck).unwrap()).unwrap();
                        let c = zero.with_values(s.values).unwrap();
                        per_epoch.push((
                            e.epoch,
                            e.val_metric.unwrap(),
                            acc(w, tvs, &c, &t, &labelled),
                        ));
                    }
                };
                let out = learn(
                    &w.backbone,
                    tvs,
                    &job,
                    &cfg,
                    &mut on,
                    &AtomicBool::new(false),
                    Some(&ck),
                )
                .unwrap();
                let sel = acc(w, tvs, &out.coefs, &t, &labelled);
                println!(
                    "{} {name} lr {}: zero-shot {z:.3} (val mi {:.3}); selected epoch {} acc {sel:.3} {:?}",
                    w.tasks[i].spec.name, lr_used, out.before, out.best_epoch, out.outcome
                );
                let line: Vec<String> = per_epoch
                    .iter()
                    .map(|(e, m, a)| format!("{e}:{m:.3}/{a:.3}"))
                    .collect();
                println!("  epoch:mi/acc {}", line.join(" "));
            }
        }
    }
}

/// aTLAS per block over all tasks, learned on the val splits (as the replication): mean test
/// accuracy per lr.
fn task_addition(w: &World, lrs: &[Option<f64>]) {
    let n = w.tasks.len();
    let tasks: Vec<Task> = (0..n)
        .map(|i| {
            let mut t = task(w, i, dataset(w, i, &w.tasks[i].val, true));
            t.reference_accuracy = Some(w.report.tasks[i].finetuned);
            t
        })
        .collect();
    let tests: Vec<Dataset> = (0..n)
        .map(|i| dataset(w, i, &w.tasks[i].test, true))
        .collect();
    let job = Job::TaskAddition(tasks.clone());
    for &lr in lrs {
        let cfg = config(&job, lr);
        let (out, lr_used) = learn_reporting_lr(w, &w.task_vectors, &job, &cfg);
        let accs: Vec<f64> = tasks
            .iter()
            .zip(&tests)
            .map(|(t, d)| acc(w, &w.task_vectors, &out.coefs, t, d))
            .collect();
        let mean = accs.iter().sum::<f64>() / n as f64;
        println!(
            "task addition lr {lr_used:.4}: mean test {mean:.3} {:?}, epoch {} {:?}",
            accs.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>(),
            out.best_epoch,
            out.outcome
        );
    }
}

fn few_shot(w: &World) {
    for i in [5usize, 4, 0] {
        let others: Vec<Arc<TaskVector>> = (0..w.tasks.len())
            .filter(|&j| j != i)
            .map(|j| w.task_vectors[j].clone())
            .collect();
        let train = dataset(w, i, &w.tasks[i].train, true).k_shot(16, 0);
        let t = task(w, i, train).with_val(dataset(w, i, &w.tasks[i].val, true));
        let test = dataset(w, i, &w.tasks[i].test, true);
        let job = Job::FewShot(t.clone());
        let zero = Coefficients::zeros(Layout::PerBlock, others.len(), w.backbone.manifest().len())
            .unwrap();
        let z = acc(w, &others, &zero, &t, &test);
        for view in [View::Plain, View::Crop, View::Train] {
            let mut cfg = config(&job, None);
            cfg.view = view;
            let out = learn(
                &w.backbone,
                &others,
                &job,
                &cfg,
                &mut |_| {},
                &AtomicBool::new(false),
                None,
            )
            .unwrap();
            println!(
                "{} 16-shot {view:?}: zero-shot {z:.3} -> {:.3} ({:?}, epoch {})",
                w.tasks[i].spec.name,
                acc(w, &others, &out.coefs, &t, &test),
                out.outcome,
                out.best_epoch
            );
        }
    }
}
