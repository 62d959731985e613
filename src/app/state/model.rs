//! The Model panel's state: the model folder described before anything is loaded on a device
//! (`describe`, run on a worker), the rows the panel shows, and the recent folders.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::tokenizer::{PadSource, TokenizerBundle};
use crate::model::{ModelSpec, WeightStore, check_folder, untrained};
use crate::util::{fmt_bytes, fmt_count};

use crate::app::jobs::Load;

/// Everything the panel shows about a model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// The shape `engine::plan` needs (from config.json): the memory budget plans with it.
    pub spec: ModelSpec,
    pub architecture: String,
    pub shape: String,
    pub total_params: u64,
    pub linear_params: u64,
    pub disk_bytes: u64,
    /// Tensor dtypes with how many tensors use each.
    pub dtypes: Vec<(String, usize)>,
    pub context_len: usize,
    pub rope: String,
    pub vocab_size: usize,
    pub chat_template: bool,
    /// Named chat templates besides the default one (`tool_use`, …), for the template menu.
    pub named_templates: Vec<String>,
    /// BOS, EOS and PAD as text, with where the pad came from.
    pub specials: String,
    /// Token rows that were never trained (all zero), with their text; BOS/EOS/PAD excluded.
    pub untrained: Vec<(u32, String)>,
    pub tokenizer_warnings: Vec<String>,
}

/// Read a model folder: config.json, the safetensors headers, the tokenizer, and the untrained
/// rows (a scan of the embedding matrix: seconds for an 8B model, hence the worker).
pub fn describe(dir: &Path) -> crate::Result<ModelInfo> {
    check_folder(dir)?;
    let spec = ModelSpec::from_dir(dir)?;
    let store = WeightStore::open(dir)?;
    let tok = tokenizer(dir)?;
    let mut exclude: Vec<u32> = [tok.bos_id(), tok.eos_id(), Some(tok.pad_id())].into_iter().flatten().collect();
    exclude.extend(spec.eos_token_ids.iter().copied());
    let untrained = untrained::detect(&store, &spec, &exclude)?;
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_else(|| "none".into());
    let pad_from = match tok.pad_source() {
        PadSource::Declared => "declared",
        PadSource::GenerationConfig => "from generation_config.json",
        PadSource::Reserved => "an unused reserved token",
        PadSource::Eos => "same as EOS",
    };
    Ok(ModelInfo {
        path: dir.to_path_buf(),
        spec: spec.clone(),
        architecture: format!("{} ({:?})", spec.model_type, spec.family),
        shape: format!(
            "{} layers, hidden {}, MLP {}, {} heads / {} KV heads × {}{}",
            spec.num_layers,
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            if spec.tie_word_embeddings { ", tied embeddings" } else { "" }
        ),
        total_params: spec.total_params(),
        linear_params: spec.linear_params(),
        disk_bytes: store.total_bytes(),
        dtypes: store.dtype_counts().into_iter().collect(),
        context_len: spec.max_position_embeddings,
        rope: format!("θ {}{}", spec.rope_theta, spec.rope_scaling.as_ref().map(|s| format!(", {s:?}")).unwrap_or_default()),
        vocab_size: tok.vocab_size(),
        chat_template: tok.chat_template().is_some(),
        named_templates: tok.chat_templates().map(|(n, _)| n.to_string()).filter(|n| n != "default").collect(),
        specials: format!("BOS {}, EOS {}, PAD {} ({pad_from})", text(tok.bos_id()), text(tok.eos_id()), text(Some(tok.pad_id()))),
        untrained: untrained.iter().map(|&i| (i, tok.token_text(i).unwrap_or_default())).collect(),
        tokenizer_warnings: tok.warnings().to_vec(),
    })
}

/// The tokenizer of the model folder last asked for. Loading a real tokenizer.json takes a
/// noticeable fraction of a second and the dataset preview asks for it on every edit.
pub fn tokenizer(model_dir: &Path) -> crate::Result<Arc<TokenizerBundle>> {
    static CACHE: Mutex<Option<(PathBuf, Arc<TokenizerBundle>)>> = Mutex::new(None);
    if let Some((p, t)) = CACHE.lock().ok().and_then(|c| c.clone())
        && p == model_dir
    {
        return Ok(t);
    }
    let t = Arc::new(TokenizerBundle::load(model_dir)?);
    if let Ok(mut c) = CACHE.lock() {
        *c = Some((model_dir.to_path_buf(), Arc::clone(&t)));
    }
    Ok(t)
}

/// The rows of the info table, as (label, value) text: what the panel draws, testable as text.
pub fn info_rows(info: &ModelInfo) -> Vec<(&'static str, String)> {
    let dtypes: Vec<String> = info.dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    let untrained = match info.untrained.len() {
        0 => "none".to_string(),
        n => {
            let ids: Vec<String> = info.untrained.iter().take(6).map(|(i, t)| format!("{i} {t}")).collect();
            format!("{n} rows are all zero: {}{}", ids.join(", "), if n > 6 { ", …" } else { "" })
        }
    };
    vec![
        ("Architecture", info.architecture.clone()),
        ("Shape", info.shape.clone()),
        ("Parameters", format!("{} ({} in decoder linears)", fmt_count(info.total_params), fmt_count(info.linear_params))),
        ("On disk", fmt_bytes(info.disk_bytes)),
        ("Dtypes", dtypes.join(", ")),
        ("Context length", format!("{} positions, rope {}", info.context_len, info.rope)),
        ("Vocabulary", format!("{} tokens", info.vocab_size)),
        ("Chat template", if info.chat_template { "present".into() } else { "absent: a built-in template will be used".into() }),
        ("Special tokens", info.specials.clone()),
        ("Untrained tokens", untrained),
    ]
}

