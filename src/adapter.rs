//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names,
//! loadable by `peft.PeftModel.from_pretrained`; and the reverse, to continue from or evaluate an
//! existing adapter.
//!
//! Token rows trained with the adapter (the untrained-token fix) travel the way PEFT ≥ 0.15 saves
//! LoRA's `trainable_token_indices`: the config names the rows per module
//! (`{"embed_tokens": [ids], "lm_head": [ids]}`) and the weights file holds each module's rows as
//! `<module>.token_adapter.trainable_tokens_delta`, `[k, hidden]`. Despite the name PEFT stores the
//! rows' new values there, not differences, and writes them over the base rows (`index_copy`), so
//! that is what we store. With tied embeddings only `embed_tokens` is listed: PEFT ties the head's
//! wrapper to it, and our engine trains one table for both. What PEFT cannot carry — the AdamW
//! moments of the rows, and which rows were chosen and why — stays in the run folder
//! (`checkpoints/`, `token_fix.json`); an older PEFT that predates trainable tokens loads the LoRA
//! part and silently keeps the untrained rows, so the merged export is the safer hand-off there.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Value, json};

use crate::config::{LoraConfig, Target};
use crate::engine::TokenRows;
use crate::engine::lora::{LoraPair, LoraWeights, peft_key};
use crate::error::{Error, IoContext, Result};
use crate::model::ModelSpec;
use crate::model::weights::{OutTensor, SmallTensors, read_small_f32_finite, serialize_safetensors};
use crate::util::{write_atomic, write_dir_atomic};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The JSON PEFT writes for a LoRA adapter (fields PEFT ≥ 0.10 reads; unknown ones are ignored).
/// The text model of a multimodal folder is targeted by a regex on its modules, so PEFT leaves the
/// vision tower's projections (also named `q_proj`, …) alone.
pub fn adapter_config_json(spec: &ModelSpec, lora: &LoraConfig, base_model: &str) -> Value {
    let mut targets: Vec<&str> = lora.targets.iter().map(|t| t.hf_name()).collect();
    targets.sort();
    let target_modules = if spec.text_tower { json!(format!(r".*\.language_model\..*\.({})", targets.join("|"))) } else { json!(targets) };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "use_rslora": lora.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    })
}

/// PEFT's key for the trained rows of the input embedding.
pub fn embed_tokens_key(spec: &ModelSpec) -> String {
    format!("{}embed_tokens.token_adapter.trainable_tokens_delta", spec.peft_decoder_prefix())
}
/// PEFT's key for the trained rows of an untied `lm_head`.
pub const LM_HEAD_TOKENS_KEY: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";

/// `trainable_token_indices` for the config: the embedding's rows, and the head's when it is a
/// table of its own.
fn trainable_token_indices(rows: &TokenRows) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("embed_tokens".into(), json!(rows.ids));
    if rows.head.is_some() {
        m.insert("lm_head".into(), json!(rows.ids));
    }
    Value::Object(m)
}

/// What a PEFT adapter holds: the LoRA weights and settings, the base model it was trained on,
/// and the token rows trained alongside (PEFT's trainable tokens, see the module comment).
#[derive(Clone, Copy)]
pub struct AdapterFiles<'a> {
    /// The base model's shape: PEFT's key names depend on it (a multimodal folder's text model).
    pub spec: &'a ModelSpec,
    pub weights: &'a LoraWeights,
    pub lora: &'a LoraConfig,
    pub base_model: &'a str,
    pub tokens: Option<&'a TokenRows>,
}

