//! f32 products of small matrices on AVX-512, register-blocked, without gemm's packing:
//! - attention's per-head products: at one head of ViT-B/32 (50 tokens × 64) gemm's
//!   small-matrix path spent more time packing and dispatching than multiplying (attention took
//!   3.6 ms of a 19 ms bf16 layer at batch 32);
//! - linear layers at a few rows (batch 1), where gemm packed all of Wᵀ on every call.
//!
//! Two shapes cover them, each a register block of up to 4 rows × 64 columns accumulated in zmm
//! registers:
//! - [`a_bt`]: dst = s · A Bᵀ with A's and B's rows contiguous (scores, ∂P), B transposed once
//!   into a zero-padded scratch;
//! - [`a_b`]: dst = s · A B with B's rows contiguous and its width a multiple of 16 (P V, the
//!   gradients of q, k and v, x Wᵀ from Wᵀ), A read at any strides.
//!
//! Other shapes, other CPUs and other types take gemm.

use crate::model::fast_math::exp512;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Columns of one register block: four zmm of 16.
const GROUP: usize = 64;

/// True when the CPU runs these kernels.
pub(super) fn usable() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// A row-major operand: base pointer, row stride, column stride (elements).
#[derive(Clone, Copy)]
pub(super) struct Operand(pub *const f32, pub usize, pub usize);

thread_local! {
    /// Bᵀ for [`a_bt`], kept between calls (one per rayon worker).
    static TRANSPOSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// dst (rows × cols, rows `dst_rs` apart) = s · A Bᵀ, A rows × inner, B cols × inner; with
/// `softmax`, each row of it through softmax instead.
///
/// # Safety
/// The CPU has AVX-512F; A and B address their elements; dst rows × cols writable elements
/// no other thread touches.
pub(super) unsafe fn a_bt(
    dst: *mut f32,
    dst_rs: usize,
    (rows, inner, cols): (usize, usize, usize),
    a: Operand,
    b: Operand,
    s: f32,
    softmax: bool,
) {
    let width = cols.next_multiple_of(GROUP);
    // Rows that fit one register block are normalised there; longer ones after.
    let in_block = softmax && cols <= GROUP;
    TRANSPOSED.with_borrow_mut(|bt| {
        bt.resize(inner * width, 0.0);
        transpose(bt, width, b, cols, inner);
        let bt = Operand(bt.as_ptr(), width, 1);
        blocks(rows, cols, |i, g, r| {
            let a = Operand(a.0.add(i * a.1), a.1, a.2);
            let b = Operand(bt.0.add(g), width, 1);
            let out = (dst.add(i * dst_rs + g), dst_rs);
            let last = Last {
                s,
                valid: cols - g,
                softmax: in_block,
                accumulate: false,
                share: None,
            };
            match r {
                4 => block::<4, 4>(out, inner, a, b, last),
                3 => block::<3, 4>(out, inner, a, b, last),
                2 => block::<2, 4>(out, inner, a, b, last),
                _ => block::<1, 4>(out, inner, a, b, last),
            }
        });
    });
    if softmax && !in_block {
        for i in 0..rows {
            softmax_row(dst.add(i * dst_rs), cols);
        }
    }
}

/// bt (inner × width, zero past cols) = Bᵀ, 16 columns at a time by gathers.
#[target_feature(enable = "avx512f")]
unsafe fn transpose(bt: &mut [f32], width: usize, b: Operand, cols: usize, inner: usize) {
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for j in (0..width).step_by(16) {
        let mask = lane_mask(cols.saturating_sub(j));
        let rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(b.1 as i32));
        let base = b.0.add(j * b.1);
        for c in 0..inner {
            let at = _mm512_add_epi32(rows, _mm512_set1_epi32((c * b.2) as i32));
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, at, base);
            _mm512_storeu_ps(bt.as_mut_ptr().add(c * width + j), v);
        }
    }
}

/// The first `n` of 16 lanes.
fn lane_mask(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// softmax over the n values at p, in place.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row(p: *mut f32, n: usize) {
    let chunk = |j: usize| (p.add(j), lane_mask(n - j));
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for j in (0..n).step_by(16) {
        let (at, k) = chunk(j);
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, k, at));
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    for j in (0..n).step_by(16) {
        let (at, k) = chunk(j);
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, at), m));
        let e = _mm512_maskz_mov_ps(k, e);
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(at, k, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for j in (0..n).step_by(16) {
        let (at, k) = chunk(j);
        _mm512_mask_storeu_ps(at, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, at), inv));
    }
}

