//! Merges on small hand-made task vectors: DARE's own draws (their statistics and
//! repeatability), TIES details FusionBench fixes (global trim, majority sign for ties), and
//! parameters read by FusionBench's names with errors naming the parameter at fault.

use atlas_core::merge::{self, dare, Merged, Method};
use atlas_core::task_vector::Delta;
use atlas_core::{Block, Manifest, StorageDType, TaskVector, TaskVectorMeta, TensorSpec};
use serde_json::{json, Value};

fn manifest(sizes: &[usize]) -> Manifest {
    let blocks = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Block::single(TensorSpec::new(format!("t{i}"), &[n])))
        .collect();
    Manifest::new(blocks).unwrap()
}

fn tv(manifest: &Manifest, name: &str, blocks: &[Vec<f32>]) -> TaskVector {
    let deltas = blocks.iter().enumerate().map(|(i, d)| Delta {
        name: format!("t{i}"),
        shape: vec![d.len()],
        data: d.clone(),
    });
    let meta = TaskVectorMeta {
        name: name.into(),
        ..Default::default()
    };
    TaskVector::from_deltas(manifest, meta, StorageDType::F32, deltas, &|_| false).unwrap()
}

fn parse(name: &str, params: Value, n: usize) -> atlas_core::Result<Method> {
    Method::parse(name, params.as_object().unwrap(), n)
}

fn delta(m: Merged) -> (Vec<Vec<f32>>, f64) {
    match m {
        Merged::Delta { blocks, scale } => (blocks, scale),
        Merged::Coefficients(_) => panic!("expected a delta"),
    }
}

#[test]
fn dare_draws_keep_one_minus_p_rescaled_and_repeatably() {
    let n = 50_000;
    let m = manifest(&[n]);
    let ones = tv(&m, "ones", &[vec![1.0; n]]);
    let p = 0.3;
    let method = parse(
        "dare_task_arithmetic",
        json!({"sparsity_ratio": p, "seed": 7}),
        1,
    )
    .unwrap();
    let (blocks, scale) = delta(merge::merge(&method, &m, &[&ones]).unwrap());
    assert_eq!(scale, 0.3);
    let kept: Vec<f32> = blocks[0].iter().copied().filter(|x| *x != 0.0).collect();
    let share = kept.len() as f64 / n as f64;
    // Binomial: standard deviation √(p(1−p)/n) ≈ 0.002.
    assert!((share - (1.0 - p)).abs() < 0.01, "kept share {share}");
    assert!(kept.iter().all(|x| (x - 1.0 / 0.7).abs() < 1e-6));
    let again = delta(merge::merge(&method, &m, &[&ones]).unwrap()).0;
    assert_eq!(again, blocks, "same seed, same draws");
    let other = parse(
        "dare_task_arithmetic",
        json!({"sparsity_ratio": p, "seed": 8}),
        1,
    );
    let other = delta(merge::merge(&other.unwrap(), &m, &[&ones]).unwrap()).0;
    assert_ne!(other, blocks, "another seed, other draws");
}

#[test]
fn dare_draws_are_independent_across_inputs_and_uniform() {
    let n = 40_000;
    let (a, b): (Vec<f64>, Vec<f64>) = (0..n)
        .map(|j| (dare::draw(3, 0, j), dare::draw(3, 1, j)))
        .unzip();
    let both = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| **x > 0.5 && **y > 0.5)
        .count();
    assert!((both as f64 / n as f64 - 0.25).abs() < 0.01);
    for q in [0.1, 0.5, 0.9] {
        let below = a.iter().filter(|x| **x < q).count() as f64 / n as f64;
        assert!((below - q).abs() < 0.01, "P(u < {q}) = {below}");
    }
}

/// TIES trims over the whole flattened model: a block of small values loses everything when
/// another block holds the large ones (block-by-block trimming would keep some of it).
#[test]
fn ties_trims_over_the_whole_model_not_per_block() {
    let m = manifest(&[4, 4]);
    let big = vec![10.0, 9.0, 8.0, 7.0];
    let small = vec![0.4, 0.3, 0.2, 0.1];
    let a = tv(&m, "a", &[big.clone(), small.clone()]);
    let method = parse("ties_merging", json!({"threshold": 50}), 1).unwrap();
    let (blocks, scale) = delta(merge::merge(&method, &m, &[&a]).unwrap());
    assert_eq!(scale, 0.3);
    // d = 8, keep ⌊8 · 0.5⌋ = 4, plus the k-th value itself: FusionBench keeps |x| ≥ the
    // 4th smallest, here 5 elements (0.4 included).
    assert_eq!(blocks[0], big);
    assert_eq!(blocks[1], vec![0.4, 0.0, 0.0, 0.0]);
}

/// Where the trimmed inputs cancel exactly, the sign is the model-wide majority of signs.
#[test]
fn ties_breaks_zero_sums_with_the_majority_sign() {
    let m = manifest(&[3]);
    let a = tv(&m, "a", &[vec![1.0, 2.0, 1.0]]);
    let b = tv(&m, "b", &[vec![1.0, 1.0, -1.0]]);
    let method = parse(
        "ties_merging",
        json!({"threshold": 0.99, "scaling_factor": 1}),
        2,
    );
    let (blocks, _) = delta(merge::merge(&method.unwrap(), &m, &[&a, &b]).unwrap());
    // Element 2 sums to 0; the others are positive, so + wins and only a's 1.0 counts.
    assert_eq!(blocks[0], vec![2.0, 3.0, 1.0]);
    let mean = parse(
        "ties_merging",
        json!({"threshold": 0.99, "merge_func": "mean"}),
        2,
    );
    let (blocks, _) = delta(merge::merge(&mean.unwrap(), &m, &[&a, &b]).unwrap());
    assert_eq!(blocks[0], vec![1.0, 1.5, 1.0]);
}

