//! The layers of both towers: linear (with fused epilogues), LayerNorm, the q/k/v projections,
//! the pre-LN encoder layer with its attention, and loading a stack of them.

use super::bf16_gemm::{Epilogue, Kernel, PackedWeight, RowSource};
use super::fused::layer_norm_row;
use super::ops::{activate, layer_norm, repeat_rows, softmax_last};
use super::{attention, fused, fused_grad, WeightSource};
use crate::config::Activation;
use crate::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use std::sync::Arc;

/// y = x Wᵀ + b over the last dimension of a 2-D or 3-D input.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    pub(super) w: Weight,
    b: Option<Tensor>,
}

/// A linear layer's weight, in the form its matmul reads.
#[derive(Debug, Clone)]
pub(super) enum Weight {
    /// W ([out, in]) as given: a graph leaf when learning, and the GPU's copy (cuBLAS reads the
    /// transposed view as it is).
    Plain(Tensor),
    /// Wᵀ contiguous ([in, out]) for CPU inference: gemm repacks a transposed view on every
    /// call, which made B/32's matmuls 1.5–6.5× slower at batch 1.
    Transposed(Tensor),
    /// W in bf16, packed once for the CPU's bf16 kernels (`bf16_gemm`).
    Packed(Arc<PackedWeight>),
    /// W ([out, in]) a graph leaf on the CPU whose products run on a bf16 kernel, as PyTorch's
    /// bf16 autocast runs them: packed afresh in each forward and backward, since a learned
    /// weight changes every step.
    Autocast(Tensor, Kernel),
}

impl Weight {
    /// Wᵀ ([in, out]) for CPU inference in f32 or f16, each row followed by 16 unused values
    /// (the tensor is a view of the first `out`), so f32 rows are an odd number of cache lines
    /// apart: B/32's widths (768, 2304, 3072: 48, 144, 192 lines) put all rows in one or four
    /// groups of L1 sets, and the few-rows product keeps 64 rows of a group in L1 while x
    /// passes over them (B/32 fc1 at 50 rows on two Xeon cores, from memory, with the next
    /// chunk's loads of `small_gemm::rows_times`: 1.30 against 1.03–1.07 ms).
    fn transposed(wt: &Tensor) -> Result<Self> {
        let (k, n) = wt.dims2()?;
        let pad = Tensor::zeros((k, 16), wt.dtype(), wt.device())?;
        let padded = Tensor::cat(&[&wt.contiguous()?, &pad], 1)?;
        Ok(Weight::Transposed(padded.narrow(1, 0, n)?))
    }
}

