//! Rayon pools for work done for one client that other clients must not wait behind: decoding
//! images, building heads, composing models. gemm and the project's kernels run their parallel
//! parts on the pool of the calling thread, and on one shared pool a large upload or a
//! composition queued its tasks ahead of the engine's forward passes (256 large images held
//! other clients for 10 s). The engine keeps the global pool; each kind of background work has
//! a pool of its own with half the cores, so it shares the machine with serving instead of
//! going first, and a long head build never holds up image decoding.

use std::sync::OnceLock;

/// The kinds of background work, one pool each.
#[derive(Clone, Copy)]
pub enum Pool {
    Images,
    Heads,
    Compositions,
}

/// Runs `work` on `pool` (its parallel parts stay there).
pub fn run<T: Send>(pool: Pool, work: impl FnOnce() -> T + Send) -> T {
    static POOLS: [OnceLock<rayon::ThreadPool>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let (slot, name) = match pool {
        Pool::Images => (&POOLS[0], "images"),
        Pool::Heads => (&POOLS[1], "heads"),
        Pool::Compositions => (&POOLS[2], "compose"),
    };
    slot.get_or_init(|| build(name)).install(work)
}

fn build(name: &'static str) -> rayon::ThreadPool {
    let threads = (rayon::current_num_threads() / 2).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("atlas-{name}-{i}"))
        .build()
        .expect("background pool")
}
