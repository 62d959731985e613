//! Generation on the CPU reference backend: the cached forward against the training forward (in
//! f64, so any difference is a bug, not rounding), prefill against token-by-token decode and
//! against chunks, the per-row adapter switch against separate models, and the generator's
//! behaviour on the demo (seeds, stops, streaming, the prompt cache, side by side).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tunestudio::backend::cpu::CpuBackend;
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::data::Batch;
use tunestudio::engine::infer::{InferAdapter, InferOptions, Inference};
use tunestudio::engine::lora::LoraWeights;
mod model_support;
use model_support::RandomWeights;
use tunestudio::engine::{EngineOptions, TokenRows, Trainer};
use tunestudio::generate::{FinishReason, Generator, LoadOptions, Prompt, Request, SamplingParams, StreamEvent};
use tunestudio::model::ModelSpec;
use tunestudio::model::arch::{Family, MlpActivation, Rope, RopeScaling};
use tunestudio::model::chat_template::Message;

type B = CpuBackend<f64>;

fn spec(qkv_bias: bool, tied: bool) -> ModelSpec {
    ModelSpec {
        vocab_size: 29,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        qkv_bias,
        tie_word_embeddings: tied,
        rope_theta: 10000.0,
        ..ModelSpec::llama3_8b()
    }
}

/// Qwen3 in small: per-head q/k norms, a head_dim that is not hidden / heads.
fn qwen3() -> ModelSpec {
    ModelSpec { family: Family::Qwen3, model_type: "qwen3".into(), head_dim: 6, qk_norm: true, ..spec(false, false) }
}

/// Gemma 3 in small: (1 + w) norms around both blocks, q/k norms, GeGLU, the scaled embedding,
/// tied head, a sliding window of 3 on layer 0 with its own RoPE, a softmax scale of its own.
fn gemma3() -> ModelSpec {
    ModelSpec {
        family: Family::Gemma3,
        model_type: "gemma3_text".into(),
        qk_norm: true,
        norm_weight_offset: 1.0,
        sandwich_norms: true,
        mlp_activation: MlpActivation::GeluTanh,
        embed_scale: Some((16f32).sqrt()),
        attn_scale: Some(0.3),
        sliding_window: Some(3),
        sliding_layers: vec![true, false],
        local_rope: Some(Rope { theta: 100.0, scaling: None }),
        rope_scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        ..spec(false, true)
    }
}

/// An adapter on every target with random B (PEFT's zero B would make it the base), and two
/// trained token rows.
fn adapter(spec: &ModelSpec, tied: bool) -> InferAdapter {
    let lora = LoraConfig { r: 3, alpha: 5.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let mut weights = LoraWeights::init(spec, &lora, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for layer in &mut weights.layers {
        for p in layer.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.5..0.5));
        }
    }
    let d = spec.hidden_size;
    let rows = TokenRows {
        ids: vec![3, 17],
        embed: (0..2 * d).map(|_| rng.random_range(-1.0..1.0)).collect(),
        head: (!tied).then(|| (0..2 * d).map(|_| rng.random_range(-1.0..1.0)).collect()),
    };
    InferAdapter { lora, weights, token_rows: Some(rows) }
}

fn inference(
    spec: &ModelSpec,
    w: &RandomWeights,
    quant: Quantization,
    slots: usize,
    chunk: usize,
    a: Option<&InferAdapter>,
) -> Inference<B> {
    let opts = InferOptions { chunk_rows: chunk, ..InferOptions::new(quant, slots, 40) };
    Inference::new(B::new(), spec.clone(), w, opts, a).unwrap()
}

/// Σ −log p(ids[i] | ids[<i]) for i ≥ 1, from logits after each prefix.
fn loss_from_logits(ids: &[u32], logits: &[Vec<f32>]) -> f64 {
    (1..ids.len())
        .map(|i| {
            let l = &logits[i - 1];
            let m = l.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            lse - l[ids[i] as usize] as f64
        })
        .sum()
}

