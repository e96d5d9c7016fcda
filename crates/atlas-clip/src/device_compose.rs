//! Composition where the towers run: θ0 and the task vectors are uploaded to the device once
//! and every composition θ = θ0 + Σ Λ τ is one pass over all blocks (`kernels/compose.cu`) that
//! reads each τ once and writes θ once, in the serving dtype. Blocks lie end to end in one flat
//! buffer, each starting at a multiple of [`GROUP`] elements, so the kernel's 8-wide loads never
//! straddle two blocks; the named tensors are views into it.
//!
//! [`ComposeOp`] is a candle custom op on the flat θ0: on CUDA it launches the kernel, on the
//! CPU it is the host composition ([`atlas_core::compose`]), so the contract is tested here
//! against plain candle ops.
//!
//! [`ReduceOp`] is the learning step's other half: ⟨∂L/∂θ^(b), τ_i^(b)⟩ per block and part from
//! the flat gradient and the resident task vectors (the `reduce_*` kernels in `compose.cu`; on
//! the CPU, [`atlas_core::reduce_gradient`]).

use crate::{ClipError, Result};
use atlas_core::{Buffer, Coefficients, Manifest, StorageDType, TaskVector};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Elements per kernel work item; every block starts at a multiple of it.
pub const GROUP: usize = 8;

/// Device memory the resident task vectors may take before the least recently used ones not in
/// the current composition are dropped (they are uploaded again when next used).
pub const CACHE_BYTES: usize = 8 << 30;

/// Where each block lies in the flat buffers (zero padding between blocks).
#[derive(Debug, Clone)]
pub struct FlatLayout {
    starts: Vec<usize>,
    lens: Vec<usize>,
    total: usize,
}

impl FlatLayout {
    pub fn new(manifest: &Manifest) -> Self {
        let lens: Vec<usize> = manifest.blocks().iter().map(|b| b.numel()).collect();
        let mut starts = Vec::with_capacity(lens.len());
        let mut total = 0;
        for &n in &lens {
            starts.push(total);
            total += n.next_multiple_of(GROUP);
        }
        FlatLayout {
            starts,
            lens,
            total,
        }
    }
    /// Elements of a flat buffer, padding included.
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn n_blocks(&self) -> usize {
        self.lens.len()
    }
    /// The elements of block `b`.
    pub fn block(&self, b: usize) -> Range<usize> {
        self.starts[b]..self.starts[b] + self.lens[b]
    }
    /// First work item of every block, then the number of work items.
    pub fn block_groups(&self) -> Vec<u32> {
        let mut g: Vec<u32> = self.starts.iter().map(|&s| (s / GROUP) as u32).collect();
        g.push((self.total / GROUP) as u32);
        g
    }
    /// A flat buffer filled block by block by `fill(b, block)`; padding stays `T::default()`.
    pub fn flatten<T: Copy + Default>(&self, fill: impl Fn(usize, &mut [T])) -> Vec<T> {
        let mut out = vec![T::default(); self.total];
        for b in 0..self.n_blocks() {
            fill(b, &mut out[self.block(b)]);
        }
        out
    }
}

/// θ = θ0 + Σ Λ τ over the flat θ0 it is applied to (f32), giving the flat θ at `dtype`.
/// `device_tvs` are the task vectors flat on the device (what the CUDA kernel reads); the CPU
/// fallback reads `tvs`.
pub struct ComposeOp<'a> {
    pub manifest: &'a Manifest,
    pub layout: &'a FlatLayout,
    pub tvs: &'a [Arc<TaskVector>],
    pub device_tvs: &'a [Tensor],
    pub coefs: &'a Coefficients,
    pub dtype: DType,
}

