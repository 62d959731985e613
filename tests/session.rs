//! The training session end to end on the embedded demo model (CPU): events, run folder,
//! checkpoints, resume equality, and refusals with clear errors.

use std::path::{Path, PathBuf};

use tunestudio::RunConfig;
use tunestudio::backend::cpu::CpuBackend;
use tunestudio::config::EvalSplit;
use tunestudio::generate::{Generator, LoadOptions, Prompt, Request, SamplingParams};
use tunestudio::model::chat_template::Message;
use tunestudio::session::checkpoint::{self, RunStatus};
use tunestudio::session::{Event, StartOptions, samples, start};

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

/// A mix asked for (`StartOptions::mix`, what the GPU demo test trains under every mix) is the
/// one the run trains, and on the CPU, where every mix computes the same numbers, the losses are
/// those of the plan's own choice.
#[test]
fn a_mix_asked_for_is_the_one_the_run_trains() {
    use tunestudio::config::CheckpointPolicy;
    use tunestudio::engine::plan::{Mix, SavedAttention};
    let tmp = tempfile::tempdir().unwrap();
    let (plain, _, plain_events) = run(demo_config(&tmp.path().join("plain"), 3), StartOptions::default());
    let mix = Mix {
        policy: CheckpointPolicy::Layer,
        kept_layers: 2,
        attention: SavedAttention::Device,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    };
    let (forced, _, events) = run(demo_config(&tmp.path().join("forced"), 3), StartOptions { mix: Some(mix), ..Default::default() });
    let loaded_mix = |events: &[Event]| {
        events.iter().find_map(|e| if let Event::Loaded(info) = e { Some(info.mix) } else { None }).expect("a Loaded event")
    };
    assert_eq!(loaded_mix(&events), mix);
    assert_ne!(loaded_mix(&plain_events), mix, "the demo's own plan keeps every layer on the CPU");
    assert_eq!(plain, forced, "recomputing trains the same numbers");
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_loss_curve_exactly() {
    let a = tempfile::tempdir().unwrap();
    let (full, full_dir, _) = run(demo_config(a.path(), 6), StartOptions::default());

    let b = tempfile::tempdir().unwrap();
    let (first, dir, _) = run(demo_config(b.path(), 6), StartOptions { stop_after_step: Some(3), ..Default::default() });
    assert_eq!(first.len(), 3);
    assert_eq!(RunStatus::load(&dir).unwrap().state, "stopped");
    let (rest, dir2, _) = run(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    assert_eq!(dir, dir2);
    let resumed: Vec<(u64, f64)> = first.into_iter().chain(rest).collect();
    // Bit-for-bit: same data order, same dropout masks, same optimizer state.
    assert_eq!(resumed, full);
    // The history on disk is the uninterrupted run's too, digit for digit: the resume keeps the
    // lines before its checkpoint as they were written. (serde_json reads some 17-digit floats one
    // unit off, so a line parsed and written again would differ; losses are compared as text.)
    let losses = |d: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(d.join(checkpoint::METRICS_FILE)).unwrap();
        text.lines().map(|l| l.split("\"loss\":").nth(1).and_then(|r| r.split(',').next()).unwrap().to_string()).collect()
    };
    assert_eq!(losses(&dir), losses(&full_dir));
    let on_disk: Vec<u64> = checkpoint::read_metrics(&dir).into_iter().map(|m| m.step).collect();
    assert_eq!(on_disk, (1..=6).collect::<Vec<_>>());
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
        let a = tunestudio::adapter::load_peft(&folder, &spec).unwrap();
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
    let a = tunestudio::adapter::load_peft(&to, &spec).unwrap();
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

/// Run folders are named after the model and the data, not after the folder `model/` and the
/// split `train.jsonl` every dataset has.
#[test]
fn run_names_say_which_model_and_which_data() {
    use tunestudio::session::{dataset_name, default_run_name, model_name};
    assert_eq!(model_name(Path::new("/x/assets/demo/model")), "demo");
    assert_eq!(model_name(Path::new("/hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abcdef")), "SmolLM2-135M-Instruct");
    assert_eq!(model_name(Path::new("/models/Qwen3-0.6B")), "Qwen3-0.6B");
    assert_eq!(model_name(Path::new("model")), "model", "nothing better to say");
    assert_eq!(dataset_name(Path::new("/x/assets/demo/data/train.jsonl")), "demo-train");
    assert_eq!(dataset_name(Path::new("/d/alpaca_cleaned.json")), "alpaca_cleaned");
    assert_eq!(
        dataset_name(Path::new("/hf/hub/datasets--yahma--alpaca-cleaned/snapshots/abc1234def/data/train-00000-of-00001.parquet")),
        "alpaca-cleaned-train"
    );
    assert_eq!(dataset_name(Path::new("/d/sql-2023-of-2024.jsonl")), "sql-2023-of-2024", "not a shard: says something");
    let mut cfg = RunConfig::default();
    cfg.model.path = "/x/assets/demo/model".into();
    cfg.dataset.path = "/x/assets/demo/data/train.jsonl".into();
    assert!(default_run_name(&cfg).starts_with("demo-train-2"), "the demo said once: {}", default_run_name(&cfg));
    cfg.model.path = "/models/Qwen3-0.6B".into();
    assert!(default_run_name(&cfg).starts_with("Qwen3-0.6B-demo-train-2"), "{}", default_run_name(&cfg));
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

#[test]
fn held_out_rows_give_an_eval_loss_and_the_best_checkpoint_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 8);
    cfg.dataset.eval_split = Some(EvalSplit::Fraction(0.1));
    cfg.train.eval_every = 3;
    cfg.train.save_every = 1;
    cfg.train.keep_only_best = true;
    let (_, dir, events) = run(cfg, StartOptions::default());

    let loaded = events.iter().find_map(|e| if let Event::Loaded(i) = e { Some(i) } else { None }).unwrap();
    let usable = loaded.dataset.rows_used;
    assert_eq!(loaded.dataset.eval_rows, (usable as f64 * 0.1).round() as usize);
    assert_eq!(RunStatus::load(&dir).unwrap().rows, Some(usable - loaded.dataset.eval_rows), "trains on the rest");

    // Every 3 steps and after the last, in metrics.jsonl as in the events.
    let metrics = checkpoint::read_metrics(&dir);
    let evals: Vec<(u64, f64)> = metrics.iter().filter_map(|m| Some((m.step, m.eval_loss?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 6, 8]);
    assert!(evals.iter().all(|e| e.1.is_finite() && e.1 > 0.0), "{evals:?}");
    let line = std::fs::read_to_string(dir.join(checkpoint::METRICS_FILE)).unwrap();
    assert!(line.lines().nth(2).unwrap().contains("\"eval_loss\":"), "written as eval_loss");

    // The best is the lowest, marked in run.json and in the Finished event, and its checkpoint
    // is on disk; with keep_only_best only it and the newest remain of the 8 saved.
    let best = evals.iter().copied().fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    let status = RunStatus::load(&dir).unwrap();
    let marked = status.best.expect("run.json marks the best evaluation");
    assert_eq!((marked.step, marked.eval_loss), best);
    let finished = events.iter().find_map(|e| if let Event::Finished(f) = e { Some(f) } else { None }).unwrap();
    assert_eq!(finished.best, Some(marked));
    assert_eq!(finished.best_checkpoint.as_deref(), Some(checkpoint::step_dir(&dir, best.0).as_path()));
    let mut kept = vec![best.0, 8];
    kept.dedup();
    assert_eq!(checkpoint::list(&dir), kept);
}

#[test]
fn evaluating_does_not_change_the_training_curve() {
    // The same rows trained with an evaluation file beside them: bit-identical training losses,
    // so an evaluation draws nothing from the dropout masks or the data order (dropout is on).
    let a = tempfile::tempdir().unwrap();
    let (plain, _, _) = run(demo_config(a.path(), 4), StartOptions::default());
    let b = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(b.path(), 4);
    let eval_file = b.path().join("held.jsonl");
    let rows: Vec<String> = std::fs::read_to_string(&cfg.dataset.path).unwrap().lines().take(6).map(String::from).collect();
    std::fs::write(&eval_file, rows.join("\n")).unwrap();
    cfg.dataset.eval_split = Some(EvalSplit::File(eval_file));
    cfg.train.eval_every = 1;
    let (with_eval, dir, events) = run(cfg, StartOptions::default());
    assert_eq!(with_eval, plain);
    assert!(checkpoint::read_metrics(&dir).iter().all(|m| m.eval_loss.is_some()));
    let loaded = events.iter().find_map(|e| if let Event::Loaded(i) = e { Some(i) } else { None }).unwrap();
    assert_eq!(loaded.dataset.eval_rows, 6);

    // An evaluation file with no usable row is refused, naming the file and the key.
    let c = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(c.path(), 1);
    let empty = c.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    cfg.dataset.eval_split = Some(EvalSplit::File(empty));
    let h = start(cfg, StartOptions::default());
    let msg = h.events.iter().find_map(|e| if let Event::Failed { message, .. } = e { Some(message) } else { None }).unwrap();
    assert!(msg.contains("empty.jsonl"), "{msg}");
}

#[test]
fn paused_time_is_not_counted_as_elapsed() {
    use tunestudio::session::Control;
    let tmp = tempfile::tempdir().unwrap();
    // Enough steps that the pause lands mid-run (it is taken between steps).
    let h = start(demo_config(tmp.path(), 100), StartOptions::default());
    let mut elapsed = vec![];
    let mut paused = false;
    let pause = std::time::Duration::from_millis(1500);
    for e in h.events.iter() {
        match e {
            Event::Step(m) => {
                elapsed.push(m.elapsed_s);
                if m.step == 2 {
                    h.send(Control::Pause);
                }
            }
            Event::Paused { .. } => {
                paused = true;
                std::thread::sleep(pause);
                h.send(Control::Resume);
            }
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    h.join();
    assert!(paused && elapsed.len() == 100, "paused: {paused}, steps: {}", elapsed.len());
    // A demo step takes milliseconds: no step comes 1.5 s of training time after the one before.
    let gap = elapsed.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(gap < 0.5, "a step came {gap:.3} s of training time after the one before it: the pause was counted");
}

fn checkpoint_steps(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Checkpoint { step, .. } => Some(*step),
            _ => None,
        })
        .collect()
}

/// Issue 18: checkpoints come by training time as well as by steps, and at every stop. With step
/// checkpoints off (`save_every = 0`), an interval shorter than a step saves after every step; the
/// default 10 minutes saves nothing in a short run but its end; a stop saves the step it stopped at.
#[test]
fn checkpoints_are_written_by_training_time_and_at_every_stop() {
    assert_eq!(RunConfig::default().train.save_every_minutes, 10.0, "README documents 10 minutes");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 4);
    cfg.train.save_every = 0;
    cfg.output.run_name = "by-time".into();
    // 6 microseconds: every step of the demo takes longer.
    cfg.train.save_every_minutes = 1e-7;
    let (_, dir, events) = run(cfg.clone(), StartOptions::default());
    assert_eq!(checkpoint_steps(&events), vec![1, 2, 3, 4]);
    assert!(checkpoint::list(&dir).ends_with(&[4]));

    cfg.output.run_name = "default-interval".into();
    cfg.train.save_every_minutes = 10.0;
    let (_, _, events) = run(cfg.clone(), StartOptions::default());
    assert_eq!(checkpoint_steps(&events), vec![4], "only the end: ten minutes have not passed");

    cfg.output.run_name = "stopped".into();
    cfg.train.save_every_minutes = 0.0;
    let (_, dir, events) = run(cfg, StartOptions { stop_after_step: Some(2), ..Default::default() });
    assert_eq!(checkpoint_steps(&events), vec![2], "a stop saves the step it stopped at");
    assert_eq!(checkpoint::list(&dir), vec![2]);
    assert_eq!(RunStatus::load(&dir).unwrap().state, "stopped");
}

/// Issue 18: an adapter or checkpoint holding NaN or ±inf is refused where it is read, naming the
/// tensor: continuing from it (`model.adapter`), resuming from it, exporting or evaluating it would
/// otherwise train or ship NaNs.
#[test]
fn non_finite_adapters_and_checkpoints_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = run(demo_config(tmp.path(), 2), StartOptions { stop_after_step: Some(1), ..Default::default() });
    let spec = tunestudio::model::ModelSpec::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model")).unwrap();
    let good = tunestudio::adapter::load_peft(&dir.join("adapter"), &spec).unwrap();
    let mut weights = good.weights.clone();
    let (&target, pair) = weights.layers[1].iter_mut().next().unwrap();
    pair.b[3] = f32::NAN;
    pair.b[5] = f32::INFINITY;
    let bad = tmp.path().join("bad");
    tunestudio::adapter::AdapterFiles { spec: &spec, weights: &weights, lora: &good.lora, base_model: &good.base_model, tokens: None }
        .save(&bad)
        .unwrap();
    let tensor = format!("layers.1.{}.{}.lora_B", target.hf_parent(), target.hf_name());
    let check = |m: &str| assert!(m.contains(&tensor) && m.contains("2 non-finite values"), "{m}");

    check(&tunestudio::adapter::load_peft(&bad, &spec).unwrap_err().to_string());
    let mut cfg = demo_config(tmp.path(), 2);
    cfg.output.run_name = "continued".into();
    cfg.model.adapter = Some(bad.clone());
    let (_, failed) = outcome(cfg, StartOptions::default());
    check(&failed.expect("continuing from a NaN adapter must fail"));

    let ckpt = checkpoint::latest_dir(&dir).unwrap();
    std::fs::copy(bad.join("adapter_model.safetensors"), ckpt.join("adapter_model.safetensors")).unwrap();
    let (_, failed) = outcome(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    let m = failed.expect("resuming from a NaN checkpoint must fail");
    check(&m);
    assert!(m.contains("delete its checkpoints/step-* folder"), "{m}");
    std::fs::remove_dir_all(dir.join("adapter")).unwrap();
    check(&tunestudio::export::run::export_adapter(&dir, Some(&tmp.path().join("x"))).unwrap_err().to_string());
}

/// The `samples.jsonl` of a run folder, line by line (empty when there is none).
fn sample_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(samples::SAMPLES_FILE)).unwrap_or_default().lines().map(String::from).collect()
}

