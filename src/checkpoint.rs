//! Run folders and checkpoints. A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the
//! LoRA masters and trained token rows as a PEFT adapter, the AdamW moments and `state.json`
//! (step, micro-batch counter); it is built in a temporary folder and renamed into place, so a
//! crash leaves either the old or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterFiles, CONFIG_FILE as ADAPTER_CONFIG_FILE, WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE, read_weights};
use crate::config::Target;
use crate::engine::lora::{LoraPair, LoraWeights};
use crate::engine::{OptimizerState, TokenRows};
use crate::error::{Error, IoContext, Result};
use crate::model::weights::{OutTensor, read_small_f32_finite, serialize_safetensors};
use crate::util::{write_atomic, write_dir_atomic};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const STATUS_FILE: &str = "run.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const ADAPTER_DIR: &str = "adapter";
/// Checkpoints kept besides the newest.
const KEEP_OLD: usize = 1;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    /// Device memory in use after the step (driver-reported on a GPU, process RSS on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Mean loss over the evaluation rows, on the steps where the run evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// `run.json`: what the runs list shows without reading anything else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// `running`, `paused`, `stopped`, `done` or `failed`.
    pub state: String,
    pub step: u64,
    pub total_steps: u64,
    pub last_loss: Option<f64>,
    pub device: String,
    pub model: String,
    pub started: String,
    pub updated: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Dataset rows the run trains on (after skipped rows), for the runs list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// The lowest evaluation loss so far and its step, whose checkpoint is kept (`best` below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestEval>,
}

/// The best evaluation of a run: its checkpoint `checkpoints/step-NNNNNN/` is never pruned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    pub step: u64,
    pub eval_loss: f64,
}

/// Which checkpoints pruning keeps besides the newest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retention {
    /// The step of the best evaluation, kept whatever its age.
    pub best: Option<u64>,
    /// Keep only the best and the newest (`train.keep_only_best`).
    pub only_best: bool,
}

impl RunStatus {
    pub fn load(run_dir: &Path) -> Result<Self> {
        let p = run_dir.join(STATUS_FILE);
        let text = std::fs::read_to_string(&p).with_path(&p)?;
        serde_json::from_str(&text).map_err(|e| Error::line(&p, e.line(), format!("invalid run status: {e}")))
    }

    pub fn save(&self, run_dir: &Path) -> Result<()> {
        write_atomic(&run_dir.join(STATUS_FILE), serde_json::to_string_pretty(self).expect("json").as_bytes())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub micro_counter: u64,
    pub total_steps: u64,
    /// Targets in the order of the optimizer moments.
    pub slots: Vec<(usize, Target)>,
    /// Token ids of trained embedding rows (the untrained-token fix), if any.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub head_rows: bool,
}

/// What a checkpoint restores.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub weights: LoraWeights,
    pub optimizer: OptimizerState,
    pub token_rows: Option<TokenRows>,
}

pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR).join(format!("step-{step:06}"))
}

const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The LoRA weights of checkpoints written before checkpoints held a PEFT adapter (read only).
const OLD_WEIGHTS_FILE: &str = "lora.safetensors";

/// Write a checkpoint atomically and prune older ones. The folder is a PEFT adapter (LoRA and
/// trained token rows, written by the same function as every other adapter) plus the optimizer
/// state and `state.json`, so any checkpoint loads in PEFT as it is.
pub fn save(run_dir: &Path, adapter: AdapterFiles<'_>, opt: &OptimizerState, state: &CheckpointState, keep: Retention) -> Result<PathBuf> {
    let dir = step_dir(run_dir, state.step);
    let mut o = Vec::new();
    for (slot, (l, t)) in weights_slots(adapter.weights).into_iter().enumerate() {
        let name = format!("{l}.{}", t.short());
        let m = &opt.moments[slot];
        for (i, which) in ["m_a", "v_a", "m_b", "v_b"].iter().enumerate() {
            o.push(OutTensor::from_f32(format!("{name}.{which}"), vec![m[i].len()], &m[i], Dtype::F32));
        }
    }
    if adapter.tokens.is_some() {
        for (i, m) in opt.token_rows.iter().enumerate() {
            o.push(OutTensor::from_f32(format!("token_rows.moment{i}"), vec![m.len()], m, Dtype::F32));
        }
    }
    let ob = serialize_safetensors(&o, None)?;
    let rows = adapter.tokens;
    let full_state = CheckpointState {
        slots: weights_slots(adapter.weights),
        token_ids: rows.map(|r| r.ids.clone()).unwrap_or_default(),
        head_rows: rows.is_some_and(|r| r.head.is_some()),
        ..state.clone()
    };
    let sb = serde_json::to_string_pretty(&full_state).expect("json");
    write_dir_atomic(&dir, |tmp| {
        adapter.write_into(tmp)?;
        write_atomic(&tmp.join(OPTIMIZER_FILE), &ob)?;
        write_atomic(&tmp.join(STATE_FILE), sb.as_bytes())
    })?;
    prune(run_dir, state.step, keep);
    Ok(dir)
}