impl Linear {
    pub(super) fn load(
        src: &dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = src.get(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(src.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Linear::new(w, b)
    }

    /// A layer over W ([out, in]), kept transposed for inference on the CPU.
    pub(super) fn new(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        let w = if fused::usable(&[&w]) && w.device().is_cpu() {
            Weight::Transposed(w.t()?.contiguous()?)
        } else {
            Weight::Plain(w)
        };
        Ok(Linear { w, b })
    }

    /// The layer with W packed for `src`'s bf16 kernel when it names one and the layer runs
    /// CPU inference in f32, or autocast to it when W is an f32 graph leaf on the CPU; Wᵀ for
    /// CPU inference is padded (`Weight::transposed`) when it is not packed; unchanged
    /// otherwise.
    pub(super) fn packed_for(self, src: &dyn WeightSource) -> Result<Self> {
        if let (Weight::Plain(w), Some(kernel)) = (&self.w, src.bf16_kernel()) {
            if w.track_op() && w.dtype() == DType::F32 && fused_grad::usable(&[w]) {
                return Ok(Linear {
                    w: Weight::Autocast(w.clone(), kernel),
                    b: self.b,
                });
            }
        }
        let Weight::Transposed(wt) = &self.w else {
            return Ok(self);
        };
        let Some(kernel) = src.bf16_kernel().filter(|_| wt.dtype() == DType::F32) else {
            // Padded only here, once the layer is known to stay unpacked: padding every Wᵀ at
            // load, packed or not, left B/32 bf16 at batch 1 2.7 % slower (ten alternating
            // rounds, eight slower) with no bf16 code changed.
            return Ok(Linear {
                w: Weight::transposed(wt)?,
                b: self.b,
            });
        };
        let (k, n) = wt.dims2()?;
        let packed = with_f32s([wt], [], |[wt], []| {
            PackedWeight::from_transposed(wt, k, n, kernel)
        })?;
        Ok(Linear {
            w: Weight::Packed(Arc::new(packed)),
            b: self.b,
        })
    }

    /// norm(x) Wᵀ + b; with packed weights the norm is applied while rounding x (its f32
    /// output is never written).
    fn forward_normed(&self, x: &Tensor, norm: &Norm) -> Result<Tensor> {
        let Weight::Packed(p) = &self.w else {
            return self.forward(&norm.forward(x)?);
        };
        let mut out = x.dims().to_vec();
        *out.last_mut().expect("non-empty") = p.out_dim();
        let rows = x.elem_count() / p.in_dim();
        let y = with_f32s(
            [x, &norm.w, &norm.b],
            [self.b.as_ref()],
            |[x, nw, nb], [bias]| {
                let a = p.round_with(x, rows, Some(&norm.row_fn(nw, nb)));
                let epi = Epilogue {
                    bias,
                    ..Epilogue::default()
                };
                p.matmul_rounded(&a, &epi)
            },
        )?;
        Ok(Tensor::from_vec(y, out, x.device())?)
    }

    /// Whether the layer takes the CPU inference path (transposed or packed weights).
    pub(super) fn cpu_inference(&self) -> bool {
        !matches!(self.w, Weight::Plain(_) | Weight::Autocast(..))
    }

    /// W when it is a graph leaf, with the bf16 kernel its products autocast to.
    fn leaf(&self) -> Option<(&Tensor, Option<Kernel>)> {
        match &self.w {
            Weight::Plain(w) => Some((w, None)),
            Weight::Autocast(w, kernel) => Some((w, Some(*kernel))),
            _ => None,
        }
    }

    /// The dtype inputs are given in.
    pub(super) fn input_dtype(&self) -> DType {
        match &self.w {
            Weight::Plain(w) | Weight::Transposed(w) | Weight::Autocast(w, _) => w.dtype(),
            Weight::Packed(_) => DType::F32,
        }
    }

    fn out_dim(&self) -> Result<usize> {
        Ok(match &self.w {
            Weight::Plain(w) | Weight::Autocast(w, _) => w.dim(0)?,
            Weight::Transposed(w) => w.dim(1)?,
            Weight::Packed(p) => p.out_dim(),
        })
    }

    /// x2 ([rows, in]) Wᵀ, without the bias.
    fn product(&self, x2: &Tensor) -> Result<Tensor> {
        if let Some((w, kernel)) = self.leaf() {
            if w.track_op() && fused_grad::usable(&[x2, w]) {
                return Ok(fused_grad::matmul_wt(x2, w, kernel)?);
            }
        }
        Ok(match &self.w {
            Weight::Plain(w) | Weight::Autocast(w, _) => x2.matmul(&w.t()?)?,
            Weight::Transposed(wt) => match few_rows_product(x2, wt)? {
                Some(y) => y,
                None => x2.matmul(wt)?,
            },
            Weight::Packed(p) => self.packed_apply(p, x2, None, None)?,
        })
    }

    /// act(x2 Wᵀ + b) + residual on the packed weights, the epilogue fused into the matmul.
    fn packed_apply(
        &self,
        p: &PackedWeight,
        x2: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rows = x2.dim(0)?;
        let y = with_f32s(
            [x2],
            [self.b.as_ref(), residual],
            |[x], [bias, residual]| {
                let epi = Epilogue {
                    bias,
                    act,
                    residual,
                };
                p.matmul(x, rows, &epi)
            },
        )?;
        Ok(Tensor::from_vec(y, (rows, p.out_dim()), x2.device())?)
    }
}

impl Linear {
    /// x Wᵀ + b for the m rows that `row` writes, when W is packed for a bf16 kernel (None
    /// otherwise): each row is rounded as it is written, with no f32 copy of the input.
    pub(super) fn packed_rows(
        &self,
        m: usize,
        row: &RowSource<'_>,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let Weight::Packed(p) = &self.w else {
            return Ok(None);
        };
        let y = with_f32s([], [self.b.as_ref()], |[], [bias]| {
            let epi = Epilogue {
                bias,
                ..Epilogue::default()
            };
            p.matmul_rounded(&p.round_from(m, row), &epi)
        })?;
        Ok(Some(Tensor::from_vec(y, (m, p.out_dim()), dev)?))
    }

    pub(super) fn is_packed(&self) -> bool {
        matches!(self.w, Weight::Packed(_))
    }

    /// x Wᵀ + b.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None, None)
    }

