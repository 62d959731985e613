//! Preflight pieces: length statistics, steps per epoch, marked examples, tokenizer checks.

mod data_support;

use std::sync::Arc;

use data_support::*;
use serde_json::json;
use tunestudio::config::DatasetConfig;
use tunestudio::data::preflight::{LengthStats, Level, Marking, dataset_stats, mark_example, sample_examples, tokenizer_checks};
use tunestudio::data::{Batcher, prepare_dataset};
use tunestudio::model::tokenizer::TokenizerBundle;

#[test]
fn length_stats_and_histogram() {
    let s = LengthStats::of(&[1, 2, 3, 4, 100], 48);
    assert_eq!((s.min, s.max, s.p50), (1, 100, 3));
    assert!((s.mean - 22.0).abs() < 1e-9);
    // Range is max(48, 100) = 100 in 24 buckets of 5.
    assert_eq!(s.histogram.width, 5);
    assert_eq!(s.histogram.counts[0], 4);
    assert_eq!(*s.histogram.counts.last().unwrap(), 1);
    assert_eq!(s.histogram.counts.iter().sum::<usize>(), 5);
    let empty = LengthStats::of(&[], 16);
    assert_eq!((empty.min, empty.max, empty.histogram.counts.iter().sum::<usize>()), (0, 0, 0));
}

#[test]
fn stats_steps_and_marked_examples() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let mut text = String::new();
    for i in 0..10 {
        text.push_str(&format!("{}\n", json!({"instruction": format!("q{i}"), "output": "r".repeat(i + 1)})));
    }
    let data = write(model.path(), "d.jsonl", &text);
    // Prompts take 25 tokens, responses 2..=11: a 30-token budget truncates the longer ones.
    let ds = prepare_dataset(&DatasetConfig { path: data, ..Default::default() }, &tok, 30).unwrap();
    let batcher = Batcher::new(Arc::new(ds.examples.clone()), 3, 30, false, 1, tok.pad_id());
    let st = dataset_stats(&ds, &batcher, 2);
    assert_eq!(st.examples, 10);
    assert_eq!(st.micro_batches_per_epoch, 4);
    assert_eq!(st.steps_per_epoch, 2);
    assert_eq!(st.response.min, 2);
    assert!(st.truncated_rows > 0 && st.truncated_fraction > 0.0);
    assert_eq!(st.trained_tokens, ds.report.trained_tokens);
    assert!(st.padding_fraction > 0.0 && st.padding_fraction < 1.0);

    let m = mark_example(&tok, &ds.examples[0], Marking::Plain);
    assert_eq!(
        m.text,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq0<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[[r<|eot_id|>]]"
    );
    let ansi = mark_example(&tok, &ds.examples[0], Marking::Ansi);
    assert!(ansi.text.ends_with("\x1b[32mr<|eot_id|>\x1b[0m"), "{:?}", ansi.text);
    let three = sample_examples(&ds, &tok, Marking::Plain);
    assert_eq!(three.len(), 3);
    assert_eq!(three[0].row, 1);
}

#[test]
fn checks_on_a_sound_llama3_setup_find_nothing_to_warn_about() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let t = tok.resolve_template("auto").unwrap();
    let f = tokenizer_checks(&tok, &t);
    assert!(f.iter().all(|x| x.level == Level::Info), "{f:?}");
    // The tiny tokenizer adds BOS when encoding with special tokens, and the template writes it.
    assert!(f.iter().any(|x| x.code == "double_bos"), "{f:?}");
    assert!(f.iter().any(|x| x.code == "pad_reserved"), "{f:?}");
}

#[test]
fn checks_catch_missing_eos_generation_prompt_and_pad_eos() {
    // A template that ends responses with a newline and has no generation prompt or BOS.
    let tmpl = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    let model = model_dir(Some(json!({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|eot_id|>", "chat_template": tmpl
    })));
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let t = tok.resolve_template("auto").unwrap();
    let f = tokenizer_checks(&tok, &t);
    let codes: Vec<&str> = f.iter().map(|x| x.code).collect();
    for want in ["no_eos_in_response", "no_generation_prompt", "pad_is_eos", "no_bos_in_template"] {
        assert!(codes.contains(&want), "{want} missing from {f:?}");
    }
    let eos = f.iter().find(|x| x.code == "no_eos_in_response").unwrap();
    assert!(eos.message.contains("<|eot_id|>"), "{}", eos.message);
}

/// Issue 17: ChatML turns end in `<|im_end|>\n`. The stop token is inside the trained span (the
/// newline after it is trained too), so nothing warns that the model will not learn to stop; and
/// SmolLM2's pad = EOS is one note, not two warnings.
#[test]
fn chatml_turns_hold_their_stop_token_and_pad_eos_is_one_note() {
    let specials = [("<|endoftext|>", 256), ("<|im_start|>", 257), ("<|im_end|>", 258)];
    let tmpl = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let model = model_dir(Some(json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": tmpl
    })));
    write_json(&model.path().join("tokenizer.json"), &tokenizer_json(&specials));
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let t = tok.resolve_template("auto").unwrap();
    let f = tokenizer_checks(&tok, &t);
    assert!(!f.iter().any(|x| x.code == "no_eos_in_response"), "{f:?}");
    let pad: Vec<_> = f.iter().filter(|x| x.message.contains("pad")).collect();
    assert_eq!(pad.len(), 1, "{f:?}");
    assert_eq!((pad[0].code, pad[0].level), ("pad_is_eos", Level::Info), "{f:?}");
    assert!(f.iter().all(|x| x.level == Level::Info), "{f:?}");

    // The same turns with the assistant's text closed by a bare newline: no stop token is trained.
    let tmpl = "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + message['content'] + '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let model = model_dir(Some(json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": tmpl})));
    write_json(&model.path().join("tokenizer.json"), &tokenizer_json(&specials));
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let f = tokenizer_checks(&tok, &tok.resolve_template("auto").unwrap());
    let eos = f.iter().find(|x| x.code == "no_eos_in_response").expect("a turn without its stop token is found");
    assert!(eos.message.contains("<|im_end|>"), "{}", eos.message);
}
