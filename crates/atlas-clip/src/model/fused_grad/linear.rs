//! y = x Wᵀ for a learned W, with its own backward (CPU, f32 and f64): ∂x = ∂y W and
//! ∂W = ∂yᵀ x, both with contiguous operands; no ∂x when x is not part of the graph (the patch
//! embedding). The forward calls gemm straight into the output. Built from candle ops, W
//! reached the product through a transposed view and candle's backward zero-filled and added a
//! gradient for every node: two to three passes over each weight's gradient instead of one.
//!
//! With a bf16 kernel (autocast, as PyTorch's `torch.autocast(dtype=bfloat16)` runs a linear
//! layer) the three products take bf16 operands on that kernel and sum in f32: W is packed for
//! the forward and again, transposed, for ∂x; x is packed for ∂W. Inputs, outputs and
//! gradients stay f32.
//!
//! While [`backward_with_weight_sink`] runs, the gradients of weights that are variables (the
//! composed leaves) go to a sink instead of candle's gradient store.

use super::{slice, ColumnSum, Num};
use crate::model::bf16_gemm::{Epilogue, Kernel, PackedWeight};
use crate::model::layers::with_f32s;
use candle_core::backprop::GradStore;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// Fewest rows of x for which Wᵀ is transposed into a contiguous scratch (see [`product`]).
/// Below, the product is too short to repay the transposition.
const MIN_ROWS_TO_TRANSPOSE: usize = 128;

/// x Wᵀ over x [M, K] and W [N, K]: [M, N], differentiable in both; on `bf16`'s kernel when
/// given and the tensors are f32.
pub fn matmul_wt(x: &Tensor, w: &Tensor, bf16: Option<Kernel>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    x.apply_op2(&w, LinearWt { bf16 })
}

/// x Wᵀ + b, b [N]: the bias is where gemm's output starts (no pass of its own), and its
/// gradient a column sum; one graph node instead of two.
pub fn matmul_wt_bias(x: &Tensor, w: &Tensor, b: &Tensor, bf16: Option<Kernel>) -> Result<Tensor> {
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    x.apply_op3(&w, &b, LinearWt { bf16 })
}

/// (m, k, n) of x [m, k] and W [n, k].
fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    match (x.dims(), w.dims()) {
        (&[m, k], &[n, kw]) if kw == k && m > 0 && n > 0 && k > 0 => Ok((m, k, n)),
        (x, w) => candle_core::bail!("linear-wt: x {x:?} must be [M, K] and W {w:?} [N, K]"),
    }
}

/// [`product`] in the storage's float type, or on the bf16 kernel for f32.
fn forward(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
    bf16: Option<Kernel>,
) -> Result<(CpuStorage, Shape)> {
    let (m, k, n) = dims(xl, wl)?;
    if let Some((_, bl)) = bias {
        if bl.dims() != [n] {
            candle_core::bail!(
                "linear-wt: bias {:?} does not fit W {:?}",
                bl.dims(),
                wl.dims()
            );
        }
    }
    fn run<T: Num>(
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
        mkn: (usize, usize, usize),
    ) -> Result<CpuStorage> {
        let bias = bias.map(|(b, bl)| slice::<T>(b, bl)).transpose()?;
        Ok(T::wrap(product(slice(x, xl)?, slice(w, wl)?, bias, mkn)))
    }
    let y = match (bf16, x) {
        (Some(kernel), CpuStorage::F32(_)) => {
            let bias = bias.map(|(b, bl)| slice::<f32>(b, bl)).transpose()?;
            let packed = PackedWeight::from_rows(slice(w, wl)?, n, k, kernel);
            let epi = Epilogue {
                bias,
                ..Epilogue::default()
            };
            CpuStorage::F32(packed.matmul(slice(x, xl)?, m, &epi))
        }
        _ => by_float!(x, run((x, xl), (w, wl), bias, (m, k, n))),
    };
    Ok((y, Shape::from((m, n))))
}

