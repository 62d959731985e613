//! The studio driven through egui_kittest, as a person would: the real `StudioApp`, the real
//! session thread training the demo on the CPU, clicks found by accessible name. Image snapshots
//! of the main screens live in tests/snapshots/ (refresh with UPDATE_SNAPSHOTS=1).
//!
//! The tests share one lock: they train, render with a software rasterizer and time frames, and
//! on a 2-core machine running them side by side would only make each one slower and the frame
//! timings meaningless.

#![cfg(feature = "gui")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use tunestudio::app::jobs::Load;
use tunestudio::app::state::memory::{self as budget, Card};
use tunestudio::app::state::preflight::{Check, Level, PreflightView, UntrainedUse};
use tunestudio::app::state::training::Phase;
use tunestudio::app::{Action, Page, StudioApp, StudioOptions};
use tunestudio::session::checkpoint::StepMetrics;

static SERIAL: Mutex<()> = Mutex::new(());

/// One GUI test at a time on this machine: in this process (the mutex) and across processes
/// (an exclusive `flock` on a file beside the fixed folders), since two checkouts testing at once
/// would empty each other's fixed folders mid-run.
struct Serial {
    _in_process: MutexGuard<'static, ()>,
    _across_processes: std::fs::File,
}

fn serial() -> Serial {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let root = std::env::temp_dir().join("tunestudio-gui-tests");
    std::fs::create_dir_all(&root).unwrap();
    let file = std::fs::File::create(root.with_extension("lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when `file` is dropped.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    Serial { _in_process: guard, _across_processes: file }
}

/// A folder under the temp dir with a fixed name (emptied first): snapshot pixels then never
/// contain a random path.
fn fixed_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("tunestudio-gui-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The demo extracted to a fixed place, as an installed studio would extract it.
fn demo_config() -> PathBuf {
    let d = std::env::temp_dir().join("tunestudio-gui-tests").join("demo");
    tunestudio::assets::extract_demo(&d).unwrap();
    d.join("run.toml")
}

fn studio(config: Option<PathBuf>, test: &str) -> Harness<'static, StudioApp> {
    studio_sized(config, test, [1280.0, 820.0])
}

fn studio_sized(config: Option<PathBuf>, test: &str, size: [f32; 2]) -> Harness<'static, StudioApp> {
    // An empty Hugging Face cache of the test's own: the machine's would change the pixels.
    let opts = StudioOptions {
        config,
        settings_dir: fixed_dir(&format!("{test}-settings")),
        output_dir: Some(fixed_dir(&format!("{test}-runs"))),
        hf_cache: Some(fixed_dir(&format!("{test}-hf-cache"))),
    };
    Harness::builder().with_size(size).wgpu().build_eframe(move |cc| StudioApp::new(cc, opts))
}

/// Step frames (as the window would, woken by the workers) until `cond` holds.
fn wait_for(h: &mut Harness<'static, StudioApp>, what: &str, secs: u64, cond: impl Fn(&StudioApp) -> bool) {
    let t0 = Instant::now();
    loop {
        h.step();
        if cond(h.state()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}; notices: {:?}; log tail: {:?}",
            h.state().state.notices,
            h.state().state.training.log.iter().rev().take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Until the model and the dataset preview are loaded.
fn wait_loaded(h: &mut Harness<'static, StudioApp>) {
    wait_for(h, "the model and dataset to load", 120, |a| {
        let s = &a.state;
        matches!(s.model.info, Load::Ready(_) | Load::Failed(_))
            && matches!(s.dataset.view, Load::Ready(_) | Load::Failed(_))
            && a.jobs_running() == 0
    });
    if let Load::Failed(e) = &h.state().state.model.info {
        panic!("model failed: {e}");
    }
    if let Load::Failed(e) = &h.state().state.dataset.view {
        panic!("dataset failed: {e}");
    }
}

/// Let layout settle (grids and new windows size themselves over a couple of passes).
fn settle(h: &mut Harness<'static, StudioApp>) {
    for _ in 0..8 {
        h.step();
    }
}

/// This thread's CPU time in milliseconds.
fn thread_cpu_ms() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// Frame times in milliseconds: by the clock, and by the UI thread's own CPU time (what the
/// frame costs, without the time spent waiting for a core that other processes hold).
#[derive(Default)]
struct FrameTimes {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl FrameTimes {
    /// One frame as the window would make it: the app's logic and layout (`step`) and the
    /// tessellation of what it drew (the CPU's part of painting; the GPU's share is left out,
    /// since the tests rasterize in software).
    fn frame(&mut self, h: &mut Harness<'static, StudioApp>) {
        let (t, c) = (Instant::now(), thread_cpu_ms());
        h.step();
        let shapes = h.output().shapes.clone();
        let ppp = h.ctx.pixels_per_point();
        std::hint::black_box(h.ctx.tessellate(shapes, ppp));
        self.wall.push(t.elapsed().as_secs_f64() * 1e3);
        self.cpu.push(thread_cpu_ms() - c);
    }

    /// (median, p95, max) of one series.
    fn stats(v: &[f64]) -> (f64, f64, f64) {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (at(0.5), at(0.95), at(1.0))
    }

    /// Print both series; the p95 of each must be under 16 ms (a 60 Hz frame).
    fn report_and_check(&self, what: &str) {
        let (wm, wp, wx) = Self::stats(&self.wall);
        let (cm, cp, cx) = Self::stats(&self.cpu);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!(
            "frame time {what}, {} frames: clock median {wm:.2} / p95 {wp:.2} / max {wx:.2} ms; UI-thread CPU median {cm:.2} / p95 {cp:.2} / max {cx:.2} ms (load average {})",
            self.wall.len(),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        assert!(cp < 16.0, "{what}: p95 frame CPU time {cp:.2} ms");
        assert!(wp < 16.0, "{what}: p95 frame time {wp:.2} ms by the clock");
    }
}

/// Until the budget's "largest that fits" (a worker's search) matches the plan on screen.
fn wait_budget(h: &mut Harness<'static, StudioApp>) {
    wait_for(h, "the largest settings that fit", 60, |a| {
        let b = &a.state.budget;
        b.fixes.as_ref().zip(b.view.as_ref()).is_some_and(|((fk, _), (vk, _))| fk == vk)
    });
    settle(h);
}

/// A snapshot once every worker is done: a spinner in the status bar would change the pixels.
fn snapshot(h: &mut Harness<'static, StudioApp>, name: &str) {
    wait_for(h, "the workers to finish", 60, |a| a.jobs_running() == 0);
    settle(h);
    h.snapshot(name);
}

fn steps(h: &Harness<'static, StudioApp>) -> u64 {
    h.state().state.training.metrics.last().map_or(0, |m| m.step)
}

fn click(h: &mut Harness<'static, StudioApp>, label: &str) {
    // A window whose content just changed spends a pass sizing itself, ignoring clicks.
    settle(h);
    h.get_by_label(label).click();
    h.step();
    h.step();
}

fn disabled(h: &Harness<'static, StudioApp>, label: &str) -> bool {
    h.get_by_label(label).accesskit_node().is_disabled()
}

fn go(h: &mut Harness<'static, StudioApp>, page: Page) {
    click(h, page.title());
    assert_eq!(h.state().state.page, page);
}

#[test]
fn gui_demo_opens_with_model_and_dataset_selected() {
    let _g = serial();
    // No config given: the studio opens the demo from this checkout.
    let mut h = studio(None, "open");
    wait_loaded(&mut h);
    let s = &h.state().state;
    assert!(s.config.model.path.ends_with("assets/demo/model"), "{}", s.config.model.path.display());
    assert!(s.config.dataset.path.ends_with("assets/demo/data/train.jsonl"));
    let info = s.model.info.ready().unwrap();
    assert!(info.architecture.starts_with("llama"), "{}", info.architecture);
    assert!(info.chat_template);
    assert_eq!(info.untrained.len(), 8, "the demo model has 8 zeroed reserved-token rows");
    let view = s.dataset.view.ready().unwrap();
    assert_eq!(view.rows_used, view.rows_total);
    assert!(!view.previews.is_empty());
    assert!(view.previews[0].segments.iter().any(|x| x.kind == tunestudio::app::state::dataset::SpanKind::Trained));
    assert!(h.query_by_label_contains("Untrained tokens").is_some());
    assert_eq!(h.state().state.model.recent.models.first(), Some(&h.state().state.config.model.path), "a loaded model is remembered");
    assert!(h.query_by_label("demo").is_some(), "the recent model is called demo, as its runs are, not by its folder model/");
    assert!(tunestudio::app::start_blocker(&h.state().state).is_none());
    assert!(!disabled(&h, "▶ Start"));
}

#[test]
fn gui_snapshots_of_the_main_screens() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "snap");
    wait_loaded(&mut h);
    settle(&mut h);
    snapshot(&mut h, "model_panel");
    go(&mut h, Page::Dataset);
    settle(&mut h);
    snapshot(&mut h, "dataset_panel");
    go(&mut h, Page::Hyper);
    // The memory budget planned for a fixed card: this machine's RAM would change the pixels.
    h.state_mut().state.budget.card = Card::profile("rtx4090");
    settle(&mut h);
    wait_budget(&mut h);
    snapshot(&mut h, "hyperparameters_panel");

    // The monitor with a fixed, finished curve (a live run's timings would differ per run).
    go(&mut h, Page::Monitor);
    let t = &mut h.state_mut().state.training;
    t.phase = Phase::Done;
    for i in 1..=60u64 {
        let x = i as f64;
        t.metrics.push(StepMetrics {
            step: i,
            total_steps: 60,
            epoch: x / 45.0,
            loss: 3.2 * (-x / 18.0).exp() + 0.9 + 0.15 * (x * 1.7).sin(),
            lr: 2e-3 * (x / 5.0).min(1.0) * (1.0 - (x - 5.0).max(0.0) / 55.0),
            grad_norm: 1.5 * (-x / 30.0).exp() + 0.3,
            tokens: 2048,
            trained_tokens: 700,
            tokens_per_s: 4000.0 + 100.0 * (x * 0.3).cos(),
            elapsed_s: x * 0.5,
            eta_s: (60.0 - x) * 0.5,
            memory_bytes: Some((300 << 20) + (i << 16)),
            eval_loss: None,
        });
        t.push_log(format!("step {i}/60"));
    }
    settle(&mut h);
    snapshot(&mut h, "training_monitor");

    // The preflight dialog asking for the untrained-token fix, from a crafted report: the demo
    // data does not use the zeroed rows, so a real check reports them as left alone.
    h.state_mut().state.config.dataset.fix_untrained_tokens = false;
    let p = &mut h.state_mut().state.preflight;
    p.open = true;
    p.report = Load::Ready(crafted_report(true));
    settle(&mut h);
    snapshot(&mut h, "preflight_needs_fix");
}

fn crafted_report(uses_untrained: bool) -> PreflightView {
    PreflightView {
        model: "llama: 4 layers, hidden 128".into(),
        data: "360 rows used of 360 (0 skipped, 0 truncated), 9000 trained tokens".into(),
        steps: "60 optimizer steps (45 per epoch), 8 sequences each, learning rate 2.00e-3".into(),
        device: "CPU".into(),
        checks: vec![
            Check { level: Level::Ok, text: "Rendered with the model's own chat template.".into() },
            Check { level: Level::Warn, text: "3 rows are skipped.".into() },
        ],
        untrained: (1579..1587).map(|i| (i, format!("<|reserved_special_token_{}|>", i - 1579))).collect(),
        untrained_used: if uses_untrained {
            vec![UntrainedUse { id: 1390, text: "<|reserved_special_token_0|>".into(), rows: 12 }]
        } else {
            vec![]
        },
        budget: None,
        cuda_refusal: None,
    }
}

/// tests/fixtures/interop/demo_fix/run.toml: the demo model on data that uses one of its
/// untrained rows (<|reserved_special_token_0|>), with the fix on.
fn demo_fix_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/demo_fix/run.toml")
}

#[test]
fn gui_untrained_token_dialog_for_a_config_that_needs_the_fix() {
    let _g = serial();
    let mut h = studio(Some(demo_fix_config()), "fix");
    wait_loaded(&mut h);
    assert!(h.state().state.config.dataset.fix_untrained_tokens, "the fixture turns the fix on");
    // Turn it off in the Dataset panel, as someone would who does not know what it is for.
    go(&mut h, Page::Dataset);
    click(&mut h, "Fix untrained tokens");
    assert!(!h.state().state.config.dataset.fix_untrained_tokens);
    h.state_mut().state.config.train.max_steps = Some(3);
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| !a.state.preflight.report.is_loading());
    if let Load::Failed(e) = &h.state().state.preflight.report {
        panic!("preflight failed: {e}");
    }
    settle(&mut h);
    let warn = h
        .get_by_label_contains("untrained token rows: 1579 <|reserved_special_token_0|> (in ")
        .accesskit_node()
        .value()
        .unwrap_or_default();
    assert!(warn.contains("The data uses 1 of the model's 8 untrained token rows"), "{warn}");
    assert!(h.query_by_label_contains("The fix is off").is_some());
    assert!(h.query_by_label("▶ Start training").is_none(), "no plain start while the fix is refused");
    click(&mut h, "Accept the fix and start");
    let s = &h.state().state;
    assert!(s.config.dataset.fix_untrained_tokens, "accepting sets dataset.fix_untrained_tokens");
    assert!(!s.preflight.open);
    assert!(s.training.phase.is_active());
    wait_for(&mut h, "the short run to end", 120, |a| !a.state.training.phase.is_active());
    let t = &h.state().state.training;
    assert_eq!(t.phase, Phase::Done, "{:?}", t.failure);
    assert!(t.metrics.iter().all(|m| m.loss.is_finite()));
    let fix: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.run_dir().unwrap().join("token_fix.json")).unwrap()).unwrap();
    assert_eq!(fix["fixed_token_ids"], serde_json::json!([1579]));

    // With the fix on, the same check lets the run start (and names the rows it trains).
    h.state_mut().state.config.output.run_name = "demo_fix_2".into();
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the second preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_by_label_contains("Fix on (dataset.fix_untrained_tokens)").is_some());
    assert!(!disabled(&h, "▶ Start training"));
    click(&mut h, "Cancel");
    assert!(!h.state().state.preflight.open);
}

