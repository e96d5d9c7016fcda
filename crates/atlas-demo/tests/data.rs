//! The world's data: deterministic for a seed, balanced, captions true of their scenes.

use atlas_demo::digits;
use atlas_demo::scene::{caption, matches, sample_shapes, Mention};
use atlas_demo::tasks::{generate, split_seed, task_specs, Split};
use atlas_demo::world::{task_data, CaptionSampler};
use atlas_demo::{vocab, Preset, WorldParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn bytes(params: &WorldParams) -> Vec<u8> {
    let mut out = Vec::new();
    for task in task_data(params).unwrap() {
        for split in [Split::Train, Split::Val, Split::Test] {
            for e in task.split(split) {
                out.extend_from_slice(e.image.as_raw());
                out.extend_from_slice(&e.label.to_le_bytes());
            }
        }
    }
    out
}

#[test]
fn task_data_is_deterministic_for_a_seed() {
    let mut p = WorldParams::preset(Preset::Ci);
    p.data.train_per_class = 3;
    p.data.val_per_class = 2;
    p.data.test_per_class = 2;
    let a = bytes(&p);
    assert_eq!(a, bytes(&p));
    p.seed += 1;
    assert_ne!(a, bytes(&p));
}

#[test]
fn pretraining_batches_are_deterministic_for_a_seed() {
    let v = vocab::tokenizer().unwrap();
    let tok = atlas_clip::tokenizer::ClipTokenizer::from_bytes(v.json.as_bytes()).unwrap();
    let p = WorldParams::preset(Preset::Ci);
    let draw = |p: &WorldParams| {
        let b = CaptionSampler::new(p).unwrap().batch(8, &tok).unwrap();
        let px: Vec<f32> = b.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let ids: Vec<u32> = b.ids.flatten_all().unwrap().to_vec1().unwrap();
        (px, ids, b.targets)
    };
    let a = draw(&p);
    assert_eq!(a, draw(&p));
    let mut q = p.clone();
    q.seed = 7;
    assert_ne!(a.0, draw(&q).0);
    // Each image's own caption is true of it.
    let n = 8;
    let m = a.2.len() / n;
    let k = m / n;
    for i in 0..n {
        assert_eq!(a.2[i * m + i * k], 1.0);
    }
}

#[test]
fn splits_are_class_balanced() {
    let all = digits::load().unwrap();
    let pools = digits::pools(&all, 0);
    for (i, spec) in task_specs().iter().enumerate() {
        let ex = generate(
            spec,
            Split::Train,
            7,
            split_seed(0, i, Split::Train),
            &all,
            &pools,
        );
        assert_eq!(ex.len(), 7 * spec.num_classes(), "{}", spec.name);
        for c in 0..spec.num_classes() as u32 {
            let n = ex.iter().filter(|e| e.label == c).count();
            assert_eq!(n, 7, "{} class {c}", spec.name);
        }
        assert!(ex.iter().all(|e| e.image.dimensions() == (32, 32)));
    }
}

#[test]
fn test_digits_are_not_training_digits() {
    let all = digits::load().unwrap();
    let pools = digits::pools(&all, 0);
    assert!(pools.train.iter().all(|i| !pools.test.contains(i)));
    assert!(pools.val.iter().all(|i| !pools.test.contains(i)));
}

#[test]
fn captions_use_only_known_words() {
    let v = vocab::tokenizer().unwrap();
    let tok = atlas_clip::tokenizer::ClipTokenizer::from_bytes(v.json.as_bytes()).unwrap();
    let unk = (v.size - 3) as u32;
    let m = Mention {
        colour: 0.5,
        shape: 0.5,
        texture: 0.5,
        count: 0.5,
        position: 0.5,
        digit: 0.5,
        max: 0,
        rare: 0.5,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..300 {
        let s = sample_shapes(&mut rng, &[]);
        let (text, said) = caption(&s, &m, &mut rng);
        assert!(matches(&said, &s.attrs()));
        let ids = tok.encode(&text).unwrap();
        assert!(!ids.contains(&unk), "{text}");
        assert!(ids.len() <= 32, "{text}");
    }
    for spec in task_specs() {
        for c in &spec.classes {
            for t in &spec.templates {
                let ids = tok.encode(&t.replace("{}", c)).unwrap();
                assert!(!ids.contains(&unk), "{t} / {c}");
            }
        }
    }
    for t in atlas_clip::templates::default_templates() {
        assert!(
            !tok.encode(&t.replace("{}", "circle"))
                .unwrap()
                .contains(&unk),
            "{t}"
        );
    }
}
