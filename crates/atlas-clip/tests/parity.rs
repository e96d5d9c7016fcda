//! Numerical parity with Hugging Face transformers on a tiny random CLIP (fixtures written by
//! tests/fixtures/make_reference.py): embeddings, logits and composed-model logits, f32, ≤ 1e-4.

mod common;

use atlas_clip::model::{bf16_gemm, normalize, softmax_last};
use atlas_clip::{vision_manifest, QkvBlocks};
use atlas_clip::{Bf16Matmuls, VisionTower};
use atlas_core::parts::{block_key, part_of};
use atlas_core::{Coefficients, Layout, StorageDType};
use candle_core::{DType, Device, Tensor};
use common::*;

const TOL: f64 = 1e-4;

fn logits(bb: &atlas_clip::Backbone, img: &Tensor, r: &Reference) -> Tensor {
    let txt = bb.text().unwrap().forward(&r.ids()).unwrap();
    let scale = bb.logit_scale().exp();
    (normalize(img)
        .unwrap()
        .matmul(&normalize(&txt).unwrap().t().unwrap())
        .unwrap()
        * scale)
        .unwrap()
}

#[test]
fn image_text_embeddings_and_logits_match_transformers() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let img = bb
        .base_vision()
        .unwrap()
        .forward(&r.t("pixel_values"))
        .unwrap();
    let d_img = max_abs_diff(&img, &r.t("image_embeds"));
    let txt = bb.text().unwrap().forward(&r.ids()).unwrap();
    let d_txt = max_abs_diff(&txt, &r.t("text_embeds"));
    let d_log = max_abs_diff(&logits(&bb, &img, &r), &r.t("logits_per_image"));
    println!("max abs diff: image {d_img:.2e}, text {d_txt:.2e}, logits {d_log:.2e}");
    assert!(d_img <= TOL && d_txt <= TOL && d_log <= TOL);
}

#[test]
fn composed_logits_match_transformers_for_every_layout() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let tvs = task_vectors(&bb, StorageDType::F32);
    let nb = bb.manifest().len();
    let k = r.json["part_k"].as_u64().unwrap() as usize;
    let seed = r.json["part_seed"].as_u64().unwrap();
    let cases = [
        (
            "composed_iso_logits",
            Coefficients::isotropic(r.f64s("coef_iso"), nb).unwrap(),
        ),
        (
            "composed_block_logits",
            Coefficients::new(Layout::PerBlock, 3, nb, r.f64s("coef_block")).unwrap(),
        ),
        (
            "composed_part_logits",
            Coefficients::new(Layout::PerPart { k, seed }, 3, nb, r.f64s("coef_part")).unwrap(),
        ),
    ];
    for (name, coefs) in cases {
        let img = bb
            .composed_vision(&tvs, &coefs)
            .unwrap()
            .forward(&r.t("pixel_values"))
            .unwrap();
        let want = r.t(name);
        let d = max_abs_diff(&logits(&bb, &img, &r), &want);
        // The composition must matter, or this test could not catch a wrong one.
        let moved = max_abs_diff(&want, &r.t("logits_per_image"));
        println!("{name}: max abs diff {d:.2e} (composition moves logits by {moved:.2})");
        assert!(d <= TOL, "{name}: {d}");
        assert!(moved > 1e-2);
    }
}

#[test]
fn half_precision_storage_stays_close() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let nb = bb.manifest().len();
    let coefs = Coefficients::new(Layout::PerBlock, 3, nb, r.f64s("coef_block")).unwrap();
    for dtype in [StorageDType::F16, StorageDType::BF16] {
        let tvs = task_vectors(&bb, dtype);
        let img = bb
            .composed_vision(&tvs, &coefs)
            .unwrap()
            .forward(&r.t("pixel_values"))
            .unwrap();
        let d = max_abs_diff(&logits(&bb, &img, &r), &r.t("composed_block_logits"));
        println!("{dtype:?} storage: max abs logit diff {d:.2e}");
        assert!(d < 2e-2, "{dtype:?}: {d}");
    }
}

