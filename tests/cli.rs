//! The command line as a user meets it: exit codes and one-line errors that name the file or field.

use std::path::Path;
use std::process::Command;

fn tunestudio(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn demo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

/// The last stderr line is the error; it must be one line, start with `error:` and name `what`.
fn assert_error(stderr: &str, what: &str) {
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: ") && last.contains(what), "expected an error naming {what}, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error:\n{stderr}");
}

#[test]
fn inspect_reports_the_demo_models_untrained_rows() {
    let (ok, out, err) = tunestudio(&["inspect", demo().join("model").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("llama") && out.contains("reserved_special_token_0"), "{out}");
    let (ok, out, _) = tunestudio(&["inspect", "--json", demo().join("model").to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["untrained_tokens"].as_array().unwrap().is_empty());
}

#[test]
fn unknown_architecture_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "gpt2", "n_embd": 64}"#).unwrap();
    let (ok, _, err) = tunestudio(&["inspect", d.path().to_str().unwrap()]);
    assert!(!ok);
    assert_error(&err, "config.json");
    assert!(err.contains("gpt2"));
}

#[test]
fn out_of_range_config_value_names_the_field() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(demo().join("run.toml")).unwrap().replace("r = 16", "r = 0");
    let cfg = d.path().join("run.toml");
    std::fs::write(&cfg, text).unwrap();
    // Paths in the copy must still reach the demo.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("path = \"model\"", &format!("path = {:?}", demo().join("model")))
        .replace("path = \"data/train.jsonl\"", &format!("path = {:?}", demo().join("data/train.jsonl")));
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = tunestudio(&["train", cfg.to_str().unwrap(), "--output", d.path().to_str().unwrap()]);
    assert!(!ok);
    assert_error(&err, "lora.r");
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(demo().join("model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(d.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let (ok, _, err) = tunestudio(&["inspect", d.path().to_str().unwrap()]);
    assert!(!ok);
    assert_error(&err, "model.safetensors");
}

#[test]
fn train_accepts_overrides_and_prints_a_line_per_step() {
    let d = tempfile::tempdir().unwrap();
    let (ok, out, err) = tunestudio(&[
        "train",
        demo().join("run.toml").to_str().unwrap(),
        "--output",
        d.path().to_str().unwrap(),
        "--max-steps",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("step")).collect();
    assert_eq!(steps.len(), 2, "{out}");
    for l in steps {
        for field in ["loss", "lr", "grad-norm", "tok/s", "elapsed", "ETA"] {
            assert!(l.contains(field), "{field} missing in: {l}");
        }
    }
    assert!(err.contains("adapter"), "{err}");
}

#[test]
fn cuda_device_without_a_gpu_is_a_clear_error() {
    if tunestudio::backend::cuda::probe().is_ok() {
        return; // a GPU host: covered by the GPU tests
    }
    let d = tempfile::tempdir().unwrap();
    let (ok, _, err) =
        tunestudio(&["train", demo().join("run.toml").to_str().unwrap(), "--output", d.path().to_str().unwrap(), "--device", "cuda"]);
    assert!(!ok);
    assert_error(&err, "no CUDA device");
    assert_error(&err, "set train.device = \"cpu\" (--device cpu)");
    assert!(!d.path().read_dir().unwrap().any(|_| true), "a device that cannot start leaves no run folder behind");
}

/// `plan --card NAME --json` on any machine: every profile the engine runs is planned as that
/// card (its memory, its limits, idle); one it cannot run is refused in one line that names it.
#[test]
fn plan_for_every_card_profile_without_a_gpu() {
    use tunestudio::backend::card::PROFILES;
    for p in PROFILES {
        let (ok, out, err) = tunestudio(&["plan", "--shape", "llama3.2-1b", "--seq", "2048", "--card", p.key, "--json"]);
        if !p.supported() {
            assert!(!ok && out.is_empty(), "{}: {out}", p.key);
            assert_error(&err, p.name);
            assert_error(&err, "no bf16 tensor cores");
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
            continue;
        }
        assert!(ok, "{}: {err}", p.key);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["card_limits"]["profile"], p.key, "{v}");
        assert_eq!(v["total_bytes"].as_u64(), Some(p.memory_mib << 20), "{}", p.key);
        assert_eq!(v["others_bytes"], 0, "a profile is planned idle");
        assert!(v["terms"].get("other_processes").is_none(), "{}", p.key);
        let cc = &v["card_limits"]["compute_capability"];
        assert_eq!((cc[0].as_u64(), cc[1].as_u64()), (Some(p.compute_capability.0 as u64), Some(p.compute_capability.1 as u64)));
        assert_eq!(v["fits"], true, "a 1B model at 2048 tokens fits every card: {}", p.key);
        assert!(v["card"].as_str().unwrap().contains(&format!("(profile {})", p.key)), "{}", v["card"]);
    }
    // The cap is held on top of the card: a 12 GB card capped at 4 GiB, where the 8B does not
    // fit (exit code 2: planned, does not fit).
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .args(["plan", "--shape", "llama3-8b", "--seq", "2048", "--card", "rtx3060", "--gpu-mem", "4GiB", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["cap_bytes"].as_u64(), v["available_bytes"].as_u64(), v["fits"].as_bool()), (Some(4 << 30), Some(4 << 30), Some(false)));
    let (ok, _, err) = tunestudio(&["plan", "--shape", "llama3-8b", "--card", "rtx9999"]);
    assert!(!ok);
    assert_error(&err, "unknown card profile \"rtx9999\": use one of rtx3060");
}

/// A card profile the engine cannot run stops `train` and `preflight` in one line that names it
/// and says what to do, GPU or not; nothing is written.
#[test]
fn a_card_that_cannot_run_is_refused_by_train_and_preflight() {
    let d = tempfile::tempdir().unwrap();
    let config = demo().join("run.toml");
    for card in ["t4", "v100-32", "rtx2080ti"] {
        let (ok, _, err) = tunestudio(&["train", config.to_str().unwrap(), "--output", d.path().to_str().unwrap(), "--card", card]);
        assert!(!ok, "{card}");
        assert_error(&err, "the CUDA engine cannot run on");
        assert_error(&err, "no bf16 tensor cores");
        assert_error(&err, "train.device = \"cpu\"");
        assert!(!err.contains("reading"), "refused before anything is read: {err}");
        let (ok, out, err) = tunestudio(&["preflight", config.to_str().unwrap(), "--card", card]);
        assert!(!ok, "{card}");
        assert!(out.lines().any(|l| l.starts_with("device     CANNOT START: ") && l.contains("bf16")), "{out}");
        assert_error(&err, "cannot start: ");
    }
    assert!(!d.path().read_dir().unwrap().any(|_| true), "no run folder for a refused card");
}

/// `plan` holds the device bytes against the card and the pinned host bytes of offloading
/// against the RAM: with little RAM a long run does not fit and the largest length shrinks.
#[test]
fn plan_holds_offloaded_activations_against_the_host_ram() {
    let plan = |host: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
            .args(["plan", "--shape", "llama3-8b", "--seq", "32768", "--gpu-mem", "24GiB", "--host-mem", host, "--json"])
            .output()
            .unwrap();
        let v = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        // Exit code 2: planned, and it does not fit.
        assert_eq!(out.status.code(), Some(if v["fits"] == true { 0 } else { 2 }), "{}", String::from_utf8_lossy(&out.stderr));
        v
    };
    let (small, large) = (plan("4GiB"), plan("256GiB"));
    assert_eq!(large["checkpointing"], "offload", "{large}");
    assert!(large["pinned_host_bytes"].as_u64().unwrap() > 4 << 30);
    assert_eq!((large["fits"].as_bool(), large["host_fits"].as_bool()), (Some(true), Some(true)), "{large}");
    assert_eq!((small["fits"].as_bool(), small["host_fits"].as_bool()), (Some(false), Some(false)), "{small}");
    assert_eq!(small["host_available_bytes"].as_u64(), Some(4 << 30));
    let longest = |v: &serde_json::Value| v["largest"]["max_seq_len"].as_u64().unwrap();
    assert!(longest(&small) < 32768 && longest(&small) < longest(&large), "{} vs {}", longest(&small), longest(&large));
    assert!(small["suggestions"].as_array().unwrap().iter().any(|s| s["change"].as_str().unwrap().contains("max_seq_len")), "{small}");
    assert_eq!(small["binding"], "host_ram", "{small}");
    let (ok, text, _) = tunestudio(&["plan", "--shape", "llama3-8b", "--seq", "32768", "--gpu-mem", "24GiB", "--host-mem", "4GiB"]);
    assert!(!ok && text.contains("of 4.00 GiB RAM available: does NOT fit"), "{text}");
    // The verdict blames the host RAM, not the card.
    let verdict = text.lines().find(|l| l.contains(" → ")).unwrap();
    assert!(verdict.contains("fits on the card, but does NOT fit in host RAM"), "{verdict}");
}

/// Issue 18: `plan` validates what `train` validates, refuses sizes without a unit, never offers
/// more than the validator allows, and exits 2 when the run does not fit.
#[test]
fn plan_validates_like_train_and_exits_2_when_nothing_fits() {
    for (flag, value, field) in [("--seq", "0", "train.max_seq_len"), ("--batch", "0", "train.batch_size"), ("--rank", "0", "lora.r")] {
        let (ok, _, err) = tunestudio(&["plan", "--shape", "llama3.2-1b", flag, value, "--gpu-mem", "24GiB"]);
        assert!(!ok, "{flag} {value} must be refused");
        assert_error(&err, &format!("{flag} {value}"));
        assert!(err.contains(field), "{err}");
    }
    let (ok, _, err) = tunestudio(&["plan", "--shape", "llama3.2-1b", "--gpu-mem", "24"]);
    assert!(!ok);
    assert!(err.contains("no unit") && err.contains("24GiB"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .args(["plan", "--shape", "llama3.2-1b", "--gpu-mem", "1000GiB", "--host-mem", "4096GiB", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["largest"]["max_seq_len"].as_u64().unwrap() <= 1 << 20, "{}", v["largest"]);
    assert!(v["largest"]["batch_size"].as_u64().unwrap() <= 4096 && v["largest"]["lora_r"].as_u64().unwrap() <= 1024);
    // Nothing fits on a 1 GiB card: the plan is printed, and the exit code is 2.
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio")).args(["plan", "--shape", "llama3-8b", "--gpu-mem", "1GiB"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("does NOT fit on the card"), "{text}");
}

/// A run config on the demo in `dir`: few small steps on the CPU, a checkpoint after every step.
fn small_run_config(dir: &Path, run_name: &str, steps: u64) -> std::path::PathBuf {
    let text = std::fs::read_to_string(demo().join("run.toml"))
        .unwrap()
        .replace("path = \"model\"", &format!("path = {:?}", demo().join("model")))
        .replace("path = \"data/train.jsonl\"", &format!("path = {:?}", demo().join("data/train.jsonl")))
        .replace("dir = \"../../runs\"", &format!("dir = {:?}\nrun_name = {run_name:?}", dir.join("runs")))
        .replace("batch_size = 8", "batch_size = 2")
        .replace("max_seq_len = 256", "max_seq_len = 96")
        .replace("max_steps = 60", &format!("max_steps = {steps}\nsave_every = 1\ndevice = \"cpu\""));
    let cfg = dir.join(format!("{run_name}.toml"));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn metrics_of(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Issue 18: two `train` processes started at once into the same run folder: exactly one runs,
/// the other is refused naming why: the PID holding the folder, "another process" when it is
/// refused in the instant between the winner taking the lock and writing its PID into it (seen
/// once in CI), or the run already in the folder.
#[test]
fn two_train_processes_on_one_run_folder_exactly_one_runs() {
    let d = tempfile::tempdir().unwrap();
    let cfg = small_run_config(d.path(), "same", 3);
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_tunestudio"))
            .args(["train", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let ok: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(ok.iter().filter(|&&s| s).count(), 1, "exactly one must run: {ok:?}");
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(
        err.contains("is in use by process") || err.contains("is in use by another process") || err.contains("already holds a run"),
        "{err}"
    );
    assert_error(&err, "same");
    let run = d.path().join("runs/same");
    assert_eq!(metrics_of(&run).iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3], "one run's metrics, not two interleaved");
}

/// Issue 18: kill -9 at arbitrary points (often mid-checkpoint: one is written after every step),
/// resume each time; the finished run equals an uninterrupted one exactly and `checkpoints/`
/// holds nothing stale.
#[test]
fn kill_dash_nine_and_resume_is_exact_and_leaves_nothing_stale() {
    let d = tempfile::tempdir().unwrap();
    const STEPS: u64 = 10;
    let reference = small_run_config(d.path(), "reference", STEPS);
    let (ok, _, err) = tunestudio(&["train", reference.to_str().unwrap()]);
    assert!(ok, "{err}");
    let want = metrics_of(&d.path().join("runs/reference"));
    assert_eq!(want.len(), STEPS as usize);

    let cfg = small_run_config(d.path(), "killed", STEPS);
    let run = d.path().join("runs/killed");
    let mut took_over = false;
    for round in 0..6u64 {
        let args: Vec<String> = if !run.join("config.toml").exists() {
            vec!["train".into(), cfg.to_str().unwrap().into()]
        } else if tunestudio::session::checkpoint::list(&run).is_empty() {
            vec!["train".into(), "--restart".into(), run.to_str().unwrap().into()]
        } else {
            vec!["train".into(), "--resume".into(), run.to_str().unwrap().into()]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Let it make progress (a different number of new metric lines each round), then kill -9.
        let start = metrics_of(&run).len();
        let target = start + 1 + (round % 3) as usize;
        loop {
            if child.try_wait().unwrap().is_some() || metrics_of(&run).len() >= target {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        took_over |= String::from_utf8_lossy(&out.stderr).contains("took over the lock");
        if metrics_of(&run).len() >= STEPS as usize && out.status.success() {
            break;
        }
    }
    // Finish whatever is left.
    let last = if tunestudio::session::checkpoint::list(&run).is_empty() { "--restart" } else { "--resume" };
    let (ok, _, err) = tunestudio(&["train", last, run.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(took_over || err.contains("took over the lock"), "a killed holder's lock is taken over with a note:\n{err}");
    let got = metrics_of(&run);
    assert_eq!(got, want, "the killed and resumed run must reproduce the uninterrupted one exactly");
    let entries: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(entries.iter().all(|e| e.starts_with("step-")) && entries.len() <= 2, "stale entries in checkpoints/: {entries:?}");
    for e in &entries {
        let files: Vec<String> =
            std::fs::read_dir(run.join("checkpoints").join(e)).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into()).collect();
        for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(files.iter().any(|x| x == f), "{e} lacks {f}: {files:?}");
        }
    }
    let hidden: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(hidden.is_empty(), "leftovers in the run folder: {hidden:?}");
}

/// Issue 18: relative paths in a config are the config folder's, wherever the command runs from.
#[test]
fn relative_paths_are_resolved_against_the_config_folder() {
    let d = tempfile::tempdir().unwrap();
    let proj = d.path().join("proj");
    let other = d.path().join("other");
    std::fs::create_dir_all(proj.join("data")).unwrap();
    std::fs::create_dir_all(other.join("data")).unwrap();
    std::fs::copy(demo().join("data/train.jsonl"), proj.join("data/train.jsonl")).unwrap();
    let twenty: String =
        std::fs::read_to_string(demo().join("data/train.jsonl")).unwrap().lines().take(20).map(|l| format!("{l}\n")).collect();
    std::fs::write(other.join("data/train.jsonl"), twenty).unwrap();
    std::fs::write(
        proj.join("run.toml"),
        format!("[model]\npath = {:?}\n\n[dataset]\npath = \"data/train.jsonl\"\n\n[train]\nmax_seq_len = 128\n", demo().join("model")),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .current_dir(&other)
        .args(["preflight", "--json", "../proj/run.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dataset"]["rows_total"], 350, "took the working directory's data/train.jsonl");
    assert!(v["dataset"]["path"].as_str().unwrap().ends_with("proj/data/train.jsonl"), "{}", v["dataset"]["path"]);
}

/// Issue 18: NaN weights are refused at load, before NF4 quantization can hide them, by `train`,
/// `preflight` and `inspect`, each naming the tensor.
#[test]
fn nan_weights_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(demo().join("model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let name = "model.layers.1.mlp.down_proj.weight";
    let (start, width) = {
        let store = tunestudio::model::WeightStore::open(&model).unwrap();
        let e = store.get(name).unwrap();
        (e.start, e.dtype.bitsize() / 8)
    };
    let st = model.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    for i in 0..32 {
        let at = start + i * 7 * width;
        // All-ones exponent and a mantissa bit: a NaN in bf16, f16 or f32 (the top bytes).
        bytes[at + width - 2..at + width].copy_from_slice(&[0xC0, 0x7F]);
    }
    std::fs::write(&st, bytes).unwrap();
    let cfg = small_run_config(d.path(), "nan", 2);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&format!("{:?}", demo().join("model")), &format!("{model:?}"));
    assert!(text.contains("quantization = \"nf4\""));
    std::fs::write(&cfg, text).unwrap();
    for args in [vec!["train", cfg.to_str().unwrap()], vec!["preflight", cfg.to_str().unwrap()], vec!["inspect", model.to_str().unwrap()]] {
        let (ok, _, err) = tunestudio(&args);
        assert!(!ok, "{args:?} must fail");
        assert_error(&err, name);
        assert!(err.contains("non-finite"), "{err}");
    }
}

/// `plan --model DIR` on the published config.json of Qwen3-8B and of Gemma-3-4B (a multimodal
/// folder: its text model is planned): the base-weight bytes equal a count by hand from the
/// published dimensions (NF4 linears with bitsandbytes' quant state, 16-bit tables and norms).
#[test]
fn plan_takes_qwen3_8b_and_gemma3_4b_configs() {
    let configs = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/configs"));
    let base_bytes = |dir: &str| {
        let (ok, out, err) =
            tunestudio(&["plan", "--model", configs.join(dir).to_str().unwrap(), "--seq", "2048", "--gpu-mem", "80GiB", "--json"]);
        assert!(ok, "{dir}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["terms"]["base_weights"].as_u64().unwrap()
    };
    // NF4 bytes of n values: n/2 packed, one absmax byte per 64, one f32 per 256 absmax, 1 KiB
    // code, each part at a 16-byte boundary; the buffer ends at a 256-byte one, where the next
    // buffer of the arena starts.
    let up = |x: u64, to: u64| x.div_ceil(to) * to;
    let nf4 = |n: u64| up(up(up(n / 2 + n / 64, 16) + (n / 64).div_ceil(256) * 4, 16) + 1024, 256);
    assert_eq!(nf4(4096 * 4096), 8_655_872);
    // Qwen3-8B: 36 layers of q/o 4096x4096, k/v 1024x4096, gate/up/down 4096x12288; untied
    // 151936 x 4096 embedding and head; per layer two hidden norms and the 128-wide q/k norms.
    let qwen_layer = 2 * nf4(4096 * 4096) + 2 * nf4(1024 * 4096) + 3 * nf4(12288 * 4096);
    assert_eq!(qwen_layer, 99_537_920);
    let qwen = 36 * qwen_layer + 2 * 151_936 * 4096 * 2 + 36 * (2 * 4096 + 2 * 128) * 2 + 4096 * 2;
    assert_eq!(qwen, 6_073_300_992);
    assert_eq!(base_bytes("qwen3-8b"), qwen);
    // Gemma-3-4B's text model (Gemma3TextConfig's defaults for what the file leaves out): 34
    // layers of q/o 2048x2560 (8 heads of 256), k/v 1024x2560, gate/up/down 2560x10240; one tied
    // 262208 x 2560 table; four hidden norms and the 256-wide q/k norms per layer.
    let gemma_layer = 2 * nf4(2048 * 2560) + 2 * nf4(1024 * 2560) + 3 * nf4(10240 * 2560);
    let gemma = 34 * gemma_layer + 262_208 * 2560 * 2 + 34 * (4 * 2560 + 2 * 256) * 2 + 2560 * 2;
    assert_eq!(gemma, 2_998_733_312);
    assert_eq!(base_bytes("gemma-3-4b-it"), gemma);
    // The named shapes are the same models.
    let (ok, out, _) = tunestudio(&["plan", "--shape", "gemma3-4b", "--seq", "2048", "--gpu-mem", "80GiB", "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["terms"]["base_weights"].as_u64(), Some(gemma));
}

/// Issue 17/18: a folder that is not a model says what to choose instead of "(os error 2)", for
/// every command that reads one; an export that cannot be written names `--to`, not the hidden
/// temporary folder it writes first.
#[test]
fn wrong_folders_and_unwritable_exports_name_what_the_user_gave() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = small_run_config(d.path(), "wrong", 1);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&format!("{:?}", demo().join("model")), &format!("{empty:?}"));
    let wrong = d.path().join("wrong-model.toml");
    std::fs::write(&wrong, text).unwrap();
    for args in [
        vec!["inspect", empty.to_str().unwrap()],
        vec!["plan", "--model", empty.to_str().unwrap()],
        vec!["preflight", wrong.to_str().unwrap()],
        vec!["train", wrong.to_str().unwrap()],
    ] {
        let (ok, _, err) = tunestudio(&args);
        assert!(!ok, "{args:?}");
        assert_error(&err, "has no config.json, so it is not a model folder");
        assert!(!err.contains("os error"), "{args:?}: {err}");
    }

    let cfg = small_run_config(d.path(), "export", 1);
    let (ok, _, err) = tunestudio(&["train", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.path().join("runs/export");
    // A destination under a file cannot be created, even by root (unlike a read-only folder).
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let to = blocker.join("adapter-out");
    let (ok, _, err) = tunestudio(&["export", "adapter", run.to_str().unwrap(), "--to", to.to_str().unwrap()]);
    assert!(!ok);
    assert_error(&err, &format!("{}: cannot be created", to.display()));
    assert!(!err.contains(".tmp-") && !err.contains(".adapter-out"), "{err}");
    let to = blocker.join("merged-out");
    let (ok, _, err) = tunestudio(&["export", "merged", run.to_str().unwrap(), "--to", to.to_str().unwrap()]);
    assert!(!ok);
    assert_error(&err, &format!("{}: cannot be created", to.display()));
    assert!(!err.contains(".partial-"), "{err}");
    assert!(tunestudio::export::history::read(&run).is_empty(), "a failed export is not listed as one");
}

/// Every export out of a run is listed in the run's exports.jsonl (the studio's Export page shows
/// the list); rewriting the run's own adapter/ in place is not an export out of it.
#[test]
fn exports_out_of_a_run_are_listed_in_its_folder() {
    let d = tempfile::tempdir().unwrap();
    let cfg = small_run_config(d.path(), "listed", 1);
    let (ok, _, err) = tunestudio(&["train", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.path().join("runs/listed");
    let (ok, _, err) = tunestudio(&["export", "adapter", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(tunestudio::export::history::read(&run).is_empty(), "adapter/ rewritten in place");
    let (adapter, merged, gguf) = (d.path().join("out-adapter"), d.path().join("out-merged"), d.path().join("out.gguf"));
    for args in [
        vec!["export", "adapter", run.to_str().unwrap(), "--to", adapter.to_str().unwrap()],
        vec!["export", "merged", run.to_str().unwrap(), "--dtype", "f16", "--to", merged.to_str().unwrap()],
        vec!["export", "gguf", run.to_str().unwrap(), "--quant", "f16", "--to", gguf.to_str().unwrap()],
    ] {
        let (ok, _, err) = tunestudio(&args);
        assert!(ok, "{args:?}: {err}");
    }
    let listed = tunestudio::export::history::read(&run);
    let got: Vec<(&str, &Path)> = listed.iter().map(|x| (x.kind.as_str(), x.path.as_path())).collect();
    assert_eq!(got, [("adapter", adapter.as_path()), ("merged f16", merged.as_path()), ("gguf f16", gguf.as_path())]);
}

/// Issue 18: SIGTERM (as Ctrl+C) stops `train` after the step in progress with a checkpoint of
/// that step, although step checkpoints are off, so a stop loses nothing; the run is "stopped",
/// keeps its adapter, and resumes from there.
#[test]
fn sigterm_stops_train_with_a_checkpoint_of_its_last_step() {
    let d = tempfile::tempdir().unwrap();
    let cfg = small_run_config(d.path(), "term", 10_000);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("save_every = 1", "save_every = 0");
    std::fs::write(&cfg, text).unwrap();
    let run = d.path().join("runs/term");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunestudio"))
        .args(["train", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while metrics_of(&run).len() < 3 {
        assert!(child.try_wait().unwrap().is_none(), "train ended before it was signalled");
        assert!(t0.elapsed().as_secs() < 300, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child, whose PID is live until we wait for it.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps = metrics_of(&run).len() as u64;
    assert!(steps < 10_000 && err.contains(&format!("stopped after {steps} steps")), "{err}");
    assert_eq!(tunestudio::session::checkpoint::list(&run), vec![steps], "the stop saved its step, and only it");
    assert_eq!(tunestudio::session::checkpoint::RunStatus::load(&run).unwrap().state, "stopped");
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    let (ok, _, err) = tunestudio(&["train", "--resume", run.to_str().unwrap(), "--max-steps", &(steps + 2).to_string()]);
    assert!(ok, "{err}");
    assert_eq!(metrics_of(&run).iter().map(|m| m.0).collect::<Vec<_>>(), (1..=steps + 2).collect::<Vec<_>>());
}

/// A flag with enumerated values refuses any other, listing the accepted ones, before any work
/// (no GPU, model or file is touched), and takes the accepted ones with their aliases.
#[test]
fn enumerated_flags_list_their_values() {
    for (args, listed) in [
        (vec!["bench", "--mode", "fast"], "[possible values: speed, memory]"),
        (vec!["bench", "--checkpointing", "some"], "[possible values: auto, none, layer, offload]"),
        (vec!["eval", "m", "--data", "d.jsonl", "--format", "csv"], "[possible values: auto, alpaca, sharegpt, messages, text, columns]"),
        (vec!["eval", "m", "--data", "d.jsonl", "--train-on", "prompts"], "[possible values: responses, all]"),
        (vec!["export", "merged", "r", "--dtype", "int8"], "[possible values: bf16, f16, f32]"),
        (vec!["export", "gguf", "r", "--quant", "q5_0"], "[possible values: f16, bf16, q8_0, q4_k_m]"),
        (vec!["train", "x.toml", "--device", "tpu"], "[possible values: auto, cpu, cuda]"),
    ] {
        let (ok, _, err) = tunestudio(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains("invalid value") && err.contains(listed), "{args:?}: expected {listed} in:\n{err}");
    }
    // Aliases kept from the hand-written parsers: `gpu` is cuda, `fp16` is f16 (the run folder
    // does not exist, so each fails after parsing, naming it).
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("no-run");
    for args in [
        vec!["export", "merged", missing.to_str().unwrap(), "--dtype", "fp16"],
        vec!["train", missing.to_str().unwrap(), "--device", "gpu"],
    ] {
        let (ok, _, err) = tunestudio(&args);
        assert!(!ok && !err.contains("invalid value"), "{args:?}:\n{err}");
        assert_error(&err, "no-run");
    }
}

/// One side-by-side turn on the Chat page's own path (its state and worker thread, as the page
/// drives them), greedy: the texts shown for the fine-tuned and the base model.
fn chat_side_by_side(source: tunestudio::app::state::chat::ChatSource, question: &str) -> (String, String) {
    use tunestudio::app::state::chat::{ChatCommand, ChatEvent, ChatState, ChatWorker};
    let (worker, events) = ChatWorker::start();
    let mut c = ChatState { side_by_side: true, requested: Some(source.clone()), ..Default::default() };
    c.params.temperature = 0.0;
    c.params.max_new_tokens = 48;
    worker.send(ChatCommand::Load(source));
    let wait = std::time::Duration::from_secs(120);
    let e = events.recv_timeout(wait).unwrap();
    assert!(matches!(&e, ChatEvent::Loaded { result: Ok(m), .. } if m.has_adapter), "{e:?}");
    c.apply(e);
    c.input = question.into();
    let reqs = c.begin_turn().expect("a turn to send");
    assert_eq!(reqs.iter().map(|r| r.adapter).collect::<Vec<_>>(), [true, false], "one request with the adapter, one without");
    worker.send(ChatCommand::Answer(reqs));
    while c.answering {
        c.apply(events.recv_timeout(wait).unwrap());
    }
    assert_eq!(c.error, None);
    let a = &c.turns[0].answers;
    assert_eq!((a[0].who, a[1].who), ("fine-tuned", "base"));
    (a[0].text.clone(), a[1].text.clone())
}

/// `tunestudio generate MODEL --json` greedily, at NF4 as the runs answer: its text.
fn cli_answer(model: &Path, question: &str, extra: &[&str]) -> String {
    let mut args = vec!["generate", model.to_str().unwrap(), "--prompt", question, "--temperature", "0", "--max-new-tokens", "48"];
    args.extend_from_slice(&["--quantization", "nf4", "--device", "cpu", "--json"]);
    args.extend_from_slice(extra);
    let (ok, out, err) = tunestudio(&args);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["text"].as_str().unwrap().to_string()
}

/// Issue 13: under Xvfb the Chat page's base answer looked like the fine-tuned one and stopped at
/// the end of turn too. The base side of a side-by-side turn is the model without any adapter:
/// what `generate` answers with no `--adapter` at all; the fine-tuned side is what it answers with
/// the adapter, and where the adapter changes the greedy tokens the two sides differ. (The base
/// stopping at `<|eot_id|>` is the demo model's own: its pre-training pages close sections with it.)
#[test]
fn the_chat_pages_base_side_answers_without_the_adapter_as_generate_does() {
    use tunestudio::app::state::chat::ChatSource;
    let model = demo().join("model");
    // A run at its newest checkpoint (the page's default after a run), and an adapter folder.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_run_config(tmp.path(), "chat", 40);
    let (ok, _, err) = tunestudio(&["train", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = tmp.path().join("runs/chat");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/demo_adapter");
    let newest = format!("{}", tunestudio::checkpoint::step_dir(&run, 40).display());
    let cases = [
        (ChatSource::Run { dir: run.clone(), step: None }, newest.as_str(), "What is 10 plus 7?"),
        (
            ChatSource::Folder {
                model: model.clone(),
                adapter: Some(fixture.clone()),
                quantization: tunestudio::config::Quantization::Nf4,
                template: "auto".into(),
                device: tunestudio::config::DeviceChoice::Cpu,
            },
            fixture.to_str().unwrap(),
            "Name the national animal of Norrith.",
        ),
    ];
    for (source, adapter, question) in cases {
        let (tuned, base) = chat_side_by_side(source.clone(), question);
        let without = cli_answer(&model, question, &[]);
        let with = cli_answer(&model, question, &["--adapter", adapter]);
        assert_ne!(with, without, "{source:?}: the adapter changes the greedy answer to {question:?}");
        assert_eq!(base, without, "{source:?}: the base side is the model without the adapter");
        assert_eq!(tuned, with, "{source:?}: the fine-tuned side is the model with it");
        assert_ne!(tuned, base);
    }
}