    /// act(x Wᵀ + b) + residual over the last dimension of a 2-D or 3-D input; the epilogue is
    /// one fused pass when no graph is recorded.
    fn apply(
        &self,
        x: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut out = x.dims().to_vec();
        let last = out[out.len() - 1];
        let x2 = x.reshape(((), last))?;
        *out.last_mut().expect("non-empty") = self.out_dim()?;
        if let (Some((w, kernel)), Some(b), None, None) = (self.leaf(), &self.b, act, residual) {
            if w.track_op() && fused_grad::usable(&[&x2, w, b]) {
                return Ok(fused_grad::matmul_wt_bias(&x2, w, b, kernel)?.reshape(out)?);
            }
        }
        let residual = match residual {
            Some(r) => Some(r.reshape((x2.dim(0)?, self.out_dim()?))?),
            None => None,
        };
        if let Weight::Packed(p) = &self.w {
            return Ok(self
                .packed_apply(p, &x2, act, residual.as_ref())?
                .reshape(out)?);
        }
        let y = self.product(&x2)?;
        let fusable = |b: &Tensor| {
            fused::usable(&[&y, b]) && residual.as_ref().is_none_or(|r| fused::usable(&[r]))
        };
        let grad_fusable = |b: &Tensor| {
            fused_grad::usable(&[&y, b])
                && residual.as_ref().is_none_or(|r| fused_grad::usable(&[r]))
        };
        let y = match (&self.b, &residual) {
            (Some(b), Some(r)) if act.is_none() && fusable(b) => {
                fused::bias_residual(y, b, &r.contiguous()?)?
            }
            (Some(b), _) if fusable(b) => {
                let y = fused::bias_act(y, b, act)?;
                match &residual {
                    Some(r) => (y + r)?,
                    None => y,
                }
            }
            (Some(b), Some(r)) if act.is_none() && grad_fusable(b) => {
                y.apply_op3(b, &r.contiguous()?, fused_grad::BiasResidual)?
            }
            (Some(b), _) if fused_grad::has_grad_epilogue(act) && grad_fusable(b) => {
                let y = y.apply_op2(b, fused_grad::BiasAct(act))?;
                match &residual {
                    Some(r) => (y + r)?,
                    None => y,
                }
            }
            _ => {
                let mut y = match &self.b {
                    Some(b) => repeat_rows(&y, b, false)?,
                    None => y,
                };
                if let Some(a) = act {
                    y = activate(&y, a)?;
                }
                match &residual {
                    Some(r) => (r + y)?,
                    None => y,
                }
            }
        };
        Ok(y.reshape(out)?)
    }
}

/// Rows up to which an f32 CPU product x Wᵀ runs on `small_gemm` instead of gemm, which packs
/// all of Wᵀ on every call: a few rows (batch 1) cannot pay for that.
const FEW_ROWS: usize = 128;

/// x2 ([m, k]) Wᵀ from wt ([k, n], rows contiguous, any row stride) on `small_gemm` when x2
/// has at most `FEW_ROWS` rows, both are f32 on a CPU with AVX-512F, outside any graph, and n
/// is a multiple of 16; None otherwise.
#[cfg(target_arch = "x86_64")]
fn few_rows_product(x2: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), n) = (x2.dims2()?, wt.dim(1)?);
    let fits = m <= FEW_ROWS
        && x2.device().is_cpu()
        && n.is_multiple_of(16)
        && fused::usable(&[x2, wt])
        && x2.dtype() == DType::F32
        && wt.dtype() == DType::F32
        && super::small_gemm::usable();
    if !fits {
        return Ok(None);
    }
    let (storage, layout) = wt.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(w)), &[ld, 1]) = (&*storage, layout.stride()) else {
        return Ok(None);
    };
    let w = &w[layout.start_offset()..];
    let y = with_f32s([x2], [], |[x], []| {
        super::small_gemm::rows_times(x, w, ld, (m, k, n))
    })?;
    Ok(Some(Tensor::from_vec(y, (m, n), x2.device())?))
}