#[test]
fn gui_invalid_field_disables_start_with_its_reason() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "invalid");
    wait_loaded(&mut h);
    go(&mut h, Page::Hyper);
    h.state_mut().state.budget.card = Card::profile("rtx4090");
    h.get_by_label("LoRA rank (r)").set_value_accesskit(0.0);
    h.step();
    h.step();
    assert_eq!(h.state().state.config.lora.r, 0);
    assert!(disabled(&h, "▶ Start"));
    let reason = "Start is disabled: LoRA rank (r) (lora.r): 0 is outside the allowed range [1, 1024]";
    assert!(h.query_by_label(reason).is_some(), "the status bar gives the reason");
    assert!(h.query_by_label("⚠ 0 is outside the allowed range [1, 1024]").is_some(), "the field is marked in place");
    // The shortcut does not start either.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    h.step();
    assert!(!h.state().state.preflight.open && !h.state().state.training.phase.is_active());
    settle(&mut h);
    snapshot(&mut h, "invalid_field");
    h.get_by_label("LoRA rank (r)").set_value_accesskit(8.0);
    h.step();
    h.step();
    assert!(!disabled(&h, "▶ Start"));
}

#[test]
fn gui_train_pause_resume_stop_export_and_resume_from_runs() {
    let _g = serial();
    // Open another config, then pick the demo from the File menu as a person would.
    let mut h = studio(Some(demo_fix_config()), "train");
    wait_loaded(&mut h);
    click(&mut h, "File");
    click(&mut h, "Open the demo");
    assert!(h.state().state.config_is_demo && h.state().state.config.model.path.ends_with("assets/demo/model"));
    assert_eq!(
        h.state().state.config.output.dir,
        std::env::temp_dir().join("tunestudio-gui-tests").join("train-runs"),
        "the test's runs folder holds for a config opened later"
    );
    wait_loaded(&mut h);
    // Enough steps that the run is still going while we press the buttons.
    h.state_mut().state.config.train.max_steps = Some(400);
    h.state_mut().state.config.train.save_every = 0;
    h.state_mut().state.config.output.run_name = "gui-run".into();
    h.step();

    click(&mut h, "▶ Start");
    assert!(h.state().state.preflight.open, "Start opens the preflight dialog first");
    wait_for(&mut h, "the preflight report", 120, |a| !a.state.preflight.report.is_loading());
    if let Load::Failed(e) = &h.state().state.preflight.report {
        panic!("preflight failed: {e}");
    }
    settle(&mut h);
    let untrained = h.get_by_label_contains("token rows of the model were never trained").accesskit_node().value().unwrap_or_default();
    assert!(untrained.contains("left alone"), "{untrained}");
    for i in 0..8 {
        assert!(
            untrained.contains(&format!("{} <|reserved_special_token_{i}|>", 1579 + i)),
            "the demo's unused zeroed rows are each listed: {untrained}"
        );
    }
    assert!(
        h.query_by_label_contains("Fits: ").is_some() && h.query_by_label_contains("in RAM (CPU training)").is_some(),
        "the budget is planned for the CPU"
    );
    click(&mut h, "▶ Start training");
    assert_eq!(h.state().state.page, Page::Monitor);

    wait_for(&mut h, "two steps", 180, |a| a.state.training.metrics.len() >= 2);
    assert!(h.state().state.training.loaded.is_some());
    click(&mut h, "⏸ Pause");
    wait_for(&mut h, "the pause", 60, |a| a.state.training.phase == Phase::Paused);
    let at = steps(&h);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(steps(&h), at, "no step while paused");
    click(&mut h, "⏵ Resume");
    wait_for(&mut h, "a step after resuming", 60, |a| a.state.training.metrics.last().is_some_and(|m| m.step > at));
    // The 0.8 s paused are not training time: the elapsed time (and the ETA from it) leave them out.
    let elapsed_at = |step: u64| h.state().state.training.metrics.iter().find(|m| m.step == step).unwrap().elapsed_s;
    let across = elapsed_at(at + 1) - elapsed_at(at);
    let around: Vec<(u64, f64)> = h.state().state.training.metrics.iter().map(|m| (m.step, m.elapsed_s)).collect();
    assert!(
        across < 0.5,
        "the step after the pause came {across:.3} s of training time later: the pause was counted; paused at {at}: {around:?}"
    );
    // With save_every = 0 nothing is saved before the end unless asked.
    assert!(h.state().state.training.last_checkpoint.is_none());
    click(&mut h, "💾 Save now");
    wait_for(&mut h, "the requested checkpoint", 60, |a| a.state.training.last_checkpoint.as_ref().is_some_and(|(s, _)| *s > at));
    click(&mut h, "⏹ Stop");
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    let s = &h.state().state;
    assert_eq!(s.training.phase, Phase::Stopped, "{:?}", s.training.failure);
    let run_dir = s.training.run_dir().unwrap().to_path_buf();
    assert!(run_dir.join("adapter/adapter_model.safetensors").is_file());
    let stopped_at = steps(&h);
    assert!(window_title(&h).contains("stopped"), "{}", window_title(&h));

    // Export the adapter into a chosen folder.
    go(&mut h, Page::Export);
    let dest = fixed_dir("train-export");
    h.state_mut().state.export.dest = dest.clone();
    h.state_mut().state.export.source = Some(run_dir.clone());
    h.step();
    click(&mut h, "Export adapter");
    wait_for(&mut h, "the export", 60, |a| a.state.export.result.is_some());
    let out = h.state().state.export.result.clone().unwrap().expect("export succeeds");
    assert_eq!(out, dest.join("gui-run-adapter"));
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
    h.step();
    assert!(h.query_by_label(&out.display().to_string()).is_some(), "the resulting path is shown");
    // Beside it, its folder opens in the file manager and the path can be copied.
    assert!(h.query_by_label("📂 Open folder").is_some());
    h.get_by_label("📋 Copy path").click();
    let mut copied = false;
    for _ in 0..3 {
        h.step();
        copied |= h.output().platform_output.commands.contains(&egui::OutputCommand::CopyText(out.display().to_string()));
    }
    assert!(copied, "Copy path puts the exported folder's path on the clipboard");
    let exported =
        tunestudio::adapter::load_peft(&out, &tunestudio::model::ModelSpec::from_dir(&h.state().state.config.model.path).unwrap()).unwrap();
    let saved = tunestudio::adapter::load_peft(
        &run_dir.join("adapter"),
        &tunestudio::model::ModelSpec::from_dir(&h.state().state.config.model.path).unwrap(),
    )
    .unwrap();
    assert!(exported.weights == saved.weights, "the exported adapter holds the run's weights");

    // And the merged 16-bit model, as transformers would load it.
    click(&mut h, "Export merged weights");
    wait_for(&mut h, "the merged export", 120, |a| a.state.export.result.is_some());
    let merged = h.state().state.export.result.clone().unwrap().expect("merged export succeeds");
    assert_eq!(merged, dest.join("gui-run-merged-bf16"));
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "{f} in the merged folder");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"].as_str().or(config["dtype"].as_str()), Some("bfloat16"), "{config}");
    h.step();
    assert!(h.query_by_label(&merged.display().to_string()).is_some(), "the merged folder's path is shown");

    // And GGUF with its Modelfile, whose sampling settings are the Chat page's.
    h.state_mut().state.chat.params.temperature = 0.35;
    h.state_mut().state.export.gguf_quant = tunestudio::export::gguf::GgufQuant::Q8_0;
    click(&mut h, "Export GGUF");
    wait_for(&mut h, "the GGUF export", 120, |a| a.state.export.result.is_some());
    let gguf = h.state().state.export.result.clone().unwrap().expect("GGUF export succeeds");
    assert_eq!(gguf, dest.join("gui-run-q8_0").join("gui-run-q8_0.gguf"));
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
    assert_eq!(content.metadata["general.architecture"].to_string().unwrap(), "llama");
    assert!(content.metadata.contains_key("tokenizer.chat_template"));
    let merged_tensors = tunestudio::model::weights::WeightStore::open(&merged).unwrap().names().count();
    assert!(content.tensor_infos.len() >= merged_tensors, "every tensor of the merged model");
    let modelfile = std::fs::read_to_string(gguf.with_file_name("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./gui-run-q8_0.gguf\n"), "{modelfile}");
    assert!(modelfile.contains("PARAMETER temperature 0.35"), "{modelfile}");
    h.step();
    assert!(h.query_by_label(&gguf.display().to_string()).is_some(), "the GGUF file's path is shown");
    // The run's exports, newest first, each with its folder to open and its path to copy.
    wait_for(&mut h, "the runs re-read after the exports", 30, |a| {
        a.state.runs.records.ready().is_some_and(|r| r.iter().any(|r| r.dir == run_dir && r.exports.len() == 3))
    });
    h.step();
    assert!(h.query_by_label("Exports of this run (3)").is_some(), "the run's exports are listed");
    for kind in ["adapter", "merged bf16", "gguf q8_0"] {
        assert_eq!(h.query_all_by_label(kind).count(), 1, "{kind}");
    }
    assert!(h.query_by_label("gui-run-q8_0.gguf").is_some(), "an export is named by its file");
    h.get_all_by_label("📋").next().unwrap().click();
    let mut copied = false;
    for _ in 0..3 {
        h.step();
        copied |= h.output().platform_output.commands.contains(&egui::OutputCommand::CopyText(gguf.display().to_string()));
    }
    assert!(copied, "the newest export's path is copied from its line");

    // The Runs list shows the stopped run; resume it.
    go(&mut h, Page::Runs);
    wait_for(&mut h, "the runs list", 30, |a| a.state.runs.records.ready().is_some_and(|r| !r.is_empty()));
    h.step();
    assert!(h.query_all_by_label("stopped").count() >= 2, "the toolbar and the runs list say stopped");
    click(&mut h, "Resume");
    wait_for(&mut h, "a resumed step", 180, |a| a.state.training.metrics.last().is_some_and(|m| m.step > stopped_at));
    let loaded = h.state().state.training.loaded.as_ref().unwrap();
    assert_eq!(loaded.run_dir, run_dir);
    assert!(loaded.start_step > 0 && loaded.start_step <= stopped_at);
    assert_eq!(h.state().state.training.metrics.first().map(|m| m.step), Some(1), "the curve before the resume is shown too");
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::F5);
    wait_for(&mut h, "the stop shortcut", 120, |a| !a.state.training.phase.is_active());

    // Reopen the run's curves from the list.
    go(&mut h, Page::Runs);
    wait_for(&mut h, "the refreshed runs list", 30, |a| a.jobs_running() == 0);
    h.step();
    click(&mut h, "Open");
    wait_for(&mut h, "the opened run", 30, |a| a.state.training.viewing.is_some());
    assert_eq!(h.state().state.page, Page::Monitor);
    assert!(h.state().state.training.viewing.as_ref().unwrap().metrics.len() as u64 >= stopped_at);
}