fn weights_slots(w: &LoraWeights) -> Vec<(usize, Target)> {
    w.layers.iter().enumerate().flat_map(|(l, m)| m.keys().map(move |&t| (l, t))).collect()
}

/// Whether a checkpoint folder holds every file a resume reads (a folder whose removal was
/// interrupted may keep some of them).
fn is_complete(dir: &Path) -> bool {
    let weights = dir.join(ADAPTER_WEIGHTS_FILE).is_file() && dir.join(ADAPTER_CONFIG_FILE).is_file()
        || dir.join(OLD_WEIGHTS_FILE).is_file() && dir.join("rank").is_file();
    weights && dir.join(OPTIMIZER_FILE).is_file() && dir.join(STATE_FILE).is_file()
}

/// Steps of the complete checkpoints in a run folder, ascending.
pub fn list(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| is_complete(&e.path()))
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// The folder of the newest complete checkpoint.
pub fn latest_dir(run_dir: &Path) -> Option<PathBuf> {
    list(run_dir).last().map(|&s| step_dir(run_dir, s))
}

/// Remove a folder by first renaming it out of sight, so a removal cut short (a crash, kill -9)
/// leaves a hidden leftover that `clean_stale` deletes, never a half-empty `step-N/`.
fn remove_out_of_sight(dir: &Path) {
    let hidden = dir.with_file_name(format!(".{}.removing-{}", dir.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    if std::fs::rename(dir, &hidden).is_ok() {
        let _ = std::fs::remove_dir_all(&hidden);
    }
}

fn prune(run_dir: &Path, newest: u64, keep: Retention) {
    let steps = list(run_dir);
    let old = if keep.only_best && keep.best.is_some() { 0 } else { KEEP_OLD };
    let keep_from = steps.len().saturating_sub(old + 1);
    for &s in &steps[..keep_from] {
        if s != newest && Some(s) != keep.best {
            remove_out_of_sight(&step_dir(run_dir, s));
        }
    }
}

/// Load the newest complete checkpoint.
pub fn load_latest(run_dir: &Path) -> Result<Checkpoint> {
    let dir = latest_dir(run_dir).ok_or_else(|| Error::file(run_dir, "has no checkpoint to resume from (checkpoints/step-*/)"))?;
    load(&dir)
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let sp = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).with_path(&sp)?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| Error::line(&sp, e.line(), format!("invalid checkpoint state: {e}")))?;
    let (weights, token_rows) = if dir.join(OLD_WEIGHTS_FILE).is_file() && !dir.join(ADAPTER_WEIGHTS_FILE).is_file() {
        load_old_weights(dir, &state)?
    } else {
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_path(&cfg_path)?)
            .map_err(|e| Error::line(&cfg_path, e.line(), format!("invalid JSON: {e}")))?;
        let rank = cfg.get("r").and_then(serde_json::Value::as_u64).ok_or_else(|| Error::file(&cfg_path, "`r` is missing"))? as usize;
        read_weights(&dir.join(ADAPTER_WEIGHTS_FILE), rank, &state.slots, &state.token_ids, state.head_rows)?
    };
    let o = read_small_f32_finite(&dir.join(OPTIMIZER_FILE))?;
    let take = |key: String| -> Result<Vec<f32>> {
        o.get(&key)
            .map(|t| t.1.clone())
            .ok_or_else(|| Error::tensor(key, Some(&dir.join(OPTIMIZER_FILE)), "is missing from the checkpoint"))
    };
    let mut moments = Vec::new();
    for &(l, t) in &state.slots {
        let name = format!("{l}.{}", t.short());
        let mut m: [Vec<f32>; 4] = Default::default();
        for (i, which) in ["m_a", "v_a", "m_b", "v_b"].iter().enumerate() {
            m[i] = take(format!("{name}.{which}"))?;
        }
        moments.push(m);
    }
    let mut row_moments = Vec::new();
    if token_rows.is_some() {
        for i in 0..if state.head_rows { 4 } else { 2 } {
            row_moments.push(take(format!("token_rows.moment{i}"))?);
        }
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        optimizer: OptimizerState { step: state.step, moments, token_rows: row_moments },
        weights,
        token_rows,
        state,
    })
}

