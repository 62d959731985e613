//! Every op of the `Backend` trait on the CUDA backend against the CPU reference
//! (`CpuBackend<f32>`), on fresh seeded random inputs (a different seed per op), with outputs
//! poisoned with NaN before each launch so an unwritten element fails the test.
//!
//! Error measure: ‖cuda − cpu‖ / ‖cpu‖ over the whole output. Inputs are rounded to bf16 before
//! they reach either backend, so both compute on the same values and the error is the CUDA
//! path's own: one bf16 rounding of an output costs at most 2⁻⁹ ≈ 2e-3 relative per element
//! (about 1.1e-3 RMS), so ops with one bf16 output are held to 4e-3; ops with a bf16 intermediate
//! inside (LoRA's `xa`, attention's P and dS, the loss gradient) to 1e-2 or 2e-2 as stated; f32
//! paths to 1e-5 or tighter.
//!
//! Run on a GPU host: `cargo test --release --test gpu_kernels -- --ignored --test-threads=1`.
//! Each check prints a `RESULT` line (op, error, bound). Without a GPU these tests fail. With
//! `TUNESTUDIO_CARD=NAME` the backend decides as that card would (its PTX, its attention instances,
//! its memory), so one H100/H200 runs the suite as every profiled card.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tunestudio::backend::cpu::{CpuBackend, CpuTensor};
use tunestudio::backend::cuda::CudaBackend;
use tunestudio::backend::cuda::nf4::Nf4Parts;
use tunestudio::backend::{
    AdamW, AdamwTensor, AttnShape, Backend, DType, HostWeight, LinearDims, LoraBwd, LoraFwd, RmsNorm, dropout_uniform,
};
use tunestudio::quant::nf4::Nf4Tensor;

type Cpu = CpuBackend<f32>;

fn gpu() -> CudaBackend {
    CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
}

fn rb(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `n` values uniform in (−scale, scale), rounded to bf16.
fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rb(rng.random_range(-scale..scale))).collect()
}

/// ‖got − want‖ / ‖want‖, or why there is none (a length mismatch, a NaN or infinite element).
fn try_rel_err(got: &[f32], want: &[f32]) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("length mismatch: {} != {}", got.len(), want.len()));
    }
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        let bad = got.iter().filter(|x| !x.is_finite()).count();
        return Err(format!("element {i} is {} (unwritten or non-finite; expected {}; {bad} such elements)", got[i], want[i]));
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    try_rel_err(got, want).unwrap_or_else(|e| panic!("{e}"))
}

fn check(op: &str, got: &[f32], want: &[f32], bound: f64) {
    let e = rel_err(got, want);
    println!("RESULT {op:<44} rel_err {e:9.3e}  bound {bound:7.1e}  {}", if e <= bound { "ok" } else { "FAIL" });
    assert!(e <= bound, "{op}: relative error {e:e} > {bound:e}");
}

/// A CUDA tensor of `len` elements filled with NaN.
fn poisoned(be: &CudaBackend, len: usize, dtype: DType) -> tunestudio::backend::cuda::CudaTensor {
    let mut t = be.alloc(len, dtype).unwrap();
    be.fill(&mut t, f32::NAN).unwrap();
    t
}

fn ct(v: &[f32]) -> CpuTensor<f32> {
    CpuTensor(v.to_vec())
}