impl AdapterFiles<'_> {
    /// Write `adapter_config.json` and `adapter_model.safetensors` into `folder`. Every adapter
    /// we write goes through here (a run's `adapter/`, each checkpoint, `tunestudio export`, the
    /// studio's export), so none can lose the trained token rows.
    pub fn write_into(&self, folder: &Path) -> Result<()> {
        let (bytes, config) = self.serialize()?;
        write_atomic(&folder.join(WEIGHTS_FILE), &bytes)?;
        write_atomic(&folder.join(CONFIG_FILE), config.as_bytes())
    }

    fn serialize(&self) -> Result<(Vec<u8>, String)> {
        let weights = self.weights;
        let mut tensors = Vec::new();
        for (l, layer) in weights.layers.iter().enumerate() {
            for (&t, p) in layer {
                let inp = p.a.len() / weights.rank;
                let out = p.b.len() / weights.rank;
                tensors.push(OutTensor::from_f32(peft_key(self.spec, l, t, 'A'), vec![weights.rank, inp], &p.a, Dtype::F32));
                tensors.push(OutTensor::from_f32(peft_key(self.spec, l, t, 'B'), vec![out, weights.rank], &p.b, Dtype::F32));
            }
        }
        let mut config = adapter_config_json(self.spec, self.lora, self.base_model);
        if let Some(rows) = self.tokens {
            let k = rows.ids.len();
            let d = rows.embed.len().checked_div(k).unwrap_or(0);
            if k == 0 || rows.embed.len() != k * d || rows.head.as_ref().is_some_and(|h| h.len() != k * d) {
                return Err(Error::bug(
                    "adapter save",
                    format!("token rows: {k} ids with {} embedding values cannot be saved as [k, hidden]", rows.embed.len()),
                ));
            }
            tensors.push(OutTensor::from_f32(embed_tokens_key(self.spec), vec![k, d], &rows.embed, Dtype::F32));
            if let Some(h) = &rows.head {
                tensors.push(OutTensor::from_f32(LM_HEAD_TOKENS_KEY, vec![k, d], h, Dtype::F32));
            }
            config["trainable_token_indices"] = trainable_token_indices(rows);
        }
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        Ok((serialize_safetensors(&tensors, Some(meta))?, serde_json::to_string_pretty(&config).expect("json")))
    }

    /// Write the adapter as the folder `dir`, atomically (built in a temporary sibling, renamed
    /// into place).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let (bytes, config) = self.serialize()?;
        write_dir_atomic(dir, |tmp| {
            write_atomic(&tmp.join(WEIGHTS_FILE), &bytes)?;
            write_atomic(&tmp.join(CONFIG_FILE), config.as_bytes())
        })
    }
}

/// LoRA weights and token rows read from a PEFT weights file without a model spec (a
/// checkpoint's own adapter): each listed `(layer, target)`'s `lora_A`/`lora_B` and the
/// trainable-token rows of `ids`, shapes as stored. Keys are found by their ending, which does
/// not depend on the model's prefix (`…model.layers.N…` or `…language_model.layers.N…`).
pub fn read_weights(
    path: &Path,
    rank: usize,
    slots: &[(usize, Target)],
    ids: &[u32],
    head_rows: bool,
) -> Result<(LoraWeights, Option<TokenRows>)> {
    let tensors = read_small_f32_finite(path)?;
    let take = |suffix: &str| -> Result<Vec<f32>> {
        tensors
            .iter()
            .find(|(k, _)| k.ends_with(suffix))
            .map(|(_, t)| t.1.clone())
            .ok_or_else(|| Error::tensor(format!("…{suffix}"), Some(path), "is missing"))
    };
    let layers_n = slots.iter().map(|s| s.0 + 1).max().unwrap_or(0);
    let mut layers = vec![BTreeMap::new(); layers_n];
    for &(l, t) in slots {
        let key = |which: char| format!(".layers.{l}.{}.{}.lora_{which}.weight", t.hf_parent(), t.hf_name());
        layers[l].insert(t, LoraPair { a: take(&key('A'))?, b: take(&key('B'))? });
    }
    let rows = if ids.is_empty() {
        None
    } else {
        let head = if head_rows { Some(take(LM_HEAD_TOKENS_KEY)?) } else { None };
        Some(TokenRows { ids: ids.to_vec(), embed: take("embed_tokens.token_adapter.trainable_tokens_delta")?, head })
    };
    Ok((LoraWeights { rank, layers }, rows))
}

/// An adapter read back from disk.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub lora: LoraConfig,
    pub weights: LoraWeights,
    pub base_model: String,
    /// Trained token rows (PEFT trainable tokens). `head` is `None` when the adapter carries no
    /// `lm_head` rows: with tied embeddings that is complete; with an untied head the base rows
    /// apply (see [`complete_token_rows`]).
    pub token_rows: Option<TokenRows>,
}

