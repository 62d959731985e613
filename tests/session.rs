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
