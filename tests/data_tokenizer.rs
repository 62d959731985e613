//! `TokenizerBundle::load`: files it needs and how it reports them, special tokens in their
//! several spellings, and the pad-token choice.

mod data_support;

use data_support::*;
use serde_json::json;
use tunestudio::model::tokenizer::{PadSource, TokenizerBundle};

#[test]
fn missing_and_corrupt_tokenizer_json_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = TokenizerBundle::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    write(dir.path(), "tokenizer.json", "{\"version\": \"1.0\", \"model\": 3}");
    let e = TokenizerBundle::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("cannot be read"), "{e}");
}

#[test]
fn corrupt_tokenizer_config_names_file_and_line() {
    let dir = model_dir(None);
    write(dir.path(), "tokenizer_config.json", "{\n  \"bos_token\": \"<s>\",\n  oops\n}");
    let e = TokenizerBundle::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json:3:"), "{e}");
}

#[test]
fn encode_decode_and_saved_truncation_is_ignored() {
    let dir = model_dir(None);
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    // The saved tokenizer.json truncates to 4 tokens; loading must turn that off.
    let ids = tok.encode("hello world", false).unwrap();
    assert_eq!(ids, ref_ids("hello world"));
    assert_eq!(tok.encode("hi", true).unwrap(), vec![BOS, b'h' as u32, b'i' as u32]);
    assert_eq!(tok.decode(&[BOS, 104, 105, EOT], true).unwrap(), "hi");
    assert_eq!(tok.decode(&[BOS, 104, 105], false).unwrap(), "<|begin_of_text|>hi");
    assert_eq!(tok.token_text(EOT).as_deref(), Some("<|eot_id|>"));
    assert_eq!(tok.vocab_size(), 256 + SPECIALS.len());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(BOS), Some(EOT)));
    assert!(tok.is_special(EOT) && !tok.is_special(104));
}

#[test]
fn pad_prefers_declared_then_finetune_pad_then_reserved_then_eos() {
    // Declared (as an AddedToken object, in special_tokens_map.json).
    let dir = model_dir(None);
    write_json(&dir.path().join("special_tokens_map.json"), &json!({"pad_token": {"content": "<|reserved_special_token_0|>"}}));
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert_eq!((tok.pad_id(), tok.pad_source()), (262, PadSource::Declared));

    // Llama 3.1's reserved fine-tune pad token.
    let dir = model_dir(None);
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert_eq!((tok.pad_id(), tok.pad_source()), (FT_PAD, PadSource::Reserved));
    assert_eq!(tok.special_tokens().pad_token.as_deref(), Some("<|finetune_right_pad_id|>"));

    // Without it: the highest-numbered reserved special token.
    let dir = model_dir(None);
    let specials: Vec<_> = SPECIALS.iter().copied().filter(|(c, _)| !c.contains("finetune")).collect();
    write_json(&dir.path().join("tokenizer.json"), &tokenizer_json(&specials));
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    // (tokenizers renumbers added tokens densely, so look the id up rather than assume 263.)
    let seven = tok.token_id("<|reserved_special_token_7|>").unwrap();
    assert_eq!((tok.pad_id(), tok.pad_source()), (seven, PadSource::Reserved));

    // Nothing unused: EOS. The preflight's `pad_missing` says so; the tokenizer does not say it
    // again (one fact, one finding).
    let dir = model_dir(None);
    write_json(&dir.path().join("tokenizer.json"), &tokenizer_json(&SPECIALS[..5]));
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert_eq!((tok.pad_id(), tok.pad_source()), (EOT, PadSource::Eos));
    assert!(tok.warnings().is_empty(), "{:?}", tok.warnings());
}

#[test]
fn generation_config_adds_stop_ids_and_missing_eos() {
    let dir = model_dir(Some(json!({"bos_token": "<|begin_of_text|>"})));
    write_json(&dir.path().join("generation_config.json"), &json!({"eos_token_id": [257, 260], "bos_token_id": 256}));
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert_eq!(tok.eos_id(), Some(EOS));
    assert_eq!(tok.stop_ids(), &[EOS, EOT]);
    assert_eq!(tok.special_tokens().eos_token.as_deref(), Some("<|end_of_text|>"));
}

#[test]
fn chat_template_jinja_file_is_read_when_config_has_none() {
    let dir = model_dir(None);
    write(dir.path(), "chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}");
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert!(tok.chat_template().unwrap().contains("m.content"));
    assert_eq!(tok.resolve_template("auto").unwrap().origin(), "model");
    let e = tok.resolve_template("vicuna").unwrap_err().to_string();
    assert!(e.contains("dataset.template") && e.contains("llama-3"), "{e}");
}

#[test]
fn unknown_special_token_is_a_warning() {
    let dir = model_dir(Some(json!({"bos_token": "<s>", "eos_token": "<|eot_id|>"})));
    let tok = TokenizerBundle::load(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), None);
    assert!(tok.warnings().iter().any(|w| w.contains("bos_token `<s>`")), "{:?}", tok.warnings());
}
