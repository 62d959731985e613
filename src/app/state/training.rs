//! The training monitor's state: the live session's events folded into plain data
//! (`TrainingState::apply`, testable without a session), and the view model the monitor's plots
//! draw (`curves`, `progress`, `memory_axis`, `memory_lines`).

use std::collections::VecDeque;
use std::path::PathBuf;

use eframe::egui::Color32;

use crate::backend::nvml::GpuSample;
use crate::session::checkpoint::StepMetrics;
use crate::session::telemetry::ThrottleWatch;
use crate::session::{Event, Finished, LoadedInfo};
use crate::util::{fmt_bytes, fmt_duration};

use super::memory::BudgetView;
use super::runs::ViewedRun;
// The loss curves and log lines live below this module, so the Runs page (which this one shows a
// past run of) draws a run's curves without importing the live run's state.
pub use super::curves::{Curves, MAX_POINTS, SMOOTHING, SampleRow, SamplesView, curves, ema, step_line};

/// Log lines kept; older ones scroll away (the run folder keeps every metric).
const LOG_KEEP: usize = 4000;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No run yet in this window.
    Idle,
    /// Started: the session is reading the model and data.
    Loading,
    Running,
    Paused,
    /// Stop was pressed; waiting for the adapter to be written.
    Stopping,
    Done,
    /// Stopped by the person (resumable).
    Stopped,
    Failed,
}

impl Phase {
    /// A session thread is alive: Start is not possible, Stop is.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Loading | Phase::Running | Phase::Paused | Phase::Stopping)
    }

    pub fn label(self) -> &'static str {
        match self {
            Phase::Idle => "ready",
            Phase::Loading => "loading",
            Phase::Running => "training",
            Phase::Paused => "paused",
            Phase::Stopping => "stopping",
            Phase::Done => "done",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    pub run_dir: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
}

#[derive(Debug)]
pub struct TrainingState {
    pub phase: Phase,
    /// Which session the events belong to; events of an older one are dropped.
    pub generation: u64,
    pub loaded: Option<Box<LoadedInfo>>,
    pub metrics: Vec<StepMetrics>,
    pub log: VecDeque<String>,
    pub failure: Option<Failure>,
    pub finished: Option<Finished>,
    pub last_checkpoint: Option<(u64, PathBuf)>,
    /// A Pause was sent and not yet acknowledged (the session answers between steps).
    pub pause_requested: bool,
    /// 0 = raw; 0.99 = very smooth. Exponential moving average weight.
    pub smoothing: f64,
    /// A past run opened from the Runs panel, shown instead of the live one.
    pub viewing: Option<ViewedRun>,
    /// The model shape and config of the live run (not known for a resumed one), and its memory
    /// plan on the device the session chose, to draw the measured memory against.
    pub plan_input: Option<Box<(crate::model::ModelSpec, crate::RunConfig)>>,
    pub plan: Option<BudgetView>,
    /// The live run's GPU telemetry (about one sample a second), plotted beside the loss.
    pub gpu: Vec<GpuSample>,
    /// Throttle warnings of this run, from the session's own rule (`session::telemetry`), shown
    /// on the page until the run ends.
    pub gpu_warnings: Vec<String>,
    gpu_watch: ThrottleWatch,
    /// The sample prompts' answers so far (`[samples]`), in the order they came (a resumed run's
    /// from before the resume too), and the step picked to read.
    pub samples: SamplesView,
}

impl Default for TrainingState {
    fn default() -> Self {
        TrainingState {
            phase: Phase::Idle,
            generation: 0,
            loaded: None,
            metrics: Vec::new(),
            log: VecDeque::new(),
            failure: None,
            finished: None,
            last_checkpoint: None,
            pause_requested: false,
            smoothing: SMOOTHING,
            viewing: None,
            plan_input: None,
            plan: None,
            gpu: Vec::new(),
            gpu_warnings: Vec::new(),
            gpu_watch: ThrottleWatch::default(),
            samples: SamplesView::default(),
        }
    }
}