/// The limits the backend decides by are the device's (or its profile's under `TUNESTUDIO_CARD`),
/// and a profile's memory is a hard limit: an allocation past it fails as out of memory, naming the
/// profile, as it would on the real card.
#[test]
#[ignore = "needs a CUDA GPU"]
fn card_limits_and_profile_memory() {
    use tunestudio::backend::card;
    let t = std::time::Instant::now();
    let be = gpu();
    let (c, d) = (be.card().clone(), be.device_card().clone());
    println!("DEVICE backend created (context, PTX load and JIT, scratch) in {:.2} s", t.elapsed().as_secs_f64());
    println!("DEVICE {} as {} (context {:?} bytes)", d.describe(), c.describe(), be.context_bytes());
    assert!(d.compute_capability.0 >= 8 && d.sm_count > 0 && d.regs_per_sm >= 65536, "{d:?}");
    assert!(d.smem_per_block_optin >= 99 * 1024 && d.smem_per_sm >= d.smem_per_block_optin, "{d:?}");
    match card::profile_from_env().unwrap() {
        None => assert_eq!(c, d),
        Some(p) => {
            assert_eq!(c, card::emulate(p, &d));
            let info = be.device();
            assert!(info.total_memory_bytes.unwrap() <= p.limits().memory_bytes, "{info:?}");
            // More than the profile's card has in one allocation: refused by our allocator, not
            // by the (larger) real card.
            let too_much = (p.limits().memory_bytes / 4 + 1) as usize;
            let err = be.alloc(too_much, DType::F32).err().expect("allocation past the profile's memory");
            let msg = err.to_string();
            println!("DEVICE over the profile's memory: {msg}");
            assert!(msg.contains(p.key) && msg.contains("out of memory"), "{msg}");
        }
    }
    for hd in tunestudio::backend::cuda::kernels::ATTN_HEAD_DIMS {
        let k = be.attention_kernels(hd).unwrap_or_else(|e| panic!("{}: head_dim {hd}: {e}", c.describe()));
        assert!(k.fwd.smem_bytes() <= c.smem_per_block_optin && k.bwd.smem_bytes() <= c.smem_per_block_optin);
        println!(
            "DEVICE head_dim {hd}: {} ({} B) + {} ({} B)",
            k.fwd.kernel.symbol(),
            k.fwd.smem_bytes(),
            k.bwd.kernel.symbol(),
            k.bwd.smem_bytes()
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn add_copy_cast_fill() {
    let be = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(101);
    let n = 1003; // not a multiple of 8: exercises the scalar tail
    let (x, y) = (randv(&mut rng, n, 2.0), randv(&mut rng, n, 2.0));
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    let mut gx = be.upload(&x, DType::Act).unwrap();
    be.add(&mut gx, &be.upload(&y, DType::Act).unwrap(), n).unwrap();
    // One bf16 rounding of the sum.
    check("add bf16", &be.download(&gx).unwrap(), &want, 4e-3);

    let mut fx = be.upload(&x, DType::F32).unwrap();
    be.add(&mut fx, &be.upload(&y, DType::F32).unwrap(), n).unwrap();
    check("add f32", &be.download(&fx).unwrap(), &want, 1e-7);

    // f32 -> bf16 -> f32 round trip through cast kernels; values exact in bf16 stay exact.
    let raw: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let src = be.upload(&raw, DType::F32).unwrap();
    let mut mid = poisoned(&be, n, DType::Act);
    be.copy(&src, &mut mid, n).unwrap();
    let rounded: Vec<f32> = raw.iter().map(|&v| rb(v)).collect();
    check("cast f32->bf16 (round to nearest even)", &be.download(&mid).unwrap(), &rounded, 0.0);
    let mut back = poisoned(&be, n, DType::F32);
    be.copy(&mid, &mut back, n).unwrap();
    check("cast bf16->f32", &be.download(&back).unwrap(), &rounded, 0.0);
    let mut same = poisoned(&be, n, DType::F32);
    be.copy(&src, &mut same, n).unwrap();
    check("copy f32", &be.download(&same).unwrap(), &raw, 0.0);

    let mut f = poisoned(&be, n, DType::Act);
    be.fill(&mut f, 0.75).unwrap();
    check("fill bf16", &be.download(&f).unwrap(), &vec![0.75; n], 0.0);
    let mut z = poisoned(&be, n, DType::F32);
    be.fill(&mut z, 0.0).unwrap();
    assert!(be.download(&z).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dropout_forward_and_backward() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(102);
    let n = 4099;
    // A nonzero `first` (a row chunk inside a larger tensor) must shift the mask index.
    let (p, key, first) = (0.3f32, 0xDEAD_BEEF_1234u64, 12_345u64);
    let x = randv(&mut rng, n, 1.0);
    let mut want = ct(&vec![0.0; n]);
    cpu.dropout(&ct(&x), &mut want, n, p, key, first).unwrap();
    let mut out = poisoned(&be, n, DType::Act);
    be.dropout(&be.upload(&x, DType::Act).unwrap(), &mut out, n, p, key, first).unwrap();
    let got = be.download(&out).unwrap();
    // The mask must be the same bit for bit: zeros exactly where the shared hash drops.
    for i in 0..n {
        let kept = dropout_uniform(key, first + i as u64) >= p;
        assert_eq!(got[i] == 0.0, !kept || x[i] == 0.0, "mask differs at {i}");
    }
    check("dropout fwd (p=0.3)", &got, &want.0, 4e-3);
    let dy = randv(&mut rng, n, 1.0);
    let acc0 = randv(&mut rng, n, 1.0);
    for accumulate in [false, true] {
        let mut w = ct(&acc0);
        cpu.dropout_bwd(&ct(&dy), &mut w, n, p, key, first, accumulate).unwrap();
        let mut g = be.upload(&acc0, DType::Act).unwrap();
        if !accumulate {
            be.fill(&mut g, f32::NAN).unwrap();
        }
        be.dropout_bwd(&be.upload(&dy, DType::Act).unwrap(), &mut g, n, p, key, first, accumulate).unwrap();
        check(&format!("dropout bwd (accumulate={accumulate})"), &be.download(&g).unwrap(), &w.0, 4e-3);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_gather_rows_and_set_rows() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(103);
    for d in [64usize, 12] {
        let (vocab, n) = (50usize, 37usize);
        let table = randv(&mut rng, vocab * d, 1.0);
        let ids: Vec<i32> = (0..n).map(|_| rng.random_range(0..vocab as i32)).collect();
        let mut want = ct(&vec![0.0; n * d]);
        cpu.embedding_fwd(&ids, &ct(&table), n, d, &mut want).unwrap();
        let mut out = poisoned(&be, n * d, DType::Act);
        be.embedding_fwd(&be.upload_ids(&ids).unwrap(), &be.upload(&table, DType::Act).unwrap(), n, d, &mut out).unwrap();
        check(&format!("embedding fwd (d={d})"), &be.download(&out).unwrap(), &want.0, 0.0);
    }

    // Trainable rows: tokens 3, 7, 11 have slots 0, 1, 2; the gradient sums their rows.
    let (vocab, n, d) = (40usize, 300usize, 64usize);
    let ids: Vec<i32> = (0..n).map(|_| rng.random_range(0..vocab as i32)).collect();
    let mut slot = vec![-1i32; vocab];
    for (s, &t) in [3usize, 7, 11].iter().enumerate() {
        slot[t] = s as i32;
    }
    let dx = randv(&mut rng, n * d, 1.0);
    let g0: Vec<f32> = (0..3 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut want = ct(&g0);
    cpu.embedding_bwd_rows(&ct(&dx), &ids, n, d, &slot, &mut want).unwrap();
    let mut got = be.upload(&g0, DType::F32).unwrap();
    be.embedding_bwd_rows(
        &be.upload(&dx, DType::Act).unwrap(),
        &be.upload_ids(&ids).unwrap(),
        n,
        d,
        &be.upload_ids(&slot).unwrap(),
        &mut got,
    )
    .unwrap();
    // f32 sums of the same bf16 values in the same (row) order.
    check("embedding bwd rows (f32 accumulate)", &be.download(&got).unwrap(), &want.0, 1e-6);

    let table = randv(&mut rng, vocab * d, 1.0);
    let rows = vec![5i32, 39, 0];
    let values = randv(&mut rng, 3 * d, 1.0);
    let mut want = ct(&table);
    cpu.set_rows(&mut want, d, &rows, &ct(&values), 3).unwrap();
    let mut gt = be.upload(&table, DType::Act).unwrap();
    be.set_rows(&mut gt, d, &be.upload_ids(&rows).unwrap(), &be.upload(&values, DType::F32).unwrap(), 3).unwrap();
    check("set_rows (f32 values into bf16 table)", &be.download(&gt).unwrap(), &want.0, 0.0);
}

/// Llama's norm over the hidden size (wide and ragged rows), Gemma's `(1 + w)` norm, and the
/// per-head q/k norms of Qwen3 (head_dim 128) and Gemma 3 (256): `n · heads` rows of head_dim.
/// The rows of scale 1e25 and 1e36 are a diverging run's residual stream, whose squares overflow
/// f32: the norm must still be x / rms(x) there, and its gradient not flattened to zero.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_forward_and_backward() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(104);
    let gemma = RmsNorm { eps: 1e-6, weight_offset: 1.0 };
    for (norm, n, d, scale) in [
        (RmsNorm::plain(1e-5), 33, 4096usize, 2.0f32),
        (RmsNorm::plain(1e-5), 33, 100, 2.0),
        (gemma, 33, 2560, 2.0),
        (RmsNorm::plain(1e-6), 33 * 32, 128, 2.0),
        (gemma, 33 * 8, 256, 2.0),
        (RmsNorm::plain(1e-5), 33, 4096, 1e25),
        (gemma, 33, 2560, 1e36),
        (RmsNorm::plain(1e-5), 33, 100, 1e25),
    ] {
        let what = format!("d={d}, offset {}, |x| < {scale:.0e}", norm.weight_offset);
        let x = randv(&mut rng, n * d, scale);
        // Gemma's weights sit around 0 (the kernel adds the 1), the others around 1.
        let w: Vec<f32> = (0..d).map(|_| rb(1.0 - norm.weight_offset + rng.random_range(-0.2f32..0.2))).collect();
        let (mut out, mut inv) = (ct(&vec![0.0; n * d]), ct(&vec![0.0; n]));
        cpu.rmsnorm_fwd(&ct(&x), &ct(&w), norm, n, d, &mut out, &mut inv).unwrap();
        let (gx, gw) = (be.upload(&x, DType::Act).unwrap(), be.upload(&w, DType::Act).unwrap());
        let mut gout = poisoned(&be, n * d, DType::Act);
        let mut ginv = poisoned(&be, n, DType::F32);
        be.rmsnorm_fwd(&gx, &gw, norm, n, d, &mut gout, &mut ginv).unwrap();
        check(&format!("rmsnorm fwd out ({what})"), &be.download(&gout).unwrap(), &out.0, 4e-3);
        // f32 sum of squares of the same values, different order.
        check(&format!("rmsnorm fwd inv_rms ({what})"), &be.download(&ginv).unwrap(), &inv.0, 1e-5);

        let dy = randv(&mut rng, n * d, 1.0);
        let acc0 = randv(&mut rng, n * d, 1.0);
        for accumulate in [false, true] {
            let mut want = ct(&acc0);
            cpu.rmsnorm_bwd(&ct(&dy), &ct(&x), &ct(&w), norm, &inv, n, d, &mut want, accumulate).unwrap();
            let mut got = be.upload(&acc0, DType::Act).unwrap();
            if !accumulate {
                be.fill(&mut got, f32::NAN).unwrap();
            }
            be.rmsnorm_bwd(&be.upload(&dy, DType::Act).unwrap(), &gx, &gw, norm, &ginv, n, d, &mut got, accumulate).unwrap();
            check(&format!("rmsnorm bwd ({what}, accumulate={accumulate})"), &be.download(&got).unwrap(), &want.0, 4e-3);
        }
    }
}

/// The RoPE table for `max_pos` positions of a head of `hd` (theta 10000), cos then sin.
fn rope_table(max_pos: usize, hd: usize) -> Vec<f32> {
    let half = hd / 2;
    let mut t = vec![0f32; 2 * max_pos * half];
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 * 10000f64.powf(-2.0 * i as f64 / hd as f64);
            t[p * half + i] = a.cos() as f32;
            t[max_pos * half + p * half + i] = a.sin() as f32;
        }
    }
    t
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_forward_and_inverse() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(105);
    for (heads, hd) in [(4usize, 128usize), (3, 12)] {
        let (n, max_pos) = (50usize, 300usize);
        let table = rope_table(max_pos, hd);
        let pos: Vec<i32> = (0..n).map(|_| rng.random_range(0..max_pos as i32)).collect();
        let x = randv(&mut rng, n * heads * hd, 1.0);
        let (gt, gp) = (be.upload(&table, DType::F32).unwrap(), be.upload_ids(&pos).unwrap());
        for inverse in [false, true] {
            let mut want = ct(&x);
            cpu.rope(&mut want, n, heads, hd, &pos, &ct(&table), inverse).unwrap();
            let mut got = be.upload(&x, DType::Act).unwrap();
            be.rope(&mut got, n, heads, hd, &gp, &gt, inverse).unwrap();
            check(&format!("rope (hd={hd}, inverse={inverse})"), &be.download(&got).unwrap(), &want.0, 4e-3);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swiglu_forward_and_backward() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(106);
    let n = 5003;
    let (g, u, dy) = (randv(&mut rng, n, 6.0), randv(&mut rng, n, 2.0), randv(&mut rng, n, 1.0));
    let mut want = ct(&vec![0.0; n]);
    cpu.swiglu_fwd(&ct(&g), &ct(&u), n, &mut want).unwrap();
    let (gg, gu) = (be.upload(&g, DType::Act).unwrap(), be.upload(&u, DType::Act).unwrap());
    let mut out = poisoned(&be, n, DType::Act);
    be.swiglu_fwd(&gg, &gu, n, &mut out).unwrap();
    check("swiglu fwd", &be.download(&out).unwrap(), &want.0, 4e-3);
    let (mut wdg, mut wdu) = (ct(&vec![0.0; n]), ct(&vec![0.0; n]));
    cpu.swiglu_bwd(&ct(&dy), &ct(&g), &ct(&u), n, &mut wdg, &mut wdu).unwrap();
    let (mut dg, mut du) = (poisoned(&be, n, DType::Act), poisoned(&be, n, DType::Act));
    be.swiglu_bwd(&be.upload(&dy, DType::Act).unwrap(), &gg, &gu, n, &mut dg, &mut du).unwrap();
    check("swiglu bwd dg", &be.download(&dg).unwrap(), &wdg.0, 4e-3);
    check("swiglu bwd du", &be.download(&du).unwrap(), &wdu.0, 4e-3);
}

/// Gemma's GeGLU (tanh GELU), with a ragged tail.
#[test]
#[ignore = "needs a CUDA GPU"]
fn geglu_forward_and_backward() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(115);
    let n = 5003;
    let (g, u, dy) = (randv(&mut rng, n, 6.0), randv(&mut rng, n, 2.0), randv(&mut rng, n, 1.0));
    let mut want = ct(&vec![0.0; n]);
    cpu.geglu_fwd(&ct(&g), &ct(&u), n, &mut want).unwrap();
    let (gg, gu) = (be.upload(&g, DType::Act).unwrap(), be.upload(&u, DType::Act).unwrap());
    let mut out = poisoned(&be, n, DType::Act);
    be.geglu_fwd(&gg, &gu, n, &mut out).unwrap();
    check("geglu fwd", &be.download(&out).unwrap(), &want.0, 4e-3);
    let (mut wdg, mut wdu) = (ct(&vec![0.0; n]), ct(&vec![0.0; n]));
    cpu.geglu_bwd(&ct(&dy), &ct(&g), &ct(&u), n, &mut wdg, &mut wdu).unwrap();
    let (mut dg, mut du) = (poisoned(&be, n, DType::Act), poisoned(&be, n, DType::Act));
    be.geglu_bwd(&be.upload(&dy, DType::Act).unwrap(), &gg, &gu, n, &mut dg, &mut du).unwrap();
    check("geglu bwd dg", &be.download(&dg).unwrap(), &wdg.0, 4e-3);
    check("geglu bwd du", &be.download(&du).unwrap(), &wdu.0, 4e-3);
}

/// The embedding scale: a bf16 tensor is scaled by bf16(alpha) (as transformers' Gemma does in
/// bf16), an f32 tensor by alpha.
#[test]
#[ignore = "needs a CUDA GPU"]
fn scale_in_place() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(116);
    let n = 4099;
    let alpha = (2560f32).sqrt();
    let x = randv(&mut rng, n, 1.0);
    let mut want = ct(&x);
    cpu.scale(&mut want, n, rb(alpha)).unwrap();
    let mut got = be.upload(&x, DType::Act).unwrap();
    be.scale(&mut got, n, alpha).unwrap();
    check("scale bf16", &be.download(&got).unwrap(), &want.0, 4e-3);
    let mut want = ct(&x);
    cpu.scale(&mut want, n, alpha).unwrap();
    let mut got = be.upload(&x, DType::F32).unwrap();
    be.scale(&mut got, n, alpha).unwrap();
    check("scale f32", &be.download(&got).unwrap(), &want.0, 1e-7);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nf4_dequantize_matches_the_layout() {
    let be = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(107);
    for (out, inp) in [(256usize, 320usize), (7, 66)] {
        let data: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let q = Nf4Tensor::quantize(&data, &[out, inp]);
        let want: Vec<f32> = Nf4Parts::of(&q).dequantize_reference().into_iter().map(rb).collect();
        let mut w = be.upload_weight(&HostWeight::Nf4(q), None).unwrap();
        assert!(w.is_nf4());
        let got = be.dequantize_weight(&w).unwrap();
        let mismatches = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!("NF4 {out}x{inp}: {mismatches} of {} values differ from the host formula", want.len());
        // The same f32 products rounded the same way: bit-exact up to subnormal flushing.
        check(&format!("nf4 dequant ({out}x{inp})"), &got, &want, 1e-6);
        // The copy dequantized once for the run is what the GEMMs read from then on: the same
        // kernel's output, bit for bit, in a buffer of its own.
        let used = be.memory_used();
        be.cache_dequantized(&mut w).unwrap();
        assert!(w.is_cached() && be.memory_used() >= used + out * inp * 2);
        let cached = be.dequantize_weight(&w).unwrap();
        assert!(cached.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "nf4 cached copy ({out}x{inp})");
    }
}

/// The dequantization buffers held for several weights (`Backend::hold_dequantized`): four
/// weights served in turns through three buffers, the least recently used replaced, each copy
/// bit-identical to its weight's dequantization whether it was served from a held buffer or
/// dequantized again; the buffers are as large as the largest weight.
#[test]
#[ignore = "needs a CUDA GPU"]
fn nf4_held_dequantization_buffers_serve_the_right_weight() {
    let be = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(108);
    let (out, inp) = (96usize, 128usize);
    let mut weights = Vec::new();
    let mut want = Vec::new();
    for _ in 0..4 {
        let data: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let q = Nf4Tensor::quantize(&data, &[out, inp]);
        want.push(Nf4Parts::of(&q).dequantize_reference().into_iter().map(rb).collect::<Vec<f32>>());
        weights.push(be.upload_weight(&HostWeight::Nf4(q), None).unwrap());
    }
    let used = be.memory_used();
    be.hold_dequantized(3).unwrap();
    assert_eq!(be.memory_used(), used + 2 * out * inp * 2, "two more buffers of the weights' size");
    // 0 1 2 fill the buffers, 0 and 1 are held, 3 replaces 2 (the least recently used), 2 comes
    // back in place of 0, and so on.
    for (turn, i) in [0usize, 1, 2, 0, 1, 3, 2, 1, 0, 3, 3, 2].into_iter().enumerate() {
        let got = be.dequantize_weight(&weights[i]).unwrap();
        assert!(got.iter().zip(&want[i]).all(|(a, b)| a.to_bits() == b.to_bits()), "turn {turn}: weight {i}");
    }
}

#[derive(Clone, Copy)]
struct LinearCase {
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
    bias: bool,
    nf4: bool,
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_with_lora_forward_and_backward() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(108);
    let cases = [
        LinearCase { n: 70, inp: 256, out: 192, r: 16, bias: true, nf4: false },
        LinearCase { n: 128, inp: 512, out: 256, r: 8, bias: false, nf4: true },
        // Odd sizes and rank 3: shapes cuBLASLt may decline go through the fallback kernel.
        LinearCase { n: 5, inp: 24, out: 40, r: 3, bias: true, nf4: false },
    ];
    // Every case on cuBLASLt, then every GEMM of it on the fallback kernel (which otherwise runs only
    // for the shapes cuBLASLt declines).
    for (c, fallback) in cases.iter().map(|&c| (c, false)).chain(cases.iter().map(|&c| (c, true))) {
        be.set_gemm_fallback_only(fallback);
        let LinearCase { n, inp, out, r, bias, nf4 } = c;
        let tag = format!("n={n} in={inp} out={out} r={r} bias={bias} nf4={nf4} fallback={fallback}");
        let dims = LinearDims { n, inp, out };
        let raw: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        // Both backends get the same bf16 weight values: for NF4 the CPU side gets the dequantized
        // values (the kernel's bf16 output) as a dense weight.
        let (host_gpu, dense) = if nf4 {
            let q = Nf4Tensor::quantize(&raw, &[out, inp]);
            let deq: Vec<f32> = Nf4Parts::of(&q).dequantize_reference().into_iter().map(rb).collect();
            (HostWeight::Nf4(q), deq)
        } else {
            let w: Vec<f32> = raw.iter().map(|&v| rb(v)).collect();
            (HostWeight::Dense { out_features: out, in_features: inp, data: w.clone() }, w)
        };
        let b: Option<Vec<f32>> = bias.then(|| randv(&mut rng, out, 0.5));
        let gw = be.upload_weight(&host_gpu, b.as_deref()).unwrap();
        let cw = cpu.upload_weight(&HostWeight::Dense { out_features: out, in_features: inp, data: dense }, b.as_deref()).unwrap();
        let x = randv(&mut rng, n * inp, 1.0);
        let la = randv(&mut rng, r * inp, 0.2);
        let lb = randv(&mut rng, out * r, 0.2);
        let scale = 2.0f32;

        // Base only.
        let mut want = ct(&vec![0.0; n * out]);
        cpu.linear_fwd(&ct(&x), &cw, None, dims, &mut want).unwrap();
        let gx = be.upload(&x, DType::Act).unwrap();
        let mut y = poisoned(&be, n * out, DType::Act);
        be.linear_fwd(&gx, &gw, None, dims, &mut y).unwrap();
        check(&format!("linear fwd base [{tag}]"), &be.download(&y).unwrap(), &want.0, 4e-3);

        // With LoRA: bf16 xa is an intermediate, so two roundings on the LoRA term.
        let (cla, clb) = (ct(&la), ct(&lb));
        let mut cxa = ct(&vec![0.0; n * r]);
        cpu.linear_fwd(&ct(&x), &cw, Some(LoraFwd { a: &cla, b: &clb, rank: r, scale, x_lora: &ct(&x), xa: &mut cxa }), dims, &mut want)
            .unwrap();
        let (gla, glb) = (be.upload(&la, DType::Act).unwrap(), be.upload(&lb, DType::Act).unwrap());
        let mut gxa = poisoned(&be, n * r, DType::Act);
        be.fill(&mut y, f32::NAN).unwrap();
        be.linear_fwd(&gx, &gw, Some(LoraFwd { a: &gla, b: &glb, rank: r, scale, x_lora: &gx, xa: &mut gxa }), dims, &mut y).unwrap();
        check(&format!("linear fwd +lora y [{tag}]"), &be.download(&y).unwrap(), &want.0, 1e-2);
        check(&format!("linear fwd +lora xa [{tag}]"), &be.download(&gxa).unwrap(), &cxa.0, 4e-3);

        // Backward, accumulating into dx; LoRA grads accumulate into f32 buffers that start
        // non-zero. The CPU gets the GPU's xa (rounded) so both start from the same values.
        let xa_used = be.download(&gxa).unwrap();
        let dy = randv(&mut rng, n * out, 1.0);
        let dx0 = randv(&mut rng, n * inp, 1.0);
        let ga0: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let gb0: Vec<f32> = (0..out * r).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        for with_dx_lora in [false, true] {
            let (mut cdx, mut cga, mut cgb) = (ct(&dx0), ct(&ga0), ct(&gb0));
            let mut cscr = ct(&vec![0.0; n * r]);
            let mut cdxl = ct(&vec![0.0; n * inp]);
            cpu.linear_bwd(
                &ct(&dy),
                &cw,
                Some(LoraBwd {
                    a: &cla,
                    b: &clb,
                    rank: r,
                    scale,
                    x_lora: &ct(&x),
                    xa: &ct(&xa_used),
                    grad_a: &mut cga,
                    grad_b: &mut cgb,
                    scratch: &mut cscr,
                }),
                dims,
                &mut cdx,
                true,
                if with_dx_lora { Some(&mut cdxl) } else { None },
            )
            .unwrap();
            let gdy = be.upload(&dy, DType::Act).unwrap();
            let mut gdx = be.upload(&dx0, DType::Act).unwrap();
            let (mut gga, mut ggb) = (be.upload(&ga0, DType::F32).unwrap(), be.upload(&gb0, DType::F32).unwrap());
            let mut gscr = poisoned(&be, n * r, DType::Act);
            let mut gdxl = poisoned(&be, n * inp, DType::Act);
            be.linear_bwd(
                &gdy,
                &gw,
                Some(LoraBwd {
                    a: &gla,
                    b: &glb,
                    rank: r,
                    scale,
                    x_lora: &gx,
                    xa: &gxa,
                    grad_a: &mut gga,
                    grad_b: &mut ggb,
                    scratch: &mut gscr,
                }),
                dims,
                &mut gdx,
                true,
                if with_dx_lora { Some(&mut gdxl) } else { None },
            )
            .unwrap();
            let t = format!("{tag} dx_lora={with_dx_lora}");
            // dx: bf16 accumulate of two products, one through the bf16 scratch t = dy·B.
            check(&format!("linear bwd dx [{t}]"), &be.download(&gdx).unwrap(), &cdx.0, 1e-2);
            // dB: f32 accumulate of bf16 inputs (xa identical on both sides).
            check(&format!("linear bwd dB [{t}]"), &be.download(&ggb).unwrap(), &cgb.0, 1e-5);
            // dA: f32 accumulate, but through the bf16 scratch t.
            check(&format!("linear bwd dA [{t}]"), &be.download(&gga).unwrap(), &cga.0, 1e-2);
            if with_dx_lora {
                check(&format!("linear bwd dx_lora [{t}]"), &be.download(&gdxl).unwrap(), &cdxl.0, 1e-2);
            }
        }
    }
}

#[derive(Clone)]
struct AttnCase {
    shape: AttnShape,
    /// Segment ids per row.
    segments: Vec<i32>,
}

impl AttnCase {
    /// Long cases, left out under a sanitizer.
    fn long(&self) -> bool {
        self.shape.seq >= 2048
    }
}

fn attn_cases() -> Vec<AttnCase> {
    let mut cases = Vec::new();
    // GQA group 4, seq not a multiple of the 64-row tile, row 0 packs two examples, row 1 has a
    // padding tail in its own segment.
    let s = AttnShape { batch: 2, seq: 100, heads: 8, kv_heads: 2, head_dim: 64, ..Default::default() };
    let mut seg = Vec::new();
    seg.extend((0..100).map(|t| if t < 40 { 0 } else { 1 }));
    seg.extend((0..100).map(|t| if t < 77 { 0 } else { 1 }));
    cases.push(AttnCase { shape: s, segments: seg });
    // Group 1 (plain MHA), head_dim 128, three tiles.
    let s = AttnShape { batch: 1, seq: 130, heads: 4, kv_heads: 4, head_dim: 128, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![0; 130] });
    // head_dim 32 (one exact tile, multi-query) and 96 (packed into three examples).
    let s = AttnShape { batch: 1, seq: 64, heads: 2, kv_heads: 1, head_dim: 32, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![3; 64] });
    let s = AttnShape { batch: 2, seq: 70, heads: 3, kv_heads: 1, head_dim: 96, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: (0..140).map(|i: i32| (i % 70) / 25).collect() });
    // One partial tile (17 rows; most warps of a block have no row), multi-query, two sequences.
    let s = AttnShape { batch: 2, seq: 17, heads: 2, kv_heads: 1, head_dim: 64, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![4; 34] });
    let s = AttnShape { batch: 1, seq: 1, heads: 4, kv_heads: 2, head_dim: 128, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![0] });
    // Segments alternating every 3 tokens: no tile is one segment, every score is masked per element.
    let s = AttnShape { batch: 1, seq: 150, heads: 2, kv_heads: 1, head_dim: 64, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: (0..150).map(|t: i32| (t / 3) % 2).collect() });
    // Three sequences at head_dim 128, GQA 2: boundaries on the 64/128-row tiles, one sequence a
    // single example (unmasked tiles), one with boundaries off the tiles.
    let s = AttnShape { batch: 3, seq: 300, heads: 4, kv_heads: 2, head_dim: 128, ..Default::default() };
    let mut seg = Vec::new();
    seg.extend((0..300).map(|t| {
        if t < 128 {
            5
        } else if t < 192 {
            6
        } else {
            7
        }
    }));
    seg.extend((0..300).map(|_| 3));
    seg.extend((0..300).map(|t| {
        if t < 70 {
            0
        } else if t < 260 {
            1
        } else {
            2
        }
    }));
    cases.push(AttnCase { shape: s, segments: seg });
    // Long sequences at head_dim 128, one example each: most tiles take the unmasked path.
    let s = AttnShape { batch: 1, seq: 2048, heads: 8, kv_heads: 2, head_dim: 128, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![0; 2048] });
    let s = AttnShape { batch: 1, seq: 4096, heads: 8, kv_heads: 8, head_dim: 128, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![1; 4096] });
    // Packed at head_dim 128: boundaries on and off the 64/128-row tiles (whole tiles of two
    // different examples are skipped), a padding tail, seq not a multiple of any tile.
    let s = AttnShape { batch: 2, seq: 1000, heads: 8, kv_heads: 2, head_dim: 128, ..Default::default() };
    let mut seg = Vec::new();
    seg.extend((0..1000).map(|t| {
        if t < 300 {
            0
        } else if t < 640 {
            1
        } else {
            2
        }
    }));
    seg.extend((0..1000).map(|t| {
        if t < 128 {
            5
        } else if t < 192 {
            6
        } else if t < 900 {
            7
        } else {
            9
        }
    }));
    cases.push(AttnCase { shape: s, segments: seg });
    // Packed at head_dim 64, GQA 4, boundaries on tile multiples.
    let s = AttnShape { batch: 1, seq: 700, heads: 4, kv_heads: 1, head_dim: 64, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: (0..700).map(|t: i32| t / 256).collect() });
    // head_dim 256 (Gemma 3): the backward in 128-column slices, packed and whole, GQA 2.
    let s = AttnShape { batch: 2, seq: 300, heads: 4, kv_heads: 2, head_dim: 256, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: (0..600).map(|i: i32| if i < 300 { 0 } else { (i - 300) / 130 }).collect() });
    let s = AttnShape { batch: 1, seq: 2048, heads: 4, kv_heads: 1, head_dim: 256, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: vec![0; 2048] });
    // head_dim 32 (the demo model's) at length, GQA 2, three examples.
    let s = AttnShape { batch: 1, seq: 2048, heads: 4, kv_heads: 2, head_dim: 32, ..Default::default() };
    cases.push(AttnCase { shape: s, segments: (0..2048).map(|t: i32| t / 700).collect() });
    // Sliding windows (Gemma 3's local layers) with its scale (query_pre_attn_scalar 256): across
    // tiles with packed examples, on a tile boundary with one example (whole tiles skipped and
    // unmasked), shorter than a tile at head dim 256, and at length.
    let gemma = Some(1.0 / 16.0);
    let s =
        AttnShape { batch: 2, seq: 300, heads: 4, kv_heads: 2, head_dim: 128, window: Some(70), softmax_scale: gemma, causal_rows: false };
    cases.push(AttnCase { shape: s, segments: (0..600).map(|i: i32| if i < 300 { i / 200 } else { 5 }).collect() });
    let s =
        AttnShape { batch: 1, seq: 320, heads: 2, kv_heads: 1, head_dim: 64, window: Some(64), softmax_scale: None, causal_rows: false };
    cases.push(AttnCase { shape: s, segments: vec![0; 320] });
    let s =
        AttnShape { batch: 1, seq: 200, heads: 2, kv_heads: 2, head_dim: 256, window: Some(40), softmax_scale: gemma, causal_rows: false };
    cases.push(AttnCase { shape: s, segments: vec![0; 200] });
    let s = AttnShape {
        batch: 1,
        seq: 4096,
        heads: 8,
        kv_heads: 4,
        head_dim: 256,
        window: Some(1024),
        softmax_scale: gemma,
        causal_rows: false,
    };
    cases.push(AttnCase { shape: s, segments: vec![0; 4096] });
    cases
}

