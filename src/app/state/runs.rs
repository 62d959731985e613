//! The Runs panel's state: every run folder under each output folder the person has trained into
//! (`scan`, on a worker), what each row shows (`row_view`), renaming a run (`rename`), several
//! runs side by side (`compare`), and a past run opened for its curves (`open`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::session::checkpoint::{self, RunStatus, StepMetrics};
use crate::session::lock::RunLock;
use crate::util::fmt_bytes;

use crate::app::jobs::Load;

#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub dir: PathBuf,
    pub name: String,
    /// `run.json`, or why it could not be read.
    pub status: Result<RunStatus, String>,
    pub summary: RunSummary,
    pub checkpoints: Vec<u64>,
    pub has_adapter: bool,
    /// What has been exported from it (`exports.jsonl`), oldest first, each with whether its
    /// file or folder is still there (read here, on the worker, not while drawing).
    pub exports: Vec<(crate::export::history::ExportRecord, bool)>,
}

/// What sets runs apart, from the run's `config.toml` and `metrics.jsonl` (`None`: not known).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// The dataset's file name.
    pub dataset: Option<String>,
    pub rows: Option<usize>,
    pub lr: Option<f64>,
    pub lora_r: Option<usize>,
    pub lora_alpha: Option<f64>,
    /// The smoothed training loss at the last step (the raw last value is one noisy batch).
    pub smoothed_loss: Option<f64>,
    /// The lowest evaluation loss and its step.
    pub best_eval: Option<(u64, f64)>,
    /// The median of the steps' throughput (the first step's warm-up does not drag it down).
    pub tokens_per_s: Option<f64>,
    pub peak_memory: Option<u64>,
}

impl RunSummary {
    pub fn of(config: Option<&crate::RunConfig>, status: Option<&RunStatus>, metrics: &[StepMetrics]) -> Self {
        let losses: Vec<f64> = metrics.iter().map(|m| m.loss).collect();
        let mut speeds: Vec<f64> = metrics.iter().map(|m| m.tokens_per_s).filter(|v| v.is_finite()).collect();
        speeds.sort_by(f64::total_cmp);
        RunSummary {
            dataset: config.and_then(|c| c.dataset.path.file_name()).map(|n| n.to_string_lossy().to_string()),
            rows: status.and_then(|s| s.rows),
            lr: config.map(|c| c.optim.lr),
            lora_r: config.map(|c| c.lora.r),
            lora_alpha: config.map(|c| c.lora.alpha),
            smoothed_loss: super::curves::ema(&losses, super::curves::SMOOTHING).last().copied(),
            best_eval: metrics
                .iter()
                .filter_map(|m| Some((m.step, m.eval_loss.filter(|l| l.is_finite())?)))
                .min_by(|a, b| a.1.total_cmp(&b.1)),
            tokens_per_s: speeds.get(speeds.len() / 2).copied(),
            peak_memory: metrics.iter().filter_map(|m| m.memory_bytes).max(),
        }
    }
}

/// The output folders the person has trained into, newest first, kept in `run_folders.json` in
/// the settings folder, so the runs list shows every run and not only the current config's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFolders {
    pub dirs: Vec<PathBuf>,
}

const FOLDERS_FILE: &str = "run_folders.json";
const FOLDERS_KEEP: usize = 32;

