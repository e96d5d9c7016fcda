//! Self-check of the crate's custom ops (the fused inference ops, fused attention, the
//! composition, the gradient reduction) on random inputs, each dtype, a few shapes including
//! odd sizes, against the same computation in plain candle ops (in f32, then cast) on the same
//! device. On CUDA that checks the kernels; on the CPU it checks the CPU fallbacks. The report
//! is the largest errors of each comparison, pass or fail, and the time of each fused op next
//! to its plain-op version (`atlas-serve bench kernels` prints it).

use crate::config::Activation;
use crate::device_compose::DeviceComposer;
use crate::model::{attention, causal_mask, fused, softmax_ops};
use crate::{ClipError, Result};
use atlas_core::manifest::{Block, TensorSpec};
use atlas_core::parts::{block_key, part_of};
use atlas_core::random::{random_blocks, random_coefficients, random_task_vector};
use atlas_core::{Coefficients, Layout, Manifest, StorageDType, TaskVector};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;
use std::time::Instant;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// One comparison: the largest absolute error and the largest error over its tolerance.
#[derive(Debug, Clone)]
pub struct Check {
    pub op: String,
    pub dtype: DType,
    /// Shape of the compared output.
    pub dims: Vec<usize>,
    pub max_abs: f32,
    /// max |got - want| / (atol + rtol |want|); at most 1 passes (NaN fails).
    pub worst: f32,
}

impl Check {
    pub fn pass(&self) -> bool {
        self.worst <= 1.0
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<28} {:<5} {:<16} max abs err {:.3e}  err/tol {:.3}  {}",
            self.op,
            format!("{:?}", self.dtype),
            format!("{:?}", self.dims),
            self.max_abs,
            self.worst,
            if self.pass() { "PASS" } else { "FAIL" }
        )
    }
}

/// Tolerance (absolute, relative) per dtype: a few units in the last place of the output,
/// since the op and the reference round the same f32 value, computed in a different order.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F16 => (1e-3, 2e-3),
        DType::BF16 => (8e-3, 1.6e-2),
        _ => (1e-5, 1e-4),
    }
}

fn compare(op: &str, got: &Tensor, want: &Tensor) -> Result<Check> {
    let dtype = want.dtype();
    let (atol, rtol) = tolerance(dtype);
    let flat =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let (g, w) = (flat(got)?, flat(want)?);
    if g.len() != w.len() || got.dtype() != dtype {
        return Err(ClipError::tensor(
            op,
            format!(
                "output {:?} {:?}, expected {:?} {:?}",
                got.dims(),
                got.dtype(),
                want.dims(),
                dtype
            ),
        ));
    }
    let (mut max_abs, mut worst) = (0f32, 0f32);
    for (g, w) in g.iter().zip(&w) {
        let e = (g - w).abs();
        let r = e / (atol + rtol * w.abs());
        // NaN compares false: record it as a failure.
        max_abs = if e.is_nan() { f32::NAN } else { max_abs.max(e) };
        worst = if r.is_nan() || worst.is_nan() {
            f32::NAN
        } else {
            worst.max(r)
        };
    }
    Ok(Check {
        op: op.to_string(),
        dtype,
        dims: want.dims().to_vec(),
        max_abs,
        worst,
    })
}

fn randn(dims: &[usize], scale: f64, mean: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let t = Tensor::randn(0f32, 1f32, dims, dev)?;
    Ok(t.affine(scale, mean)?.to_dtype(dtype)?)
}

fn f32_of(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

// The plain-op references: f32 arithmetic, one cast back to the input's dtype.

fn layer_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x32 = f32_of(x)?;
    let xc = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(&f32_of(w)?)?
        .broadcast_add(&f32_of(b)?)?
        .to_dtype(x.dtype())
}

fn bias_act_ref(y: &Tensor, b: &Tensor, a: Option<Activation>) -> candle_core::Result<Tensor> {
    let v = f32_of(y)?.broadcast_add(&f32_of(b)?)?;
    let v = match a {
        None => v,
        Some(Activation::QuickGelu) => (&v / (v.affine(-1.702, 0.0)?.exp()? + 1.0)?)?,
        Some(Activation::Gelu) => v.gelu_erf()?,
    };
    v.to_dtype(y.dtype())
}

