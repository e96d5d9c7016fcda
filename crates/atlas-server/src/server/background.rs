//! The rayon pool for work done for one client that other clients must not wait behind: image
//! decoding, composing models and building heads. gemm and the project's kernels run their
//! parallel parts on the pool of the calling thread, and on one shared pool a large upload or a
//! composition queued its tasks ahead of the engine's forward passes (256 large images held
//! other clients for 10 s). The engine keeps the global pool; this one has half the cores, so
//! background work shares the machine with serving instead of going first.

use std::sync::OnceLock;

/// Runs `work` on the background pool (its parallel parts stay there).
pub fn run<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    pool().install(work)
}

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = (rayon::current_num_threads() / 2).max(1);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("atlas-background-{i}"))
            .build()
            .expect("background pool")
    })
}
