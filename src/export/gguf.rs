//! GGUF export for llama.cpp, Ollama and LM Studio: the merged weights (base + adapter, see
//! `merged.rs`) with llama.cpp's tensor names and q/k layout, the tokenizer (tokens, token types,
//! BPE merges, the pre-tokenizer name llama.cpp knows, special ids, the chat template), written
//! with candle-core's `gguf_file` writer and quantized by its quantizers (`f16`, `bf16`, `q8_0`,
//! and `q4_k_m` as llama.cpp mixes it); and an Ollama `Modelfile` beside the file.
//!
//! Families: `llama` (Llama, Mistral), `qwen2` and `qwen3` (its per-head q/k norms as
//! `attn_q_norm`/`attn_k_norm`), and `gemma3` (text only: its sandwich norms as
//! `post_attention_norm`/`ffn_norm`/`post_ffw_norm`, every norm stored as `1 + w` as llama.cpp's
//! converter writes it, the sliding window as a key; llama.cpp fixes the rest of the layout, which
//! [`Arch::of`] checks the model against). A new family adds a row to [`Arch::of`] (its llama.cpp
//! architecture name, whether q/k are permuted, extra per-layer tensors in [`gguf_name`]) and its
//! hyper-parameter keys in [`arch_metadata`].
//!
//! The file is written to a hidden temporary beside the destination and renamed at the end: a
//! failure leaves nothing under the destination's name.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::Value as Json;

use crate::error::{Error, IoContext, Result};
use crate::export::merged::{MergeInput, MergedTensors};
use crate::generate::SamplingParams;
use crate::model::ModelSpec;
use crate::model::arch::{Family, RopeScaling};
use crate::model::chat_template::{ChatTemplate, Message, portable_source};
use crate::model::tokenizer::TokenizerBundle;
use crate::model::tokenizer::end_of_turn_token_in;

/// The quantizations offered, by llama.cpp's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GgufQuant {
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output and for attn_v and ffn_down of the
    /// layers `use_more_bits` picks; Q5_0 / Q8_0 where a row is not a multiple of 256.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl GgufQuant {
    pub const ALL: [GgufQuant; 4] = [GgufQuant::F16, GgufQuant::Bf16, GgufQuant::Q8_0, GgufQuant::Q4KM];

    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F16 => "f16",
            GgufQuant::Bf16 => "bf16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
            GgufQuant::Bf16 => 32,
        }
    }
}

impl std::str::FromStr for GgufQuant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.to_ascii_lowercase();
        GgufQuant::ALL.into_iter().find(|q| q.name() == s).ok_or_else(|| format!("unknown quantization `{s}` (f16, bf16, q8_0 or q4_k_m)"))
    }
}

#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub quant: GgufQuant,
    /// `auto` (the model's) or a built-in name: the template written into the file and the
    /// Modelfile (a run's export passes the run's).
    pub template: String,
    /// Sampling settings for the Modelfile's PARAMETER lines.
    pub sampling: SamplingParams,
    /// `general.name`.
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GgufSummary {
    pub path: PathBuf,
    pub modelfile: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    pub architecture: String,
    pub pre_tokenizer: String,
    /// Tensors per GGML type (`Q4K`, `F32`, …).
    pub types: BTreeMap<String, usize>,
    pub merged_linears: usize,
    /// What the user should know about the file (an approximate pre-tokenizer).
    pub warnings: Vec<String>,
}

/// Progress of an export: (tensors done, tensors in all).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// How a family is written for llama.cpp.
struct Arch {
    name: &'static str,
    /// llama.cpp's `llama` architecture rotates interleaved pairs; Hugging Face's Llama rotates
    /// halves, so q and k rows are permuted (as llama.cpp's converter does). `qwen2` uses the
    /// halves convention (NeoX) and keeps them.
    permute_qk: bool,
}

