//! The training session end to end on the embedded demo model (CPU): events, run folder,
//! checkpoints, resume equality, and refusals with clear errors.

use std::path::{Path, PathBuf};

use tunestudio::RunConfig;
use tunestudio::session::checkpoint::{self, RunStatus};
use tunestudio::session::{Event, StartOptions, start};

fn demo_config(out: &Path, steps: u64) -> RunConfig {
    let mut cfg = RunConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/run.toml"))).unwrap();
    cfg.output.dir = out.to_path_buf();
    cfg.output.run_name = "r".into();
    cfg.train.max_steps = Some(steps);
    // Small steps keep the test fast; gradient accumulation and dropout are exercised on purpose.
    cfg.train.batch_size = 2;
    cfg.train.grad_accum = 2;
    cfg.train.max_seq_len = 128;
    cfg.lora.dropout = 0.1;
    cfg
}

/// Run a session to its end and return (losses per step, run folder, events).
fn run(cfg: RunConfig, options: StartOptions) -> (Vec<(u64, f64)>, PathBuf, Vec<Event>) {
    let h = start(cfg, options);
    let events: Vec<Event> = h.events.iter().collect();
    h.join();
    let mut losses = vec![];
    let mut dir = None;
    for e in &events {
        match e {
            Event::Step(m) => losses.push((m.step, m.loss)),
            Event::Finished(f) => dir = Some(f.run_dir.clone()),
            Event::Failed { message, .. } => panic!("session failed: {message}"),
            _ => {}
        }
    }
    (losses, dir.expect("a Finished event"), events)
}