impl CustomOp1 for ComposeOp<'_> {
    fn name(&self) -> &'static str {
        "atlas-compose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let base = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) if b - a == self.layout.total => &v[a..b],
            _ => candle_core::bail!("atlas-compose: θ0 must be a contiguous flat f32 tensor"),
        };
        let blocks: Vec<&[f32]> = (0..self.layout.n_blocks())
            .map(|b| &base[self.layout.block(b)])
            .collect();
        let theta: Vec<Vec<f32>> =
            atlas_core::compose(self.manifest, &blocks, self.tvs, self.coefs)
                .map_err(candle_core::Error::wrap)?;
        let flat = self.layout.flatten(|b, out| out.copy_from_slice(&theta[b]));
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(flat),
            DType::F16 => CpuStorage::F16(flat.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(flat.iter().map(|&x| bf16::from_f32(x)).collect()),
            d => candle_core::bail!("atlas-compose: θ at {d:?}; f32, f16 or bf16 only"),
        };
        Ok((out, Shape::from(self.layout.total)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::compose(self, s, l)
    }
}

/// Work items (groups of [`GROUP`] elements) per tile of the device reduction; a tile lies in
/// one block (as `TILE_GROUPS` in `kernels/compose.cu`).
pub const REDUCE_TILE_GROUPS: usize = 2048;

impl FlatLayout {
    /// First tile of every block, then the number of tiles, for tiles of `REDUCE_TILE_GROUPS`
    /// work items that never straddle two blocks.
    pub fn block_tiles(&self) -> Vec<u32> {
        let groups = self.block_groups();
        let mut out = Vec::with_capacity(groups.len());
        let mut t = 0usize;
        for w in groups.windows(2) {
            out.push(t as u32);
            t += ((w[1] - w[0]) as usize).div_ceil(REDUCE_TILE_GROUPS);
        }
        out.push(t as u32);
        out
    }
}

/// ⟨∂L/∂θ^(b), τ_i^(b)⟩ per task vector, block and part: applied to the flat f32 gradient
/// (the composition's [`FlatLayout`], zero padding), gives the `[n_tv, n_blocks, K]` grid in
/// f64 that [`atlas_core::reduce_gradient`] gives, to be folded by
/// [`Coefficients::fold_gradient`]. `device_tvs` are the task vectors flat on the device (what
/// the CUDA kernel reads); the CPU fallback is `atlas_core::reduce_gradient` over `tvs`.
pub struct ReduceOp<'a> {
    pub manifest: &'a Manifest,
    pub layout: &'a FlatLayout,
    pub tvs: &'a [Arc<TaskVector>],
    pub device_tvs: &'a [Tensor],
    pub coefs: &'a Coefficients,
}

impl ReduceOp<'_> {
    /// Elements of the result.
    pub fn len(&self) -> usize {
        self.tvs.len() * self.layout.n_blocks() * self.coefs.parts()
    }

    /// Whether the result is empty (no task vectors).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CustomOp1 for ReduceOp<'_> {
    fn name(&self) -> &'static str {
        "atlas-reduce"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let grad = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) if b - a == self.layout.total => &v[a..b],
            _ => candle_core::bail!("atlas-reduce: ∂L/∂θ must be a contiguous flat f32 tensor"),
        };
        let blocks: Vec<&[f32]> = (0..self.layout.n_blocks())
            .map(|b| &grad[self.layout.block(b)])
            .collect();
        let full = atlas_core::reduce_gradient(self.manifest, &blocks, self.tvs, self.coefs)
            .map_err(candle_core::Error::wrap)?;
        let n = full.len();
        Ok((CpuStorage::F64(full), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::reduce(self, s, l)
    }
}

/// The composition's coefficient grid `[n_tv, n_blocks, k]` in f32 (the host path rounds each
/// coefficient to f32 alike) and the part key of every block (zero unless per part).
pub fn kernel_coefficients(manifest: &Manifest, coefs: &Coefficients) -> (Vec<f32>, Vec<u64>) {
    let grid = coefs.expanded().iter().map(|&c| c as f32).collect();
    let keys = match coefs.layout {
        atlas_core::Layout::PerPart { seed, .. } => manifest
            .blocks()
            .iter()
            .map(|b| atlas_core::parts::block_key(seed, &b.name))
            .collect(),
        _ => vec![0; manifest.len()],
    };
    (grid, keys)
}

