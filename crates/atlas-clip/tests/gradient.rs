//! ∂L/∂Λ from the composed-leaf backward plus the block reduction, in f64, checked against
//! central finite differences (every coefficient, relative error ≤ 1e-5) and against PyTorch's
//! autograd through the composition (relative error ≤ 1e-4), for cross-entropy and entropy, per
//! block and per part, at batch 4 and batch 1 (where candle's fused ops would drop gradients).

mod common;

use atlas_clip::grad::{coefficient_gradient, Leaves};
use atlas_clip::loss::{cross_entropy, entropy};
use atlas_clip::model::normalize;
use atlas_clip::{Backbone, VisionTower};
use atlas_core::{Coefficients, Layout, StorageDType, TaskVector};
use candle_core::{DType, Tensor};
use common::*;
use std::sync::Arc;

#[derive(Clone, Copy, Debug)]
enum Loss {
    Ce,
    Ent,
}

struct Setup {
    bb: Backbone,
    tvs: Vec<Arc<TaskVector>>,
    pixels: Tensor,
    labels: Tensor,
    head: Tensor,
    scale: f64,
}

impl Setup {
    fn new(batch: usize) -> (Self, Reference) {
        let r = Reference::load();
        let bb = backbone(DType::F64);
        let tvs = task_vectors(&bb, StorageDType::F32);
        let head = normalize(&bb.text().unwrap().forward(&r.ids()).unwrap()).unwrap();
        let scale = bb.logit_scale().exp();
        let pixels = r
            .t("pixel_values")
            .narrow(0, 0, batch)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let labels = r.labels().narrow(0, 0, batch).unwrap();
        (
            Setup {
                bb,
                tvs,
                pixels,
                labels,
                head,
                scale,
            },
            r,
        )
    }

    fn loss(&self, tower: &VisionTower, kind: Loss) -> atlas_clip::Result<Tensor> {
        let img = normalize(&tower.forward(&self.pixels)?)?;
        let logits = (img.matmul(&self.head.t()?)? * self.scale)?;
        match kind {
            Loss::Ce => cross_entropy(&logits, &self.labels),
            Loss::Ent => entropy(&logits),
        }
    }

    fn value(&self, coefs: &Coefficients, kind: Loss) -> f64 {
        let leaves = Leaves::compose::<f64>(&self.bb, &self.tvs, coefs).unwrap();
        let tower = self.bb.vision(&leaves).unwrap();
        self.loss(&tower, kind).unwrap().to_scalar::<f64>().unwrap()
    }

    fn gradient(&self, coefs: &Coefficients, kind: Loss) -> (f64, Vec<f64>) {
        coefficient_gradient::<f64>(&self.bb, &self.tvs, coefs, |t| self.loss(t, kind)).unwrap()
    }

    /// Five-point central differences: truncation error O(h⁴), so round-off stays far below
    /// the 1e-5 tolerance even for small gradients.
    fn finite_differences(&self, coefs: &Coefficients, kind: Loss) -> Vec<f64> {
        let h = 1e-3;
        (0..coefs.values.len())
            .map(|i| {
                let at = |d: f64| {
                    let mut v = coefs.values.clone();
                    v[i] += d;
                    self.value(&coefs.with_values(v).unwrap(), kind)
                };
                (8.0 * (at(h) - at(-h)) - (at(2.0 * h) - at(-2.0 * h))) / (12.0 * h)
            })
            .collect()
    }
}

fn layouts(r: &Reference, nb: usize) -> Vec<(&'static str, Coefficients)> {
    let k = r.json["part_k"].as_u64().unwrap() as usize;
    let seed = r.json["part_seed"].as_u64().unwrap();
    vec![
        (
            "block",
            Coefficients::new(Layout::PerBlock, 3, nb, r.f64s("coef_block")).unwrap(),
        ),
        (
            "part",
            Coefficients::new(Layout::PerPart { k, seed }, 3, nb, r.f64s("coef_part")).unwrap(),
        ),
    ]
}

/// Entries whose true gradient is below this are compared absolutely (the visual projection
/// has τ = 0, so its gradients are exactly 0).
const FLOOR: f64 = 1e-6;

#[test]
fn gradient_matches_finite_differences_and_pytorch_batch4() {
    let (s, r) = Setup::new(4);
    for (layout, coefs) in layouts(&r, s.bb.manifest().len()) {
        for (kind, tag) in [(Loss::Ce, "ce"), (Loss::Ent, "ent")] {
            let (loss, grad) = s.gradient(&coefs, kind);
            let fd = s.finite_differences(&coefs, kind);
            let (fd_err, at) = max_rel_err(&grad, &fd, FLOOR);
            let torch = r.f64s(&format!("grad_{tag}_{layout}"));
            let (pt_err, _) = max_rel_err(&grad, &torch, FLOOR);
            let torch_loss = r.f64s(&format!("loss_{tag}_{layout}"))[0];
            println!("{layout} {tag}: loss {loss:.6} (torch {torch_loss:.6}), rel err vs FD {fd_err:.1e} (at {at}), vs PyTorch {pt_err:.1e}");
            assert!((loss - torch_loss).abs() < 1e-9);
            assert!(
                fd_err <= 1e-5,
                "{layout} {tag}: FD rel err {fd_err} at {at}"
            );
            assert!(pt_err <= 1e-4, "{layout} {tag}: PyTorch rel err {pt_err}");
            let nonzero = grad.iter().filter(|g| g.abs() > FLOOR).count();
            assert!(
                nonzero * 10 >= grad.len() * 9,
                "{layout} {tag}: only {nonzero} of {} gradients are non-zero",
                grad.len()
            );
        }
    }
}

#[test]
fn gradient_matches_finite_differences_and_pytorch_batch1() {
    let (s, r) = Setup::new(1);
    let (_, coefs) = layouts(&r, s.bb.manifest().len()).remove(0);
    for (kind, tag) in [(Loss::Ce, "ce"), (Loss::Ent, "ent")] {
        let (_, grad) = s.gradient(&coefs, kind);
        let fd = s.finite_differences(&coefs, kind);
        let (fd_err, at) = max_rel_err(&grad, &fd, FLOOR);
        let (pt_err, _) = max_rel_err(&grad, &r.f64s(&format!("grad_{tag}_block_b1")), FLOOR);
        println!("batch 1 {tag}: rel err vs FD {fd_err:.1e} (at {at}), vs PyTorch {pt_err:.1e}");
        assert!(fd_err <= 1e-5 && pt_err <= 1e-4);
    }
}
