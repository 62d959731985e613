//! NF4 against bitsandbytes itself: fixtures written on a CUDA host by
//! `tests/interop/make_nf4_fixtures.py` (bitsandbytes 0.50.2). Every comparison is bitwise;
//! the only tolerance is on our own `offset`, a mean whose last ulp depends on torch's
//! summation order (see `quantize_with_offset`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::{Dtype, SafeTensors};
use tunestudio::model::weights::WeightStore;
use tunestudio::quant::nf4::{Nf4Tensor, RawTensor, dynamic_map_signed};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4")
}

struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Stored {
    fn f32s(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => self.bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => panic!("expected a float tensor, got {d:?}"),
        }
    }
    fn bf16_bits(&self) -> Vec<u16> {
        assert_eq!(self.dtype, Dtype::BF16);
        self.bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    }
}

fn load(path: &Path) -> BTreeMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors().into_iter().map(|(n, v)| (n, Stored { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() })).collect()
}

fn get<'a>(t: &'a BTreeMap<String, Stored>, name: &str, file: &Path) -> &'a Stored {
    t.get(name).unwrap_or_else(|| panic!("{}: no tensor `{name}`", file.display()))
}

/// Fail (not skip) when the fixtures are missing: these tests are the proof of the format.
fn case_files() -> Vec<PathBuf> {
    let dir = fixture_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}. Generate the fixtures on a CUDA host with \
                 `python3 tests/interop/make_nf4_fixtures.py` and commit them.",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".safetensors")
                && !name.starts_with("linear4bit")
                && !name.starts_with("tiny_llama")
                && !name.starts_with("big_random")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{}: expected the 9 quantize cases, found {files:?}", dir.display());
    files
}

/// First differing position with context, or None.
fn first_diff<T: PartialEq + std::fmt::Debug>(ours: &[T], bnb: &[T]) -> Option<String> {
    if ours.len() != bnb.len() {
        return Some(format!("length {} vs bnb {}", ours.len(), bnb.len()));
    }
    let bad: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != bnb[i]).collect();
    bad.first().map(|&i| format!("{} of {} differ; first at {i}: ours {:?}, bnb {:?}", bad.len(), ours.len(), ours[i], bnb[i]))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Build the tensor bnb produced from the fixture's parts (not from our quantizer).
fn bnb_tensor(t: &BTreeMap<String, Stored>, file: &Path, shape: &[usize]) -> Nf4Tensor {
    let mut code2 = [0f32; 256];
    code2.copy_from_slice(&get(t, "code2", file).f32s());
    Nf4Tensor {
        shape: shape.to_vec(),
        packed: get(t, "packed", file).bytes.clone(),
        absmax_q: get(t, "absmax_q", file).bytes.clone(),
        absmax2: get(t, "absmax2", file).f32s(),
        offset: get(t, "offset", file).f32s()[0],
        code2,
        blocksize: 64,
        nested_blocksize: 256,
    }
}

fn check_case(file: &Path, t: &BTreeMap<String, Stored>) -> Vec<String> {
    let mut errs = Vec::new();
    let mut check = |what: &str, d: Option<String>| {
        if let Some(d) = d {
            errs.push(format!("{}: {what}: {d}", file.display()));
        }
    };
    let input = get(t, "input", file);
    let shape = input.shape.clone();
    let data = input.f32s();
    let bnb_offset = get(t, "offset", file).f32s()[0];

    check("code2 vs dynamic_map_signed()", first_diff(&bits(&dynamic_map_signed()), &bits(&get(t, "code2", file).f32s())));

    // Quantize: with bnb's offset every byte must match.
    let ours = Nf4Tensor::quantize_with_offset(&data, &shape, Some(bnb_offset));
    check("packed", first_diff(&ours.packed, &get(t, "packed", file).bytes));
    check("absmax_q", first_diff(&ours.absmax_q, &get(t, "absmax_q", file).bytes));
    check("absmax2", first_diff(&bits(&ours.absmax2), &bits(&get(t, "absmax2", file).f32s())));

    // Our own offset: the exactly rounded f32 sum times 1/n; torch's f32 tree sum may be an ulp
    // or two away.
    let own = Nf4Tensor::quantize(&data, &shape).offset;
    let ulps = (own.to_bits() as i64 - bnb_offset.to_bits() as i64).abs();
    if ulps > 2 {
        check("offset", Some(format!("ours {own:e} is {ulps} ulp from bnb's {bnb_offset:e}")));
    }
    println!("{}: offset {ulps} ulp from bnb's", file.file_name().unwrap().to_string_lossy());

    // Dequantize bnb's own parts.
    let theirs = bnb_tensor(t, file, &shape);
    check("absmax_deq", first_diff(&bits(&theirs.absmax()), &bits(&get(t, "absmax_deq", file).f32s())));
    let deq = get(t, "dequantized", file);
    match deq.dtype {
        Dtype::BF16 => {
            let ours: Vec<u16> = theirs.dequantize_bf16().iter().map(|x| x.to_bits()).collect();
            check("dequantized (bf16)", first_diff(&ours, &deq.bf16_bits()));
        }
        _ => check("dequantized (f32)", first_diff(&bits(&theirs.dequantize_f32()), &bits(&deq.f32s()))),
    }
    if let Some(d32) = t.get("dequantized_f32") {
        check("dequantized_f32", first_diff(&bits(&theirs.dequantize_f32()), &bits(&d32.f32s())));
    }
    errs
}