#[test]
fn demo_run_writes_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (losses, dir, events) = run(demo_config(tmp.path(), 4), StartOptions::default());
    assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(losses.iter().all(|l| l.1.is_finite() && l.1 > 0.0));
    assert!(matches!(events.iter().find(|e| matches!(e, Event::Loaded(_))), Some(Event::Loaded(_))));
    for f in [
        checkpoint::CONFIG_FILE,
        checkpoint::METRICS_FILE,
        checkpoint::STATUS_FILE,
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(dir.join(f).exists(), "{f} missing from the run folder");
    }
    assert_eq!(checkpoint::read_metrics(&dir).len(), 4);
    assert_eq!(checkpoint::list(&dir), vec![4]);
    assert_eq!(RunStatus::load(&dir).unwrap().state, "done");
    // The effective config round-trips and still validates.
    RunConfig::load(&dir.join(checkpoint::CONFIG_FILE)).unwrap().validate().unwrap();
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_loss_curve_exactly() {
    let a = tempfile::tempdir().unwrap();
    let (full, _, _) = run(demo_config(a.path(), 6), StartOptions::default());

    let b = tempfile::tempdir().unwrap();
    let (first, dir, _) = run(demo_config(b.path(), 6), StartOptions { stop_after_step: Some(3), ..Default::default() });
    assert_eq!(first.len(), 3);
    assert_eq!(RunStatus::load(&dir).unwrap().state, "stopped");
    let (rest, dir2, _) = run(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    assert_eq!(dir, dir2);
    let resumed: Vec<(u64, f64)> = first.into_iter().chain(rest).collect();
    // Bit-for-bit: same data order, same dropout masks, same optimizer state.
    assert_eq!(resumed, full);
    let on_disk: Vec<(u64, f64)> = checkpoint::read_metrics(&dir).into_iter().map(|m| (m.step, m.loss)).collect();
    assert_eq!(on_disk, full);
}

#[test]
fn a_run_folder_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    run(demo_config(tmp.path(), 1), StartOptions::default());
    let h = start(demo_config(tmp.path(), 1), StartOptions::default());
    let failed = h.events.iter().find_map(|e| match e {
        Event::Failed { message, .. } => Some(message),
        _ => None,
    });
    let msg = failed.expect("starting into an existing run must fail");
    assert!(msg.contains("already holds a run") && msg.contains("--resume"), "{msg}");
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let fail = |cfg: RunConfig| -> String {
        let h = start(cfg, StartOptions::default());
        let msg = h.events.iter().find_map(|e| match e {
            Event::Failed { message, .. } => Some(message),
            _ => None,
        });
        msg.expect("expected a failure")
    };
    let mut cfg = demo_config(tmp.path(), 1);
    cfg.optim.lr = 5.0;
    let m = fail(cfg);
    assert!(m.contains("optim.lr"), "{m}");

    // A truncated safetensors file names the file.
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let demo_model = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/model"));
    for f in std::fs::read_dir(demo_model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let mut cfg = demo_config(tmp.path(), 1);
    cfg.output.run_name = "bad-weights".into();
    cfg.model.path = model.clone();
    let m = fail(cfg);
    assert!(m.contains("model.safetensors") && m.contains("truncated"), "{m}");

    // A missing tokenizer names the file.
    std::fs::write(&st, &bytes).unwrap();
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let mut cfg = demo_config(tmp.path(), 1);
    cfg.output.run_name = "no-tokenizer".into();
    cfg.model.path = model;
    let m = fail(cfg);
    assert!(m.contains("tokenizer.json"), "{m}");
}

/// Run to the end; the `Failed` message when it fails.
fn outcome(cfg: RunConfig, options: StartOptions) -> (Vec<Event>, Option<String>) {
    let h = start(cfg, options);
    let events: Vec<Event> = h.events.iter().collect();
    h.join();
    let failed = events.iter().find_map(|e| match e {
        Event::Failed { message, .. } => Some(message.clone()),
        _ => None,
    });
    (events, failed)
}

fn logs(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Log(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// Issue 18: the run's own adapter (and every checkpoint, itself a PEFT adapter) carries the token
/// rows the untrained-token fix trained, as PEFT trainable tokens.
#[test]
fn a_fixed_runs_own_adapter_carries_the_trained_token_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = RunConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/interop/demo_fix/run.toml"))).unwrap();
    cfg.output.dir = tmp.path().to_path_buf();
    cfg.train.max_steps = Some(2);
    cfg.train.batch_size = 4;
    cfg.train.max_seq_len = 128;
    let (_, dir, _) = run(cfg, StartOptions::default());
    let fixed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("token_fix.json")).unwrap()).unwrap();
    let ids: Vec<u64> = fixed["fixed_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(!ids.is_empty());
    let ckpt = checkpoint::load_latest(&dir).unwrap();
    let rows = ckpt.token_rows.clone().expect("the checkpoint holds the rows");
    for folder in [dir.join("adapter"), ckpt.dir.clone()] {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["trainable_token_indices"], serde_json::json!({"embed_tokens": ids, "lm_head": ids}), "{}", folder.display());
        let bytes = std::fs::read(folder.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        for key in [
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        ] {
            assert!(names.iter().any(|n| n == key), "{key} missing from {}", folder.display());
        }
        let spec = tunestudio::model::ModelSpec::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model")).unwrap();
        let a = tunestudio::export::adapter::load_peft(&folder, &spec).unwrap();
        assert_eq!(a.token_rows.as_ref(), Some(&rows), "{}", folder.display());
        assert_eq!(a.weights, ckpt.weights);
    }
}

/// A failed run (no `adapter/`) still exports: from its newest checkpoint, rows included.
#[test]
fn a_run_without_adapter_exports_from_its_newest_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = run(demo_config(tmp.path(), 2), StartOptions::default());
    std::fs::remove_dir_all(dir.join("adapter")).unwrap();
    let to = tmp.path().join("exported");
    tunestudio::export::run::export_adapter(&dir, Some(&to)).unwrap();
    let spec = tunestudio::model::ModelSpec::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model")).unwrap();
    let a = tunestudio::export::adapter::load_peft(&to, &spec).unwrap();
    assert_eq!(a.weights, checkpoint::load_latest(&dir).unwrap().weights);
}