impl RunFolders {
    pub fn load(settings_dir: &Path) -> Self {
        std::fs::read_to_string(settings_dir.join(FOLDERS_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    pub fn save(&self, settings_dir: &Path) -> crate::Result<()> {
        std::fs::create_dir_all(settings_dir).map_err(|e| crate::Error::file(settings_dir, e))?;
        crate::util::write_atomic(&settings_dir.join(FOLDERS_FILE), serde_json::to_string_pretty(self).expect("json").as_bytes())
    }

    /// Put `dir` (made absolute) first, without duplicates. Returns whether the list changed.
    pub fn push(&mut self, dir: &Path) -> bool {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        if self.dirs.first() == Some(&dir) {
            return false;
        }
        self.dirs.retain(|d| d != &dir);
        self.dirs.insert(0, dir);
        self.dirs.truncate(FOLDERS_KEEP);
        true
    }

    /// The folders to scan: `current` (the config's output folder) and every remembered one.
    pub fn with(&self, current: &Path) -> Vec<PathBuf> {
        let mut out = self.clone();
        out.dirs.truncate(FOLDERS_KEEP);
        out.dirs.push(std::path::absolute(current).unwrap_or_else(|_| current.to_path_buf()));
        let mut seen = std::collections::HashSet::new();
        out.dirs.into_iter().filter(|d| seen.insert(d.clone())).collect()
    }
}

/// A past run opened for its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewedRun {
    pub dir: PathBuf,
    pub name: String,
    pub status: String,
    pub total_steps: u64,
    pub metrics: Vec<StepMetrics>,
    /// The run's own log, rebuilt from its folder (the live log belongs to the live run).
    pub log: Vec<String>,
    /// Its samples during training (`samples.jsonl`), shown as the live run's are.
    pub samples: super::curves::SamplesView,
}

fn folder_name(d: &Path) -> String {
    d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
}

fn record(d: PathBuf) -> RunRecord {
    let metrics = checkpoint::read_metrics(&d);
    let status = RunStatus::load(&d).map_err(|e| e.to_string());
    let config = crate::RunConfig::load(&d.join(checkpoint::CONFIG_FILE)).ok();
    RunRecord {
        name: folder_name(&d),
        summary: RunSummary::of(config.as_ref(), status.as_ref().ok(), &metrics),
        status,
        checkpoints: checkpoint::list(&d),
        has_adapter: d.join(checkpoint::ADAPTER_DIR).join(crate::adapter::CONFIG_FILE).is_file(),
        exports: crate::export::history::read(&d)
            .into_iter()
            .map(|x| {
                let present = x.path.exists();
                (x, present)
            })
            .collect(),
        dir: d,
    }
}

/// Run folders (those with a `run.json`) under each of `dirs`, newest first. The same folder
/// reached twice (a link, a relative and an absolute path) is listed once.
pub fn scan(dirs: &[PathBuf]) -> Vec<RunRecord> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<RunRecord> = dirs
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()))
        .filter(|p| p.join(checkpoint::STATUS_FILE).is_file())
        .filter(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())))
        .map(record)
        .collect();
    out.sort_by(|a, b| {
        let when = |r: &RunRecord| r.status.as_ref().map(|s| s.updated.clone()).unwrap_or_default();
        when(b).cmp(&when(a)).then_with(|| b.name.cmp(&a.name))
    });
    out
}

/// Rename a run's folder to `new_name` beside it. Refused while any process holds the run (a
/// training, resuming or exporting one, this window's live run included), and never over an
/// existing folder. Returns the new folder.
pub fn rename(dir: &Path, new_name: &str) -> crate::Result<PathBuf> {
    let name = new_name.trim();
    let bad = name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) || name.chars().any(char::is_control);
    if bad {
        return Err(crate::Error::file(
            dir,
            format!("cannot be renamed to {name:?}: a run's name is a folder name, without / or \\ and not starting with a dot"),
        ));
    }
    let parent = dir.parent().ok_or_else(|| crate::Error::file(dir, "has no parent folder to rename it in"))?;
    let target = parent.join(name);
    if target == dir {
        return Ok(target);
    }
    if target.exists() {
        return Err(crate::Error::file(&target, "already exists: pick another name"));
    }
    let lock = RunLock::acquire(dir, "rename")?;
    std::fs::rename(dir, &target).map_err(|e| crate::Error::file(dir, format!("cannot be renamed: {e}")))?;
    drop(lock);
    Ok(target)
}

pub fn open(dir: &Path) -> crate::Result<ViewedRun> {
    let status = RunStatus::load(dir)?;
    let metrics = checkpoint::read_metrics(dir);
    Ok(ViewedRun {
        dir: dir.to_path_buf(),
        name: folder_name(dir),
        log: past_log(&status, &metrics, &checkpoint::list(dir)),
        status: status.state,
        total_steps: status.total_steps,
        metrics,
        samples: super::curves::SamplesView::new(crate::session::samples::read(dir)),
    })
}