#[cfg(not(target_arch = "x86_64"))]
fn few_rows_product(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
    Ok(None)
}

/// f(the contiguous f32 data of each tensor given, and of each optional one given), for the
/// packed matmuls that read candle's storage in place (no copy when a tensor is already
/// contiguous f32 on the CPU).
pub(super) fn with_f32s<const N: usize, const M: usize, R>(
    given: [&Tensor; N],
    optional: [Option<&Tensor>; M],
    f: impl FnOnce([&[f32]; N], [Option<&[f32]>; M]) -> R,
) -> candle_core::Result<R> {
    let all = given.into_iter().map(Some).chain(optional);
    let owned = all
        .map(|t| t.map(|t| t.to_dtype(DType::F32)?.contiguous()).transpose())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned
        .iter()
        .map(|t| t.as_ref().map(Tensor::storage_and_layout))
        .collect();
    let mut slices = Vec::with_capacity(N + M);
    for g in &guards {
        slices.push(match g {
            Some((s, l)) => match (&**s, l.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
                _ => {
                    let e = "packed matmul: expected f32 on the CPU";
                    return Err(candle_core::Error::Msg(e.into()));
                }
            },
            None => None,
        });
    }
    let given = std::array::from_fn(|i| slices[i].expect("given"));
    Ok(f(given, std::array::from_fn(|i| slices[N + i])))
}

#[derive(Debug, Clone)]
pub(super) struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    pub(super) fn load(src: &dyn WeightSource, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Norm {
            w: src.get(&format!("{name}.weight"), &[d])?,
            b: src.get(&format!("{name}.bias"), &[d])?,
            eps,
        })
    }
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.w, &self.b, self.eps)
    }

    /// The norm as a row transform over its weight and bias as f32 (from `with_f32s`), for
    /// the packed matmuls that apply it while rounding their input.
    fn row_fn<'a>(&self, w: &'a [f32], b: &'a [f32]) -> impl Fn(&[f32], &mut [f32]) + Sync + 'a {
        let eps = self.eps as f32;
        move |s, d| layer_norm_row(s, w, b, eps, d)
    }
}

/// The q/k/v projections: separate (differentiable, as loaded), or one matmul over the
/// stacked weights with the 1/√head_dim scale folded into q (inference only).
#[derive(Debug, Clone)]
pub(super) enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Stacked(Linear),
}

impl Qkv {
    /// Stacks the projections when none of their weights is part of a graph.
    fn new(q: Linear, k: Linear, v: Linear, scale: f64) -> Result<Self> {
        let (Some(qb), Some(kb), Some(vb)) = (&q.b, &k.b, &v.b) else {
            return Ok(Qkv::Separate { q, k, v });
        };
        let plain = |ts: [&Tensor; 3]| ts.iter().all(|t| fused::usable(&[t]));
        // Wᵀ blocks side by side ([in, 3·out]), or W blocks stacked ([3·out, in]).
        let (ws, dim) = match (&q.w, &k.w, &v.w) {
            (Weight::Transposed(a), Weight::Transposed(b), Weight::Transposed(c)) => ([a, b, c], 1),
            (Weight::Plain(a), Weight::Plain(b), Weight::Plain(c)) if plain([a, b, c]) => {
                ([a, b, c], 0)
            }
            _ => return Ok(Qkv::Separate { q, k, v }),
        };
        if !plain([qb, kb, vb]) {
            return Ok(Qkv::Separate { q, k, v });
        }
        let w = Tensor::cat(&[&(ws[0] * scale)?, ws[1], ws[2]], dim)?;
        let b = Tensor::cat(&[&(qb * scale)?, kb, vb], 0)?;
        let w = if dim == 1 {
            Weight::Transposed(w)
        } else {
            Weight::Plain(w)
        };
        Ok(Qkv::Stacked(Linear { w, b: Some(b) }))
    }