#[test]
fn bnb_quantize_4bit_fixtures_match_bit_for_bit() {
    let mut errs = Vec::new();
    for file in case_files() {
        let t = load(&file);
        errs.extend(check_case(&file, &t));
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// Compare one Linear4bit weight read through `from_bnb_parts` with bnb's dequantization and
/// re-quantize its bf16 source.
fn check_linear(name: &str, q: &Nf4Tensor, reference: &BTreeMap<String, Stored>, ref_file: &Path) -> Vec<String> {
    let mut errs = Vec::new();
    let deq = get(reference, &format!("{name}.dequantized"), ref_file);
    let diff = match deq.dtype {
        Dtype::BF16 => first_diff(&q.dequantize_bf16().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), &deq.bf16_bits()),
        _ => first_diff(&bits(&q.dequantize_f32()), &bits(&deq.f32s())),
    };
    if let Some(d) = diff {
        errs.push(format!("{name}: dequantized ({:?}): {d}", deq.dtype));
    }
    if q.shape != deq.shape {
        errs.push(format!("{name}: shape {:?} vs bnb's dequantized {:?}", q.shape, deq.shape));
    }
    let original = get(reference, &format!("{name}.original"), ref_file).f32s();
    let requant = Nf4Tensor::quantize_with_offset(&original, &q.shape, Some(q.offset));
    if requant != *q {
        let what = [
            first_diff(&requant.packed, &q.packed).map(|d| format!("packed: {d}")),
            first_diff(&requant.absmax_q, &q.absmax_q).map(|d| format!("absmax_q: {d}")),
            first_diff(&bits(&requant.absmax2), &bits(&q.absmax2)).map(|d| format!("absmax2: {d}")),
            first_diff(&bits(&requant.code2), &bits(&q.code2)).map(|d| format!("code2: {d}")),
        ];
        errs.push(format!("{name}: re-quantized source differs: {:?}", what.iter().flatten().collect::<Vec<_>>()));
    }
    errs
}

#[test]
fn bnb_linear4bit_state_dict_reads_and_requantizes() {
    let dir = fixture_dir();
    let file = dir.join("linear4bit_2layer.safetensors");
    let ref_file = dir.join("linear4bit_2layer_reference.safetensors");
    let sd = load(&file);
    let reference = load(&ref_file);
    let mut errs = Vec::new();
    for layer in ["up_proj", "down_proj"] {
        let name = format!("model.layers.0.mlp.{layer}.weight");
        let q = Nf4Tensor::from_bnb_parts(&name, Some(&file), |n| {
            sd.get(n).map(|s| RawTensor { dtype: s.dtype, shape: &s.shape, bytes: &s.bytes })
        })
        .unwrap_or_else(|e| panic!("{e}"));
        errs.extend(check_linear(&name, &q, &reference, &ref_file));
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

#[test]
fn transformers_bnb_4bit_checkpoint_loads() {
    let dir = fixture_dir();
    let store = WeightStore::open(&dir.join("tiny_llama_bnb4bit")).unwrap_or_else(|e| panic!("{e}"));
    let ref_file = dir.join("tiny_llama_reference.safetensors");
    let reference = load(&ref_file);
    let weights: Vec<String> = reference.keys().filter_map(|k| k.strip_suffix(".weight.original").map(|m| format!("{m}.weight"))).collect();
    assert_eq!(weights.len(), 7, "q, k, v, o, gate, up, down: {weights:?}");
    let mut errs = Vec::new();
    for name in &weights {
        let q = Nf4Tensor::from_weight_store(&store, name).unwrap_or_else(|e| panic!("{e}"));
        errs.extend(check_linear(name, &q, &reference, &ref_file));
    }
    // And a clear error for a weight that is not quantized.
    let err = Nf4Tensor::from_weight_store(&store, "model.embed_tokens.weight").unwrap_err().to_string();
    assert!(err.contains("model.embed_tokens.weight.quant_state.bitsandbytes__nf4") && err.contains("missing"), "{err}");
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// Millions of blocks through every path, against bnb: run on the GPU host after
/// `make_nf4_fixtures.py DIR --big N`, with `NF4_BIG_FIXTURE=DIR/big_random.safetensors`.
#[test]
#[ignore = "needs a big_random.safetensors made on a CUDA host (NF4_BIG_FIXTURE)"]
fn bnb_big_random_matches_bit_for_bit() {
    let path = PathBuf::from(std::env::var("NF4_BIG_FIXTURE").expect("set NF4_BIG_FIXTURE"));
    let t = load(&path);
    let errs = check_case(&path, &t);
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}

/// Throughput on this machine's cores: quantize and dequantize 256M bf16 values (a 7B model is
/// 28 such tensors' worth). Prints the rates; fails only if quantizing is slower than 20M/s.
#[test]
#[ignore = "timing: run with --ignored on a many-core host"]
fn quantize_throughput() {
    let n = 1usize << 28;
    let data: Vec<bf16> = (0..n).map(|i| bf16::from_f32(((i as f32) * 0.618_034).sin() * 0.02)).collect();
    let t0 = std::time::Instant::now();
    let q = Nf4Tensor::quantize_bf16(&data, &[n >> 12, 4096]);
    let quant_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let d = q.dequantize_bf16();
    let deq_s = t1.elapsed().as_secs_f64();
    println!(
        "{} threads: quantize {:.0} M/s, dequantize {:.0} M/s ({} values)",
        rayon::current_num_threads(),
        n as f64 / quant_s / 1e6,
        n as f64 / deq_s / 1e6,
        d.len()
    );
    assert!(n as f64 / quant_s > 20e6, "quantize ran at {:.1} M values/s", n as f64 / quant_s / 1e6);
}
