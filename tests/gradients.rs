//! Every hand-written backward against central finite differences in f64, per op and for the
//! whole training step. Tolerance: f64 central differences with h = 1e-5 have truncation error
//! ~h² · f''' and rounding ~1e-16 / h, so a relative error below 1e-6 means the derivative is right;
//! a wrong backward is off by O(1).

mod model_support;

use model_support::RandomWeights;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tunestudio::backend::cpu::{CpuBackend, CpuTensor};
use tunestudio::backend::{AttnShape, Backend, DType, HostWeight, LinearDims, LoraBwd, LoraFwd, RmsNorm};
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::data::Batch;
use tunestudio::engine::lora::LoraWeights;
use tunestudio::engine::{EngineOptions, TokenRows, Trainer};
use tunestudio::model::ModelSpec;
use tunestudio::model::arch::{Family, MlpActivation, Rope, RopeScaling};

type B = CpuBackend<f64>;
const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn t(v: &[f64]) -> CpuTensor<f64> {
    CpuTensor(v.to_vec())
}

/// Compare an analytic gradient with central differences of `f` at `x`, on every coordinate.
fn check(name: &str, x: &[f64], analytic: &[f64], f: &dyn Fn(&[f64]) -> f64) {
    let mut worst = 0.0f64;
    let scale = analytic.iter().fold(1e-3f64, |a, &g| a.max(g.abs()));
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        xp[i] += H;
        let mut xm = x.to_vec();
        xm[i] -= H;
        let numeric = (f(&xp) - f(&xm)) / (2.0 * H);
        assert!(numeric.is_finite() && analytic[i].is_finite(), "{name}[{i}]: non-finite");
        worst = worst.max((numeric - analytic[i]).abs() / scale);
    }
    assert!(worst < TOL, "{name}: relative error {worst:e} ≥ {TOL:e}");
}

/// Weighted sum of an op's output: the scalar whose gradient w.r.t. the output is `w`.
fn dot(a: &[f64], w: &[f64]) -> f64 {
    a.iter().zip(w).map(|(x, y)| x * y).sum()
}

/// Llama's norm (`x̂ · w`) and Gemma's (`x̂ · (1 + w)`, weights around 0), over rows of the
/// hidden size and over per-head rows (q/k norms: `heads` rows of head_dim per token).
#[test]
fn rmsnorm_backward() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (norm, n, d) in [(RmsNorm::plain(1e-5), 3, 8), (RmsNorm { eps: 1e-6, weight_offset: 1.0 }, 3, 8), (RmsNorm::plain(1e-6), 12, 4)] {
        let x = rand_vec(&mut rng, n * d);
        let w = rand_vec(&mut rng, d);
        let dy = rand_vec(&mut rng, n * d);
        let fwd = |x: &[f64]| {
            let mut out = CpuTensor(vec![0.0; n * d]);
            let mut inv = CpuTensor(vec![0.0; n]);
            be.rmsnorm_fwd(&t(x), &t(&w), norm, n, d, &mut out, &mut inv).unwrap();
            (out, inv)
        };
        let (out, inv) = fwd(&x);
        // The offset is added to the weight: the output is x̂ · (offset + w).
        let ms = x[..d].iter().map(|v| v * v).sum::<f64>() / d as f64;
        let want0 = x[0] / (ms + norm.eps as f64).sqrt() * (norm.weight_offset as f64 + w[0]);
        assert!((out.0[0] - want0).abs() < 1e-6, "{} vs {want0}", out.0[0]);
        let mut dx = CpuTensor(vec![0.5; n * d]);
        be.rmsnorm_bwd(&t(&dy), &t(&x), &t(&w), norm, &inv, n, d, &mut dx, false).unwrap();
        check(&format!("rmsnorm dx ({norm:?}, {n}x{d})"), &x, &dx.0, &|x| dot(&fwd(x).0.0, &dy));
        // accumulate adds on top of what is there
        let mut acc = CpuTensor(vec![1.0; n * d]);
        be.rmsnorm_bwd(&t(&dy), &t(&x), &t(&w), norm, &inv, n, d, &mut acc, true).unwrap();
        for i in 0..n * d {
            assert!((acc.0[i] - 1.0 - dx.0[i]).abs() < 1e-12);
        }
    }
}

#[test]
fn rope_backward_is_inverse_rotation() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let spec = tiny_spec(false);
    let (n, heads, hd) = (5, 2, spec.head_dim);
    let table = be.upload(&tunestudio::engine::model::rope_table(&spec, 16), DType::F32).unwrap();
    let positions: Vec<i32> = vec![0, 3, 1, 7, 15];
    let x = rand_vec(&mut rng, n * heads * hd);
    let dy = rand_vec(&mut rng, n * heads * hd);
    let fwd = |x: &[f64]| {
        let mut v = t(x);
        be.rope(&mut v, n, heads, hd, &positions, &table, false).unwrap();
        v.0
    };
    let mut g = t(&dy);
    be.rope(&mut g, n, heads, hd, &positions, &table, true).unwrap();
    check("rope dx", &x, &g.0, &|x| dot(&fwd(x), &dy));
}