/// ∂x (when x is part of the graph) and ∂W (to the sink, when one is set).
fn input_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    bf16: Option<Kernel>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if let Some(kernel) = bf16.filter(|_| g.dtype() == candle_core::DType::F32) {
        return bf16_input_grads(x, w, g, kernel);
    }
    let dx = if x.track_op() {
        Some(g.matmul(w)?)
    } else {
        None
    };
    Ok((dx, set_aside(w, g.t()?.matmul(x)?)?))
}

/// [`input_grads`] on a bf16 kernel: ∂x = g W with W packed as the product's right side
/// ([n, k] is "Wᵀ" of a layer from n inputs to k outputs), ∂W = gᵀ x with x packed so.
fn bf16_input_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    kernel: Kernel,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let ((m, k), n) = (x.dims2()?, w.dim(0)?);
    let dx = if x.track_op() {
        let dx = with_f32s([g, w], [], |[g, w], []| {
            PackedWeight::from_transposed(w, n, k, kernel).matmul(g, m, &Epilogue::default())
        })?;
        Some(Tensor::from_vec(dx, (m, k), x.device())?)
    } else {
        None
    };
    let dw = with_f32s([g, x], [], |[g, x], []| {
        let mut gt = vec![0f32; m * n];
        transpose_into(g, (m, n), &mut gt);
        PackedWeight::from_transposed(x, m, k, kernel).matmul(&gt, n, &Epilogue::default())
    })?;
    Ok((dx, set_aside(w, Tensor::from_vec(dw, (n, k), x.device())?)?))
}

/// y = x Wᵀ (+ b), differentiable; on a bf16 kernel when one is given (f32 only).
struct LinearWt {
    bf16: Option<Kernel>,
}

impl CustomOp2 for LinearWt {
    fn name(&self) -> &'static str {
        "linear-wt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward((s1, l1), (s2, l2), None, self.bf16)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        input_grads(x, w, &g.contiguous()?, self.bf16)
    }
}

impl CustomOp3 for LinearWt {
    fn name(&self) -> &'static str {
        "linear-wt-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward((s1, l1), (s2, l2), Some((s3, l3)), self.bf16)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw) = input_grads(x, w, &g, self.bf16)?;
        let db = g.apply_op1_no_bwd(&ColumnSum(b.elem_count()))?;
        Ok((dx, dw, Some(db)))
    }
}

/// x Wᵀ ([m, n], row-major) for x [m, k] and W [n, k]. gemm reads Wᵀ through its transposed
/// view at full speed when k is short, but not when k is long (ViT-B/32's fc2, k = 3072, was
/// measured far slower through the view than on a contiguous Wᵀ). So a long-k W is first
/// transposed, in parallel, into a scratch buffer kept per thread (a fresh buffer would cost
/// as much again in page faults).
fn product<T: Num>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<T> {
    let mut y = Vec::with_capacity(m * n);
    // With a bias, gemm adds the product to rows that start as the bias.
    if let Some(b) = bias {
        (0..m).for_each(|_| y.extend_from_slice(b));
    }
    let read_dst = bias.is_some();
    let dst = y.as_mut_ptr();
    // SAFETY: x is [m, k] and W [n, k] (checked by the caller), rhs addresses k × n elements of
    // W or of the transposed scratch, and dst has capacity for the m × n elements gemm writes.
    let run = |rhs: *const T, rhs_cs: isize, rhs_rs: isize| unsafe {
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            x.as_ptr(),
            1,
            k as isize,
            rhs,
            rhs_cs,
            rhs_rs,
            if read_dst { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    };
    if k >= 2 * n && m >= MIN_ROWS_TO_TRANSPOSE {
        T::with_scratch(k * n, |wt| {
            transpose_into(w, (n, k), wt);
            run(wt.as_ptr(), 1, n as isize)
        });
    } else {
        // Wᵀ's element (i, j) is W's (j, i).
        run(w.as_ptr(), k as isize, 1);
    }
    // SAFETY: the bias filled all m × n elements, or gemm wrote them all (read_dst = false).
    unsafe { y.set_len(m * n) };
    y
}

/// `out` ([cols, rows]) = `src` ([rows, cols])ᵀ, in tiles; each task writes whole output rows.
fn transpose_into<T: Num>(src: &[T], (rows, cols): (usize, usize), out: &mut [T]) {
    const TILE: usize = 16;
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(t, block)| {
            let c0 = t * TILE;
            let c1 = (c0 + TILE).min(cols);
            for r in 0..rows {
                for (dc, &v) in src[r * cols + c0..r * cols + c1].iter().enumerate() {
                    block[dc * rows + r] = v;
                }
            }
        });
}