/// bf16 matmuls (packed weights, f32 activations) on every kernel this CPU has: the composed
/// tower's class probabilities within 1e-2 of f32's. The paths a CPU lacks are the f32 path,
/// which the tests above check against transformers.
#[test]
fn bf16_matmuls_on_every_kernel_keep_probabilities_within_1e2() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let tvs = task_vectors(&bb, StorageDType::F32);
    let nb = bb.manifest().len();
    let coefs = Coefficients::new(Layout::PerBlock, 3, nb, r.f64s("coef_block")).unwrap();
    let weights = bb.compose(&tvs, &coefs).unwrap();
    let cfg = &bb.config;
    let probs = |src: &dyn atlas_clip::WeightSource| {
        let tower = VisionTower::new(&cfg.vision, Some(cfg.projection_dim), src).unwrap();
        let img = tower.forward(&r.t("pixel_values")).unwrap();
        softmax_last(&logits(&bb, &img, &r)).unwrap()
    };
    let want = probs(&weights);
    let kernels = bf16_gemm::available();
    println!("bf16 kernels on this CPU: {kernels:?}");
    for kernel in kernels {
        let got = probs(&Bf16Matmuls(&weights, Some(kernel)));
        let d = max_abs_diff(&got, &want);
        println!("{kernel:?}: max abs probability diff {d:.2e}");
        assert!(d <= 1e-2, "{kernel:?}: {d}");
        // bf16 products are not f32's: a kernel that silently ran the f32 path would give 0.
        assert!(d > 0.0, "{kernel:?} gave f32's probabilities exactly");
    }
}

#[test]
fn manifest_order_and_parts_match_the_reference() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let names: Vec<&str> = bb
        .manifest()
        .blocks()
        .iter()
        .map(|b| b.name.as_str())
        .collect();
    let want: Vec<&str> = r.json["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, want);
    let k = r.json["part_k"].as_u64().unwrap() as usize;
    let key = block_key(r.json["part_seed"].as_u64().unwrap(), names[1]);
    let parts: Vec<i64> = r.t("parts_of_block1").to_vec1().unwrap();
    let ours: Vec<i64> = (0..parts.len())
        .map(|j| part_of(key, j, k) as i64)
        .collect();
    assert_eq!(ours, parts);
}

#[test]
fn tokenizer_reproduces_the_reference_ids() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let tok = bb.tokenizer().unwrap();
    let texts: Vec<String> = r.json["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let got = tok.encode_padded(&texts, &Device::Cpu).unwrap();
    assert_eq!(
        got.to_vec2::<u32>().unwrap(),
        r.ids().to_vec2::<u32>().unwrap()
    );
}

#[test]
fn open_clip_deltas_map_to_the_same_task_vector() {
    let r = Reference::load();
    let bb = backbone(DType::F32);
    let tvs = task_vectors(&bb, StorageDType::F32);
    let m = bb.manifest();
    let oc = bb
        .load_task_vector(
            &tiny().join("delta_c_openclip.safetensors"),
            None,
            StorageDType::F32,
        )
        .unwrap();
    for (a, b) in oc.blocks().iter().zip(tvs[2].blocks()) {
        assert_eq!(a, b);
    }
    let with_proj = bb
        .load_task_vector(
            &tiny().join("delta_a_openclip_with_proj.safetensors"),
            None,
            StorageDType::F32,
        )
        .unwrap();
    let proj = with_proj.tensor_f32(m, "visual_projection.weight").unwrap();
    let want: Vec<f32> = r
        .t("openclip_proj_delta_hf")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(proj, want);
    // Under fused q/k/v blocks the same file loads with in_proj as one block.
    let fused = vision_manifest(
        &bb.config.vision,
        bb.config.projection_dim,
        QkvBlocks::Fused,
    );
    assert_eq!(
        fused.len(),
        m.len() - 2 * 2 * bb.config.vision.num_hidden_layers
    );
}