/// A metrics.jsonl field of every line, as written (text: serde_json reads some 17-digit floats
/// one unit off).
fn metric_texts(dir: &Path, field: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(checkpoint::METRICS_FILE)).unwrap();
    let key = format!("\"{field}\":");
    text.lines().map(|l| l.split(key.as_str()).nth(1).and_then(|r| r.split([',', '}']).next()).unwrap().to_string()).collect()
}

#[test]
fn samples_come_at_their_steps_and_leave_the_training_untouched() {
    let a = tempfile::tempdir().unwrap();
    let (plain, plain_dir, _) = run(demo_config(a.path(), 7), StartOptions::default());
    assert!(sample_lines(&plain_dir).is_empty(), "samples are off by default");

    let b = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(b.path(), 7);
    let prompts = vec!["Where can you find the frostling?".to_string(), "Describe the colour of the marrowbat.".to_string()];
    cfg.samples.every = 3;
    cfg.samples.prompts = prompts.clone();
    cfg.samples.max_new_tokens = 12;
    let (with, dir, events) = run(cfg, StartOptions::default());

    // The training is the run without samples, bit for bit (dropout is on, so a sample drawing
    // from the masks' RNG, or touching the optimizer or activations, would show), and so is the
    // curve on disk, digit for digit.
    assert_eq!(with, plain);
    for field in ["loss", "grad_norm", "lr", "tokens"] {
        assert_eq!(metric_texts(&dir, field), metric_texts(&plain_dir, field), "metrics.jsonl {field}");
    }

    // Every 3 steps and after the last, each prompt in order.
    let answered: Vec<(u64, Vec<samples::Sample>)> = events
        .iter()
        .filter_map(|e| if let Event::Samples { step, samples, .. } = e { Some((*step, samples.clone())) } else { None })
        .collect();
    assert_eq!(answered.iter().map(|a| a.0).collect::<Vec<_>>(), vec![3, 6, 7]);
    for (step, s) in &answered {
        assert_eq!(s.iter().map(|s| s.prompt.clone()).collect::<Vec<_>>(), prompts);
        assert!(s.iter().all(|s| s.step == *step));
    }
    // After the step they were answered at, before the next one.
    let order: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step(m) => Some(format!("step {}", m.step)),
            Event::Samples { step, .. } => Some(format!("samples {step}")),
            _ => None,
        })
        .collect();
    let at = |s: &str| order.iter().position(|o| o == s).unwrap();
    assert_eq!(at("samples 3"), at("step 3") + 1);
    assert_eq!(at("samples 7"), at("step 7") + 1);

    // samples.jsonl holds the same, one line per answer: step, prompt, completion.
    let lines = sample_lines(&dir);
    assert_eq!(lines.len(), 6);
    let all: Vec<samples::Sample> = answered.iter().flat_map(|a| a.1.clone()).collect();
    for (line, s) in lines.iter().zip(&all) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["step", "prompt", "completion"], "{line}");
        assert_eq!(&serde_json::from_value::<samples::Sample>(v).unwrap(), s);
    }
    assert_eq!(samples::read(&dir), all);

    // The last answers are the finished adapter's: what `tunestudio generate` answers with it
    // greedily (the sampler was built at step 3 and only given the new LoRA weights since; that
    // those are used, not the old, is `replaced_lora_weights_answer_as_a_generator_opened_with_them`
    // in tests/generate.rs: the demo's answers hardly change in 7 steps).
    let mut g = Generator::open(CpuBackend::<f32>::new(), &LoadOptions::from_run(&dir).unwrap()).unwrap();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    for s in &answered[2].1 {
        let req = Request {
            prompt: Prompt::Chat(vec![Message::new("user", s.prompt.as_str())]),
            adapter: true,
            params: SamplingParams::greedy(12),
            stop_strings: vec![],
            ignore_eos: false,
        };
        let answer = g.generate(&[req], &cancel, &mut |_| {}).unwrap().pop().unwrap();
        assert_eq!(answer.text, s.completion, "{:?}", s.prompt);
    }
}

