//! Exports as a user meets them: merged folders that are complete or absent, never half-written;
//! sharding and the index; config and generation config; adapters that carry the token rows a run
//! trained; `eval` on the command line.

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tunestudio::RunConfig;
use tunestudio::adapter::load_peft;
use tunestudio::config::Quantization;
use tunestudio::export::merged::{MergeDtype, MergeInput, MergeOptions, Sink, export_merged, export_merged_with};
use tunestudio::model::{ModelSpec, WeightStore};
use tunestudio::session::{Event, StartOptions, start};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fx(p: &str) -> PathBuf {
    root().join("tests/fixtures/interop").join(p)
}

fn gqa_input() -> MergeInput {
    MergeInput::from_adapter(&fx("llama_gqa"), &fx("llama_gqa_adapter"), Quantization::Bf16).unwrap()
}

/// A disk that fills up after `limit` bytes.
struct FullDisk {
    limit: u64,
    written: Cell<u64>,
}

struct Limited<'a> {
    disk: &'a FullDisk,
    inner: std::fs::File,
}

impl Write for Limited<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let w = self.disk.written.get();
        if w + buf.len() as u64 > self.disk.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device"));
        }
        self.disk.written.set(w + buf.len() as u64);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Sink for FullDisk {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write + '_>> {
        Ok(Box::new(Limited { disk: self, inner: std::fs::File::create(path)? }))
    }
}

#[test]
fn a_failure_part_way_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("merged");
    let opts = MergeOptions { dtype: MergeDtype::Bf16, max_shard_bytes: 40_000 };
    // Fail in the first shard, in a later shard, and while copying the small files at the end.
    let full_size: u64 = {
        let probe = tmp.path().join("probe");
        export_merged(&gqa_input(), &probe, &opts).unwrap();
        let size = std::fs::read_dir(&probe).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        std::fs::remove_dir_all(&probe).unwrap();
        size
    };
    for limit in [1_000, 60_000, full_size - 10] {
        let disk = FullDisk { limit, written: Cell::new(0) };
        let err = export_merged_with(&gqa_input(), &dest, &opts, &disk).unwrap_err().to_string();
        assert!(err.contains("No space left"), "limit {limit}: {err}");
        assert!(!dest.exists(), "limit {limit}: a partial export was left under the destination's name");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "limit {limit}: left behind {left:?}");
    }
    // The same export with room enough succeeds.
    let disk = FullDisk { limit: full_size, written: Cell::new(0) };
    export_merged_with(&gqa_input(), &dest, &opts, &disk).unwrap();
    assert!(dest.join("config.json").exists());
}

#[test]
fn an_existing_destination_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("merged");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("mine.txt"), "keep").unwrap();
    let err = export_merged(&gqa_input(), &dest, &MergeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("already exists") && err.contains("merged"), "{err}");
    assert_eq!(std::fs::read_to_string(dest.join("mine.txt")).unwrap(), "keep");
}

#[test]
fn shards_and_index_read_back_as_one_model() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    let s1 = export_merged(&gqa_input(), &one, &MergeOptions { dtype: MergeDtype::Bf16, ..Default::default() }).unwrap();
    let s2 = export_merged(&gqa_input(), &many, &MergeOptions { dtype: MergeDtype::Bf16, max_shard_bytes: 30_000 }).unwrap();
    assert_eq!(s1.shards, vec!["model.safetensors"]);
    assert!(!one.join("model.safetensors.index.json").exists());
    assert!(s2.shards.len() >= 3, "{:?}", s2.shards);
    assert_eq!(s2.shards[0], format!("model-00001-of-{:05}.safetensors", s2.shards.len()));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(many.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), s2.total_bytes);
    let (a, b) = (WeightStore::open(&one).unwrap(), WeightStore::open(&many).unwrap());
    let names: Vec<&str> = a.names().collect();
    assert_eq!(names, b.names().collect::<Vec<_>>());
    assert_eq!(index["weight_map"].as_object().unwrap().len(), names.len());
    for n in names {
        assert_eq!(a.bytes(n).unwrap(), b.bytes(n).unwrap(), "{n}");
        assert_eq!(a.get(n).unwrap().dtype, safetensors::Dtype::BF16, "{n}");
    }
}