/// The training forward's loss over the same tokens, with or without the adapter.
fn trainer_loss(spec: &ModelSpec, w: &RandomWeights, quant: Quantization, a: Option<&InferAdapter>, ids: &[u32]) -> f64 {
    let (lora, weights) = match a {
        Some(a) => (a.lora.clone(), a.weights.clone()),
        None => (
            LoraConfig { r: 1, targets: vec![], ..LoraConfig::default() },
            LoraWeights { rank: 1, layers: vec![BTreeMap::new(); spec.num_layers] },
        ),
    };
    let opts = EngineOptions {
        lora,
        optim: OptimConfig::default(),
        quantization: quant,
        batch_size: 1,
        max_seq_len: ids.len(),
        checkpointing: CheckpointPolicy::None,
        seed: 0,
        mlp_chunk_rows: 0,
        saved_attention: tunestudio::engine::plan::SavedAttention::Off,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    };
    let mut tr = Trainer::new(B::new(), spec.clone(), w, opts, Some(&weights)).unwrap();
    if let Some(rows) = a.and_then(|a| a.token_rows.as_ref()) {
        tr.set_token_rows(rows).unwrap();
    }
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    tr.evaluate(&Batch::from_examples(&[(ids, &labels)], 0, None)).unwrap().sum
}