fn window_title(h: &Harness<'static, StudioApp>) -> String {
    tunestudio::app::window_title(&h.state().state)
}

#[test]
fn gui_frame_time_stays_under_16ms_while_training() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "frames");
    wait_loaded(&mut h);
    h.state_mut().state.config.train.max_steps = Some(400);
    let ctx = h.ctx.clone();
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "training to run", 180, |a| a.state.training.metrics.len() >= 3);
    // Frames while steps stream in, with the monitor drawing every plot.
    let mut times = FrameTimes::default();
    let first = h.state().state.training.metrics.len();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        times.frame(&mut h);
        std::thread::sleep(Duration::from_millis(8));
    }
    let during = h.state().state.training.metrics.len() - first;
    assert!(h.state().state.training.plan.is_some(), "the monitor draws the measured memory against the plan");
    h.state_mut().act(Action::Stop, &ctx);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    assert!(during >= 1, "steps must arrive while the frames are timed");
    times.report_and_check(&format!("on the monitor while {during} training steps arrived"));
}

/// A dropped file for the harness: egui only needs its path.
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn gui_drop_a_dataset_and_see_failures_as_messages() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "drop");
    wait_loaded(&mut h);
    // A dataset with no usable row: the panel says why, and Start says it is disabled.
    let dir = fixed_dir("drop-data");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(bad.clone())));
    h.step();
    assert_eq!(h.state().state.config.dataset.path, bad);
    assert_eq!(h.state().state.page, Page::Dataset);
    wait_for(&mut h, "the dataset check", 60, |a| a.state.dataset.view.ready().is_some_and(|v| v.refusal.is_some()));
    h.step();
    let reason = tunestudio::app::start_blocker(&h.state().state).unwrap();
    assert!(reason.starts_with("Dataset file (dataset.path):"), "{reason}");
    assert!(disabled(&h, "▶ Start"));

    // A session that fails reports a readable message in the monitor, not a crash.
    let ctx = h.ctx.clone();
    let empty = fixed_dir("drop-not-a-run");
    h.state_mut().act(Action::ResumeRun(empty.clone()), &ctx);
    wait_for(&mut h, "the failure", 60, |a| a.state.training.phase == Phase::Failed);
    h.step();
    let msg = h.state().state.training.failure.as_ref().unwrap().message.clone();
    assert!(msg.contains("is not a run folder"), "{msg}");
    assert!(h.query_all_by_label_contains("is not a run folder").count() >= 1, "the message is on screen");
}

/// The verdict line the budget panel must show for the harness's config right now.
fn expected_verdict(h: &Harness<'static, StudioApp>, spec: &tunestudio::model::ModelSpec) -> String {
    let s = &h.state().state;
    let machine = s.budget.machine.ready();
    let target = budget::target(s.budget.card, &s.config, machine);
    budget::verdict(&budget::view(spec, &s.config, &target, machine.and_then(|m| m.host.as_ref()), 0)).0
}

#[test]
fn gui_budget_panel_follows_a_dragged_slider_within_the_frame() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "budget");
    wait_loaded(&mut h);
    wait_for(&mut h, "the machine probe", 60, |a| a.state.budget.machine.ready().is_some());
    // Fixed RAM, so the snapshot does not depend on the machine running the test.
    if let Load::Ready(m) = &mut h.state_mut().state.budget.machine {
        m.host = Some(budget::HostMemory { total_bytes: 32 << 30, available_bytes: 24 << 30 });
    }
    // Plan for Llama-3-8B's shape (the plan reads only config.json's numbers): the demo model is
    // too small for a budget to matter, and an 8B plan is the cost a frame really pays.
    let spec = tunestudio::model::ModelSpec::llama3_8b();
    if let Load::Ready(info) = &mut h.state_mut().state.model.info {
        info.spec = spec.clone();
    }
    go(&mut h, Page::Hyper);
    click(&mut h, "Preview for");
    click(&mut h, "RTX 3060 · 12 GiB");
    assert_eq!(h.state().state.budget.card, Card::profile("rtx3060"));
    settle(&mut h);
    assert!(h.query_by_label(&expected_verdict(&h, &spec)).is_some(), "the plan for the picked card is shown");

    // Drag "Max sequence length" to the right; every frame must show the plan of the value that
    // frame put on screen.
    let start_len = h.state().state.config.train.max_seq_len;
    let at = h.get_by_label("Max sequence length").rect().center();
    h.hover_at(at);
    h.step();
    h.drag_at(at);
    h.step();
    let mut times = FrameTimes::default();
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=60 {
        h.hover_at(at + egui::vec2(i as f32 * 4.0, 0.0));
        times.frame(&mut h);
        let len = h.state().state.config.train.max_seq_len;
        seen.insert(len);
        let want = expected_verdict(&h, &spec);
        assert!(h.query_by_label(&want).is_some(), "frame {i}: max_seq_len {len}, the panel should read {want:?}");
    }
    h.drop_at(at + egui::vec2(240.0, 0.0));
    h.step();
    let end_len = h.state().state.config.train.max_seq_len;
    assert!(
        end_len > start_len + 1000 && seen.len() > 30,
        "the drag moved the value through many plans: {start_len} → {end_len}, {} values",
        seen.len()
    );
    times.report_and_check("while dragging max_seq_len (a Llama-3-8B plan each frame)");

    // Too long for the card: the verdict says so in the frame of the edit, and "largest that
    // fits" (searched on a worker) sets a length that fits in one click.
    h.get_by_label("Max sequence length").set_value_accesskit(8192.0);
    h.step();
    assert_eq!(h.state().state.config.train.max_seq_len, 8192);
    let want = expected_verdict(&h, &spec);
    assert!(want.starts_with("Does not fit: needs"), "{want}");
    assert!(h.query_by_label(&want).is_some());
    wait_budget(&mut h);
    let fit = h.state().state.budget.fixes.as_ref().unwrap().1.max_seq_len.expect("some length fits a 12 GB card");
    assert!(fit < 8192);
    assert!(h.query_all_by_label_contains("To fit: ").count() >= 1, "the cheapest changes are listed");
    // A worker that lands between finding the button and the click can move it (a loaded CI
    // machine did): click once the page is still.
    wait_for(&mut h, "the workers to finish", 60, |a| a.jobs_running() == 0);
    click(&mut h, &format!("seq len {fit}"));
    assert_eq!(h.state().state.config.train.max_seq_len, fit);
    let want = expected_verdict(&h, &spec);
    assert!(want.starts_with("Fits: "), "{want}");
    assert!(h.query_by_label(&want).is_some());
    wait_budget(&mut h);
    snapshot(&mut h, "memory_budget");
}

/// A copy of the demo model whose final norm holds NaN (refused at load: issue 18).
fn nan_model() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model");
    let dir = fixed_dir("nan-model");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header["model.norm.weight"]["data_offsets"];
    let (a, b) = (8 + n + off[0].as_u64().unwrap() as usize, 8 + n + off[1].as_u64().unwrap() as usize);
    for pair in bytes[a..b].chunks_mut(2) {
        pair.copy_from_slice(&0x7fc0u16.to_le_bytes()); // bf16 NaN
    }
    std::fs::write(&path, bytes).unwrap();
    dir
}

#[test]
fn gui_session_errors_are_readable_messages_and_the_app_goes_on() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "errors");
    wait_loaded(&mut h);
    // A model with a NaN weight cannot start: the preflight names the tensor, before anything
    // is loaded on a device or quantized.
    h.state_mut().state.config.model.path = nan_model();
    h.state_mut().state.config.train.max_steps = Some(3);
    wait_loaded(&mut h);
    wait_for(&mut h, "the NaN model to load", 60, |a| a.state.model.info.ready().is_some_and(|i| i.path.ends_with("nan-model")));
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_all_by_label_contains("tensor `model.norm.weight`").count() >= 1, "the NaN tensor is named in the dialog");
    assert!(disabled(&h, "▶ Start training"));
    click(&mut h, "Cancel");
    settle(&mut h);

    // Out of memory, as the session words it on a GPU (a CPU run cannot run out of device
    // memory, so the event is handed to the monitor directly).
    let oom = tunestudio::Error::OutOfMemory {
        during: "at set-up".into(),
        advice: "the plan needs 27.10 GiB on a NVIDIA GeForce RTX 4090 card of 23.99 GiB (checkpointing None); to fit: memory.checkpointing = \"layer\" (recompute each layer in the backward) (14.20 GiB)".into(),
    }
    .to_string();
    let generation = h.state().state.training.generation;
    h.state_mut().state.training.begin(generation, "a GPU run".into());
    h.state_mut().state.training.apply(tunestudio::session::Event::Failed { message: oom.clone(), run_dir: None, last_checkpoint: None });
    settle(&mut h);
    h.state_mut().state.page = Page::Monitor;
    settle(&mut h);
    assert!(h.query_by_label(&oom).is_some(), "{oom}");
    assert!(h.query_by_label("⚠ Training").is_some(), "the nav marks the failed run");
    assert!(!disabled(&h, "▶ Start"), "the studio goes on: Start is available again");
    assert!(window_title(&h).contains("failed"));
    settle(&mut h);
    snapshot(&mut h, "session_error");
}

/// A 24 GB card on which another program holds 10 GiB: the budget shows that memory as a term of
/// its own (ours are the idle card's), the verdict counts it, and the card picker's profiles plan
/// for another card, one the engine cannot run saying why instead of a plan.
#[test]
fn gui_budget_shows_other_processes_and_plans_for_card_profiles() {
    use tunestudio::backend::card::profile_named;
    use tunestudio::device::{Gpu, Machine};
    let _g = serial();
    let mut h = studio(Some(demo_config()), "cards");
    wait_loaded(&mut h);
    wait_for(&mut h, "the machine probe", 60, |a| a.state.budget.machine.ready().is_some());
    let card = tunestudio::backend::card::CardLimits { profile: None, ..profile_named("rtx4090").unwrap().limits() };
    let shared = |others: u64| Machine {
        gpu: Some(Gpu { card: card.clone(), others_bytes: Some(others), context_bytes: 600 << 20, pci_bus_id: None }),
        no_gpu_reason: String::new(),
        host: Some(budget::HostMemory { total_bytes: 32 << 30, available_bytes: 24 << 30 }),
    };
    h.state_mut().state.budget.machine = Load::Ready(shared(10 << 30));
    let spec = tunestudio::model::ModelSpec::llama3_8b();
    if let Load::Ready(info) = &mut h.state_mut().state.model.info {
        info.spec = spec.clone();
    }
    let c = &mut h.state_mut().state.config;
    c.train.device = tunestudio::config::DeviceChoice::Auto;
    c.train.batch_size = 1;
    c.train.max_seq_len = 2048;
    // A fixed policy: `auto` may rightly pick another one when others leave less room.
    c.memory.checkpointing = tunestudio::config::CheckpointPolicy::Layer;
    go(&mut h, Page::Hyper);
    settle(&mut h);
    assert!(h.query_by_label("■ used by other processes 10.00 GiB").is_some(), "other processes are a legend item of their own");
    let want = expected_verdict(&h, &spec);
    assert!(want.contains("used by other processes") && h.query_by_label(&want).is_some(), "{want}");
    // Our own terms are those of the idle card.
    let ours = |v: &budget::BudgetView| v.segments.iter().filter(|s| s.label != "used by other processes").cloned().collect::<Vec<_>>();
    let busy = h.state().state.budget.view.clone().unwrap().1;
    let s = &h.state().state;
    let idle = budget::view(&spec, &s.config, &budget::target(Card::ThisMachine, &s.config, Some(&shared(0))), None, 0);
    assert_eq!(ours(&busy), ours(&idle));
    wait_budget(&mut h);
    snapshot(&mut h, "memory_budget_shared_card");

    // The memory cap is a field of its own, and the plan targets it.
    click(&mut h, "GPU memory cap");
    assert_eq!(h.state().state.config.memory.gpu_mem, Some(tunestudio::config::ByteSize(24 << 30)));
    h.state_mut().state.config.memory.gpu_mem = Some(tunestudio::config::ByteSize(8 << 30));
    settle(&mut h);
    let want = expected_verdict(&h, &spec);
    assert!(want.contains("the 8.00 GiB cap") && h.query_by_label(&want).is_some(), "{want}");
    h.state_mut().state.config.memory.gpu_mem = None;

    click(&mut h, "Preview for");
    for p in tunestudio::backend::card::PROFILES {
        assert!(h.query_by_label(&budget::profile_label(p)).is_some(), "{} is offered", p.key);
    }
    click(&mut h, "L4 · 22.5 GiB");
    assert_eq!(h.state().state.budget.card, Card::profile("l4"));
    settle(&mut h);
    let want = expected_verdict(&h, &spec);
    assert!(want.contains("NVIDIA L4 (profile l4)") && !want.contains("other processes"), "a profile is that card, idle: {want}");
    assert!(h.query_by_label(&want).is_some());
    // Before Start: the predicted speed and ETA on that card, and how far to trust them.
    let predicted = h.get_by_label_contains("predicted: ~").accesskit_node().value().unwrap_or_default();
    assert!(predicted.contains("tokens/s") && predicted.contains("NVIDIA L4 datasheet"), "{predicted}");
    assert!(predicted.contains("not yet measured on this card"), "{predicted}");
    click(&mut h, "Preview for");
    click(&mut h, "Tesla T4 · 15 GiB (cannot run)");
    assert_eq!(h.state().state.budget.card, Card::profile("t4"));
    settle(&mut h);
    let t4 = h.get_by_label_contains("Cannot train on Tesla T4").accesskit_node().value().unwrap_or_default();
    assert!(t4.contains("compute capability 7.5 has no bf16 tensor cores"), "{t4}");
    assert!(h.query_by_label_contains("predicted: ~").is_none(), "no speed for a card that cannot train");
}

