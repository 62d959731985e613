//! The CPU backend: the numerical reference. Generic over the float type so the same code runs in
//! f32 (training, CI, the demo) and in f64 (finite-difference gradient checks). Big products go
//! through the `gemm` crate (candle's CPU matmul engine); everything else is plain loops over rows,
//! parallel with rayon where rows are independent.

use rayon::prelude::*;

use super::{
    AdamW, AdamwTensor, AttnShape, Backend, DType, DeviceInfo, HostWeight, KvShape, LinearDims, LoraBwd, LoraFwd, LoraRows, LossSum,
    RmsNorm, WeightPlace, dropout_uniform,
};
use crate::error::{Error, Result};

/// The float type of a CPU backend.
pub trait Real: num_traits::Float + num_traits::FromPrimitive + Send + Sync + Default + std::fmt::Debug + 'static {
    const NAME: &'static str;
    fn of(x: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(x).expect("finite")
    }
    fn f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
}
impl Real for f32 {
    const NAME: &'static str = "f32";
}
impl Real for f64 {
    const NAME: &'static str = "f64";
}

#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor<T>(pub Vec<T>);

pub struct CpuWeight<T> {
    pub out_features: usize,
    pub in_features: usize,
    pub w: Vec<T>,
    pub bias: Option<Vec<T>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend<T> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _t: std::marker::PhantomData }
    }
}

fn check_len<T>(op: &'static str, what: &str, v: &[T], need: usize) -> Result<()> {
    if v.len() < need {
        return Err(Error::Shape { op, expected: format!("{what} with at least {need} elements"), got: v.len().to_string() });
    }
    Ok(())
}

/// `c[m, n] = (accumulate ? c : 0) + alpha · op(a) · op(b)`, all row-major. `a` is `[m, k]`
/// (or `[k, m]` when `a_t`), `b` is `[k, n]` (or `[n, k]` when `b_t`).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(m: usize, n: usize, k: usize, a: &[T], a_t: bool, b: &[T], b_t: bool, c: &mut [T], alpha: T, accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul operands too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|x| *x = T::zero());
        }
        return;
    }
    let (a_rs, a_cs) = if a_t { (1isize, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1isize, k as isize) } else { (n as isize, 1) };
    let threads = rayon::current_num_threads();
    let par = if m * n * k > 32 * 32 * 32 && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee every index the strides can reach lies inside the
    // slices; `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// GELU's tanh approximation and its derivative: `0.5·x·(1 + t)` with `t = tanh(k·(x + c·x³))`,
/// `k = √(2/π)`, `c = 0.044715`; the slope is `0.5·(1 + t) + 0.5·x·(1 − t²)·k·(1 + 3c·x²)`.
fn gelu_tanh<T: Real>(x: T) -> (T, T) {
    let (half, one) = (T::of(0.5), T::one());
    let k = T::of((2.0 / std::f64::consts::PI).sqrt());
    let c = T::of(0.044715);
    let t = (k * (x + c * x * x * x)).tanh();
    let value = half * x * (one + t);
    let slope = half * (one + t) + half * x * (one - t * t) * k * (one + T::of(3.0) * c * x * x);
    (value, slope)
}

/// What the attention loops rely on: whole GQA groups and a window that keeps at least the
/// query's own key.
fn check_attention(op: &'static str, s: AttnShape) -> Result<()> {
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) || s.window == Some(0) {
        return Err(Error::Shape {
            op,
            expected: "heads a multiple of kv_heads and a sliding window of at least 1".into(),
            got: format!("{} heads, {} kv heads, window {:?}", s.heads, s.kv_heads, s.window),
        });
    }
    Ok(())
}

impl<T: Real> CpuBackend<T> {
    fn rows_mut(x: &mut [T], n: usize, d: usize) -> impl IndexedParallelIterator<Item = (usize, &mut [T])> {
        x[..n * d].par_chunks_mut(d.max(1)).enumerate()
    }
}

impl<T: Real> Backend for CpuBackend<T> {
    type Tensor = CpuTensor<T>;
    type Weight = CpuWeight<T>;
    type Ids = Vec<i32>;
    /// The CPU's arena is the heap: each planned buffer is a vector of its own.
    type Block = ();

    fn device(&self) -> DeviceInfo {
        DeviceInfo {
            kind: "cpu".into(),
            name: format!("CPU ({}, {} threads)", T::NAME, rayon::current_num_threads()),
            ..Default::default()
        }
    }

    fn alloc_block(&self, _bytes: usize, _host: bool) -> Result<Self::Block> {
        Ok(())
    }

    fn tensor_in(&self, _block: &Self::Block, _offset: usize, len: usize, dtype: DType) -> Result<Self::Tensor> {
        self.alloc(len, dtype)
    }

