//! The PTX that build.rs compiled from `kernels/*.cu`, and what every launch needs: a grid for
//! a count of work items and the contiguous device data of a tensor's storage. Module names
//! given to `CudaDevice::get_or_load_custom_func` are the PTX file stems prefixed `atlas_`.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

/// `kernels/attention.cu`: fused inference attention over the stacked q/k/v projection.
pub const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// `kernels/compose.cu`: the fused composition θ0 + Σ Λ τ.
pub const COMPOSE: &str = include_str!(concat!(env!("OUT_DIR"), "/compose.ptx"));
/// `kernels/fused.cu`: LayerNorm, softmax and the linear-layer epilogues.
pub const FUSED: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// Threads per block of every launch here.
pub const THREADS: u32 = 256;

/// A grid of `THREADS`-wide blocks covering `items` threads; grid-stride kernels cap it so a
/// huge count does not launch millions of blocks.
pub fn grid(items: usize, cap: u32) -> LaunchConfig {
    let blocks = items.div_ceil(THREADS as usize).clamp(1, cap as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous elements of `s` under `l`, or an error naming the op.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}