#[test]
fn magmax_takes_the_largest_magnitude_later_input_winning_ties() {
    let m = manifest(&[3]);
    let a = tv(&m, "a", &[vec![1.0, -3.0, 2.0]]);
    let b = tv(&m, "b", &[vec![-2.0, 1.0, -2.0]]);
    let (blocks, scale) =
        delta(merge::merge(&parse("magmax", json!({}), 2).unwrap(), &m, &[&a, &b]).unwrap());
    assert_eq!((blocks[0].clone(), scale), (vec![-2.0, -3.0, -2.0], 0.5));
}

#[test]
fn coefficient_merges_give_fusionbench_defaults() {
    let sa = Method::parse("simple_average", &Default::default(), 4).unwrap();
    let m = manifest(&[1]);
    let tvs: Vec<TaskVector> = (0..4)
        .map(|i| tv(&m, &format!("v{i}"), &[vec![1.0]]))
        .collect();
    let refs: Vec<&TaskVector> = tvs.iter().collect();
    assert_eq!(
        merge::merge(&sa, &m, &refs).unwrap(),
        Merged::Coefficients(vec![0.25; 4])
    );
    let ta = Method::parse("task_arithmetic", &Default::default(), 4).unwrap();
    assert_eq!(
        merge::merge(&ta, &m, &refs).unwrap(),
        Merged::Coefficients(vec![0.3; 4])
    );
}

#[test]
fn defaults_are_fusionbenchs() {
    let ties = parse("ties_merging", json!({}), 2).unwrap();
    assert_eq!(
        ties.params(),
        json!({"scaling_factor": 0.3, "threshold": 20.0, "merge_func": "sum"})
    );
    let dt = parse("dare_ties_merging", json!({}), 2).unwrap().params();
    assert_eq!(dt["scaling_factor"], 0.5);
    assert_eq!(dt["sparsity_ratio"], 0.5);
    assert_eq!(dt["rescale"], true);
    assert_eq!(dt["threshold"], 20.0);
    let iso = parse("iso_cts", json!({}), 2).unwrap().params();
    assert_eq!(
        iso,
        json!({"scaling_factor": 1.0, "common_space_fraction": 0.8})
    );
    assert_eq!(
        parse("tsv_m", json!({}), 2).unwrap().params(),
        json!({"alpha": 1.0})
    );
    let bc = parse("breadcrumbs", json!({}), 2).unwrap().params();
    assert_eq!(bc["density"], 1.0);
    assert_eq!(bc["gamma"], 0.01);
}

#[test]
fn bad_parameters_are_named() {
    let cases = [
        ("ties_merging", json!({"threshold": 1}), "params.threshold"),
        (
            "ties_merging",
            json!({"threshold": 100}),
            "params.threshold",
        ),
        (
            "ties_merging",
            json!({"merge_func": "median"}),
            "params.merge_func",
        ),
        (
            "ties_merging",
            json!({"remove_keys": ["x"]}),
            "params.remove_keys",
        ),
        ("ties_merging", json!({"treshold": 20}), "params.treshold"),
        (
            "task_arithmetic",
            json!({"scaling_factor": "big"}),
            "params.scaling_factor",
        ),
        (
            "dare_task_arithmetic",
            json!({"sparsity_ratio": 1.0}),
            "params.sparsity_ratio",
        ),
        ("dare_task_arithmetic", json!({"seed": -1}), "params.seed"),
        (
            "dare_ties_merging",
            json!({"only_on_linear_weights": "yes"}),
            "params.only_on_linear_weights",
        ),
        ("breadcrumbs", json!({"weight": [1, 2, 3]}), "params.weight"),
        ("breadcrumbs", json!({"density": 1.5}), "params.density"),
        ("magmax", json!({"inplace": false}), "params.inplace"),
        (
            "simple_average",
            json!({"scaling_factor": 1}),
            "params.scaling_factor",
        ),
        ("iso_c", json!({"exclude_keys": "x"}), "params.exclude_keys"),
        (
            "iso_cts",
            json!({"common_space_fraction": 1.2}),
            "params.common_space_fraction",
        ),
        (
            "iso_c",
            json!({"common_space_fraction": 0.5}),
            "params.common_space_fraction",
        ),
        ("tsv_m", json!({"alpha": [1, 2, 3]}), "params.alpha"),
        ("tsv_m", json!({"alpha": "x"}), "params.alpha"),
        (
            "tsv_m",
            json!({"return_single_task_models": true}),
            "params.return_single_task_models",
        ),
        ("tall_masks", json!({}), "method \"tall_masks\""),
    ];
    for (method, params, named) in cases {
        let err = parse(method, params.clone(), 2).unwrap_err().to_string();
        assert!(err.contains(named), "{method} {params}: {err}");
    }
    let ok = parse(
        "dare_task_arithmetic",
        json!({"sparsity_ratio": 1.0, "rescale": false}),
        2,
    );
    assert!(ok.is_ok());
}