/// dst (rows × cols) = s · A B, A rows × inner at any strides, B inner × cols with rows
/// contiguous, cols a multiple of 16.
///
/// # Safety
/// As [`a_bt`].
pub(super) unsafe fn a_b(
    dst: *mut f32,
    dst_rs: usize,
    dims: (usize, usize, usize),
    a: Operand,
    b: Operand,
    s: f32,
) {
    a_b_with(dst, dst_rs, dims, a, b, s, Mode::default())
}

/// y (m × n, row-major) = x (m × k) · b (k × n, rows `ld` apart), n a multiple of 16, the
/// 64-column groups shared among rayon's threads. b is a layer's Wᵀ, streamed from memory at
/// batch 1: each group's columns are read once, `K_STEP` rows at a time, and while x's rows
/// pass over one chunk the next chunk's lines are loaded into L2 (the chunk after the last of
/// a group is the next group's first). `ld` f32 should be an odd number of cache lines (see
/// `Weight::transposed`): at a multiple of 16 lines the rows fall in a few L1 sets and a chunk
/// does not stay in L1.
pub(super) fn rows_times(
    x: &[f32],
    b: &[f32],
    ld: usize,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    assert!(x.len() == m * k && n.is_multiple_of(16) && ld >= n && usable());
    assert!(
        k == 0 || b.len() >= (k - 1) * ld + n,
        "b is not k rows of ld"
    );
    let mut y = vec![0f32; m * n];
    // Addresses as integers, so the closure is Send; each group writes its own columns.
    let (yp, xp, bp) = (
        y.as_mut_ptr() as usize,
        x.as_ptr() as usize,
        b.as_ptr() as usize,
    );
    (0..n.div_ceil(GROUP)).into_par_iter().for_each(|g| {
        let c0 = g * GROUP;
        for k0 in (0..k).step_by(K_STEP) {
            let steps = K_STEP.min(k - k0);
            let (next_row, next_col) = match k0 + steps {
                r if r < k => (r, c0),
                _ => (0, c0 + GROUP),
            };
            let next = (next_col < n).then(|| Chunk {
                at: bp + (next_row * ld + next_col) * 4,
                rows: K_STEP.min(k - next_row),
                row_lines: GROUP.min(n - next_col) / 16,
                row_bytes: ld * 4,
            });
            // SAFETY: the CPU has AVX-512F (asserted); x is m × k, b's columns c0.. hold k
            // rows ld apart, y's columns c0.. are this group's; prefetches do not fault.
            unsafe {
                let x = Operand((xp as *const f32).add(k0), k, 1);
                let b = Operand((bp as *const f32).add(k0 * ld + c0), ld, 1);
                let dims = (m, steps, GROUP.min(n - c0));
                let mode = Mode {
                    accumulate: k0 > 0,
                    next,
                };
                a_b_with((yp as *mut f32).add(c0), n, dims, x, b, 1.0, mode);
            }
        }
    });
    y
}

/// Rows of B that [`rows_times`] multiplies into y before it moves on: 16 KB of one group's
/// columns, which stay in L1 beside x's part while every row of x passes over them.
const K_STEP: usize = 64;

/// A chunk of B to load into L2: `rows` rows of `row_lines` cache lines from `at`, rows
/// `row_bytes` apart.
#[derive(Clone, Copy)]
struct Chunk {
    at: usize,
    rows: usize,
    row_lines: usize,
    row_bytes: usize,
}

impl Chunk {
    /// Where row block `block` of `blocks` starts loading, and how many lines it loads with
    /// each of its `steps` steps: its share of the chunk's lines from its first on. It goes
    /// on past its share to the end of its steps (into the next blocks' shares, the last into
    /// the chunk after): asking for the share alone left W's product at 50 rows waiting on
    /// memory (B/32 fc1, two Xeon cores: 1.25–1.32 against 1.01–1.04 ms).
    fn share(self, block: usize, blocks: usize, steps: usize) -> Share {
        let lines = self.rows * self.row_lines;
        let each = lines.div_ceil(blocks.max(1));
        let per_step = each.div_ceil(steps.max(1));
        Share {
            chunk: self,
            next: self.at + (block * each / self.row_lines) * self.row_bytes,
            rows: per_step,
            wait: 1,
        }
    }
}

/// The rows of B one register block loads in order: `rows` whole rows every `row_lines`
/// steps, about `rows` lines a step spread over the block's steps, counted down so that a
/// step does no division.
#[derive(Clone, Copy)]
struct Share {
    chunk: Chunk,
    /// The address of the next row.
    next: usize,
    rows: usize,
    /// Steps until the next rows are loaded.
    wait: usize,
}

