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
    // The cap is held on top of the card: a 12 GB card capped at 4 GiB.
    let (ok, out, err) = tunestudio(&["plan", "--shape", "llama3-8b", "--seq", "2048", "--card", "rtx3060", "--gpu-mem", "4GiB", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
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
        let (ok, out, err) =
            tunestudio(&["plan", "--shape", "llama3-8b", "--seq", "32768", "--gpu-mem", "24GiB", "--host-mem", host, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
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
    let (ok, text, _) = tunestudio(&["plan", "--shape", "llama3-8b", "--seq", "32768", "--gpu-mem", "24GiB", "--host-mem", "4GiB"]);
    assert!(ok && text.contains("of 4.00 GiB RAM available: does NOT fit"), "{text}");
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
    // NF4 bytes of n values: n/2 packed, one absmax byte per 64, one f32 per 256 absmax, 1 KiB code.
    let nf4 = |n: u64| n / 2 + n / 64 + (n / 64).div_ceil(256) * 4 + 1024;
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
    assert_eq!(gemma, 2_998_724_608);
    assert_eq!(base_bytes("gemma-3-4b-it"), gemma);
    // The named shapes are the same models.
    let (ok, out, _) = tunestudio(&["plan", "--shape", "gemma3-4b", "--seq", "2048", "--gpu-mem", "80GiB", "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["terms"]["base_weights"].as_u64(), Some(gemma));
}