impl Arch {
    fn of(spec: &ModelSpec) -> Result<Arch> {
        Ok(match spec.family {
            Family::Llama | Family::Mistral => Arch { name: "llama", permute_qk: true },
            Family::Qwen2 => Arch { name: "qwen2", permute_qk: false },
            Family::Qwen3 => Arch { name: "qwen3", permute_qk: false },
            Family::Gemma3 => {
                gemma3_fits_llama_cpp(spec)?;
                Arch { name: "gemma3", permute_qk: false }
            }
        })
    }
}

/// llama.cpp's `gemma3` reads only the sliding window from the file: every sixth layer global,
/// the local layers' RoPE at base 10000 unscaled, and the softmax scale 1/√head_dim
/// (1/√(hidden/heads) for the 62-layer 27B) are fixed in its loader. A model that differs would
/// load and answer differently, so it is refused, naming what differs.
fn gemma3_fits_llama_cpp(spec: &ModelSpec) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::op(
            "GGUF export",
            format!("this Gemma 3 model {what}, which llama.cpp's `gemma3` architecture cannot express; export the merged folder instead"),
        ))
    };
    if spec.text_tower {
        return refuse("is a multimodal folder (a text tower inside)".into());
    }
    let pattern: Vec<bool> = (0..spec.num_layers).map(|l| l % 6 < 5).collect();
    let ours: Vec<bool> = (0..spec.num_layers).map(|l| spec.is_sliding(l)).collect();
    if spec.sliding_window.is_none() || ours != pattern {
        return refuse(format!("has sliding layers {ours:?} (llama.cpp: five sliding, then one global)"));
    }
    match &spec.local_rope {
        Some(r) if r.theta == 10_000.0 && r.scaling.is_none() => {}
        r => return refuse(format!("has the local RoPE {r:?} (llama.cpp: base 10000, no scaling)")),
    }
    let want = if spec.num_layers == 62 {
        (spec.hidden_size as f64 / spec.num_heads as f64).powf(-0.5)
    } else {
        (spec.head_dim as f64).powf(-0.5)
    };
    match spec.attn_scale {
        Some(s) if (s - want).abs() <= 1e-9 * want => Ok(()),
        s => refuse(format!("scales attention scores by {s:?} (llama.cpp: {want})")),
    }
}

/// The GGUF name of a Hugging Face tensor (`None`: not part of the GGUF, e.g. rotary buffers).
/// `sandwich_norms` (Gemma): `post_attention_layernorm` is the norm after attention, not the one
/// before the MLP (`pre_feedforward_layernorm`).
pub fn gguf_name(hf: &str, sandwich_norms: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let base = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if sandwich_norms => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{base}.{kind}"))
}

/// llama.cpp's row permutation of a q or k weight (or bias): within each head, rows
/// `[r0 … r(h/2−1) | r(h/2) … r(h−1)]` are interleaved to `[r0, r(h/2), r1, r(h/2+1), …]`.
pub fn permute_qk(values: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for (k, src) in [(0, i), (1, half + i)] {
                let from = h * per_head + src;
                let to = h * per_head + 2 * i + k;
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2
}

/// The GGML type of one tensor under a quantization, as llama.cpp's quantizer picks it.
fn tensor_type(quant: GgufQuant, gguf: &str, shape: &[usize], layers: usize, tied: bool) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = *shape.last().unwrap_or(&0);
    let t = match quant {
        GgufQuant::F16 => return GgmlDType::F16,
        GgufQuant::Bf16 => return GgmlDType::BF16,
        GgufQuant::Q8_0 => GgmlDType::Q8_0,
        GgufQuant::Q4KM => {
            let layer = gguf.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
            let is_output = gguf == "output.weight" || (tied && gguf == "token_embd.weight");
            let more_bits =
                (gguf.ends_with("attn_v.weight") || gguf.ends_with("ffn_down.weight")) && layer.is_some_and(|l| use_more_bits(l, layers));
            if is_output || more_bits { GgmlDType::Q6K } else { GgmlDType::Q4K }
        }
    };
    // Rows that are not whole blocks take llama.cpp's fallbacks.
    match t {
        GgmlDType::Q4K if !cols.is_multiple_of(256) => GgmlDType::Q5_0,
        GgmlDType::Q6K if !cols.is_multiple_of(256) => GgmlDType::Q8_0,
        GgmlDType::Q8_0 if !cols.is_multiple_of(32) => GgmlDType::F16,
        t => t,
    }
}