/// A finished run's log as the monitor would have shown it, from what its folder keeps: when
/// and where it ran, each step's line, its checkpoints and how it ended.
pub fn past_log(status: &RunStatus, metrics: &[StepMetrics], checkpoints: &[u64]) -> Vec<String> {
    let mut log = vec![format!("{} on {}, started {}", status.model, status.device, status.started.replace('T', " "))];
    for m in metrics {
        log.push(super::curves::step_line(m));
        if checkpoints.contains(&m.step) {
            log.push(format!("checkpoint at step {}", m.step));
        }
    }
    log.push(format!("{} at step {} of {} ({})", status.state, status.step, status.total_steps, status.updated.replace('T', " ")));
    if let Some(e) = &status.error {
        log.push(format!("failed: {e}"));
    }
    log
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowView {
    pub name: String,
    pub dataset: String,
    pub rows: String,
    pub lr: String,
    pub lora_r: String,
    pub lora_alpha: String,
    pub steps: String,
    pub loss: String,
    pub best_eval: String,
    pub tokens_per_s: String,
    pub peak_memory: String,
    pub state: String,
    pub updated: String,
    pub can_resume: bool,
    pub can_export: bool,
}

/// The runs list's columns, in the order `RowView::cells` gives them.
pub const COLUMNS: [(&str, &str); 12] = [
    ("Run", "the run's folder; ✏ renames it"),
    ("Dataset", "the dataset file it trained on"),
    ("Rows", "dataset rows used (skipped rows not counted)"),
    ("lr", "peak learning rate (optim.lr)"),
    ("r", "LoRA rank (lora.r)"),
    ("α", "LoRA alpha (lora.alpha)"),
    ("Steps", "steps done / planned"),
    ("Loss", "training loss at the last step, smoothed as on the Training page"),
    ("Best eval", "lowest evaluation loss, at its step"),
    ("Tokens/s", "median throughput over the steps"),
    ("Peak memory", "the most memory measured in a step (the card's on a GPU, the process's on the CPU)"),
    ("State", "done, stopped, failed, or interrupted (its process ended without saying)"),
];

impl RowView {
    /// The text cells after the name, in `COLUMNS` order.
    pub fn cells(&self) -> [&str; 10] {
        [
            &self.dataset,
            &self.rows,
            &self.lr,
            &self.lora_r,
            &self.lora_alpha,
            &self.steps,
            &self.loss,
            &self.best_eval,
            &self.tokens_per_s,
            &self.peak_memory,
        ]
    }
}

fn or_dash<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".into())
}

/// What one row shows and offers. A folder that says `running` or `paused` but is not this
/// window's live run was left by a process that ended: it reads as interrupted and can resume.
pub fn row_view(r: &RunRecord, live_dir: Option<&Path>, live_active: bool) -> RowView {
    let is_live = live_dir.is_some_and(|d| d == r.dir);
    let (state, steps, updated) = match &r.status {
        Ok(s) => {
            let state = match s.state.as_str() {
                "running" | "paused" if !(is_live && live_active) => "interrupted".to_string(),
                other => other.to_string(),
            };
            (state, format!("{} / {}", s.step, s.total_steps), s.updated.replace('T', " ").trim_end_matches('Z').to_string())
        }
        Err(e) => (format!("unreadable: {e}"), "?".into(), String::new()),
    };
    let resumable = matches!(state.as_str(), "stopped" | "failed" | "interrupted");
    let s = &r.summary;
    RowView {
        name: r.name.clone(),
        dataset: or_dash(s.dataset.clone(), |d| d),
        rows: or_dash(s.rows, |n| n.to_string()),
        lr: or_dash(s.lr, |v| format!("{v:.1e}")),
        lora_r: or_dash(s.lora_r, |v| v.to_string()),
        lora_alpha: or_dash(s.lora_alpha, |v| format!("{v}")),
        loss: or_dash(s.smoothed_loss, |l| format!("{l:.4}")),
        best_eval: or_dash(s.best_eval, |(step, l)| format!("{l:.4} @{step}")),
        tokens_per_s: or_dash(s.tokens_per_s, |v| format!("{v:.0}")),
        peak_memory: or_dash(s.peak_memory, fmt_bytes),
        can_resume: resumable && !r.checkpoints.is_empty() && !live_active,
        can_export: r.has_adapter || !r.checkpoints.is_empty(),
        state,
        steps,
        updated,
    }
}

