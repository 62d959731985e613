//! Merged export: the base model with the adapter folded in, as a 16-bit Hugging Face folder that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads without PEFT.
//!
//! Each linear becomes `W + s·B·A`, computed in f32 and rounded once to the output dtype. `W` is the
//! function the adapter was trained against: the dequantized NF4 weight when the run quantized the
//! base (or the checkpoint came pre-quantized), the stored 16-bit weight otherwise. Trained token
//! rows replace their rows of `embed_tokens` (and of an untied `lm_head`).
//!
//! The folder is built in a hidden sibling and renamed into place at the end, so a failure part way
//! (a full disk, a bad tensor) leaves nothing under the destination's name and no temporary folder
//! behind. Shards are streamed tensor by tensor: memory stays at about one f32 tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::{Value, json};

use crate::adapter::load_peft;
use crate::backend::HostWeight;
use crate::config::{LoraConfig, Quantization, Target};
use crate::engine::TokenRows;
use crate::engine::lora::LoraWeights;
use crate::engine::model::{WeightSource, bnb_quant_state_name, linear_name};
use crate::error::{Error, IoContext, Result};
use crate::model::tokenizer::{TokenizerBundle, end_of_turn_token};
use crate::model::{ModelSpec, WeightStore};

/// About 2 GB per shard, as Hugging Face tools split checkpoints.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 2_000_000_000;

/// Files of a model folder that describe its tokenizer and chat template, copied as they are.
const TOKENIZER_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MergeDtype {
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(aliases = ["fp16", "float16"])]
    F16,
    /// Exact, for checking a merge against the adapter; not a format to ship.
    #[value(aliases = ["fp32", "float32"])]
    F32,
}

impl MergeDtype {
    /// The short name flags, folder names and the exports list use: `bf16`, `f16`, `f32`.
    pub fn name(self) -> &'static str {
        match self {
            MergeDtype::Bf16 => "bf16",
            MergeDtype::F16 => "f16",
            MergeDtype::F32 => "f32",
        }
    }
    fn safetensors(self) -> Dtype {
        match self {
            MergeDtype::Bf16 => Dtype::BF16,
            MergeDtype::F16 => Dtype::F16,
            MergeDtype::F32 => Dtype::F32,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            MergeDtype::Bf16 => "bfloat16",
            MergeDtype::F16 => "float16",
            MergeDtype::F32 => "float32",
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            MergeDtype::F32 => 4,
            _ => 2,
        }
    }
}

impl std::str::FromStr for MergeDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(MergeDtype::Bf16),
            "f16" | "fp16" | "float16" => Ok(MergeDtype::F16),
            "f32" | "fp32" | "float32" => Ok(MergeDtype::F32),
            other => Err(format!("unknown dtype `{other}` (bf16, f16 or f32)")),
        }
    }
}

/// What to merge: a base model folder, how the run saw its linears, and the trained parts.
#[derive(Debug, Clone)]
pub struct MergeInput {
    pub model: PathBuf,
    pub quantization: Quantization,
    pub adapter: Option<(LoraConfig, LoraWeights)>,
    pub token_rows: Option<TokenRows>,
    /// The run folder's lock when the input came from a run: held until the export is done.
    pub run_lock: Option<std::sync::Arc<crate::session::lock::RunLock>>,
}

impl MergeInput {
    /// From a run folder: its model, quantization, adapter and trained token rows.
    pub fn from_run(run_dir: &Path) -> Result<Self> {
        let art = crate::export::run::load_run(run_dir)?;
        Ok(MergeInput {
            model: art.config.model.path.clone(),
            quantization: art.config.model.quantization,
            token_rows: art.adapter.token_rows.clone(),
            adapter: Some((art.adapter.lora, art.adapter.weights)),
            run_lock: Some(std::sync::Arc::new(art.lock)),
        })
    }

    /// The run folder the input came from, where its exports are listed (`None`: an adapter
    /// folder, or a run folder this process cannot write).
    pub fn writable_run_dir(&self) -> Option<&Path> {
        self.run_lock.as_deref().and_then(|l| l.writable_run_dir())
    }