fn candle_err(what: &str) -> impl FnOnce(candle_core::Error) -> Error + '_ {
    move |e| Error::op(format!("GGUF export, {what}"), e)
}

/// Write `dest` (a `.gguf` file, which must not exist) and a Modelfile beside it.
pub fn export_gguf(input: &MergeInput, dest: &Path, opts: &GgufOptions, progress: Progress<'_>) -> Result<GgufSummary> {
    if dest.exists() {
        return Err(Error::file(dest, "already exists; choose a new file name (exports never overwrite)"));
    }
    let merged = MergedTensors::open(input)?;
    let spec = merged.spec().clone();
    let arch = Arch::of(&spec)?;
    let tok = TokenizerBundle::load(&input.model)?;
    let template = tok.resolve_template(&opts.template)?;
    let vocab = TokenizerVocab::read(&input.model, &tok, &spec)?;
    let mut meta: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| meta.push((k.to_string(), v));
    put("general.architecture", Value::String(arch.name.into()));
    put("general.name", Value::String(opts.name.clone()));
    put("general.file_type", Value::U32(opts.quant.file_type()));
    put("general.quantization_version", Value::U32(2));
    for (k, v) in arch_metadata(&spec, arch.name) {
        put(&k, v);
    }
    for (k, v) in vocab.metadata(&tok, &template)? {
        put(&k, v);
    }

    let hf = merged.tensors();
    let tied = !hf.iter().any(|(n, _)| n == "lm_head.weight");
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(RopeScaling::Llama3 { .. }) = &spec.rope_scaling {
        // llama.cpp takes Llama 3.1's frequency scaling as a tensor of per-frequency divisors.
        let factors = llama3_rope_factors(&spec);
        let t = Tensor::from_vec(factors.clone(), factors.len(), &Device::Cpu).map_err(candle_err("rope_freqs"))?;
        tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32).map_err(candle_err("rope_freqs"))?));
        *types.entry("F32".into()).or_default() += 1;
    }
    let sandwich = spec.sandwich_norms;
    let wanted: Vec<&(String, Vec<usize>)> = hf.iter().filter(|(n, _)| gguf_name(n, sandwich).is_some()).collect();
    if let Some((n, _)) = hf.iter().find(|(n, _)| gguf_name(n, sandwich).is_none() && !n.contains("rotary_emb")) {
        return Err(Error::tensor(
            n,
            Some(&input.model),
            format!("has no place in a `{}` GGUF; this model cannot be exported yet", arch.name),
        ));
    }
    for (done, (name, shape)) in wanted.iter().enumerate() {
        progress(done, wanted.len());
        let gname = gguf_name(name, sandwich).expect("filtered");
        let mut values = merged.values(name)?;
        if spec.norm_weight_offset != 0.0 && gname.ends_with("norm.weight") {
            // Gemma's norms multiply by (1 + w); llama.cpp's multiply by the stored weight, so
            // its converter stores 1 + w (and so do we, for every norm: q/k norms included).
            values.iter_mut().for_each(|v| *v += spec.norm_weight_offset);
        }
        if arch.permute_qk && (gname.contains(".attn_q.") || gname.contains(".attn_k.")) {
            let heads = if gname.contains(".attn_q.") { spec.num_heads } else { spec.num_kv_heads };
            let cols = if shape.len() > 1 { shape[1] } else { 1 };
            values = permute_qk(&values, heads, shape[0], cols);
        }
        let ty = tensor_type(opts.quant, &gname, shape, spec.num_layers, tied);
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).map_err(candle_err(name))?;
        let q = QTensor::quantize(&t, ty).map_err(candle_err(name))?;
        *types.entry(format!("{ty:?}")).or_default() += 1;
        tensors.push((gname, q));
    }
    progress(wanted.len(), wanted.len());

    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_path(parent)?;
    let leaf = dest.file_name().ok_or_else(|| Error::file(dest, "is not a file path"))?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
    let written = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).with_path(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let md: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut w, &md, &ts).map_err(|e| Error::file(&tmp, format!("writing GGUF: {e}")))?;
        w.flush().with_path(&tmp)?;
        let file = w.into_inner().map_err(|e| Error::file(&tmp, e.error()))?;
        file.sync_all().with_path(&tmp)?;
        Ok(file.metadata().with_path(&tmp)?.len())
    })();
    let bytes = match written {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if dest.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(dest, "appeared while the export was being written; nothing was changed"));
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(dest, e)
    })?;
    // `Modelfile` beside the file, unless another export's is there.
    let stem = Path::new(&leaf).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let modelfile = match parent.join("Modelfile") {
        m if !m.exists() || std::fs::read_to_string(&m).is_ok_and(|t| t.contains(&format!("FROM ./{leaf}\n"))) => m,
        _ => parent.join(format!("{stem}.Modelfile")),
    };
    let text = modelfile_text(&leaf, &tok, &template, &vocab, &opts.sampling);
    crate::util::write_atomic(&modelfile, text.as_bytes())?;
    crate::export::history::record_done(input.writable_run_dir(), &format!("gguf {}", opts.quant.name()), dest);
    Ok(GgufSummary {
        path: dest.to_path_buf(),
        modelfile,
        bytes,
        tensors: tensors.len(),
        architecture: arch.name.into(),
        pre_tokenizer: vocab.pre.clone(),
        types,
        merged_linears: merged.merged_linears(),
        warnings: vocab.warning.clone().into_iter().collect(),
    })
}