#[test]
fn swiglu_backward() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 17;
    let g = rand_vec(&mut rng, n).iter().map(|v| v * 4.0).collect::<Vec<_>>();
    let u = rand_vec(&mut rng, n);
    let dy = rand_vec(&mut rng, n);
    let fwd = |g: &[f64], u: &[f64]| {
        let mut o = CpuTensor(vec![0.0; n]);
        be.swiglu_fwd(&t(g), &t(u), n, &mut o).unwrap();
        o.0
    };
    let (mut dg, mut du) = (CpuTensor(vec![0.0; n]), CpuTensor(vec![0.0; n]));
    be.swiglu_bwd(&t(&dy), &t(&g), &t(&u), n, &mut dg, &mut du).unwrap();
    check("swiglu dg", &g, &dg.0, &|g| dot(&fwd(g, &u), &dy));
    check("swiglu du", &u, &du.0, &|u| dot(&fwd(&g, u), &dy));
}

/// Gemma's GeGLU with the tanh GELU: the backward against finite differences, the forward against
/// GELU's closed form at a few points.
#[test]
fn geglu_backward() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let n = 23;
    let g = rand_vec(&mut rng, n).iter().map(|v| v * 4.0).collect::<Vec<_>>();
    let u = rand_vec(&mut rng, n);
    let dy = rand_vec(&mut rng, n);
    let fwd = |g: &[f64], u: &[f64]| {
        let mut o = CpuTensor(vec![0.0; n]);
        be.geglu_fwd(&t(g), &t(u), n, &mut o).unwrap();
        o.0
    };
    let (mut dg, mut du) = (CpuTensor(vec![0.0; n]), CpuTensor(vec![0.0; n]));
    be.geglu_bwd(&t(&dy), &t(&g), &t(&u), n, &mut dg, &mut du).unwrap();
    check("geglu dg", &g, &dg.0, &|g| dot(&fwd(g, &u), &dy));
    check("geglu du", &u, &du.0, &|u| dot(&fwd(&g, u), &dy));
    // gelu_tanh(1) = 0.8411919906082768, gelu_tanh(-2) = -0.04540230591222, gelu_tanh(0) = 0.
    let mut out = CpuTensor(vec![0.0; 3]);
    be.geglu_fwd(&t(&[1.0, -2.0, 0.0]), &t(&[1.0, 1.0, 1.0]), 3, &mut out).unwrap();
    for (got, want) in out.0.iter().zip([0.8411919906082768, -0.04540230591222494, 0.0]) {
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}

/// Gemma's embedding scale is an op of its own (forward and the token rows' backward).
#[test]
fn scale_multiplies_in_place() {
    let be = B::new();
    let mut x = t(&[1.0, -2.0, 3.0, 4.0]);
    be.scale(&mut x, 3, 0.5).unwrap();
    assert_eq!(x.0, vec![0.5, -1.0, 1.5, 4.0]);
}

#[test]
fn attention_backward_gqa_with_segments() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let shape = AttnShape { batch: 2, seq: 5, heads: 4, kv_heads: 2, head_dim: 4, ..Default::default() };
    let n = shape.tokens();
    let (qw, kw) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
    // Row 0 packs two examples (segments 0,0,1,1,1); row 1 is one example with padding.
    let segments = vec![0, 0, 1, 1, 1, 0, 0, 0, 1, 1];
    let q = rand_vec(&mut rng, n * qw);
    let k = rand_vec(&mut rng, n * kw);
    let v = rand_vec(&mut rng, n * kw);
    let dy = rand_vec(&mut rng, n * qw);
    let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut o = CpuTensor(vec![0.0; n * qw]);
        let mut lse = CpuTensor(vec![0.0; n * shape.heads]);
        be.attention_fwd(&t(q), &t(k), &t(v), &segments, shape, &mut o, &mut lse).unwrap();
        (o, lse)
    };
    let (o, lse) = fwd(&q, &k, &v);
    let mut dq = CpuTensor(vec![0.0; n * qw]);
    let mut dk = CpuTensor(vec![0.0; n * kw]);
    let mut dv = CpuTensor(vec![0.0; n * kw]);
    be.attention_bwd(&t(&dy), &t(&q), &t(&k), &t(&v), &o, &lse, &segments, shape, &mut dq, &mut dk, &mut dv).unwrap();
    check("attention dq", &q, &dq.0, &|q| dot(&fwd(q, &k, &v).0.0, &dy));
    check("attention dk", &k, &dk.0, &|k| dot(&fwd(&q, k, &v).0.0, &dy));
    check("attention dv", &v, &dv.0, &|v| dot(&fwd(&q, &k, v).0.0, &dy));
    // A query never sees another segment: changing segment 0 of row 0 leaves segment 1 unchanged.
    let mut v2 = v.clone();
    for x in &mut v2[..2 * kw] {
        *x += 1.0;
    }
    let o2 = fwd(&q, &k, &v2).0;
    assert_eq!(&o.0[2 * qw..5 * qw], &o2.0[2 * qw..5 * qw]);
}