/// One run of a comparison: its curves, `[step, value]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ComparedRun {
    pub name: String,
    pub loss_smooth: Vec<[f64; 2]>,
    pub eval_loss: Vec<[f64; 2]>,
}

/// Several runs side by side: their curves to overlay and the config keys whose values differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub runs: Vec<ComparedRun>,
    /// `section.key` and its value in each run ("–": not set), only where the runs differ.
    pub diff: Vec<(String, Vec<String>)>,
}

/// A TOML table as `section.key` → value, nested tables joined with dots.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            toml::Value::String(s) => {
                out.insert(key, s.clone());
            }
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

/// Read the runs in `dirs` (at least one) for a comparison. A run whose config cannot be read
/// still shows its curves; its column of the diff says why.
pub fn compare(dirs: &[PathBuf], smoothing: f64) -> crate::Result<Comparison> {
    let mut runs = Vec::new();
    let mut configs = Vec::new();
    for d in dirs {
        let metrics = checkpoint::read_metrics(d);
        let c = super::curves::curves(&metrics, smoothing);
        runs.push(ComparedRun {
            name: folder_name(d),
            loss_smooth: c.loss_smooth,
            eval_loss: metrics.iter().filter_map(|m| Some([m.step as f64, m.eval_loss?])).collect(),
        });
        let p = d.join(checkpoint::CONFIG_FILE);
        let flat = std::fs::read_to_string(&p)
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
            .map(|t| {
                let mut m = BTreeMap::new();
                flatten("", &t, &mut m);
                m
            });
        configs.push(flat);
    }
    // Runs of the same name in different output folders need telling apart in the legend
    // (which merges series of one name).
    for (i, d) in dirs.iter().enumerate() {
        if runs.iter().filter(|r| r.name == folder_name(d)).count() > 1 {
            let parent = d.parent().map(folder_name).unwrap_or_default();
            runs[i].name = format!("{parent}/{}", folder_name(d));
        }
    }
    let mut keys: Vec<&String> = configs.iter().flatten().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut diff = Vec::new();
    for k in keys {
        let values: Vec<String> = configs
            .iter()
            .map(|c| match c {
                Ok(m) => m.get(k).cloned().unwrap_or_else(|| "–".into()),
                Err(e) => format!("(unreadable: {e})"),
            })
            .collect();
        if values.iter().any(|v| v != &values[0]) {
            diff.push((k.clone(), values));
        }
    }
    Ok(Comparison { runs, diff })
}

#[derive(Debug, Default)]
pub struct RunsState {
    pub records: Load<Vec<RunRecord>>,
    /// The folders the records came from.
    pub dirs: Vec<PathBuf>,
    /// Output folders trained into, remembered across sessions.
    pub folders: RunFolders,
    /// Runs ticked for comparison, in the order they were ticked.
    pub selected: Vec<PathBuf>,
    pub comparison: Option<Load<Comparison>>,
    /// The run being renamed and the name typed so far.
    pub renaming: Option<(PathBuf, String)>,
}