/// Llama 3.1's rope scaling as llama.cpp's `rope_freqs` divisors, one per frequency (the same
/// rule `ModelSpec::rope_inv_freq` applies, expressed as `base frequency / scaled frequency`).
fn llama3_rope_factors(spec: &ModelSpec) -> Vec<f32> {
    let scaled = spec.rope_inv_freq();
    let base = ModelSpec { rope_scaling: None, ..spec.clone() }.rope_inv_freq();
    base.iter().zip(&scaled).map(|(b, s)| (b / s) as f32).collect()
}

/// The hyper-parameter keys of an architecture.
fn arch_metadata(spec: &ModelSpec, arch: &str) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut v = vec![
        (k("context_length"), Value::U32(spec.max_position_embeddings as u32)),
        (k("embedding_length"), Value::U32(spec.hidden_size as u32)),
        (k("block_count"), Value::U32(spec.num_layers as u32)),
        (k("feed_forward_length"), Value::U32(spec.intermediate_size as u32)),
        (k("attention.head_count"), Value::U32(spec.num_heads as u32)),
        (k("attention.head_count_kv"), Value::U32(spec.num_kv_heads as u32)),
        (k("rope.freq_base"), Value::F32(spec.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(spec.rms_norm_eps as f32)),
        (k("rope.dimension_count"), Value::U32(spec.head_dim as u32)),
        (k("vocab_size"), Value::U32(spec.vocab_size as u32)),
    ];
    if spec.head_dim * spec.num_heads != spec.hidden_size || arch == "gemma3" {
        v.push((k("attention.key_length"), Value::U32(spec.head_dim as u32)));
        v.push((k("attention.value_length"), Value::U32(spec.head_dim as u32)));
    }
    if let Some(w) = spec.sliding_window {
        // llama.cpp's `gemma3` takes the window from here (and its layer pattern as fixed).
        v.push((k("attention.sliding_window"), Value::U32(w as u32)));
    }
    if let Some(RopeScaling::Linear { factor }) = spec.rope_scaling {
        v.push((k("rope.scaling.type"), Value::String("linear".into())));
        v.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    v
}

/// The tokenizer as llama.cpp's `gpt2` (byte-level BPE) tokenizer model reads it.
struct TokenizerVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    pre: String,
    add_bos: bool,
    /// Set when llama.cpp's splitting rule only approximates the tokenizer's.
    warning: Option<String>,
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`), with the splitting regex it
/// applies (as tokenizer.json writes it): the byte-level BPE tokenizers of the families we export.
const PRE_TOKENIZERS: [(&str, &str); 3] = [
    ("llama-bpe", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ("qwen2", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ("gpt-2", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
];

/// Texts on which splitting rules tend to differ: contractions, digit runs, punctuation before
/// letters, blank lines, runs of spaces, tabs, non-Latin scripts.
const PRE_TOKENIZER_PROBES: [&str; 6] = [
    "Hello world! It's 2024, and I'm 12345678 years old.",
    "Line one.\n\nLine two:\n  indented   text\t tab",
    "naïve café — “quotes” 東京 123abc 4.5e-3 (x)+[y]",
    "don't DON'T you'll WE'VE they'd",
    "   leading spaces and trailing   ",
    "a\r\nb\n\n\nc  \n d",
];

impl TokenizerVocab {
    fn read(model: &Path, tok: &TokenizerBundle, spec: &ModelSpec) -> Result<Self> {
        let path = model.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).with_path(&path)?;
        let j: Json = serde_json::from_str(&text).map_err(|e| Error::line(&path, e.line(), format!("invalid JSON: {e}")))?;
        let m = &j["model"];
        if m["type"].as_str() != Some("BPE") || !is_byte_level(&j) {
            return Err(Error::file(
                &path,
                "is not a byte-level BPE tokenizer (Llama 3, Qwen2); SentencePiece-style tokenizers (Llama 2, Mistral, the released Gemma 3) cannot be exported to GGUF yet",
            ));
        }
        let (pre, warning) = pre_tokenizer_name(tok, &j).map_err(|e| Error::file(&path, e))?;
        let mut by_id: BTreeMap<u32, String> = BTreeMap::new();
        for (t, id) in m["vocab"].as_object().into_iter().flatten() {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as u32, t.clone());
            }
        }
        let mut added: BTreeMap<u32, (String, bool)> = BTreeMap::new();
        for a in j["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
                added.insert(id as u32, (c.to_string(), a["special"].as_bool().unwrap_or(false)));
            }
        }
        let n = spec.vocab_size.max(by_id.keys().chain(added.keys()).map(|&i| i as usize + 1).max().unwrap_or(0));
        let mut tokens = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        for i in 0..n as u32 {
            match (added.get(&i), by_id.get(&i)) {
                (Some((c, special)), _) => {
                    tokens.push(c.clone());
                    types.push(if *special || looks_special(c) { TOKEN_CONTROL } else { TOKEN_USER_DEFINED });
                }
                (None, Some(t)) => {
                    tokens.push(t.clone());
                    types.push(TOKEN_NORMAL);
                }
                (None, None) => {
                    tokens.push(format!("[PAD{i}]"));
                    types.push(TOKEN_UNUSED);
                }
            }
        }
        let merges = m["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| match x {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
                _ => None,
            })
            .collect();
        // BOS is added by the tokenizer's post-processor (Llama 3) or not at all (Qwen2).
        let add_bos = tok.bos_id().is_some_and(|b| tok.encode("a", true).map(|ids| ids.first() == Some(&b)).unwrap_or(false));
        Ok(TokenizerVocab { tokens, types, merges, pre: pre.to_string(), add_bos, warning })
    }

    fn metadata(&self, tok: &TokenizerBundle, template: &ChatTemplate) -> Result<Vec<(String, Value)>> {
        let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let mut m = vec![
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), Value::String(self.pre.clone())),
            ("tokenizer.ggml.tokens".to_string(), strs(&self.tokens)),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(self.types.iter().map(|&t| Value::I32(t)).collect())),
            ("tokenizer.ggml.merges".to_string(), strs(&self.merges)),
            ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(self.add_bos)),
            ("tokenizer.chat_template".to_string(), Value::String(portable_source(template.source()))),
        ];
        if let Some(b) = tok.bos_id() {
            m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(e) = tok.eos_id() {
            m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
        if let Some(eot) = end_of_turn_token_in(tok, template) {
            m.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot)));
        }
        m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(tok.pad_id())));
        Ok(m)
    }
}

fn is_byte_level(j: &Json) -> bool {
    let has = |v: &Json| {
        v["type"].as_str() == Some("ByteLevel")
            || v["pretokenizers"].as_array().is_some_and(|a| a.iter().any(|p| p["type"].as_str() == Some("ByteLevel")))
    };
    has(&j["pre_tokenizer"]) || j["decoder"]["type"].as_str() == Some("ByteLevel")
}

/// llama.cpp's name for the tokenizer's splitting rule: the one whose regex it is, else the one
/// that splits the probe texts as the tokenizer does (with a warning naming a text they split
/// differently when none agrees on all of them).
fn pre_tokenizer_name(tok: &TokenizerBundle, j: &Json) -> std::result::Result<(&'static str, Option<String>), String> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior};
    let pt = &j["pre_tokenizer"];
    let regexes: Vec<&str> = pt["pretokenizers"]
        .as_array()
        .map(|a| a.iter().collect::<Vec<_>>())
        .unwrap_or_else(|| vec![pt])
        .into_iter()
        .filter(|p| p["type"].as_str() == Some("Split"))
        .filter_map(|p| p["pattern"]["Regex"].as_str())
        .collect();
    if let [re] = regexes.as_slice()
        && let Some((name, _)) = PRE_TOKENIZERS.iter().find(|(_, r)| r == re)
    {
        return Ok((name, None));
    }
    let own = tok.inner().get_pre_tokenizer().ok_or("has no pre-tokenizer")?;
    let split = |p: &dyn PreTokenizer, text: &str| -> Option<Vec<String>> {
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).ok()?;
        Some(s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(t, _, _)| t.to_string()).collect())
    };
    let mut best: Option<(&'static str, usize, Option<&str>)> = None;
    for (name, re) in PRE_TOKENIZERS {
        let Ok(sp) = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false) else { continue };
        let cand = Sequence::new(vec![sp.into(), ByteLevel::new(false, true, false).into()]);
        let mut agree = 0;
        let mut differs = None;
        for probe in PRE_TOKENIZER_PROBES {
            match (split(own, probe), split(&cand, probe)) {
                (Some(a), Some(b)) if a == b => agree += 1,
                _ => differs = differs.or(Some(probe)),
            }
        }
        if best.is_none_or(|b| agree > b.1) {
            best = Some((name, agree, differs));
        }
    }
    match best {
        Some((name, _, None)) => Ok((name, None)),
        Some((name, agree, Some(probe))) if agree > 0 => Ok((
            name,
            Some(format!(
                "llama.cpp will split text by its `{name}` rule, which is closest to this tokenizer's but splits {probe:?} differently: prompts typed into llama.cpp may tokenize differently"
            )),
        )),
        _ => Err("has a pre-tokenizer llama.cpp does not know (expected the Llama 3, Qwen2 or GPT-2 splitting)".into()),
    }
}

/// Added tokens written like `<|…|>` or `<…>` are control tokens even when not marked special
/// (as llama.cpp's converter treats them).
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>")) || (t.starts_with('<') && t.ends_with('>') && t.len() > 2 && !t.contains(' '))
}

/// Ollama's `Modelfile`: the GGUF, the chat template as a Go template, stop strings and the
/// sampling settings.
fn modelfile_text(gguf_file: &str, tok: &TokenizerBundle, template: &ChatTemplate, vocab: &TokenizerVocab, p: &SamplingParams) -> String {
    let mut s = format!("# Written by TuneStudio: `ollama create NAME -f Modelfile` in this folder.\nFROM ./{gguf_file}\n\n");
    match go_template(tok, template, vocab.add_bos) {
        Some(t) => s.push_str(&format!("TEMPLATE \"\"\"{t}\"\"\"\n\n")),
        None => s.push_str("# The chat template could not be expressed as an Ollama template; Ollama uses the one in the GGUF.\n\n"),
    }
    let mut stops: Vec<String> = Vec::new();
    for id in [end_of_turn_token_in(tok, template), tok.eos_id()].into_iter().flatten() {
        if let Some(t) = tok.token_text(id).filter(|t| !stops.contains(t)) {
            stops.push(t);
        }
    }
    for t in stops {
        s.push_str(&format!("PARAMETER stop \"{}\"\n", t.replace('\\', "\\\\").replace('"', "\\\"")));
    }
    s.push_str(&format!("PARAMETER temperature {}\n", p.temperature));
    if p.top_k > 0 {
        s.push_str(&format!("PARAMETER top_k {}\n", p.top_k));
    }
    s.push_str(&format!("PARAMETER top_p {}\n", p.top_p));
    s.push_str(&format!("PARAMETER min_p {}\n", p.min_p));
    s.push_str(&format!("PARAMETER repeat_penalty {}\n", p.repetition_penalty));
    s.push_str(&format!("PARAMETER num_predict {}\n", p.max_new_tokens));
    s
}

/// The chat template as an Ollama (Go) template over `.Messages`, derived by rendering the Jinja
/// template with marker texts and cutting the pieces around them; `None` when the pieces do not
/// reproduce the Jinja rendering of a test conversation.
pub fn go_template(tok: &TokenizerBundle, template: &ChatTemplate, add_bos: bool) -> Option<String> {
    let pieces = TemplatePieces::derive(tok, template, add_bos)?;
    // Check on a conversation the pieces were not derived from.
    let conv = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "What now?"),
    ];
    let want = strip_bos(tok, &template.render(&conv, true).ok()?.text, add_bos);
    if pieces.render(&conv) != want {
        return None;
    }
    let esc = |s: &str| s.replace("{{", "{{ \"{{\" }}");
    let mut t = String::new();
    t.push_str("{{- range $i, $_ := .Messages }}");
    t.push_str(&format!("{{{{- if eq .Role \"system\" }}}}{}{{{{ .Content }}}}{}", esc(&pieces.system.0), esc(&pieces.system.1)));
    t.push_str(&format!("{{{{- else if eq .Role \"user\" }}}}{}{{{{ .Content }}}}{}", esc(&pieces.user.0), esc(&pieces.user.1)));
    t.push_str(&format!(
        "{{{{- else if eq .Role \"assistant\" }}}}{}{{{{ .Content }}}}{}",
        esc(&pieces.assistant.0),
        esc(&pieces.assistant.1)
    ));
    t.push_str("{{- end }}{{- end }}");
    t.push_str(&esc(&pieces.generation));
    Some(t)
}

fn strip_bos(tok: &TokenizerBundle, text: &str, add_bos: bool) -> String {
    match (add_bos, tok.special_tokens().bos_token.as_deref()) {
        (true, Some(b)) => text.strip_prefix(b).unwrap_or(text).to_string(),
        _ => text.to_string(),
    }
}

/// What a template writes around each role's content, and after the last turn to start an answer.
#[derive(Debug, PartialEq)]
struct TemplatePieces {
    system: (String, String),
    user: (String, String),
    assistant: (String, String),
    generation: String,
}

impl TemplatePieces {
    fn derive(tok: &TokenizerBundle, template: &ChatTemplate, add_bos: bool) -> Option<Self> {
        let (s, u, a, u2) = ("SYSTEM_7f3a", "USER_1b9c", "ANSWER_4e2d", "USER_8d6e");
        let render = |m: &[Message], prompt: bool| template.render(m, prompt).ok().map(|r| strip_bos(tok, &r.text, add_bos));
        let full =
            render(&[Message::new("system", s), Message::new("user", u), Message::new("assistant", a), Message::new("user", u2)], true)?;
        let no_sys = render(&[Message::new("user", u)], false)?;
        let gen_only = render(&[Message::new("user", u)], true)?;
        let pos = |t: &str, m: &str| t.find(m);
        let (ps, pu, pa, pu2) = (pos(&full, s)?, pos(&full, u)?, pos(&full, a)?, pos(&full, u2)?);
        if !(ps < pu && pu < pa && pa < pu2) {
            return None;
        }
        let user_pre = no_sys[..pos(&no_sys, u)?].to_string();
        let user_suf = no_sys[pos(&no_sys, u)? + u.len()..].to_string();
        let generation = gen_only.strip_prefix(&no_sys)?.to_string();
        let sys_pre = full[..ps].to_string();
        let sys_suf = full[ps + s.len()..pu].strip_suffix(&user_pre)?.to_string();
        let between_ua = &full[pu + u.len()..pa];
        let asst_pre = between_ua.strip_prefix(&user_suf)?.to_string();
        let asst_suf = full[pa + a.len()..pu2].strip_suffix(&user_pre)?.to_string();
        if full[pu2 + u2.len()..] != format!("{user_suf}{generation}") {
            return None;
        }
        Some(TemplatePieces { system: (sys_pre, sys_suf), user: (user_pre, user_suf), assistant: (asst_pre, asst_suf), generation })
    }

    fn render(&self, msgs: &[Message]) -> String {
        let mut out = String::new();
        for m in msgs {
            let (pre, suf) = match m.role.as_str() {
                "system" => &self.system,
                "user" => &self.user,
                _ => &self.assistant,
            };
            out.push_str(pre);
            out.push_str(&m.content);
            out.push_str(suf);
        }
        out.push_str(&self.generation);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Rope;

    #[test]
    fn permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows, 1 column: rows 0..8.
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(permute_qk(&v, 2, 8, 1), vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(picked, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let t = |name: &str, cols| tensor_type(GgufQuant::Q4KM, name, &[cols, cols], 32, false);
        assert_eq!(t("blk.0.attn_v.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_v.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.4.attn_q.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("output.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_q.weight", 128), GgmlDType::Q5_0, "rows shorter than a k-quant block");
        assert_eq!(tensor_type(GgufQuant::Q4KM, "blk.0.attn_norm.weight", &[4096], 32, false), GgmlDType::F32);
    }

    #[test]
    fn gemma3_is_written_only_where_llama_cpp_fixes_the_same_layout() {
        let text = ModelSpec { text_tower: false, ..ModelSpec::gemma3_4b() };
        assert_eq!(Arch::of(&text).unwrap().name, "gemma3");
        let refused = |spec: ModelSpec, what: &str| {
            let e = Arch::of(&spec).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
            assert!(e.contains("llama.cpp") && e.contains("merged folder"), "{what}: {e}");
        };
        refused(ModelSpec::gemma3_4b(), "a multimodal folder");
        refused(ModelSpec { sliding_layers: (0..34).map(|l| l % 4 != 3).collect(), ..text.clone() }, "every fourth layer global");
        refused(ModelSpec { local_rope: Some(Rope { theta: 20_000.0, scaling: None }), ..text.clone() }, "local θ 20000");
        refused(ModelSpec { attn_scale: Some(0.125), ..text }, "another softmax scale");
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.layers.3.self_attn.o_proj.weight", false).as_deref(), Some("blk.3.attn_output.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.bias", false).as_deref(), Some("blk.0.attn_q.bias"));
        assert_eq!(gguf_name("model.layers.1.post_attention_layernorm.weight", false).as_deref(), Some("blk.1.ffn_norm.weight"));
        assert_eq!(gguf_name("model.layers.1.self_attn.rotary_emb.inv_freq", false), None);
        // Gemma's four norms per layer, as the `gguf` package's tensor map for `gemma3` names them.
        let g = |n: &str| gguf_name(&format!("model.layers.2.{n}.weight"), true);
        assert_eq!(g("input_layernorm").as_deref(), Some("blk.2.attn_norm.weight"));
        assert_eq!(g("post_attention_layernorm").as_deref(), Some("blk.2.post_attention_norm.weight"));
        assert_eq!(g("pre_feedforward_layernorm").as_deref(), Some("blk.2.ffn_norm.weight"));
        assert_eq!(g("post_feedforward_layernorm").as_deref(), Some("blk.2.post_ffw_norm.weight"));
    }
}