/// Two sessions on the same folder: the second is refused with the holder's PID while the first
/// trains, and an export waits for nobody but is refused too.
#[test]
fn a_run_folder_in_use_is_refused_with_the_holders_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = run(demo_config(tmp.path(), 2), StartOptions { stop_after_step: Some(1), ..Default::default() });
    // Hold the folder as a training process would.
    let held = tunestudio::session::lock::RunLock::acquire(&dir, "train").unwrap();
    let pid = format!("process {}", std::process::id());
    let (_, failed) = outcome(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    let m = failed.expect("resume of a folder in use must fail");
    assert!(m.contains("is in use by") && m.contains(&pid), "{m}");
    let (_, failed) = outcome(demo_config(tmp.path(), 2), StartOptions::default());
    let m = failed.expect("a new run into a folder in use must fail");
    assert!(m.contains("is in use by") && m.contains(&pid), "{m}");
    let e = tunestudio::export::run::export_adapter(&dir, Some(&tmp.path().join("x"))).unwrap_err().to_string();
    assert!(e.contains("is in use by") && e.contains(&pid), "{e}");
    drop(held);
    let (_, failed) = outcome(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    assert_eq!(failed, None);
}

/// Default names never reuse a folder: two runs started in the same second get two folders.
#[test]
fn default_run_names_are_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 1);
    cfg.output.run_name = String::new();
    let a = start(cfg.clone(), StartOptions::default());
    let b = start(cfg, StartOptions::default());
    let dir = |h: tunestudio::session::SessionHandle| {
        let d = h.events.iter().find_map(|e| match e {
            Event::Finished(f) => Some(f.run_dir),
            Event::Failed { message, .. } => panic!("{message}"),
            _ => None,
        });
        h.join();
        d.unwrap()
    };
    let (da, db) = (dir(a), dir(b));
    assert_ne!(da, db);
    assert_eq!(checkpoint::read_metrics(&da).len(), 1);
    assert_eq!(checkpoint::read_metrics(&db).len(), 1);
}

/// A run that stopped before its first checkpoint is a dead end no more: the refusal says how to
/// restart it, and `restart` trains it again in place.
#[test]
fn a_run_folder_without_checkpoint_can_be_restarted_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = run(demo_config(tmp.path(), 2), StartOptions::default());
    // As if killed before its first save: no checkpoint, no adapter, leftovers of a write.
    std::fs::remove_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::remove_dir_all(dir.join("adapter")).unwrap();
    std::fs::create_dir_all(dir.join("checkpoints/.step-000001.tmp-4194000")).unwrap();
    let (_, failed) = outcome(demo_config(tmp.path(), 2), StartOptions::default());
    let m = failed.unwrap();
    assert!(m.contains("--restart"), "{m}");
    let (_, failed) = outcome(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    let m = failed.unwrap();
    assert!(m.contains("no checkpoint") && m.contains("--restart"), "{m}");
    let (losses, again, _) = run(demo_config(tmp.path(), 2), StartOptions { restart: Some(dir.clone()), ..Default::default() });
    assert_eq!(again, dir);
    assert_eq!(losses.len(), 2);
    assert_eq!(checkpoint::read_metrics(&dir).len(), 2);
    assert_eq!(checkpoint::list(&dir), vec![2]);
    // With a checkpoint, restart is refused in favour of resume.
    let (_, failed) = outcome(demo_config(tmp.path(), 2), StartOptions { restart: Some(dir.clone()), ..Default::default() });
    assert!(failed.unwrap().contains("--resume"));
}

/// The effective config records absolute paths and the dataset's fingerprint; a resume refuses a
/// changed dataset unless told to go on.
#[test]
fn resume_refuses_a_changed_dataset_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/data/train.jsonl"), &data).unwrap();
    let mut cfg = demo_config(tmp.path(), 4);
    cfg.dataset.path = data.clone();
    let (_, dir, _) = run(cfg, StartOptions { stop_after_step: Some(2), ..Default::default() });
    let saved = RunConfig::load(&dir.join(checkpoint::CONFIG_FILE)).unwrap();
    let text = std::fs::read_to_string(dir.join(checkpoint::CONFIG_FILE)).unwrap();
    assert!(saved.model.path.is_absolute() && saved.dataset.path.is_absolute() && saved.output.dir.is_absolute(), "{text}");
    let fp = saved.dataset.fingerprint.clone().expect("fingerprint recorded");
    assert_eq!(fp.bytes, std::fs::metadata(&data).unwrap().len());
    assert!(text.contains(&fp.sha256), "{text}");

    let rows: Vec<String> = std::fs::read_to_string(&data).unwrap().lines().take(50).map(String::from).collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let resume = |allow| StartOptions { resume: Some(dir.clone()), allow_changed_data: allow, ..Default::default() };
    let (_, failed) = outcome(RunConfig::default(), resume(false));
    let m = failed.expect("a changed dataset must be refused");
    assert!(m.contains("train.jsonl") && m.contains("has changed") && m.contains("--allow-changed-data"), "{m}");
    assert_eq!(checkpoint::read_metrics(&dir).len(), 2, "a refused resume changes nothing");
    let (events, failed) = outcome(RunConfig::default(), resume(true));
    assert_eq!(failed, None);
    assert!(logs(&events).iter().any(|l| l.contains("dataset changed")), "{:?}", logs(&events));
    let now = RunConfig::load(&dir.join(checkpoint::CONFIG_FILE)).unwrap().dataset.fingerprint.unwrap();
    assert_ne!(now, fp, "the new data's fingerprint is recorded");
}

