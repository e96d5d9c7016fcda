//! The process's allocator: mimalloc, with freed memory kept 10 s before it goes back to the
//! OS.

use libmimalloc_sys::{mi_option_set, mi_option_t};
use std::ffi::c_long;

/// mimalloc keeps freed blocks in its pages for reuse: a forward pass frees and allocates the
/// same activation buffers layer after layer, which glibc faulted in again page by page (a B/32
/// layer at batch 32 with bf16 matmuls: 40–48 ms with glibc, 26 ms with mimalloc, on a Xeon).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the Rust bindings name no constant
/// for it); the test below checks it against the variable mimalloc reads it from.
const PURGE_DELAY: mi_option_t = 15;

/// Milliseconds freed memory stays mapped before mimalloc returns it to the OS.
const KEEP_MS: c_long = 10_000;

/// mimalloc returns freed memory to the OS a delay (1 s) after the first free it has not yet
/// returned, and then returns everything freed by then, however recently. A learning step
/// (about a second on 2 cores) frees and allocates the same large buffers again and again, so
/// each sweep took buffers it was about to reuse and the step faulted them in again, zeroing
/// them (ViT-B/32 at batch 8: about 3,900 page faults per step; about 70 at 10 s, where the
/// sweep comes every 10 s). Time per step: 1,524 → 1,493 ms, four of four alternating rounds faster
/// (`bench learn --batch 8`, AMD EPYC Zen 4, 2 cores); peak memory is unchanged, and memory
/// goes back to the OS 10 s after a job ends instead of 1 s. `MIMALLOC_PURGE_DELAY` still
/// decides where the user sets it.
pub fn keep_freed_memory_longer() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is safe at any time (mimalloc reads it at each purge).
        unsafe { mi_option_set(PURGE_DELAY, KEEP_MS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libmimalloc_sys::mi_option_get;
    use std::process::Command;

    fn purge_delay() -> c_long {
        // SAFETY: reading an option has no preconditions.
        unsafe { mi_option_get(PURGE_DELAY) }
    }

    const CHILD: &str = "ATLAS_TEST_PURGE_DELAY";
    const NAME: &str =
        "alloc::tests::the_option_is_the_purge_delay_mimalloc_reads_from_its_variable";

    /// Run again in a child process with `MIMALLOC_PURGE_DELAY` set: mimalloc reads its
    /// variables when the process starts, so the child's option 15 must hold that value, and
    /// keeping memory longer must leave it as the user set it.
    #[test]
    fn the_option_is_the_purge_delay_mimalloc_reads_from_its_variable() {
        if let Ok(v) = std::env::var(CHILD) {
            assert_eq!(purge_delay(), v.parse::<c_long>().unwrap());
            keep_freed_memory_longer();
            assert_eq!(purge_delay(), v.parse::<c_long>().unwrap());
            return;
        }
        for value in ["1234", "-1"] {
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
                .env("MIMALLOC_PURGE_DELAY", value)
                .env(CHILD, value)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "child with MIMALLOC_PURGE_DELAY={value}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn keeping_memory_longer_sets_the_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            keep_freed_memory_longer();
            assert_eq!(purge_delay(), KEEP_MS);
        }
    }
}