/// Gemma 3's local layers: a sliding window over packed segments with its own softmax scale.
/// The backward matches finite differences, a key further back than the window is invisible, the
/// one at the window's edge is not, and the scale is the scale of q.
#[test]
fn attention_backward_sliding_window_and_scale() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let shape =
        AttnShape { batch: 2, seq: 7, heads: 4, kv_heads: 2, head_dim: 4, window: Some(3), softmax_scale: Some(0.3), causal_rows: false };
    let n = shape.tokens();
    let (qw, kw) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
    // Row 0 packs two examples (a window crossing a segment boundary); row 1 is one example.
    let segments = vec![0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    let q = rand_vec(&mut rng, n * qw);
    let k = rand_vec(&mut rng, n * kw);
    let v = rand_vec(&mut rng, n * kw);
    let dy = rand_vec(&mut rng, n * qw);
    let fwd = |q: &[f64], k: &[f64], v: &[f64], shape: AttnShape| {
        let mut o = CpuTensor(vec![0.0; n * qw]);
        let mut lse = CpuTensor(vec![0.0; n * shape.heads]);
        be.attention_fwd(&t(q), &t(k), &t(v), &segments, shape, &mut o, &mut lse).unwrap();
        (o, lse)
    };
    let (o, lse) = fwd(&q, &k, &v, shape);
    let mut dq = CpuTensor(vec![0.0; n * qw]);
    let mut dk = CpuTensor(vec![0.0; n * kw]);
    let mut dv = CpuTensor(vec![0.0; n * kw]);
    be.attention_bwd(&t(&dy), &t(&q), &t(&k), &t(&v), &o, &lse, &segments, shape, &mut dq, &mut dk, &mut dv).unwrap();
    check("windowed attention dq", &q, &dq.0, &|q| dot(&fwd(q, &k, &v, shape).0.0, &dy));
    check("windowed attention dk", &k, &dk.0, &|k| dot(&fwd(&q, k, &v, shape).0.0, &dy));
    check("windowed attention dv", &v, &dv.0, &|v| dot(&fwd(&q, &k, v, shape).0.0, &dy));
    // Row 1, query 6 sees keys 4, 5, 6: moving value 3 changes nothing, moving value 4 does.
    let query = |o: &CpuTensor<f64>| o.0[(7 + 6) * qw..(7 + 7) * qw].to_vec();
    let bumped = |j: usize| {
        let mut v2 = v.clone();
        v2[(7 + j) * kw..(7 + j + 1) * kw].iter_mut().for_each(|x| *x += 1.0);
        query(&fwd(&q, &k, &v2, shape).0)
    };
    assert_eq!(bumped(3), query(&o), "a key outside the window is masked");
    assert_ne!(bumped(4), query(&o), "the key at the window's edge is attended");
    // A window as long as the sequence is plain causal attention; the scale is q's scale.
    let plain = AttnShape { window: None, softmax_scale: None, ..shape };
    let wide = AttnShape { window: Some(shape.seq), softmax_scale: None, ..shape };
    assert_eq!(fwd(&q, &k, &v, plain).0, fwd(&q, &k, &v, wide).0);
    let scaled = AttnShape { window: None, softmax_scale: Some(0.3), ..shape };
    let q_scaled: Vec<f64> = q.iter().map(|x| x * 0.3 * (shape.head_dim as f64).sqrt()).collect();
    let (a, b) = (fwd(&q, &k, &v, scaled).0, fwd(&q_scaled, &k, &v, plain).0);
    assert!(a.0.iter().zip(&b.0).all(|(x, y)| (x - y).abs() < 1e-12), "softmax_scale scales q·k");
}

