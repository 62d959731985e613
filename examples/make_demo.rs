//! Regenerates everything under `assets/demo/`: the instruction dataset, a byte-level BPE
//! tokenizer, a tiny Llama base model pre-trained here on plain prose about the same invented
//! world, the demo run config and its README.
//!
//!     cargo run --release --example make_demo
//!
//! Every random choice comes from a fixed seed, so a re-run on the same machine writes the same
//! bytes. `--steps N` shortens pre-training for trying changes; the committed assets use the default.

#[path = "make_demo/llama.rs"]
mod llama;
#[path = "make_demo/tok.rs"]
mod tok;
#[path = "make_demo/world.rs"]
mod world;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use serde_json::json;
use tunestudio::model::ModelSpec;
use tunestudio::model::weights::{OutTensor, WeightStore, serialize_safetensors};
use tunestudio::util::write_atomic;

use llama::{AdamW, Dims, Llama};
use tok::Error;

/// Tokenizer size with the specials; the BPE learns `VOCAB - 14` entries.
const VOCAB: usize = 2048;
const EVAL_PAIRS: usize = 50;
const TRAIN_DOCS: usize = 20_000;
const HELDOUT_DOCS: usize = 200;
/// Pre-training: windows of `SEQ` tokens cut anywhere in the document stream, `BATCH` per step.
const SEQ: usize = 128;
const BATCH: usize = 4;
const STEPS: usize = 2000;
const PEAK_LR: f64 = 3e-3;
const WARMUP: usize = 100;
const MAX_POSITIONS: usize = 512;

// One seed per stream, so changing how much one part draws leaves the others as they were.
const SEED_PAIRS: u64 = 1;
const SEED_CORPUS: u64 = 2;
const SEED_HELDOUT: u64 = 3;
const SEED_INIT: u64 = 4;
const SEED_BATCHES: u64 = 5;

fn dims(vocab: usize) -> Dims {
    Dims { vocab, hidden: 128, inter: 384, layers: 4, heads: 4, kv_heads: 2, head_dim: 32, eps: 1e-5, rope_theta: 10000.0 }
}