/// Bytes of the attention backward's scratch for one sequence of one kv head's group (the larger
/// of our kernels' and cuDNN's need): a scratch limit of k times this makes launches of at most k
/// such units.
fn attn_unit_bytes(shape: AttnShape) -> usize {
    tunestudio::backend::workspace::attention_unit_bytes(shape)
}

/// Checks attention as this card runs it (forward, then backward of the GPU's own forward) on every
/// case `wanted` keeps, on fresh seeded inputs against the CPU backend, outputs poisoned with NaN;
/// `limits` are the scratch limits to run the backward under (`None`: the whole scratch). Every
/// check prints a RESULT line naming the kernels that ran; the test fails at the end, listing every
/// failed check (a NaN is a failure).
fn attention_checks(limits: &[Option<usize>], wanted: impl Fn(&AttnCase) -> bool) {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut failures: Vec<String> = Vec::new();
    // A check that records its failure instead of panicking.
    fn soft(failures: &mut Vec<String>, op: String, got: &[f32], want: &[f32], bound: f64) {
        match try_rel_err(got, want) {
            Ok(e) => {
                println!("RESULT {op:<70} rel_err {e:9.3e}  bound {bound:7.1e}  {}", if e <= bound { "ok" } else { "FAIL" });
                if e > bound {
                    failures.push(format!("{op}: relative error {e:e} > {bound:e}"));
                }
            }
            Err(why) => {
                println!("RESULT {op:<70} {why}  FAIL");
                failures.push(format!("{op}: {why}"));
            }
        }
    }
    // Under a sanitizer (scripts/gpu/gpu_check.sh memcheck / racecheck) the long cases take too long.
    let short_only = std::env::var_os("TUNESTUDIO_TEST_SHORT").is_some();
    let card = be.card().describe();
    for (i, case) in attn_cases().into_iter().enumerate() {
        if !wanted(&case) || (short_only && case.long()) {
            continue;
        }
        let AttnCase { shape, segments } = case;
        let AttnShape { batch, seq, heads, kv_heads, head_dim, .. } = shape;
        // Fresh inputs per case (seeded by the case, so every card profile sees the same ones).
        let mut rng = ChaCha8Rng::seed_from_u64(109 + i as u64);
        let n = batch * seq;
        let (qn, kn) = (n * heads * head_dim, n * kv_heads * head_dim);
        let (q, k, v) = (randv(&mut rng, qn, 2.0), randv(&mut rng, kn, 2.0), randv(&mut rng, kn, 1.0));
        let dout = randv(&mut rng, qn, 1.0);
        let (mut out, mut lse) = (ct(&vec![0.0; qn]), ct(&vec![0.0; n * heads]));
        cpu.attention_fwd(&ct(&q), &ct(&k), &ct(&v), &segments, shape, &mut out, &mut lse).unwrap();
        let (mut dq, mut dk, mut dv) = (ct(&vec![0.0; qn]), ct(&vec![0.0; kn]), ct(&vec![0.0; kn]));
        cpu.attention_bwd(&ct(&dout), &ct(&q), &ct(&k), &ct(&v), &out, &lse, &segments, shape, &mut dq, &mut dk, &mut dv).unwrap();
        let (gq, gk, gv) = (be.upload(&q, DType::Act).unwrap(), be.upload(&k, DType::Act).unwrap(), be.upload(&v, DType::Act).unwrap());
        let gdout = be.upload(&dout, DType::Act).unwrap();
        let gseg = be.upload_ids(&segments).unwrap();
        // Rows of one segment each may also run as plain causal rows (cuDNN's attention where
        // this card decides for it): then both ways are checked.
        let one_segment_rows = segments.chunks(seq).all(|row| row.iter().all(|&s| s == row[0]));
        let ways: &[bool] = if one_segment_rows { &[false, true] } else { &[false] };
        for &causal_rows in ways {
            let shape = AttnShape { causal_rows, ..shape };
            be.set_attention_scratch_limit(None);
            // The scratch comes first: the backend decides for cuDNN only where the backward fits it.
            be.reserve_attention(shape).unwrap();
            let kern = be.attention_kernels(head_dim).unwrap_or_else(|e| panic!("{card}: head_dim {head_dim}: {e}"));
            let on_cudnn = be.attention_on_cudnn(shape);
            let name = |k: &str| if on_cudnn { be.cudnn_attention().unwrap_or_default() } else { k.to_string() };
            let win = shape.window.map(|w| format!(" win={w}")).unwrap_or_default();
            let tag = format!("{} b={batch} s={seq} h={heads} kv={kv_heads} hd={head_dim}{win}", name(kern.fwd.kernel.symbol()));
            let mut gout = poisoned(&be, qn, DType::Act);
            let mut glse = poisoned(&be, n * heads, DType::F32);
            be.attention_fwd(&gq, &gk, &gv, &gseg, shape, &mut gout, &mut glse).unwrap();
            let (gout_h, glse_h) = (be.download(&gout).unwrap(), be.download(&glse).unwrap());
            // P is rounded to bf16 before P·V, and the output is bf16.
            soft(&mut failures, format!("attention fwd out [{tag}]"), &gout_h, &out.0, 8e-3);
            // Scores from bf16 inputs with f32 accumulation in another order.
            soft(&mut failures, format!("attention fwd lse [{tag}]"), &glse_h, &lse.0, 1e-5);

            // Each side differentiates its own forward (outputs and LSE as it saved them); the
            // GPU's must be finite to be worth differentiating.
            if gout_h.iter().chain(&glse_h).any(|x| !x.is_finite()) {
                failures.push(format!("attention bwd [{tag}]: not run, the forward wrote non-finite values"));
                continue;
            }
            for &limit in limits {
                be.set_attention_scratch_limit(limit.map(|units| units * attn_unit_bytes(shape)));
                let split = limit.map(|u| format!(" scratch {u} unit(s)")).unwrap_or_default();
                let on_cudnn = be.attention_on_cudnn(shape);
                let bwd_name = if on_cudnn { be.cudnn_attention().unwrap_or_default() } else { kern.bwd.kernel.symbol().to_string() };
                let tag = format!("{bwd_name}{split} b={batch} s={seq} h={heads} kv={kv_heads} hd={head_dim}{win}");
                let (mut gdq, mut gdk, mut gdv) =
                    (poisoned(&be, qn, DType::Act), poisoned(&be, kn, DType::Act), poisoned(&be, kn, DType::Act));
                be.attention_bwd(&gdout, &gq, &gk, &gv, &gout, &glse, &gseg, shape, &mut gdq, &mut gdk, &mut gdv).unwrap();
                // dS = P∘(dP − D) is rounded to bf16 before the dQ and dK products and involves a
                // cancellation; P is bf16 in the dV product.
                soft(&mut failures, format!("attention bwd dq [{tag}]"), &be.download(&gdq).unwrap(), &dq.0, 2e-2);
                soft(&mut failures, format!("attention bwd dk [{tag}]"), &be.download(&gdk).unwrap(), &dk.0, 2e-2);
                soft(&mut failures, format!("attention bwd dv [{tag}]"), &be.download(&gdv).unwrap(), &dv.0, 1e-2);
            }
        }
        be.set_attention_scratch_limit(None);
    }
    assert!(failures.is_empty(), "{} attention check(s) failed on {card}:\n{}", failures.len(), failures.join("\n"));
}