impl TrainingState {
    /// Reset for a new session.
    pub fn begin(&mut self, generation: u64, what: String) {
        let smoothing = self.smoothing;
        *self = TrainingState { phase: Phase::Loading, generation, smoothing, ..Default::default() };
        self.push_log(what);
    }

    pub fn push_log(&mut self, line: String) {
        if self.log.len() >= LOG_KEEP {
            self.log.pop_front();
        }
        self.log.push_back(line);
    }

    /// Fold one session event into the state.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Log(m) => self.push_log(m),
            Event::Samples { samples, secs, .. } => {
                self.samples.samples.extend(samples);
                self.samples.last_secs = Some(secs);
            }
            Event::Loaded(info) => {
                self.push_log(format!(
                    "loaded in {:.1}s on {}: {} trainable parameters, steps {}..{}",
                    info.load_secs,
                    info.device.name,
                    crate::util::fmt_count(info.trainable_params as u64),
                    info.start_step + 1,
                    info.total_steps
                ));
                // A resumed run's earlier steps are on disk: show the whole curve.
                if info.start_step > 0 {
                    self.metrics =
                        crate::session::checkpoint::read_metrics(&info.run_dir).into_iter().filter(|m| m.step <= info.start_step).collect();
                    // And its samples: the session cut samples.jsonl back to the checkpoint
                    // before it said Loaded; the later ones come again as events.
                    self.samples.samples =
                        crate::session::samples::read(&info.run_dir).into_iter().filter(|s| s.step <= info.start_step).collect();
                }
                self.loaded = Some(info);
                if self.phase == Phase::Loading {
                    self.phase = Phase::Running;
                }
            }
            Event::Step(m) => {
                self.push_log(step_line(&m));
                self.metrics.push(m);
                if self.phase == Phase::Loading {
                    self.phase = Phase::Running;
                }
            }
            Event::Checkpoint { step, dir } => {
                self.push_log(format!("checkpoint at step {step}: {}", dir.display()));
                self.last_checkpoint = Some((step, dir));
            }
            Event::Paused { step } => {
                self.push_log(format!("paused after step {step}"));
                self.pause_requested = false;
                if self.phase != Phase::Stopping {
                    self.phase = Phase::Paused;
                }
            }
            Event::Gpu(sample) => {
                // The session logs the same warnings; the page keeps them in view.
                let warnings = self.gpu_watch.observe(&sample);
                self.gpu_warnings.extend(warnings.into_iter().map(|w| w.trim_start_matches("warning: ").to_string()));
                self.gpu.push(sample);
            }
            Event::Resumed { step } => {
                self.push_log(format!("resumed at step {}", step + 1));
                if self.phase == Phase::Paused {
                    self.phase = Phase::Running;
                }
            }
            Event::Finished(f) => {
                self.push_log(format!(
                    "{} after {} steps{}; adapter: {}",
                    if f.stopped { "stopped" } else { "done" },
                    f.steps,
                    f.final_loss.map(|l| format!(", final loss {l:.4}")).unwrap_or_default(),
                    f.adapter_dir.display()
                ));
                if let (Some(b), Some(dir)) = (f.best, &f.best_checkpoint) {
                    self.push_log(format!("best eval loss {:.4} at step {}: {}", b.eval_loss, b.step, dir.display()));
                }
                self.phase = if f.stopped { Phase::Stopped } else { Phase::Done };
                self.finished = Some(f);
            }
            Event::Failed { message, run_dir, last_checkpoint } => {
                self.push_log(format!("failed: {message}"));
                self.phase = Phase::Failed;
                self.failure = Some(Failure { message, run_dir, last_checkpoint });
            }
        }
    }

    /// The run folder of the live session, once known.
    pub fn run_dir(&self) -> Option<&std::path::Path> {
        self.loaded
            .as_ref()
            .map(|l| l.run_dir.as_path())
            .or(self.finished.as_ref().map(|f| f.run_dir.as_path()))
            .or(self.failure.as_ref().and_then(|f| f.run_dir.as_deref()))
    }
}