fn bias_residual_ref(y: &Tensor, b: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    let v = f32_of(y)?.broadcast_add(&f32_of(b)?)?;
    (v + f32_of(r)?)?.to_dtype(y.dtype())
}

/// Shapes of the checks: odd sizes, a row shorter than a warp, ViT-B/32-like rows.
const ROWS: [&[usize]; 3] = [&[3, 5, 7], &[2, 50, 768], &[1, 13, 257]];
const ACTS: [Option<Activation>; 3] = [None, Some(Activation::QuickGelu), Some(Activation::Gelu)];

pub fn check_all(dev: &Device) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    for dtype in DTYPES {
        for dims in ROWS {
            out.extend(check_rows(dims, dtype, dev)?);
        }
    }
    for dtype in DTYPES {
        out.extend(check_attention(dtype, dev)?);
    }
    out.extend(check_compose(dev)?);
    out.extend(check_reduce(dev)?);
    Ok(out)
}

/// Attention cases (batch, tokens, heads, head dim, causal mask): the ViT-B/32, B/16 and L/14
/// token counts and the text tower's masked 77 at odd batch sizes, then odd head dims (not a
/// multiple of 32, and the largest supported) with odd token counts.
const ATTENTION: [(usize, usize, usize, usize, bool); 6] = [
    (3, 50, 12, 64, false),
    (1, 197, 12, 64, false),
    (3, 257, 16, 64, false),
    (5, 77, 8, 64, true),
    (3, 13, 3, 40, true),
    (1, 33, 2, 128, false),
];

/// A stacked q/k/v projection output [B, N, 3·H·hd] with q scaled by 1/√hd, as the model's.
fn qkv_input(
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let d = heads * hd;
    let q = randn(&[b, n, d], (hd as f64).powf(-0.5), 0.0, DType::F32, dev)?;
    let kv = randn(&[b, n, 2 * d], 1.0, 0.0, DType::F32, dev)?;
    Ok(Tensor::cat(&[&q, &kv], 2)?.to_dtype(dtype)?)
}

/// The fused attention op against the model's math in plain ops on f32 copies, cast back.
fn check_attention(dtype: DType, dev: &Device) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    for (b, n, heads, hd, masked) in ATTENTION {
        let qkv = qkv_input(b, n, heads, hd, dtype, dev)?;
        let mask = if masked {
            Some(causal_mask(n, dtype, dev)?)
        } else {
            None
        };
        let got = attention::attention(&qkv, heads, mask.as_ref())?;
        let mask32 = mask.as_ref().map(f32_of).transpose()?;
        let want = attention::reference(&f32_of(&qkv)?, heads, mask32.as_ref(), softmax_ops)?
            .to_dtype(dtype)?;
        let name = format!("attention hd{hd}{}", if masked { " causal" } else { "" });
        out.push(compare(&name, &got, &want)?);
    }
    Ok(out)
}

/// The four fused ops on inputs of shape `dims` (rows of the last dimension).
fn check_rows(dims: &[usize], dtype: DType, dev: &Device) -> Result<Vec<Check>> {
    let n = *dims
        .last()
        .ok_or_else(|| ClipError::tensor("rows", "a check's shape needs a dimension"))?;
    let x = randn(dims, 2.0, 3.0, dtype, dev)?;
    let w = randn(&[n], 0.5, 1.0, dtype, dev)?;
    let b = randn(&[n], 0.5, 0.0, dtype, dev)?;
    let r = randn(dims, 1.0, 0.0, dtype, dev)?;
    let eps = 1e-5;
    let mut out = vec![
        compare(
            "layer_norm",
            &x.apply_op3_no_bwd(&w, &b, &fused::LayerNorm { eps: eps as f32 })?,
            &layer_norm_ref(&x, &w, &b, eps)?,
        )?,
        compare(
            "softmax",
            &x.apply_op1_no_bwd(&fused::Softmax)?,
            &softmax_ops(&x)?,
        )?,
        compare(
            "bias_residual",
            &x.apply_op3_no_bwd(&b, &r, &fused::BiasResidual)?,
            &bias_residual_ref(&x, &b, &r)?,
        )?,
    ];
    for a in ACTS {
        let y = x.affine(0.5, -1.5)?;
        out.push(compare(
            &format!("bias_act({a:?})"),
            &y.apply_op2_no_bwd(&b, &fused::BiasAct(a))?,
            &bias_act_ref(&y, &b, a)?,
        )?);
    }
    Ok(out)
}