fn decode_all(inf: &mut Inference<B>, slot: usize, ids: &[u32]) -> Vec<Vec<f32>> {
    ids.iter().map(|&t| inf.forward(&[(slot, &[t])]).unwrap().pop().unwrap()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cached_decode_matches_the_training_forward() {
    let ids: Vec<u32> = vec![1, 3, 5, 17, 2, 3, 28, 0, 9, 17, 4];
    let cases = [
        (spec(false, false), Quantization::Bf16),
        (spec(true, true), Quantization::Bf16),
        (spec(false, false), Quantization::Nf4),
        (qwen3(), Quantization::Bf16),
        (gemma3(), Quantization::Bf16),
    ];
    for (s, quant) in cases {
        let (bias, tied) = (s.qkv_bias, s.tie_word_embeddings);
        let w = RandomWeights::new(&s, 5, 0.4);
        let a = adapter(&s, tied);
        for with_adapter in [false, true] {
            let aref = with_adapter.then_some(&a);
            let mut inf = inference(&s, &w, quant, 1, 64, aref);
            let logits = decode_all(&mut inf, 0, &ids);
            let ours = loss_from_logits(&ids, &logits);
            let train = trainer_loss(&s, &w, quant, aref, &ids);
            // Both in f64 (f32 only where logits leave the backend): agreement to f32 precision.
            assert!(
                (ours - train).abs() < 1e-4 * train.abs().max(1.0),
                "bias {bias} tied {tied} {quant:?} adapter {with_adapter}: {ours} vs {train}"
            );
        }
    }
}

#[test]
fn prefill_equals_decode_and_chunks() {
    let s = spec(true, false);
    let w = RandomWeights::new(&s, 6, 0.4);
    let a = adapter(&s, false);
    let ids: Vec<u32> = vec![4, 3, 9, 17, 12, 3, 1, 20, 22];
    let step = decode_all(&mut inference(&s, &w, Quantization::Bf16, 1, 64, Some(&a)), 0, &ids);
    for chunk in [64, 4, 1] {
        let mut inf = inference(&s, &w, Quantization::Bf16, 1, chunk, Some(&a));
        let whole = inf.forward(&[(0, &ids)]).unwrap().pop().unwrap();
        assert!(max_diff(&whole, step.last().unwrap()) < 1e-5, "chunk {chunk}");
        // The cache continues from there: one more token after a prefill.
        let next = inf.forward(&[(0, &[7])]).unwrap().pop().unwrap();
        let mut ref_inf = inference(&s, &w, Quantization::Bf16, 1, 64, Some(&a));
        let mut longer = ids.clone();
        longer.push(7);
        let want = ref_inf.forward(&[(0, &longer)]).unwrap().pop().unwrap();
        assert!(max_diff(&next, &want) < 1e-5, "chunk {chunk}: decode after prefill");
    }
}

#[test]
fn one_pass_answers_as_base_and_fine_tuned() {
    for tied in [false, true] {
        let s = spec(false, tied);
        let w = RandomWeights::new(&s, 7, 0.4);
        let a = adapter(&s, tied);
        // Prompts use the trained tokens 3 and 17.
        let p0: Vec<u32> = vec![3, 17, 5, 8];
        let p1: Vec<u32> = vec![17, 3, 3, 2, 11, 6];
        let mut both = inference(&s, &w, Quantization::Bf16, 2, 64, Some(&a));
        both.set_adapter(0, true).unwrap();
        both.set_adapter(1, false).unwrap();
        let out = both.forward(&[(0, &p0), (1, &p1)]).unwrap();
        let tuned = inference(&s, &w, Quantization::Bf16, 1, 64, Some(&a)).forward(&[(0, &p0)]).unwrap().pop().unwrap();
        let base = inference(&s, &w, Quantization::Bf16, 1, 64, None).forward(&[(0, &p1)]).unwrap().pop().unwrap();
        assert!(max_diff(&out[0], &tuned) < 1e-5, "tied {tied}: fine-tuned row");
        assert!(max_diff(&out[1], &base) < 1e-5, "tied {tied}: base row");
        assert!(
            max_diff(&tuned, &inference(&s, &w, Quantization::Bf16, 1, 64, None).forward(&[(0, &p0)]).unwrap()[0]) > 1e-2,
            "the adapter changes the answer"
        );
        // A batched decode step of both sequences equals their separate steps.
        let step = both.forward(&[(1, &[9]), (0, &[17])]).unwrap();
        let mut t1 = inference(&s, &w, Quantization::Bf16, 1, 64, Some(&a));
        let want0 = t1.forward(&[(0, &[p0.clone(), vec![17]].concat())]).unwrap().pop().unwrap();
        let mut b1 = inference(&s, &w, Quantization::Bf16, 1, 64, None);
        let want1 = b1.forward(&[(0, &[p1.clone(), vec![9]].concat())]).unwrap().pop().unwrap();
        assert!(max_diff(&step[0], &want1) < 1e-5 && max_diff(&step[1], &want0) < 1e-5, "tied {tied}: batched decode");
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let s = spec(false, false);
    let w = RandomWeights::new(&s, 1, 0.4);
    let mut inf = inference(&s, &w, Quantization::Bf16, 2, 8, None);
    let e = inf.forward(&[(2, &[1])]).unwrap_err().to_string();
    assert!(e.contains("slot 2"), "{e}");
    let e = inf.forward(&[(0, &[99])]).unwrap_err().to_string();
    assert!(e.contains("99") && e.contains("vocabulary"), "{e}");
    let e = inf.forward(&[(0, &[1; 41])]).unwrap_err().to_string();
    assert!(e.contains("context of 40"), "{e}");
    let e = inf.forward(&[(0, &[1]), (0, &[2])]).unwrap_err().to_string();
    assert!(e.contains("twice"), "{e}");
}

fn demo_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/model")
}

fn demo(slots: usize, adapter: bool) -> Generator<CpuBackend<f32>> {
    let mut o = LoadOptions::new(demo_dir());
    o.slots = slots;
    o.context = 256;
    if adapter {
        o.adapter = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/demo_adapter"));
    }
    Generator::open(CpuBackend::<f32>::new(), &o).unwrap()
}

fn ask(text: &str, params: SamplingParams, adapter: bool) -> Request {
    Request { prompt: Prompt::Chat(vec![Message::new("user", text)]), adapter, params, stop_strings: vec![], ignore_eos: false }
}

#[test]
fn the_same_seed_gives_the_same_answer_and_tokens_stream_in_order() {
    let mut g = demo(1, false);
    let params = SamplingParams { seed: 11, temperature: 1.0, max_new_tokens: 24, ..SamplingParams::default() };
    let cancel = AtomicBool::new(false);
    let mut streamed = String::new();
    let mut ids = Vec::new();
    let a = g
        .generate(&[ask("Tell me about the river.", params.clone(), false)], &cancel, &mut |e| {
            if let StreamEvent::Token { text, id, .. } = e {
                streamed.push_str(&text);
                ids.extend(id);
            }
        })
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(streamed, a.text, "the streamed pieces add up to the answer");
    assert_eq!(ids, a.tokens);
    let again = demo(1, false).generate(&[ask("Tell me about the river.", params.clone(), false)], &cancel, &mut |_| {}).unwrap();
    assert_eq!(again[0].tokens, a.tokens, "same seed, same tokens");
    let other = demo(1, false)
        .generate(&[ask("Tell me about the river.", SamplingParams { seed: 12, ..params }, false)], &cancel, &mut |_| {})
        .unwrap();
    assert_ne!(other[0].tokens, a.tokens, "another seed draws other tokens");
}

#[test]
fn answers_stop_at_the_end_of_turn_at_stop_strings_and_at_the_limit() {
    let mut g = demo(1, false);
    let eot = g.tokenizer().token_id("<|eot_id|>").unwrap();
    assert!(g.stop_ids().contains(&eot), "the template's end of turn stops generation");
    let cancel = AtomicBool::new(false);
    let greedy = g.generate(&[ask("What is the capital of France?", SamplingParams::greedy(64), false)], &cancel, &mut |_| {}).unwrap();
    let a = &greedy[0];
    assert_eq!(a.finish, FinishReason::Stop);
    assert_eq!(*a.tokens.last().unwrap(), eot);
    assert!(!a.text.contains("<|eot_id|>"), "{}", a.text);
    assert!(a.text.len() > 3, "{}", a.text);
    // A stop string taken from the middle of that answer cuts it there.
    let cut_word = a.text.split_whitespace().nth(2).unwrap().to_string();
    let mut req = ask("What is the capital of France?", SamplingParams::greedy(64), false);
    req.stop_strings = vec![cut_word.clone()];
    let mut shown = String::new();
    let s = g
        .generate(&[req], &cancel, &mut |e| {
            if let StreamEvent::Token { text, .. } = e {
                shown.push_str(&text);
            }
        })
        .unwrap();
    assert_eq!(s[0].finish, FinishReason::StopString);
    assert_eq!(s[0].text, a.text[..a.text.find(&cut_word).unwrap()], "cut before the stop string");
    assert_eq!(shown, s[0].text, "the stop string never reached the stream");
    let short = g.generate(&[ask("What is the capital of France?", SamplingParams::greedy(3), false)], &cancel, &mut |_| {}).unwrap();
    assert_eq!((short[0].finish, short[0].tokens.len()), (FinishReason::Length, 3));
    assert_eq!(short[0].tokens[..], a.tokens[..3]);
}

#[test]
fn a_conversation_reuses_its_cache_and_answers_as_a_fresh_model_would() {
    let mut g = demo(1, false);
    let cancel = AtomicBool::new(false);
    let mut msgs = vec![Message::new("user", "Where is Skarn?")];
    let first = g
        .generate(
            &[Request {
                prompt: Prompt::Chat(msgs.clone()),
                adapter: false,
                params: SamplingParams::greedy(30),
                stop_strings: vec![],
                ignore_eos: false,
            }],
            &cancel,
            &mut |_| {},
        )
        .unwrap();
    msgs.push(Message::new("assistant", first[0].text.clone()));
    msgs.push(Message::new("user", "And how big is it?"));
    let req = Request {
        prompt: Prompt::Chat(msgs.clone()),
        adapter: false,
        params: SamplingParams::greedy(30),
        stop_strings: vec![],
        ignore_eos: false,
    };
    let mut reused = 0;
    let second = g
        .generate(std::slice::from_ref(&req), &cancel, &mut |e| {
            if let StreamEvent::Prefilled { cached, .. } = e {
                reused = cached;
            }
        })
        .unwrap();
    assert!(reused > 10, "the first turn stayed cached ({reused} tokens reused)");
    let fresh = demo(1, false).generate(&[req], &cancel, &mut |_| {}).unwrap();
    assert_eq!(second[0].tokens, fresh[0].tokens);
}

#[test]
fn side_by_side_equals_two_separate_answers() {
    let cancel = AtomicBool::new(false);
    let params = SamplingParams { seed: 3, temperature: 0.8, max_new_tokens: 20, ..SamplingParams::default() };
    let q = "Write a short line about the sea.";
    let both = demo(2, true).generate(&[ask(q, params.clone(), true), ask(q, params.clone(), false)], &cancel, &mut |_| {}).unwrap();
    let tuned = demo(1, true).generate(&[ask(q, params.clone(), true)], &cancel, &mut |_| {}).unwrap();
    let base = demo(1, false).generate(&[ask(q, params, false)], &cancel, &mut |_| {}).unwrap();
    assert_eq!(both[0].tokens, tuned[0].tokens, "fine-tuned side");
    assert_eq!(both[1].tokens, base[0].tokens, "base side");
}

/// Samples during training keep one generator and give it the Trainer's newer LoRA weights
/// (`Generator::replace_lora`): it must then answer as a generator opened with those weights,
/// with nothing of the old ones left in its cache.
#[test]
fn replaced_lora_weights_answer_as_a_generator_opened_with_them() {
    let cancel = AtomicBool::new(false);
    let spec = tunestudio::model::spec_of_folder(&demo_dir()).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop/demo_adapter");
    let loaded = tunestudio::adapter::load_peft(&fixture, &spec).unwrap();
    // Other weights of the same shape: the fixture's, with B scaled and its sign flipped.
    let mut other = loaded.weights.clone();
    other.layers.iter_mut().flat_map(|l| l.values_mut()).for_each(|p| p.b.iter_mut().for_each(|x| *x *= -3.0));
    let dir = tempfile::tempdir().unwrap();
    tunestudio::adapter::AdapterFiles { spec: &spec, weights: &other, lora: &loaded.lora, base_model: "demo", tokens: None }
        .save(dir.path())
        .unwrap();
    let params = SamplingParams { seed: 5, temperature: 0.8, max_new_tokens: 24, ..SamplingParams::default() };
    let q = "Write a short line about the sea.";

    let mut g = demo(1, true);
    let before = g.generate(&[ask(q, params.clone(), true)], &cancel, &mut |_| {}).unwrap();
    g.replace_lora(&other).unwrap();
    let after = g.generate(&[ask(q, params.clone(), true)], &cancel, &mut |_| {}).unwrap();
    let mut o = LoadOptions::new(demo_dir());
    o.context = 256;
    o.adapter = Some(dir.path().to_path_buf());
    let opened = Generator::open(CpuBackend::<f32>::new(), &o).unwrap().generate(&[ask(q, params, true)], &cancel, &mut |_| {}).unwrap();
    assert_eq!(after[0].tokens, opened[0].tokens);
    assert_ne!(after[0].tokens, before[0].tokens, "the new weights answer otherwise");

    // Weights of another shape are refused (a run's LoRA never changes shape while it trains).
    let mut fewer = other.clone();
    fewer.layers.pop();
    let e = g.replace_lora(&fewer).unwrap_err().to_string();
    assert!(e.contains("other targets or another rank"), "{e}");
}
