//! A Llama decoder written with candle-core ops so autograd gives the backward, used only to
//! pre-train the demo's base model. Every step mirrors `transformers`' `LlamaForCausalLM` (eager
//! attention) so that the saved weights mean the same function there and in our engine.

use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Error, Layout, Result, Shape, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub rope_theta: f32,
}

pub struct Layer {
    pub q: Var,
    pub k: Var,
    pub v: Var,
    pub o: Var,
    pub gate: Var,
    pub up: Var,
    pub down: Var,
    pub ln_attn: Var,
    pub ln_mlp: Var,
}

pub struct Llama {
    pub dims: Dims,
    pub embed: Var,
    pub layers: Vec<Layer>,
    pub norm: Var,
    pub lm_head: Var,
}

/// Normal(0, std) values from our seeded generator (candle's own `randn` is not seedable on CPU).
fn normal(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Result<Var> {
    let n = shape.0 * shape.1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        // Box-Muller: two uniforms give two independent normals.
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f32::consts::TAU * u2;
        v.push(r * t.cos() * std);
        v.push(r * t.sin() * std);
    }
    v.truncate(n);
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn ones(n: usize) -> Result<Var> {
    Var::ones(n, DType::F32, &Device::Cpu)
}

impl Llama {
    /// HF's init (normal 0.02, norms at one), with the residual output projections scaled down by
    /// √(2·layers) as GPT-2 does, which keeps a from-scratch run stable at a high learning rate.
    pub fn init(dims: Dims, rng: &mut ChaCha8Rng) -> Result<Self> {
        let (h, i, hd) = (dims.hidden, dims.inter, dims.head_dim);
        let std = 0.02;
        let out_std = std / (2.0 * dims.layers as f32).sqrt();
        let embed = normal(rng, (dims.vocab, h), std)?;
        let mut layers = Vec::new();
        for _ in 0..dims.layers {
            layers.push(Layer {
                q: normal(rng, (dims.heads * hd, h), std)?,
                k: normal(rng, (dims.kv_heads * hd, h), std)?,
                v: normal(rng, (dims.kv_heads * hd, h), std)?,
                o: normal(rng, (h, dims.heads * hd), out_std)?,
                gate: normal(rng, (i, h), std)?,
                up: normal(rng, (i, h), std)?,
                down: normal(rng, (h, i), out_std)?,
                ln_attn: ones(h)?,
                ln_mlp: ones(h)?,
            });
        }
        let norm = ones(h)?;
        let lm_head = normal(rng, (dims.vocab, h), std)?;
        Ok(Llama { dims, embed, layers, norm, lm_head })
    }

    /// Every parameter with its Hugging Face name, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (n, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{n}");
            v.extend([
                (format!("{p}.self_attn.q_proj.weight"), &l.q),
                (format!("{p}.self_attn.k_proj.weight"), &l.k),
                (format!("{p}.self_attn.v_proj.weight"), &l.v),
                (format!("{p}.self_attn.o_proj.weight"), &l.o),
                (format!("{p}.mlp.gate_proj.weight"), &l.gate),
                (format!("{p}.mlp.up_proj.weight"), &l.up),
                (format!("{p}.mlp.down_proj.weight"), &l.down),
                (format!("{p}.input_layernorm.weight"), &l.ln_attn),
                (format!("{p}.post_attention_layernorm.weight"), &l.ln_mlp),
            ]);
        }
        v.push(("model.norm.weight".to_string(), &self.norm));
        v.push(("lm_head.weight".to_string(), &self.lm_head));
        v
    }

    /// Build from name → f32 data (the weights read back from the saved file).
    pub fn from_named(dims: Dims, mut get: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>) -> Result<Self> {
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let model = Llama::init(dims, &mut rng)?;
        for (name, var) in model.named() {
            let shape = var.dims().to_vec();
            let data = get(&name, &shape)?;
            var.set(&Tensor::from_vec(data, shape, &Device::Cpu)?)?;
        }
        Ok(model)
    }

    /// Logits [batch, seq, vocab] for token ids [batch, seq], positions 0..seq.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let d = self.dims;
        let (b, t) = ids.dims2()?;
        let (cos, sin) = rope_tables(t, d.head_dim, d.rope_theta)?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, d.hidden))?;
        for l in &self.layers {
            // Attention block.
            let h = rms_norm(&x, &l.ln_attn, d.eps)?;
            let heads = |w: &Var, n: usize| -> Result<Tensor> { linear(&h, w)?.reshape((b, t, n, d.head_dim))?.transpose(1, 2) };
            let q = rope(&heads(&l.q, d.heads)?, &cos, &sin)?;
            let k = repeat_kv(&rope(&heads(&l.k, d.kv_heads)?, &cos, &sin)?, d.heads / d.kv_heads)?;
            let v = repeat_kv(&heads(&l.v, d.kv_heads)?, d.heads / d.kv_heads)?;
            let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * (1.0 / (d.head_dim as f64).sqrt()))?;
            let probs = scores.apply_op1(CausalSoftmax)?;
            let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d.heads * d.head_dim))?;
            x = (x + linear(&y, &l.o)?)?;
            // MLP block (SwiGLU).
            let h = rms_norm(&x, &l.ln_mlp, d.eps)?;
            let m = (linear(&h, &l.gate)?.silu()? * linear(&h, &l.up)?)?;
            x = (x + linear(&m, &l.down)?)?;
        }
        linear(&rms_norm(&x, &self.norm, d.eps)?, &self.lm_head)
    }
}