/// Every case with the whole scratch: each backward is one launch.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_forward_and_backward() {
    attention_checks(&[None], |_| true);
}

/// The backward split into launches of one, then three, (sequence, kv head) units: the pointer
/// offsets of a launch that starts past the first sequence or kv head, and a last launch with
/// fewer units.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_backward_split() {
    attention_checks(&[Some(1), Some(3)], |c| !c.long() && c.shape.batch * c.shape.kv_heads > 1);
}

/// What the backend allocates at creation, then when the Trainer reserves the attention scratch,
/// is what the memory plan lists for the CUDA workspace (without the NF4 dequantization buffer,
/// which comes with the weights).
#[test]
#[ignore = "needs a CUDA GPU"]
fn backend_scratch_is_the_planned_workspace() {
    use tunestudio::config::{CheckpointPolicy, LoraConfig, Quantization};
    use tunestudio::engine::plan::{self, BackendKind, PlanInput};
    let be = gpu();
    let spec = tunestudio::model::ModelSpec::llama3_8b();
    let input = PlanInput {
        lora: LoraConfig::default(),
        quantization: Quantization::Bf16,
        batch_size: 1,
        max_seq_len: 65536,
        checkpointing: CheckpointPolicy::Layer,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    let planned: Vec<_> = plan::cuda_workspace(&spec, &input, false);
    let (attn, at_creation): (Vec<_>, Vec<_>) = planned.iter().partition(|b| b.name == "attention.bwd_scratch");
    let sum = |v: &[&plan::PlannedBuffer]| v.iter().map(|b| b.footprint(BackendKind::Cuda)).sum::<u64>();
    println!(
        "MEMORY backend at creation: {} bytes in {} allocations, planned {} bytes in {}",
        be.memory_used(),
        be.allocation_count(),
        sum(&at_creation),
        at_creation.len()
    );
    assert_eq!(be.memory_used() as u64, sum(&at_creation), "backend scratch differs from plan::cuda_workspace");
    // The small scratch is one block.
    let small = tunestudio::backend::workspace::SMALL_SCRATCH.len();
    assert_eq!(be.allocation_count(), at_creation.len() - small + 1, "allocation count differs from plan::cuda_workspace");
    be.reserve_attention(plan::attention_max_shape(&spec, input.batch_size, input.max_seq_len)).unwrap();
    println!("MEMORY after reserve_attention at 64K tokens: {} bytes, planned {}", be.memory_used(), sum(&at_creation) + sum(&attn));
    assert_eq!(be.memory_used() as u64, sum(&at_creation) + sum(&attn), "attention scratch differs from the plan");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lm_head_cross_entropy_chunked() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(110);
    // (rows, d, vocab, grad_scale, trainable head rows): the first has several loss chunks and a
    // vocabulary that is not a multiple of 8 (scalar paths); the second the vector paths.
    let cases: [(usize, usize, usize, f32, Vec<i32>); 3] =
        [(1500, 64, 50021, 0.37, vec![5, 17, 50020]), (300, 128, 32000, 1.0, vec![]), (10, 8, 23, 0.5, vec![0])];
    for (n, d, vocab, gs, rows) in cases {
        let tag = format!("n={n} d={d} vocab={vocab} head_rows={}", rows.len());
        let h = randv(&mut rng, n * d, 1.0);
        let head = randv(&mut rng, vocab * d, 0.5);
        let targets: Vec<i32> = (0..n).map(|i| if i % 7 == 3 { -100 } else { rng.random_range(0..vocab as i32) }).collect();
        let k = rows.len();
        let g0: Vec<f32> = (0..k * d).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let mut cdh = ct(&vec![0.0; n * d]);
        let mut cgrad = ct(&g0);
        let want = cpu
            .lm_head_ce(&ct(&h), &ct(&head), &targets, n, d, vocab, gs, &mut cdh, if k > 0 { Some((&rows, &mut cgrad)) } else { None })
            .unwrap();
        let (gh, ghead, gt) = (be.upload(&h, DType::Act).unwrap(), be.upload(&head, DType::Act).unwrap(), be.upload_ids(&targets).unwrap());
        let mut gdh = poisoned(&be, n * d, DType::Act);
        let grows = be.upload_ids(&rows).unwrap();
        let mut ggrad = be.upload(&g0, DType::F32).unwrap();
        let got =
            be.lm_head_ce(&gh, &ghead, &gt, n, d, vocab, gs, &mut gdh, if k > 0 { Some((&grows, &mut ggrad)) } else { None }).unwrap();
        assert_eq!(got.count, want.count, "trained token count [{tag}]");
        // Logits in f32 from the same bf16 values; sums in f64.
        check(&format!("lm_head_ce loss sum [{tag}]"), &[got.sum as f32], &[want.sum as f32], 1e-5);
        // The gradient logits are rounded to bf16 before dh = dlogits · head.
        check(&format!("lm_head_ce dh [{tag}]"), &be.download(&gdh).unwrap(), &cdh.0, 1e-2);
        if k > 0 {
            // f32 gradient logits times bf16 h, f32 sums.
            check(&format!("lm_head_ce head rows [{tag}]"), &be.download(&ggrad).unwrap(), &cgrad.0, 1e-4);
        }
        // Evaluation (grad_scale 0): the same loss, and dh all zeros.
        be.fill(&mut gdh, f32::NAN).unwrap();
        let eval = be.lm_head_ce(&gh, &ghead, &gt, n, d, vocab, 0.0, &mut gdh, None).unwrap();
        assert_eq!(eval.count, got.count);
        assert!((eval.sum - got.sum).abs() <= 1e-9 * got.sum.abs().max(1.0), "evaluation loss differs: {} vs {}", eval.sum, got.sum);
        assert!(be.download(&gdh).unwrap().iter().all(|&v| v == 0.0), "evaluation leaves dh zero [{tag}]");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sum_squares_is_exact_and_deterministic() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(111);
    // A tensor longer than one launch's partial sums (cut into pieces), a bf16 one, a short one,
    // and the short one again thousands of times: more tensors than one launch's list and more
    // launches than the backend reads back at once.
    let tensors = [(9_000_011usize, DType::F32), (12345, DType::Act), (3, DType::F32)];
    let host: Vec<Vec<f32>> = tensors
        .iter()
        .map(
            |&(n, dtype)| {
                if dtype == DType::Act { randv(&mut rng, n, 1.0) } else { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() }
            },
        )
        .collect();
    let cts: Vec<CpuTensor<f32>> = host.iter().map(|x| ct(x)).collect();
    let gts: Vec<_> = host.iter().zip(&tensors).map(|(x, &(_, dtype))| be.upload(x, dtype).unwrap()).collect();
    for (what, picks) in [
        ("one f32 tensor in pieces", vec![0]),
        ("one bf16 tensor", vec![1]),
        ("one short tensor", vec![2]),
        ("all three", vec![0, 1, 2]),
        ("7000 tensors", (0..7000).map(|i| if i % 1000 == 0 { i / 1000 % 3 } else { 2 }).collect()),
    ] {
        let want = cpu.sum_squares(&picks.iter().map(|&i| (&cts[i], tensors[i].0)).collect::<Vec<_>>()).unwrap();
        let list: Vec<_> = picks.iter().map(|&i| (&gts[i], tensors[i].0)).collect();
        let got = be.sum_squares(&list).unwrap();
        let again = be.sum_squares(&list).unwrap();
        assert_eq!(got.to_bits(), again.to_bits(), "sum_squares must be deterministic ({what})");
        let e = ((got - want) / want).abs();
        println!(
            "RESULT {:<44} rel_err {e:9.3e}  bound {:7.1e}  {}",
            format!("sum_squares ({what})"),
            1e-12,
            if e <= 1e-12 { "ok" } else { "FAIL" }
        );
        // f64 accumulation of exactly representable squares on both sides.
        assert!(e <= 1e-12, "sum_squares ({what}) rel err {e:e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_matches_torch_semantics() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(112);
    // More tensors than one launch takes, of sizes around a block's chunk, some with a compute
    // copy to refresh.
    let sizes: Vec<usize> = (0..100).map(|i| [1, 1023, 1024, 1025, 10007, 131072][i % 6] + i).collect();
    let host: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
    let mut cpu_state: Vec<[CpuTensor<f32>; 3]> = host.iter().map(|p| [ct(p), ct(&vec![0.0; p.len()]), ct(&vec![0.0; p.len()])]).collect();
    let mut gpu_state: Vec<_> = host
        .iter()
        .map(|p| {
            let n = p.len();
            [be.upload(p, DType::F32).unwrap(), be.alloc(n, DType::F32).unwrap(), be.alloc(n, DType::F32).unwrap()]
        })
        .collect();
    let mut compute: Vec<_> = sizes.iter().map(|&n| be.alloc(n, DType::Act).unwrap()).collect();
    for c in &mut compute {
        be.fill(c, 7.0).unwrap();
    }
    let with_copy = |i: usize| i % 3 != 1;
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.random_range(-0.01f32..0.01)).collect()).collect();
        let hp = AdamW { lr: 1e-3 * step as f32, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 0.5 };
        let cg: Vec<_> = grads.iter().map(|g| ct(g)).collect();
        let gg: Vec<_> = grads.iter().map(|g| be.upload(g, DType::F32).unwrap()).collect();
        let mut update: Vec<_> = cpu_state
            .iter_mut()
            .zip(&cg)
            .zip(&sizes)
            .map(|(([p, m, v], grad), &n)| AdamwTensor { param: p, grad, m, v, compute: None, n })
            .collect();
        cpu.adamw(&mut update, hp).unwrap();
        let mut update: Vec<_> = gpu_state
            .iter_mut()
            .zip(&gg)
            .zip(compute.iter_mut())
            .enumerate()
            .map(|(i, (([p, m, v], grad), c))| AdamwTensor { param: p, grad, m, v, compute: with_copy(i).then_some(c), n: sizes[i] })
            .collect();
        be.adamw(&mut update, hp).unwrap();
    }
    let flat = |ts: Vec<Vec<f32>>| ts.concat();
    // All f32; only fused multiply-adds differ.
    for (k, what) in ["param", "m", "v"].into_iter().enumerate() {
        let got = flat(gpu_state.iter().map(|s| be.download(&s[k]).unwrap()).collect());
        let want = flat(cpu_state.iter().map(|s| s[k].0.clone()).collect());
        check(&format!("adamw {what} (100 tensors)"), &got, &want, 1e-6);
    }
    // The compute copy is the updated master rounded to bf16, bit for bit, where one was asked for;
    // the others are untouched.
    for (i, c) in compute.iter().enumerate() {
        let copy = be.download(c).unwrap();
        if with_copy(i) {
            let master = be.download(&gpu_state[i][0]).unwrap();
            let rounded: Vec<f32> = master.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
            assert_eq!(copy, rounded, "compute copy of tensor {i} is the master rounded to bf16");
        } else {
            assert!(copy.iter().all(|&x| x == 7.0), "tensor {i} asked for no compute copy, yet its copy changed");
        }
    }
}