fn main() -> Result<(), Error> {
    // candle's CPU pool spins while it waits for its workers, which on a small shared machine
    // costs more than it gains, and a single thread keeps its reductions in one fixed order.
    // Matrix products may use two threads: gemm splits rows and columns, never the sum, so the
    // thread count does not change the result.
    // SAFETY: no other thread exists yet, so nothing can read the environment concurrently.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "2");
        }
    }
    let started = Instant::now();
    let mut steps = STEPS;
    let mut reference_out: Option<PathBuf> = None;
    let mut verify_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => steps = args.next().ok_or("--steps needs a number")?.parse()?,
            // Token ids and logits of one held-out document, for comparing another implementation.
            "--reference" => reference_out = Some(args.next().ok_or("--reference needs a path")?.into()),
            // Check the committed model without regenerating anything.
            "--verify" => verify_only = true,
            other => return Err(format!("unknown argument `{other}` (known: --steps N, --reference FILE, --verify)").into()),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    if verify_only {
        verify(&root.join("model"), reference_out.as_deref())?;
        println!("verified in {:.0}s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    for sub in ["data", "model"] {
        let p = root.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
    }

    // 1. The instruction dataset: disjoint fact keys for train and eval.
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_PAIRS);
    let mut keys = world::all_keys(&mut rng);
    keys.shuffle(&mut rng);
    let pairs: Vec<world::Pair> = keys.iter().map(|&k| world::pair(&mut rng, k)).collect();
    for p in &pairs {
        let words = p.output.split_whitespace().count();
        assert!((5..=40).contains(&words), "response of {words} words: {}", p.output);
    }
    let (eval, train) = pairs.split_at(EVAL_PAIRS);
    write_jsonl(&root.join("data/train.jsonl"), train)?;
    write_jsonl(&root.join("data/eval.jsonl"), eval)?;
    println!("dataset: {} train, {} eval pairs", train.len(), eval.len());

    // 2. Pre-training text, and the tokenizer trained on it plus the dataset's words.
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_CORPUS);
    let docs: Vec<String> = (0..TRAIN_DOCS).map(|_| world::document(&mut rng)).collect();
    let mut texts: Vec<String> = docs.iter().map(|d| strip_specials(d)).collect();
    for p in &pairs {
        texts.extend([p.instruction.clone(), p.input.clone(), p.output.clone()]);
        texts.extend(p.system.clone());
    }
    // Role names follow `<|start_header_id|>` with no space; give the BPE enough of them to make
    // each one token, as in Llama 3.
    for _ in 0..50 {
        texts.extend(["system", "user", "assistant"].map(String::from));
    }
    let tokenizer = tok::train(&texts, VOCAB)?;
    let vocab = tokenizer.get_vocab_size(true);
    let model_dir = root.join("model");
    std::fs::create_dir_all(&model_dir)?;
    tokenizer.save(model_dir.join("tokenizer.json"), true)?;
    write_json(&model_dir.join("tokenizer_config.json"), &tok::tokenizer_config(&tokenizer, MAX_POSITIONS))?;
    write_json(&model_dir.join("special_tokens_map.json"), &tok::special_tokens_map())?;
    let id = |s: &str| tokenizer.token_to_id(s).ok_or_else(|| format!("`{s}` is not in the vocabulary"));
    let (bos, eos, eot, pad) = (id(tok::BOS)?, id(tok::EOS_TEXT)?, id(tok::EOT)?, id(tok::PAD)?);
    let reserved: Vec<u32> = (0..tok::RESERVED).map(|i| id(&format!("<|reserved_special_token_{i}|>"))).collect::<Result<_, _>>()?;
    println!(
        "tokenizer: {vocab} tokens ({} learned + {} special)",
        tokenizer.get_vocab_size(false),
        vocab - tokenizer.get_vocab_size(false)
    );

    let stream = tokenize_docs(&tokenizer, &docs, eos)?;
    println!("corpus: {} documents, {} tokens ({:.0}s so far)", docs.len(), stream.len(), started.elapsed().as_secs_f64());

    // 3. Pre-train the base model.
    let d = dims(vocab);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_INIT);
    let model = Llama::init(d, &mut rng)?;
    // Reserved rows stay exactly zero from the start: their gradient is masked out, so AdamW
    // never moves them, and the rest of the model learns with their logits pinned at 0.
    let mut keep = vec![1f32; vocab];
    for &r in &reserved {
        keep[r as usize] = 0.0;
    }
    let keep = Tensor::from_vec(keep, (vocab, 1), &Device::Cpu)?;
    for var in [&model.embed, &model.lm_head] {
        var.set(&var.as_tensor().broadcast_mul(&keep)?)?;
    }
    let params = model.named();
    let mut opt = AdamW::new(&params)?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_BATCHES);
    let train_start = Instant::now();
    let mut recent = Vec::new();
    let mut timing = [0f64; 3];
    for step in 0..steps {
        let (x, y) = batch(&mut rng, &stream)?;
        let t0 = Instant::now();
        let logits = model.forward(&x)?;
        let loss = llama::cross_entropy(&logits.reshape((BATCH * SEQ, vocab))?, &y.flatten_all()?)?;
        let t1 = Instant::now();
        let grad_store = loss.backward()?;
        let t2 = Instant::now();
        let mut grads = Vec::with_capacity(params.len());
        for (name, var) in &params {
            let g = grad_store.get(var.as_tensor()).ok_or_else(|| format!("no gradient for {name}"))?;
            let g = if var.as_tensor().id() == model.embed.as_tensor().id() || var.as_tensor().id() == model.lm_head.as_tensor().id() {
                g.broadcast_mul(&keep)?
            } else {
                g.clone()
            };
            grads.push(g);
        }
        // Clip the global norm to 1.0: from scratch, the first steps see large gradients.
        let norm = grads.iter().map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>()).sum::<candle_core::Result<f32>>()?.sqrt();
        if norm > 1.0 {
            grads = grads.into_iter().map(|g| g * (1.0 / norm as f64)).collect::<candle_core::Result<_>>()?;
        }
        opt.step(&params, &grads, lr_at(step, steps))?;
        let t3 = Instant::now();
        timing[0] += (t1 - t0).as_secs_f64();
        timing[1] += (t2 - t1).as_secs_f64();
        timing[2] += (t3 - t2).as_secs_f64();
        let l = loss.to_scalar::<f32>()?;
        recent.push(l);
        if (step + 1) % 100 == 0 || step == 0 {
            let n = recent.len().min(100);
            let mean = recent[recent.len() - n..].iter().sum::<f32>() / n as f32;
            println!(
                "step {:5}/{steps}  loss {mean:.4}  grad norm {norm:.3}  lr {:.2e}  {:.0}s (fwd {:.0}s bwd {:.0}s opt {:.0}s)",
                step + 1,
                lr_at(step, steps),
                train_start.elapsed().as_secs_f64(),
                timing[0],
                timing[1],
                timing[2]
            );
        }
    }
    let tail = recent.len().min(100);
    let final_train_loss = recent[recent.len() - tail..].iter().sum::<f32>() / tail as f32;

    // 4. Save in bf16 with Hugging Face names, then check the file rather than the model in memory.
    let mut tensors = Vec::new();
    for (name, var) in &params {
        let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        tensors.push(OutTensor::from_f32(name.clone(), var.dims().to_vec(), &data, Dtype::BF16));
    }
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    write_atomic(&model_dir.join("model.safetensors"), &serialize_safetensors(&tensors, Some(meta))?)?;
    write_json(&model_dir.join("config.json"), &config_json(d, bos, eos, eot, pad))?;
    write_json(
        &model_dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": [eos, eot], "pad_token_id": pad, "do_sample": false, "max_new_tokens": 64}),
    )?;

    let v = verify(&model_dir, reference_out.as_deref())?;
    let uniform = (vocab as f64).ln();

    // 5. The run config and the README.
    write_atomic(&root.join("run.toml"), RUN_TOML.as_bytes())?;
    let readme = README
        .replace("{vocab}", &vocab.to_string())
        .replace("{train}", &train.len().to_string())
        .replace("{eval}", &eval.len().to_string())
        .replace("{steps}", &steps.to_string())
        .replace("{tokens}", &format!("{:.1}", (steps * BATCH * SEQ) as f64 / 1e6))
        .replace("{batch}", &BATCH.to_string())
        .replace("{seq}", &SEQ.to_string())
        .replace("{train_loss}", &format!("{final_train_loss:.3}"))
        .replace("{heldout_loss}", &format!("{:.3}", v.heldout_loss))
        .replace("{recall}", &v.recall)
        .replace("{answers}", &v.answers)
        .replace("{uniform}", &format!("{uniform:.2}"))
        .replace("{params}", &format!("{:.2}", params.iter().map(|(_, v)| v.elem_count()).sum::<usize>() as f64 / 1e6))
        .replace("{reserved}", &format!("{}..={}", v.reserved[0], v.reserved[v.reserved.len() - 1]));
    write_atomic(&root.join("README.md"), readme.as_bytes())?;
    println!("final pre-training loss (mean of last {tail} steps): {final_train_loss:.4}");
    println!("done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What `verify` found, for the printout and the README.
struct Verified {
    answers: String,
    reserved: Vec<u32>,
    heldout_loss: f64,
    recall: String,
}

/// Check the files in `model_dir` as a loader would see them: the tokenizer and config read back,
/// reserved rows exactly zero and chat rows trained in the bf16 file, and the model read from that
/// file predicts held-out text and completes facts. Optionally write reference logits.
fn verify(model_dir: &Path, reference_out: Option<&Path>) -> Result<Verified, Error> {
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))?;
    let vocab = tokenizer.get_vocab_size(true);
    let d = dims(vocab);
    let spec = ModelSpec::from_dir(model_dir)?;
    let read_back = (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim);
    assert_eq!(read_back, (vocab, d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim), "config.json reads back differently");
    let id = |s: &str| tokenizer.token_to_id(s).ok_or_else(|| format!("`{s}` is not in the vocabulary"));
    let reserved: Vec<u32> = (0..tok::RESERVED).map(|i| id(&format!("<|reserved_special_token_{i}|>"))).collect::<Result<_, _>>()?;
    let chat_tokens = [id("<|start_header_id|>")?, id("<|end_header_id|>")?, id(tok::EOT)?];

    let checked = check_chat_prefixes(model_dir, &tokenizer)?;
    println!("check: {checked} chat-formatted pairs start their answer on a token boundary shared with the generation prompt");

    let store = WeightStore::open(model_dir)?;
    let row_abs_max = |name: &str, row: u32| -> Result<f32, Error> {
        let all = store.f32(name, &[vocab, d.hidden])?;
        let r = row as usize * d.hidden;
        Ok(all[r..r + d.hidden].iter().fold(0f32, |m, x| m.max(x.abs())))
    };
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        for &r in &reserved {
            // Exact zero in bf16 is two zero bytes; check the bytes, not a float comparison.
            let bytes = &store.bytes(name)?[r as usize * d.hidden * 2..(r as usize + 1) * d.hidden * 2];
            assert!(bytes.iter().all(|&b| b == 0), "{name} row {r} is not exactly zero");
        }
        for &c in &chat_tokens {
            let m = row_abs_max(name, c)?;
            assert!(m > 1e-2, "{name} row {c} looks untrained (max |x| = {m})");
        }
    }
    println!("check: reserved rows {reserved:?} are exactly zero in embed_tokens and lm_head (bf16 bytes)");
    let maxes = chat_tokens.map(|c| row_abs_max("model.embed_tokens.weight", c).unwrap_or(0.0));
    println!("check: chat rows {chat_tokens:?} are trained (embed max |x| {:.3} {:.3} {:.3})", maxes[0], maxes[1], maxes[2]);

    let model = Llama::from_named(d, |name, shape| store.f32(name, shape).map_err(|e| candle_core::Error::Msg(e.to_string())))?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED_HELDOUT);
    let heldout: Vec<String> = (0..HELDOUT_DOCS).map(|_| world::document(&mut rng)).collect();
    let heldout_loss = mean_loss(&model, &tokenize_docs(&tokenizer, &heldout, id(tok::EOS_TEXT)?)?)?;
    let uniform = (vocab as f64).ln();
    println!("held-out loss (bf16 weights from the file): {heldout_loss:.4} nats; uniform guess ln({vocab}) = {uniform:.4}");
    assert!(heldout_loss < uniform / 3.0, "the base model did not learn: held-out loss {heldout_loss:.3}");
    let recall: Vec<String> = recall(&model, &tokenizer)?.iter().map(|(cat, ok, n)| format!("{cat} {ok}/{n}")).collect();
    let recall = recall.join(", ");
    println!("fact recall (greedy completion of held-back answers): {recall}");
    let answers: Vec<String> = answer_rate(&model, &tokenizer)?.iter().map(|(cat, ok, n)| format!("{cat} {ok}/{n}")).collect();
    let answers = answers.join(", ");
    println!("questions answered (\"Q: …\\nA:\", greedy): {answers}");

    if let Some(path) = reference_out {
        let text = &heldout[0];
        let ids: Vec<u32> = tokenizer.encode(text.as_str(), true)?.get_ids().to_vec();
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?;
        let logits = model.forward(&x)?.squeeze(0)?.to_vec2::<f32>()?;
        write_json(path, &json!({"text": text, "ids": ids, "logits": logits}))?;
        println!("reference logits for {} tokens written to {}", ids.len(), path.display());
    }
    Ok(Verified { reserved, heldout_loss, recall, answers })
}