impl Share {
    /// The rows to load with this step (none on most steps), advancing past them.
    fn step(&mut self) -> impl Iterator<Item = usize> + '_ {
        self.wait -= 1;
        let n = if self.wait == 0 {
            self.wait = self.chunk.row_lines;
            self.rows
        } else {
            0
        };
        (0..n).map(move |_| {
            let at = self.next;
            self.next += self.chunk.row_bytes;
            at
        })
    }
}

/// How [`a_b_with`] runs: the product added to dst instead of stored, and the blocks loading
/// the `next` chunk of B into L2 as they go.
#[derive(Clone, Copy, Default)]
struct Mode {
    accumulate: bool,
    next: Option<Chunk>,
}

/// [`a_b`] run as `mode` says (accumulating only at s = 1).
///
/// # Safety
/// As [`a_b`].
unsafe fn a_b_with(
    dst: *mut f32,
    dst_rs: usize,
    (rows, inner, cols): (usize, usize, usize),
    a: Operand,
    b: Operand,
    s: f32,
    mode: Mode,
) {
    debug_assert!(!mode.accumulate || s == 1.0);
    debug_assert!(cols.is_multiple_of(16) && b.2 == 1);
    let row_blocks = rows.div_ceil(4);
    blocks(rows, cols, |i, g, r| {
        let a = Operand(a.0.add(i * a.1), a.1, a.2);
        let b = Operand(b.0.add(g), b.1, 1);
        let out = (dst.add(i * dst_rs + g), dst_rs);
        let n = (cols - g).min(GROUP);
        let share = mode.next.map(|chunk| chunk.share(i / 4, row_blocks, inner));
        let last = Last {
            s,
            valid: n,
            softmax: false,
            accumulate: mode.accumulate,
            share,
        };
        macro_rules! by_width {
            ($r:literal) => {
                match n / 16 {
                    4 => block::<$r, 4>(out, inner, a, b, last),
                    3 => block::<$r, 3>(out, inner, a, b, last),
                    2 => block::<$r, 2>(out, inner, a, b, last),
                    _ => block::<$r, 1>(out, inner, a, b, last),
                }
            };
        }
        match r {
            4 => by_width!(4),
            3 => by_width!(3),
            2 => by_width!(2),
            _ => by_width!(1),
        }
    });
}

/// Calls `f(first row, first column, rows)` for every block of up to 4 rows × 64 columns.
fn blocks(rows: usize, cols: usize, mut f: impl FnMut(usize, usize, usize)) {
    for g in (0..cols).step_by(GROUP) {
        for i in (0..rows).step_by(4) {
            f(i, g, (rows - i).min(4));
        }
    }
}

/// How a block runs: its sums scaled by `s`, only the first `valid` columns kept, with
/// `softmax` (the block holds whole rows) each row normalised, with `accumulate` added to out,
/// and loading its `share` of the next chunk of B into L2 as it goes.
#[derive(Clone, Copy)]
struct Last {
    s: f32,
    valid: usize,
    softmax: bool,
    accumulate: bool,
    share: Option<Share>,
}

/// out[r, 16t + l] = Σ_c a[r, c] · b[c, 16t + l] for r < R, t < C, finished by `last`; b's
/// rows are `b.1` apart and hold C·16 readable values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block<const R: usize, const C: usize>(
    (out, out_rs): (*mut f32, usize),
    inner: usize,
    a: Operand,
    b: Operand,
    last: Last,
) {
    let masks: [u16; C] = std::array::from_fn(|t| lane_mask(last.valid.saturating_sub(16 * t)));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut share = last.share;
    if last.accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (t, v) in acc.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[t], out.add(r * out_rs + 16 * t));
            }
        }
    }
    for c in 0..inner {
        let row = b.0.add(c * b.1);
        if let Some(sh) = &mut share {
            let lines = sh.chunk.row_lines;
            for row in sh.step() {
                for l in 0..lines {
                    _mm_prefetch::<_MM_HINT_T1>((row + l * 64) as *const i8);
                }
            }
        }
        let bv: [__m512; C] = std::array::from_fn(|t| _mm512_loadu_ps(row.add(16 * t)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.0.add(r * a.1 + c * a.2));
            for t in 0..C {
                acc[t] = _mm512_fmadd_ps(x, bv[t], acc[t]);
            }
        }
    }
    let s = _mm512_set1_ps(last.s);
    for (r, acc) in acc.iter_mut().enumerate() {
        for v in acc.iter_mut() {
            *v = _mm512_mul_ps(*v, s);
        }
        if last.softmax {
            softmax_in_registers(acc, &masks);
        }
        for (t, &v) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * out_rs + 16 * t), masks[t], v);
        }
    }
}

