//! bf16 matmuls on the CPU for inference: y = x Wᵀ with x and y in f32, W rounded to bf16 and
//! packed once per model, products of bf16 pairs accumulated in f32 (what PyTorch's bf16
//! autocast does). Two kernels over one packed layout, checked at run time against the CPU:
//! AMX tiles (`tdpbf16ps`, Sapphire Rapids and later Xeons; the default where present) and
//! AVX512-BF16 (`vdpbf16ps`, also Zen 4; when asked for, see [`chosen`]). Without a kernel the
//! f32 path runs (`Linear` does not pack).
//!
//! No crate offered this with pre-packed weights: candle 0.11.1 widens bf16 matmuls to f32 on
//! every call, the gemm crate has no bf16 kernel, and the bf16 GEMMs on crates.io are young or
//! part of whole runtimes (tract). The kernels are short: all the blocking is here.
//!
//! Layout: W ([n, k]) in tiles of 16 output columns; tile t holds, for each pair of inputs
//! kp, the 16 columns' (W[16t+j][2kp], W[16t+j][2kp+1]): 64 bytes per kp. That is the "VNNI"
//! layout both instructions read: one AMX B tile (16 kp × 64 bytes) or one zmm per kp. k and n
//! are padded with zeros to multiples of 32; x is rounded to bf16 into a buffer padded the same.

use super::fast_math::with_scratch;
use super::fused::activate_in_place;
use crate::config::Activation;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows and columns of one unit of work: 2×2 tiles of 16 (AMX) or 4×2 blocks of 8×16 (AVX-512).
const BLOCK: usize = 32;
/// Bytes of bf16 x rows a thread sweeps across all n-blocks before moving on: they stay in L2
/// while W streams through once per group, so W is read from memory (or L3) m / group times.
const X_GROUP_BYTES: usize = 1 << 20;

/// M-blocks per group from which each unit loads part of the next n-block (`Ahead`). With
/// fewer, each would load a large share per k-step and the prefetches queue behind each other
/// (B/32 at batch 1: two m-blocks, 16 lines per step, slower than none).
const AHEAD_FROM: usize = 4;

/// The instructions a packed matmul runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512_bf16",
        }
    }
}

/// The kernels this CPU (and OS) can run, best first.
pub fn available() -> Vec<Kernel> {
    let mut out = Vec::new();
    if amx_usable() {
        out.push(Kernel::Amx);
    }
    if avx512_bf16_usable() {
        out.push(Kernel::Avx512Bf16);
    }
    out
}

/// The kernel bf16 matmuls use: AMX where the CPU has it, else AVX512-BF16 on AMD's CPUs,
/// unless `ATLAS_CPU_BF16` names another (`amx`, `avx512_bf16`) or turns them off (`off`: the
/// f32 path). Read once per process. Whether `vdpbf16ps` beats the f32 path depends on the
/// core: on a Zen 4 it does twice the f32 FMA's multiply-adds per cycle (230 against 112
/// GFLOP/s on one core) and ran B/32 twice as fast from batch 8 (46.8 against 23.5 images/s
/// at 32); on a Xeon it does as many as the two FMA ports and ran slower from batch 8 (21.5
/// against 30.8), so there it runs only when asked for.
pub fn chosen() -> Option<Kernel> {
    static CHOSEN: OnceLock<Option<Kernel>> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        choose(
            std::env::var("ATLAS_CPU_BF16").ok().as_deref(),
            &available(),
            amd(),
        )
    })
}

fn choose(wanted: Option<&str>, available: &[Kernel], amd: bool) -> Option<Kernel> {
    let default = |k: Kernel| k == Kernel::Amx || (amd && k == Kernel::Avx512Bf16);
    match wanted.map(str::trim) {
        Some("off" | "0" | "f32" | "no") => None,
        Some(name) if !name.is_empty() => available.iter().copied().find(|k| k.name() == name),
        _ => available.iter().copied().find(|&k| default(k)),
    }
}

/// Whether the CPU is AMD's (Hygon's are Zen cores too), from CPUID's vendor string.
#[cfg(target_arch = "x86_64")]
fn amd() -> bool {
    let id = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
}

#[cfg(not(target_arch = "x86_64"))]
fn amd() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16_usable() -> bool {
    // Every CPU with AVX512-BF16 has AVX512-BW, which packing uses to interleave pairs.
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16_usable() -> bool {
    false
}

/// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission to use tile data (asked once: the
/// kernel refuses tile instructions until a process requests it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let (tile, bf16) = (edx & (1 << 24) != 0, edx & (1 << 22) != 0);
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permissions.
        tile && bf16
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    })
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_usable() -> bool {
    false
}

/// W ([n, k]) rounded to bf16 in the kernels' layout.
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    kernel: Kernel,
    /// n and k rounded up to multiples of `BLOCK`.
    n_pad: usize,
    k_pad: usize,
    tiles: Lines,
}