/// Blocks of odd sizes (none a multiple of 8) and a block of two tensors.
fn small_manifest() -> Result<Arc<Manifest>> {
    Ok(Arc::new(Manifest::new(vec![
        Block::single(TensorSpec::new("w", &[7, 37])),
        Block {
            name: "qkv".into(),
            tensors: vec![TensorSpec::new("q", &[5]), TensorSpec::new("k", &[33, 3])],
        },
        Block::single(TensorSpec::new("b", &[1])),
        Block::single(TensorSpec::new("big", &[1000, 77])),
    ])?))
}

/// The small manifest's composer over random θ0, and three random task vectors stored at f16,
/// bf16 and f32.
fn composer(dev: &Device) -> Result<(Arc<Manifest>, Vec<Arc<TaskVector>>, DeviceComposer)> {
    let m = small_manifest()?;
    let base = random_blocks(&m, 3, 0.02);
    let stores = [StorageDType::F16, StorageDType::BF16, StorageDType::F32];
    let tvs = stores
        .iter()
        .enumerate()
        .map(|(i, &s)| Ok(Arc::new(random_task_vector(&m, i, s)?)))
        .collect::<Result<_>>()?;
    let dc = DeviceComposer::new(m.clone(), &base, dev)?;
    Ok((m, tvs, dc))
}

/// The composition at every output dtype, τ at f16, bf16 and f32 in one composition, per
/// block and per part, against θ0 + Σ c τ in plain ops per block.
fn check_compose(dev: &Device) -> Result<Vec<Check>> {
    let (m, tvs, dc) = composer(dev)?;
    let mut out = Vec::new();
    for layout in [Layout::PerBlock, Layout::PerPart { k: 3, seed: 4 }] {
        let coefs = random_coefficients(layout, tvs.len(), m.len())?;
        for dtype in DTYPES {
            let got = unpadded(&dc, &dc.compose_flat(&tvs, &coefs, dtype)?)?;
            let want = compose_ref(&dc, &tvs, &coefs, dtype)?;
            out.push(compare(
                &format!("compose {}", layout_name(layout)),
                &got,
                &want,
            )?);
        }
    }
    Ok(out)
}

/// The gradient reduction ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block (and part: K = 3 in registers, K = 11
/// through shared memory), τ at f16, bf16 and f32 together, against `(g · τ · mask).sum_all()`
/// per (block, τ, part) in plain ops. Both sum in f32 in different orders, so the error is
/// measured against 1e-5 × Σ|g τ| of the entry (a bound on the rounding of either sum).
fn check_reduce(dev: &Device) -> Result<Vec<Check>> {
    let (m, tvs, dc) = composer(dev)?;
    let grads = random_blocks(&m, 9, 1.0);
    let flat = dc
        .layout()
        .flatten(|b, out: &mut [f32]| out.copy_from_slice(&grads[b]));
    let flat = Tensor::from_vec(flat, dc.layout().total(), dev)?;
    let device_tvs = dc.resident(&tvs)?;
    let mut out = Vec::new();
    for layout in [
        Layout::PerBlock,
        Layout::PerPart { k: 3, seed: 4 },
        Layout::PerPart { k: 11, seed: 5 },
    ] {
        let coefs = random_coefficients(layout, tvs.len(), m.len())?;
        let k = coefs.parts();
        let got = dc.reduce_flat(&flat, &tvs, &coefs)?;
        let (mut max_abs, mut worst) = (0f32, 0f32);
        for (b, block) in m.blocks().iter().enumerate() {
            let r = dc.layout().block(b);
            let g = flat.narrow(0, r.start, r.len())?;
            let key = match layout {
                Layout::PerPart { seed, .. } => block_key(seed, &block.name),
                _ => 0,
            };
            for p in 0..k {
                let mask: Vec<f32> = (0..r.len())
                    .map(|j| f32::from(k == 1 || part_of(key, j, k) == p))
                    .collect();
                let gm = (&g * Tensor::from_vec(mask, r.len(), dev)?)?;
                for (i, t) in device_tvs.iter().enumerate() {
                    let tau = t.narrow(0, r.start, r.len())?.to_dtype(DType::F32)?;
                    let prod = (&gm * tau)?;
                    let want = prod.sum_all()?.to_scalar::<f32>()?;
                    let l1 = prod.abs()?.sum_all()?.to_scalar::<f32>()?;
                    let e = (got[(i * m.len() + b) * k + p] as f32 - want).abs();
                    let r = e / (1e-5 * l1 + f32::MIN_POSITIVE);
                    max_abs = if e.is_nan() { f32::NAN } else { max_abs.max(e) };
                    worst = if r.is_nan() || worst.is_nan() {
                        f32::NAN
                    } else {
                        worst.max(r)
                    };
                }
            }
        }
        out.push(Check {
            op: format!("reduce {}", layout_name(layout)),
            dtype: DType::F32,
            dims: vec![tvs.len(), m.len(), k],
            max_abs,
            worst,
        });
    }
    Ok(out)
}