/// softmax over the lanes of `row` that `masks` keep (the others become 0).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_in_registers<const C: usize>(row: &mut [__m512; C], masks: &[u16; C]) {
    let low = _mm512_set1_ps(f32::NEG_INFINITY);
    let m = (0..C).fold(low, |m, t| {
        _mm512_max_ps(m, _mm512_mask_mov_ps(low, masks[t], row[t]))
    });
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let mut sum = _mm512_setzero_ps();
    for t in 0..C {
        row[t] = _mm512_maskz_mov_ps(masks[t], exp512(_mm512_sub_ps(row[t], m)));
        sum = _mm512_add_ps(sum, row[t]);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
    for v in row.iter_mut() {
        *v = _mm512_mul_ps(*v, inv);
    }
}

#[cfg(test)]
mod tests {
    //! Both kernels against a plain triple loop, over every remainder of rows, columns and
    //! register groups, with strided and transposed operands.
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + 1) * (7 + seed)) as f32 * 0.37).sin())
            .collect()
    }

    /// s · Σ_c a[i, c] · b[c, j] in f64, with a and b read through their strides.
    fn plain(
        a: Operand,
        b: Operand,
        (rows, inner, cols): (usize, usize, usize),
        s: f32,
    ) -> Vec<f32> {
        let at = |o: Operand, i: usize, j: usize| unsafe { *o.0.add(i * o.1 + j * o.2) } as f64;
        let mut out = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let dot: f64 = (0..inner).map(|c| at(a, i, c) * at(b, c, j)).sum();
                out[i * cols + j] = (dot * s as f64) as f32;
            }
        }
        out
    }

    fn worst(x: &[f32], y: &[f32]) -> f32 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Whether the kernels run here (the tests say so when they do not).
    fn on_this_cpu() -> bool {
        let yes = usable();
        if !yes {
            eprintln!("no AVX-512F: the kernels are not used on this CPU");
        }
        yes
    }

    #[test]
    fn a_times_b_transposed_matches_the_plain_product() {
        if !on_this_cpu() {
            return;
        }
        for (rows, inner, cols) in [
            (1, 1, 1),
            (5, 3, 7),
            (50, 64, 50),
            (9, 17, 64),
            (4, 8, 65),
            (6, 64, 197),
        ] {
            let (av, bv) = (values(rows * inner, 1), values(cols * inner, 2));
            // dst wider than cols: the kernel must not write past its columns.
            let stride = cols + 3;
            let mut dst = vec![f32::NAN; rows * stride];
            let (a, b) = (
                Operand(av.as_ptr(), inner, 1),
                Operand(bv.as_ptr(), inner, 1),
            );
            unsafe {
                a_bt(
                    dst.as_mut_ptr(),
                    stride,
                    (rows, inner, cols),
                    a,
                    b,
                    0.5,
                    false,
                )
            };
            let want = plain(a, Operand(bv.as_ptr(), 1, inner), (rows, inner, cols), 0.5);
            for i in 0..rows {
                let got = &dst[i * stride..][..cols];
                assert!(
                    worst(got, &want[i * cols..][..cols]) < 1e-5,
                    "{rows}×{inner}×{cols} row {i}"
                );
                assert!(
                    dst[i * stride + cols..][..3].iter().all(|x| x.is_nan()),
                    "wrote past the row"
                );
            }
        }
    }

    #[test]
    fn a_times_b_matches_the_plain_product_with_a_transposed_or_not() {
        if !on_this_cpu() {
            return;
        }
        for (rows, inner, cols) in [
            (1, 1, 16),
            (5, 7, 32),
            (50, 50, 64),
            (7, 9, 80),
            (13, 5, 128),
            (3, 50, 48),
        ] {
            let (av, bv) = (values(rows * inner, 3), values(inner * cols, 4));
            let b = Operand(bv.as_ptr(), cols, 1);
            // A as stored, and A read transposed from an inner × rows matrix (Pᵀ ∂O).
            for a in [
                Operand(av.as_ptr(), inner, 1),
                Operand(av.as_ptr(), 1, rows),
            ] {
                let mut dst = vec![f32::NAN; rows * cols];
                unsafe { a_b(dst.as_mut_ptr(), cols, (rows, inner, cols), a, b, -1.5) };
                let want = plain(a, b, (rows, inner, cols), -1.5);
                assert!(
                    worst(&dst, &want) < 1e-5,
                    "{rows}×{inner}×{cols}, A strides {}, {}",
                    a.1,
                    a.2
                );
            }
        }
    }
}

#[cfg(test)]
mod shares {
    use super::*;
    use std::collections::BTreeSet;

