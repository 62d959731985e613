//! The engine against transformers, PEFT and bitsandbytes, through fixtures those tools produced
//! on a GPU host (`tests/interop/run_on_gpu.sh`): tiny random models with PEFT adapters and the
//! losses HF and PEFT computed, a `*-bnb-4bit` checkpoint with bnb's dequantization of it, and an
//! adapter exported from a demo run with the loss PEFT computed from it.
//!
//! Tolerance: 1e-4 relative on a loss sum. Both sides compute in f32 from identical weights; what
//! differs is the order of additions (GEMM blocking, attention, softmax), which moves a ~5-nat loss
//! by about 1e-6. A wrong rotary convention, scale, bias or token row moves it by 1e-2 or more.
//!
//! `INTEROP_FIXTURES` and `INTEROP_DEMO` point the tests at other folders (the GPU script runs this
//! binary against freshly made fixtures before they are committed).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tunestudio::adapter::load_peft;
use tunestudio::config::{Quantization, Target};
use tunestudio::engine::model::{WeightSource, linear_name};
use tunestudio::eval::{EvalOptions, Scorer, evaluate};
use tunestudio::export::merged::{MergeDtype, MergeInput, MergeOptions, export_merged};
use tunestudio::model::{ModelSpec, WeightStore};

const REL_TOL: f64 = 1e-4;
const MODELS: [&str; 3] = ["llama_gqa", "llama_tied", "qwen2_bias"];
/// Qwen3 (q/k norms, its own head_dim, tied), Gemma 3's text model (sliding window, local and
/// global RoPE, query_pre_attn_scalar, GeGLU, (1 + w) norms, scaled embedding) and the text model
/// of a multimodal Gemma 3 folder; made on the CPU by `make_interop_fixtures.py models FX NAMES`.
const FAMILY_MODELS: [&str; 3] = ["qwen3_tied", "gemma3_text", "gemma3_mm"];
/// Per-token logits: the largest difference, relative to the largest logit. The same f32 sums in
/// other orders move a logit by about 1e-6 of its scale; a wrong mask, scale or norm by 1e-2.
const LOGIT_TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    std::env::var_os("INTEROP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop"))
}

fn demo() -> PathBuf {
    std::env::var_os("INTEROP_DEMO").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo"))
}

fn expected() -> Value {
    let p = fixtures().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// `expected[path...]["sum"]`, failing with the path when the fixture lacks it.
fn want_sum(e: &Value, path: &[&str]) -> (f64, usize) {
    let mut v = e;
    for k in path {
        v = v.get(k).unwrap_or_else(|| panic!("expected.json has no {path:?}: refresh the fixtures with tests/interop/run_on_gpu.sh"));
    }
    (v["sum"].as_f64().unwrap(), v["count"].as_u64().unwrap() as usize)
}

fn token_seqs() -> Vec<(Vec<u32>, Vec<i32>)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let labels = s["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
            (ids, labels)
        })
        .collect()
}

fn our_loss(model: &Path, adapter: Option<&Path>, quant: Quantization) -> (f64, usize) {
    let seqs = token_seqs();
    let max = seqs.iter().map(|s| s.0.len()).max().unwrap();
    // Batches of two: padding and several rows per forward are exercised too.
    let mut scorer = Scorer::open(model, adapter, quant, 2, max, 0).unwrap();
    let pairs: Vec<(&[u32], &[i32])> = seqs.iter().map(|(i, l)| (i.as_slice(), l.as_slice())).collect();
    let parts = scorer.score(&pairs).unwrap();
    (parts.iter().map(|p| p.sum).sum(), parts.iter().map(|p| p.count).sum())
}

fn assert_close(what: &str, ours: (f64, usize), theirs: (f64, usize)) {
    assert_eq!(ours.1, theirs.1, "{what}: scored {} tokens, the reference {}", ours.1, theirs.1);
    let rel = (ours.0 - theirs.0).abs() / theirs.0.abs();
    eprintln!("{what}: ours {:.9} / theirs {:.9} over {} tokens, relative difference {rel:.2e}", ours.0, theirs.0, ours.1);
    assert!(rel < REL_TOL, "{what}: loss sum {} vs the reference's {} (relative difference {rel:.2e})", ours.0, theirs.0);
}