    /// From a model folder and a PEFT adapter folder.
    pub fn from_adapter(model: &Path, adapter: &Path, quantization: Quantization) -> Result<Self> {
        let spec = crate::model::spec_of_weights_folder(model)?;
        let a = load_peft(adapter, &spec)?;
        Ok(MergeInput {
            model: model.to_path_buf(),
            quantization,
            token_rows: a.token_rows,
            adapter: Some((a.lora, a.weights)),
            run_lock: None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub dtype: MergeDtype,
    pub max_shard_bytes: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { dtype: MergeDtype::Bf16, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub dest: PathBuf,
    pub shards: Vec<String>,
    pub tensors: usize,
    pub total_bytes: u64,
    pub merged_linears: usize,
    pub token_rows: usize,
    pub eos_token_ids: Vec<u32>,
}

/// Where the export's files go. The real one creates files; tests pass one that fails part way,
/// which is how "a full disk leaves nothing behind" is checked without filling a disk.
pub trait Sink {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write + '_>>;
}

/// Files on disk, flushed and synced when closed.
pub struct FsSink;

struct SyncOnDrop(std::io::BufWriter<std::fs::File>);

impl Write for SyncOnDrop {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()
    }
}

impl Sink for FsSink {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write + '_>> {
        Ok(Box::new(SyncOnDrop(std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?))))
    }
}

/// One tensor of the output, planned before any value is read.
struct Planned {
    /// The name the engine reads it by.
    name: String,
    /// The name written: the source folder's (a multimodal folder keeps its layout).
    file_name: String,
    shape: Vec<usize>,
    /// Output dtype: the export dtype for floats; integer tensors keep theirs.
    dtype: Dtype,
    bytes: u64,
    kind: Source,
}

enum Source {
    /// One of the seven linears of a decoder layer.
    Linear { layer: usize, target: Target },
    /// `embed_tokens` or an untied `lm_head`, whose trained token rows are written in.
    TokenTable { head: bool },
    /// Any other float tensor, converted.
    Float,
    /// A non-float tensor, copied byte for byte.
    Raw,
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// The names bitsandbytes stores beside a packed weight; they fold into the one dense tensor.
fn bnb_parts(weight: &str) -> [String; 5] {
    ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"].map(|p| format!("{weight}.{p}"))
}

/// The shape a bnb quant state records for its weight.
fn bnb_shape(store: &WeightStore, weight: &str) -> Result<Vec<usize>> {
    let qs = bnb_quant_state_name(weight);
    let v: Value = serde_json::from_slice(store.bytes(&qs)?)
        .map_err(|e| Error::tensor(&qs, Some(&store.dir), format!("is not the JSON quant state bnb writes: {e}")))?;
    v.get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| Error::tensor(qs, Some(&store.dir), "has no `shape` list"))
}

/// Output order: embeddings, layers in numeric order, then the rest by name (as HF writes them).
fn order_key(name: &str) -> (u8, usize, String) {
    if name.starts_with("model.embed_tokens.") {
        return (0, 0, name.to_string());
    }
    if let Some(rest) = name.strip_prefix("model.layers.")
        && let Some((n, tail)) = rest.split_once('.')
        && let Ok(n) = n.parse::<usize>()
    {
        return (1, n, tail.to_string());
    }
    if name.starts_with("lm_head.") {
        return (3, 0, name.to_string());
    }
    (2, 0, name.to_string())
}

fn plan(store: &WeightStore, spec: &ModelSpec, dtype: MergeDtype) -> Result<Vec<Planned>> {
    let packed: BTreeSet<String> =
        store.names().filter_map(|n| n.strip_suffix(".quant_state.bitsandbytes__nf4").map(str::to_string)).collect();
    if let Some(fp4) = store.names().find(|n| n.ends_with(".quant_state.bitsandbytes__fp4")) {
        return Err(Error::tensor(fp4, Some(&store.dir), "is FP4-quantized; only NF4 checkpoints can be merged"));
    }
    let skip: BTreeSet<String> = packed.iter().flat_map(|w| bnb_parts(w)).collect();
    let mut linears = BTreeMap::new();
    for l in 0..spec.num_layers {
        for t in Target::ALL {
            linears.insert(format!("{}.weight", linear_name(l, t)), (l, t));
        }
    }
    let mut out = Vec::new();
    for name in store.names() {
        if skip.contains(name) {
            continue;
        }
        let entry = store.get(name).expect("listed name");
        let (shape, src_dtype) =
            if packed.contains(name) { (bnb_shape(store, name)?, Dtype::BF16) } else { (entry.shape.clone(), entry.dtype) };
        let kind = if let Some(&(layer, target)) = linears.get(name) {
            Source::Linear { layer, target }
        } else if name == "model.embed_tokens.weight" {
            Source::TokenTable { head: false }
        } else if name == "lm_head.weight" {
            Source::TokenTable { head: true }
        } else if packed.contains(name) {
            return Err(Error::tensor(name, Some(&store.dir), "is quantized but is not one of the decoder's linears; it cannot be merged"));
        } else if is_float(src_dtype) {
            Source::Float
        } else {
            Source::Raw
        };
        let dtype_out = if matches!(kind, Source::Raw) { src_dtype } else { dtype.safetensors() };
        let numel: usize = shape.iter().product();
        let bytes = match kind {
            Source::Raw => (entry.end - entry.start) as u64,
            _ => (numel * dtype.bytes()) as u64,
        };
        out.push(Planned {
            name: name.to_string(),
            file_name: store.original_name(name).to_string(),
            shape,
            dtype: dtype_out,
            bytes,
            kind,
        });
    }
    out.sort_by_key(|p| order_key(&p.name));
    Ok(out)
}

/// Greedy split into shards of at most `max` bytes (a tensor larger than that gets its own).
fn split_shards(plan: &[Planned], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, p) in plan.iter().enumerate() {
        if i > start && size + p.bytes > max {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += p.bytes;
    }
    if start < plan.len() || shards.is_empty() {
        shards.push(start..plan.len());
    }
    shards
}

fn dtype_name(d: Dtype) -> String {
    // safetensors' header spelling is the enum's Debug name (F32, BF16, U8, ...).
    format!("{d:?}")
}

/// The safetensors header for the tensors in `plan[range]`, padded to 8 bytes.
fn header(plan: &[Planned]) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut at = 0u64;
    for p in plan {
        m.insert(p.file_name.clone(), json!({"dtype": dtype_name(p.dtype), "shape": p.shape, "data_offsets": [at, at + p.bytes]}));
        at += p.bytes;
    }
    let mut h = serde_json::to_vec(&Value::Object(m)).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    h
}