fn layout_name(l: Layout) -> String {
    match l {
        Layout::PerPart { k, .. } => format!("per part K={k}"),
        other => format!("{other:?}"),
    }
}

/// The blocks of a flat θ end to end, without the padding.
fn unpadded(dc: &DeviceComposer, flat: &Tensor) -> Result<Tensor> {
    let parts: Vec<Tensor> = (0..dc.layout().n_blocks())
        .map(|b| {
            let r = dc.layout().block(b);
            flat.narrow(0, r.start, r.len())
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// θ0 + Σ c τ per block in plain ops; per part, c is a per-element tensor built from the parts.
fn compose_ref(
    dc: &DeviceComposer,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    dtype: DType,
) -> Result<Tensor> {
    let dev = dc.base().device();
    let device_tvs = dc.resident(tvs)?;
    let mut blocks = Vec::new();
    for (b, block) in dc.manifest().blocks().iter().enumerate() {
        let r = dc.layout().block(b);
        let mut acc = dc.base().narrow(0, r.start, r.len())?;
        for (i, t) in device_tvs.iter().enumerate() {
            let c: Vec<f32> = match coefs.layout {
                Layout::PerPart { k, seed } => {
                    let key = block_key(seed, &block.name);
                    let cb = coefs.block(i, b);
                    (0..r.len())
                        .map(|j| cb[part_of(key, j, k)] as f32)
                        .collect()
                }
                _ => vec![coefs.block(i, b)[0] as f32; r.len()],
            };
            let c = Tensor::from_vec(c, r.len(), dev)?;
            let tau = t.narrow(0, r.start, r.len())?.to_dtype(DType::F32)?;
            acc = (acc + (tau * c)?)?;
        }
        blocks.push(acc);
    }
    Ok(Tensor::cat(&blocks, 0)?.to_dtype(dtype)?)
}

/// Median milliseconds of `f` over `iters` calls (at least one), the device synchronised
/// around each call.
fn time_ms<E>(
    dev: &Device,
    iters: usize,
    f: impl Fn() -> std::result::Result<Tensor, E>,
) -> Result<f64>
where
    ClipError: From<E>,
{
    for _ in 0..2 {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

/// One fused op timed next to its plain-op version, median milliseconds each.
#[derive(Debug, Clone)]
pub struct Timing {
    pub op: String,
    pub dtype: DType,
    pub fused_ms: f64,
    pub plain_ms: f64,
}

impl Timing {
    /// The column titles of the `Display` rows.
    pub fn header() -> String {
        format!(
            "{:<28} {:<5} {:>10} {:>10} {:>8}",
            "op", "dtype", "fused ms", "plain ms", "speedup"
        )
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<28} {:<5} {:>10.3} {:>10.3} {:>7.2}x",
            self.op,
            format!("{:?}", self.dtype),
            self.fused_ms,
            self.plain_ms,
            self.plain_ms / self.fused_ms
        )
    }
}

/// Fused against plain for each op and dtype at ViT-B/32 sizes (batch 256 on CUDA, 8 on the
/// CPU, where the plain ops are slow), and attention at L/14 sizes on CUDA; `iters` timed calls
/// per figure.
pub fn timings(dev: &Device, iters: usize) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    for dtype in DTYPES {
        out.extend(time_rows(dev, iters, dtype)?);
        out.extend(time_attention(dev, iters, dtype)?);
    }
    Ok(out)
}

fn batch_of(dev: &Device) -> usize {
    if dev.is_cuda() {
        256
    } else {
        8
    }
}

/// The four fused row ops against their references over ViT-B/32's tokens.
fn time_rows(dev: &Device, iters: usize, dtype: DType) -> Result<Vec<Timing>> {
    let batch = batch_of(dev);
    let (tokens, d, heads) = (batch * 50, 768, 12);
    let x = randn(&[tokens, d], 1.0, 0.0, dtype, dev)?;
    let h = randn(&[tokens, 4 * d], 1.0, 0.0, dtype, dev)?;
    let s = randn(&[batch, heads, 50, 50], 1.0, 0.0, dtype, dev)?;
    let (w, b, b4) = (
        randn(&[d], 1.0, 1.0, dtype, dev)?,
        randn(&[d], 1.0, 0.0, dtype, dev)?,
        randn(&[4 * d], 1.0, 0.0, dtype, dev)?,
    );
    let ln = fused::LayerNorm { eps: 1e-5 };
    let act = fused::BiasAct(Some(Activation::QuickGelu));
    let quick_gelu = || bias_act_ref(&h, &b4, Some(Activation::QuickGelu));
    let timing = |op: &str, fused_ms, plain_ms| Timing {
        op: op.to_string(),
        dtype,
        fused_ms,
        plain_ms,
    };
    Ok(vec![
        timing(
            "layer_norm",
            time_ms(dev, iters, || x.apply_op3_no_bwd(&w, &b, &ln))?,
            time_ms(dev, iters, || layer_norm_ref(&x, &w, &b, 1e-5))?,
        ),
        timing(
            "softmax",
            time_ms(dev, iters, || s.apply_op1_no_bwd(&fused::Softmax))?,
            time_ms(dev, iters, || softmax_ops(&s))?,
        ),
        timing(
            "bias_act(quick_gelu)",
            time_ms(dev, iters, || h.apply_op2_no_bwd(&b4, &act))?,
            time_ms(dev, iters, quick_gelu)?,
        ),
        timing(
            "bias_residual",
            time_ms(dev, iters, || {
                x.apply_op3_no_bwd(&b, &x, &fused::BiasResidual)
            })?,
            time_ms(dev, iters, || bias_residual_ref(&x, &b, &x))?,
        ),
    ])
}

/// Attention against the model's plain path (permute copy, matmuls, fused softmax, transpose
/// copy): ViT-B/32's 50 tokens, and on CUDA L/14's 257 at a quarter the batch.
fn time_attention(dev: &Device, iters: usize, dtype: DType) -> Result<Vec<Timing>> {
    let batch = batch_of(dev);
    let mut shapes = vec![("attention B/32", batch, 50, 12, 64)];
    if dev.is_cuda() {
        shapes.push(("attention L/14", batch / 4, 257, 16, 64));
    }
    let plain = |s: &Tensor| s.apply_op1_no_bwd(&fused::Softmax);
    let mut out = Vec::new();
    for (op, nb, n, nh, hd) in shapes {
        let qkv = qkv_input(nb, n, nh, hd, dtype, dev)?;
        out.push(Timing {
            op: op.to_string(),
            dtype,
            fused_ms: time_ms(dev, iters, || attention::attention(&qkv, nh, None))?,
            plain_ms: time_ms(dev, iters, || attention::reference(&qkv, nh, None, plain))?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU fallbacks of every custom op against plain candle ops (what `bench kernels
    /// --device cpu` runs; on a GPU machine the same checks run the CUDA kernels).
    #[test]
    fn cpu_fallbacks_match_plain_ops() {
        let checks = check_all(&Device::Cpu).unwrap();
        assert_eq!(checks.len(), 3 * 3 * 6 + 3 * ATTENTION.len() + 6 + 3);
        for c in &checks {
            assert!(c.pass(), "{c}");
        }
    }

    #[test]
    fn a_wrong_result_fails_the_check() {
        let want = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let got = Tensor::new(&[1f32, 2.0, 3.1], &Device::Cpu).unwrap();
        assert!(!compare("x", &got, &want).unwrap().pass());
        let nan = Tensor::new(&[1f32, f32::NAN, 3.0], &Device::Cpu).unwrap();
        assert!(!compare("x", &nan, &want).unwrap().pass());
        assert!(compare("x", &want, &want).unwrap().pass());
    }
}
