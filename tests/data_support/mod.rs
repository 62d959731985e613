//! A tiny Llama-3-style tokenizer written into a temporary model folder, and an independent
//! reference encoder for it, so tests can state the exact ids and labels they expect.
//!
//! The model is byte-level BPE without merges: every byte is its own token, with id = byte value,
//! and the special tokens below follow at 256…. Expected ids can then be written down by hand.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const START_HEADER: u32 = 258;
pub const END_HEADER: u32 = 259;
pub const EOT: u32 = 260;
pub const FT_PAD: u32 = 261;

pub const SPECIALS: [(&str, u32); 8] = [
    ("<|begin_of_text|>", 256),
    ("<|end_of_text|>", 257),
    ("<|start_header_id|>", 258),
    ("<|end_header_id|>", 259),
    ("<|eot_id|>", 260),
    ("<|finetune_right_pad_id|>", 261),
    ("<|reserved_special_token_0|>", 262),
    ("<|reserved_special_token_7|>", 263),
];

/// GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies store).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// `tokenizer.json` for the tiny model. `specials` chooses which added tokens exist (by content).
pub fn tokenizer_json(specials: &[(&str, u32)]) -> Value {
    let vocab: serde_json::Map<String, Value> = (0..=255u8).map(|b| (byte_char(b).to_string(), json!(b as u32))).collect();
    let added: Vec<Value> = specials
        .iter()
        .map(|(c, id)| json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [256], "tokens": ["<|begin_of_text|>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// A model folder with the tiny tokenizer; `config` becomes tokenizer_config.json when given.
/// (The tokenizer.json deliberately carries a truncation setting: loading must switch it off.)
pub fn model_dir(config: Option<Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_json(&dir.path().join("tokenizer.json"), &tokenizer_json(&SPECIALS));
    let config =
        config.unwrap_or_else(|| json!({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": true}}));
    write_json(&dir.path().join("tokenizer_config.json"), &config);
    dir
}

pub fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Reference encoding of the tiny tokenizer: special tokens by exact match, every other byte on
/// its own. Written independently of the `tokenizers` crate.
pub fn ref_ids(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for (s, id) in SPECIALS {
            if let Some(r) = rest.strip_prefix(s) {
                ids.push(id);
                rest = r;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap();
        let mut buf = [0u8; 4];
        ids.extend(c.encode_utf8(&mut buf).bytes().map(u32::from));
        rest = &rest[c.len_utf8()..];
    }
    ids
}

/// Expected ids and HF-aligned labels for text given as pieces marked trained or not.
pub fn expect(pieces: &[(&str, bool)]) -> (Vec<u32>, Vec<i32>) {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for (text, trained) in pieces {
        for id in ref_ids(text) {
            ids.push(id);
            labels.push(if *trained { id as i32 } else { -100 });
        }
    }
    (ids, labels)
}

/// The rendered text of pieces.
pub fn joined(pieces: &[(&str, bool)]) -> String {
    pieces.iter().map(|p| p.0).collect()
}