#[test]
fn base_forward_matches_transformers() {
    let e = expected();
    for m in MODELS {
        let ours = our_loss(&fixtures().join(m), None, Quantization::Bf16);
        assert_close(&format!("{m} base"), ours, want_sum(&e, &[m, "base"]));
    }
}

#[test]
fn peft_adapters_load_and_match_peft() {
    let e = expected();
    for m in MODELS {
        let dir = fixtures().join(m);
        let adapter = fixtures().join(format!("{m}_adapter"));
        let a = load_peft(&adapter, &ModelSpec::from_dir(&dir).unwrap()).unwrap();
        // Two of the three carry PEFT trainable tokens; they must be read, not skipped.
        assert_eq!(a.token_rows.is_some(), m != "qwen2_bias", "{m}: trainable tokens");
        let ours = our_loss(&dir, Some(&adapter), Quantization::Bf16);
        assert_close(&format!("{m} + PEFT adapter"), ours, want_sum(&e, &[m, "peft"]));
    }
}

#[test]
fn merged_exports_give_what_transformers_computed_from_them() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    for m in MODELS {
        let input = MergeInput::from_adapter(&fixtures().join(m), &fixtures().join(format!("{m}_adapter")), Quantization::Bf16).unwrap();
        // f32: the merge itself is exact up to rounding, so it must give the adapter's loss.
        let f32_dir = tmp.path().join(format!("{m}-f32"));
        export_merged(&input, &f32_dir, &MergeOptions { dtype: MergeDtype::F32, ..Default::default() }).unwrap();
        let ours = our_loss(&f32_dir, None, Quantization::Bf16);
        assert_close(&format!("{m} merged f32 vs PEFT"), ours, want_sum(&e, &[m, "peft"]));
        assert_close(&format!("{m} merged f32 vs HF on the same folder"), ours, want_sum(&e, &[m, "merged_f32_hf"]));
        // bf16, sharded small: HF's loss on the folder the GPU run wrote from these same inputs.
        let bf16_dir = tmp.path().join(format!("{m}-bf16"));
        let s = export_merged(&input, &bf16_dir, &MergeOptions { dtype: MergeDtype::Bf16, max_shard_bytes: 40_000 }).unwrap();
        assert!(s.shards.len() > 1 && bf16_dir.join("model.safetensors.index.json").exists(), "{m}: {:?}", s.shards);
        let ours = our_loss(&bf16_dir, None, Quantization::Bf16);
        assert_close(&format!("{m} merged bf16 vs HF on the same folder"), ours, want_sum(&e, &[m, "merged_bf16_hf"]));
    }
}

#[test]
fn bnb_4bit_checkpoint_is_read_as_stored_and_matches_bitsandbytes() {
    let dir = fixtures().join("bnb4bit");
    let spec = ModelSpec::from_dir(&dir).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    // Both dtypes widen to f32 exactly, so comparing f32 bits compares bnb's bits.
    let reference = tunestudio::model::weights::read_small_f32(&fixtures().join("bnb4bit_reference.safetensors")).unwrap();
    let bits = |key: String| -> Vec<u32> {
        reference.get(&key).unwrap_or_else(|| panic!("{key} missing from the reference")).1.iter().map(|x| x.to_bits()).collect()
    };
    for l in 0..spec.num_layers {
        for t in Target::ALL {
            let name = format!("{}.weight", linear_name(l, t));
            let shape = spec.linear_shape(t);
            let tunestudio::backend::HostWeight::Nf4(q) = store.linear(&name, shape, Quantization::Nf4).unwrap() else {
                panic!("{name}: a pre-quantized linear must come back as NF4");
            };
            // Taken as stored, not requantized: the packed bytes are the file's.
            assert_eq!(q.packed, store.bytes(&name).unwrap(), "{name}: packed codes");
            let want_bf16 = bits(format!("{name}.bf16"));
            let bf16: Vec<u32> = q.dequantize_bf16().iter().map(|x| x.to_f32().to_bits()).collect();
            assert!(bf16 == want_bf16, "{name}: bf16 dequantization differs from bitsandbytes'");
            let f32s: Vec<u32> = q.dequantize_f32().iter().map(|x| x.to_bits()).collect();
            assert!(f32s == bits(format!("{name}.f32")), "{name}: f32 dequantization differs from bitsandbytes'");
            // With quantization = "bf16" the weight is bnb's bf16 dequantization.
            let tunestudio::backend::HostWeight::Dense { data, .. } = store.linear(&name, shape, Quantization::Bf16).unwrap() else {
                panic!("{name}: bf16 must dequantize");
            };
            assert!(data.iter().map(|x| x.to_bits()).eq(want_bf16.iter().copied()), "{name}: bf16 path");
        }
    }
    let ours = our_loss(&dir, None, Quantization::Bf16);
    assert_close("bnb-4bit checkpoint (bf16 dequantized) vs HF", ours, want_sum(&expected(), &["bnb4bit", "dequantized_bf16_f32"]));
}