/// The weights of a checkpoint in the layout before checkpoints held a PEFT adapter.
fn load_old_weights(dir: &Path, state: &CheckpointState) -> Result<(LoraWeights, Option<TokenRows>)> {
    let rank_path = dir.join("rank");
    let rank: usize = std::fs::read_to_string(&rank_path)
        .with_path(&rank_path)?
        .trim()
        .parse()
        .map_err(|_| Error::file(&rank_path, "is not a number"))?;
    let path = dir.join(OLD_WEIGHTS_FILE);
    let w = read_small_f32_finite(&path)?;
    let take = |key: String| -> Result<Vec<f32>> {
        w.get(&key).map(|t| t.1.clone()).ok_or_else(|| Error::tensor(key, Some(&path), "is missing from the checkpoint"))
    };
    let layers_n = state.slots.iter().map(|s| s.0 + 1).max().unwrap_or(0);
    let mut layers = vec![BTreeMap::new(); layers_n];
    for &(l, t) in &state.slots {
        let name = format!("{l}.{}", t.short());
        layers[l].insert(t, LoraPair { a: take(format!("{name}.a"))?, b: take(format!("{name}.b"))? });
    }
    let rows = if state.token_ids.is_empty() {
        None
    } else {
        let head = if state.head_rows { Some(take("token_rows.head".into())?) } else { None };
        Some(TokenRows { ids: state.token_ids.clone(), embed: take("token_rows.embed".into())?, head })
    };
    Ok((LoraWeights { rank, layers }, rows))
}

/// Read `metrics.jsonl` (skipping a torn last line).
pub fn read_metrics(run_dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Keep only metrics up to `step` (a resumed run rewrites what came after its checkpoint). The
/// kept lines are copied as written, not parsed and written again: serde_json's parser may read a
/// float's 17th digit one unit off, and the history of a resumed run must stay the history of the
/// run (a torn last line is dropped).
pub fn truncate_metrics(run_dir: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap_or_default();
    let kept: String =
        text.lines().filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step)).map(|l| format!("{l}\n")).collect();
    write_atomic(&run_dir.join(METRICS_FILE), kept.as_bytes())
}

pub fn append_metrics(run_dir: &Path, m: &StepMetrics) -> Result<()> {
    use std::io::Write;
    let p = run_dir.join(METRICS_FILE);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_path(&p)?;
    writeln!(f, "{}", serde_json::to_string(m).expect("json")).with_path(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder `list` counts as a complete checkpoint (the files exist; their content is not read).
    fn fake(run_dir: &Path, step: u64) {
        let d = step_dir(run_dir, step);
        std::fs::create_dir_all(&d).unwrap();
        for f in [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE] {
            std::fs::write(d.join(f), b"").unwrap();
        }
    }

    #[test]
    fn pruning_keeps_the_best_checkpoint_whatever_its_age() {
        let t = tempfile::tempdir().unwrap();
        for s in [10, 20, 30, 40] {
            fake(t.path(), s);
        }
        // No evaluation: the newest two.
        prune(t.path(), 40, Retention::default());
        assert_eq!(list(t.path()), vec![30, 40]);
        // The best is older than both: it stays beside them.
        fake(t.path(), 10);
        fake(t.path(), 50);
        prune(t.path(), 50, Retention { best: Some(10), only_best: false });
        assert_eq!(list(t.path()), vec![10, 40, 50]);
        // Only the best (and the newest, to resume from).
        fake(t.path(), 60);
        prune(t.path(), 60, Retention { best: Some(10), only_best: true });
        assert_eq!(list(t.path()), vec![10, 60]);
        // only_best with no evaluation yet falls back to the newest two.
        fake(t.path(), 70);
        prune(t.path(), 70, Retention { best: None, only_best: true });
        assert_eq!(list(t.path()), vec![60, 70]);
    }
}
