//! Run folders and checkpoints. A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the
//! LoRA masters, the AdamW moments and `state.json` (step, micro-batch counter); it is built in a
//! temporary folder and renamed into place, so a crash leaves either the old or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::config::Target;
use crate::engine::lora::{LoraPair, LoraWeights};
use crate::engine::{OptimizerState, TokenRows};
use crate::error::{Error, IoContext, Result};
use crate::model::weights::{OutTensor, read_small_f32, serialize_safetensors};
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

/// Write a checkpoint atomically and prune older ones.
pub fn save(
    run_dir: &Path,
    weights: &LoraWeights,
    opt: &OptimizerState,
    rows: Option<&TokenRows>,
    state: &CheckpointState,
) -> Result<PathBuf> {
    let dir = step_dir(run_dir, state.step);
    let mut w = Vec::new();
    let mut o = Vec::new();
    let mut slot = 0;
    for (l, layer) in weights.layers.iter().enumerate() {
        for (&t, p) in layer {
            let name = format!("{l}.{}", t.short());
            w.push(OutTensor::from_f32(format!("{name}.a"), vec![p.a.len()], &p.a, Dtype::F32));
            w.push(OutTensor::from_f32(format!("{name}.b"), vec![p.b.len()], &p.b, Dtype::F32));
            let m = &opt.moments[slot];
            for (i, which) in ["m_a", "v_a", "m_b", "v_b"].iter().enumerate() {
                o.push(OutTensor::from_f32(format!("{name}.{which}"), vec![m[i].len()], &m[i], Dtype::F32));
            }
            slot += 1;
        }
    }
    if let Some(r) = rows {
        w.push(OutTensor::from_f32("token_rows.embed", vec![r.embed.len()], &r.embed, Dtype::F32));
        if let Some(h) = &r.head {
            w.push(OutTensor::from_f32("token_rows.head", vec![h.len()], h, Dtype::F32));
        }
        for (i, m) in opt.token_rows.iter().enumerate() {
            o.push(OutTensor::from_f32(format!("token_rows.moment{i}"), vec![m.len()], m, Dtype::F32));
        }
    }
    let wb = serialize_safetensors(&w, None)?;
    let ob = serialize_safetensors(&o, None)?;
    let full_state = CheckpointState {
        slots: weights_slots(weights),
        token_ids: rows.map(|r| r.ids.clone()).unwrap_or_default(),
        head_rows: rows.is_some_and(|r| r.head.is_some()),
        ..state.clone()
    };
    let sb = serde_json::to_string_pretty(&full_state).expect("json");
    let rank = weights.rank.to_string();
    write_dir_atomic(&dir, |tmp| {
        write_atomic(&tmp.join("lora.safetensors"), &wb)?;
        write_atomic(&tmp.join("optimizer.safetensors"), &ob)?;
        write_atomic(&tmp.join("rank"), rank.as_bytes())?;
        write_atomic(&tmp.join("state.json"), sb.as_bytes())
    })?;
    prune(run_dir, state.step);
    Ok(dir)
}

fn weights_slots(w: &LoraWeights) -> Vec<(usize, Target)> {
    w.layers.iter().enumerate().flat_map(|(l, m)| m.keys().map(move |&t| (l, t))).collect()
}

/// Steps of the complete checkpoints in a run folder, ascending.
pub fn list(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("state.json").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

fn prune(run_dir: &Path, newest: u64) {
    let steps = list(run_dir);
    let keep_from = steps.len().saturating_sub(KEEP_OLD + 1);
    for &s in &steps[..keep_from] {
        if s != newest {
            let _ = std::fs::remove_dir_all(step_dir(run_dir, s));
        }
    }
}

/// Load the newest complete checkpoint.
pub fn load_latest(run_dir: &Path) -> Result<Checkpoint> {
    let step =
        *list(run_dir).last().ok_or_else(|| Error::file(run_dir, "has no checkpoint to resume from (checkpoints/step-*/state.json)"))?;
    load(&step_dir(run_dir, step))
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).with_path(&sp)?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| Error::line(&sp, e.line(), format!("invalid checkpoint state: {e}")))?;
    let rank_path = dir.join("rank");
    let rank: usize = std::fs::read_to_string(&rank_path)
        .with_path(&rank_path)?
        .trim()
        .parse()
        .map_err(|_| Error::file(&rank_path, "is not a number"))?;
    let w = read_small_f32(&dir.join("lora.safetensors"))?;
    let o = read_small_f32(&dir.join("optimizer.safetensors"))?;
    let layers_n = state.slots.iter().map(|s| s.0 + 1).max().unwrap_or(0);
    let mut layers = vec![BTreeMap::new(); layers_n];
    let mut moments = Vec::new();
    let take = |m: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, file: &str, key: String| -> Result<Vec<f32>> {
        m.get(&key).map(|t| t.1.clone()).ok_or_else(|| Error::tensor(key, Some(&dir.join(file)), "is missing from the checkpoint"))
    };
    for &(l, t) in &state.slots {
        let name = format!("{l}.{}", t.short());
        let a = take(&w, "lora.safetensors", format!("{name}.a"))?;
        let b = take(&w, "lora.safetensors", format!("{name}.b"))?;
        layers[l].insert(t, LoraPair { a, b });
        let mut m: [Vec<f32>; 4] = Default::default();
        for (i, which) in ["m_a", "v_a", "m_b", "v_b"].iter().enumerate() {
            m[i] = take(&o, "optimizer.safetensors", format!("{name}.{which}"))?;
        }
        moments.push(m);
    }
    let mut token_rows = None;
    let mut row_moments = Vec::new();
    if !state.token_ids.is_empty() {
        let embed = take(&w, "lora.safetensors", "token_rows.embed".into())?;
        let head = if state.head_rows { Some(take(&w, "lora.safetensors", "token_rows.head".into())?) } else { None };
        for i in 0..if state.head_rows { 4 } else { 2 } {
            row_moments.push(take(&o, "optimizer.safetensors", format!("token_rows.moment{i}"))?);
        }
        token_rows = Some(TokenRows { ids: state.token_ids.clone(), embed, head });
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        optimizer: OptimizerState { step: state.step, moments, token_rows: row_moments },
        weights: LoraWeights { rank, layers },
        token_rows,
        state,
    })
}

/// Read `metrics.jsonl` (skipping a torn last line).
pub fn read_metrics(run_dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(run_dir.join(METRICS_FILE)).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Keep only metrics up to `step` (a resumed run rewrites what came after its checkpoint).
pub fn truncate_metrics(run_dir: &Path, step: u64) -> Result<()> {
    let kept: String =
        read_metrics(run_dir).into_iter().filter(|m| m.step <= step).map(|m| serde_json::to_string(&m).expect("json") + "\n").collect();
    write_atomic(&run_dir.join(METRICS_FILE), kept.as_bytes())
}

pub fn append_metrics(run_dir: &Path, m: &StepMetrics) -> Result<()> {
    use std::io::Write;
    let p = run_dir.join(METRICS_FILE);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_path(&p)?;
    writeln!(f, "{}", serde_json::to_string(m).expect("json")).with_path(&p)
}