impl PackedWeight {
    /// Packs Wᵀ given row-major as [k, n] (how `Linear` keeps its weights on the CPU) for
    /// `kernel`, which this CPU must have (`available`): the kernels run its instructions.
    pub fn from_transposed(wt: &[f32], k: usize, n: usize, kernel: Kernel) -> Self {
        assert_eq!(wt.len(), k * n, "Wᵀ is not [k, n]");
        Self::pack(k, n, kernel, |t, cols, tile| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a CPU with a kernel has the instructions (`avx512_bf16_usable`); the
            // tile is t's of a [k, n] matrix.
            unsafe {
                avx512::tile_from_transposed(tile, wt, (k, n), (t, cols))
            }
        })
    }

    /// Packs W given row-major as [n, k] (a learned weight as candle holds it), as
    /// [`PackedWeight::from_transposed`] packs its transpose.
    pub fn from_rows(w: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(w.len(), n * k, "W is not [n, k]");
        Self::pack(k, n, kernel, |t, cols, tile| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in from_transposed; the tile is t's of an [n, k] matrix.
            unsafe {
                avx512::tile_from_rows(tile, w, (n, k), (t, cols))
            }
        })
    }

    /// Packs a [k, n] matrix: `fill(t, cols, tile)` writes tile t (its first `cols` columns
    /// are inside the matrix) into zeros, k_pad·16 values: kp-major, then column j, then the
    /// pair (value 32·kp + 2·j + e is row 2·kp + e).
    fn pack(
        k: usize,
        n: usize,
        kernel: Kernel,
        fill: impl Fn(usize, usize, &mut [bf16]) + Sync,
    ) -> Self {
        assert!(
            available().contains(&kernel),
            "this CPU cannot run {kernel:?}"
        );
        let (n_pad, k_pad) = (n.next_multiple_of(BLOCK), k.next_multiple_of(BLOCK));
        let mut tiles = Lines::zeros(n_pad * k_pad);
        tiles
            .as_mut_slice()
            .par_chunks_mut(k_pad * 16)
            .enumerate()
            .filter(|(t, _)| 16 * t < n)
            .for_each(|(t, tile)| fill(t, 16.min(n - 16 * t), tile));
        PackedWeight {
            n,
            k,
            kernel,
            n_pad,
            k_pad,
            tiles,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }
    pub fn in_dim(&self) -> usize {
        self.k
    }
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// y = act(x Wᵀ + bias) + residual for x row-major [m, k]; y is [m, n]. The epilogue runs
    /// on each 32×32 block while it is in cache, so y is written once.
    pub fn matmul(&self, x: &[f32], m: usize, epi: &Epilogue) -> Vec<f32> {
        self.matmul_rounded(&self.round(x, m), epi)
    }

    /// x ([m, k], row-major) rounded to bf16 in this weight's input layout.
    pub fn round(&self, x: &[f32], m: usize) -> Rounded {
        self.round_with(x, m, None)
    }

    /// [`PackedWeight::round`] of f(row) for each row of x: a LayerNorm whose output only
    /// feeds this layer writes bf16 once instead of f32 and then bf16.
    pub fn round_with(&self, x: &[f32], m: usize, f: Option<&RowFn<'_>>) -> Rounded {
        assert_eq!(x.len(), m * self.k, "x is not [m, k]");
        Rounded {
            lines: self.round_rows(Rows::Slice(x, f), m.next_multiple_of(BLOCK)),
            m,
            k: self.k,
        }
    }

    /// [`PackedWeight::round`] of m rows that `row(i, buf)` writes into buf (k values): an
    /// input gathered from elsewhere (the patches of images) is rounded without an f32 copy.
    pub fn round_from(&self, m: usize, row: &RowSource<'_>) -> Rounded {
        Rounded {
            lines: self.round_rows(Rows::From(row, m), m.next_multiple_of(BLOCK)),
            m,
            k: self.k,
        }
    }

    /// [`PackedWeight::matmul`] on x already rounded for this weight.
    pub fn matmul_rounded(&self, a: &Rounded, epi: &Epilogue) -> Vec<f32> {
        let m = a.m;
        assert!(
            epi.bias.is_none_or(|b| b.len() == self.n),
            "bias is not [n]"
        );
        assert!(
            epi.residual.is_none_or(|r| r.len() == m * self.n),
            "residual is not [m, n]"
        );
        let mut y = Vec::with_capacity(m * self.n);
        let out = Shared(y.as_mut_ptr());
        self.units(a, |block, (row, col)| {
            let at = self.place(row, col, m);
            // SAFETY: both kernels need AVX-512F, so a CPU that runs one has it; the unit owns
            // this block of y.
            unsafe { with_avx512(|| epilogue(block, &at, epi, Some(&out))) }
        });
        // SAFETY: the units covered every row < m and column < n of y.
        unsafe { y.set_len(m * self.n) };
        y
    }

    /// act(x Wᵀ + bias) rounded to bf16 in `next`'s input layout: a layer whose output only
    /// feeds `next` (fc1 before fc2) writes half the bytes and `next` skips its rounding pass.
    pub fn matmul_for(&self, a: &Rounded, epi: &Epilogue, next: &PackedWeight) -> Rounded {
        assert_eq!(
            next.k, self.n,
            "next takes {} inputs, this gives {}",
            next.k, self.n
        );
        assert!(epi.residual.is_none(), "a rounded output takes no residual");
        let m = a.m;
        let mut lines = Lines::zeros(m.next_multiple_of(BLOCK) * next.x_stride());
        let out = Shared(lines.as_mut_slice().as_mut_ptr());
        self.units(a, |block, (row, col)| {
            let at = self.place(row, col, m);
            // SAFETY: as in matmul_rounded; nothing is stored to y.
            unsafe { with_avx512(|| epilogue(block, &at, epi, None)) };
            for (r, v) in block.chunks(BLOCK).take(at.rows).enumerate() {
                let dst = next.offset(row + r, col);
                // SAFETY: the unit owns these at.cols values of `next`'s row row + r; bf16 is
                // written by round_into through a slice of exactly them.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.at(dst), at.cols) };
                round_into(dst, &v[..at.cols]);
            }
        });
        Rounded {
            lines,
            m,
            k: next.k,
        }
    }

    /// Runs the kernel over every 32×32 block of x Wᵀ, handing each (in cache) to `each` with
    /// its first row and column.
    fn units(&self, a: &Rounded, each: impl Fn(&mut [f32], (usize, usize)) + Sync) {
        assert_eq!(a.k, self.k, "x was rounded for another layer");
        let m_pad = a.m.next_multiple_of(BLOCK);
        let (mb, nb) = (m_pad / BLOCK, self.n_pad / BLOCK);
        let stride = self.x_stride();
        let group = (X_GROUP_BYTES / (BLOCK * stride * 2)).max(1);
        (0..mb * nb).into_par_iter().for_each(|u| {
            let (i, j) = unit(u, mb, nb, group);
            let ahead = self.ahead(i, j, (mb, nb), group);
            let used = a.m - i * BLOCK;
            let a = &a.lines.as_slice()[i * BLOCK * stride..(i + 1) * BLOCK * stride];
            let b = &self.tiles.as_slice()[j * 2 * 16 * self.k_pad..(j + 1) * 2 * 16 * self.k_pad];
            // Not zeroed: the kernel writes every value (a 4 KB memset per block was measurable
            // beside a 32×32×768 product).
            let mut block = std::mem::MaybeUninit::<Block>::uninit();
            let c = block.as_mut_ptr().cast::<f32>();
            // SAFETY: the kernel was found usable on this CPU; a holds 32 rows of k_pad, b two
            // tiles, c 32 rows of 32; both kernels store all 32 × 32 values of c (AVX-512:
            // zeros in the 8-row blocks past x's rows), so it is initialised after the call.
            let block = unsafe {
                self.block((a, used), b, c, BLOCK, ahead);
                block.assume_init_mut()
            };
            each(&mut block.0, (i * BLOCK, j * BLOCK));
        });
    }

    /// The share of W that unit (i, j) loads into cache for the units after it: the units of
    /// one n-block follow each other (one per m-block of its group), so each loads its part of
    /// the next n-block's tiles and memory streams W while the block in cache is multiplied.
    fn ahead(&self, i: usize, j: usize, (mb, nb): (usize, usize), group: usize) -> Ahead {
        let (g, p) = (i / group, i % group);
        let in_group = group.min(mb - g * group);
        if in_group < AHEAD_FROM {
            return Ahead::NONE;
        }
        let next = if j + 1 < nb {
            j + 1
        } else if (g + 1) * group < mb {
            0
        } else {
            return Ahead::NONE;
        };
        // An n-block is 32 columns × k_pad bf16: k_pad lines of 64 bytes.
        let block_lines = self.k_pad;
        let lines = block_lines.div_ceil(in_group);
        let first = (p * lines).min(block_lines);
        let lines = lines.min(block_lines - first);
        let steps = self.k_pad / 32;
        // SAFETY (of the pointer): block `next` exists and `first` is a line inside it.
        let at = unsafe {
            self.tiles
                .as_slice()
                .as_ptr()
                .add(next * 32 * self.k_pad + first * 32)
        };
        Ahead {
            at: at.cast(),
            per_step: lines.div_ceil(steps),
        }
    }

    /// Where the block at (row, col) goes in y ([m, n]).
    fn place(&self, row: usize, col: usize, m: usize) -> Place {
        Place {
            row,
            col,
            rows: BLOCK.min(m.saturating_sub(row)),
            cols: BLOCK.min(self.n - col.min(self.n)),
            n: self.n,
        }
    }

    /// Index of x's element (row, col) in this weight's input layout; col is a multiple of 32.
    fn offset(&self, row: usize, col: usize) -> usize {
        match self.kernel {
            Kernel::Amx => ((row / 16) * (self.k_pad / 32) + col / 32) * 512 + (row % 16) * 32,
            Kernel::Avx512Bf16 => row * self.x_stride() + col,
        }
    }

    /// One 32×32 block of x Wᵀ from 32 rows of x and two tiles of W, into c (rows c_stride
    /// apart).
    /// Rows from `used` on are x's padding (the AVX-512 kernel skips them; AMX's tile product
    /// costs the same at any number of rows).
    unsafe fn block(
        &self,
        (a, used): (&[bf16], usize),
        b: &[bf16],
        c: *mut f32,
        c_stride: usize,
        ahead: Ahead,
    ) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => amx::block(a, b, self.k_pad, c, c_stride, ahead),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                avx512::block(a, self.x_stride(), b, self.k_pad, c, c_stride, used)
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no bf16 kernel off x86-64"),
        }
    }

    /// Elements of rounded x per row. AMX reads x in tiles, 16 rows of 32 values contiguous (a
    /// row-major x at k = 3072 put a tile's 16 rows in two L1 sets, and contiguous tiles load
    /// about 20 % faster from L2). AVX-512 reads rows, one cache line longer than k_pad for
    /// the same reason.
    fn x_stride(&self) -> usize {
        match self.kernel {
            Kernel::Amx => self.k_pad,
            Kernel::Avx512Bf16 => self.k_pad + 32,
        }
    }

    /// The rows of `rows` rounded to bf16 in the kernel's layout, padded with zero rows and
    /// columns; 16 rows per task.
    fn round_rows(&self, rows: Rows<'_>, m_pad: usize) -> Lines {
        let stride = self.x_stride();
        let mut a = Lines::zeros(m_pad * stride);
        a.as_mut_slice()
            .par_chunks_mut(16 * stride)
            .enumerate()
            .for_each(|(t, dst)| {
                with_scratch(self.k, |row_buf| {
                    for r in 0..16 {
                        let Some(src) = rows.get(16 * t + r, self.k, row_buf) else {
                            break;
                        };
                        self.round_row(src, r, dst);
                    }
                })
            });
        a
    }

    /// Row r (of 16) of a group of rows in the kernel's layout: AMX tiles hold, for each 32
    /// columns, 16 × 32 values; AVX-512 reads plain rows.
    fn round_row(&self, src: &[f32], r: usize, dst: &mut [bf16]) {
        match self.kernel {
            Kernel::Amx => {
                for (b, s) in src.chunks(32).enumerate() {
                    round_into(&mut dst[b * 512 + r * 32..][..32], s);
                }
            }
            Kernel::Avx512Bf16 => round_into(&mut dst[r * self.x_stride()..], src),
        }
    }
}