/// Recent model folders, newest first, kept in `recent_models.json` in the settings folder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recent {
    pub models: Vec<PathBuf>,
}

const RECENT_FILE: &str = "recent_models.json";
const RECENT_KEEP: usize = 8;

impl Recent {
    pub fn load(settings_dir: &Path) -> Self {
        std::fs::read_to_string(settings_dir.join(RECENT_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    pub fn save(&self, settings_dir: &Path) -> crate::Result<()> {
        crate::util::write_atomic(&settings_dir.join(RECENT_FILE), serde_json::to_string_pretty(self).expect("json").as_bytes())
    }

    /// Put `path` first, without duplicates, keeping at most `RECENT_KEEP`.
    pub fn push(&mut self, path: &Path) {
        self.models.retain(|p| p != path);
        self.models.insert(0, path.to_path_buf());
        self.models.truncate(RECENT_KEEP);
    }
}

#[derive(Debug, Default)]
pub struct ModelState {
    pub info: Load<ModelInfo>,
    pub recent: Recent,
    /// Models already downloaded into the Hugging Face cache, and the cache's folder.
    pub cached: Load<Vec<CachedModel>>,
    pub cache_dir: Option<PathBuf>,
}

/// A model in the Hugging Face hub cache, by the repo id it was downloaded as.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedModel {
    pub repo_id: String,
    /// The snapshot folder (what `snapshot_download` returns): the model folder to train.
    pub path: PathBuf,
}

/// Where `huggingface_hub` keeps downloads: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// The models in a hub cache that TuneStudio can train: `models--ORG--NAME` entries whose
/// snapshot (the one `refs/main` names, else the newest) holds config.json and safetensors
/// weights. Sorted by repo id; an unreadable cache is an empty one.
pub fn scan_hf_cache(root: &Path) -> Vec<CachedModel> {
    let mut out: Vec<CachedModel> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let repo_id = name.strip_prefix("models--")?.replace("--", "/");
            let entry = e.path();
            let main = std::fs::read_to_string(entry.join("refs/main")).ok().map(|h| entry.join("snapshots").join(h.trim()));
            let newest = || {
                std::fs::read_dir(entry.join("snapshots"))
                    .ok()?
                    .flatten()
                    .filter(|s| s.path().join("config.json").is_file())
                    .max_by_key(|s| s.metadata().and_then(|m| m.modified()).ok())
                    .map(|s| s.path())
            };
            let path = main.filter(|p| p.join("config.json").is_file()).or_else(newest)?;
            let has_weights = std::fs::read_dir(&path).ok()?.flatten().any(|f| f.file_name().to_string_lossy().ends_with(".safetensors"));
            has_weights.then_some(CachedModel { repo_id, path })
        })
        .collect();
    out.sort_by_key(|m| m.repo_id.to_lowercase());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_cache_is_listed_by_repo_id() {
        let d = tempfile::tempdir().unwrap();
        let snapshot = |repo: &str, hash: &str, files: &[&str]| {
            let p = d.path().join(repo).join("snapshots").join(hash);
            std::fs::create_dir_all(&p).unwrap();
            for f in files {
                std::fs::write(p.join(f), "").unwrap();
            }
            p
        };
        let smol = snapshot("models--HuggingFaceTB--SmolLM2-135M-Instruct", "aaa", &["config.json", "model.safetensors"]);
        std::fs::create_dir_all(d.path().join("models--HuggingFaceTB--SmolLM2-135M-Instruct/refs")).unwrap();
        std::fs::write(d.path().join("models--HuggingFaceTB--SmolLM2-135M-Instruct/refs/main"), "aaa\n").unwrap();
        let qwen = snapshot("models--Qwen--Qwen2.5-0.5B", "bbb", &["config.json", "model-00001-of-00002.safetensors"]);
        snapshot("models--someone--gguf-only", "ccc", &["config.json", "model.gguf"]);
        snapshot("datasets--someone--data", "ddd", &["config.json", "x.safetensors"]);
        let found = scan_hf_cache(d.path());
        assert_eq!(
            found,
            vec![
                CachedModel { repo_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), path: smol },
                CachedModel { repo_id: "Qwen/Qwen2.5-0.5B".into(), path: qwen },
            ]
        );
        assert!(scan_hf_cache(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn recent_keeps_newest_first_without_duplicates() {
        let mut r = Recent::default();
        for i in 0..10 {
            r.push(Path::new(&format!("/m/{i}")));
        }
        r.push(Path::new("/m/5"));
        assert_eq!(r.models.len(), RECENT_KEEP);
        assert_eq!(r.models[0], PathBuf::from("/m/5"));
        assert_eq!(r.models.iter().filter(|p| p.as_path() == Path::new("/m/5")).count(), 1);
        let dir = tempfile::tempdir().unwrap();
        r.save(dir.path()).unwrap();
        assert_eq!(Recent::load(dir.path()), r);
        assert_eq!(Recent::load(&dir.path().join("missing")), Recent::default());
    }
}