    /// The projections, packed as `Linear::packed_for` packs.
    fn packed_for(self, src: &dyn WeightSource) -> Result<Self> {
        Ok(match self {
            Qkv::Stacked(l) => Qkv::Stacked(l.packed_for(src)?),
            Qkv::Separate { q, k, v } => Qkv::Separate {
                q: q.packed_for(src)?,
                k: k.packed_for(src)?,
                v: v.packed_for(src)?,
            },
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct EncoderLayer {
    pub(super) qkv: Qkv,
    out: Linear,
    ln1: Norm,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    fn load(
        src: &dyn WeightSource,
        p: &str,
        d: usize,
        m: usize,
        heads: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        let load = |n: &str, o, i| Linear::load(src, &format!("{p}.{n}"), o, i, true);
        let lin = |n: &str, o, i| load(n, o, i)?.packed_for(src);
        let scale = ((d / heads) as f64).powf(-0.5);
        Ok(EncoderLayer {
            qkv: Qkv::new(
                load("self_attn.q_proj", d, d)?,
                load("self_attn.k_proj", d, d)?,
                load("self_attn.v_proj", d, d)?,
                scale,
            )?
            .packed_for(src)?,
            out: lin("self_attn.out_proj", d, d)?,
            ln1: Norm::load(src, &format!("{p}.layer_norm1"), d, eps)?,
            ln2: Norm::load(src, &format!("{p}.layer_norm2"), d, eps)?,
            fc1: lin("mlp.fc1", m, d)?,
            fc2: lin("mlp.fc2", d, m)?,
            heads,
            act,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_rows(x, mask, false)
    }

    /// With `first_only`, only token 0's output ([B, 1, D]) is computed; keys and values still
    /// come from every token. The image tower pools its class token alone, so its last layer
    /// skips the other tokens' queries, output projection and MLP (B/32: 6.6 % of the
    /// multiply-adds).
    pub(super) fn forward_rows(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        first_only: bool,
    ) -> Result<Tensor> {
        let h = self.attention(x, mask, first_only)?;
        if let Some(y) = self.packed_mlp(&h)? {
            return Ok(y);
        }
        let a = self
            .fc1
            .apply(&self.ln2.forward(&h)?, Some(self.act), None)?;
        self.fc2.apply(&a, None, Some(&h))
    }

    /// As `forward`, unfused, handing each linear layer's input to `record` first, by the
    /// names of the weights that read it (`{prefix}.self_attn.q_proj.weight`, …; q, k and v
    /// share one input). RegMean's statistics; slower than `forward`.
    pub(super) fn forward_recording(
        &self,
        x: &Tensor,
        prefix: &str,
        record: &mut super::vision::Recorder,
    ) -> Result<Tensor> {
        let names = |ns: &[&str]| -> Vec<String> {
            ns.iter().map(|n| format!("{prefix}.{n}.weight")).collect()
        };
        let (b, n, d) = x.dims3()?;
        let xn = self.ln1.forward(x)?;
        record(
            &names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            &xn,
        )?;
        let hd = d / self.heads;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                let q = (q.forward(&xn)? * (hd as f64).powf(-0.5))?;
                (q, k.forward(&xn)?, v.forward(&xn)?)
            }
            // The scale is folded into the stacked q.
            Qkv::Stacked(l) => {
                let t = l.forward(&xn)?;
                (
                    t.narrow(2, 0, d)?,
                    t.narrow(2, d, d)?,
                    t.narrow(2, 2 * d, d)?,
                )
            }
        };
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let ctx = softmax_last(&scores)?.matmul(&v)?;
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, n, d))?;
        record(&names(&["self_attn.out_proj"]), &ctx)?;
        let h = self.out.apply(&ctx, None, Some(x))?;
        let hn = self.ln2.forward(&h)?;
        record(&names(&["mlp.fc1"]), &hn)?;
        let a = self.fc1.apply(&hn, Some(self.act), None)?;
        record(&names(&["mlp.fc2"]), &a)?;
        self.fc2.apply(&a, None, Some(&h))
    }

    /// h + fc2(act(fc1(ln2(h)))) when fc1 and fc2 are packed for one kernel: ln2 is applied
    /// while rounding fc1's input, and fc1's output is handed to fc2 already rounded in its
    /// input layout (half the bytes, and no rounding pass).
    fn packed_mlp(&self, h: &Tensor) -> Result<Option<Tensor>> {
        let (Weight::Packed(p1), Weight::Packed(p2)) = (&self.fc1.w, &self.fc2.w) else {
            return Ok(None);
        };
        if p1.kernel() != p2.kernel() {
            return Ok(None);
        }
        let rows = h.elem_count() / p1.in_dim();
        let (ln, b1, b2) = (&self.ln2, self.fc1.b.as_ref(), self.fc2.b.as_ref());
        let y = with_f32s([h, &ln.w, &ln.b], [b1, b2], |[res, nw, nb], [b1, b2]| {
            let first = Epilogue {
                bias: b1,
                act: Some(self.act),
                residual: None,
            };
            let second = Epilogue {
                bias: b2,
                act: None,
                residual: Some(res),
            };
            let x = p1.round_with(res, rows, Some(&ln.row_fn(nw, nb)));
            let mid = p1.matmul_for(&x, &first, p2);
            p2.matmul_rounded(&mid, &second)
        })?;
        let y = Tensor::from_vec(y, h.shape(), h.device())?;
        Ok(Some(y))
    }

    /// residual + the fused CPU attention over q ([B, rows, D]), k and v, when it can run.
    fn fused_cpu_attention(
        &self,
        [q, k, v]: [&Tensor; 3],
        scale: f64,
        mask: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Option<Tensor>> {
        if mask.is_some() || !fused_grad::attention::usable(q, k, v, self.heads) {
            return Ok(None);
        }
        let ctx = fused_grad::attention::attention(q, k, v, self.heads, scale)?;
        let residual = residual.narrow(1, 0, q.dim(1)?)?;
        Ok(Some(self.out.apply(&ctx, None, Some(&residual))?))
    }

    /// x + attention(ln1(x)), for token 0 alone when `first_only`.
    fn attention(&self, x: &Tensor, mask: Option<&Tensor>, first_only: bool) -> Result<Tensor> {
        let residual = x;
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let rows = if first_only { 1 } else { n };
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                let x = &self.ln1.forward(x)?;
                let q = q.forward(&x.narrow(1, 0, rows)?)?;
                let (k, v) = (k.forward(x)?, v.forward(x)?);
                let scale = (hd as f64).powf(-0.5);
                if let Some(y) = self.fused_cpu_attention([&q, &k, &v], scale, mask, residual)? {
                    return Ok(y);
                }
                let q = split((q * scale)?, rows)?;
                let k = split(k, n)?.t()?.contiguous()?;
                (q, k, split(v, n)?)
            }
            Qkv::Stacked(qkv) => {
                let t = qkv.forward_normed(x, &self.ln1)?;
                // On a GPU, one kernel from [B, N, 3·D] straight to [B, N, D].
                if !first_only && attention::usable(&t, self.heads, mask) {
                    let ctx = attention::attention(&t, self.heads, mask)?;
                    return self.out.apply(&ctx, None, Some(residual));
                }
                // On the CPU (f32), the fused op over q, k, v cut from t (the scale is in q).
                let q = t.narrow(1, 0, rows)?.narrow(2, 0, d)?;
                let (k, v) = (t.narrow(2, d, d)?, t.narrow(2, 2 * d, d)?);
                if let Some(y) = self.fused_cpu_attention([&q, &k, &v], 1.0, mask, residual)? {
                    return Ok(y);
                }
                // [B, N, 3·D] -> [3, B, H, N, hd] in one copy; k is used transposed in place.
                let t = t
                    .reshape((b, n, 3, self.heads, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                let q = t.get(0)?;
                let q = if first_only {
                    q.narrow(2, 0, 1)?.contiguous()?
                } else {
                    q
                };
                (q, t.get(1)?.t()?, t.get(2)?)
            }
        };
        let mut scores = q.matmul(&k)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(&mask.narrow(mask.rank() - 2, 0, rows)?)?;
        }
        let ctx = softmax_last(&scores)?.matmul(&v)?;
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, rows, d))?;
        let residual = residual.narrow(1, 0, rows)?;
        self.out.apply(&ctx, None, Some(&residual))
    }
}