#[test]
fn merged_config_is_dense_and_16_bit() {
    let tmp = tempfile::tempdir().unwrap();
    // From a bnb-4bit checkpoint: quantization_config must go, dtype must be the export's.
    let input = MergeInput { model: fx("bnb4bit"), quantization: Quantization::Nf4, adapter: None, token_rows: None, run_lock: None };
    let dest = tmp.path().join("m");
    let s = export_merged(&input, &dest, &MergeOptions { dtype: MergeDtype::F16, ..Default::default() }).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dest.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(cfg["dtype"], "float16");
    let store = WeightStore::open(&dest).unwrap();
    assert!(store.names().all(|n| !n.contains("absmax") && !n.contains("quant_")), "bnb parts leaked into the merged model");
    let spec = ModelSpec::from_dir(&dest).unwrap();
    assert_eq!(store.shape("model.layers.0.mlp.up_proj.weight").unwrap(), [spec.intermediate_size, spec.hidden_size]);
    assert_eq!(s.merged_linears, 0);
}

#[test]
fn merged_demo_stops_at_the_end_of_a_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("m");
    let input = MergeInput {
        model: root().join("assets/demo/model"),
        quantization: Quantization::Bf16,
        adapter: None,
        token_rows: None,
        run_lock: None,
    };
    let s = export_merged(&input, &dest, &MergeOptions::default()).unwrap();
    let tok = tunestudio::model::tokenizer::TokenizerBundle::load(&root().join("assets/demo/model")).unwrap();
    let eot = tok.token_id("<|eot_id|>").unwrap();
    assert_eq!(tunestudio::model::tokenizer::end_of_turn_token(&tok), Some(eot));
    assert!(s.eos_token_ids.contains(&eot), "{:?}", s.eos_token_ids);
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dest.join("generation_config.json")).unwrap()).unwrap();
    assert!(generation["eos_token_id"].as_array().unwrap().iter().any(|v| v.as_u64() == Some(eot as u64)), "{generation}");
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        assert_eq!(std::fs::read(dest.join(f)).unwrap(), std::fs::read(root().join("assets/demo/model").join(f)).unwrap(), "{f}");
    }
    // Without an adapter the bf16 export of a bf16 model is the model, bit for bit.
    let (a, b) = (WeightStore::open(&dest).unwrap(), WeightStore::open(&root().join("assets/demo/model")).unwrap());
    for n in b.names() {
        assert_eq!(a.bytes(n).unwrap(), b.bytes(n).unwrap(), "{n}");
    }
}