#[test]
fn lora_linear_backward_with_and_without_dropout() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let dims = LinearDims { n: 6, inp: 5, out: 7 };
    let r = 3;
    let w = rand_vec(&mut rng, dims.out * dims.inp);
    let bias: Vec<f32> = rand_vec(&mut rng, dims.out).iter().map(|&v| v as f32).collect();
    let weight = be
        .upload_weight(
            &HostWeight::Dense { out_features: dims.out, in_features: dims.inp, data: w.iter().map(|&v| v as f32).collect() },
            Some(&bias),
        )
        .unwrap();
    let x = rand_vec(&mut rng, dims.n * dims.inp);
    let a = rand_vec(&mut rng, r * dims.inp);
    let b = rand_vec(&mut rng, dims.out * r);
    let dy = rand_vec(&mut rng, dims.n * dims.out);
    let scale = 1.7f32;
    for p in [0.0f32, 0.3] {
        let key = 99;
        let ne = dims.n * dims.inp;
        let fwd = |x: &[f64], a: &[f64], b: &[f64]| {
            let mut y = CpuTensor(vec![0.0; dims.n * dims.out]);
            let mut xa = CpuTensor(vec![0.0; dims.n * r]);
            let mut xd = CpuTensor(vec![0.0; ne]);
            let xl = if p > 0.0 {
                be.dropout(&t(x), &mut xd, ne, p, key, 0).unwrap();
                xd
            } else {
                t(x)
            };
            let lora = LoraFwd { a: &t(a), b: &t(b), rank: r, scale, x_lora: &xl, xa: &mut xa };
            be.linear_fwd(&t(x), &weight, Some(lora), dims, &mut y).unwrap();
            (y.0, xa, xl)
        };
        let (_, xa, xl) = fwd(&x, &a, &b);
        let mut dx = CpuTensor(vec![0.0; ne]);
        let mut ga = CpuTensor(vec![0.0; a.len()]);
        let mut gb = CpuTensor(vec![0.0; b.len()]);
        let mut scratch = CpuTensor(vec![0.0; dims.n * r]);
        let mut dxl = CpuTensor(vec![0.0; ne]);
        let lora =
            LoraBwd { a: &t(&a), b: &t(&b), rank: r, scale, x_lora: &xl, xa: &xa, grad_a: &mut ga, grad_b: &mut gb, scratch: &mut scratch };
        if p > 0.0 {
            be.linear_bwd(&t(&dy), &weight, Some(lora), dims, &mut dx, false, Some(&mut dxl)).unwrap();
            be.dropout_bwd(&dxl, &mut dx, ne, p, key, 0, true).unwrap();
        } else {
            be.linear_bwd(&t(&dy), &weight, Some(lora), dims, &mut dx, false, None).unwrap();
        }
        check(&format!("linear dx (p={p})"), &x, &dx.0, &|x| dot(&fwd(x, &a, &b).0, &dy));
        check(&format!("lora dA (p={p})"), &a, &ga.0, &|a| dot(&fwd(&x, a, &b).0, &dy));
        check(&format!("lora dB (p={p})"), &b, &gb.0, &|b| dot(&fwd(&x, &a, b).0, &dy));
    }
}

#[test]
fn lm_head_cross_entropy_backward() {
    let be = B::new();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // More rows than one internal chunk (64) so chunk boundaries are exercised.
    let (n, d, vocab) = (70, 4, 11);
    let h = rand_vec(&mut rng, n * d);
    let head = rand_vec(&mut rng, vocab * d);
    let targets: Vec<i32> = (0..n).map(|i| if i % 5 == 0 { -100 } else { rng.random_range(0..vocab as i32) }).collect();
    let loss = |h: &[f64]| {
        let mut dh = CpuTensor(vec![0.0; n * d]);
        be.lm_head_ce(&t(h), &t(&head), &targets, n, d, vocab, 1.0, &mut dh, None).unwrap().sum
    };
    let mut dh = CpuTensor(vec![0.0; n * d]);
    let l = be.lm_head_ce(&t(&h), &t(&head), &targets, n, d, vocab, 1.0, &mut dh, None).unwrap();
    assert_eq!(l.count, targets.iter().filter(|&&t| t >= 0).count());
    check("lm_head_ce dh", &h, &dh.0, &loss);
    for r in (0..n).step_by(5) {
        assert!(dh.0[r * d..(r + 1) * d].iter().all(|&v| v == 0.0), "ignored rows get no gradient");
    }
    // Trainable head rows (the untrained-token fix): gradient w.r.t. rows 3 and 7 of the head.
    let rows = vec![3i32, 7];
    let mut grad = CpuTensor(vec![0.0; rows.len() * d]);
    be.lm_head_ce(&t(&h), &t(&head), &targets, n, d, vocab, 1.0, &mut dh, Some((&rows, &mut grad))).unwrap();
    let flat: Vec<f64> = rows.iter().flat_map(|&r| head[r as usize * d..(r as usize + 1) * d].to_vec()).collect();
    let with_rows = |vals: &[f64]| {
        let mut hd = head.clone();
        for (s, &r) in rows.iter().enumerate() {
            hd[r as usize * d..(r as usize + 1) * d].copy_from_slice(&vals[s * d..(s + 1) * d]);
        }
        let mut scratch = CpuTensor(vec![0.0; n * d]);
        be.lm_head_ce(&t(&h), &t(&hd), &targets, n, d, vocab, 1.0, &mut scratch, None).unwrap().sum
    };
    check("lm_head_ce head rows", &flat, &grad.0, &with_rows);
}