#[test]
fn bnb_4bit_checkpoint_trains() {
    use tunestudio::config::LoraConfig;
    use tunestudio::engine::{EngineOptions, Trainer};
    let dir = fixtures().join("bnb4bit");
    let spec = ModelSpec::from_dir(&dir).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let seqs = token_seqs();
    let max = seqs.iter().map(|s| s.0.len()).max().unwrap();
    let opts = EngineOptions {
        lora: LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() },
        optim: Default::default(),
        quantization: Quantization::Nf4,
        batch_size: seqs.len(),
        max_seq_len: max,
        checkpointing: Default::default(),
        seed: 1,
        mlp_chunk_rows: 0,
        saved_attention: tunestudio::engine::plan::SavedAttention::Off,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    };
    let mut t = Trainer::new(tunestudio::backend::cpu::CpuBackend::<f32>::new(), spec, &store, opts, None).unwrap();
    let pairs: Vec<(&[u32], &[i32])> = seqs.iter().map(|(i, l)| (i.as_slice(), l.as_slice())).collect();
    let batch = tunestudio::data::Batch::from_examples(&pairs, 0, None);
    let losses: Vec<f64> = (0..3).map(|_| t.train_step(std::slice::from_ref(&batch), 1e-2).unwrap().loss).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[2] < losses[0], "three steps on one batch must lower its loss: {losses:?}");
}

fn demo_eval(quant: Quantization) -> tunestudio::eval::EvalReport {
    let mut o = EvalOptions::new(demo().join("model"), fixtures().join("demo_fix/eval.jsonl"));
    o.adapter = Some(fixtures().join("demo_adapter"));
    o.quantization = quant;
    o.max_seq_len = 256;
    evaluate(&o).unwrap()
}

#[test]
fn demo_adapter_exported_by_tunestudio_matches_peft() {
    let e = expected();
    for (q, key) in [(Quantization::Nf4, "peft_nf4"), (Quantization::Bf16, "peft_bf16")] {
        let r = demo_eval(q);
        assert_eq!(r.token_rows, 1, "the demo fix run trains one reserved token row");
        assert_close(&format!("demo eval ({key})"), (r.loss_sum, r.tokens), want_sum(&e, &["demo", key]));
    }
}

#[test]
fn demo_merged_export_matches_what_transformers_computed() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    let input = MergeInput::from_adapter(&demo().join("model"), &fixtures().join("demo_adapter"), Quantization::Nf4).unwrap();
    let reference = demo_eval(Quantization::Nf4);
    for (dt, key) in [(MergeDtype::F32, "merged_f32_hf"), (MergeDtype::Bf16, "merged_bf16_hf")] {
        let dir = tmp.path().join(key);
        export_merged(&input, &dir, &MergeOptions { dtype: dt, ..Default::default() }).unwrap();
        let mut o = EvalOptions::new(dir.clone(), fixtures().join("demo_fix/eval.jsonl"));
        o.max_seq_len = 256;
        let r = evaluate(&o).unwrap();
        assert_close(&format!("demo merged ({key}) vs HF"), (r.loss_sum, r.tokens), want_sum(&e, &["demo", key]));
        if dt == MergeDtype::F32 {
            assert_close("demo merged f32 vs base + adapter", (r.loss_sum, r.tokens), (reference.loss_sum, reference.tokens));
        }
    }
}