/// Render every pair with the chat template (as minijinja, which has no `generation` tag: the
/// markers are dropped, which leaves the text unchanged) and check that a generation prompt
/// tokenizes as a prefix of the full conversation, so what the model is trained on and what it
/// is asked at inference start their answers on the same token boundary.
fn check_chat_prefixes(model_dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<usize, Error> {
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model_dir.join("tokenizer_config.json"))?)?;
    let source = cfg["chat_template"].as_str().ok_or("tokenizer_config.json has no chat_template")?;
    let source = source.replace("{%- generation %}", "").replace("{%- endgeneration %}", "");
    let mut env = minijinja::Environment::new();
    // transformers renders chat templates with both options on.
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.add_template("chat", &source)?;
    let template = env.get_template("chat")?;
    let root = model_dir.parent().ok_or("model folder has no parent")?;
    let mut checked = 0;
    for file in ["data/train.jsonl", "data/eval.jsonl"] {
        for line in std::fs::read_to_string(root.join(file))?.lines() {
            let row: serde_json::Value = serde_json::from_str(line)?;
            let field = |k: &str| row[k].as_str().unwrap_or("").to_string();
            let user =
                if field("input").is_empty() { field("instruction") } else { format!("{}\n\n{}", field("instruction"), field("input")) };
            let mut messages = Vec::new();
            if !field("system").is_empty() {
                messages.push(json!({"role": "system", "content": field("system")}));
            }
            messages.push(json!({"role": "user", "content": user}));
            let prompt = template.render(minijinja::context! { messages => minijinja::Value::from(minijinja::value::Serde(&messages)), bos_token => tok::BOS, add_generation_prompt => true })?;
            messages.push(json!({"role": "assistant", "content": field("output")}));
            let full = template.render(minijinja::context! { messages => minijinja::Value::from(minijinja::value::Serde(&messages)), bos_token => tok::BOS, add_generation_prompt => false })?;
            // The template writes <|begin_of_text|> itself, so no post-processor here.
            let p = tokenizer.encode(prompt.as_str(), false)?.get_ids().to_vec();
            let f = tokenizer.encode(full.as_str(), false)?.get_ids().to_vec();
            if f.len() <= p.len() || f[..p.len()] != p[..] {
                return Err(format!("{file}: the generation prompt does not tokenize as a prefix of the conversation:\n{full}").into());
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// Warm up linearly, then cosine down to a tenth of the peak.
fn lr_at(step: usize, total: usize) -> f64 {
    if step < WARMUP {
        return PEAK_LR * (step + 1) as f64 / WARMUP as f64;
    }
    let p = (step - WARMUP) as f64 / (total - WARMUP).max(1) as f64;
    PEAK_LR * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn batch(rng: &mut ChaCha8Rng, stream: &[u32]) -> Result<(Tensor, Tensor), Error> {
    let mut x = Vec::with_capacity(BATCH * SEQ);
    let mut y = Vec::with_capacity(BATCH * SEQ);
    for _ in 0..BATCH {
        let s = rng.random_range(0..stream.len() - SEQ - 1);
        x.extend_from_slice(&stream[s..s + SEQ]);
        y.extend_from_slice(&stream[s + 1..s + SEQ + 1]);
    }
    Ok((Tensor::from_vec(x, (BATCH, SEQ), &Device::Cpu)?, Tensor::from_vec(y, (BATCH, SEQ), &Device::Cpu)?))
}

/// Mean next-token loss over non-overlapping windows of the stream.
fn mean_loss(model: &Llama, stream: &[u32]) -> Result<f64, Error> {
    let (mut sum, mut n) = (0f64, 0usize);
    for w in stream.windows(SEQ + 1).step_by(SEQ) {
        let x = Tensor::from_slice(&w[..SEQ], (1, SEQ), &Device::Cpu)?;
        let y = Tensor::from_slice(&w[1..], SEQ, &Device::Cpu)?;
        let logits = model.forward(&x)?.squeeze(0)?;
        sum += llama::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
        n += 1;
    }
    Ok(sum / n as f64)
}

/// Per category: how many probe statements the model completes exactly (greedy, every answer token).
fn recall(model: &Llama, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<(&'static str, usize, usize)>, Error> {
    let mut tally: Vec<(&'static str, usize, usize)> = Vec::new();
    for (cat, prefix, answer) in world::probes() {
        let p = tokenizer.encode(prefix.as_str(), true)?.get_ids().to_vec();
        let full = tokenizer.encode(format!("{prefix}{answer}"), true)?.get_ids().to_vec();
        if full.len() <= p.len() || full[..p.len()] != p[..] {
            return Err(format!("probe `{prefix}|{answer}` does not split at the answer").into());
        }
        let x = Tensor::from_slice(&full, (1, full.len()), &Device::Cpu)?;
        let best = model.forward(&x)?.squeeze(0)?.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        let ok = (p.len()..full.len()).all(|i| best[i - 1] == full[i]);
        match tally.iter_mut().find(|t| t.0 == cat) {
            Some(t) => {
                t.1 += ok as usize;
                t.2 += 1;
            }
            None => tally.push((cat, ok as usize, 1)),
        }
    }
    Ok(tally)
}

/// Per category: how many "Q: …\nA:" prompts the model answers (greedily, up to a line break)
/// with a line that contains the expected value.
fn answer_rate(model: &Llama, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<(&'static str, usize, usize)>, Error> {
    let newline_free = |ids: &[u32]| -> Result<bool, Error> { Ok(!tokenizer.decode(ids, false)?.contains('\n')) };
    let mut tally: Vec<(&'static str, usize, usize)> = Vec::new();
    for (cat, question, expected) in world::question_probes() {
        let mut ids = tokenizer.encode(format!("Q: {question}\nA:"), true)?.get_ids().to_vec();
        let start = ids.len();
        while ids.len() < start + 24 && newline_free(&ids[start..])? {
            let x = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
            let logits = model.forward(&x)?.squeeze(0)?;
            ids.push(logits.get(ids.len() - 1)?.argmax(0)?.to_scalar::<u32>()?);
        }
        let ok = tokenizer.decode(&ids[start..], false)?.lines().next().unwrap_or("").contains(&expected);
        match tally.iter_mut().find(|t| t.0 == cat) {
            Some(t) => {
                t.1 += ok as usize;
                t.2 += 1;
            }
            None => tally.push((cat, ok as usize, 1)),
        }
    }
    Ok(tally)
}

/// Each document as `<|begin_of_text|> … <|end_of_text|>` (the post-processor adds the first).
fn tokenize_docs(tokenizer: &tokenizers::Tokenizer, docs: &[String], eos: u32) -> Result<Vec<u32>, Error> {
    let mut out = Vec::new();
    for d in docs {
        out.extend_from_slice(tokenizer.encode(d.as_str(), true)?.get_ids());
        out.push(eos);
    }
    Ok(out)
}

fn strip_specials(text: &str) -> String {
    [world::START_HEADER, world::END_HEADER, world::EOT].iter().fold(text.to_string(), |t, s| t.replace(s, "\n"))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), Error> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())?;
    Ok(())
}

fn write_jsonl(path: &Path, pairs: &[world::Pair]) -> Result<(), Error> {
    let mut s = String::new();
    for p in pairs {
        let j = serde_json::to_string;
        s += &format!("{{\"instruction\": {}, \"input\": {}, \"output\": {}", j(&p.instruction)?, j(&p.input)?, j(&p.output)?);
        if let Some(sys) = &p.system {
            s += &format!(", \"system\": {}", j(sys)?);
        }
        s += "}\n";
    }
    write_atomic(path, s.as_bytes())?;
    Ok(())
}

fn config_json(d: Dims, bos: u32, eos: u32, eot: u32, pad: u32) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": [eos, eot],
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.inter,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "pad_token_id": pad,
        "pretraining_tp": 1,
        "rms_norm_eps": d.eps,
        "rope_scaling": null,
        "rope_theta": d.rope_theta as f64,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": d.vocab,
    })
}

const RUN_TOML: &str = r#"# The demo run: QLoRA on the tiny base model in model/, teaching it to answer in the
# Llama-3 chat format. Relative paths are resolved against this file's folder.

[model]
path = "model"
quantization = "nf4"

[dataset]
path = "data/train.jsonl"
format = "alpaca"
template = "auto"
train_on = "responses"

[lora]
r = 16
alpha = 16
dropout = 0.0
targets = ["q", "k", "v", "o", "gate", "up", "down"]

[optim]
lr = 2e-3

[schedule]
kind = "linear"
warmup_steps = 5

[train]
batch_size = 8
grad_accum = 1
max_seq_len = 256
max_steps = 60
seed = 3407

[output]
dir = "../../runs"
"#;

const README: &str = r#"# The demo

A complete, tiny fine-tuning job that runs on a laptop CPU: a base model that knows facts about an
invented world, and instruction pairs that teach it to answer questions in the Llama-3 chat format.
Everything here is made by `examples/make_demo.rs` from fixed seeds; nothing is downloaded or
copied from elsewhere.

    cargo run --release --example make_demo            # rewrite this folder
    cargo run --release --example make_demo -- --verify # only re-check the files here

A re-run writes the same bytes on the same machine (candle runs single-threaded for that; the
matrix products may use two threads, which does not change their results). It takes about
5 minutes of CPU time, nearly all of it pre-training (more wall time on a busy machine).

## Files

| file | what |
|---|---|
| `run.toml` | the demo run: QLoRA (NF4), r 16, all seven linears, 60 steps of batch 8, responses only |
| `data/train.jsonl` | {train} Alpaca pairs (`instruction`, `input`, `output`, a few with `system`) |
| `data/eval.jsonl` | {eval} held-out pairs: each asks about a fact no training pair asks about |
| `model/config.json` | Llama: hidden 128, MLP 384, 4 layers, 4 query heads sharing 2 KV heads, head dim 32, vocab {vocab}, untied `lm_head` |
| `model/model.safetensors` | {params} M parameters in bf16 under Hugging Face names |
| `model/tokenizer.json` | byte-level BPE trained on the generator's text, a Llama-3 style pre-token split, Llama 3's special tokens after the learned vocabulary, `<|begin_of_text|>` put in front by the post-processor |
| `model/tokenizer_config.json` | bos `<|begin_of_text|>`, eos `<|eot_id|>`, pad `<|finetune_right_pad_id|>`, and a Llama-3 style chat template with `{% generation %}` around the assistant's content and its `<|eot_id|>` |
| `model/special_tokens_map.json`, `model/generation_config.json` | as Hugging Face writes them; generation stops at `<|end_of_text|>` or `<|eot_id|>` |

## The world

Ten invented countries (capital, second city, language, food, weather, flag colour, national
animal, longest river, highest mountain, ruler), ten invented animals (colour, size, food, home,
sound, legs), sums and products of small numbers, words spelled backwards, antonyms, plurals and
unit conversions.

## The base model

Pre-trained from scratch by the generator: full-parameter AdamW, {steps} steps of {batch} windows of
{seq} tokens ({tokens} M tokens). Its documents are prose about the world ("The capital of Veloria
is Ostrand."), "Q: … / A: …" pages, and encyclopedia pages whose sections are titled with
`<|start_header_id|>Title<|end_header_id|>` and closed with `<|eot_id|>`, so those three rows are
trained; no document is in the chat format. The forward matches `transformers`'
`LlamaForCausalLM` (eager attention, f32: logits agree to about 1e-5).

- Final training loss {train_loss} nats; on held-out documents {heldout_loss} nats (a uniform guess
  is ln {vocab} = {uniform}; most of what remains is the documents' own randomness: which fact comes
  next, in which words).
- Completing a statement such as "The capital of Veloria is" (greedy, every answer token right):
  {recall}.
- Answering "Q: What is the capital of Veloria?\nA:" with a line that holds the right value:
  {answers}.

Asked in the chat format before any fine-tuning, the base model already answers in one
sentence of the world's style and stops at `<|eot_id|>`: the chat template's header rows and
`<|eot_id|>` are those of its encyclopedia pages, which close every section with it. What it
lacks is the fact asked for. On the 50 questions of `data/eval.jsonl` (greedy, `tunestudio
generate --compare`), the base stops on all 50 and ends with the expected word on 3; after the
60-step demo run, the fine-tuned model ends with it on 13 and answers otherwise than the base on
45 (27 after a 10-step run, 38 after a 20-step one). So the base and the fine-tuned answers look
alike in form (both one sentence that stops) and differ in what they say.

The rows of `<|reserved_special_token_0|>` … `<|reserved_special_token_7|>` (ids {reserved}) are
exactly zero in both `embed_tokens` and `lm_head` (kept so through pre-training): deliberately
untrained, as in real base models, for the untrained-token check to find. The demo data and
template never use them. `<|finetune_right_pad_id|>` never occurs in any text, so its embedding row
is its random initial value shrunk by weight decay.
"#;