/// Read a PEFT LoRA adapter and check it against the model's shapes.
pub fn load_peft(dir: &Path, spec: &ModelSpec) -> Result<LoadedAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).with_path(&cfg_path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::line(&cfg_path, e.line(), format!("invalid JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(Error::file(&cfg_path, format!("peft_type is `{peft_type}`; only LORA adapters are supported")));
    }
    let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| Error::file(&cfg_path, "`r` is missing"))? as usize;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(r as f64);
    if v.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(Error::file(&cfg_path, "DoRA adapters are not supported"));
    }
    let rank_pattern = v.get("rank_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty());
    if rank_pattern {
        return Err(Error::file(&cfg_path, "per-module ranks (rank_pattern) are not supported"));
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = read_small_f32_finite(&weights_path)?;
    let targets: Vec<Target> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                let name = x.as_str().unwrap_or("");
                Target::from_hf_name(name)
                    .ok_or_else(|| Error::file(&cfg_path, format!("target module `{name}` is not one of the 7 Llama linears")))
            })
            .collect::<Result<_>>()?,
        // A regex (PEFT matches it against module names; Unsloth and we write one for multimodal
        // folders): the adapted linears are the ones the weights file holds.
        Some(Value::String(_)) => Target::ALL
            .into_iter()
            .filter(|&t| {
                (0..spec.num_layers).any(|l| {
                    let key = peft_key(spec, l, t, 'A');
                    tensors.contains_key(&key) || tensors.contains_key(&key.replace("lora_A.weight", "lora_A.default.weight"))
                })
            })
            .collect(),
        _ => return Err(Error::file(&cfg_path, "`target_modules` is missing")),
    };
    let mut targets = targets;
    targets.sort();
    targets.dedup();
    let lora = LoraConfig {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        targets: targets.clone(),
        rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
    };
    let mut layers = vec![BTreeMap::new(); spec.num_layers];
    let mut used = 0;
    for (l, layer) in layers.iter_mut().enumerate() {
        for &t in &targets {
            let (out, inp) = spec.linear_shape(t);
            let get = |which: char, shape: [usize; 2]| -> Result<Vec<f32>> {
                let key = peft_key(spec, l, t, which);
                // PEFT also writes keys with the adapter name (`lora_A.default.weight`) in some versions.
                let alt = key.replace(&format!("lora_{which}.weight"), &format!("lora_{which}.default.weight"));
                let (s, data) = tensors
                    .get(&key)
                    .or_else(|| tensors.get(&alt))
                    .ok_or_else(|| Error::tensor(&key, Some(&weights_path), "is missing"))?;
                if s.as_slice() != shape {
                    return Err(Error::tensor(
                        &key,
                        Some(&weights_path),
                        format!("has shape {s:?} but the model needs {shape:?}: the adapter was trained for a different base model"),
                    ));
                }
                Ok(data.clone())
            };
            let a = get('A', [r, inp])?;
            let b = get('B', [out, r])?;
            used += 2;
            layer.insert(t, LoraPair { a, b });
        }
    }
    let lora_keys = tensors.keys().filter(|k| k.contains("lora_")).count();
    if lora_keys != used {
        return Err(Error::file(
            &weights_path,
            format!("holds {lora_keys} LoRA tensors but the config and model account for {used}: layers or targets do not match the model"),
        ));
    }
    let base_model = v.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
    let token_rows = load_token_rows(&v, &cfg_path, &tensors, &weights_path, spec)?;
    Ok(LoadedAdapter { lora, weights: LoraWeights { rank: r, layers }, base_model, token_rows })
}

/// The ids listed for one module in `trainable_token_indices`.
fn token_ids(v: &Value, cfg_path: &Path, module: &str) -> Result<Option<Vec<u32>>> {
    let field = match v.get("trainable_token_indices") {
        None | Some(Value::Null) => return Ok(None),
        // A bare list targets the input embedding.
        Some(list @ Value::Array(_)) if module == "embed_tokens" => list,
        Some(Value::Array(_)) => return Ok(None),
        Some(Value::Object(m)) => match m.get(module) {
            Some(list) => list,
            None => return Ok(None),
        },
        Some(_) => return Err(Error::file(cfg_path, "`trainable_token_indices` is neither a list nor a map of lists")),
    };
    let ids = field
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok())).collect::<Option<Vec<u32>>>())
        .ok_or_else(|| Error::file(cfg_path, format!("`trainable_token_indices.{module}` is not a list of token ids")))?;
    Ok(Some(ids))
}