#[test]
fn without_typed_prompts_the_first_rows_are_answered_up_to_their_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 2);
    cfg.samples.every = 2;
    cfg.samples.count = 2;
    cfg.samples.max_new_tokens = 4;
    let (_, dir, events) = run(cfg, StartOptions::default());
    let got = samples::read(&dir);
    assert_eq!(got.len(), 2);
    // The dataset's first two rows (no held-out rows: the training rows, in file order), shown as
    // the template renders them, ending where the answer starts.
    assert!(
        got[0].prompt.contains("Describe the colour of the marrowbat.") && !got[0].prompt.contains("black in colour"),
        "{:?}",
        got[0].prompt
    );
    assert!(got[1].prompt.contains("favourite food of the glimmerfox") && !got[1].prompt.contains("berries"), "{:?}", got[1].prompt);
    assert!(logs(&events).iter().any(|l| l.contains("answering 2 sample prompts every 2 steps")), "{:?}", logs(&events));
}

#[test]
fn a_resumed_run_keeps_the_samples_before_its_checkpoint_and_answers_the_rest_again() {
    let with_samples = |dir: &Path| {
        let mut cfg = demo_config(dir, 6);
        cfg.samples.every = 2;
        cfg.samples.prompts = vec!["Where can you find the frostling?".into()];
        cfg.samples.max_new_tokens = 8;
        cfg
    };
    let a = tempfile::tempdir().unwrap();
    let (_, full_dir, _) = run(with_samples(a.path()), StartOptions::default());
    let full = sample_lines(&full_dir);
    assert_eq!(samples::read(&full_dir).iter().map(|s| s.step).collect::<Vec<_>>(), vec![2, 4, 6]);

    let b = tempfile::tempdir().unwrap();
    let (_, dir, _) = run(with_samples(b.path()), StartOptions { stop_after_step: Some(3), ..Default::default() });
    assert_eq!(checkpoint::list(&dir), vec![3]);
    assert_eq!(sample_lines(&dir), full[..1]);
    // What a run killed after its checkpoint at step 3 leaves: the samples of step 4, and a line
    // cut off half-way.
    let mut text = std::fs::read_to_string(dir.join(samples::SAMPLES_FILE)).unwrap();
    text.push_str("{\"step\":4,\"prompt\":\"Where can you find the frostling?\",\"completion\":\"stale\"}\n{\"step\":5,\"prom");
    std::fs::write(dir.join(samples::SAMPLES_FILE), text).unwrap();

    run(RunConfig::default(), StartOptions { resume: Some(dir.clone()), ..Default::default() });
    // Byte for byte the uninterrupted run's: step 2 kept, the stale step 4 and the cut line gone,
    // steps 4 and 6 answered again by the same weights.
    assert_eq!(sample_lines(&dir), full);
}

