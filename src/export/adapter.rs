//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names,
//! loadable by `peft.PeftModel.from_pretrained`; and the reverse, to continue from or evaluate an
//! existing adapter.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Value, json};

use crate::config::{LoraConfig, Target};
use crate::engine::lora::{LoraPair, LoraWeights, peft_key};
use crate::error::{Error, IoContext, Result};
use crate::model::ModelSpec;
use crate::model::weights::{OutTensor, read_small_f32, serialize_safetensors};
use crate::util::{write_atomic, write_dir_atomic};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The JSON PEFT writes for a LoRA adapter (fields PEFT ≥ 0.10 reads; unknown ones are ignored).
pub fn adapter_config_json(lora: &LoraConfig, base_model: &str) -> Value {
    let mut targets: Vec<&str> = lora.targets.iter().map(|t| t.hf_name()).collect();
    targets.sort();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
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

/// Write `dir` atomically (built in a temporary sibling, renamed into place).
pub fn save_peft(dir: &Path, weights: &LoraWeights, lora: &LoraConfig, base_model: &str) -> Result<()> {
    let mut tensors = Vec::new();
    for (l, layer) in weights.layers.iter().enumerate() {
        for (&t, p) in layer {
            let inp = p.a.len() / weights.rank;
            let out = p.b.len() / weights.rank;
            tensors.push(OutTensor::from_f32(peft_key(l, t, 'A'), vec![weights.rank, inp], &p.a, Dtype::F32));
            tensors.push(OutTensor::from_f32(peft_key(l, t, 'B'), vec![out, weights.rank], &p.b, Dtype::F32));
        }
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = serialize_safetensors(&tensors, Some(meta))?;
    let config = serde_json::to_string_pretty(&adapter_config_json(lora, base_model)).expect("json");
    write_dir_atomic(dir, |tmp| {
        write_atomic(&tmp.join(WEIGHTS_FILE), &bytes)?;
        write_atomic(&tmp.join(CONFIG_FILE), config.as_bytes())
    })
}

/// An adapter read back from disk.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub lora: LoraConfig,
    pub weights: LoraWeights,
    pub base_model: String,
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
    let targets: Vec<Target> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                let name = x.as_str().unwrap_or("");
                Target::from_hf_name(name).ok_or_else(|| Error::file(&cfg_path, format!("target module `{name}` is not one of the 7 Llama linears")))
            })
            .collect::<Result<_>>()?,
        Some(Value::String(s)) => return Err(Error::file(&cfg_path, format!("target_modules as a regex (`{s}`) is not supported"))),
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
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = read_small_f32(&weights_path)?;
    let mut layers = vec![BTreeMap::new(); spec.num_layers];
    let mut used = 0;
    for (l, layer) in layers.iter_mut().enumerate() {
        for &t in &targets {
            let (out, inp) = spec.linear_shape(t);
            let get = |which: char, shape: [usize; 2]| -> Result<Vec<f32>> {
                let key = peft_key(l, t, which);
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
    Ok(LoadedAdapter { lora, weights: LoraWeights { rank: r, layers }, base_model })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec { vocab_size: 10, hidden_size: 8, intermediate_size: 12, num_layers: 2, num_heads: 2, num_kv_heads: 1, head_dim: 4, ..ModelSpec::llama3_8b() }
    }

    #[test]
    fn round_trip_and_shape_mismatch() {
        let s = spec();
        let lora = LoraConfig { r: 2, targets: vec![Target::Q, Target::Down], ..LoraConfig::default() };
        let w = LoraWeights::init(&s, &lora, 3);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        save_peft(&out, &w, &lora, "base").unwrap();
        let back = load_peft(&out, &s).unwrap();
        assert_eq!(back.weights, w);
        assert_eq!(back.lora.targets, lora.targets);
        let other = ModelSpec { hidden_size: 16, num_heads: 4, ..s };
        let e = load_peft(&out, &other).unwrap_err().to_string();
        assert!(e.contains("lora_A") && e.contains("different base model"), "{e}");
    }
}