/// `train.device = cuda` on a machine without a usable GPU: the preflight dialog says why and
/// offers the CPU as an explicit choice, which checks the run again on the CPU.
#[test]
fn gui_preflight_offers_the_cpu_when_cuda_cannot_start() {
    if tunestudio::backend::cuda::probe().is_ok() {
        return; // a GPU host: the GPU would start
    }
    let _g = serial();
    let mut h = studio(Some(demo_config()), "nocuda");
    wait_loaded(&mut h);
    h.state_mut().state.config.train.device = tunestudio::config::DeviceChoice::Cuda;
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    let why = h.get_by_label_contains("Cannot start on the GPU: ").accesskit_node().value().unwrap_or_default();
    assert!(why.contains("no usable CUDA device") && why.contains("train.device = \"cpu\""), "{why}");
    assert!(h.query_by_label("▶ Start training").is_none(), "no start on a device that cannot start");
    snapshot(&mut h, "preflight_cuda_refused");
    click(&mut h, "Train on the CPU instead");
    assert_eq!(h.state().state.config.train.device, tunestudio::config::DeviceChoice::Cpu);
    assert!(h.state().state.preflight.open, "the run is checked again, now on the CPU");
    wait_for(&mut h, "the second preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(!disabled(&h, "▶ Start training"));
    click(&mut h, "Cancel");
}

/// GPU telemetry of a live run (recorded-style samples of a card that heats up until it throttles):
/// plotted beside the loss, the throttling named on the page, the warning kept in view.
#[test]
fn gui_monitor_plots_gpu_telemetry_and_warns_when_the_card_throttles() {
    use tunestudio::backend::nvml::{GpuSample, RawSample};
    let _g = serial();
    let mut h = studio(Some(demo_config()), "telemetry");
    wait_loaded(&mut h);
    go(&mut h, Page::Monitor);
    let t = &mut h.state_mut().state.training;
    t.phase = Phase::Running;
    for i in 1..=40u64 {
        let x = i as f64;
        t.metrics.push(StepMetrics {
            step: i,
            total_steps: 60,
            epoch: x / 45.0,
            loss: 3.2 * (-x / 18.0).exp() + 0.9,
            lr: 2e-4,
            grad_norm: 1.0,
            tokens: 2048,
            trained_tokens: 700,
            tokens_per_s: 4000.0,
            elapsed_s: x,
            eta_s: 60.0 - x,
            memory_bytes: Some(18 << 30),
            eval_loss: None,
        });
        let hot = i >= 30;
        let raw = RawSample {
            memory_total: 24 << 30,
            memory_used: 21 << 30,
            memory_ours: Some(18 << 30),
            utilization_gpu: Some(if i < 3 { 20 } else { 98 }),
            temperature_c: Some(60 + i as u32 / 2 + if hot { 10 } else { 0 }),
            power_mw: Some(440_000),
            power_limit_mw: Some(450_000),
            sm_clock_mhz: Some(if hot { 1800 } else { 2500 }),
            sm_clock_max_mhz: Some(2520),
            throttle_reasons: Some(if hot { 0x20 } else { 0 }),
            ..Default::default()
        };
        t.apply(tunestudio::session::Event::Gpu(GpuSample::from_raw(&raw, x)));
    }
    settle(&mut h);
    assert!(h.query_by_label("GPU throttling now: temperature").is_some());
    assert!(h.query_by_label_contains("⚠ the GPU is throttling for temperature (").is_some(), "the warning stays on the page");
    for title in ["GPU utilization (%)", "GPU memory (GiB): ours, other processes", "Temperature (°C) and power (W)", "SM clock (MHz)"] {
        assert!(h.query_by_label(title).is_some(), "{title}");
    }
    // The small memory plot names its lines in a key above it; an in-plot legend covered the
    // measured curve.
    h.state_mut().state.training.plan = long_report().budget;
    settle(&mut h);
    for key in ["— measured", "— plan"] {
        assert!(h.query_by_label(key).is_some(), "memory plot key {key}");
    }
    h.state_mut().state.training.phase = Phase::Done;
    snapshot(&mut h, "training_monitor_gpu");
}

/// A report as long as a real one on imperfect data: every kind of check, untrained rows used,
/// the memory budget of an 8B model on a 24 GB card.
fn long_report() -> PreflightView {
    let mut r = crafted_report(true);
    let mut cfg = tunestudio::RunConfig::default();
    cfg.memory.checkpointing = tunestudio::config::CheckpointPolicy::Layer;
    let target = budget::target(Card::profile("rtx4090"), &cfg, None);
    r.budget = Some(budget::view(&tunestudio::model::ModelSpec::llama3_8b(), &cfg, &target, None, 0));
    r.checks = vec![
        Check { level: Level::Ok, text: "Rendered with the model's own chat template.".into() },
        Check { level: Level::Warn, text: "5 rows are skipped (reasons in the Dataset panel).".into() },
        Check { level: Level::Warn, text: "12 rows are longer than max_seq_len 256 and are truncated.".into() },
        Check {
            level: Level::Info,
            text: "41% of the tokens in a batch are padding; dataset.packing would spend that compute on data.".into(),
        },
        Check { level: Level::Warn, text: "The tokenizer has no pad token; the EOS token pads, masked out of the loss.".into() },
        Check { level: Level::Info, text: "600 steps of 8 sequences over 95 rows is about 50 epochs.".into() },
    ];
    r
}

#[test]
fn gui_preflight_dialog_shows_its_report_at_its_opening_size() {
    let _g = serial();
    for size in [[1600.0, 1000.0], [1280.0, 820.0]] {
        let mut h = studio_sized(Some(demo_config()), "dialog", size);
        wait_loaded(&mut h);
        h.state_mut().state.config.dataset.fix_untrained_tokens = false;
        // As after pressing Start: a spinner while the check runs, then the report.
        let p = &mut h.state_mut().state.preflight;
        p.open = true;
        p.report = Load::Loading;
        settle(&mut h);
        let report = long_report();
        h.state_mut().state.preflight.report = Load::Ready(report.clone());
        settle(&mut h);
        // Every line of the report is above the button that starts the run, not scrolled away
        // below it: what the person confirms is on screen when the dialog opens.
        let button = h.get_by_label("Accept the fix and start").rect();
        let mut lines: Vec<String> = report.checks.iter().map(|c| c.text.clone()).collect();
        lines.push("The data uses 1 of the model's 8 untrained token rows".into());
        lines.push("The fix is off".into());
        // The memory budget comes last: its verdict and its legend's last line.
        lines.push(budget::verdict(report.budget.as_ref().unwrap()).0);
        lines.push("checkpointing: layer".into());
        for line in &lines {
            let r = h.get_by_label_contains(line).rect();
            assert!(r.bottom() <= button.top() + 0.5, "at {size:?}: {line:?} at {r:?} is below the Start button at {button:?}");
        }
        assert!(button.bottom() <= size[1], "at {size:?}: the button is in the window ({button:?})");
    }
}

#[test]
fn gui_shift_f5_stops_a_run_and_refusals_go_when_their_reason_does() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "keys");
    wait_loaded(&mut h);
    // No run: Shift+F5 does nothing (it used to open the preflight check, as F5 does).
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::F5);
    h.step();
    assert!(!h.state().state.preflight.open, "Shift+F5 is Stop, never Start");
    h.state_mut().state.config.train.max_steps = Some(400);
    let ctx = h.ctx.clone();
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "two steps", 180, |a| a.state.training.metrics.len() >= 2);
    // F5 during a run is refused, once however often it is pressed.
    for _ in 0..3 {
        h.key_press(egui::Key::F5);
        h.step();
    }
    let refusal = "Cannot start: a run is in progress";
    assert_eq!(h.state().state.notices.iter().filter(|n| n.text == refusal).count(), 1, "{:?}", h.state().state.notices);
    settle(&mut h);
    assert_eq!(h.query_all_by_label(refusal).count(), 1, "shown once");
    // Shift+F5 stops it.
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::F5);
    h.step();
    assert_eq!(h.state().state.training.phase, Phase::Stopping);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    let t = &h.state().state.training;
    assert_eq!(t.phase, Phase::Stopped, "{:?}", t.failure);
    assert!(t.metrics.last().unwrap().step < 400, "stopped early, not run to the end");
    // The refusal went with the run it was about.
    settle(&mut h);
    assert!(h.state().state.notices.is_empty(), "{:?}", h.state().state.notices);
    assert!(h.query_by_label(refusal).is_none());
}

#[test]
fn gui_a_past_run_opened_from_runs_shows_its_own_log() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "pastlog");
    wait_loaded(&mut h);
    let ctx = h.ctx.clone();
    h.state_mut().state.config.train.max_steps = Some(3);
    h.state_mut().state.config.output.run_name = "first".into();
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "the first run", 180, |a| a.state.training.phase == Phase::Done);
    let first = h.state().state.training.run_dir().unwrap().to_path_buf();
    h.state_mut().state.config.train.max_steps = Some(400);
    h.state_mut().state.config.output.run_name = "second".into();
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "the second run's steps", 180, |a| a.state.training.metrics.len() >= 2);
    h.state_mut().act(Action::OpenRun(first.clone()), &ctx);
    wait_for(&mut h, "the opened run", 30, |a| a.state.training.viewing.is_some());
    settle(&mut h);
    // The first run's curves beside the first run's log: its three steps and its end.
    assert!(h.query_by_label_contains("step 3/3  loss").is_some(), "the opened run's last step is in the log");
    assert!(h.query_by_label_contains("done at step 3 of 3").is_some());
    assert_eq!(h.query_all_by_label_contains("/400  loss").count(), 0, "no line of the live run");
    assert!(h.query_by_label_contains("starting a run of").is_none(), "no line of the live run");
    click(&mut h, "Back to the live run");
    assert!(h.query_all_by_label_contains("/400  loss").count() >= 2, "the live log is back");
    h.state_mut().act(Action::Stop, &ctx);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
}