fn encode(values: &[f32], dtype: MergeDtype, name: &str) -> Result<Vec<u8>> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(name, None, format!("has a non-finite value at element {i} after merging; the adapter is broken")));
    }
    Ok(match dtype {
        MergeDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        MergeDtype::Bf16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        MergeDtype::F16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for (i, &x) in values.iter().enumerate() {
                let h = f16::from_f32(x);
                if h.is_infinite() {
                    return Err(Error::tensor(
                        name,
                        None,
                        format!("element {i} is {x}, beyond float16's range (65504); export as bf16 instead"),
                    ));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            out
        }
    })
}

struct Merger<'a> {
    store: &'a WeightStore,
    spec: &'a ModelSpec,
    input: &'a MergeInput,
    dtype: MergeDtype,
    merged_linears: usize,
}

impl Merger<'_> {
    /// The output bytes of one planned tensor.
    fn tensor_bytes(&mut self, p: &Planned) -> Result<Vec<u8>> {
        match self.values(p)? {
            Some(values) => encode(&values, self.dtype, &p.name),
            None => Ok(self.store.bytes(&p.name)?.to_vec()),
        }
    }

    /// The merged values of one planned float tensor in f32 (`None` for a non-float tensor).
    fn values(&mut self, p: &Planned) -> Result<Option<Vec<f32>>> {
        let (spec, store) = (self.spec, self.store);
        let values = match p.kind {
            Source::Raw => return Ok(None),
            Source::Linear { layer, target } => {
                let shape = spec.linear_shape(target);
                let mut w = match store.linear(&p.name, shape, self.input.quantization)? {
                    HostWeight::Dense { data, .. } => data,
                    HostWeight::Nf4(q) => q.dequantize_f32(),
                };
                if let Some((lora, weights)) = &self.input.adapter
                    && let Some(pair) = weights.layers.get(layer).and_then(|m| m.get(&target))
                {
                    let (out, inp) = shape;
                    let r = weights.rank;
                    crate::backend::cpu::matmul::<f32>(out, inp, r, &pair.b, false, &pair.a, false, &mut w, lora.scale() as f32, true);
                    self.merged_linears += 1;
                }
                w
            }
            Source::TokenTable { head } => {
                let mut t = store.f32_any_shape(&p.name)?;
                if let Some(rows) = &self.input.token_rows {
                    let d = spec.hidden_size;
                    // A tied model has one table: the embedding rows are the head rows too.
                    let src = if head { rows.head.as_ref() } else { Some(&rows.embed) };
                    if let Some(src) = src {
                        for (s, &id) in rows.ids.iter().enumerate() {
                            let (i, s) = (id as usize, s);
                            if (i + 1) * d > t.len() {
                                return Err(Error::tensor(&p.name, Some(&store.dir), format!("has no row {id} for a trained token")));
                            }
                            t[i * d..(i + 1) * d].copy_from_slice(&src[s * d..(s + 1) * d]);
                        }
                    }
                }
                t
            }
            Source::Float => store.f32_any_shape(&p.name)?,
        };
        Ok(Some(values))
    }
}

