//! `atlas-serve bench kernels`: atlas-clip's self-check of its custom ops on one device,
//! printed; any failed check makes the command fail.

use anyhow::bail;
use atlas_clip::kernel_check;

#[derive(clap::Args)]
pub struct KernelsArgs {
    /// cpu (the CPU fallbacks) or cuda (the CUDA kernels).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed calls per timing figure (0 skips the timings).
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

pub fn run(a: KernelsArgs) -> anyhow::Result<()> {
    let dev = crate::device::open(&a.device)?;
    let checks = kernel_check::check_all(&dev)?;
    let failed = checks.iter().filter(|c| !c.pass()).count();
    for c in &checks {
        println!("{c}");
    }
    println!("{} checks, {failed} failed", checks.len());
    if a.iters > 0 {
        println!("{}", kernel_check::Timing::header());
        for t in kernel_check::timings(&dev, a.iters)? {
            println!("{t}");
        }
    }
    if failed > 0 {
        bail!("{failed} custom-op checks failed on {}", a.device);
    }
    Ok(())
}