#[test]
fn gui_the_log_keeps_its_newest_line_in_view() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "logview");
    wait_loaded(&mut h);
    go(&mut h, Page::Monitor);
    let height = 820.0;
    let t = &mut h.state_mut().state.training;
    t.phase = Phase::Done;
    for i in 1..=100 {
        t.push_log(format!("old line {i}"));
    }
    settle(&mut h);
    let in_view = |h: &Harness<'static, StudioApp>, line: &str| h.get_by_label(line).rect().bottom() <= height;
    assert!(in_view(&h, "old line 100"));
    // Each new line, as steps arrive, in the frame that shows it (the window may not draw
    // another for a while).
    for i in 1..=5 {
        h.state_mut().state.training.push_log(format!("new line {i}"));
        h.step();
        assert!(in_view(&h, &format!("new line {i}")), "line {i} is in view in its first frame");
    }
    // After another page, the lines that came meanwhile.
    go(&mut h, Page::Dataset);
    for i in 6..=40 {
        h.state_mut().state.training.push_log(format!("new line {i}"));
    }
    go(&mut h, Page::Monitor);
    h.step();
    assert!(in_view(&h, "new line 40"), "back on the page, the newest line is in view");
}

#[test]
fn gui_too_many_bad_rows_is_said_once_at_the_field_it_concerns() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "badrows");
    wait_loaded(&mut h);
    let data = fixed_dir("badrows-data").join("tickets.jsonl");
    let mut rows = String::new();
    for i in 0..16 {
        rows.push_str(&format!("{{\"instruction\": \"Question {i}?\", \"input\": \"\", \"output\": \"Answer {i}.\"}}\n"));
    }
    for i in 16..20 {
        rows.push_str(&format!("{{\"instruction\": \"Question {i}?\", \"input\": \"\"}}\n"));
    }
    std::fs::write(&data, rows).unwrap();
    h.state_mut().state.config.dataset.path = data;
    go(&mut h, Page::Dataset);
    wait_for(&mut h, "the dataset report", 60, |a| a.state.dataset.view.ready().is_some_and(|v| v.rows_total == 20));
    settle(&mut h);
    let s = &h.state().state;
    let problems = s.problems();
    let why = &problems["dataset.max_bad_fraction"][0];
    assert!(why.starts_with("4 of 20 rows (20.0%) cannot be used"), "{why}");
    assert!(!problems.contains_key("dataset.path"), "the file is readable: the share of bad rows is the problem");
    assert!(s.notices.is_empty());
    // Once at the field the person would change ("Max unusable rows"), once (one line) in the
    // status bar; the rows themselves are listed.
    let shown: Vec<_> = h.query_all_by_label_contains("cannot be used, more than").collect();
    assert_eq!(shown.len(), 2, "{:?}", shown.iter().map(|n| n.accesskit_node().label()).collect::<Vec<_>>());
    let field = h.query_all_by_label("Max unusable rows").next().unwrap().rect();
    let at_field = h.get_by_label(&format!("⚠ {why}")).rect();
    assert!(at_field.top() < field.bottom() && at_field.bottom() > field.top(), "the message is on the field's row");
    let status = h.get_by_label_contains("Start is disabled: Max unusable rows (dataset.max_bad_fraction): 4 of 20 rows").rect();
    assert!(status.height() < 24.0, "the status bar stays one line: {status:?}");
    // Listed by the line they are on, as SkippedRow::place says it for every file kind.
    for line in 17..=20 {
        assert!(h.query_by_label(&format!("line {line}")).is_some(), "skipped row on line {line} is listed");
    }
    assert!(disabled(&h, "▶ Start"));
    assert!(h.query_by_label("not ready").is_some(), "the toolbar does not say ready while Start is disabled");
}

#[test]
fn gui_unsaved_edits_and_a_running_run_are_asked_about() {
    let _g = serial();
    // A config of the person's own, with their comments.
    let demo = demo_config();
    let mine = demo.with_file_name("mine.toml");
    std::fs::copy(&demo, &mine).unwrap();
    let mut h = studio(Some(mine.clone()), "asks");
    wait_loaded(&mut h);
    h.state_mut().state.config.optim.lr = 1e-3;
    h.step();
    // Ctrl+O with edits asks first; Cancel keeps everything.
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::O);
    settle(&mut h);
    assert!(h.query_by_label("Unsaved edits").is_some(), "Ctrl+O asks about the edits");
    assert_eq!(h.state().jobs_running(), 0, "no file chooser before the answer");
    click(&mut h, "Cancel");
    assert!(h.state().state.confirm.is_none() && h.state().state.config.optim.lr == 1e-3);
    // Opening the demo asks too; discarding opens it.
    click(&mut h, "File");
    click(&mut h, "Open the demo");
    assert!(h.query_by_label("Unsaved edits").is_some());
    click(&mut h, "Discard the edits");
    assert!(h.state().state.config_is_demo && h.state().state.confirm.is_none());
    // Back to mine: Ctrl+S writes the edit and keeps the file's comments and spelling.
    let ctx = h.ctx.clone();
    h.state_mut().act(Action::LoadConfig(mine.clone()), &ctx);
    assert!(h.state().state.confirm.is_none(), "nothing to ask: the demo was not edited");
    h.state_mut().state.config.optim.lr = 1e-3;
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::S);
    h.step();
    let saved = std::fs::read_to_string(&mine).unwrap();
    assert!(saved.starts_with("# The demo run: QLoRA on the tiny base model"), "{saved}");
    assert!(saved.contains("lr = 0.001") && !saved.contains("lr = 2e-3"), "{saved}");
    assert!(saved.contains("path = \"model\"") && saved.contains("alpha = 16\n"), "unchanged values keep their spelling: {saved}");
    assert!(!h.state().state.has_unsaved_edits());

    // Quitting while a run trains asks; "Keep training" keeps it.
    h.state_mut().state.config.train.max_steps = Some(400);
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "two steps", 180, |a| a.state.training.metrics.len() >= 2);
    click(&mut h, "File");
    click(&mut h, "Quit");
    assert!(h.query_by_label("A run is training").is_some(), "quitting during a run asks");
    click(&mut h, "Keep training");
    assert!(h.state().state.training.phase.is_active() && h.state().state.confirm.is_none());
    click(&mut h, "File");
    click(&mut h, "Quit");
    click(&mut h, "Stop, save and quit");
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    let t = &h.state().state.training;
    assert_eq!(t.phase, Phase::Stopped, "{:?}", t.failure);
    assert!(t.run_dir().unwrap().join("adapter/adapter_model.safetensors").is_file(), "the adapter is saved before the window closes");
    // The step limit set above is an unsaved edit: that is asked about before the window goes.
    settle(&mut h);
    assert!(h.query_by_label("Unsaved edits").is_some(), "closing with an edited config asks");
    // Clicked by hand: the close command is in the output of the frame that takes the click.
    h.get_by_label("Discard the edits").click();
    let closes =
        |h: &Harness<'static, StudioApp>| h.output().viewport_output.values().any(|v| v.commands.contains(&egui::ViewportCommand::Close));
    let mut closed = false;
    for _ in 0..3 {
        h.step();
        closed |= closes(&h);
    }
    assert!(closed, "the window closes once the run has stopped and the edits are answered for");
}

/// The chat's message field: the last multi-line field on the page (the system message and the
/// stop strings are multi-line too, above it). Not found by its hint: egui drops the hint from the
/// accessibility tree once the field holds text.
fn chat_input<'a>(h: &'a Harness<'static, StudioApp>) -> egui_kittest::Node<'a> {
    h.query_all_by_role(egui::accesskit::Role::MultilineTextInput).last().expect("the chat's message field")
}

/// Type a message into the chat and press Enter, as a person would.
fn say(h: &mut Harness<'static, StudioApp>, text: &str) {
    settle(h);
    chat_input(h).focus();
    h.step();
    chat_input(h).type_text(text);
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
}

fn wait_answered(h: &mut Harness<'static, StudioApp>, turns: usize) {
    wait_for(h, "the answer", 180, |a| {
        let c = &a.state.chat;
        c.turns.len() == turns && !c.answering && c.turns.iter().all(|t| t.answers.iter().all(|x| x.finish.is_some()))
    });
    if let Some(e) = &h.state().state.chat.error {
        panic!("the answer failed: {e}");
    }
}

#[test]
fn gui_chat_streams_the_fine_tuned_and_the_base_answer_side_by_side() {
    use std::sync::atomic::AtomicBool;
    use tunestudio::generate::conversation::{Answerers, Conversation};

    let _g = serial();
    let mut h = studio(None, "chat");
    wait_loaded(&mut h);
    // The Model page's model with an adapter that changes its answers (it trains a token row too).
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/demo_adapter");
    h.state_mut().state.config.model.adapter = Some(adapter);
    h.step();
    go(&mut h, Page::Chat);
    assert_eq!(h.state().state.chat.model, Load::Empty, "nothing is loaded before it is needed");
    click(&mut h, "System message and sampling");
    click(&mut h, "Greedy");
    h.state_mut().state.chat.params.max_new_tokens = 24;
    click(&mut h, "Side by side with the base model");
    assert!(h.state().state.chat.side_by_side);

    let question = "What is the capital of France?";
    say(&mut h, question);
    // The first message loads the model; it stays in the field until the model is ready to take it.
    assert!(h.state().state.chat.send_when_loaded && h.state().state.chat.model.is_loading(), "Enter sent the message");
    wait_answered(&mut h, 1);
    settle(&mut h);
    assert!(chat_input(&h).value().unwrap_or_default().is_empty(), "the sent message left the field");
    let c = &h.state().state.chat;
    let loaded = c.model.ready().expect("the model loaded on the first message");
    assert!(loaded.has_adapter);
    let turn = &c.turns[0];
    assert_eq!(turn.user, question);
    assert_eq!((turn.answers[0].who, turn.answers[1].who), ("fine-tuned", "base"));

    // What streamed is what the generator answers to the same requests, and the adapter shows.
    let source = c.source(&h.state().state.config);
    let opts = source.load_options().unwrap();
    let mut g = tunestudio::generate::Generator::open(tunestudio::backend::cpu::CpuBackend::<f32>::new(), &opts).unwrap();
    let reqs = Conversation::new(None).requests(question, Answerers::Both, &c.params, &[]);
    let want = g.generate(&reqs, &AtomicBool::new(false), &mut |_| {}).unwrap();
    for (shown, want) in turn.answers.iter().zip(&want) {
        assert_eq!(shown.text, want.text, "{} answer", shown.who);
        assert_eq!(shown.tokens, want.tokens.len());
        assert!(!shown.text.is_empty());
    }
    assert_ne!(want[0].text, want[1].text, "the adapter changes the answer");
    settle(&mut h);
    assert!(h.query_by_label_contains(&want[1].text).is_some(), "the base answer is on screen");
    assert!(h.query_all_by_label_contains("tokens/s").count() >= 2, "each answer says its speed");

    // The next turn continues each model's own conversation, reusing what the cache holds.
    say(&mut h, "And of Spain?");
    wait_answered(&mut h, 2);
    let t2 = &h.state().state.chat.turns[1];
    assert!(t2.answers.iter().all(|a| a.cached_tokens > 0 && a.cached_tokens < a.prompt_tokens), "{t2:?}");

    // Copy puts the whole conversation on the clipboard (in the output of the frame of the click).
    settle(&mut h);
    let transcript = h.state().state.chat.transcript();
    assert!(transcript.contains("And of Spain?") && transcript.contains("Assistant (base): "), "{transcript}");
    h.get_by_label("Copy").click();
    let mut copied = false;
    for _ in 0..3 {
        h.step();
        copied |= h.output().platform_output.commands.contains(&egui::OutputCommand::CopyText(transcript.clone()));
    }
    assert!(copied, "Copy puts the conversation on the clipboard");
    click(&mut h, "New chat");
    assert!(h.state().state.chat.turns.is_empty());
}

