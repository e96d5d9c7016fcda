//! `atlas-serve bench compose --device cuda`: the device-resident composition of the ViT-B/32
//! image tower (θ0 and the task vectors uploaded once, untimed; one kernel per composition)
//! next to a device copy moving the same number of bytes, which bounds it from below.

use super::common::{gbps, random_blocks, random_coefficients, random_task_vector, time, Timing};
use super::compose::ComposeArgs;
use anyhow::{bail, Context};
use atlas_clip::device_compose::DeviceComposer;
use atlas_clip::{vision_manifest, QkvBlocks, VisionConfig};
use atlas_core::{compose, Coefficients, Layout, TaskVector};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::sync::Arc;

pub fn run(a: &ComposeArgs) -> anyhow::Result<()> {
    let dev = match a.device.as_str() {
        "cpu-op" => Device::Cpu,
        d => crate::device::open(d)?,
    };
    let manifest = Arc::new(vision_manifest(
        &VisionConfig::vit_b32(),
        512,
        QkvBlocks::Separate,
    ));
    let (numel, n_tv, es) = (manifest.numel(), a.n_tv, a.store.size_in_bytes());
    let base = random_blocks(&manifest, 1, 0.02);
    let tvs: Vec<Arc<TaskVector>> = (0..n_tv)
        .map(|i| random_task_vector(&manifest, i, a.store).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let dc = DeviceComposer::new(manifest.clone(), &base, &dev)?;
    dc.resident(&tvs)?;
    let per_block = random_coefficients(Layout::PerBlock, n_tv, manifest.len())?;
    check_against_host(&dc, &base, &tvs, &per_block)?;

    // Read θ0 (f32) and every τ once, write θ once at the output dtype.
    let bytes = |out_size: usize| numel * 4 + n_tv * numel * es + numel * out_size;
    let copy_len = bytes(4) / 2 / 4;
    let src = Tensor::zeros(copy_len, DType::F32, &dev)?;
    let copy = timed(&dev, a, || Ok(src.copy()?))?;
    drop(src);
    let copy_bytes = 2 * copy_len * 4;
    let mut rows = vec![json!({
        "figure": "device copy", "bytes": copy_bytes,
        "GBps": gbps(copy_bytes, copy.median), "timing": copy.json(),
    })];
    println!(
        "device copy of {:.0} MB: {:.3} ms, {:.0} GB/s",
        copy_bytes as f64 / 1e6,
        copy.median,
        gbps(copy_bytes, copy.median)
    );
    let mut layouts = vec![("per block", per_block)];
    if a.parts > 1 {
        let k = Layout::PerPart {
            k: a.parts,
            seed: 5,
        };
        layouts.push(("per part", random_coefficients(k, n_tv, manifest.len())?));
    }
    for (name, coefs) in &layouts {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = timed(&dev, a, || Ok(dc.compose_flat(&tvs, coefs, dtype)?))?;
            let b = bytes(dtype.size_in_bytes());
            let (bw, copy_bw) = (gbps(b, t.median), gbps(copy_bytes, copy.median));
            println!(
                "compose {n_tv} τ ({:?}), {name}, θ at {dtype:?}: {:.3} ms, {bw:.0} GB/s ({:.0}% of copy)",
                a.store,
                t.median,
                100.0 * bw / copy_bw
            );
            rows.push(json!({
                "figure": format!("compose {name}"), "dtype": format!("{dtype:?}"), "bytes": b,
                "GBps": bw, "fraction_of_copy_GBps": bw / copy_bw, "timing": t.json(),
            }));
        }
    }
    let out = json!({
        "benchmark": "compose", "device": a.device, "model": "ViT-B/32 image tower",
        "machine": super::common::machine(),
        "params": numel, "n_tv": n_tv, "store": a.store, "iters": a.iters, "rows": rows,
        "note": "θ0 and task vectors resident on the device before timing; each figure synchronises the device before and after",
    });
    if let Some(path) = &a.out {
        std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The device's θ (f32) must equal the host composition exactly: same f32 operations, in the
/// same order, without fused multiply-adds.
fn check_against_host(
    dc: &DeviceComposer,
    base: &[Vec<f32>],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> anyhow::Result<()> {
    let host: Vec<Vec<f32>> = compose(dc.manifest(), base, tvs, coefs)?;
    let flat: Vec<f32> = dc.compose_flat(tvs, coefs, DType::F32)?.to_vec1()?;
    for (b, want) in host.iter().enumerate() {
        let got = &flat[dc.layout().block(b)];
        if got != want.as_slice() {
            bail!("device composition differs from the host's in block {b}");
        }
    }
    eprintln!("device composition = host composition (f32, bit for bit)");
    Ok(())
}

/// Median time of `f` over `a.iters` calls after `a.warmup`, the device synchronised around
/// each call (kernels run asynchronously).
fn timed<R>(
    dev: &Device,
    a: &ComposeArgs,
    mut f: impl FnMut() -> anyhow::Result<R>,
) -> anyhow::Result<Timing> {
    let mut err = None;
    let t = time(a.warmup, a.iters, || {
        dev.synchronize().expect("synchronize");
        let r = f().map_err(|e| err = Some(e)).ok();
        dev.synchronize().expect("synchronize");
        r
    });
    match err {
        Some(e) => Err(e),
        None => Ok(t),
    }
}