#[test]
fn qwen3_and_gemma3_forward_matches_transformers_loss_and_logits() {
    let e = expected();
    let seqs = token_seqs();
    for m in FAMILY_MODELS {
        let dir = fixtures().join(m);
        let ours = our_loss(&dir, None, Quantization::Bf16);
        assert_close(&format!("{m} base"), ours, want_sum(&e, &[m, "base"]));
        let theirs = tunestudio::model::weights::read_small_f32(&fixtures().join(format!("{m}_logits.safetensors"))).unwrap();
        let max = seqs.iter().map(|s| s.0.len()).max().unwrap();
        let mut scorer = Scorer::open(&dir, None, Quantization::Bf16, 1, max, 0).unwrap();
        for (i, (ids, _)) in seqs.iter().enumerate() {
            let (shape, want) = &theirs[&format!("seq{i}")];
            let got = scorer.logits(ids).unwrap();
            assert_eq!(shape.iter().product::<usize>(), got.len(), "{m} seq{i}: logits shape {shape:?}");
            let scale = want.iter().fold(0f64, |a, &x| a.max(x.abs() as f64));
            let worst = got.iter().zip(want).fold(0f64, |a, (&g, &w)| a.max((g as f64 - w as f64).abs()));
            eprintln!("{m} seq{i}: max |logit difference| {worst:.3e} of logits up to {scale:.2}");
            assert!(worst / scale < LOGIT_TOL, "{m} seq{i}: logits differ by {worst:e} (scale {scale})");
        }
    }
}

#[test]
fn qwen3_and_gemma3_peft_adapters_match_peft() {
    let e = expected();
    for m in FAMILY_MODELS {
        let dir = fixtures().join(m);
        let adapter = fixtures().join(format!("{m}_adapter"));
        let a = load_peft(&adapter, &ModelSpec::from_dir(&dir).unwrap()).unwrap();
        // Trainable tokens on the two text models; a regex over the text model's modules on the
        // multimodal one (the adapted linears are read from the weights file).
        assert_eq!(a.token_rows.is_some(), m != "gemma3_mm", "{m}: trainable tokens");
        assert_eq!(a.lora.targets, Target::ALL.to_vec(), "{m}: targets");
        let ours = our_loss(&dir, Some(&adapter), Quantization::Bf16);
        assert_close(&format!("{m} + PEFT adapter"), ours, want_sum(&e, &[m, "peft"]));
    }
}

#[test]
fn qwen3_and_gemma3_merged_exports_give_what_transformers_computed_from_them() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    for m in FAMILY_MODELS {
        let input = MergeInput::from_adapter(&fixtures().join(m), &fixtures().join(format!("{m}_adapter")), Quantization::Bf16).unwrap();
        let f32_dir = tmp.path().join(format!("{m}-f32"));
        export_merged(&input, &f32_dir, &MergeOptions { dtype: MergeDtype::F32, ..Default::default() }).unwrap();
        let ours = our_loss(&f32_dir, None, Quantization::Bf16);
        assert_close(&format!("{m} merged f32 vs PEFT"), ours, want_sum(&e, &[m, "peft"]));
        assert_close(&format!("{m} merged f32 vs HF on the same folder"), ours, want_sum(&e, &[m, "merged_f32_hf"]));
        let bf16_dir = tmp.path().join(format!("{m}-bf16"));
        export_merged(&input, &bf16_dir, &MergeOptions { dtype: MergeDtype::Bf16, max_shard_bytes: 40_000 }).unwrap();
        let ours = our_loss(&bf16_dir, None, Quantization::Bf16);
        assert_close(&format!("{m} merged bf16 vs HF on the same folder"), ours, want_sum(&e, &[m, "merged_bf16_hf"]));
    }
    // The multimodal folder keeps its layout and its vision tower.
    let names = |dir: &Path| -> std::collections::BTreeSet<String> {
        let store = WeightStore::open(dir).unwrap();
        store.names().map(|n| store.original_name(n).to_string()).collect()
    };
    assert_eq!(names(&fixtures().join("gemma3_mm")), names(&tmp.path().join("gemma3_mm-bf16")));
}