#[test]
fn gui_chat_with_a_paused_run_answers_from_its_newest_checkpoint() {
    let _g = serial();
    let mut h = studio(None, "chat-run");
    wait_loaded(&mut h);
    h.state_mut().state.config.train.max_steps = Some(400);
    h.state_mut().state.config.train.save_every = 2;
    h.state_mut().state.config.output.run_name = "chat-run".into();
    let ctx = h.ctx.clone();
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "a checkpoint", 180, |a| a.state.training.last_checkpoint.is_some());
    click(&mut h, "⏸ Pause");
    wait_for(&mut h, "the pause", 60, |a| a.state.training.phase == Phase::Paused);
    let at = steps(&h);
    let run_dir = h.state().state.training.run_dir().unwrap().to_path_buf();
    click(&mut h, "Chat with it");
    assert_eq!(h.state().state.page, Page::Chat);
    assert_eq!(h.state().state.chat.run.as_deref(), Some(run_dir.as_path()));
    h.state_mut().state.chat.params = tunestudio::generate::SamplingParams::greedy(16);
    say(&mut h, "Hello there");
    wait_answered(&mut h, 1);
    let m = h.state().state.chat.model.ready().unwrap();
    let newest = tunestudio::session::checkpoint::list(&run_dir).last().copied().unwrap();
    assert_eq!(m.adapter.as_deref(), Some(tunestudio::session::checkpoint::step_dir(&run_dir, newest).as_path()));
    assert!(m.has_adapter);
    // What answers, in one line without parentheses in parentheses (it read "loaded run (newest
    // checkpoint) on CPU (f32, 2 threads) (with the adapter, 0.0 s)").
    settle(&mut h);
    let node = h.get_by_label_contains("loaded ");
    let line = node.accesskit_node().value().or(node.accesskit_node().label()).unwrap_or_default().to_string();
    assert!(line.contains(" at its newest checkpoint · ") && line.contains(" · with the adapter · "), "{line}");
    assert!(paren_depth(&line) <= 1 && line.matches('(').count() <= 1, "{line}");
    assert_eq!(h.state().state.training.phase, Phase::Paused, "chatting leaves the run paused");
    assert_eq!(steps(&h), at);
    click(&mut h, "⏵ Resume");
    wait_for(&mut h, "a step after resuming", 60, |a| a.state.training.metrics.last().is_some_and(|m| m.step > at));
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::F5);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
}

#[test]
fn gui_hyperparameters_fit_narrow_windows() {
    let _g = serial();
    for width in [640.0, 900.0] {
        let mut h = studio_sized(Some(demo_config()), "narrow", [width, 820.0]);
        wait_loaded(&mut h);
        h.state_mut().state.budget.card = Card::profile("rtx4090");
        go(&mut h, Page::Hyper);
        wait_budget(&mut h);
        // Nothing reaches past the window's right edge (there is no horizontal scrolling)...
        let cut: Vec<String> = h
            .query_all_by(|n| n.bounding_box().is_some())
            .filter(|n| n.rect().right() > width + 0.5 && n.rect().width() > 0.0)
            .map(|n| format!("{:?} {:?} {:?}", n.accesskit_node().role(), n.accesskit_node().label(), n.rect()))
            .collect();
        assert!(cut.is_empty(), "at {width} px, cut off at the right: {cut:#?}");
        // ...and no two checkboxes are drawn over each other.
        let boxes: Vec<(String, egui::Rect)> = h
            .query_all_by_role(egui::accesskit::Role::CheckBox)
            .map(|n| (n.accesskit_node().label().unwrap_or_default(), n.rect()))
            .collect();
        assert!(boxes.len() >= 9, "the seven targets, rsLoRA and the step limit: {boxes:?}");
        for (i, (a, ra)) in boxes.iter().enumerate() {
            for (b, rb) in &boxes[i + 1..] {
                let overlap = ra.intersect(*rb);
                assert!(overlap.width() <= 0.5 || overlap.height() <= 0.5, "at {width} px, {a:?} {ra:?} overlaps {b:?} {rb:?}");
            }
        }
        for label in ["Memory budget", "Runs folder", "Checkpoint every"] {
            assert!(h.query_all_by_label(label).next().is_some(), "{label} is on the page at {width} px");
        }
    }
}

#[test]
fn gui_models_in_the_hugging_face_cache_and_named_shapes() {
    let _g = serial();
    // A hub cache holding the demo model as a download would leave it.
    let entry = fixed_dir("hfcache-hf-cache").join("models--tunestudio--demo-llama");
    let snapshot = entry.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd").unwrap();
    let demo_model = demo_config().with_file_name("model");
    for e in std::fs::read_dir(&demo_model).unwrap().flatten() {
        std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
    }
    let opts = StudioOptions {
        config: Some(demo_config()),
        settings_dir: fixed_dir("hfcache-settings"),
        output_dir: Some(fixed_dir("hfcache-runs")),
        hf_cache: Some(entry.parent().unwrap().to_path_buf()),
    };
    let mut h = Harness::builder().with_size([1280.0, 820.0]).wgpu().build_eframe(move |cc| StudioApp::new(cc, opts));
    wait_loaded(&mut h);
    settle(&mut h);
    click(&mut h, "tunestudio/demo-llama");
    assert_eq!(h.state().state.config.model.path, snapshot, "the cached snapshot is the model folder");
    wait_for(&mut h, "the cached model", 60, |a| a.state.model.info.ready().is_some_and(|i| i.path == a.state.config.model.path));
    // The dataset is read again with the new model's tokenizer (after a debounce); the batch's
    // bound needs its rows.
    wait_for(&mut h, "the dataset's new reading", 60, |a| matches!(a.state.dataset.view, Load::Loading));
    wait_loaded(&mut h);

    // Plan a model that is not on disk from its named shape.
    h.state_mut().state.budget.card = Card::profile("rtx4090");
    go(&mut h, Page::Hyper);
    click(&mut h, "Plan for");
    click(&mut h, "llama3-8b");
    assert_eq!(h.state().state.budget.shape.as_deref(), Some("llama3-8b"));
    settle(&mut h);
    let s = &h.state().state;
    let target = budget::target(Card::profile("rtx4090"), &s.config, None);
    let want = budget::verdict(&budget::view(&tunestudio::model::ModelSpec::llama3_8b(), &s.config, &target, None, 0)).0;
    assert!(h.query_by_label(&want).is_some(), "the plan is the 8B shape's: {want}");
    // "Largest that fits" stops at the data and the linears, not at the search's end.
    wait_budget(&mut h);
    let f = h.state().state.budget.fixes.as_ref().unwrap().1.clone();
    assert_eq!(f.batch_cap, 350, "the demo's 350 rows, one per sequence, no accumulation");
    assert!(f.batch_size.unwrap() <= 350 && f.lora_r.unwrap() <= 1024);
}

#[test]
fn gui_runs_side_by_side_named_compared_renamed_and_remembered_across_folders() {
    let _g = serial();
    let mut h = studio_sized(Some(demo_config()), "compare", [1280.0, 900.0]);
    wait_loaded(&mut h);
    let ctx = h.ctx.clone();
    let train = |h: &mut Harness<'static, StudioApp>, out: PathBuf, lr: f64| {
        let c = &mut h.state_mut().state.config;
        c.output.dir = out;
        c.output.run_name = String::new();
        c.optim.lr = lr;
        c.train.max_steps = Some(3);
        h.state_mut().act(Action::ConfirmStart, &ctx);
        wait_for(h, "a short run", 180, |a| a.state.training.phase == Phase::Done);
        h.state().state.training.run_dir().unwrap().to_path_buf()
    };
    let first = train(&mut h, fixed_dir("compare-runs-a"), 2e-3);
    let second = train(&mut h, fixed_dir("compare-runs-b"), 5e-4);
    let name = |d: &Path| d.file_name().unwrap().to_string_lossy().to_string();
    assert!(name(&first).starts_with("demo-train-"), "named after the model and the dataset: {}", name(&first));

    // A config whose output folder holds no run still lists the runs of both folders trained into.
    h.state_mut().state.config.output.dir = fixed_dir("compare-runs-empty");
    go(&mut h, Page::Runs);
    wait_for(&mut h, "both runs", 30, |a| a.state.runs.records.ready().is_some_and(|r| r.len() == 2));
    settle(&mut h);
    for header in ["Dataset", "Rows", "lr", "r", "α", "Loss", "Best eval", "Tokens/s", "Peak memory"] {
        assert!(h.query_all_by_label(header).count() >= 1, "column {header}");
    }
    assert_eq!(h.query_all_by_label("train.jsonl").count(), 2, "each run's dataset");
    assert!(h.query_by_label("2.0e-3").is_some() && h.query_by_label("5.0e-4").is_some(), "each run's lr");
    let records = h.state().state.runs.records.ready().unwrap().clone();
    for r in &records {
        let s = &r.summary;
        assert!(s.rows.is_some_and(|n| n > 0) && s.smoothed_loss.is_some() && s.tokens_per_s.is_some() && s.peak_memory.is_some(), "{s:?}");
    }

    // Tick both, compare: two overlaid curves and the keys that differ.
    assert_eq!(h.query_all_by_role(egui::accesskit::Role::CheckBox).count(), 2);
    for i in 0..2 {
        h.query_all_by_role(egui::accesskit::Role::CheckBox).nth(i).unwrap().click();
        settle(&mut h);
    }
    assert_eq!(h.state().state.runs.selected.len(), 2);
    click(&mut h, "Compare 2 selected");
    wait_for(&mut h, "the comparison", 30, |a| a.state.runs.comparison.as_ref().is_some_and(|c| c.ready().is_some()));
    settle(&mut h);
    let c = h.state().state.runs.comparison.as_ref().unwrap().ready().unwrap().clone();
    assert_eq!(c.runs.len(), 2);
    assert!(c.runs.iter().all(|r| r.loss_smooth.len() == 3));
    assert_ne!(c.runs[0].name, c.runs[1].name, "the legend tells the runs apart");
    let keys: Vec<&str> = c.diff.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"optim.lr") && keys.contains(&"output.dir"), "{keys:?}");
    assert!(!keys.contains(&"lora.r"), "equal values are not listed: {keys:?}");
    assert!(h.query_by_label("optim.lr").is_some(), "the diff is on screen");
    if let Ok(p) = std::env::var("LOOK_AT") {
        h.render().unwrap().save(p).unwrap();
    }

    // Rename the first run: click ✏ on its row, type, Enter.
    let row = records.iter().position(|r| r.dir == first).unwrap();
    h.query_all_by_label("✏").nth(row).unwrap().click();
    settle(&mut h);
    h.state_mut().state.runs.renaming.as_mut().unwrap().1 = "lr-2e-3 baseline".into();
    h.step();
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the renamed run", 30, |a| {
        a.state.runs.records.ready().is_some_and(|r| r.iter().any(|r| r.name == "lr-2e-3 baseline"))
    });
    assert!(first.with_file_name("lr-2e-3 baseline").join("run.json").is_file() && !first.exists());
    // A name that would leave the folder is refused with a line that says why.
    h.state_mut().act(Action::RenameRun(second.clone(), "../x".into()), &ctx);
    wait_for(&mut h, "the refusal", 30, |a| !a.state.notices.is_empty());
    assert!(h.state().state.notices[0].text.contains("without / or \\"), "{:?}", h.state().state.notices);
    assert!(second.exists());
}