/// A two-step demo run whose data uses an untrained token, so the fix trains its rows.
fn token_fix_run(out: &Path) -> PathBuf {
    let mut cfg = RunConfig::load(&fx("demo_fix/run.toml")).unwrap();
    cfg.output.dir = out.to_path_buf();
    cfg.train.max_steps = Some(2);
    cfg.train.batch_size = 4;
    cfg.train.max_seq_len = 128;
    let h = start(cfg, StartOptions::default());
    let mut dir = None;
    for e in h.events.iter() {
        match e {
            Event::Finished(f) => dir = Some(f.run_dir),
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    h.join();
    dir.unwrap()
}

#[test]
fn exported_adapter_carries_the_trained_token_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let run = token_fix_run(tmp.path());
    assert!(run.join("token_fix.json").exists());
    let ckpt = tunestudio::session::checkpoint::load_latest(&run).unwrap();
    let rows = ckpt.token_rows.expect("the run trained token rows");
    let to = tmp.path().join("exported");
    tunestudio::export::run::export_adapter(&run, Some(&to)).unwrap();
    let spec = ModelSpec::from_dir(&root().join("assets/demo/model")).unwrap();
    let a = load_peft(&to, &spec).unwrap();
    assert_eq!(a.token_rows.as_ref(), Some(&rows), "the adapter must hold the checkpoint's rows");
    assert_eq!(a.weights, ckpt.weights);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(to.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["trainable_token_indices"], serde_json::json!({"embed_tokens": rows.ids, "lm_head": rows.ids}));
    // Exports never overwrite; the run's own adapter already carries the rows (issue 18), and
    // the in-place form rewrites it with the same content.
    assert!(tunestudio::export::run::export_adapter(&run, Some(&to)).is_err());
    assert_eq!(load_peft(&run.join("adapter"), &spec).unwrap().token_rows, Some(rows.clone()));
    tunestudio::export::run::export_adapter(&run, None).unwrap();
    assert_eq!(load_peft(&run.join("adapter"), &spec).unwrap().token_rows, Some(rows.clone()));

    // The merged export writes the rows into both tables.
    let merged = tmp.path().join("merged");
    export_merged(&MergeInput::from_run(&run).unwrap(), &merged, &MergeOptions { dtype: MergeDtype::F32, ..Default::default() }).unwrap();
    let store = WeightStore::open(&merged).unwrap();
    let d = spec.hidden_size;
    let id = rows.ids[0] as usize;
    let embed = store.f32_any_shape("model.embed_tokens.weight").unwrap();
    let head = store.f32_any_shape("lm_head.weight").unwrap();
    assert_eq!(&embed[id * d..(id + 1) * d], &rows.embed[..d]);
    assert_eq!(&head[id * d..(id + 1) * d], &rows.head.as_ref().unwrap()[..d]);

    // And eval with the adapter uses them: without the rows the token keeps its zero rows, which
    // scores the examples that use it differently.
    let mut o = tunestudio::eval::EvalOptions::new(root().join("assets/demo/model"), fx("demo_fix/eval.jsonl"));
    o.adapter = Some(to.clone());
    let with = tunestudio::eval::evaluate(&o).unwrap();
    o.adapter = Some(ckpt_adapter_without_rows(tmp.path(), &to));
    let without = tunestudio::eval::evaluate(&o).unwrap();
    assert_eq!(with.token_rows, 1);
    assert!((without.mean_loss - with.mean_loss).abs() > 1e-3, "with rows {} vs without {}", with.mean_loss, without.mean_loss);
}

/// A copy of `adapter` with the trainable tokens removed.
fn ckpt_adapter_without_rows(tmp: &Path, adapter: &Path) -> PathBuf {
    let spec = ModelSpec::from_dir(&root().join("assets/demo/model")).unwrap();
    let a = load_peft(adapter, &spec).unwrap();
    let out = tmp.join("no-rows");
    tunestudio::adapter::AdapterFiles { spec: &spec, weights: &a.weights, lora: &a.lora, base_model: "demo", tokens: None }
        .save(&out)
        .unwrap();
    out
}

#[test]
fn eval_on_the_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .args([
            "eval",
            root().join("assets/demo/model").to_str().unwrap(),
            "--data",
            root().join("assets/demo/data/eval.jsonl").to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (loss, ppl) = (v["mean_loss"].as_f64().unwrap(), v["perplexity"].as_f64().unwrap());
    assert!(loss > 0.1 && loss < 7.24, "demo base loss {loss} should beat a uniform guess");
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
    assert_eq!(v["rows"], 50);
    // A missing adapter names its file.
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .args([
            "eval",
            root().join("assets/demo/model").to_str().unwrap(),
            "--data",
            root().join("assets/demo/data/eval.jsonl").to_str().unwrap(),
            "--adapter",
            "/nonexistent/adapter",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent/adapter/adapter_config.json"), "{err}");
}