/// The merged model's float tensors in f32, read one at a time (the GGUF export builds on this):
/// the same merge as [`export_merged`], without writing a folder.
pub struct MergedTensors {
    store: WeightStore,
    spec: ModelSpec,
    input: MergeInput,
    planned: Vec<Planned>,
}

impl MergedTensors {
    pub fn open(input: &MergeInput) -> Result<Self> {
        let spec = ModelSpec::from_dir(&input.model)?;
        let store = WeightStore::open(&input.model)?;
        let planned = plan(&store, &spec, MergeDtype::F32)?;
        Ok(MergedTensors { store, spec, input: input.clone(), planned })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Names and shapes of the float tensors, in Hugging Face order (embeddings, layers, rest).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.planned.iter().filter(|p| !matches!(p.kind, Source::Raw)).map(|p| (p.name.clone(), p.shape.clone())).collect()
    }

    /// The merged values of a float tensor.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let p = self
            .planned
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::tensor(name, Some(&self.store.dir), "is not in the model"))?;
        let mut m = Merger { store: &self.store, spec: &self.spec, input: &self.input, dtype: MergeDtype::F32, merged_linears: 0 };
        let v = m.values(p)?.ok_or_else(|| Error::tensor(name, Some(&self.store.dir), "is not a float tensor"))?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::tensor(name, None, format!("has a non-finite value at element {i} after merging; the adapter is broken")));
        }
        Ok(v)
    }

    /// Linears the adapter changes.
    pub fn merged_linears(&self) -> usize {
        self.input.adapter.as_ref().map_or(0, |(_, w)| w.layers.iter().map(|m| m.len()).sum())
    }
}

/// `generation_config.json` for the merged model: the original one (if any) with `eos_token_id`
/// listing the tokenizer's EOS, config.json's EOS ids and the chat template's end of turn, so
/// `generate()` stops at the end of an assistant turn.
fn generation_config(model: &Path, spec: &ModelSpec, tok: Option<&TokenizerBundle>) -> Result<(Value, Vec<u32>)> {
    let path = model.join("generation_config.json");
    let mut g: Value = if path.exists() {
        let text = std::fs::read_to_string(&path).with_path(&path)?;
        serde_json::from_str(&text).map_err(|e| Error::line(&path, e.line(), format!("invalid JSON: {e}")))?
    } else {
        json!({})
    };
    let mut eos: Vec<u32> = Vec::new();
    let mut push = |id: u32| {
        if !eos.contains(&id) {
            eos.push(id);
        }
    };
    match g.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().into_iter().for_each(|i| push(i as u32)),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).for_each(|i| push(i as u32)),
        _ => {}
    }
    spec.eos_token_ids.iter().for_each(|&i| push(i));
    if let Some(t) = tok {
        t.eos_id().into_iter().for_each(&mut push);
        end_of_turn_token(t).into_iter().for_each(&mut push);
    }
    let obj = g.as_object_mut().ok_or_else(|| Error::file(&path, "is not a JSON object"))?;
    obj.insert("eos_token_id".into(), if eos.len() == 1 { json!(eos[0]) } else { json!(eos) });
    if let Some(b) = spec.bos_token_id {
        obj.entry("bos_token_id").or_insert(json!(b));
    }
    if let Some(p) = spec.pad_token_id.or(tok.map(|t| t.pad_id())) {
        obj.entry("pad_token_id").or_insert(json!(p));
    }
    Ok((g, eos))
}