/// Issue 13: the time spent answering samples is left out of the elapsed training time and the
/// ETA (as paused time is), and said apart in each `Event::Samples`; tokens/s times the step
/// alone. Sixteen dataset rows are answered after every small step; the events are timed as they
/// come: the elapsed time grows by the wall time between two steps less the samples' time.
#[test]
fn sampling_time_is_left_out_of_the_elapsed_time_and_the_eta() {
    use std::time::Instant;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = demo_config(tmp.path(), 8);
    cfg.train.max_seq_len = 64;
    cfg.train.grad_accum = 1;
    cfg.samples.every = 1;
    cfg.samples.count = 16;
    cfg.samples.max_new_tokens = 24;
    let h = start(cfg, StartOptions::default());
    // (received at, step, elapsed_s, eta_s) of each step; the samples' seconds after step 1.
    let mut steps = Vec::new();
    let mut sampled = 0.0;
    for e in h.events.iter() {
        match e {
            Event::Samples { secs, samples, step } => {
                assert_eq!(samples.len(), 16);
                assert!(secs > 0.0);
                if step < 8 {
                    sampled += secs;
                }
            }
            Event::Step(m) => steps.push((Instant::now(), m.step, m.elapsed_s, m.eta_s)),
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    h.join();
    let (first, last) = (steps[0], *steps.last().unwrap());
    assert_eq!((first.1, last.1), (1, 8));
    let wall = (last.0 - first.0).as_secs_f64();
    let grew = last.2 - first.2;
    // Without the fix the elapsed time grows by the wall time, samples included.
    assert!(grew < wall - sampled / 2.0, "elapsed grew {grew:.3} s over {wall:.3} s of wall time, {sampled:.3} s of it samples");
    // The ETA is the remaining steps at the training's pace, not the samples'.
    let (_, step, elapsed, eta) = steps[3];
    let expect = elapsed / step as f64 * (8 - step) as f64;
    assert!((eta - expect).abs() < 1e-9, "{eta} vs {expect}");
    assert!(eta < sampled / 7.0 * (8 - step) as f64, "ETA {eta:.3} s holds no samples");
}