impl RunsState {
    pub fn toggle(&mut self, dir: &Path) {
        if let Some(i) = self.selected.iter().position(|d| d == dir) {
            self.selected.remove(i);
        } else {
            self.selected.push(dir.to_path_buf());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: &str, checkpoints: Vec<u64>) -> RunRecord {
        RunRecord {
            dir: "/runs/a".into(),
            name: "a".into(),
            status: Ok(RunStatus {
                state: state.into(),
                step: 3,
                total_steps: 10,
                last_loss: Some(1.5),
                device: "cpu".into(),
                model: "m".into(),
                started: "2026-01-01T00:00:00Z".into(),
                updated: "2026-01-01T00:01:00Z".into(),
                error: None,
                rows: Some(95),
                best: None,
            }),
            summary: RunSummary { smoothed_loss: Some(1.5), ..Default::default() },
            checkpoints,
            has_adapter: false,
            exports: Vec::new(),
        }
    }

    #[test]
    fn stale_running_state_reads_as_interrupted_and_resumes() {
        let v = row_view(&rec("running", vec![3]), None, false);
        assert_eq!(v.state, "interrupted");
        assert!(v.can_resume && v.can_export);
        assert_eq!(v.updated, "2026-01-01 00:01:00");
        let live = row_view(&rec("running", vec![3]), Some(Path::new("/runs/a")), true);
        assert_eq!(live.state, "running");
        assert!(!live.can_resume, "never resume the run that is training now");
    }

    #[test]
    fn done_runs_do_not_resume_and_need_a_checkpoint_to_resume() {
        assert!(!row_view(&rec("done", vec![10]), None, false).can_resume);
        assert!(!row_view(&rec("stopped", vec![]), None, false).can_resume);
        assert!(row_view(&rec("stopped", vec![3]), None, false).can_resume);
        assert_eq!(row_view(&rec("stopped", vec![3]), None, false).loss, "1.5000");
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    fn m(step: u64, loss: f64, eval: Option<f64>, speed: f64, mem: u64) -> StepMetrics {
        StepMetrics {
            step,
            total_steps: 5,
            epoch: 0.0,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 10,
            trained_tokens: 5,
            tokens_per_s: speed,
            elapsed_s: 0.0,
            eta_s: 0.0,
            memory_bytes: Some(mem),
            eval_loss: eval,
        }
    }

    #[test]
    fn summary_smooths_the_loss_and_finds_the_best_eval_the_median_speed_and_the_peak() {
        let ms = [m(1, 4.0, None, 10.0, 5), m(2, 3.0, Some(2.5), 900.0, 9), m(3, 2.0, None, 1000.0, 7), m(4, 0.1, Some(2.7), 1100.0, 6)];
        let s = RunSummary::of(None, None, &ms);
        let raw_last = 0.1;
        let smoothed = s.smoothed_loss.unwrap();
        assert!(smoothed > 1.0 && smoothed < 4.0 && smoothed != raw_last, "{smoothed}");
        assert_eq!(s.best_eval, Some((2, 2.5)));
        assert_eq!(s.tokens_per_s, Some(1000.0), "the median, not the warm-up step");
        assert_eq!(s.peak_memory, Some(9));
        assert_eq!(RunSummary::of(None, None, &[]), RunSummary::default());
    }

    #[test]
    fn compare_lists_only_the_keys_that_differ() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for (dir, lr) in [(&a, "1e-3"), (&b, "2e-3")] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(checkpoint::CONFIG_FILE), format!("[optim]\nlr = {lr}\n[lora]\nr = 8\n")).unwrap();
        }
        std::fs::write(b.join(checkpoint::CONFIG_FILE), "[optim]\nlr = 2e-3\n[lora]\nr = 8\n[dataset]\neval_split = 0.1\n").unwrap();
        let c = compare(&[a, b], 0.5).unwrap();
        assert_eq!(
            c.diff,
            vec![
                ("dataset.eval_split".to_string(), vec!["–".to_string(), "0.1".to_string()]),
                ("optim.lr".to_string(), vec!["0.001".to_string(), "0.002".to_string()]),
            ]
        );
    }

    #[test]
    fn rename_refuses_a_held_run_a_taken_name_and_a_path() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(d.path().join("taken")).unwrap();
        assert!(rename(&run, "../out").unwrap_err().to_string().contains("without /"));
        assert!(rename(&run, "taken").unwrap_err().to_string().contains("already exists"));
        let held = RunLock::acquire(&run, "train").unwrap();
        assert!(rename(&run, "new").unwrap_err().to_string().contains("in use"));
        drop(held);
        assert_eq!(rename(&run, " new ").unwrap(), d.path().join("new"));
        assert!(d.path().join("new").is_dir() && !run.exists());
    }

    #[test]
    fn remembered_folders_come_first_without_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let mut f = RunFolders::default();
        assert!(f.push(Path::new("/a")) && f.push(Path::new("/b")));
        assert!(!f.push(Path::new("/b")), "already first");
        assert!(f.push(Path::new("/a")));
        assert_eq!(f.dirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(f.with(Path::new("/b")), vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(f.with(Path::new("/c")).len(), 3);
        f.save(d.path()).unwrap();
        assert_eq!(RunFolders::load(d.path()), f);
    }
}