/// bf16 values in 64-byte lines: every row of x and every tile of W starts a cache line, so no
/// tile or vector load splits one (a plain Vec from a large allocation is 16 bytes past a page).
struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([bf16; 32]);

impl Lines {
    /// Zeros, at least `len` of them (callers ask for multiples of 32).
    fn zeros(len: usize) -> Self {
        Lines(vec![Line([bf16::ZERO; 32]); len.div_ceil(32)])
    }
    fn as_slice(&self) -> &[bf16] {
        // SAFETY: a Line is 32 bf16 with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 32) }
    }
    fn as_mut_slice(&mut self) -> &mut [bf16] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 32) }
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bf16 values", self.0.len() * 32)
    }
}

/// Where a block goes in y ([m, n]): its first row and column, and how many of its rows and
/// columns are inside y.
struct Place {
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
    n: usize,
}

/// block ← act(block + bias) + residual, then stored to y[place] when `out` is given. Inlined
/// into a caller compiled for the CPU's vector width: the activation's exp and division are
/// most of the epilogue.
#[inline(always)]
fn epilogue(block: &mut [f32], at: &Place, epi: &Epilogue, out: Option<&Shared<f32>>) {
    let (w, block) = (at.cols, &mut block[..at.rows * BLOCK]);
    if let Some(b) = epi.bias {
        for v in block.chunks_mut(BLOCK) {
            v.iter_mut()
                .zip(&b[at.col..at.col + w])
                .for_each(|(v, b)| *v += b);
        }
    }
    match epi.act {
        // SAFETY: the epilogue runs where AVX-512F is (see `with_avx512`).
        #[cfg(target_arch = "x86_64")]
        Some(Activation::QuickGelu) => unsafe { super::fast_math::quick_gelu512(block) },
        act => activate_in_place(block, act),
    }
    for (r, v) in block.chunks_mut(BLOCK).enumerate() {
        let v = &mut v[..w];
        let i = (at.row + r) * at.n + at.col;
        if let Some(res) = epi.residual {
            v.iter_mut().zip(&res[i..i + w]).for_each(|(v, r)| *v += r);
        }
        if let Some(out) = out {
            // SAFETY: y has capacity m·n and this block owns these w elements of row row + r.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.at(i), w) };
        }
    }
}