/// `cargo test --release --test interop_fixtures -- --ignored write_trained_adapters`: train a
/// LoRA adapter (and two token rows on the text models) on each new family's fixture for a few
/// steps on the CPU and export it for PEFT as `<model>_trained_adapter`; `make_interop_fixtures.py
/// trained FX` then records PEFT's loss with it, which `adapters_we_trained_match_peft` checks.
#[test]
#[ignore = "writes fixtures"]
fn write_trained_adapters() {
    use tunestudio::config::LoraConfig;
    use tunestudio::engine::{EngineOptions, TokenRows, Trainer};
    let seqs = token_seqs();
    let max = seqs.iter().map(|s| s.0.len()).max().unwrap();
    let pairs: Vec<(&[u32], &[i32])> = seqs.iter().map(|(i, l)| (i.as_slice(), l.as_slice())).collect();
    let batch = tunestudio::data::Batch::from_examples(&pairs, 0, None);
    for m in FAMILY_MODELS {
        let dir = fixtures().join(m);
        let spec = ModelSpec::from_dir(&dir).unwrap();
        let store = WeightStore::open(&dir).unwrap();
        let lora = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
        let opts = EngineOptions {
            lora: lora.clone(),
            optim: Default::default(),
            quantization: Quantization::Bf16,
            batch_size: seqs.len(),
            max_seq_len: max,
            checkpointing: Default::default(),
            seed: 3,
            mlp_chunk_rows: 0,
            saved_attention: tunestudio::engine::plan::SavedAttention::Off,
            cached_weight_layers: 0,
            hold_mlp_weights: false,
        };
        let mut t = Trainer::new(tunestudio::backend::cpu::CpuBackend::<f32>::new(), spec.clone(), &store, opts, None).unwrap();
        let with_rows = m != "gemma3_mm";
        if with_rows {
            let d = spec.hidden_size;
            let table = store.f32("model.embed_tokens.weight", &[spec.vocab_size, d]).unwrap();
            let ids = vec![3u32, 90];
            let embed = ids.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
            t.set_token_rows(&TokenRows { ids, embed, head: None }).unwrap();
        }
        let losses: Vec<f64> = (0..4).map(|_| t.train_step(std::slice::from_ref(&batch), 2e-2).unwrap().loss).collect();
        assert!(losses[3] < losses[0], "{m}: {losses:?}");
        let rows = t.token_rows().unwrap();
        let out = fixtures().join(format!("{m}_trained_adapter"));
        let _ = std::fs::remove_dir_all(&out);
        let weights = t.lora_weights().unwrap();
        tunestudio::adapter::AdapterFiles { spec: &spec, weights: &weights, lora: &lora, base_model: m, tokens: rows.as_ref() }
            .save(&out)
            .unwrap();
        eprintln!("{m}: losses {losses:?}, adapter in {}", out.display());
    }
}

/// An adapter trained and exported by us, loaded by PEFT, gives the loss our eval gives.
#[test]
fn qwen3_and_gemma3_adapters_we_trained_match_peft() {
    let e = expected();
    for m in FAMILY_MODELS {
        let dir = fixtures().join(m);
        let adapter = fixtures().join(format!("{m}_trained_adapter"));
        let a = load_peft(&adapter, &ModelSpec::from_dir(&dir).unwrap()).unwrap();
        assert_eq!(a.token_rows.is_some(), m != "gemma3_mm", "{m}: trained token rows");
        let ours = our_loss(&dir, Some(&adapter), Quantization::Bf16);
        assert_close(&format!("{m} + the adapter we trained, vs PEFT"), ours, want_sum(&e, &[m, "trained_peft"]));
        let base = want_sum(&e, &[m, "base"]);
        assert!(ours.0 < base.0, "{m}: training lowered nothing ({} vs base {})", ours.0, base.0);
    }
}