    fn ids_in(&self, _block: &Self::Block, _offset: usize, len: usize) -> Result<Self::Ids> {
        self.alloc_ids(len)
    }

    /// Every weight is kept dequantized in the float type already: no copy to place.
    fn weight_in(&self, _block: &Self::Block, _place: WeightPlace, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight> {
        self.upload_weight(w, bias)
    }

    fn alloc(&self, len: usize, _dtype: DType) -> Result<Self::Tensor> {
        Ok(CpuTensor(vec![T::zero(); len]))
    }

    fn upload(&self, data: &[f32], _dtype: DType) -> Result<Self::Tensor> {
        Ok(CpuTensor(data.iter().map(|&x| T::of(x as f64)).collect()))
    }

    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>> {
        Ok(t.0.iter().map(|x| x.f64() as f32).collect())
    }

    fn write(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()> {
        check_len("write", "destination", &t.0, data.len())?;
        t.0.iter_mut().zip(data).for_each(|(d, &s)| *d = T::of(s as f64));
        Ok(())
    }

    fn fill(&self, t: &mut Self::Tensor, value: f32) -> Result<()> {
        let v = T::of(value as f64);
        t.0.iter_mut().for_each(|x| *x = v);
        Ok(())
    }

    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()> {
        check_len("copy", "source", &src.0, n)?;
        check_len("copy", "destination", &dst.0, n)?;
        dst.0[..n].copy_from_slice(&src.0[..n]);
        Ok(())
    }

    fn copy_range(&self, src: &Self::Tensor, src_off: usize, dst: &mut Self::Tensor, dst_off: usize, n: usize) -> Result<()> {
        check_len("copy_range", "source", &src.0, src_off + n)?;
        check_len("copy_range", "destination", &dst.0, dst_off + n)?;
        dst.0[dst_off..dst_off + n].copy_from_slice(&src.0[src_off..src_off + n]);
        Ok(())
    }

    fn alloc_ids(&self, len: usize) -> Result<Self::Ids> {
        Ok(vec![0; len])
    }

    fn write_ids(&self, ids: &mut Self::Ids, data: &[i32]) -> Result<()> {
        check_len("write_ids", "ids", ids, data.len())?;
        ids[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn upload_weight(&self, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight> {
        let (out_features, in_features) = w.shape();
        let data: Vec<T> = match w {
            HostWeight::Dense { data, .. } => data.iter().map(|&x| T::of(x as f64)).collect(),
            HostWeight::Nf4(q) => q.dequantize_f32().into_iter().map(|x| T::of(x as f64)).collect(),
        };
        if data.len() != out_features * in_features {
            return Err(Error::Shape {
                op: "upload_weight",
                expected: format!("{out_features}x{in_features}"),
                got: data.len().to_string(),
            });
        }
        if let Some(b) = bias
            && b.len() != out_features
        {
            return Err(Error::Shape { op: "upload_weight bias", expected: out_features.to_string(), got: b.len().to_string() });
        }
        Ok(CpuWeight { out_features, in_features, w: data, bias: bias.map(|b| b.iter().map(|&x| T::of(x as f64)).collect()) })
    }

    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor, n: usize) -> Result<()> {
        check_len("add", "x", &x.0, n)?;
        check_len("add", "y", &y.0, n)?;
        x.0[..n].par_iter_mut().zip(&y.0[..n]).for_each(|(a, &b)| *a = *a + b);
        Ok(())
    }

    fn dropout(&self, x: &Self::Tensor, out: &mut Self::Tensor, n: usize, p: f32, key: u64, first: u64) -> Result<()> {
        let keep = T::of(1.0 / (1.0 - p as f64));
        out.0[..n].par_iter_mut().zip(&x.0[..n]).enumerate().for_each(|(i, (o, &v))| {
            *o = if dropout_uniform(key, first + i as u64) >= p { v * keep } else { T::zero() };
        });
        Ok(())
    }

    fn dropout_bwd(
        &self,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
        n: usize,
        p: f32,
        key: u64,
        first: u64,
        accumulate: bool,
    ) -> Result<()> {
        let keep = T::of(1.0 / (1.0 - p as f64));
        dx.0[..n].par_iter_mut().zip(&dy.0[..n]).enumerate().for_each(|(i, (o, &g))| {
            let v = if dropout_uniform(key, first + i as u64) >= p { g * keep } else { T::zero() };
            *o = if accumulate { *o + v } else { v };
        });
        Ok(())
    }

    fn embedding_fwd(&self, ids: &Self::Ids, table: &Self::Tensor, n: usize, d: usize, out: &mut Self::Tensor) -> Result<()> {
        let vocab = table.0.len() / d;
        check_len("embedding_fwd", "ids", ids, n)?;
        check_len("embedding_fwd", "out", &out.0, n * d)?;
        if let Some(bad) = ids[..n].iter().find(|&&i| i < 0 || i as usize >= vocab) {
            return Err(Error::vocab(*bad, vocab, "embedding"));
        }
        Self::rows_mut(&mut out.0, n, d).for_each(|(r, row)| {
            let id = ids[r] as usize;
            row.copy_from_slice(&table.0[id * d..(id + 1) * d]);
        });
        Ok(())
    }

    fn rmsnorm_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        n: usize,
        d: usize,
        out: &mut Self::Tensor,
        inv_rms: &mut Self::Tensor,
    ) -> Result<()> {
        check_len("rmsnorm_fwd", "x", &x.0, n * d)?;
        check_len("rmsnorm_fwd", "w", &w.0, d)?;
        check_len("rmsnorm_fwd", "inv_rms", &inv_rms.0, n)?;
        // The mean square is accumulated in f64: in f32 it overflows to inf once |x| nears 1e19
        // (a diverging run's residual stream), 1/√inf = 0, and the layer's output and every
        // gradient through it became exact zeros: a dead run that looked finite. In f64 the
        // squares of any finite f32 fit, and RMSNorm's output stays what it is, x/rms(x).
        let eps = norm.eps as f64;
        let w: Vec<T> = w.0[..d].iter().map(|&v| v + T::of(norm.weight_offset as f64)).collect();
        out.0[..n * d].par_chunks_mut(d).zip(inv_rms.0[..n].par_iter_mut()).enumerate().for_each(|(r, (o, inv))| {
            let xr = &x.0[r * d..(r + 1) * d];
            let ms = xr.iter().fold(0f64, |a, &v| a + v.f64() * v.f64()) / d as f64;
            let s = T::of(1.0 / (ms + eps).sqrt());
            *inv = s;
            for i in 0..d {
                o[i] = w[i] * (xr[i] * s);
            }
        });
        Ok(())
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        inv_rms: &Self::Tensor,
        n: usize,
        d: usize,
        dx: &mut Self::Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_len("rmsnorm_bwd", "dx", &dx.0, n * d)?;
        check_len("rmsnorm_bwd", "w", &w.0, d)?;
        let w: Vec<T> = w.0[..d].iter().map(|&v| v + T::of(norm.weight_offset as f64)).collect();
        // In f64 for the reason given in `rmsnorm_fwd`: s³ and the dot product leave f32's range
        // exactly when the inputs are large.
        Self::rows_mut(&mut dx.0, n, d).for_each(|(r, o)| {
            let xr = &x.0[r * d..(r + 1) * d];
            let g = &dy.0[r * d..(r + 1) * d];
            let s = inv_rms.0[r].f64();
            let dot = (0..d).fold(0f64, |a, i| a + g[i].f64() * w[i].f64() * xr[i].f64());
            let c = s * s * s * dot / d as f64;
            for i in 0..d {
                let v = T::of(s * w[i].f64() * g[i].f64() - c * xr[i].f64());
                o[i] = if accumulate { o[i] + v } else { v };
            }
        });
        Ok(())
    }

    fn linear_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraFwd<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()> {
        let LinearDims { n, inp, out } = dims;
        if w.in_features != inp || w.out_features != out {
            return Err(Error::Shape {
                op: "linear_fwd",
                expected: format!("{out}x{inp}"),
                got: format!("{}x{}", w.out_features, w.in_features),
            });
        }
        check_len("linear_fwd", "x", &x.0, n * inp)?;
        check_len("linear_fwd", "y", &y.0, n * out)?;
        matmul(n, out, inp, &x.0, false, &w.w, true, &mut y.0, T::one(), false);
        if let Some(b) = &w.bias {
            Self::rows_mut(&mut y.0, n, out).for_each(|(_, row)| row.iter_mut().zip(b).for_each(|(v, &bb)| *v = *v + bb));
        }
        if let Some(l) = lora {
            let r = l.rank;
            check_len("linear_fwd", "lora xa", &l.xa.0, n * r)?;
            matmul(n, r, inp, &l.x_lora.0, false, &l.a.0, true, &mut l.xa.0, T::one(), false);
            matmul(n, out, r, &l.xa.0, false, &l.b.0, true, &mut y.0, T::of(l.scale as f64), true);
        }
        Ok(())
    }

    fn linear_bwd(
        &self,
        dy: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraBwd<'_, Self::Tensor>>,
        dims: LinearDims,
        dx: &mut Self::Tensor,
        accumulate: bool,
        dx_lora: Option<&mut Self::Tensor>,
    ) -> Result<()> {
        let LinearDims { n, inp, out } = dims;
        check_len("linear_bwd", "dy", &dy.0, n * out)?;
        check_len("linear_bwd", "dx", &dx.0, n * inp)?;
        matmul(n, inp, out, &dy.0, false, &w.w, false, &mut dx.0, T::one(), accumulate);
        if let Some(l) = lora {
            let r = l.rank;
            let s = T::of(l.scale as f64);
            check_len("linear_bwd", "lora scratch", &l.scratch.0, n * r)?;
            // t = dy · B  ([n, r])
            matmul(n, r, out, &dy.0, false, &l.b.0, false, &mut l.scratch.0, T::one(), false);
            // dB += s · dyᵀ · xa ; dA += s · tᵀ · x_lora
            matmul(out, r, n, &dy.0, true, &l.xa.0, false, &mut l.grad_b.0, s, true);
            matmul(r, inp, n, &l.scratch.0, true, &l.x_lora.0, false, &mut l.grad_a.0, s, true);
            match dx_lora {
                Some(dxl) => matmul(n, inp, r, &l.scratch.0, false, &l.a.0, false, &mut dxl.0, s, false),
                None => matmul(n, inp, r, &l.scratch.0, false, &l.a.0, false, &mut dx.0, s, true),
            }
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Self::Tensor,
        n: usize,
        heads: usize,
        head_dim: usize,
        positions: &Self::Ids,
        table: &Self::Tensor,
        inverse: bool,
    ) -> Result<()> {
        let half = head_dim / 2;
        let max_pos = table.0.len() / (2 * half);
        let (cos, sin) = table.0.split_at(max_pos * half);
        if let Some(p) = positions[..n].iter().find(|&&p| p < 0 || p as usize >= max_pos) {
            return Err(Error::bug("rope", format!("position {p} is beyond the rotary table ({max_pos} positions)")));
        }
        let width = heads * head_dim;
        Self::rows_mut(&mut x.0, n, width).for_each(|(r, row)| {
            let p = positions[r] as usize;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for h in 0..heads {
                let v = &mut row[h * head_dim..(h + 1) * head_dim];
                for i in 0..half {
                    let (x1, x2) = (v[i], v[i + half]);
                    let sn = if inverse { -s[i] } else { s[i] };
                    v[i] = x1 * c[i] - x2 * sn;
                    v[i + half] = x2 * c[i] + x1 * sn;
                }
            }
        });
        Ok(())
    }

    fn attention_fwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
    ) -> Result<()> {
        let AttnShape { batch, seq, heads, kv_heads, head_dim: hd, .. } = shape;
        check_attention("attention_fwd", shape)?;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let group = heads / kv_heads;
        let scale = T::of(shape.scale());
        check_len("attention_fwd", "out", &out.0, batch * seq * qw)?;
        let results: Vec<(Vec<T>, Vec<T>)> = (0..batch * heads)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / heads, bh % heads);
                let kh = h / group;
                let mut o = vec![T::zero(); seq * hd];
                let mut l = vec![T::zero(); seq];
                let mut scores = vec![T::zero(); seq];
                for i in 0..seq {
                    let qi = &q.0[(b * seq + i) * qw + h * hd..][..hd];
                    let seg = segments[b * seq + i];
                    let mut m = T::neg_infinity();
                    let first = shape.first_key(i);
                    for j in first..=i {
                        if segments[b * seq + j] != seg {
                            scores[j] = T::neg_infinity();
                            continue;
                        }
                        let kj = &k.0[(b * seq + j) * kw + kh * hd..][..hd];
                        let s = (0..hd).fold(T::zero(), |a, t| a + qi[t] * kj[t]) * scale;
                        scores[j] = s;
                        m = m.max(s);
                    }
                    let mut sum = T::zero();
                    let oi = &mut o[i * hd..(i + 1) * hd];
                    for (j, &score) in scores.iter().enumerate().take(i + 1).skip(first) {
                        if score == T::neg_infinity() {
                            continue;
                        }
                        let p = (score - m).exp();
                        sum = sum + p;
                        let vj = &v.0[(b * seq + j) * kw + kh * hd..][..hd];
                        for t in 0..hd {
                            oi[t] = oi[t] + p * vj[t];
                        }
                    }
                    oi.iter_mut().for_each(|x| *x = *x / sum);
                    l[i] = m + sum.ln();
                }
                (o, l)
            })
            .collect();
        for (bh, (o, l)) in results.into_iter().enumerate() {
            let (b, h) = (bh / heads, bh % heads);
            for i in 0..seq {
                out.0[(b * seq + i) * qw + h * hd..][..hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
                lse.0[(b * seq + i) * heads + h] = l[i];
            }
        }
        Ok(())
    }

    fn attention_bwd(
        &self,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
    ) -> Result<()> {
        let AttnShape { batch, seq, heads, kv_heads, head_dim: hd, .. } = shape;
        check_attention("attention_bwd", shape)?;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let group = heads / kv_heads;
        let scale = T::of(shape.scale());
        // One task per (batch, kv head) owns that head's dK/dV and its group's dQ: no races.
        let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..batch * kv_heads)
            .into_par_iter()
            .map(|bk| {
                let (b, kh) = (bk / kv_heads, bk % kv_heads);
                let mut gq = vec![T::zero(); group * seq * hd];
                let mut gk = vec![T::zero(); seq * hd];
                let mut gv = vec![T::zero(); seq * hd];
                for g in 0..group {
                    let h = kh * group + g;
                    for i in 0..seq {
                        let row = b * seq + i;
                        let qi = &q.0[row * qw + h * hd..][..hd];
                        let doi = &dout.0[row * qw + h * hd..][..hd];
                        let oi = &out.0[row * qw + h * hd..][..hd];
                        let di = (0..hd).fold(T::zero(), |a, t| a + doi[t] * oi[t]);
                        let li = lse.0[row * heads + h];
                        let seg = segments[row];
                        for j in shape.first_key(i)..=i {
                            if segments[b * seq + j] != seg {
                                continue;
                            }
                            let kj = &k.0[(b * seq + j) * kw + kh * hd..][..hd];
                            let vj = &v.0[(b * seq + j) * kw + kh * hd..][..hd];
                            let s = (0..hd).fold(T::zero(), |a, t| a + qi[t] * kj[t]) * scale;
                            let p = (s - li).exp();
                            let dp = (0..hd).fold(T::zero(), |a, t| a + doi[t] * vj[t]);
                            let ds = p * (dp - di) * scale;
                            let gqi = &mut gq[(g * seq + i) * hd..][..hd];
                            for t in 0..hd {
                                gqi[t] = gqi[t] + ds * kj[t];
                                gk[j * hd + t] = gk[j * hd + t] + ds * qi[t];
                                gv[j * hd + t] = gv[j * hd + t] + p * doi[t];
                            }
                        }
                    }
                }
                (gq, gk, gv)
            })
            .collect();
        for (bk, (gq, gk, gv)) in results.into_iter().enumerate() {
            let (b, kh) = (bk / kv_heads, bk % kv_heads);
            for i in 0..seq {
                let row = b * seq + i;
                for g in 0..group {
                    let h = kh * group + g;
                    dq.0[row * qw + h * hd..][..hd].copy_from_slice(&gq[(g * seq + i) * hd..][..hd]);
                }
                dk.0[row * kw + kh * hd..][..hd].copy_from_slice(&gk[i * hd..][..hd]);
                dv.0[row * kw + kh * hd..][..hd].copy_from_slice(&gv[i * hd..][..hd]);
            }
        }
        Ok(())
    }