/// The GPU telemetry plots, as `[seconds, value]` pairs, and their reference lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuCurves {
    pub utilization_pct: Vec<[f64; 2]>,
    /// In GiB.
    pub memory_ours: Vec<[f64; 2]>,
    pub memory_others: Vec<[f64; 2]>,
    pub temperature_c: Vec<[f64; 2]>,
    pub power_w: Vec<[f64; 2]>,
    pub sm_clock_mhz: Vec<[f64; 2]>,
    /// The newest power limit and top SM clock (drawn as lines), and the card's memory in GiB.
    pub power_limit_w: Option<f64>,
    pub sm_clock_max_mhz: Option<f64>,
    pub memory_total_gib: Option<f64>,
}

pub fn gpu_curves(samples: &[GpuSample]) -> GpuCurves {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let stride = samples.len().div_ceil(MAX_POINTS).max(1);
    let mut c = GpuCurves::default();
    let kept = samples.iter().enumerate().filter(|(i, _)| i.is_multiple_of(stride) || i + 1 == samples.len());
    for (_, s) in kept {
        let x = s.elapsed_s;
        let put = |v: Option<f64>, line: &mut Vec<[f64; 2]>| {
            if let Some(v) = v {
                line.push([x, v]);
            }
        };
        put(s.utilization_pct, &mut c.utilization_pct);
        put(s.memory_ours_bytes.map(gib), &mut c.memory_ours);
        put(Some(gib(s.memory_others_bytes)), &mut c.memory_others);
        put(s.temperature_c, &mut c.temperature_c);
        put(s.power_w, &mut c.power_w);
        put(s.sm_clock_mhz, &mut c.sm_clock_mhz);
    }
    if let Some(last) = samples.last() {
        c.power_limit_w = last.power_limit_w;
        c.sm_clock_max_mhz = last.sm_clock_max_mhz;
        c.memory_total_gib = Some(gib(last.memory_total_bytes));
    }
    c
}