#[test]
fn gui_eval_loss_is_drawn_with_the_training_loss_and_the_best_is_marked() {
    let _g = serial();
    let mut h = studio_sized(Some(demo_config()), "eval", [1280.0, 900.0]);
    wait_loaded(&mut h);
    let ctx = h.ctx.clone();
    // Without evaluation rows the evaluation settings would do nothing: they are disabled.
    go(&mut h, Page::Hyper);
    settle(&mut h);
    assert!(h.query_all_by_label("Evaluate every").any(|n| n.accesskit_node().is_disabled()));

    // A run with no evaluation rows draws no evaluation curve.
    let train = |h: &mut Harness<'static, StudioApp>, name: &str| {
        let c = &mut h.state_mut().state.config;
        c.output.run_name = name.into();
        c.train.max_steps = Some(5);
        h.state_mut().act(Action::ConfirmStart, &ctx);
        wait_for(h, "a short run", 180, |a| a.state.training.phase == Phase::Done);
        settle(h);
    };
    train(&mut h, "without-eval");
    assert!(h.query_by_label("smoothed").is_some(), "the loss plot's legend is there");
    assert!(h.query_by_label("eval loss").is_none() && h.query_by_label_contains("best eval loss").is_none());

    // Hold out a tenth of the rows (the Dataset page's field), evaluate every 2 steps.
    h.state_mut().state.config.dataset.eval_split = Some(tunestudio::config::EvalSplit::Fraction(0.1));
    go(&mut h, Page::Dataset);
    settle(&mut h);
    assert!(h.query_by_label("of the rows").is_some(), "the fraction's field is drawn");
    let combo = h.query_all_by_label("Evaluation rows").find(|n| n.accesskit_node().role() == egui::accesskit::Role::ComboBox);
    assert_eq!(combo.and_then(|n| n.accesskit_node().value()).as_deref(), Some("hold out a fraction"));
    go(&mut h, Page::Hyper);
    settle(&mut h);
    assert!(h.query_all_by_label("Evaluate every").all(|n| !n.accesskit_node().is_disabled()));
    h.state_mut().state.config.train.eval_every = 2;
    train(&mut h, "with-eval");
    assert_eq!(h.state().state.page, Page::Monitor);

    // The evaluation loss is in the loss plot's legend beside the training loss, with the best
    // marked there and named above the plot.
    let metrics = h.state().state.training.metrics.clone();
    let evals: Vec<(u64, f64)> = metrics.iter().filter_map(|m| Some((m.step, m.eval_loss?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4, 5]);
    assert!(h.query_by_label("smoothed").is_some() && h.query_by_label("eval loss").is_some() && h.query_by_label("best eval").is_some());
    let best = evals.iter().copied().fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    let label = format!("best eval loss {:.4} at step {}", best.1, best.0);
    assert!(h.query_by_label(&label).is_some(), "{label} is shown");
    let log = &h.state().state.training.log;
    assert!(log.iter().any(|l| l.starts_with("holding out 35 rows")), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("best eval loss") && l.contains(&format!("step-{:06}", best.0))), "{log:?}");
    if let Ok(p) = std::env::var("LOOK_AT") {
        h.render().unwrap().save(p).unwrap();
    }
}

#[test]
fn gui_smaller_faults_of_issue_17_stay_fixed() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "smaller");
    wait_loaded(&mut h);
    let ctx = h.ctx.clone();

    // Before any run the Training page says what will be plotted instead of drawing empty axes.
    go(&mut h, Page::Monitor);
    settle(&mut h);
    assert!(h.query_by_label_contains("are plotted here from the first step on").is_some());
    assert!(h.query_by_label("smoothed").is_none(), "no loss plot (its legend) before the first step");

    // What was said about one config goes when another is loaded.
    h.state_mut().act(Action::LoadConfig(fixed_dir("smaller-gone").join("missing.toml")), &ctx);
    settle(&mut h);
    assert!(h.query_by_label_contains("Could not open the config").is_some());
    h.state_mut().act(Action::LoadConfig(demo_config()), &ctx);
    settle(&mut h);
    assert!(h.state().state.notices.is_empty() && h.query_by_label_contains("Could not open the config").is_none());
    wait_loaded(&mut h);

    // A model folder that is not there says what to choose, not "(os error 2)".
    h.state_mut().state.config.model.path = fixed_dir("smaller-models").join("no-such-model");
    wait_for(&mut h, "the model check", 60, |a| matches!(a.state.model.info, Load::Failed(_)) && a.jobs_running() == 0);
    click(&mut h, "⚠ Model");
    assert_eq!(h.state().state.page, Page::Model, "the page with the problem is flagged");
    // At the field and in the status bar's one line, no more.
    let said = h.query_all_by_label_contains("does not exist: choose a Hugging Face model folder").count();
    assert!((1..=2).contains(&said), "said {said} times");
    assert_eq!(h.query_all_by_label_contains("os error").count(), 0);

    // 600 steps over 95 rows: the preflight warns before the run starts (issue 17 fault 9).
    let demo_model = h.state().state.saved_config.model.path.clone();
    h.state_mut().state.config.model.path = demo_model;
    wait_loaded(&mut h);
    let data = fixed_dir("smaller-data").join("small.jsonl");
    let rows: Vec<String> =
        std::fs::read_to_string(&h.state().state.config.dataset.path).unwrap().lines().take(95).map(String::from).collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    h.state_mut().state.config.dataset.path = data;
    h.state_mut().state.config.train.max_steps = Some(600);
    wait_loaded(&mut h);
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    let node = h.get_by_label_contains("epochs over 95 rows");
    let warning = node.accesskit_node().value().or(node.accesskit_node().label()).unwrap_or_default().to_string();
    assert!(warning.contains("600 steps are about 50 epochs over 95 rows") && warning.contains("dataset.eval_split"), "{warning}");
    assert!(h.state().state.training.phase == Phase::Idle, "nothing starts before the dialog is answered");
}

#[test]
fn gui_samples_are_set_on_the_hyperparameters_page_and_read_on_the_training_page() {
    use tunestudio::session::Event;
    use tunestudio::session::samples::Sample;
    let _g = serial();
    let mut h = studio(Some(demo_config()), "samples");
    wait_loaded(&mut h);

    // The Samples group edits [samples]; its other fields wait until samples are on.
    go(&mut h, Page::Hyper);
    settle(&mut h);
    assert_eq!(h.state().state.config.samples.every, 0);
    assert!(disabled(&h, "Sample length") && disabled(&h, "Sample rows"), "off: nothing else to set");
    assert!(h.query_by_label_contains("samples during training").is_none(), "off: nothing of them in the memory budget");
    h.get_by_label("Samples every").set_value_accesskit(20.0);
    h.step();
    h.step();
    assert_eq!(h.state().state.config.samples.every, 20);
    settle(&mut h);
    // The sampler's memory (its copy of the model, the prompts' cache) is in the budget.
    assert!(h.query_by_label_contains("■ samples during training").is_some(), "the memory budget shows the samples' share");
    assert!(!disabled(&h, "Sample length") && !disabled(&h, "Sample rows"));
    h.get_by_label("Sample length").set_value_accesskit(64.0);
    h.step();
    assert_eq!(h.state().state.config.samples.max_new_tokens, 64);
    // Typed prompts, one per line, replace the dataset rows.
    h.get_by_label("Sample prompts").focus();
    h.step();
    h.get_by_label("Sample prompts").type_text("Where can you find the frostling?");
    h.step();
    h.key_press(egui::Key::Enter);
    h.step();
    h.get_by_label("Sample prompts").type_text("Describe the marrowbat.");
    h.step();
    settle(&mut h);
    assert_eq!(h.state().state.config.samples.prompts, ["Where can you find the frostling?", "Describe the marrowbat."]);
    assert!(disabled(&h, "Sample rows"), "typed prompts: no rows to count");
    // A value out of range is marked in place and stops a start, naming the field.
    h.get_by_label("Sample length").set_value_accesskit(0.0);
    settle(&mut h);
    assert!(h.query_by_label_contains("⚠ is 0: give the longest answer in tokens, 1 to 4096").is_some());
    assert!(disabled(&h, "▶ Start"));
    h.get_by_label("Sample length").set_value_accesskit(64.0);
    settle(&mut h);
    assert!(!disabled(&h, "▶ Start"));

    // The Training page: the newest answer of each prompt with its step, an earlier step to pick.
    go(&mut h, Page::Monitor);
    let t = &mut h.state_mut().state.training;
    t.phase = Phase::Running;
    let answers = |step: u64, a: &str, b: &str| Event::Samples {
        step,
        secs: 0.31,
        samples: vec![
            Sample { step, prompt: "Where can you find the frostling?".into(), completion: a.into() },
            Sample { step, prompt: "Describe the marrowbat.".into(), completion: b.into() },
        ],
    };
    t.apply(answers(20, "In the cold.", "It is small."));
    t.apply(answers(40, "The frostling lives in the north.", "The marrowbat is black in colour."));
    settle(&mut h);
    for shown in ["The frostling lives in the north.", "The marrowbat is black in colour."] {
        assert!(h.query_by_label(shown).is_some(), "the newest answer {shown:?} is shown");
    }
    assert!(h.query_by_label("In the cold.").is_none(), "an older answer is not shown unless picked");
    assert!(
        h.query_by_label_contains("answered in 0.3 s, not counted in the elapsed time or the ETA").is_some(),
        "the time the samples took is said apart from the training's"
    );
    assert_eq!(h.query_all_by_label("step 40").count(), 2, "each answer says its step");
    h.get_by_role(egui::accesskit::Role::ComboBox).click();
    h.step();
    h.step();
    settle(&mut h);
    click(&mut h, "20");
    settle(&mut h);
    assert_eq!(h.state().state.training.samples.step, Some(20));
    for shown in ["In the cold.", "It is small."] {
        assert!(h.query_by_label(shown).is_some(), "the answer {shown:?} of step 20 is shown once picked");
    }
    assert!(h.query_by_label("The frostling lives in the north.").is_none());
    assert_eq!(h.query_all_by_label("step 20").count(), 2);
}