    fn swiglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()> {
        check_len("swiglu_fwd", "out", &out.0, n)?;
        out.0[..n].par_iter_mut().enumerate().for_each(|(i, o)| {
            let x = g.0[i];
            let sig = T::one() / (T::one() + (-x).exp());
            *o = x * sig * u.0[i];
        });
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()> {
        check_len("swiglu_bwd", "dg", &dg.0, n)?;
        check_len("swiglu_bwd", "du", &du.0, n)?;
        dg.0[..n].par_iter_mut().zip(du.0[..n].par_iter_mut()).enumerate().for_each(|(i, (dgi, dui))| {
            let x = g.0[i];
            let sig = T::one() / (T::one() + (-x).exp());
            let silu = x * sig;
            *dui = dout.0[i] * silu;
            *dgi = dout.0[i] * u.0[i] * sig * (T::one() + x * (T::one() - sig));
        });
        Ok(())
    }

    fn geglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()> {
        check_len("geglu_fwd", "out", &out.0, n)?;
        out.0[..n].par_iter_mut().enumerate().for_each(|(i, o)| *o = gelu_tanh(g.0[i]).0 * u.0[i]);
        Ok(())
    }

    fn geglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()> {
        check_len("geglu_bwd", "dg", &dg.0, n)?;
        check_len("geglu_bwd", "du", &du.0, n)?;
        dg.0[..n].par_iter_mut().zip(du.0[..n].par_iter_mut()).enumerate().for_each(|(i, (dgi, dui))| {
            let (gelu, slope) = gelu_tanh(g.0[i]);
            *dui = dout.0[i] * gelu;
            *dgi = dout.0[i] * u.0[i] * slope;
        });
        Ok(())
    }

    fn scale(&self, x: &mut Self::Tensor, n: usize, alpha: f32) -> Result<()> {
        check_len("scale", "x", &x.0, n)?;
        let a = T::of(alpha as f64);
        x.0[..n].par_iter_mut().for_each(|v| *v = *v * a);
        Ok(())
    }

    fn embedding_bwd_rows(
        &self,
        dx: &Self::Tensor,
        ids: &Self::Ids,
        n: usize,
        d: usize,
        slot_of_token: &Self::Ids,
        grad_rows: &mut Self::Tensor,
    ) -> Result<()> {
        for (r, &id) in ids.iter().enumerate().take(n) {
            let slot = slot_of_token.get(id as usize).copied().unwrap_or(-1);
            if slot >= 0 {
                let g = &mut grad_rows.0[slot as usize * d..][..d];
                g.iter_mut().zip(&dx.0[r * d..(r + 1) * d]).for_each(|(a, &b)| *a = *a + b);
            }
        }
        Ok(())
    }

    fn set_rows(&self, table: &mut Self::Tensor, d: usize, token_ids: &Self::Ids, values: &Self::Tensor, k: usize) -> Result<()> {
        for (s, &id) in token_ids.iter().enumerate().take(k) {
            let id = id as usize;
            check_len("set_rows", "table", &table.0, (id + 1) * d)?;
            table.0[id * d..(id + 1) * d].copy_from_slice(&values.0[s * d..(s + 1) * d]);
        }
        Ok(())
    }

    fn lm_head_ce(
        &self,
        h: &Self::Tensor,
        head: &Self::Tensor,
        targets: &Self::Ids,
        n: usize,
        d: usize,
        vocab: usize,
        grad_scale: f32,
        dh: &mut Self::Tensor,
        head_rows: Option<(&Self::Ids, &mut Self::Tensor)>,
    ) -> Result<LossSum> {
        check_len("lm_head_ce", "head", &head.0, vocab * d)?;
        check_len("lm_head_ce", "dh", &dh.0, n * d)?;
        if let Some(t) = targets[..n].iter().find(|&&t| t >= vocab as i32) {
            return Err(Error::vocab(*t, vocab, "a target token"));
        }
        // Rows per chunk: 64, fewer for a large vocabulary so a chunk's logits stay at about
        // 4M values (16 rows of Gemma 3's 262K) whatever the vocabulary.
        let chunk_rows = ((4usize << 20) / vocab.max(1)).clamp(1, 64);
        let gs = T::of(grad_scale as f64);
        let row_ids: Vec<usize> = head_rows.as_ref().map(|(ids, _)| ids.iter().map(|&i| i as usize).collect()).unwrap_or_default();
        let k = row_ids.len();
        let parts: Vec<(f64, usize, Vec<T>)> = dh.0[..n * d]
            .par_chunks_mut(chunk_rows * d)
            .enumerate()
            .map(|(c, dh_chunk)| {
                let r0 = c * chunk_rows;
                let rows = dh_chunk.len() / d;
                let mut logits = vec![T::zero(); rows * vocab];
                matmul(rows, vocab, d, &h.0[r0 * d..], false, &head.0, true, &mut logits, T::one(), false);
                let mut sum = 0.0f64;
                let mut count = 0usize;
                for r in 0..rows {
                    let lr = &mut logits[r * vocab..(r + 1) * vocab];
                    let t = targets[r0 + r];
                    if t < 0 {
                        lr.iter_mut().for_each(|x| *x = T::zero());
                        continue;
                    }
                    let m = lr.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                    let z = lr.iter().fold(T::zero(), |a, &b| a + (b - m).exp());
                    let lse = m + z.ln();
                    sum += (lse - lr[t as usize]).f64();
                    count += 1;
                    lr.iter_mut().for_each(|x| *x = (*x - lse).exp() * gs);
                    lr[t as usize] = lr[t as usize] - gs;
                }
                matmul(rows, d, vocab, &logits, false, &head.0, false, dh_chunk, T::one(), false);
                // Gradient of the trainable head rows from this chunk, summed in chunk order below.
                let mut g = vec![T::zero(); k * d];
                for (s, &id) in row_ids.iter().enumerate() {
                    for r in 0..rows {
                        let dl = logits[r * vocab + id];
                        if dl != T::zero() {
                            let hr = &h.0[(r0 + r) * d..(r0 + r + 1) * d];
                            g[s * d..(s + 1) * d].iter_mut().zip(hr).for_each(|(a, &b)| *a = *a + dl * b);
                        }
                    }
                }
                (sum, count, g)
            })
            .collect();
        if let Some((_, grad)) = head_rows {
            for (_, _, g) in &parts {
                grad.0[..k * d].iter_mut().zip(g).for_each(|(a, &b)| *a = *a + b);
            }
        }
        Ok(parts.into_iter().fold(LossSum::default(), |a, (s, c, _)| LossSum { sum: a.sum + s, count: a.count + c }))
    }

    fn sum_squares(&self, tensors: &[(&Self::Tensor, usize)]) -> Result<f64> {
        let mut total = 0.0;
        for &(t, n) in tensors {
            check_len("sum_squares", "tensor", &t.0, n)?;
            // Fixed chunks summed in order: the result must not depend on how rayon splits the
            // work, or a resumed run would clip gradients by a different last bit.
            let parts: Vec<f64> = t.0[..n].par_chunks(4096).map(|c| c.iter().map(|&x| x.f64() * x.f64()).sum()).collect();
            total += parts.into_iter().sum::<f64>();
        }
        Ok(total)
    }

    fn adamw(&self, tensors: &mut [AdamwTensor<'_, Self::Tensor>], hp: AdamW) -> Result<()> {
        let f = |x: f32| T::of(x as f64);
        let (lr, b1, b2, eps, wd, gs) = (f(hp.lr), f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.weight_decay), f(hp.grad_scale));
        let t = hp.step as i32;
        let bc1 = T::one() - b1.powi(t);
        let bc2_sqrt = (T::one() - b2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for x in tensors.iter_mut() {
            let n = x.n;
            check_len("adamw", "param", &x.param.0, n)?;
            check_len("adamw", "grad", &x.grad.0, n)?;
            check_len("adamw", "m", &x.m.0, n)?;
            check_len("adamw", "v", &x.v.0, n)?;
            let grad = &x.grad.0;
            x.param.0[..n].par_iter_mut().zip(x.m.0[..n].par_iter_mut()).zip(x.v.0[..n].par_iter_mut()).enumerate().for_each(
                |(i, ((p, mi), vi))| {
                    let g = grad[i] * gs;
                    *p = *p * (T::one() - lr * wd);
                    *mi = b1 * *mi + (T::one() - b1) * g;
                    *vi = b2 * *vi + (T::one() - b2) * g * g;
                    let denom = vi.sqrt() / bc2_sqrt + eps;
                    *p = *p - step_size * *mi / denom;
                },
            );
            if let Some(c) = x.compute.as_deref_mut() {
                self.cast(x.param, c, n)?;
            }
        }
        Ok(())
    }

    // ---- generation --------------------------------------------------------------------------
    fn linear_rows(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraRows<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()> {
        self.linear_fwd(x, w, None, dims, y)?;
        let Some(l) = lora else { return Ok(()) };
        let LinearDims { n, inp, out } = dims;
        let r = l.rank;
        check_len("linear_rows", "lora xa", &l.xa.0, n * r)?;
        check_len("linear_rows", "lora row_scale", &l.row_scale.0, n)?;
        matmul(n, r, inp, &x.0, false, &l.a.0, true, &mut l.xa.0, T::one(), false);
        for (row, &s) in l.xa.0[..n * r].chunks_mut(r.max(1)).zip(&l.row_scale.0[..n]) {
            row.iter_mut().for_each(|v| *v = *v * s);
        }
        matmul(n, out, r, &l.xa.0, false, &l.b.0, true, &mut y.0, T::one(), true);
        Ok(())
    }

    fn kv_store(
        &self,
        src: &Self::Tensor,
        n: usize,
        kv: KvShape,
        slots: &Self::Ids,
        positions: &Self::Ids,
        cache: &mut Self::Tensor,
    ) -> Result<()> {
        let w = kv.kv_width();
        check_len("kv_store", "src", &src.0, n * w)?;
        let rows = cache.0.len() / w.max(1);
        for r in 0..n {
            let dst = cache_row("kv_store", slots[r], positions[r], kv.capacity, rows)?;
            cache.0[dst * w..(dst + 1) * w].copy_from_slice(&src.0[r * w..(r + 1) * w]);
        }
        Ok(())
    }

    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        slots: &Self::Ids,
        positions: &Self::Ids,
        n: usize,
        kv: KvShape,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let KvShape { heads, kv_heads, head_dim: hd, capacity, scale, window } = kv;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let group = heads / kv_heads.max(1);
        check_len("attention_cached", "q", &q.0, n * qw)?;
        check_len("attention_cached", "out", &out.0, n * qw)?;
        let rows = k_cache.0.len() / kw.max(1);
        let mut first = Vec::with_capacity(n);
        for r in 0..n {
            let last = cache_row("attention_cached", slots[r], positions[r], capacity, rows)?;
            let pos = positions[r] as usize;
            let from = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            first.push((last - pos + from, last));
        }
        let scale = T::of(scale as f64);
        Self::rows_mut(&mut out.0, n, qw).for_each(|(r, o)| {
            let (j0, j1) = first[r];
            let mut scores = vec![T::zero(); j1 + 1 - j0];
            for h in 0..heads {
                let kh = h / group;
                let qi = &q.0[r * qw + h * hd..][..hd];
                let mut m = T::neg_infinity();
                for (s, j) in scores.iter_mut().zip(j0..=j1) {
                    let kj = &k_cache.0[j * kw + kh * hd..][..hd];
                    *s = (0..hd).fold(T::zero(), |a, t| a + qi[t] * kj[t]) * scale;
                    m = m.max(*s);
                }
                let oi = &mut o[h * hd..(h + 1) * hd];
                oi.iter_mut().for_each(|x| *x = T::zero());
                let mut sum = T::zero();
                for (&s, j) in scores.iter().zip(j0..=j1) {
                    let p = (s - m).exp();
                    sum = sum + p;
                    let vj = &v_cache.0[j * kw + kh * hd..][..hd];
                    oi.iter_mut().zip(vj).for_each(|(x, &v)| *x = *x + p * v);
                }
                oi.iter_mut().for_each(|x| *x = *x / sum);
            }
        });
        Ok(())
    }

    fn logits(&self, h: &Self::Tensor, head: &Self::Tensor, n: usize, d: usize, vocab: usize, out: &mut Self::Tensor) -> Result<()> {
        check_len("logits", "h", &h.0, n * d)?;
        check_len("logits", "head", &head.0, vocab * d)?;
        check_len("logits", "out", &out.0, n * vocab)?;
        matmul(n, vocab, d, &h.0, false, &head.0, true, &mut out.0, T::one(), false);
        Ok(())
    }
}

/// The cache row of (`slot`, `position`), checked against a cache of `rows` rows.
fn cache_row(op: &'static str, slot: i32, position: i32, capacity: usize, rows: usize) -> Result<usize> {
    if slot < 0 || position < 0 || position as usize >= capacity || (slot as usize + 1) * capacity > rows {
        return Err(Error::Shape {
            op,
            expected: format!("a slot below {} and a position below {capacity}", rows / capacity.max(1)),
            got: format!("slot {slot}, position {position}"),
        });
    }
    Ok(slot as usize * capacity + position as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18: a diverging run's residual stream reaches |x| ~ 1e20, whose squares overflow f32.
    /// RMSNorm must still return x / rms(x) (scale-free), not zeros, and its gradient must match
    /// the f64 reference at any scale.
    #[test]
    fn rmsnorm_is_exact_at_scales_whose_squares_overflow_f32() {
        let d = 8;
        let base: Vec<f64> = (0..d).map(|i| (i as f64 - 3.5) * 0.37).collect();
        let w: Vec<f64> = (0..d).map(|i| 1.0 + 0.1 * i as f64).collect();
        let dy: Vec<f64> = (0..d).map(|i| 0.5 - 0.2 * i as f64).collect();
        let run = |scale: f64| -> (Vec<f32>, Vec<f32>) {
            let b = CpuBackend::<f32>::new();
            let x = CpuTensor(base.iter().map(|v| (v * scale) as f32).collect());
            let wt = CpuTensor(w.iter().map(|&v| v as f32).collect());
            let (mut out, mut inv, mut dx) = (CpuTensor(vec![0f32; d]), CpuTensor(vec![0f32; 1]), CpuTensor(vec![0f32; d]));
            b.rmsnorm_fwd(&x, &wt, super::super::RmsNorm::plain(1e-5), 1, d, &mut out, &mut inv).unwrap();
            let g = CpuTensor(dy.iter().map(|&v| v as f32).collect());
            b.rmsnorm_bwd(&g, &x, &wt, super::super::RmsNorm::plain(1e-5), &inv, 1, d, &mut dx, false).unwrap();
            (out.0, dx.0.iter().map(|v| (*v as f64 * scale) as f32).collect())
        };
        let (y1, g1) = run(1.0);
        for scale in [1e20, 1e30, 1e36] {
            let (y, g) = run(scale);
            for i in 0..d {
                assert!((y[i] - y1[i]).abs() <= 1e-5 * y1[i].abs().max(1.0), "scale {scale}: y[{i}] = {} vs {}", y[i], y1[i]);
                // dx scales as 1/scale; scaled back it must match the unit-scale gradient.
                assert!((g[i] - g1[i]).abs() <= 1e-4 * g1[i].abs().max(1.0), "scale {scale}: dx[{i}]·scale = {} vs {}", g[i], g1[i]);
            }
        }
    }
}
