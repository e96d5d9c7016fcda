//! `atlas-serve bench compose`: the CPU composition θ = θ0 + Σ_i Λ_i τ_i of the ViT-B/32 image
//! tower (random weights: timings do not depend on values) against the physical limit, a plain
//! memory copy of the same number of bytes, and against the naive alternative of one full pass
//! over θ per task vector. `--device cuda` runs [`super::compose_device`].

use super::common::{
    gbps, machine, random_blocks, random_coefficients, random_task_vector, time, Timing,
};
use anyhow::{bail, Context};
use atlas_clip::{vision_manifest, QkvBlocks, VisionConfig};
use atlas_core::{compose, compose_into, Coefficients, Layout, StorageDType, TaskVector};
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ComposeArgs {
    /// Number of task vectors.
    #[arg(long, default_value_t = 8)]
    pub(crate) n_tv: usize,
    /// Storage dtype of the task vectors: f16, bf16 or f32 (θ0 and θ are always f32).
    #[arg(long, default_value = "f16")]
    pub(crate) store: StorageDType,
    /// Rayon threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed iterations per figure (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) iters: usize,
    /// Untimed warm-up iterations before each figure.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Parts per block for the aTLAS×K run (0 skips it).
    #[arg(long, default_value_t = 4)]
    pub(crate) parts: usize,
    /// Skip the naive one-pass-per-task-vector figure.
    #[arg(long)]
    no_naive: bool,
    /// cpu (the host composition), cuda (the device-resident kernel next to a device copy) or
    /// cpu-op (the device path through the custom op's CPU fallback: checks it without a GPU).
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

/// Chunk size (elements) of the multi-threaded copy: 1 MiB of f32.
const COPY_CHUNK: usize = 1 << 18;

/// The naive alternative: θ = θ0, then one full pass over θ per task vector (θ += c_i τ_i),
/// converting τ_i to f32 a chunk at a time inside each pass. Parallel over chunks like the
/// fused path; it only differs in re-reading and re-writing θ once per task vector.
fn compose_naive(
    base: &[Vec<f32>],
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
) -> Vec<Vec<f32>> {
    const CHUNK: usize = atlas_core::compose::CHUNK;
    let mut out: Vec<Vec<f32>> = base.par_iter().map(|b| b.clone()).collect();
    for (i, tv) in tvs.iter().enumerate() {
        let items: Vec<(usize, usize, &mut [f32])> = out
            .iter_mut()
            .enumerate()
            .flat_map(|(b, v)| {
                v.chunks_mut(CHUNK)
                    .enumerate()
                    .map(move |(c, s)| (b, c * CHUNK, s))
            })
            .collect();
        items.into_par_iter().for_each(|(b, start, dst)| {
            let c = coefs.block(i, b)[0] as f32;
            let mut tau = [0f32; CHUNK];
            let tau = &mut tau[..dst.len()];
            tv.block(b).read_f32(start, tau);
            for (d, t) in dst.iter_mut().zip(tau.iter()) {
                *d += c * t;
            }
        });
    }
    out
}

pub fn run(a: ComposeArgs) -> anyhow::Result<()> {
    if a.n_tv == 0 {
        bail!("--n-tv must be at least 1");
    }
    if a.device != "cpu" {
        return super::compose_device::run(&a);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads.unwrap_or(cores);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("building the rayon pool")?;
    let manifest = vision_manifest(&VisionConfig::vit_b32(), 512, QkvBlocks::Separate);
    let numel = manifest.numel();
    let n_blocks = manifest.len();
    let n_tv = a.n_tv;
    let es = a.store.size_in_bytes();
    // Fused composition: read θ0 (f32) and every τ once at its storage size, write θ (f32).
    let bytes_read = numel * 4 + n_tv * numel * es;
    let bytes_written = numel * 4;
    let bytes = bytes_read + bytes_written;
    // Naive: θ = θ0 (read + write f32), then per task vector read θ, read τ, write θ.
    let naive_bytes = 2 * numel * 4 + n_tv * numel * (4 + es + 4);
    eprintln!(
        "ViT-B/32 image tower: {n_blocks} blocks, {numel} params; {n_tv} task vectors at {:?}; {threads} threads ({cores} cores)",
        a.store
    );

    pool.install(|| -> anyhow::Result<()> {
        // 1. Memory copy moving the same number of bytes (read + write = `bytes`).
        let copy_len = bytes / 2 / 4;
        let src = vec![1.0f32; copy_len];
        let mut dst = vec![0.0f32; copy_len];
        dst.par_chunks_mut(COPY_CHUNK).for_each(|c| c.fill(2.0));
        let copy_mt = time(a.warmup, a.iters, || {
            dst.par_chunks_mut(COPY_CHUNK)
                .zip(src.par_chunks(COPY_CHUNK))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        let copy_st = time(a.warmup, a.iters, || dst.copy_from_slice(&src));
        anyhow::ensure!(dst[copy_len - 1] == 1.0, "copy did not copy");
        drop((src, dst));
        let copy_bytes = 2 * copy_len * 4;

        // 2. Random θ0 and task vectors.
        eprintln!("generating random weights ...");
        let t = Instant::now();
        let base = random_blocks(&manifest, 1, 0.02);
        let tvs: Vec<Arc<TaskVector>> = (0..n_tv)
            .map(|i| random_task_vector(&manifest, i, a.store).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let stored: usize = tvs.iter().map(|t| t.nbytes()).sum();
        anyhow::ensure!(
            stored == n_tv * numel * es,
            "task vectors hold {stored} bytes, expected {}",
            n_tv * numel * es
        );
        eprintln!("  {:.1} s", t.elapsed().as_secs_f64());
        let per_block = random_coefficients(Layout::PerBlock, n_tv, n_blocks)?;

        // 3. What allocating and first touching θ costs (compose allocates its output).
        let alloc_touch = time(a.warmup, a.iters, || {
            let mut out: Vec<Vec<f32>> = base.iter().map(|b| vec![0.0f32; b.len()]).collect();
            out.par_iter_mut()
                .flat_map(|v| v.par_chunks_mut(atlas_core::compose::CHUNK))
                .for_each(|c| c.fill(1.0));
            out
        });

        // 4. The fused composition, per block and per part. The output is dropped untimed.
        let fused = time(a.warmup, a.iters, || {
            compose::<f32, _>(&manifest, &base, &tvs, &per_block).expect("compose")
        });
        // The same composition into buffers allocated (and faulted in) once: compose_into.
        let want: Vec<Vec<f32>> = compose(&manifest, &base, &tvs, &per_block)?;
        let mut reused: Vec<Vec<f32>> = base.iter().map(|b| vec![0.0f32; b.len()]).collect();
        compose_into(&manifest, &base, &tvs, &per_block, &mut reused)?;
        anyhow::ensure!(reused == want, "compose_into differs from compose");
        drop(want);
        let fused_reused = time(a.warmup, a.iters, || {
            compose_into(&manifest, &base, &tvs, &per_block, &mut reused).expect("compose_into")
        });
        drop(reused);
        let per_part = if a.parts > 0 {
            let coefs = random_coefficients(
                Layout::PerPart {
                    k: a.parts,
                    seed: 0,
                },
                n_tv,
                n_blocks,
            )?;
            Some(time(a.warmup, a.iters, || {
                compose::<f32, _>(&manifest, &base, &tvs, &coefs).expect("compose")
            }))
        } else {
            None
        };

        // 5. The naive loop, checked against the fused result.
        let naive = if a.no_naive {
            None
        } else {
            let want: Vec<Vec<f32>> = compose(&manifest, &base, &tvs, &per_block)?;
            let got = compose_naive(&base, &tvs, &per_block);
            let worst = want
                .iter()
                .flatten()
                .zip(got.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            anyhow::ensure!(worst < 1e-5, "naive and fused differ by {worst}");
            drop((want, got));
            Some(time(a.warmup, a.iters, || {
                compose_naive(&base, &tvs, &per_block)
            }))
        };

        // Report.
        let mb = |b: usize| b as f64 / 1e6;
        println!(
            "compose: ViT-B/32 image tower, {n_blocks} blocks, {:.1}M params, {n_tv} task vectors stored at {:?}, {threads} threads, median of {} iters",
            numel as f64 / 1e6,
            a.store,
            a.iters
        );
        println!(
            "bytes per composition: read {:.0} MB (θ0 f32 + τ), written {:.0} MB (θ f32), total {:.0} MB",
            mb(bytes_read),
            mb(bytes_written),
            mb(bytes)
        );
        println!("{:<46} {:>10} {:>10} {:>12}", "figure", "ms", "GB/s", "vs copy (MT)");
        let row = |name: &str, t: &Timing, b: usize| {
            println!(
                "{:<46} {:>10.1} {:>10.2} {:>12.2}",
                name,
                t.median,
                gbps(b, t.median),
                t.median / copy_mt.median
            );
        };
        row(&format!("copy, {threads} threads (rayon chunks)"), &copy_mt, copy_bytes);
        row("copy, 1 thread (copy_from_slice)", &copy_st, copy_bytes);
        row("alloc + first touch of θ (f32)", &alloc_touch, bytes_written);
        row("compose fused, per block (incl. alloc)", &fused, bytes);
        row("compose_into, per block, reused output", &fused_reused, bytes);
        if let Some(t) = &per_part {
            row(&format!("compose fused, per part K={} (incl. alloc)", a.parts), t, bytes);
        }
        if let Some(t) = &naive {
            println!(
                "{:<46} {:>10.1} {:>10.2} {:>12.2}",
                "compose naive, one pass per τ (incl. alloc)",
                t.median,
                gbps(bytes, t.median),
                t.median / copy_mt.median
            );
            println!(
                "naive / fused time: {:.2}x (the naive loop actually moves {:.0} MB: {:.2} GB/s)",
                t.median / fused.median,
                mb(naive_bytes),
                gbps(naive_bytes, t.median)
            );
        }
        println!(
            "GB/s of a compose figure = bytes per composition / time; \"incl. alloc\" figures call atlas_core::compose, which returns fresh Vecs (allocation and first touch of θ are part of the real cost; dropping is not timed)."
        );
        println!(
            "compose_into writes into buffers allocated once (allocated and faulted in before timing)."
        );

        let out = json!({
            "benchmark": "compose",
            "machine": machine(),
            "model": "ViT-B/32 image tower (HF naming, separate q/k/v)",
            "blocks": n_blocks,
            "params": numel,
            "n_tv": n_tv,
            "store": a.store,
            "threads": threads,
            "cores": cores,
            "iters": a.iters,
            "warmup": a.warmup,
            "bytes_read": bytes_read,
            "bytes_written": bytes_written,
            "bytes_total": bytes,
            "copy_mt": { "bytes": copy_bytes, "GBps": gbps(copy_bytes, copy_mt.median), "timing": copy_mt.json() },
            "copy_st": { "bytes": copy_bytes, "GBps": gbps(copy_bytes, copy_st.median), "timing": copy_st.json() },
            "alloc_touch_output": { "bytes": bytes_written, "timing": alloc_touch.json() },
            "compose_per_block": {
                "GBps": gbps(bytes, fused.median),
                "ratio_time_vs_copy_mt": fused.median / copy_mt.median,
                "timing": fused.json(),
            },
            "compose_per_block_reused_output": {
                "note": "atlas_core::compose_into into buffers allocated and faulted in before timing",
                "GBps": gbps(bytes, fused_reused.median),
                "ratio_time_vs_copy_mt": fused_reused.median / copy_mt.median,
                "timing": fused_reused.json(),
            },
            "compose_per_part": per_part.as_ref().map(|t| json!({
                "k": a.parts,
                "GBps": gbps(bytes, t.median),
                "ratio_time_vs_copy_mt": t.median / copy_mt.median,
                "timing": t.json(),
            })),
            "compose_naive": naive.as_ref().map(|t| json!({
                "bytes_moved": naive_bytes,
                "GBps_actual": gbps(naive_bytes, t.median),
                "ratio_time_vs_fused": t.median / fused.median,
                "timing": t.json(),
            })),
            "note": "compose_per_block, compose_per_part and compose_naive include allocating the output (atlas_core::compose returns fresh Vecs); outputs are dropped outside the timed region; compose_per_block_reused_output writes into buffers allocated once (atlas_core::compose_into)",
        });
        if let Some(path) = &a.out {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(path, serde_json::to_string_pretty(&out)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    })
}