/// Every text painted in the last frame, with where it starts.
fn painted_texts(h: &Harness<'static, StudioApp>) -> Vec<(String, egui::Pos2)> {
    fn walk(s: &egui::Shape, out: &mut Vec<(String, egui::Pos2)>) {
        match s {
            egui::Shape::Text(t) => out.push((t.galley.text().to_string(), t.pos)),
            egui::Shape::Vec(v) => v.iter().for_each(|s| walk(s, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for c in &h.output().shapes {
        walk(&c.shape, &mut out);
    }
    out
}

/// A finished run of `n` steps with smooth made-up metrics, on the Training page.
fn fixed_run(h: &mut Harness<'static, StudioApp>, n: u64) {
    let t = &mut h.state_mut().state.training;
    t.phase = Phase::Done;
    t.metrics.clear();
    for i in 1..=n {
        let x = i as f64;
        t.metrics.push(StepMetrics {
            step: i,
            total_steps: n,
            epoch: x / 45.0,
            // From 2 down to 0.45, as the demo's: egui_plot's powers of ten labelled only "1".
            loss: 1.55 * (-x / (n as f64 / 3.0)).exp() + 0.45,
            lr: 2e-3 * (1.0 - x / n as f64),
            grad_norm: 1.5 * (-x / 30.0).exp() + 0.3,
            tokens: 2048,
            trained_tokens: 700,
            // As the demo swings on a busy 2-core machine: 1,300 to 7,000 tokens/s.
            tokens_per_s: 4150.0 + 2850.0 * (x * 0.7).sin(),
            elapsed_s: x * 0.5,
            eta_s: (n as f64 - x) * 0.5,
            memory_bytes: Some((300 << 20) + (i << 12)),
            eval_loss: None,
        });
    }
}

#[test]
fn gui_small_plots_keep_their_step_labels_as_the_run_grows() {
    let _g = serial();
    for width in [1280.0, 900.0] {
        let mut h = studio_sized(Some(demo_config()), "ticks", [width, 820.0]);
        wait_loaded(&mut h);
        go(&mut h, Page::Monitor);
        // egui_plot's own grid left these plots one label (0) or none from about 60 to 200 steps
        // and again from 600 to 2000 (seen under Xvfb at 1600 px).
        for n in [12, 60, 150, 700, 1500] {
            fixed_run(&mut h, n);
            settle(&mut h);
            let texts = painted_texts(&h);
            let (loss, below) = (h.get_by_label("Loss").rect(), h.get_by_label("Learning rate").rect().top());
            let loss_labels: Vec<&String> = texts
                .iter()
                .filter(|(t, p)| t.parse::<f64>().is_ok() && p.x >= loss.left() - 2.0 && p.x < loss.left() + 40.0)
                .filter(|(_, p)| p.y > loss.bottom() && p.y < below - 30.0)
                .map(|(t, _)| t)
                .collect();
            assert!(loss_labels.len() >= 3, "at {width} px, {n} steps: the loss plot's y axis has the labels {loss_labels:?}");
            for title in ["Learning rate", "Gradient norm", "Tokens / s"] {
                let r = h.get_by_label(title).rect();
                // The x axis's labels: whole numbers on one line under the plot's area.
                let mut rows: Vec<(f32, Vec<i64>)> = Vec::new();
                for (text, pos) in &texts {
                    let Ok(v) = text.parse::<i64>() else { continue };
                    if pos.x < r.left() - 2.0
                        || pos.x > r.left() + (width - 172.0) / 4.0
                        || pos.y < r.bottom()
                        || pos.y > r.bottom() + 140.0
                    {
                        continue;
                    }
                    match rows.iter_mut().find(|(y, _)| (y - pos.y).abs() < 0.5) {
                        Some((_, vs)) => vs.push(v),
                        None => rows.push((pos.y, vec![v])),
                    }
                }
                let (axis_y, labels) = rows.iter().cloned().max_by_key(|(_, v)| v.len()).unwrap_or_default();
                assert!(labels.len() >= 2, "at {width} px, {n} steps: the {title} plot's x axis has the labels {labels:?}; rows {rows:?}");
                assert!(labels.iter().all(|&v| v >= 0 && v <= n as i64 + n as i64 / 10 + 1), "{title}, {n} steps: {labels:?}");
                // The y axis's labels: numbers at the plot's left edge, above the x axis. With
                // egui_plot's powers of ten the tokens/s plot had none, the gradient norm "1".
                let y_labels: Vec<&String> = texts
                    .iter()
                    .filter(|(t, p)| t.parse::<f64>().is_ok() && p.x >= r.left() - 2.0 && p.x < r.left() + 60.0)
                    .filter(|(_, p)| p.y > r.bottom() && p.y < axis_y - 1.0)
                    .map(|(t, _)| t)
                    .collect();
                assert!(y_labels.len() >= 2, "at {width} px, {n} steps: the {title} plot's y axis has the labels {y_labels:?}");
            }
        }
    }
}

#[test]
fn gui_status_bar_and_toolbar_say_what_is_happening() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "status");
    wait_loaded(&mut h);
    settle(&mut h);
    assert!(h.query_by_label("ready").is_some());
    assert!(h.query_by_label("Ready: Ctrl+Enter or F5 checks the run and starts training.").is_some());
    // While the preflight dialog is up Start is disabled, but nothing is wrong: the toolbar said
    // "not ready" and the status bar "Start is disabled: the preflight check is open".
    h.state_mut().state.config.train.max_steps = Some(400);
    click(&mut h, "▶ Start");
    assert!(h.state().state.preflight.open);
    let wrong = |h: &Harness<'static, StudioApp>| {
        h.query_by_label("not ready").is_some() || h.query_by_label_contains("Start is disabled").is_some()
    };
    if h.state().state.preflight.report.is_loading() {
        assert!(h.query_by_label("checking…").is_some(), "the toolbar while the check runs");
        assert!(h.query_by_label_contains("Checking the model, the tokenizer and the data").is_some());
        assert!(!wrong(&h));
    }
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_by_label("checked").is_some(), "the toolbar once the check is done");
    assert!(h.query_by_label("Checked: Enter starts training, Escape goes back.").is_some());
    assert!(!wrong(&h));
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "two steps", 180, |a| a.state.training.metrics.len() >= 2);
    settle(&mut h);
    let training = "Training · Pause F6 · Stop Shift+F5";
    assert!(h.query_by_label(training).is_some());
    // Paused, the status bar says so and names the key that resumes (it went on saying "Pause").
    h.key_press(egui::Key::F6);
    wait_for(&mut h, "the pause", 60, |a| a.state.training.phase == Phase::Paused);
    settle(&mut h);
    let at = steps(&h);
    assert!(h.query_by_label(training).is_none(), "no running words while paused");
    let line = format!("Paused after step {at} · Resume F6 · Stop Shift+F5 · Save now writes a checkpoint");
    assert!(h.query_by_label(&line).is_some(), "{line}");
    assert!(h.query_all_by_label("paused").count() >= 2, "the toolbar and the page's heading");
    assert!(h.query_by_label("⏵ Resume").is_some() && h.query_by_label("⏸ Pause").is_none());
    h.key_press(egui::Key::F6);
    wait_for(&mut h, "the resume", 60, |a| a.state.training.phase == Phase::Running);
    settle(&mut h);
    assert!(h.query_by_label(training).is_some());
    h.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::F5);
    h.step();
    assert!(h.query_by_label_contains("Stopping: finishing the current step").is_some() || !h.state().state.training.phase.is_active());
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    settle(&mut h);
    assert!(h.query_all_by_label("stopped").count() >= 2, "the toolbar and the page's heading");
    assert!(h.query_by_label("Ready: Ctrl+Enter or F5 checks the run and starts training.").is_some());
}

/// The deepest nesting of parentheses in `s`.
fn paren_depth(s: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[test]
fn gui_dataset_and_preflight_words_of_the_second_xvfb_pass() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "words");
    wait_loaded(&mut h);
    // The template in words: it was "template: model".
    go(&mut h, Page::Dataset);
    settle(&mut h);
    assert!(h.query_by_label_contains("Rendered with the model's own chat template · trained: ").is_some());
    assert!(h.query_by_label_contains("template: model").is_none());
    // The rows held out to evaluate on are counted in the summary, as the run will split them.
    assert!(h.query_by_label_contains("350 JSONL rows: 350 used, 0 skipped").is_some(), "no split: no count");
    h.state_mut().state.config.dataset.eval_split = Some(tunestudio::config::EvalSplit::Fraction(0.1));
    wait_for(&mut h, "the dataset's new reading", 60, |a| matches!(a.state.dataset.view, Load::Loading));
    wait_loaded(&mut h);
    settle(&mut h);
    assert!(h.query_by_label_contains("350 used (35 held out to evaluate on, 10%; 315 trained on), 0 skipped").is_some());
    let eval_file = demo_config().with_file_name("data").join("eval.jsonl");
    h.state_mut().state.config.dataset.eval_split = Some(tunestudio::config::EvalSplit::File(eval_file));
    wait_for(&mut h, "the dataset's reading with the file", 60, |a| matches!(a.state.dataset.view, Load::Loading));
    wait_loaded(&mut h);
    settle(&mut h);
    assert!(
        h.query_by_label_contains("350 used, 0 skipped, 0 truncated to 256 tokens · evaluated on the 50 usable rows of eval.jsonl")
            .is_some()
    );
    h.state_mut().state.config.dataset.eval_split = Some(tunestudio::config::EvalSplit::File(fixed_dir("words-none").join("gone.jsonl")));
    wait_for(&mut h, "the dataset's reading with a missing file", 60, |a| matches!(a.state.dataset.view, Load::Loading));
    wait_loaded(&mut h);
    settle(&mut h);
    assert!(h.query_by_label_contains("Evaluation rows (dataset.eval_split): ").is_some(), "a file that is not there is said");
    h.state_mut().state.config.dataset.eval_split = None;
    wait_for(&mut h, "the dataset's reading without a split", 60, |a| matches!(a.state.dataset.view, Load::Loading));
    wait_loaded(&mut h);

    // With a step limit the Epochs field says how many passes it makes (it showed the unused
    // setting, 1.00, for 600 steps): 600 steps of 8 over 350 rows, 44 steps an epoch.
    go(&mut h, Page::Hyper);
    h.state_mut().state.config.train.max_steps = Some(600);
    settle(&mut h);
    assert!(h.query_by_label("≈ 13.6, from the step limit").is_some());
    h.state_mut().state.config.train.max_steps = None;
    settle(&mut h);
    assert!(h.query_by_label("≈ 13.6, from the step limit").is_none());

    // The preflight dialog: the template in words, and a Device line without nested parentheses
    // (it was "CPU (auto: no usable GPU (the NVIDIA driver library (libcuda.so) is not installed): …)").
    h.state_mut().state.config.train.max_steps = Some(2);
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_by_label("✔ Rendered with the model's own chat template.").is_some());
    let device = h.state().state.preflight.report.ready().unwrap().device.clone();
    assert!(h.query_by_label(&device).is_some(), "the Device row is drawn: {device}");
    assert!(device.contains("train.device = auto"), "{device}");
    assert!(paren_depth(&device) <= 1, "{device}");

    // The demo's runs are named after the demo, not after the folders model/ and train.jsonl.
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the short run", 180, |a| a.state.training.phase == Phase::Done);
    let dir = h.state().state.training.run_dir().unwrap().to_path_buf();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("demo-train-2"), "{name}");
}

#[test]
fn gui_a_run_starts_only_with_the_config_its_check_was_shown_for() {
    let _g = serial();
    let mut h = studio(Some(demo_config()), "checked");
    wait_loaded(&mut h);
    click(&mut h, "▶ Start");
    wait_for(&mut h, "the preflight report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_by_label_contains("60 optimizer steps").is_some());
    // A field's edit that lands after the check (under Xvfb: the step limit committed in the frame
    // F5 was pressed; the dialog said 60 steps and the run made 600).
    h.state_mut().state.config.train.max_steps = Some(7);
    h.key_press(egui::Key::Enter);
    h.step();
    assert!(!h.state().state.training.phase.is_active(), "not started with a config the dialog did not show");
    assert!(h.state().state.preflight.open, "checked again");
    wait_for(&mut h, "the new report", 120, |a| a.state.preflight.report.ready().is_some());
    settle(&mut h);
    assert!(h.query_by_label_contains("7 optimizer steps").is_some());
    h.key_press(egui::Key::Enter);
    wait_for(&mut h, "the run", 120, |a| a.state.training.phase == Phase::Done);
    assert_eq!(h.state().state.training.metrics.last().map(|m| m.total_steps), Some(7));
}

/// Issue 13: the samples of a past run opened from the Runs page are shown with their steps, as
/// the live run's are; a resumed run shows those answered before the resume too (the session cut
/// samples.jsonl back to its checkpoint), not only the ones that come after.
#[test]
fn gui_a_past_run_and_a_resumed_run_show_their_earlier_samples() {
    use tunestudio::session::samples;
    let _g = serial();
    let mut h = studio(Some(demo_config()), "past-samples");
    wait_loaded(&mut h);
    let ctx = h.ctx.clone();
    {
        let c = &mut h.state_mut().state.config;
        c.train.max_steps = Some(400);
        c.train.save_every = 2;
        c.samples.every = 2;
        c.samples.prompts = vec!["Where can you find the frostling?".into()];
        c.samples.max_new_tokens = 8;
        c.output.run_name = "sampled".into();
    }
    h.state_mut().act(Action::ConfirmStart, &ctx);
    wait_for(&mut h, "samples and a checkpoint after them", 180, |a| {
        let t = &a.state.training;
        t.samples.steps().len() >= 2 && t.last_checkpoint.as_ref().is_some_and(|c| c.0 >= 4)
    });
    h.state_mut().act(Action::Stop, &ctx);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
    let dir = h.state().state.training.run_dir().unwrap().to_path_buf();
    let written = samples::read(&dir);
    assert!(written.iter().map(|s| s.step).collect::<Vec<_>>().starts_with(&[2, 4]), "{written:?}");

    // Open it as a past run: its samples, the newest shown with its step, an earlier one to pick.
    h.state_mut().act(Action::OpenRun(dir.clone()), &ctx);
    wait_for(&mut h, "the opened run", 30, |a| a.state.training.viewing.is_some());
    settle(&mut h);
    let viewed = &h.state().state.training.viewing.as_ref().unwrap().samples;
    assert_eq!(viewed.samples, written);
    let newest = written.last().unwrap();
    assert!(h.query_by_label(&format!("step {}", newest.step)).is_some(), "the newest sample's step is shown");
    if !newest.completion.is_empty() {
        assert!(h.query_by_label(&newest.completion).is_some(), "the newest answer {:?} is shown", newest.completion);
    }
    h.get_by_role(egui::accesskit::Role::ComboBox).click();
    settle(&mut h);
    click(&mut h, "2");
    settle(&mut h);
    assert_eq!(h.state().state.training.viewing.as_ref().unwrap().samples.step, Some(2));
    assert!(h.query_by_label("step 2").is_some(), "the picked step's answer is shown");
    click(&mut h, "Back to the live run");

    // Resume it: the samples before the resume are there from its first event on.
    h.state_mut().act(Action::ResumeRun(dir.clone()), &ctx);
    wait_for(&mut h, "the resumed run", 180, |a| a.state.training.loaded.is_some());
    let t = &h.state().state.training;
    let start = t.loaded.as_ref().unwrap().start_step;
    let before: Vec<_> = written.iter().filter(|s| s.step <= start).cloned().collect();
    assert!(!before.is_empty());
    assert!(t.samples.samples.starts_with(&before), "{:?} does not begin with {before:?}", t.samples.samples);
    h.state_mut().act(Action::Stop, &ctx);
    wait_for(&mut h, "the stop", 120, |a| !a.state.training.phase.is_active());
}