fn tiny_spec(qkv_bias: bool) -> ModelSpec {
    ModelSpec {
        vocab_size: 23,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        qkv_bias,
        tie_word_embeddings: qkv_bias,
        rope_theta: 10000.0,
        ..ModelSpec::llama3_8b()
    }
}

/// Qwen3 in small: per-head q/k norms, a head_dim that is not hidden / heads.
fn tiny_qwen3() -> ModelSpec {
    ModelSpec { family: Family::Qwen3, model_type: "qwen3".into(), head_dim: 6, qk_norm: true, ..tiny_spec(false) }
}

/// Gemma 3 in small: (1 + w) norms around both blocks, q/k norms, GeGLU, the scaled embedding,
/// tied head, a sliding window of 3 on layer 0 with its own RoPE, a global layer 1 with linear
/// RoPE scaling, and a softmax scale that is not head_dim^-0.5.
fn tiny_gemma3() -> ModelSpec {
    ModelSpec {
        family: Family::Gemma3,
        model_type: "gemma3_text".into(),
        qk_norm: true,
        norm_weight_offset: 1.0,
        sandwich_norms: true,
        mlp_activation: MlpActivation::GeluTanh,
        embed_scale: Some((8f32).sqrt()),
        attn_scale: Some(0.3),
        sliding_window: Some(3),
        sliding_layers: vec![true, false],
        local_rope: Some(Rope { theta: 100.0, scaling: None }),
        rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        ..tiny_spec(true)
    }
}

fn tiny_batch(rng: &mut ChaCha8Rng, vocab: u32) -> Batch {
    let a: Vec<u32> = (0..7).map(|_| rng.random_range(0..vocab)).collect();
    let b: Vec<u32> = (0..5).map(|_| rng.random_range(0..vocab)).collect();
    let la: Vec<i32> = a.iter().enumerate().map(|(i, &x)| if i < 2 { -100 } else { x as i32 }).collect();
    let lb: Vec<i32> = b.iter().map(|&x| x as i32).collect();
    Batch::from_examples(&[(&a, &la), (&b, &lb)], 0, None)
}

fn trainer(spec: &ModelSpec, quant: Quantization, policy: CheckpointPolicy, dropout: f64, targets: Vec<Target>) -> Trainer<B> {
    let weights = RandomWeights::new(spec, 11, 0.3);
    let lora = LoraConfig { r: 3, alpha: 5.0, dropout, targets: targets.clone(), rslora: false };
    let opts = EngineOptions {
        lora: lora.clone(),
        optim: OptimConfig::default(),
        quantization: quant,
        batch_size: 2,
        max_seq_len: 8,
        checkpointing: policy,
        seed: 7,
        mlp_chunk_rows: 5,
        saved_attention: tunestudio::engine::plan::SavedAttention::Off,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    };
    // B random (not PEFT's zero init) so that dA is not trivially zero.
    let mut init = LoraWeights::init(spec, &lora, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for layer in &mut init.layers {
        for p in layer.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.5..0.5));
        }
    }
    Trainer::new(B::new(), spec.clone(), &weights, opts, Some(&init)).unwrap()
}

/// [`trainer`]'s model and adapter with `layer` checkpointing keeping the last `kept` layers.
fn trainer_kept(spec: &ModelSpec, kept: usize) -> Trainer<B> {
    let base = trainer(spec, Quantization::Nf4, CheckpointPolicy::Layer, 0.1, Target::ALL.to_vec());
    let init = base.lora_weights().unwrap();
    let opts = base.opts.clone();
    Trainer::with_kept_layers(B::new(), spec.clone(), &RandomWeights::new(spec, 11, 0.3), opts, Some(&init), Some(kept)).unwrap()
}