/// What the card is doing now, when it throttles: "throttling now: temperature, power limit".
pub fn throttling_now(samples: &[GpuSample]) -> Option<String> {
    let t = samples.last()?.throttle;
    let causes: Vec<&str> = [(t.thermal, "temperature"), (t.power, "power limit"), (t.hardware, "hardware slowdown")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
    (!causes.is_empty()).then(|| format!("throttling now: {}", causes.join(", ")))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub fraction: f32,
    pub text: String,
}

pub fn progress(metrics: &[StepMetrics], total_steps: Option<u64>, phase: Phase) -> Progress {
    let last = metrics.last();
    let total = last.map(|m| m.total_steps).or(total_steps).unwrap_or(0);
    let step = last.map_or(0, |m| m.step);
    let fraction = if total == 0 { 0.0 } else { (step as f32 / total as f32).clamp(0.0, 1.0) };
    let mut text = format!("step {step} / {total}");
    if let Some(m) = last {
        text.push_str(&format!(" · epoch {:.2} · elapsed {}", m.epoch, fmt_duration(m.elapsed_s)));
        if phase.is_active() && m.step < m.total_steps {
            text.push_str(&format!(" · ETA {}", fmt_duration(m.eta_s)));
        }
        text.push_str(&format!(" · {:.0} tok/s", m.tokens_per_s));
    }
    Progress { fraction, text }
}

/// The memory plot's title and, on a GPU, the card's total (drawn as a line).
pub fn memory_axis(loaded: Option<&LoadedInfo>) -> (String, Option<f64>) {
    match loaded.map(|l| &l.device) {
        Some(d) if d.kind == "cuda" => {
            let total = d.total_memory_bytes;
            (
                format!("GPU memory used{}", total.map(|t| format!(" of {}", fmt_bytes(t))).unwrap_or_default()),
                total.map(|t| t as f64 / (1u64 << 30) as f64),
            )
        }
        _ => ("Memory (process RSS)".into(), None),
    }
}

/// The memory plot's horizontal lines, in GiB like its curve: the card's total and the plan's
/// peak, so the measured memory reads against both.
pub fn memory_lines(total_gib: Option<f64>, plan: Option<&BudgetView>) -> Vec<(&'static str, f64, Color32)> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut out = Vec::new();
    if let Some(t) = total_gib {
        out.push(("total", t, Color32::GRAY));
    }
    if let Some(p) = plan {
        out.push(("plan", gib(p.peak_bytes), Color32::from_rgb(214, 157, 86)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Finished;

    fn m(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            total_steps: 10,
            epoch: step as f64 / 10.0,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 100,
            trained_tokens: 50,
            tokens_per_s: 1000.0,
            elapsed_s: step as f64,
            eta_s: (10 - step) as f64,
            memory_bytes: Some(1 << 30),
            eval_loss: None,
        }
    }

    #[test]
    fn ema_is_debiased_and_smooths() {
        let s = ema(&[4.0, 2.0, 2.0], 0.9);
        assert!((s[0] - 4.0).abs() < 1e-12, "first value is itself");
        assert!(s[1] < 4.0 && s[1] > 2.0);
        assert_eq!(ema(&[1.0, 5.0], 0.0), vec![1.0, 5.0]);
    }

    #[test]
    fn curves_decimate_long_runs_and_keep_the_last_step() {
        let ms: Vec<StepMetrics> = (1..=5001).map(|i| m(i, 1.0 / i as f64)).collect();
        let c = curves(&ms, 0.5);
        assert!(c.loss.len() <= MAX_POINTS + 1);
        assert_eq!(c.loss.last().unwrap()[0], 5001.0);
        assert_eq!(c.memory.last().unwrap()[1], 1.0);
    }

    #[test]
    fn eval_loss_is_plotted_at_its_steps_with_the_best_marked() {
        let mut ms: Vec<StepMetrics> = (1..=6).map(|i| m(i, 2.0 / i as f64)).collect();
        for (i, l) in [(1, 2.5), (3, 1.5), (5, 1.5)] {
            ms[i].eval_loss = Some(l);
        }
        let c = curves(&ms, 0.5);
        assert_eq!(c.eval_loss, vec![[2.0, 2.5], [4.0, 1.5], [6.0, 1.5]]);
        assert_eq!(c.best_eval, Some([4.0, 1.5]), "the first of equal lows, as the session keeps it");
        assert!(step_line(&ms[3]).ends_with("eval loss 1.5000"), "{}", step_line(&ms[3]));
        assert!(!step_line(&ms[0]).contains("eval"));
        assert_eq!(curves(&ms[..1], 0.5).best_eval, None);
    }

    #[test]
    fn progress_text_and_fraction() {
        let p = progress(&[m(5, 1.0)], Some(10), Phase::Running);
        assert_eq!(p.fraction, 0.5);
        assert!(p.text.starts_with("step 5 / 10") && p.text.contains("ETA"), "{}", p.text);
        let done = progress(&[m(10, 1.0)], Some(10), Phase::Done);
        assert!(!done.text.contains("ETA"));
        assert_eq!(progress(&[], Some(60), Phase::Loading).text, "step 0 / 60");
    }

    #[test]
    fn events_drive_the_phase() {
        let mut t = TrainingState::default();
        t.begin(1, "starting".into());
        assert_eq!(t.phase, Phase::Loading);
        t.apply(Event::Step(m(1, 2.0)));
        assert_eq!(t.phase, Phase::Running);
        t.apply(Event::Paused { step: 1 });
        assert_eq!(t.phase, Phase::Paused);
        t.apply(Event::Resumed { step: 1 });
        assert_eq!(t.phase, Phase::Running);
        t.apply(Event::Finished(Finished {
            run_dir: "r".into(),
            adapter_dir: "r/adapter".into(),
            steps: 1,
            final_loss: Some(2.0),
            stopped: true,
            best: None,
            best_checkpoint: None,
        }));
        assert_eq!(t.phase, Phase::Stopped);
        assert!(!t.phase.is_active());
        t.apply(Event::Failed { message: "boom".into(), run_dir: None, last_checkpoint: None });
        assert_eq!(t.phase, Phase::Failed);
        assert_eq!(t.failure.as_ref().unwrap().message, "boom");
    }

    /// A throttling card: the page keeps the session's warning (once) and says what throttles now;
    /// the curves follow the samples in the plots' units.
    #[test]
    fn gpu_samples_are_plotted_and_throttling_is_warned_on_the_page() {
        use crate::backend::nvml::RawSample;
        let mut t = TrainingState::default();
        t.begin(1, "starting".into());
        for sec in 0..12u32 {
            let raw = RawSample {
                memory_total: 24 << 30,
                memory_used: 22 << 30,
                memory_ours: Some(18 << 30),
                utilization_gpu: Some(99),
                temperature_c: Some(80 + sec),
                power_mw: Some(300_000),
                power_limit_mw: Some(450_000),
                sm_clock_mhz: Some(2500 - 50 * sec),
                sm_clock_max_mhz: Some(2520),
                throttle_reasons: Some(if sec >= 4 { 0x20 } else { 0 }),
                ..Default::default()
            };
            t.apply(Event::Gpu(GpuSample::from_raw(&raw, sec as f64)));
        }
        assert_eq!(t.gpu.len(), 12);
        assert_eq!(t.gpu_warnings.len(), 1, "{:?}", t.gpu_warnings);
        assert!(t.gpu_warnings[0].starts_with("the GPU is throttling for temperature"), "{}", t.gpu_warnings[0]);
        assert_eq!(throttling_now(&t.gpu).as_deref(), Some("throttling now: temperature"));
        let c = gpu_curves(&t.gpu);
        assert_eq!((c.memory_ours[0][1], c.memory_others[0][1]), (18.0, 4.0));
        assert_eq!((c.power_limit_w, c.sm_clock_max_mhz, c.memory_total_gib), (Some(450.0), Some(2520.0), Some(24.0)));
        assert_eq!(c.sm_clock_mhz.last(), Some(&[11.0, 1950.0]));
        assert!(throttling_now(&[]).is_none());
        t.begin(2, "again".into());
        assert!(t.gpu.is_empty() && t.gpu_warnings.is_empty(), "a new run starts clean");
    }

    fn loaded_on(kind: &str, total: Option<u64>) -> LoadedInfo {
        LoadedInfo {
            run_dir: "r".into(),
            device: crate::backend::DeviceInfo { kind: kind.into(), name: "card".into(), total_memory_bytes: total, ..Default::default() },
            target: crate::engine::plan::PlanTarget::cpu(),
            model: "m".into(),
            trainable_params: 1,
            total_steps: 10,
            start_step: 0,
            steps_per_epoch: 10,
            dataset: crate::session::DatasetSummary {
                format: "alpaca".into(),
                rows_used: 1,
                rows_skipped: 0,
                truncated_rows: 0,
                trained_tokens: 1,
                eval_rows: 0,
            },
            keeps_all_activations: false,
            mix: crate::engine::plan::Mix::of_policy(&crate::model::ModelSpec::llama3_8b(), crate::config::CheckpointPolicy::Layer),
            load_secs: 0.0,
        }
    }

    #[test]
    fn memory_axis_follows_the_device_and_its_lines_share_the_unit() {
        // A GPU run: the card's total titles the plot and is drawn as a line, in GiB.
        let (title, total) = memory_axis(Some(&loaded_on("cuda", Some(80 << 30))));
        assert_eq!(title, format!("GPU memory used of {}", fmt_bytes(80 << 30)));
        assert_eq!(total, Some(80.0));
        // A CPU run (or none yet): the process's RSS, with no total to draw.
        for loaded in [None, Some(loaded_on("cpu", Some(64 << 30)))] {
            let (title, total) = memory_axis(loaded.as_ref());
            assert!(title.contains("process RSS") && total.is_none(), "{title}");
        }
        let (_, no_total) = memory_axis(Some(&loaded_on("cuda", None)));
        assert_eq!(no_total, None);
        // The curve is in GiB (curves() divides by 2^30); the lines must be too.
        let c = curves(&[m(1, 1.0)], 0.0);
        assert_eq!(c.memory[0][1], 1.0, "1 GiB measured");
        assert_eq!(memory_lines(total, None), vec![("total", 80.0, Color32::GRAY)]);
        assert!(memory_lines(None, None).is_empty());
    }
}