fn load_token_rows(v: &Value, cfg_path: &Path, tensors: &SmallTensors, weights_path: &Path, spec: &ModelSpec) -> Result<Option<TokenRows>> {
    if let Some(Value::Object(m)) = v.get("trainable_token_indices")
        && let Some(other) = m.keys().find(|k| *k != "embed_tokens" && *k != "lm_head")
    {
        return Err(Error::file(cfg_path, format!("trainable tokens on `{other}` are not supported (only embed_tokens and lm_head)")));
    }
    let embed_ids = token_ids(v, cfg_path, "embed_tokens")?;
    let head_ids = token_ids(v, cfg_path, "lm_head")?;
    let d = spec.hidden_size;
    let rows_of = |key: &str, ids: &[u32]| -> Result<Vec<f32>> {
        let (shape, data) = tensors
            .get(key)
            .ok_or_else(|| Error::tensor(key, Some(weights_path), "is missing but adapter_config.json lists trainable tokens for it"))?;
        if shape.as_slice() != [ids.len(), d] {
            return Err(Error::tensor(
                key,
                Some(weights_path),
                format!("has shape {shape:?}; {} token ids and hidden size {d} need [{}, {d}]", ids.len(), ids.len()),
            ));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= spec.vocab_size) {
            return Err(Error::file(cfg_path, format!("trainable token id {bad} is outside the model's vocabulary ({})", spec.vocab_size)));
        }
        Ok(data.clone())
    };
    let embed_key = embed_tokens_key(spec);
    let stray = [embed_key.as_str(), LM_HEAD_TOKENS_KEY].into_iter().find(|k| tensors.contains_key(*k));
    match (embed_ids, head_ids) {
        (None, None) => match stray {
            Some(k) => Err(Error::tensor(k, Some(weights_path), "is present but adapter_config.json has no `trainable_token_indices`")),
            None => Ok(None),
        },
        (Some(ids), head) => {
            let embed = rows_of(&embed_key, &ids)?;
            let head = match head {
                None => None,
                Some(h) if h == ids => Some(rows_of(LM_HEAD_TOKENS_KEY, &h)?),
                Some(_) => {
                    return Err(Error::file(
                        cfg_path,
                        "trainable tokens list different ids for embed_tokens and lm_head; only the same rows in both are supported",
                    ));
                }
            };
            if spec.tie_word_embeddings && head.is_some() {
                return Err(Error::file(
                    cfg_path,
                    "the model ties lm_head to embed_tokens, so trainable tokens on lm_head cannot differ from the embedding's",
                ));
            }
            Ok(Some(TokenRows { ids, embed, head }))
        }
        (None, Some(_)) => Err(Error::file(cfg_path, "trainable tokens on lm_head alone (without embed_tokens) are not supported")),
    }
}

/// Fill in the head rows of an untied model that the adapter leaves at their base values, so the
/// rows can go to `Trainer::set_token_rows` (which trains or sets both tables together).
pub fn complete_token_rows(rows: &TokenRows, spec: &ModelSpec, src: &dyn crate::engine::model::WeightSource) -> Result<TokenRows> {
    // Tied embeddings: the head is the embedding, as transformers loads it.
    let tied = spec.tie_word_embeddings;
    let mut out = rows.clone();
    if tied {
        out.head = None;
    } else if out.head.is_none() {
        let (v, d) = (spec.vocab_size, spec.hidden_size);
        let head = src.dense("lm_head.weight", &[v, d])?;
        out.head = Some(rows.ids.iter().flat_map(|&i| head[i as usize * d..(i as usize + 1) * d].iter().copied()).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            ..ModelSpec::llama3_8b()
        }
    }

    #[test]
    fn round_trip_and_shape_mismatch() {
        let s = spec();
        let lora = LoraConfig { r: 2, targets: vec![Target::Q, Target::Down], ..LoraConfig::default() };
        let w = LoraWeights::init(&s, &lora, 3);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        AdapterFiles { spec: &s, weights: &w, lora: &lora, base_model: "base", tokens: None }.save(&out).unwrap();
        let back = load_peft(&out, &s).unwrap();
        assert_eq!(back.weights, w);
        assert_eq!(back.lora.targets, lora.targets);
        let other = ModelSpec { hidden_size: 16, num_heads: 4, ..s };
        let e = load_peft(&out, &other).unwrap_err().to_string();
        assert!(e.contains("lora_A") && e.contains("different base model"), "{e}");
    }

    #[test]
    fn token_rows_round_trip_as_peft_trainable_tokens() {
        let s = spec();
        let lora = LoraConfig { r: 2, targets: vec![Target::V], ..LoraConfig::default() };
        let w = LoraWeights::init(&s, &lora, 4);
        let rows =
            TokenRows { ids: vec![3, 7], embed: (0..16).map(|i| i as f32).collect(), head: Some((0..16).map(|i| -(i as f32)).collect()) };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        AdapterFiles { spec: &s, weights: &w, lora: &lora, base_model: "base", tokens: Some(&rows) }.save(&out).unwrap();
        let back = load_peft(&out, &s).unwrap();
        assert_eq!(back.token_rows, Some(rows.clone()));
        // A tied model cannot take separate head rows.
        let tied = ModelSpec { tie_word_embeddings: true, ..s.clone() };
        let e = load_peft(&out, &tied).unwrap_err().to_string();
        assert!(e.contains("ties lm_head"), "{e}");
        // Rows in the file that the config does not list are refused, not ignored.
        let cfg = out.join(CONFIG_FILE);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("trainable_token_indices");
        std::fs::write(&cfg, v.to_string()).unwrap();
        let e = load_peft(&out, &s).unwrap_err().to_string();
        assert!(e.contains("trainable_tokens_delta") && e.contains("no `trainable_token_indices`"), "{e}");
    }
}