/// Finite differences of the mean loss w.r.t. a sample of LoRA entries, against the engine's
/// accumulated gradients.
fn check_step_gradients(tr: &mut Trainer<B>, batches: &[Batch]) {
    let loss = tr.compute_gradients(batches).unwrap();
    assert!(loss.sum.is_finite() && loss.count > 0);
    let grads = tr.lora_grads().unwrap();
    let base = tr.lora_weights().unwrap();
    let micro_start = tr.micro_counter() - batches.len() as u64;
    let total: usize = batches.iter().map(Batch::trained_tokens).sum();
    let eval = |w: &LoraWeights, tr: &mut Trainer<B>| -> f64 {
        tr.set_lora_weights(w).unwrap();
        tr.set_micro_counter(micro_start);
        batches.iter().map(|b| tr.evaluate(b).unwrap().sum).sum::<f64>() / total as f64
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (l, layer) in base.layers.iter().enumerate() {
        for (&target, pair) in layer {
            for which in ['A', 'B'] {
                let len = if which == 'A' { pair.a.len() } else { pair.b.len() };
                for _ in 0..3 {
                    let i = rng.random_range(0..len);
                    // The weights with entry i moved by `delta`, and the value it took (f32).
                    let bump = |delta: f32| {
                        let mut w = base.clone();
                        let p = w.layers[l].get_mut(&target).unwrap();
                        let v = if which == 'A' { &mut p.a[i] } else { &mut p.b[i] };
                        *v += delta;
                        let moved = *v as f64;
                        (w, moved)
                    };
                    // LoRA weights travel as f32: steps large enough for f32 storage, divided by
                    // the f32-representable step actually taken; Richardson extrapolation of the
                    // steps h and 2h cancels the h² truncation term (the q/k norms curve the loss).
                    let central = |h: f32, tr: &mut Trainer<B>| {
                        let ((wp, xp), (wm, xm)) = (bump(h), bump(-h));
                        (eval(&wp, tr) - eval(&wm, tr)) / (xp - xm)
                    };
                    let h = 1e-3f32;
                    let numeric = (4.0 * central(h, tr) - central(2.0 * h, tr)) / 3.0;
                    let g = &grads.layers[l][&target];
                    let analytic = if which == 'A' { g.a[i] } else { g.b[i] } as f64;
                    let err = (numeric - analytic).abs() / analytic.abs().max(1e-2);
                    worst = worst.max(err);
                    checked += 1;
                }
            }
        }
    }
    tr.set_lora_weights(&base).unwrap();
    assert!(checked > 0);
    // Extrapolated central differences with h = 1e-3 on a smooth loss: what remains is rounding
    // of the f64 loss (~1e-13 / h) and the h⁴ term, far below 1e-4; a wrong backward is off by
    // O(1).
    assert!(worst < 1e-4, "whole-step LoRA gradient relative error {worst:e}");
}

#[test]
fn whole_step_lora_gradients_match_finite_differences() {
    let spec = tiny_spec(false);
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32), tiny_batch(&mut rng, spec.vocab_size as u32)];
    let mut tr = trainer(&spec, Quantization::Bf16, CheckpointPolicy::Layer, 0.0, Target::ALL.to_vec());
    check_step_gradients(&mut tr, &batches);
}

#[test]
fn whole_step_gradients_nf4_bias_tied_subset_dropout() {
    let spec = tiny_spec(true);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32)];
    let mut tr = trainer(&spec, Quantization::Nf4, CheckpointPolicy::None, 0.2, vec![Target::Q, Target::V, Target::Down]);
    check_step_gradients(&mut tr, &batches);
}

#[test]
fn chunked_mlp_and_offloaded_inputs_match_finite_differences() {
    // 2 rows × 8 positions = 16 rows in MLP chunks of 5 (uneven last chunk), inputs offloaded.
    let spec = tiny_spec(false);
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32), tiny_batch(&mut rng, spec.vocab_size as u32)];
    for policy in [CheckpointPolicy::Layer, CheckpointPolicy::Offload] {
        let mut tr = trainer(&spec, Quantization::Nf4, policy, 0.15, Target::ALL.to_vec());
        assert!(!tr.keeps_all_activations());
        check_step_gradients(&mut tr, &batches);
    }
}

/// Qwen3 and Gemma 3 through the whole step: every policy (kept activations, recomputed layers
/// with the MLP in uneven row chunks, offloaded inputs), dropout, an NF4 base.
#[test]
fn qwen3_and_gemma3_steps_match_finite_differences() {
    for spec in [tiny_qwen3(), tiny_gemma3()] {
        let mut rng = ChaCha8Rng::seed_from_u64(18);
        let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32), tiny_batch(&mut rng, spec.vocab_size as u32)];
        for (policy, quant, dropout) in [
            (CheckpointPolicy::None, Quantization::Bf16, 0.0),
            (CheckpointPolicy::Layer, Quantization::Nf4, 0.15),
            (CheckpointPolicy::Offload, Quantization::Bf16, 0.0),
        ] {
            let mut tr = trainer(&spec, quant, policy, dropout, Target::ALL.to_vec());
            check_step_gradients(&mut tr, &batches);
        }
        // Recomputing (in chunks) gives the very gradients keeping everything does.
        let mut keep = trainer(&spec, Quantization::Nf4, CheckpointPolicy::None, 0.1, Target::ALL.to_vec());
        let mut recompute = trainer(&spec, Quantization::Nf4, CheckpointPolicy::Layer, 0.1, Target::ALL.to_vec());
        assert_eq!(keep.compute_gradients(&batches).unwrap(), recompute.compute_gradients(&batches).unwrap());
        assert_eq!(keep.lora_grads().unwrap(), recompute.lora_grads().unwrap(), "{}", spec.model_type);
    }
}