/// config.json for the merged model: the original, now dense, in the export dtype.
fn model_config(model: &Path, dtype: MergeDtype) -> Result<Value> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path).with_path(&path)?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| Error::line(&path, e.line(), format!("invalid JSON: {e}")))?;
    let obj = v.as_object_mut().ok_or_else(|| Error::file(&path, "is not a JSON object"))?;
    // The weights are dense now; a leftover quantization_config would make transformers try to
    // load them as bnb-4bit.
    obj.remove("quantization_config");
    let name = json!(dtype.torch_name());
    // transformers < 5 reads `torch_dtype`, ≥ 5 writes `dtype`; keep whichever exist current.
    let had_dtype = obj.contains_key("dtype");
    if obj.contains_key("torch_dtype") || !had_dtype {
        obj.insert("torch_dtype".into(), name.clone());
    }
    if had_dtype {
        obj.insert("dtype".into(), name);
    }
    Ok(v)
}

fn write_file(sink: &dyn Sink, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut w = sink.create(path).with_path(path)?;
    w.write_all(bytes).with_path(path)?;
    w.flush().with_path(path)
}

/// Write the merged model to `dest` (which must not exist).
pub fn export_merged(input: &MergeInput, dest: &Path, opts: &MergeOptions) -> Result<MergeSummary> {
    export_merged_with(input, dest, opts, &FsSink)
}

/// [`export_merged`] through a given sink.
pub fn export_merged_with(input: &MergeInput, dest: &Path, opts: &MergeOptions, sink: &dyn Sink) -> Result<MergeSummary> {
    if dest.exists() {
        return Err(Error::file(dest, "already exists; choose a new folder (exports never overwrite)"));
    }
    let spec = ModelSpec::from_dir(&input.model)?;
    let store = WeightStore::open(&input.model)?;
    let tok = TokenizerBundle::load(&input.model).ok();
    let planned = plan(&store, &spec, opts.dtype)?;
    let shards = split_shards(&planned, opts.max_shard_bytes.max(1));
    let names: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let config = model_config(&input.model, opts.dtype)?;
    let (generation, eos) = generation_config(&input.model, &spec, tok.as_ref())?;

    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| crate::util::cannot_create(dest, e))?;
    let leaf = dest.file_name().ok_or_else(|| Error::file(dest, "is not a folder path"))?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| crate::util::cannot_create(dest, e))?;

    let mut merger = Merger { store: &store, spec: &spec, input, dtype: opts.dtype, merged_linears: 0 };
    let result = (|| -> Result<()> {
        let mut weight_map = serde_json::Map::new();
        for (range, file) in shards.iter().zip(&names) {
            let part = &planned[range.clone()];
            let path = tmp.join(file);
            let mut w = sink.create(&path).with_path(&path)?;
            let h = header(part);
            w.write_all(&(h.len() as u64).to_le_bytes()).with_path(&path)?;
            w.write_all(&h).with_path(&path)?;
            for p in part {
                let bytes = merger.tensor_bytes(p)?;
                debug_assert_eq!(bytes.len() as u64, p.bytes, "{}", p.name);
                w.write_all(&bytes).with_path(&path)?;
                weight_map.insert(p.file_name.clone(), json!(file));
            }
            w.flush().with_path(&path)?;
        }
        if names.len() > 1 {
            let total: u64 = planned.iter().map(|p| p.bytes).sum();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            write_file(sink, &tmp.join("model.safetensors.index.json"), &serde_json::to_vec_pretty(&index).expect("json"))?;
        }
        write_file(sink, &tmp.join("config.json"), &serde_json::to_vec_pretty(&config).expect("json"))?;
        write_file(sink, &tmp.join("generation_config.json"), &serde_json::to_vec_pretty(&generation).expect("json"))?;
        for f in TOKENIZER_FILES {
            let src = input.model.join(f);
            if src.is_file() {
                write_file(sink, &tmp.join(f), &std::fs::read(&src).with_path(&src)?)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(crate::util::told_of_dest(e, &tmp, dest));
    }
    if dest.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::file(dest, "appeared while the export was being written; nothing was changed"));
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::file(dest, e));
    }
    crate::export::history::record_done(input.writable_run_dir(), &format!("merged {}", opts.dtype.name()), dest);
    Ok(MergeSummary {
        dest: dest.to_path_buf(),
        shards: names,
        tensors: planned.len(),
        total_bytes: planned.iter().map(|p| p.bytes).sum(),
        merged_linears: merger.merged_linears,
        token_rows: input.token_rows.as_ref().map_or(0, |r| r.ids.len()),
        eos_token_ids: eos,
    })
}
