//! What an export reads from a run folder: the effective config, the adapter the session wrote,
//! and the token rows trained with it (kept in the newest checkpoint, which the session writes
//! at the same step as `adapter/`).

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::engine::TokenRows;
use crate::error::{Error, Result};
use crate::export::adapter::{LoadedAdapter, load_peft, save_peft_with_tokens};
use crate::model::ModelSpec;
use crate::session::checkpoint;

pub struct RunArtifacts {
    pub run_dir: PathBuf,
    pub config: RunConfig,
    pub spec: ModelSpec,
    pub adapter: LoadedAdapter,
}

/// Read a finished (or stopped) run: `config.toml`, `adapter/`, and, when the run trained token
/// rows (`token_fix.json`), those rows from the newest checkpoint.
pub fn load_run(run_dir: &Path) -> Result<RunArtifacts> {
    let cfg_path = run_dir.join(checkpoint::CONFIG_FILE);
    if !cfg_path.exists() {
        return Err(Error::file(run_dir, "is not a run folder (no config.toml); give the folder `tunestudio train` printed"));
    }
    let config = RunConfig::load(&cfg_path)?;
    let spec = ModelSpec::from_dir(&config.model.path)?;
    let adapter_dir = run_dir.join(checkpoint::ADAPTER_DIR);
    if !adapter_dir.exists() {
        return Err(Error::file(
            &adapter_dir,
            "is missing: the run has not finished a step yet (or was interrupted before saving); continue it with `tunestudio train --resume`",
        ));
    }
    let mut adapter = load_peft(&adapter_dir, &spec)?;
    if adapter.token_rows.is_none() && run_dir.join("token_fix.json").exists() {
        let ckpt = checkpoint::load_latest(run_dir)?;
        // The rows must belong to the same step as adapter/: the LoRA weights say which step that is.
        if ckpt.weights.layers.len() != adapter.weights.layers.len()
            || ckpt.weights.layers.iter().zip(&adapter.weights.layers).any(|(a, b)| a != b)
        {
            return Err(Error::file(
                &ckpt.dir,
                format!(
                    "holds different LoRA weights than {}: the trained token rows cannot be matched to the adapter",
                    adapter_dir.display()
                ),
            ));
        }
        let rows =
            ckpt.token_rows.ok_or_else(|| Error::file(&ckpt.dir, "has no token rows although token_fix.json says the run trained some"))?;
        adapter.token_rows = Some(rows);
    }
    Ok(RunArtifacts { run_dir: run_dir.to_path_buf(), config, spec, adapter })
}

/// The token rows of a run's adapter, if it trained any.
pub fn token_rows(a: &RunArtifacts) -> Option<&TokenRows> {
    a.adapter.token_rows.as_ref()
}

/// `tunestudio export adapter`: write the run's adapter, with its trained token rows as PEFT
/// trainable tokens, to `to` (refused if it exists), or rewrite `<run>/adapter` in place.
pub fn export_adapter(run_dir: &Path, to: Option<&Path>) -> Result<PathBuf> {
    let art = load_run(run_dir)?;
    let dest = match to {
        Some(d) => {
            if d.exists() {
                return Err(Error::file(d, "already exists; choose a new folder (exports never overwrite)"));
            }
            d.to_path_buf()
        }
        None => run_dir.join(checkpoint::ADAPTER_DIR),
    };
    let base = art.config.model.path.display().to_string();
    save_peft_with_tokens(&dest, &art.spec, &art.adapter.weights, &art.adapter.lora, &base, token_rows(&art))?;
    Ok(dest)
}