#[test]
fn checkpointing_policies_give_identical_gradients() {
    let spec = tiny_spec(false);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32)];
    let mut keep = trainer(&spec, Quantization::Nf4, CheckpointPolicy::None, 0.1, Target::ALL.to_vec());
    let mut recompute = trainer(&spec, Quantization::Nf4, CheckpointPolicy::Layer, 0.1, Target::ALL.to_vec());
    assert!(keep.keeps_all_activations() && !recompute.keeps_all_activations());
    let l1 = keep.compute_gradients(&batches).unwrap();
    let l2 = recompute.compute_gradients(&batches).unwrap();
    assert_eq!(l1, l2);
    assert_eq!(keep.lora_grads().unwrap(), recompute.lora_grads().unwrap());
}

/// Keeping some layers' activations (the last ones) and recomputing the others, as `auto` does
/// when only some fit, gives the very gradients of keeping them all: on every family, with
/// dropout, the MLP of recomputed layers in uneven chunks, over two micro-batches.
#[test]
fn keeping_some_layers_gives_the_gradients_of_keeping_all() {
    for spec in [tiny_spec(false), tiny_qwen3(), tiny_gemma3()] {
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32), tiny_batch(&mut rng, spec.vocab_size as u32)];
        let mut keep = trainer(&spec, Quantization::Nf4, CheckpointPolicy::None, 0.1, Target::ALL.to_vec());
        let l_keep = keep.compute_gradients(&batches).unwrap();
        let g_keep = keep.lora_grads().unwrap();
        let mut mixed = trainer_kept(&spec, 1);
        assert_eq!((mixed.kept_layers(), mixed.keeps_all_activations()), (1, false));
        assert_eq!(mixed.compute_gradients(&batches).unwrap(), l_keep, "{}", spec.model_type);
        assert_eq!(mixed.lora_grads().unwrap(), g_keep, "{}", spec.model_type);
    }
    // Only `layer` checkpointing keeps some and recomputes the others.
    let spec = tiny_spec(false);
    let opts = trainer(&spec, Quantization::Nf4, CheckpointPolicy::Offload, 0.0, Target::ALL.to_vec()).opts.clone();
    let err =
        Trainer::with_kept_layers(B::new(), spec.clone(), &RandomWeights::new(&spec, 11, 0.3), opts, None, Some(1)).err().expect("refused");
    assert!(err.to_string().contains("memory.checkpointing"), "{err}");
}

/// Recomputed layers that keep attention's output and log-sum-exp from the forward, on the device
/// or in host memory, skip attention's second forward and train exactly as keeping everything
/// does: every family, `layer` checkpointing with none or some layers kept and `offload`, two
/// micro-batches, two steps with an evaluation between them (the kept outputs trade buffers with
/// the shared activations, so a step must leave them ready for the next).
#[test]
fn keeping_attention_output_trains_as_keeping_everything() {
    use tunestudio::engine::plan::SavedAttention;
    for spec in [ModelSpec { num_layers: 3, ..tiny_spec(false) }, tiny_qwen3(), tiny_gemma3()] {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let batches = vec![tiny_batch(&mut rng, spec.vocab_size as u32), tiny_batch(&mut rng, spec.vocab_size as u32)];
        let held_out = tiny_batch(&mut rng, spec.vocab_size as u32);
        let mut keep = trainer(&spec, Quantization::Nf4, CheckpointPolicy::None, 0.1, Target::ALL.to_vec());
        let init = keep.lora_weights().unwrap();
        let run = |tr: &mut Trainer<B>| {
            let first = tr.train_step(&batches, 1e-2).unwrap();
            let eval = tr.evaluate(&held_out).unwrap();
            let second = tr.train_step(&batches, 1e-2).unwrap();
            (first, eval, second, tr.lora_weights().unwrap())
        };
        let reference = run(&mut keep);
        for (policy, kept) in [(CheckpointPolicy::Layer, Some(0)), (CheckpointPolicy::Layer, Some(1)), (CheckpointPolicy::Offload, None)] {
            let build = |attention| {
                let opts = EngineOptions { checkpointing: policy, saved_attention: attention, ..keep.opts.clone() };
                Trainer::with_kept_layers(B::new(), spec.clone(), &RandomWeights::new(&spec, 11, 0.3), opts, Some(&init), kept).unwrap()
            };
            let recomputed = run(&mut build(SavedAttention::Off));
            // Recomputing is keeping, up to the order of f64 sums.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
            assert!(close(recomputed.0.loss, reference.0.loss) && close(recomputed.1.sum, reference.1.sum), "{policy:?}");
            assert!(close(recomputed.2.grad_norm, reference.2.grad_norm), "{policy:?}");
            for attention in [SavedAttention::Device, SavedAttention::Host] {
                let what = format!("{} {policy:?} kept {kept:?} attention {attention:?}", spec.model_type);
                let mut tr = build(attention);
                assert_eq!(tr.saved_attention(), attention, "{what}");
                let got = run(&mut tr);
                assert_eq!((got.0, got.1, got.2), (recomputed.0, recomputed.1, recomputed.2), "{what}");
                assert!(got.3 == recomputed.3, "{what}: the trained adapters differ");
            }
        }
        // Nothing is recomputed when every layer is kept: nothing to keep.
        let opts = EngineOptions { saved_attention: SavedAttention::Host, ..keep.opts.clone() };
        let tr = Trainer::new(B::new(), spec.clone(), &RandomWeights::new(&spec, 11, 0.3), opts, Some(&init)).unwrap();
        assert_eq!(tr.saved_attention(), SavedAttention::Off);
    }
}