/// y = x Wᵀ for x [b, t, in] and an HF weight [out, in].
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, t, n) = x.dims3()?;
    let out = w.dim(0)?;
    x.reshape((b * t, n))?.matmul(&w.t()?)?.reshape((b, t, out))
}

/// HF LlamaRMSNorm: x · rsqrt(mean(x²) + eps) · w, all in f32 here.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// cos and sin [t, head_dim] of cat(freqs, freqs), inv_freq = 1/θ^(2i/d) computed in f32 like HF.
pub fn rope_tables(t: usize, head_dim: usize, theta: f32) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(t * head_dim);
    let mut sin = Vec::with_capacity(t * head_dim);
    for p in 0..t {
        for j in 0..head_dim {
            let angle = p as f32 * inv[j % half];
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let dev = Device::Cpu;
    Ok((Tensor::from_vec(cos, (t, head_dim), &dev)?, Tensor::from_vec(sin, (t, head_dim), &dev)?))
}

/// x·cos + rotate_half(x)·sin, rotate_half(x) = cat(−x₂, x₁) over the two halves of head_dim.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// [b, kv, t, d] → [b, kv·n, t, d] with query head h reading kv head h / n (HF `repeat_kv`).
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return x.contiguous();
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n, t, d))?.contiguous()?.reshape((b, kv * n, t, d))
}

/// Row-wise softmax of attention scores [.., t, t] where query i sees keys 0..=i: the same numbers
/// as adding a −∞ mask and taking a softmax, in one pass and with one backward instead of the
/// half-dozen elementwise nodes (each with its own gradient buffer) that composing it would cost.
struct CausalSoftmax;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| Error::Msg(format!("{op} needs a contiguous input")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let t = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        for (r, (xr, or)) in x.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
            let seen = r % t + 1;
            let m = xr[..seen].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (o, &v) in or[..seen].iter_mut().zip(&xr[..seen]) {
                *o = (v - m).exp();
                sum += *o;
            }
            or[..seen].iter_mut().for_each(|o| *o /= sum);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dS = P ⊙ (dP − Σⱼ dPⱼ Pⱼ); masked entries have P = 0 and so get no gradient.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let p = res.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let t = res.dim(D::Minus1)?;
        let mut out = vec![0f32; p.len()];
        for ((pr, gr), or) in p.chunks_exact(t).zip(g.chunks_exact(t)).zip(out.chunks_exact_mut(t)) {
            let dot: f32 = pr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &pv), &gv) in or.iter_mut().zip(pr).zip(gr) {
                *o = pv * (gv - dot);
            }
        }
        Ok(Some(Tensor::from_vec(out, res.shape(), res.device())?))
    }
}

/// Per-row cross-entropy −log softmax(logits)[target] for logits [n, vocab]; fused for the same
/// reason as `CausalSoftmax`, the logits being the largest tensor of the step.
struct SoftmaxCrossEntropy {
    targets: Vec<u32>,
}

/// (max, log Σ exp(x − max)) of one row.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = row.iter().map(|&v| (v - m).exp()).sum();
    (m, sum.ln())
}

impl CustomOp1 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (n, v) = l.shape().dims2()?;
        let out: Vec<f32> = x
            .chunks_exact(v)
            .zip(&self.targets)
            .map(|(row, &t)| {
                let (m, lse) = log_sum_exp(row);
                lse - (row[t as usize] - m)
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// d logits = (softmax − one_hot(target)) · the upstream gradient of the row's loss.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.to_vec1::<f32>()?;
        let v = arg.dim(1)?;
        let mut out = vec![0f32; x.len()];
        for (((row, or), &t), &gr) in x.chunks_exact(v).zip(out.chunks_exact_mut(v)).zip(&self.targets).zip(&g) {
            let (m, lse) = log_sum_exp(row);
            for (o, &xv) in or.iter_mut().zip(row) {
                *o = (xv - m - lse).exp() * gr;
            }
            or[t as usize] -= gr;
        }
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of logits [n, vocab] against targets [n] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_vec1::<u32>()?;
    logits.contiguous()?.apply_op1(SoftmaxCrossEntropy { targets })?.mean_all()
}

/// AdamW with decoupled weight decay on matrices only (norm weights are not decayed).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: i32,
    state: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[(String, &Var)]) -> Result<Self> {
        let state = params.iter().map(|(_, v)| Ok((v.zeros_like()?, v.zeros_like()?))).collect::<Result<Vec<_>>>()?;
        Ok(AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 0, state })
    }

    /// One update; `grads[i]` belongs to `params[i]`.
    pub fn step(&mut self, params: &[(String, &Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c1 = 1.0 - self.beta1.powi(self.step);
        let c2 = 1.0 - self.beta2.powi(self.step);
        for (((_, p), g), (m, v)) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            *m = ((&*m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            *v = ((&*v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.eps)?)?;
            let decay = if p.rank() == 2 { self.weight_decay } else { 0.0 };
            let next = ((p.as_tensor() * (1.0 - lr * decay))? - (update * lr)?)?;
            p.set(&next)?;
        }
        Ok(())
    }
}