/// A task vector flat at its storage dtype on `device` (all-zero blocks as zeros).
pub fn upload_task_vector(layout: &FlatLayout, tv: &TaskVector, device: &Device) -> Result<Tensor> {
    let n = layout.total();
    let t = match tv.dtype() {
        StorageDType::F32 => Tensor::from_vec(flat_of(layout, tv, |x| x), n, device)?,
        StorageDType::F16 => Tensor::from_vec(flat_of(layout, tv, f16::from_f32), n, device)?,
        StorageDType::BF16 => Tensor::from_vec(flat_of(layout, tv, bf16::from_f32), n, device)?,
    };
    Ok(t)
}

/// `tv` flat, each value converted by `conv` (exact: it is the dtype τ is stored at).
fn flat_of<T: Copy + Default>(layout: &FlatLayout, tv: &TaskVector, conv: fn(f32) -> T) -> Vec<T> {
    layout.flatten(|b, out| {
        let buf: &Buffer = tv.block(b);
        if buf.is_zero() {
            return;
        }
        let mut tmp = vec![0f32; out.len()];
        buf.read_f32(0, &mut tmp);
        for (o, x) in out.iter_mut().zip(tmp) {
            *o = conv(x);
        }
    })
}

/// θ0 and the task vectors resident on one device; composes there.
pub struct DeviceComposer {
    manifest: Arc<Manifest>,
    layout: FlatLayout,
    base: Tensor,
    cache: Mutex<Cache>,
}

/// Uploaded task vectors by content digest and dtype, with the tick of their last use.
#[derive(Default)]
struct Cache {
    tick: u64,
    entries: HashMap<String, (Tensor, u64)>,
}

impl Cache {
    fn bytes(&self) -> usize {
        self.entries
            .values()
            .map(|(t, _)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Drops the least recently used entries not used at the current tick while over budget.
    fn evict(&mut self, budget: usize) {
        while self.bytes() > budget {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, (_, used))| *used < self.tick)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => return,
            };
        }
    }
}

impl DeviceComposer {
    /// Uploads θ0 (per block, manifest order) to `device`.
    pub fn new(manifest: Arc<Manifest>, base: &[Vec<f32>], device: &Device) -> Result<Self> {
        let layout = FlatLayout::new(&manifest);
        if base.len() != layout.n_blocks()
            || (0..base.len()).any(|b| base[b].len() != layout.block(b).len())
        {
            return Err(ClipError::Config(
                "θ0 does not match the manifest's blocks".into(),
            ));
        }
        let flat = layout.flatten(|b, out| out.copy_from_slice(&base[b]));
        let base = Tensor::from_vec(flat, layout.total(), device)?;
        Ok(DeviceComposer {
            manifest,
            layout,
            base,
            cache: Mutex::new(Cache::default()),
        })
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }
    /// θ0, flat f32 on the device.
    pub fn base(&self) -> &Tensor {
        &self.base
    }