/// The untrained-token fix trains embedding (and untied head) rows with the adapter: their
/// gradients must match finite differences too, tied and untied.
#[test]
fn trainable_token_rows_match_finite_differences() {
    // Gemma's rows reach the stream through the embedding scale.
    for (tied, spec) in [(false, tiny_spec(false)), (true, tiny_spec(true)), (true, tiny_gemma3())] {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let mut batch = tiny_batch(&mut rng, spec.vocab_size as u32);
        // Make sure the trained ids occur as inputs and as targets.
        batch.input_ids[1] = 3;
        batch.input_ids[9] = 5;
        batch.targets[4] = 5;
        let mut tr = trainer(&spec, Quantization::Bf16, CheckpointPolicy::Layer, 0.0, Target::ALL.to_vec());
        let d = spec.hidden_size;
        let ids = vec![3u32, 5];
        let base = TokenRows {
            ids: ids.clone(),
            embed: (0..2 * d).map(|_| rng.random_range(-0.5..0.5)).collect(),
            head: (!tied).then(|| (0..2 * d).map(|_| rng.random_range(-0.5..0.5)).collect()),
        };
        tr.set_token_rows(&base).unwrap();
        let batches = [batch];
        let loss = tr.compute_gradients(&batches).unwrap();
        let grads = tr.token_row_grads().unwrap().unwrap();
        let eval = |rows: &TokenRows, tr: &mut Trainer<B>| {
            tr.set_token_rows(rows).unwrap();
            tr.evaluate(&batches[0]).unwrap().sum / loss.count as f64
        };
        let h = 1e-3f32;
        let mut worst = 0.0f64;
        for which in ["embed", "head"] {
            if which == "head" && tied {
                continue;
            }
            for i in [0, d - 1, d + 2] {
                let bump = |delta: f32| {
                    let mut r = base.clone();
                    if which == "embed" {
                        r.embed[i] += delta
                    } else {
                        r.head.as_mut().unwrap()[i] += delta
                    }
                    r
                };
                let numeric = (eval(&bump(h), &mut tr) - eval(&bump(-h), &mut tr)) / (2.0 * h as f64);
                let analytic = if which == "embed" { grads.embed[i] } else { grads.head.as_ref().unwrap()[i] } as f64;
                assert!(analytic != 0.0, "{which}[{i}] gradient is zero (tied={tied})");
                worst = worst.max((numeric - analytic).abs() / analytic.abs().max(1e-2));
            }
        }
        assert!(worst < 1e-4, "token-row gradient relative error {worst:e} (tied={tied})");
    }
}

/// Issue 18: a non-finite loss stops the step before the update, naming the loss and the step and
/// saying what to change. The trainer keeps the weights it had and does not count the step, so
/// the session's last checkpoint is of the last good state.
#[test]
fn a_non_finite_loss_stops_the_step_before_the_update() {
    let spec = tiny_spec(false);
    let mut tr = trainer(&spec, Quantization::Bf16, CheckpointPolicy::Layer, 0.0, Target::ALL.to_vec());
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let batch = tiny_batch(&mut rng, spec.vocab_size as u32);
    tr.train_step(std::slice::from_ref(&batch), 1e-3).unwrap();
    let mut w = tr.lora_weights().unwrap();
    w.layers[1].get_mut(&Target::Down).unwrap().b[0] = f32::NAN;
    tr.set_lora_weights(&w).unwrap();
    let e = tr.train_step(&[batch], 1e-3).unwrap_err().to_string();
    assert!(e.starts_with("non-finite loss at step 2:") && e.contains("learning rate"), "{e}");
    assert_eq!(tr.step, 1, "the failed step is not counted");
    let after = tr.lora_weights().unwrap();
    for (l, layer) in w.layers.iter().enumerate() {
        for (t, p) in layer {
            let q = &after.layers[l][t];
            for (x, y) in p.a.iter().chain(&p.b).zip(q.a.iter().chain(&q.b)) {
                assert!(x == y || x.is_nan() && y.is_nan(), "layer {l} {t:?} was updated: {x} -> {y}");
            }
        }
    }
}