/// `--max-steps` on a resume keeps the original schedule; `--reschedule` re-plans it. Resuming a
/// finished run trains nothing and says how to extend it.
#[test]
fn extending_a_run_keeps_its_schedule_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 10);
    cfg.schedule.warmup_steps = 0;
    let lr = cfg.optim.lr;
    let (_, dir, _) = run(cfg, StartOptions { stop_after_step: Some(5), ..Default::default() });
    let copy = tmp.path().join("copy");
    copy_dir(&dir, &copy);
    let lrs = |d: &Path| checkpoint::read_metrics(d).iter().map(|m| m.lr).collect::<Vec<f64>>();
    let extend = |d: &Path, reschedule| {
        let mut c = RunConfig::default();
        c.train.max_steps = Some(20);
        run(c, StartOptions { resume: Some(d.to_path_buf()), reschedule, ..Default::default() })
    };
    let (_, _, events) = extend(&dir, false);
    let kept = lrs(&dir);
    assert_eq!(kept.len(), 20);
    for (k, v) in kept.iter().enumerate() {
        let want = lr * (10.0 - k as f64).max(0.0) / 10.0;
        assert!((v - want).abs() < 1e-12, "step {}: lr {v}, the original schedule says {want}", k + 1);
    }
    assert!(logs(&events).iter().any(|l| l.contains("--reschedule")), "{:?}", logs(&events));
    extend(&copy, true);
    let replanned = lrs(&copy);
    assert!((replanned[5] - lr * 15.0 / 20.0).abs() < 1e-12, "{replanned:?}");

    // Finished: nothing to train, nothing rewritten.
    let before = std::fs::read(dir.join(checkpoint::METRICS_FILE)).unwrap();
    let (events, failed) = outcome(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    assert_eq!(failed, None);
    assert!(logs(&events).iter().any(|l| l.contains("nothing to train") && l.contains("--max-steps")), "{:?}", logs(&events));
    assert!(!events.iter().any(|e| matches!(e, Event::Step(_))));
    assert_eq!(std::fs::read(dir.join(checkpoint::METRICS_FILE)).unwrap(), before);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Issue 18's probe: lr 1.0, alpha 1e6, no warm-up, no clipping. The run must stop as failed,
/// not end "done" with an adapter, and keep its last checkpoint.
#[test]
fn a_diverging_run_stops_as_failed_and_keeps_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 40);
    cfg.optim.lr = 1.0;
    cfg.optim.max_grad_norm = 0.0;
    cfg.lora.alpha = 1e6;
    cfg.lora.dropout = 0.0;
    cfg.schedule.warmup_steps = 0;
    cfg.train.save_every = 1;
    let h = start(cfg, StartOptions::default());
    let events: Vec<Event> = h.events.iter().collect();
    h.join();
    let (message, last) = events
        .iter()
        .find_map(|e| match e {
            Event::Failed { message, last_checkpoint, .. } => Some((message.clone(), last_checkpoint.clone())),
            _ => None,
        })
        .expect("the run must fail");
    assert!(message.contains("optim.lr"), "{message}");
    let steps = events.iter().filter(|e| matches!(e, Event::Step(_))).count();
    assert!(steps < 10, "stopped after {steps} steps: {message}");
    let dir = tmp.path().join("r");
    assert!(!dir.join("adapter").exists(), "a diverged run exports nothing");
    let status = RunStatus::load(&dir).unwrap();
    assert_eq!(status.state, "failed");
    assert!(last.is_some_and(|c| c.exists()), "{message}");
}

/// The divergence guard's defaults must leave an ordinary run alone: the demo's whole schedule.
#[test]
fn the_demo_trains_its_whole_schedule_without_tripping_the_divergence_guard() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = RunConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/run.toml"))).unwrap();
    cfg.output.dir = tmp.path().to_path_buf();
    cfg.train.device = tunestudio::config::DeviceChoice::Cpu;
    assert!(cfg.train.stop_on_divergence);
    let (losses, _, _) = run(cfg, StartOptions::default());
    assert_eq!(losses.len(), 60);
}