/// Where a variable weight's gradient goes while [`backward_with_weight_sink`] runs, instead of
/// candle's gradient store.
pub trait WeightGradSink {
    /// Takes ∂L/∂W of weight `w`, or hands it back (Some) for candle's store.
    fn take(&mut self, w: &Tensor, dw: Tensor) -> Result<Option<Tensor>>;
}

thread_local! {
    /// The sink [`backward_with_weight_sink`] has set for this thread.
    static SINK: RefCell<Option<Rc<RefCell<dyn WeightGradSink>>>> = const { RefCell::new(None) };
}

/// Gives ∂L/∂W to the thread's sink when W is a variable and a sink is set; else returns it
/// for candle's store.
fn set_aside(w: &Tensor, dw: Tensor) -> Result<Option<Tensor>> {
    if !w.is_variable() {
        return Ok(Some(dw));
    }
    let Some(sink) = SINK.with(|s| s.borrow().clone()) else {
        return Ok(Some(dw));
    };
    // Busy only for a nested call (a rayon worker that picked up another task while it
    // waited): the store takes that gradient.
    let Ok(mut sink) = sink.try_borrow_mut() else {
        return Ok(Some(dw));
    };
    sink.take(w, dw)
}

/// `loss.backward()`, with the gradients of the variables that [`matmul_wt`] takes as weights
/// given to `sink` as the backward produces them. candle's store zero-fills a weight-sized
/// gradient and adds each contribution into it: two more weight-sized allocations and passes per
/// weight (a ViT-B/32 tower's weights are 88M values); a sink gets the product alone, and can
/// use it while it is still in cache and drop it.
pub fn backward_with_weight_sink(
    loss: &Tensor,
    sink: Rc<RefCell<dyn WeightGradSink>>,
) -> Result<GradStore> {
    /// Unsets the sink however the backward pass ends.
    struct Collecting;
    impl Drop for Collecting {
        fn drop(&mut self) {
            SINK.with(|s| s.borrow_mut().take());
        }
    }
    SINK.with(|s| s.borrow_mut().replace(sink));
    let _collecting = Collecting;
    loss.backward()
}

#[cfg(test)]
mod speed {
    //! `cargo test --release -p atlas-clip --lib fused_grad::linear::speed -- --ignored
    //! --nocapture`: gemm's rate on the learning step's products (ViT-B/32 at batch 8, 400
    //! rows), forward x Wᵀ and backward g W and gᵀ x through candle's matmul, and the forward as
    //! the step calls it.
    use candle_core::{Device, Tensor};
    use std::time::Instant;

    #[test]
    #[ignore]
    fn gemm_on_the_learning_shapes() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (400, 768, 2304),
            (400, 768, 3072),
            (400, 3072, 768),
            (400, 768, 768),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (m, n), &dev).unwrap();
            let rate = |f: &dyn Fn() -> Tensor| {
                f();
                let t = Instant::now();
                for _ in 0..10 {
                    std::hint::black_box(f());
                }
                2.0 * (m * k * n) as f64 / (t.elapsed().as_secs_f64() / 10.0) / 1e9
            };
            rayon::scope(|_| {
                let fwd = rate(&|| x.matmul(&w.t().unwrap()).unwrap());
                let (xs, ws) = (
                    x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let prod = rate(&|| {
                    let y = super::product(&xs, &ws, None, (m, k, n));
                    Tensor::from_vec(y, (m, n), &dev).unwrap()
                });
                eprintln!("  the step's product (W transposed first where k ≥ 2n) {prod:.0}");
                let dx = rate(&|| g.matmul(&w).unwrap());
                let dw = rate(&|| g.t().unwrap().matmul(&x).unwrap());
                eprintln!("{m}×{k}×{n}: x Wᵀ {fwd:.0}, g W {dx:.0}, gᵀ x {dw:.0} GFLOP/s");
            });
        }
    }
}