    /// The row blocks of a call load every line of the next chunk (rows of B `row_bytes`
    /// apart) within their steps, and only lines of B's rows from the chunk's first on.
    #[test]
    fn the_row_blocks_load_every_line_of_the_next_chunk() {
        for (rows, row_lines, blocks, steps) in [
            (64, 4, 13, 64),
            (64, 1, 13, 44),
            (44, 3, 2, 64),
            (3, 4, 32, 64),
            (64, 4, 1, 1),
        ] {
            let (at, row_bytes) = (1 << 20, 12352);
            let chunk = Chunk {
                at,
                rows,
                row_lines,
                row_bytes,
            };
            let line = |r: usize, l: usize| at + r * row_bytes + l * 64;
            let wanted: BTreeSet<usize> = (0..rows)
                .flat_map(|r| (0..row_lines).map(move |l| line(r, l)))
                .collect();
            let mut loaded = BTreeSet::new();
            for b in 0..blocks {
                let mut sh = chunk.share(b, blocks, steps);
                for _ in 0..steps {
                    let rows: Vec<usize> = sh.step().collect();
                    loaded.extend(
                        rows.iter()
                            .flat_map(|&r| (0..row_lines).map(move |l| r + l * 64)),
                    );
                }
            }
            let label = format!("{rows} rows of {row_lines}, {blocks} blocks of {steps} steps");
            assert!(loaded.is_superset(&wanted), "{label}: a line left out");
            let in_rows =
                |&a: &usize| a >= at && (a - at) % row_bytes < row_lines * 64 && (a - at) % 64 == 0;
            assert!(loaded.iter().all(in_rows), "{label}: a line off B's rows");
        }
    }
}

#[cfg(test)]
mod speed {
    //! `cargo test --release -p atlas-clip --lib small_gemm::speed -- --ignored --nocapture`:
    //! one B/32 layer's attention at batch 32 on these kernels and on gemm, alternating.
    use candle_core::{Device, Tensor};
    use std::time::Instant;

    #[test]
    #[ignore]
    fn b32_attention() {
        let t = Tensor::randn(0f32, 1.0, (32, 50, 2304), &Device::Cpu).unwrap();
        let (q, k, v) = (
            t.narrow(2, 0, 768).unwrap(),
            t.narrow(2, 768, 768).unwrap(),
            t.narrow(2, 1536, 768).unwrap(),
        );
        for on in [true, false, true, false] {
            crate::model::fused_grad::attention::HEAD_KERNELS
                .store(on, std::sync::atomic::Ordering::Relaxed);
            let a = Instant::now();
            for _ in 0..50 {
                crate::model::fused_grad::attention::attention(&q, &k, &v, 12, 1.0).unwrap();
            }
            eprintln!(
                "kernels {on}: {:.3} ms",
                a.elapsed().as_secs_f64() * 1e3 / 50.0
            );
        }
    }
}

#[cfg(test)]
mod few_rows_speed {
    use super::*;
    use std::time::Instant;

    /// The few-rows product at 50 rows over 40 B/32 fc1 weights in turn (377 MB, from
    /// memory) and over one (in cache), with Wᵀ's rows n apart and n + 16 apart, alternating;
    /// M, K and N in the environment set the shape (`K=3072 N=768`: fc2).
    /// `cargo test --release -p atlas-clip --lib small_gemm::few_rows_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn streaming() {
        if !usable() {
            return;
        }
        let dim = |v: &str, d: usize| std::env::var(v).map_or(d, |s| s.parse().unwrap());
        let (m, k, n, count) = (dim("M", 50), dim("K", 768), dim("N", 3072), 40);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        for round in 0..2 {
            for ld in [n, n + 16] {
                let ws: Vec<Vec<f32>> = (0..count)
                    .map(|s| (0..k * ld).map(|i| ((i + s) % 5) as f32 * 0.1).collect())
                    .collect();
                let best = |used: usize| {
                    let pass = || {
                        let t = Instant::now();
                        for w in ws.iter().take(used).cycle().take(count) {
                            std::hint::black_box(rows_times(&x, w, ld, (m, k, n)));
                        }
                        t.elapsed().as_secs_f64() / count as f64
                    };
                    rayon::scope(|_| (0..5).map(|_| pass()).fold(f64::MAX, f64::min))
                };
                let (cold, warm) = (best(count), best(1));
                let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
                eprintln!(
                    "round {round}, rows {ld} apart: from memory {:.3} ms ({:.0} GFLOP/s), in cache {:.3} ms ({:.0} GFLOP/s)",
                    cold * 1e3,
                    gf(cold),
                    warm * 1e3,
                    gf(warm)
                );
            }
        }
    }
}