/// The sizes an encoder layer is built with.
#[derive(Clone, Copy)]
pub(super) struct LayerDims {
    pub(super) d: usize,
    pub(super) m: usize,
    pub(super) heads: usize,
    pub(super) act: Activation,
    pub(super) eps: f64,
}

pub(super) fn load_layers(
    src: &dyn WeightSource,
    prefix: impl Fn(usize) -> String,
    n: usize,
    dims: &LayerDims,
) -> Result<Vec<EncoderLayer>> {
    let LayerDims {
        d,
        m,
        heads,
        act,
        eps,
    } = *dims;
    (0..n)
        .map(|i| EncoderLayer::load(src, &prefix(i), d, m, heads, act, eps))
        .collect()
}

#[cfg(test)]
mod tests {
    //! The fused inference kernels against the primitive-op path they replace. A `Var` input
    //! records a graph, which forces the primitive path on the same values.
    use super::*;
    use crate::model::test_values::{max_diff, rand, tracked};

    #[test]
    fn fused_epilogues_match_primitive_ops() {
        let x = rand(&[2, 5, 16], 0.0, 5);
        let lin = Linear::new(rand(&[24, 16], 0.0, 6), Some(rand(&[24], 0.0, 7))).unwrap();
        // Kept f32 (no bf16 kernel named): Wᵀ padded for the few-rows product.
        let lin = lin
            .packed_for(&std::collections::HashMap::<String, Tensor>::new())
            .unwrap();
        assert!(matches!(&lin.w, Weight::Transposed(wt) if wt.stride() == [24 + 16, 1]));
        let r = rand(&[2, 5, 24], 0.0, 8);
        for act in [None, Some(Activation::QuickGelu), Some(Activation::Gelu)] {
            for res in [None, Some(&r)] {
                let fast = lin.apply(&x, act, res).unwrap();
                let slow = lin.apply(&tracked(&x), act, res).unwrap();
                assert!(!fast.track_op() && slow.track_op());
                let d = max_diff(&fast, &slow);
                assert!(d < 1e-5, "{act:?} residual {}: {d}", res.is_some());
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod few_rows {
    //! The few-rows product (`small_gemm::rows_times`) against gemm's.
    use super::*;
    use crate::model::test_values::{max_diff, rand};

    /// Row counts at and around one register block and the limit, inner sizes across the
    /// k-steps (300 leaves a remainder), widths of one and several column groups.
    #[test]
    fn the_few_rows_product_matches_gemm() {
        for (m, k, n) in [
            (1, 16, 16),
            (5, 300, 80),
            (50, 768, 144),
            (FEW_ROWS, 130, 64),
        ] {
            let x = rand(&[m, k], 0.0, 1);
            let wt = (rand(&[k, n], 0.0, 2) * 0.1).unwrap();
            let Weight::Transposed(padded) = Weight::transposed(&wt).unwrap() else {
                panic!("not transposed");
            };
            assert_eq!(padded.stride(), [n + 16, 1]);
            for w in [&wt, &padded] {
                let fast = few_rows_product(&x, w).unwrap();
                if !crate::model::small_gemm::usable() {
                    assert!(fast.is_none());
                    continue;
                }
                let d = max_diff(&fast.expect("few rows"), &x.matmul(&wt).unwrap());
                assert!(d < 1e-4, "{m}×{k}×{n}, row stride {}: {d}", w.stride()[0]);
            }
        }
        let (x, wt) = (rand(&[FEW_ROWS + 1, 8], 0.0, 3), rand(&[8, 16], 0.0, 4));
        assert!(
            few_rows_product(&x, &wt).unwrap().is_none(),
            "too many rows"
        );
        let (x, wt) = (rand(&[4, 8], 0.0, 3), rand(&[8, 20], 0.0, 4));
        assert!(
            few_rows_product(&x, &wt).unwrap().is_none(),
            "width not a multiple of 16"
        );
    }
}

#[cfg(test)]
mod speed {
    //! `BATCH=32 cargo test --release -p atlas-clip --lib layers::speed -- --ignored
    //! --nocapture`: where a B/32 encoder layer's time goes, f32 and packed bf16.
    use super::*;
    use crate::model::bf16_gemm;
    use crate::model::test_values::rand;
    use std::collections::HashMap;
    use std::time::Instant;

    fn time(label: &str, f: impl Fn() -> Tensor) {
        f();
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        eprintln!(
            "{label:>10}: {:7.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        );
    }

    #[test]
    #[ignore]
    fn b32_layer_at_batch_32() {
        let (d, m, h) = (768, 3072, 12);
        let p = "l";
        let mut w = HashMap::new();
        for (n, o, i) in [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", d, d),
            ("self_attn.v_proj", d, d),
            ("self_attn.out_proj", d, d),
            ("mlp.fc1", m, d),
            ("mlp.fc2", d, m),
        ] {
            w.insert(
                format!("{p}.{n}.weight"),
                (rand(&[o, i], 0.0, 1) * 0.02).unwrap(),
            );
            w.insert(
                format!("{p}.{n}.bias"),
                (rand(&[o], 0.0, 2) * 0.02).unwrap(),
            );
        }
        for n in ["layer_norm1", "layer_norm2"] {
            w.insert(format!("{p}.{n}.weight"), rand(&[d], 1.0, 3));
            w.insert(format!("{p}.{n}.bias"), rand(&[d], 0.0, 4));
        }
        let batch = std::env::var("BATCH").map_or(32, |b| b.parse().unwrap());
        let x = rand(&[batch, 50, d], 0.0, 5);
        let kernels = bf16_gemm::available();
        let packed = kernels
            .first()
            .map(|&k| crate::model::Bf16Matmuls(&w, Some(k)));
        let srcs: Vec<(&str, &dyn WeightSource)> = match &packed {
            Some(pk) => vec![("f32", &w), ("bf16", pk)],
            None => vec![("f32", &w)],
        };
        for (name, src) in srcs {
            eprintln!("-- {name}");
            let l = EncoderLayer::load(src, p, d, m, h, Activation::QuickGelu, 1e-5).unwrap();
            let a = l.ln1.forward(&x).unwrap();
            time("ln1", || l.ln1.forward(&x).unwrap());
            let Qkv::Stacked(qkv) = &l.qkv else { panic!() };
            let t = qkv.forward(&a).unwrap();
            time("qkv", || qkv.forward(&a).unwrap());
            time("ln1+qkv", || qkv.forward_normed(&x, &l.ln1).unwrap());
            let q = t.narrow(2, 0, d).unwrap();
            let (k, v) = (t.narrow(2, d, d).unwrap(), t.narrow(2, 2 * d, d).unwrap());
            let ctx = fused_grad::attention::attention(&q, &k, &v, h, 1.0).unwrap();
            time("attention", || {
                fused_grad::attention::attention(&q, &k, &v, h, 1.0).unwrap()
            });
            time("q copy", || q.contiguous().unwrap());
            let hres = l.out.apply(&ctx, None, Some(&x)).unwrap();
            time("out", || l.out.apply(&ctx, None, Some(&x)).unwrap());
            let a2 = l.ln2.forward(&hres).unwrap();
            time("ln2", || l.ln2.forward(&hres).unwrap());
            let f = l.fc1.apply(&a2, Some(l.act), None).unwrap();
            time("fc1", || l.fc1.apply(&a2, None, None).unwrap());
            time("fc1+gelu", || l.fc1.apply(&a2, Some(l.act), None).unwrap());
            time("fc2", || l.fc2.apply(&f, None, Some(&hres)).unwrap());
            time("ln2+mlp", || {
                l.packed_mlp(&hres).unwrap().unwrap_or(hres.clone())
            });
            time("layer", || l.forward(&x, None).unwrap());
            time("last layer", || l.forward_rows(&x, None, true).unwrap());
        }
    }
}