    /// The task vectors flat on the device, uploading those not resident yet.
    pub fn resident(&self, tvs: &[Arc<TaskVector>]) -> Result<Vec<Tensor>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.tick += 1;
        let tick = cache.tick;
        let mut out = Vec::with_capacity(tvs.len());
        for tv in tvs {
            tv.check_manifest(&self.manifest)?;
            let key = format!("{}:{:?}", tv.digest(), tv.dtype());
            if let Some((t, used)) = cache.entries.get_mut(&key) {
                *used = tick;
                out.push(t.clone());
                continue;
            }
            let t = upload_task_vector(&self.layout, tv, self.base.device())?;
            cache.entries.insert(key, (t.clone(), tick));
            out.push(t);
        }
        cache.evict(CACHE_BYTES);
        Ok(out)
    }

    /// θ flat at `dtype` on the device.
    pub fn compose_flat(
        &self,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
        dtype: DType,
    ) -> Result<Tensor> {
        if coefs.n_tv != tvs.len() || coefs.n_blocks != self.manifest.len() {
            return Err(ClipError::Config(format!(
                "coefficients are for {} task vectors × {} blocks, the composition has {} × {}",
                coefs.n_tv,
                coefs.n_blocks,
                tvs.len(),
                self.manifest.len()
            )));
        }
        let device_tvs = self.resident(tvs)?;
        let op = ComposeOp {
            manifest: &self.manifest,
            layout: &self.layout,
            tvs,
            device_tvs: &device_tvs,
            coefs,
            dtype,
        };
        Ok(self.base.apply_op1_no_bwd(&op)?)
    }

    /// ∂L/∂Λ over the full `[n_tv, n_blocks, K]` grid (f64, on the host) from the flat f32
    /// gradient on the device, by [`ReduceOp`] over the resident task vectors.
    pub fn reduce_flat(
        &self,
        grad: &Tensor,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
    ) -> Result<Vec<f64>> {
        if coefs.n_tv != tvs.len() || coefs.n_blocks != self.manifest.len() {
            return Err(ClipError::Config(format!(
                "coefficients are for {} task vectors × {} blocks, the reduction has {} × {}",
                coefs.n_tv,
                coefs.n_blocks,
                tvs.len(),
                self.manifest.len()
            )));
        }
        let device_tvs = self.resident(tvs)?;
        let op = ReduceOp {
            manifest: &self.manifest,
            layout: &self.layout,
            tvs,
            device_tvs: &device_tvs,
            coefs,
        };
        Ok(grad.apply_op1_no_bwd(&op)?.to_vec1::<f64>()?)
    }

    /// θ as named tensors (views into one flat buffer) at `dtype` on the device.
    pub fn compose(
        &self,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
        dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        self.split(&self.compose_flat(tvs, coefs, dtype)?)
    }

    /// The named tensors of a flat θ.
    pub fn split(&self, flat: &Tensor) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (b, block) in self.manifest.blocks().iter().enumerate() {
            let mut offset = self.layout.block(b).start;
            for spec in &block.tensors {
                let n = spec.numel();
                let t = flat.narrow(0, offset, n)?.reshape(spec.shape.as_slice())?;
                out.insert(spec.name.clone(), t);
                offset += n;
            }
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launch of `kernels/compose.cu`: the τ are passed as a table of device addresses
    //! (any number of task vectors, each at its own dtype) and the per-block coefficients as
    //! one small table, so a composition is a single launch over every block.

    use super::ComposeOp;
    use crate::cuda_kernels::{grid, view, COMPOSE, THREADS};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, StorageRef};
    use half::{bf16, f16};

    pub fn compose(op: &ComposeOp, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let total = op.layout.total();
        let base = view::<f32>(s, l, op.name())?;
        if base.len() != total {
            candle_core::bail!("atlas-compose: θ0 has {} elements, not {total}", base.len());
        }
        let out = match op.dtype {
            DType::F32 => launch::<f32>(op, s, &base, "compose_f32")?,
            DType::F16 => launch::<f16>(op, s, &base, "compose_f16")?,
            DType::BF16 => launch::<bf16>(op, s, &base, "compose_bf16")?,
            d => candle_core::bail!("atlas-compose: θ at {d:?}; f32, f16 or bf16 only"),
        };
        Ok((out, Shape::from(total)))
    }

    /// A device address and its use record, with the kernel's dtype code (as `compose.cu`).
    fn with_code<R>((ptr, rec): (u64, R), code: i32) -> (u64, R, i32) {
        (ptr, rec, code)
    }

    /// The device address, dtype code and use record of every task vector behind `guards`, each
    /// flat on the device with `total` elements; the records must live until the launch is
    /// queued.
    fn tv_addresses<'a>(
        guards: &'a [(StorageRef<'_>, &Layout)],
        stream: &'a CudaStream,
        total: usize,
        op: &str,
    ) -> Result<(Vec<u64>, Vec<i32>, Vec<impl Sized + 'a>)> {
        let mut ptrs = Vec::with_capacity(guards.len());
        let mut dtypes = Vec::with_capacity(guards.len());
        let mut records = Vec::with_capacity(guards.len());
        for (g, tl) in guards {
            let (Storage::Cuda(cs), true) = (&**g, tl.is_contiguous() && tl.start_offset() == 0)
            else {
                candle_core::bail!("{op}: a task vector is not flat on the device");
            };
            if tl.shape().elem_count() != total {
                candle_core::bail!("{op}: a task vector has the wrong length");
            }
            let (ptr, rec, code) = match &cs.slice {
                CudaStorageSlice::F32(x) => with_code(x.device_ptr(stream), 0),
                CudaStorageSlice::F16(x) => with_code(x.device_ptr(stream), 1),
                CudaStorageSlice::BF16(x) => with_code(x.device_ptr(stream), 2),
                _ => candle_core::bail!("{op}: task vectors are f32, f16 or bf16"),
            };
            ptrs.push(ptr);
            records.push(rec);
            dtypes.push(code);
        }
        Ok((ptrs, dtypes, records))
    }

    pub fn reduce(
        op: &super::ReduceOp,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let total = op.layout.total();
        let grad = view::<f32>(s, l, op.name())?;
        if grad.len() != total {
            candle_core::bail!(
                "atlas-reduce: ∂L/∂θ has {} elements, not {total}",
                grad.len()
            );
        }
        let dev = &s.device;
        let stream = dev.cuda_stream();
        let n_out = op.len();
        let n_blocks = op.layout.n_blocks();
        let k = op.coefs.parts();
        if op.device_tvs.len() != op.tvs.len() {
            candle_core::bail!("atlas-reduce: the task vectors on the device do not match");
        }
        // The read guards and the addresses' use records live until the launches are queued.
        let guards: Vec<_> = op
            .device_tvs
            .iter()
            .map(|t| t.storage_and_layout())
            .collect();
        let (ptrs, dtypes, records) = tv_addresses(&guards, &stream, total, op.name())?;
        let nonzero: Vec<u8> = op
            .tvs
            .iter()
            .flat_map(|tv| (0..n_blocks).map(move |b| u8::from(!tv.block(b).is_zero())))
            .collect();
        let (_, keys) = super::kernel_coefficients(op.manifest, op.coefs);
        let groups = op.layout.block_groups();
        let tiles = op.layout.block_tiles();
        let n_tiles = *tiles.last().expect("n_blocks + 1 entries") as usize;
        let out = dev.alloc_zeros::<f64>(n_out.max(1))?;
        if n_out == 0 || n_tiles == 0 {
            drop(records);
            return Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from(n_out),
            ));
        }
        let ptrs_d = dev.clone_htod(&ptrs)?;
        let dtypes_d = dev.clone_htod(&dtypes)?;
        let nonzero_d = dev.clone_htod(&nonzero)?;
        let keys_d = dev.clone_htod(&keys)?;
        let groups_d = dev.clone_htod(&groups)?;
        let tiles_d = dev.clone_htod(&tiles)?;
        // SAFETY: every element is written by reduce_partial below.
        let partials = unsafe { dev.alloc::<f32>(op.tvs.len() * n_tiles * k)? };
        let func = dev.get_or_load_custom_func("reduce_partial", "atlas_compose", COMPOSE)?;
        let mut b = func.builder();
        b.arg(&grad);
        b.arg(&ptrs_d);
        b.arg(&dtypes_d);
        b.arg(&nonzero_d);
        b.arg(&keys_d);
        b.arg(&groups_d);
        b.arg(&tiles_d);
        candle_core::builder_arg!(
            b,
            n_blocks as i32,
            ptrs.len() as i32,
            k as u32,
            n_tiles as u32
        );
        b.arg(&partials);
        let cfg = LaunchConfig {
            grid_dim: (n_tiles as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; every τ address is a live
        // allocation of `total` elements held by `guards`; one thread block per tile.
        unsafe { b.launch(cfg) }.w()?;
        let func = dev.get_or_load_custom_func("reduce_finish", "atlas_compose", COMPOSE)?;
        let mut b = func.builder();
        b.arg(&partials);
        b.arg(&tiles_d);
        candle_core::builder_arg!(
            b,
            n_blocks as i32,
            ptrs.len() as i32,
            k as u32,
            n_tiles as u32
        );
        b.arg(&out);
        // SAFETY: the argument list matches the kernel's signature (grid-stride over n_out).
        unsafe { b.launch(grid(n_out, 1 << 12)) }.w()?;
        drop(records);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(n_out),
        ))
    }

    fn launch<O: CudaDType + DeviceRepr>(
        op: &ComposeOp,
        s: &CudaStorage,
        base: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
        name: &str,
    ) -> Result<CudaStorage> {
        let dev = &s.device;
        let stream = dev.cuda_stream();
        let total = op.layout.total();
        // The read guards and the addresses' use records live until the launch is queued.
        let guards: Vec<_> = op
            .device_tvs
            .iter()
            .map(|t| t.storage_and_layout())
            .collect();
        let (ptrs, dtypes, records) = tv_addresses(&guards, &stream, total, op.name())?;
        let (grid_f32, keys) = super::kernel_coefficients(op.manifest, op.coefs);
        let groups = op.layout.block_groups();
        let ptrs_d = dev.clone_htod(&ptrs)?;
        let dtypes_d = dev.clone_htod(&dtypes)?;
        let coefs_d = dev.clone_htod(&grid_f32)?;
        let keys_d = dev.clone_htod(&keys)?;
        let groups_d = dev.clone_htod(&groups)?;
        let n_groups = total / super::GROUP;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<O>(total)? };
        let func = dev.get_or_load_custom_func(name, "atlas_compose", COMPOSE)?;
        let mut b = func.builder();
        b.arg(base);
        b.arg(&ptrs_d);
        b.arg(&dtypes_d);
        b.arg(&coefs_d);
        b.arg(&keys_d);
        b.arg(&groups_d);
        candle_core::builder_arg!(
            b,
            op.layout.n_blocks() as i32,
            ptrs.len() as i32,
            op.coefs.parts() as u32,
            n_groups as u32
        );
        b.arg(&out);
        // SAFETY: the argument list matches the kernel's signature; every τ address is a live
        // allocation of `total` elements held by `guards`.
        unsafe { b.launch(grid(n_groups, 1 << 16)) }.w()?;
        drop(records);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_core::manifest::{Block, TensorSpec};
    use atlas_core::task_vector::{Delta, TaskVectorMeta};
    use atlas_core::Layout as CLayout;

    /// Odd block sizes (not multiples of 8) and a block of two tensors.
    fn manifest() -> Arc<Manifest> {
        Arc::new(
            Manifest::new(vec![
                Block::single(TensorSpec::new("w", &[3, 37])),
                Block {
                    name: "qk".into(),
                    tensors: vec![TensorSpec::new("q", &[5]), TensorSpec::new("k", &[4, 4])],
                },
                Block::single(TensorSpec::new("b", &[1])),
            ])
            .unwrap(),
        )
    }

    fn pseudo(seed: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| {
                let r = atlas_core::parts::splitmix64(seed * 1000 + j as u64);
                (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn tv(m: &Manifest, seed: u64, store: StorageDType) -> Arc<TaskVector> {
        let deltas = m.tensor_specs().enumerate().map(|(i, (t, _))| Delta {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data: pseudo(seed * 10 + i as u64, t.numel()),
        });
        let meta = TaskVectorMeta {
            name: format!("tv{seed}"),
            ..Default::default()
        };
        Arc::new(TaskVector::from_deltas(m, meta, store, deltas, &|_| false).unwrap())
    }

    /// θ by plain candle ops: per block, θ0 + Σ c_i τ_i (τ at its dtype, widened to f32).
    fn plain(
        dc: &DeviceComposer,
        tvs: &[Arc<TaskVector>],
        coefs: &Coefficients,
        dtype: DType,
    ) -> Tensor {
        let dev = dc.base().device();
        let device_tvs = dc.resident(tvs).unwrap();
        let blocks: Vec<Tensor> = (0..dc.layout().n_blocks())
            .map(|b| {
                let r = dc.layout().block(b);
                let mut acc = dc.base().narrow(0, r.start, r.len()).unwrap();
                for (i, t) in device_tvs.iter().enumerate() {
                    let tau = t.narrow(0, r.start, r.len()).unwrap();
                    let c = coefs.block(i, b)[0] as f32 as f64;
                    let term = tau.to_dtype(DType::F32).unwrap().affine(c, 0.0).unwrap();
                    acc = (acc + term).unwrap();
                }
                acc
            })
            .collect();
        let _ = dev;
        Tensor::cat(&blocks, 0).unwrap().to_dtype(dtype).unwrap()
    }

    fn unpadded(dc: &DeviceComposer, flat: &Tensor) -> Tensor {
        let parts: Vec<Tensor> = (0..dc.layout().n_blocks())
            .map(|b| {
                let r = dc.layout().block(b);
                flat.narrow(0, r.start, r.len()).unwrap()
            })
            .collect();
        Tensor::cat(&parts, 0).unwrap()
    }

    fn composer(m: &Arc<Manifest>) -> DeviceComposer {
        let base: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(77 + b as u64, bl.numel()))
            .collect();
        DeviceComposer::new(m.clone(), &base, &Device::Cpu).unwrap()
    }

    #[test]
    fn compose_op_matches_plain_candle_ops() {
        let m = manifest();
        let dc = composer(&m);
        for store in [StorageDType::F16, StorageDType::BF16, StorageDType::F32] {
            let tvs = vec![tv(&m, 1, store), tv(&m, 2, store), tv(&m, 3, store)];
            let values = (0..9).map(|x| x as f64 * 0.37 - 1.1).collect();
            let coefs = Coefficients::new(CLayout::PerBlock, 3, m.len(), values).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let got = dc.compose_flat(&tvs, &coefs, dtype).unwrap();
                let got = unpadded(&dc, &got).to_dtype(DType::F32).unwrap();
                let want = plain(&dc, &tvs, &coefs, dtype)
                    .to_dtype(DType::F32)
                    .unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max(0).unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                // f32: the same multiply-then-add sequence, bit for bit. Half precision: the same
                // f32 sum rounded once, so equal too.
                assert_eq!(diff, 0.0, "{store:?} -> {dtype:?}");
            }
        }
    }

    #[test]
    fn named_tensors_match_the_host_composition() {
        let m = manifest();
        let dc = composer(&m);
        let tvs = vec![tv(&m, 4, StorageDType::F16), tv(&m, 5, StorageDType::F32)];
        let coefs = Coefficients::new(
            CLayout::PerPart { k: 3, seed: 11 },
            2,
            m.len(),
            (0..18).map(|x| x as f64 * 0.1 - 0.8).collect(),
        )
        .unwrap();
        let base: Vec<Vec<f32>> = (0..m.len())
            .map(|b| {
                let r = dc.layout().block(b);
                dc.base()
                    .narrow(0, r.start, r.len())
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let host: Vec<Vec<f32>> = atlas_core::compose(&m, &base, &tvs, &coefs).unwrap();
        let named = dc.compose(&tvs, &coefs, DType::F32).unwrap();
        for (spec, loc) in m.tensor_specs() {
            let t = &named[&spec.name];
            assert_eq!(t.dims(), spec.shape.as_slice());
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, host[loc.block][loc.offset..loc.offset + loc.numel]);
        }
    }

    /// The reduction op's CPU path on a flat gradient (with padding) is `reduce_gradient` over
    /// the gradient's blocks, per block and per part, τ at f16 and f32 (and an all-zero τ block).
    #[test]
    fn reduce_op_matches_the_host_reduction() {
        let m = manifest();
        let dc = composer(&m);
        let grads: Vec<Vec<f32>> = m
            .blocks()
            .iter()
            .enumerate()
            .map(|(b, bl)| pseudo(300 + b as u64, bl.numel()))
            .collect();
        // Padding set to garbage first: the op reads only each block's own elements.
        let mut flat = vec![7f32; dc.layout().total()];
        for (b, g) in grads.iter().enumerate() {
            flat[dc.layout().block(b)].copy_from_slice(g);
        }
        let flat = Tensor::from_vec(flat, dc.layout().total(), &Device::Cpu).unwrap();
        let zero_block = {
            let deltas = m.tensor_specs().map(|(t, _)| Delta {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: if t.name == "w" {
                    vec![0.0; t.numel()]
                } else {
                    pseudo(9, t.numel())
                },
            });
            let meta = TaskVectorMeta {
                name: "sparse".into(),
                ..Default::default()
            };
            Arc::new(
                TaskVector::from_deltas(&m, meta, StorageDType::F16, deltas, &|_| false).unwrap(),
            )
        };
        for store in [StorageDType::F16, StorageDType::F32] {
            let tvs = vec![tv(&m, 6, store), tv(&m, 7, store), zero_block.clone()];
            for layout in [CLayout::PerBlock, CLayout::PerPart { k: 3, seed: 2 }] {
                let n = layout.len(tvs.len(), m.len());
                let values = (0..n).map(|x| x as f64 * 0.05 - 0.3).collect();
                let coefs = Coefficients::new(layout, tvs.len(), m.len(), values).unwrap();
                let got = dc.reduce_flat(&flat, &tvs, &coefs).unwrap();
                let want = atlas_core::reduce_gradient(&m, &grads, &tvs, &coefs).unwrap();
                assert_eq!(got.len(), tvs.len() * m.len() * coefs.parts());
                assert_eq!(got, want, "{store:?} {layout:?}");
                assert!(want.iter().any(|&x| x != 0.0));
            }
        }
        let coefs = Coefficients::zeros(CLayout::PerBlock, 2, m.len()).unwrap();
        assert!(dc
            .reduce_flat(&flat, &[tv(&m, 1, StorageDType::F16)], &coefs)
            .is_err());
    }

    #[test]
    fn reduce_tiles_cover_every_block_without_straddling() {
        let m = Manifest::new(vec![
            Block::single(TensorSpec::new("a", &[REDUCE_TILE_GROUPS * GROUP * 2 + 1])),
            Block::single(TensorSpec::new("b", &[3])),
        ])
        .unwrap();
        let l = FlatLayout::new(&m);
        assert_eq!(l.block_tiles(), vec![0, 3, 4]);
    }

    #[test]
    fn rejects_mismatched_coefficients_and_evicts_unused_vectors() {
        let m = manifest();
        let dc = composer(&m);
        let tvs = vec![tv(&m, 1, StorageDType::F16)];
        let coefs = Coefficients::zeros(CLayout::PerBlock, 2, m.len()).unwrap();
        assert!(dc.compose_flat(&tvs, &coefs, DType::F32).is_err());
        let mut cache = Cache {
            tick: 2,
            ..Default::default()
        };
        let t = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        cache.entries.insert("old".into(), (t.clone(), 1));
        cache.entries.insert("now".into(), (t, 2));
        cache.evict(16);
        assert!(cache.entries.contains_key("now") && !cache.entries.contains_key("old"));
    }
}