/// Runs `f` compiled for AVX-512 where the build targets x86-64 (`f` must be inlined:
/// closures and `#[inline(always)]` functions are).
///
/// # Safety
/// On x86-64 the CPU must have AVX-512F (every CPU that runs a bf16 kernel has).
#[inline(always)]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    return avx512::with(f);
    #[cfg(not(target_arch = "x86_64"))]
    f()
}

/// dst ← src rounded to bf16 (nearest, ties to even), as far as both go.
fn round_into(dst: &mut [bf16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16_usable() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx512::round_into(dst, src) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// Unit u as (m-block, n-block): groups of `group` m-blocks, n-blocks within a group, m-blocks
/// within that. Rayon hands each thread a contiguous run of u.
fn unit(u: usize, mb: usize, nb: usize, group: usize) -> (usize, usize) {
    let g = u / (group * nb);
    let in_group = group.min(mb - g * group);
    let r = u - g * group * nb;
    (g * group + r % in_group, r / in_group)
}

/// What follows the product: y = act(x Wᵀ + bias) + residual.
#[derive(Default)]
pub struct Epilogue<'a> {
    /// [n]
    pub bias: Option<&'a [f32]>,
    pub act: Option<Activation>,
    /// [m, n]
    pub residual: Option<&'a [f32]>,
}

/// Lines of W to load into cache during a block's product: from `at` on, `per_step` lines
/// with each k-step (prefetches do not fault, so the last step may run past the share).
#[derive(Clone, Copy)]
struct Ahead {
    at: *const u8,
    per_step: usize,
}

impl Ahead {
    const NONE: Ahead = Ahead {
        at: std::ptr::null(),
        per_step: 0,
    };
}

/// One 32×32 block of f32, aligned for the tile stores.
#[repr(C, align(64))]
struct Block([f32; BLOCK * BLOCK]);

/// A transform of each row of x before it is rounded (input row, output row).
pub type RowFn<'a> = dyn Fn(&[f32], &mut [f32]) + Sync + 'a;

/// Writes row i of an input into the buffer (k values).
pub type RowSource<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// Where the rows to round come from: x ([m, k]) through an optional transform, or a source of
/// m rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Slice(&'a [f32], Option<&'a RowFn<'a>>),
    From(&'a RowSource<'a>, usize),
}

