//! What an export reads from a run folder: the effective config and the adapter with the token
//! rows trained with it. A finished or stopped run has `adapter/`; a run that failed or was killed
//! has only its checkpoints, each of which is a PEFT adapter too, and the newest one is used. The
//! run folder is locked while it is read, so an export never reads a run that another process is
//! writing.

use std::path::{Path, PathBuf};

use crate::adapter::{AdapterFiles, LoadedAdapter, load_peft};
use crate::config::RunConfig;
use crate::engine::TokenRows;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::session::checkpoint;
use crate::session::lock::RunLock;

pub struct RunArtifacts {
    pub run_dir: PathBuf,
    pub config: RunConfig,
    pub spec: ModelSpec,
    pub adapter: LoadedAdapter,
    /// Where the adapter was read from: `adapter/` or a checkpoint folder.
    pub source: PathBuf,
    /// The run folder's lock, held for as long as these are in use.
    pub lock: RunLock,
}

/// Read a run: `config.toml`, and `adapter/` or else the newest checkpoint. A run written before
/// `adapter/` carried the trained token rows (`token_fix.json` present, rows absent) gets them
/// from the newest checkpoint, which the session writes at the same step as `adapter/`.
pub fn load_run(run_dir: &Path) -> Result<RunArtifacts> {
    let cfg_path = run_dir.join(checkpoint::CONFIG_FILE);
    if !cfg_path.exists() {
        return Err(Error::file(run_dir, "is not a run folder (no config.toml); give the folder `tunestudio train` printed"));
    }
    let lock = RunLock::acquire(run_dir, "export")?;
    let config = RunConfig::load(&cfg_path)?;
    let spec = ModelSpec::from_dir(&config.model.path)?;
    let adapter_dir = run_dir.join(checkpoint::ADAPTER_DIR);
    if !adapter_dir.join(crate::adapter::CONFIG_FILE).is_file() {
        let Some(ckpt_dir) = checkpoint::latest_dir(run_dir) else {
            return Err(Error::file(
                &adapter_dir,
                format!(
                    "is missing and the run saved no checkpoint: it stopped before its first save; start it again with `tunestudio train --restart {}`",
                    run_dir.display()
                ),
            ));
        };
        let c = checkpoint::load(&ckpt_dir)?;
        let lora = crate::config::LoraConfig { r: c.weights.rank, ..config.lora.clone() };
        let base_model = config.model.path.display().to_string();
        let adapter = LoadedAdapter { lora, weights: c.weights, base_model, token_rows: c.token_rows };
        return Ok(RunArtifacts { run_dir: run_dir.to_path_buf(), config, spec, adapter, source: ckpt_dir, lock });
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
    Ok(RunArtifacts { run_dir: run_dir.to_path_buf(), config, spec, adapter, source: adapter_dir, lock })
}

/// The token rows of a run's adapter, if it trained any.
pub fn token_rows(a: &RunArtifacts) -> Option<&TokenRows> {
    a.adapter.token_rows.as_ref()
}

/// `tunestudio export adapter`: write the run's adapter, with its trained token rows as PEFT
/// trainable tokens, to `to` (refused if it exists), or rewrite `<run>/adapter` in place.
pub fn export_adapter(run_dir: &Path, to: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = to
        && d.exists()
    {
        return Err(Error::file(d, "already exists; choose a new folder (exports never overwrite)"));
    }
    let art = load_run(run_dir)?;
    let dest = to.map_or_else(|| run_dir.join(checkpoint::ADAPTER_DIR), Path::to_path_buf);
    let base = art.config.model.path.display().to_string();
    AdapterFiles { spec: &art.spec, weights: &art.adapter.weights, lora: &art.adapter.lora, base_model: &base, tokens: token_rows(&art) }
        .save(&dest)?;
    // Rewriting the run's own adapter/ in place is not an export out of it.
    if to.is_some() {
        crate::export::history::record_done(art.lock.writable_run_dir(), "adapter", &dest);
    }
    Ok(dest)
}