impl Rows<'_> {
    /// Row i (k values; in `buf` unless it is x's own), or None past the last row.
    fn get<'b>(&'b self, i: usize, k: usize, buf: &'b mut [f32]) -> Option<&'b [f32]> {
        match *self {
            Rows::Slice(x, f) => {
                let src = x.get(i * k..(i + 1) * k)?;
                Some(match f {
                    Some(f) => {
                        f(src, buf);
                        buf
                    }
                    None => src,
                })
            }
            Rows::From(row, m) => (i < m).then(|| {
                row(i, buf);
                &*buf
            }),
        }
    }
}

/// x rounded to bf16 in a packed weight's input layout ([`PackedWeight::round`]).
pub struct Rounded {
    lines: Lines,
    m: usize,
    k: usize,
}

/// An output (y, or rounded x for the next layer) that units write in disjoint parts.
struct Shared<T>(*mut T);

impl<T> Shared<T> {
    /// The element at `offset` (a method, so closures capture the whole wrapper).
    unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}
// SAFETY: every unit writes its own part of the output, which outlives the units.
unsafe impl<T> Sync for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}

#[cfg(target_arch = "x86_64")]
mod amx {
    use half::bf16;
    use std::arch::asm;
    use std::cell::Cell;

    thread_local! {
        /// Whether this thread has loaded the tile configuration (it stays until released).
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// Palette 1, tiles 0–7 all 16 rows × 64 bytes: C tiles of 16×16 f32, A tiles of 16 rows ×
    /// 32 bf16, B tiles of 16 pairs × 16 columns.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    /// C[0..32, 0..32] = A[0..32, 0..k_pad] · B for two W tiles; a holds two rows of A tiles
    /// (16 × 32 values each, contiguous), c's rows are c_stride apart.
    pub(super) unsafe fn block(
        a: &[bf16],
        b: &[bf16],
        k_pad: usize,
        c: *mut f32,
        c_stride: usize,
        ahead: super::Ahead,
    ) {
        if !CONFIGURED.get() {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
            CONFIGURED.set(true);
        }
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {s64}*1]",
            "tileloadd tmm5, [{a1} + {s64}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            // W streams from memory at small batches: each step asks for both W tiles' lines
            // four steps ahead (the hardware prefetchers stop at every 4 KB page). B/32, bf16,
            // two Xeon cores: batch 1 15.9 against 14.5 ms, batch 32 208 against 199.
            "prefetcht0 [{b0} + 4096]", "prefetcht0 [{b0} + 4160]", "prefetcht0 [{b0} + 4224]", "prefetcht0 [{b0} + 4288]",
            "prefetcht0 [{b0} + 4352]", "prefetcht0 [{b0} + 4416]", "prefetcht0 [{b0} + 4480]", "prefetcht0 [{b0} + 4544]",
            "prefetcht0 [{b0} + 4608]", "prefetcht0 [{b0} + 4672]", "prefetcht0 [{b0} + 4736]", "prefetcht0 [{b0} + 4800]",
            "prefetcht0 [{b0} + 4864]", "prefetcht0 [{b0} + 4928]", "prefetcht0 [{b0} + 4992]", "prefetcht0 [{b0} + 5056]",
            "prefetcht0 [{b1} + 4096]", "prefetcht0 [{b1} + 4160]", "prefetcht0 [{b1} + 4224]", "prefetcht0 [{b1} + 4288]",
            "prefetcht0 [{b1} + 4352]", "prefetcht0 [{b1} + 4416]", "prefetcht0 [{b1} + 4480]", "prefetcht0 [{b1} + 4544]",
            "prefetcht0 [{b1} + 4608]", "prefetcht0 [{b1} + 4672]", "prefetcht0 [{b1} + 4736]", "prefetcht0 [{b1} + 4800]",
            "prefetcht0 [{b1} + 4864]", "prefetcht0 [{b1} + 4928]", "prefetcht0 [{b1} + 4992]", "prefetcht0 [{b1} + 5056]",
            // The next units' share of W (`Ahead`), per_step lines with each step.
            "mov {t}, {per_step}",
            "test {t}, {t}",
            "jz 4f",
            "3:",
            "prefetcht0 [{pf}]",
            "add {pf}, 64",
            "dec {t}",
            "jnz 3b",
            "4:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c0} + {sc}*1 + 64], tmm1",
            "tilestored [{c1} + {sc}*1], tmm2",
            "tilestored [{c1} + {sc}*1 + 64], tmm3",
            a0 = inout(reg) a.as_ptr() => _,
            a1 = inout(reg) a.as_ptr().add(16 * k_pad) => _,
            b0 = inout(reg) b.as_ptr() => _,
            b1 = inout(reg) b.as_ptr().add(16 * k_pad) => _,
            n = inout(reg) k_pad / 32 => _,
            s64 = in(reg) 64usize,
            sc = in(reg) c_stride * 4,
            c0 = in(reg) c,
            c1 = in(reg) c.add(16 * c_stride),
            pf = inout(reg) ahead.at => _,
            per_step = in(reg) ahead.per_step,
            t = out(reg) _,
            options(nostack),
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// `f` compiled for AVX-512 (it is inlined here).
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn with<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// `super::round_into` with `vcvtneps2bf16`, 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_into(dst: &mut [bf16], src: &[f32]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 16;
        for i in (0..whole).step_by(16) {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), h);
        }
        for (d, &s) in dst[whole..n].iter_mut().zip(&src[whole..n]) {
            *d = bf16::from_f32(s);
        }
    }

    /// Word 2j + e of a tile's pair line takes word j + 16e of `vcvtne2ps2bf16(odd, even)`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pair_order() -> __m512i {
        let idx: [i16; 32] = std::array::from_fn(|w| (w / 2 + 16 * (w % 2)) as i16);
        _mm512_loadu_si512(idx.as_ptr().cast())
    }

    /// One tile of `super::PackedWeight::pack` from rows: `even(kp)` and `odd(kp)` are the 16
    /// values of rows 2kp and 2kp + 1 (zero where the matrix ends), for kp < pairs.
    #[inline(always)]
    unsafe fn pairs_into(
        tile: &mut [bf16],
        pairs: usize,
        even: impl Fn(usize) -> __m512,
        odd: impl Fn(usize) -> __m512,
    ) {
        let order = pair_order();
        for kp in 0..pairs {
            let both = _mm512_cvtne2ps_pbh(odd(kp), even(kp));
            let line =
                _mm512_permutexvar_epi16(order, std::mem::transmute::<__m512bh, __m512i>(both));
            _mm512_storeu_si512(tile.as_mut_ptr().add(32 * kp).cast(), line);
        }
    }

    /// `super::PackedWeight::from_transposed`'s tile t of Wᵀ ([k, n], `cols` of its 16
    /// columns inside n): rows 2kp and 2kp + 1 rounded and interleaved.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile_from_transposed(
        tile: &mut [bf16],
        wt: &[f32],
        (k, n): (usize, usize),
        (t, cols): (usize, usize),
    ) {
        let mask: __mmask16 = (1u32 << cols).wrapping_sub(1) as u16;
        // SAFETY (loads): only rows < k are read, and only the `cols` columns of the mask.
        let row = |r: usize| {
            if r < k {
                _mm512_maskz_loadu_ps(mask, wt.as_ptr().add(r * n + 16 * t))
            } else {
                _mm512_setzero_ps()
            }
        };
        pairs_into(tile, k.div_ceil(2), |kp| row(2 * kp), |kp| row(2 * kp + 1));
    }

    /// `super::PackedWeight::from_rows`' tile t of W ([n, k], `cols` of its 16 rows inside
    /// n): each pair of columns gathered from the 16 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile_from_rows(
        tile: &mut [bf16],
        w: &[f32],
        (n, k): (usize, usize),
        (t, cols): (usize, usize),
    ) {
        debug_assert!(16 * t + cols <= n);
        let mask: __mmask16 = (1u32 << cols).wrapping_sub(1) as u16;
        let starts: [i32; 16] = std::array::from_fn(|j| (j * k) as i32);
        let starts = _mm512_loadu_si512(starts.as_ptr().cast());
        let base = w.as_ptr().add(16 * t * k);
        // SAFETY (gathers): only the `cols` rows of the mask, at columns < k.
        let column = |c: usize| {
            if c < k {
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, starts, base.add(c))
            } else {
                _mm512_setzero_ps()
            }
        };
        pairs_into(
            tile,
            k.div_ceil(2),
            |kp| column(2 * kp),
            |kp| column(2 * kp + 1),
        );
    }

    /// Rows per register block: 8 rows × 2 zmm of columns = 16 accumulators.
    const ROWS: usize = 8;

    /// C[0..32, 0..32] = A[0..32, :] · B for two W tiles, in four blocks of 8 rows; blocks
    /// wholly at or past row `used` (x's padding) are zeros, not products: at batch 1 (50 rows
    /// in two m-blocks) that is one block of eight.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block(
        a: &[bf16],
        a_stride: usize,
        b: &[bf16],
        k_pad: usize,
        c: *mut f32,
        c_stride: usize,
        used: usize,
    ) {
        for r in (0..super::BLOCK).step_by(ROWS) {
            let c = c.add(r * c_stride);
            if r >= used {
                for i in 0..ROWS {
                    std::ptr::write_bytes(c.add(i * c_stride), 0, 32);
                }
                continue;
            }
            rows(
                a.as_ptr().add(r * a_stride),
                a_stride,
                b,
                k_pad,
                c,
                c_stride,
            );
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows(
        a: *const bf16,
        a_stride: usize,
        b: &[bf16],
        k_pad: usize,
        c: *mut f32,
        c_stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        let (b0, b1) = (b.as_ptr(), b.as_ptr().add(16 * k_pad));
        for kp in 0..k_pad / 2 {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * kp).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * kp).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = a.add(r * a_stride + 2 * kp).cast::<i32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_stride), acc[0]);
            _mm512_storeu_ps(c.add(r * c_stride + 16), acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 + 1) * (2 * seed + 7919)) % 2003) as f32 / 1001.5 - 1.0)
            .collect()
    }

    /// x Wᵀ in f64 over the bf16-rounded inputs: the products are exact in f32, so the kernels
    /// differ from it by f32 summation alone.
    fn reference(x: &[f32], wt: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| r(x[i * k + p]) * r(wt[p * n + j]))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn every_kernel_this_cpu_has_matches_the_plain_product() {
        let kernels = available();
        eprintln!("bf16 kernels on this CPU: {kernels:?}");
        // Shapes with and without padding in m, k and n; the last two have groups of at least
        // AHEAD_FROM m-blocks (one group of 7; two of 5 at k = 3072, where the last n-block of
        // the first group loads the first n-block again for the second).
        for (m, k, n) in [
            (1, 32, 32),
            (50, 768, 96),
            (33, 40, 48),
            (64, 64, 16),
            (70, 96, 2304),
            (200, 96, 160),
            (320, 3072, 64),
        ] {
            let (x, wt) = (values(m * k, 1), values(k * n, 2));
            let want = reference(&x, &wt, m, k, n);
            for &kernel in &kernels {
                let w = PackedWeight::from_transposed(&wt, k, n, kernel);
                let got = w.matmul(&x, m, &Epilogue::default());
                let d = worst(&got, &want);
                assert!(d < 2e-5, "{kernel:?} {m}x{k}x{n}: {d}");
            }
        }
    }

    #[test]
    fn a_weight_packed_from_its_rows_is_the_weight_packed_from_its_transpose() {
        for (k, n) in [(40, 48), (768, 96), (31, 17)] {
            let wt = values(k * n, 5);
            let w: Vec<f32> = (0..n * k).map(|i| wt[(i % k) * n + i / k]).collect();
            for &kernel in &available() {
                let a = PackedWeight::from_transposed(&wt, k, n, kernel);
                let b = PackedWeight::from_rows(&w, n, k, kernel);
                assert_eq!(a.tiles.as_slice(), b.tiles.as_slice(), "{kernel:?} {k}x{n}");
                assert_eq!((b.in_dim(), b.out_dim()), (k, n));
            }
        }
    }

    #[test]
    fn the_epilogue_adds_the_bias_activates_and_adds_the_residual() {
        let (m, k, n) = (37, 64, 48);
        let (x, wt) = (values(m * k, 3), values(k * n, 4));
        let (bias, residual) = (values(n, 5), values(m * n, 6));
        let product = reference(&x, &wt, m, k, n);
        for &kernel in &available() {
            let w = PackedWeight::from_transposed(&wt, k, n, kernel);
            for act in [None, Some(Activation::QuickGelu), Some(Activation::Gelu)] {
                let epi = Epilogue {
                    bias: Some(&bias),
                    act,
                    residual: Some(&residual),
                };
                let got = w.matmul(&x, m, &epi);
                let mut want = product.clone();
                for (i, v) in want.iter_mut().enumerate() {
                    let mut t = [*v + bias[i % n]];
                    activate_in_place(&mut t, act);
                    *v = t[0] + residual[i];
                }
                let d = worst(&got, &want);
                assert!(d < 2e-5, "{kernel:?} {act:?}: {d}");
            }
        }
    }

    /// fc1 writing straight into fc2's input layout gives exactly what the f32 hand-over does
    /// (fc2 rounds fc1's output to bf16 either way), with padding in m, k and the middle.
    #[test]
    fn a_layer_feeding_the_next_in_its_layout_gives_the_same_result() {
        for (m, k, mid, n) in [(37, 64, 96, 48), (50, 40, 80, 32)] {
            let x = values(m * k, 7);
            let (w1, w2) = (values(k * mid, 8), values(mid * n, 9));
            let (b1, b2, res) = (values(mid, 10), values(n, 11), values(m * n, 12));
            for &kernel in &available() {
                let (p1, p2) = (
                    PackedWeight::from_transposed(&w1, k, mid, kernel),
                    PackedWeight::from_transposed(&w2, mid, n, kernel),
                );
                let first = Epilogue {
                    bias: Some(&b1),
                    act: Some(Activation::QuickGelu),
                    residual: None,
                };
                let second = Epilogue {
                    bias: Some(&b2),
                    act: None,
                    residual: Some(&res),
                };
                let apart = p2.matmul(&p1.matmul(&x, m, &first), m, &second);
                let mid_rounded = p1.matmul_for(&p1.round(&x, m), &first, &p2);
                let chained = p2.matmul_rounded(&mid_rounded, &second);
                assert_eq!(apart, chained, "{kernel:?} {m}x{k}x{mid}x{n}");
            }
        }
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn the_vendor_is_the_one_linux_reports() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap();
        let expected = vendor == "AuthenticAMD" || vendor == "HygonGenuine";
        assert_eq!(amd(), expected, "vendor_id {vendor}");
    }

    #[test]
    fn the_choice_follows_the_switch_and_the_cpu() {
        let both = [Kernel::Amx, Kernel::Avx512Bf16];
        for amd in [false, true] {
            assert_eq!(choose(None, &both, amd), Some(Kernel::Amx));
            assert_eq!(
                choose(Some("avx512_bf16"), &both, amd),
                Some(Kernel::Avx512Bf16)
            );
            assert_eq!(choose(Some("off"), &both, amd), None);
            assert_eq!(choose(Some("amx"), &[Kernel::Avx512Bf16], amd), None);
            assert_eq!(choose(None, &[], amd), None);
        }
        // AVX512-BF16 by default on AMD only (slower than the f32 path from batch 8 on a Xeon).
        let only = [Kernel::Avx512Bf16];
        assert_eq!(choose(None, &only, false), None);
        assert_eq!(choose(None, &only, true), Some(Kernel::Avx512Bf16));
        assert_eq!(choose(Some("off"), &only, true), None);
        assert_eq!(
            choose(Some("avx512_bf16"), &only, false),
            Some(Kernel::Avx512Bf16)
        );
    }

    #[test]
    fn units_cover_every_block_once() {
        for (mb, nb) in [(1, 1), (2, 24), (5, 3), (50, 96), (4, 1)] {
            for group in [1, 4, 21] {
                let mut seen = vec![0; mb * nb];
                for u in 0..mb * nb {
                    let (i, j) = unit(u, mb, nb, group);
                    seen[i * nb + j] += 1;
                }
                assert!(
                    seen.iter().all(|&s| s == 1),
                    "{mb}x{nb} in groups of {group}"
                );
            }
        }
    }

    #[test]
    fn the_units_of_a_block_load_all_of_the_next_block_ahead() {
        let Some(kernel) = available().first().copied() else {
            return;
        };
        let (k, n) = (96, 4 * BLOCK);
        let w = PackedWeight::from_transposed(&values(k * n, 3), k, n, kernel);
        let (base, block) = (w.tiles.as_slice().as_ptr() as usize, 64 * w.k_pad);
        let steps = w.k_pad / 32;
        for (mb, group) in [(7usize, 21), (50, 21), (8, 4), (9, 4)] {
            for (g, j) in (0..mb.div_ceil(group)).flat_map(|g| (0..4).map(move |j| (g, j))) {
                let rows = g * group..mb.min((g + 1) * group);
                let mut loaded = vec![0; block / 64];
                for i in rows.clone() {
                    let ahead = w.ahead(i, j, (mb, 4), group);
                    if ahead.per_step == 0 {
                        continue;
                    }
                    let at = ahead.at as usize - base;
                    assert_eq!(at / block, (j + 1) % 4, "{mb} m-blocks, unit ({i}, {j})");
                    let first = (at % block) / 64;
                    let end = (first + ahead.per_step * steps).min(block / 64);
                    loaded[first..end].iter_mut().for_each(|l| *l += 1);
                }
                // The last block of the last group has no next; nor do small groups.
                let expected = rows.len() >= AHEAD_FROM && (j < 3 || rows.end < mb);
                assert!(
                    loaded.iter().all(|&l| (l >= 1) == expected),
                    "{mb} m-blocks in groups of {group}, group {g}, block {j}: {loaded:?}"
                );
            }
        }
        let ahead = w.ahead(0, 0, (AHEAD_FROM - 1, 4), 21);
        assert_eq!(
            ahead.per_step, 0,
            "fewer m-blocks than AHEAD_FROM load nothing ahead"
        );
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    /// `cargo test --release -p atlas-clip --lib bf16_gemm::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn gflops() {
        for (m, k, n) in [
            (50, 768, 2304),
            (50, 3072, 768),
            (1600, 768, 2304),
            (1600, 768, 3072),
            (1600, 3072, 768),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            for kernel in available() {
                let t = Instant::now();
                let w = PackedWeight::from_transposed(&wt, k, n, kernel);
                let pack_t = t.elapsed().as_secs_f64();
                let t = Instant::now();
                drop(PackedWeight::from_rows(&wt, n, k, kernel));
                let pack_r = t.elapsed().as_secs_f64();
                eprintln!(
                    "{kernel:?} packing {k}x{n}: {:.2} ms from Wᵀ, {:.2} ms from W",
                    pack_t * 1e3,
                    pack_r * 1e3
                );
                w.matmul(&x, m, &Epilogue::default());
                let t = Instant::now();
                let a = w.round(&x, m);
                let conv = t.elapsed().as_secs_f64();
                drop(a);
                let mut s = f64::MAX;
                for _ in 0..20 {
                    let t = Instant::now();
                    std::hint::black_box(w.matmul(&x, m, &Epilogue::default()));
                    s = s.min(t.elapsed().as_secs_f64());
                }
                let gf = 2.0 * (m * k * n) as f64 / s / 1e9;
                eprintln!(
                    "{kernel:?} {m}x{k}x{n}: {:.2} ms, {gf:.0} GFLOP/s (rounding x {:.2} ms)",
                    s * 1e3,
                    conv * 1e3
                );
            }
        }
    }

    /// W read from memory against W in cache at a few rows: 40 packed fc weights of B/32
    /// (189 MB) in turn against one, beside a plain read of the 40.
    /// `cargo test --release -p atlas-clip --lib bf16_gemm::speed::streaming -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn streaming() {
        let Some(kernel) = chosen() else { return };
        let (k, n, count) = (768, 3072, 40);
        let wt: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let ws: Vec<PackedWeight> = (0..count)
            .map(|_| PackedWeight::from_transposed(&wt, k, n, kernel))
            .collect();
        let bytes = (k * n * 2) as f64;
        let best = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min)
        };
        rayon::scope(|_| {
            let read = best(&|| {
                let lines = |w: &PackedWeight| -> u64 {
                    let t = w.tiles.as_slice();
                    t.iter().step_by(32).map(|v| u64::from(v.to_bits())).sum()
                };
                std::hint::black_box(ws.par_iter().map(lines).sum::<u64>());
            });
            eprintln!("plain read: {:.1} GB/s", count as f64 * bytes / read / 1e9);
        });
        for m in [50, 64, 197, 400] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let a = ws[0].round(&x, m);
            let run = |used: usize| {
                let pass = || {
                    for w in ws.iter().take(used).cycle().take(count) {
                        std::hint::black_box(w.matmul_rounded(&a, &Epilogue::default()));
                    }
                };
                rayon::scope(|_| best(&pass)) / count as f64
            };
            let (cold, warm) = (run(count), run(1));
            let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
            eprintln!(
                "m {m}: from memory {:.3} ms ({:.1} GB/s, {:.0} GFLOP/s), in cache {:.3} ms ({:.0} GFLOP/s)",
                cold * 1e3,
                bytes / cold / 1e9,
                gf(cold),
                warm * 1e3,
                gf(warm)
            );
        }
    }
}
