//! Dataset formats end to end: file → rows → rendered text → token ids and labels, against a tiny
//! byte-level tokenizer whose expected ids are written down independently (`data_support`).

mod data_support;

use data_support::*;
use serde_json::json;
use tunestudio::config::{ColumnMapping, DatasetConfig, DatasetFormat, LongRows, TrainOn};
use tunestudio::data::prepare_dataset;
use tunestudio::model::tokenizer::TokenizerBundle;

const H_SYS: &str = "<|start_header_id|>system<|end_header_id|>\n\n";
const H_USER: &str = "<|start_header_id|>user<|end_header_id|>\n\n";
const H_ASSIST: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";
const EOT_S: &str = "<|eot_id|>";

fn cfg(path: &std::path::Path) -> DatasetConfig {
    DatasetConfig { path: path.to_path_buf(), ..DatasetConfig::default() }
}

fn tok(dir: &tempfile::TempDir) -> TokenizerBundle {
    TokenizerBundle::load(dir.path()).unwrap()
}

#[test]
fn alpaca_jsonl_with_builtin_llama3_template() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(
        model.path(),
        "a.jsonl",
        "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n{\"instruction\": \"Hi\", \"input\": \"\", \"output\": \"Yo\", \"system\": \"Be kind\"}\n",
    );
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Alpaca);
    assert_eq!(ds.report.template, "builtin:llama-3");
    assert_eq!(ds.examples.len(), 2);

    let first = [("<|begin_of_text|>", false), (H_USER, false), ("Add\n\n1 2<|eot_id|>", false), (H_ASSIST, false), ("3<|eot_id|>", true)];
    let (ids, labels) = expect(&first);
    assert_eq!(ds.examples[0].input_ids, ids, "{:?}", tok.decode(&ds.examples[0].input_ids, false));
    assert_eq!(ds.examples[0].labels, labels);
    assert_eq!(ds.examples[0].row, 1);

    let second = [
        ("<|begin_of_text|>", false),
        (H_SYS, false),
        ("Be kind<|eot_id|>", false),
        (H_USER, false),
        ("Hi<|eot_id|>", false),
        (H_ASSIST, false),
        ("Yo<|eot_id|>", true),
    ];
    assert_eq!((ds.examples[1].input_ids.clone(), ds.examples[1].labels.clone()), expect(&second));
    // The end-of-turn token is trained: the model must learn to stop.
    assert_eq!(*ds.examples[1].labels.last().unwrap(), EOT as i32);
    assert_eq!(ds.report.trained_tokens, 2 + 3);
}

#[test]
fn sharegpt_multi_turn_trains_every_assistant_turn() {
    let model = model_dir(None);
    let tok = tok(&model);
    let rec = json!({"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "a"},
        {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c"},
        {"from": "gpt", "value": " d "}
    ]});
    let data = write(model.path(), "s.jsonl", &format!("{rec}\n"));
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Sharegpt);
    let pieces = [
        ("<|begin_of_text|>", false),
        (H_SYS, false),
        ("S<|eot_id|>", false),
        (H_USER, false),
        ("a<|eot_id|>", false),
        (H_ASSIST, false),
        ("b<|eot_id|>", true),
        (H_USER, false),
        ("c<|eot_id|>", false),
        (H_ASSIST, false),
        // Meta's template strips content; ours does too.
        ("d<|eot_id|>", true),
    ];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
}

/// An HF-style Llama 3 template without generation blocks, as models ship it.
const HF_LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

#[test]
fn openai_messages_with_model_template_mask_the_responses() {
    let model = model_dir(Some(json!({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": false},
        "eos_token": "<|eot_id|>",
        "chat_template": HF_LLAMA3
    })));
    let tok = tok(&model);
    assert_eq!(tok.chat_template(), Some(HF_LLAMA3));
    let rec = json!({"messages": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "r2"}
    ]});
    let data = write(model.path(), "m.jsonl", &format!("{rec}\n"));
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Messages);
    assert_eq!(ds.report.template, "model");
    // It renders these chats exactly as the built-in llama-3 does, whose blocks then mark the
    // responses; rendering prefixes (the same template without a donor) finds the same labels.
    assert_eq!(ds.report.mask, tunestudio::data::MaskSource::EquivalentBuiltin);
    let specials = tunestudio::model::chat_template::SpecialTokens { bos_token: Some("<|begin_of_text|>".into()), ..Default::default() };
    let plain = tunestudio::model::chat_template::ChatTemplate::new(HF_LLAMA3, "plain", specials).unwrap();
    assert!(plain.span_donor().is_none());
    let msgs = ["q1", "r1", "q2", "r2"]
        .iter()
        .enumerate()
        .map(|(i, c)| tunestudio::model::chat_template::Message::new(if i % 2 == 0 { "user" } else { "assistant" }, *c))
        .collect();
    let by_prefixes =
        tunestudio::data::encode::Encoder { tok: &tok, template: Some(&plain), train_on: TrainOn::Responses, max_tokens: None }
            .encode(&tunestudio::data::format::Sample::Chat(msgs), false)
            .unwrap();
    assert_eq!(by_prefixes.mask, tunestudio::data::MaskSource::RenderedPrefixes);
    assert_eq!((&by_prefixes.input_ids, &by_prefixes.labels), (&ds.examples[0].input_ids, &ds.examples[0].labels));
    let pieces = [
        ("<|begin_of_text|>", false),
        (H_USER, false),
        ("q1<|eot_id|>", false),
        (H_ASSIST, false),
        ("r1<|eot_id|>", true),
        (H_USER, false),
        ("q2<|eot_id|>", false),
        (H_ASSIST, false),
        ("r2<|eot_id|>", true),
    ];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
}

/// Qwen3's layout as a model ships it (no generation blocks): earlier reasoning is dropped once a
/// later user turn follows, so rendering prefixes cannot find the responses; the built-in qwen3
/// renders the same text and marks them: the first answer alone, the last with its <think> block.
/// With `enable_thinking = false` the last turn's empty block is prompt.
#[test]
fn qwen3_thinking_chats_train_the_right_spans() {
    let builtin = tunestudio::model::chat_template::ChatTemplate::builtin("qwen3", Default::default()).unwrap();
    let shipped = builtin.source().replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "");
    let model = model_dir(Some(json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": shipped})));
    let tok = tok(&model);
    let rec = json!({"messages": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nt1\n</think>\n\nr1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nt2\n</think>\n\nr2"}
    ]});
    let plain = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]});
    let data = write(model.path(), "m.jsonl", &format!("{rec}\n{plain}\n"));
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.mask, tunestudio::data::MaskSource::EquivalentBuiltin);
    let pieces = [
        ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n", false),
        ("r1<|im_end|>", true),
        ("\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n", false),
        ("<think>\nt2\n</think>\n\nr2<|im_end|>", true),
        ("\n", false),
    ];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
    let thinking =
        [("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", false), ("<think>\n\n</think>\n\nr<|im_end|>", true), ("\n", false)];
    assert_eq!((ds.examples[1].input_ids.clone(), ds.examples[1].labels.clone()), expect(&thinking));
    let mut c = cfg(&data);
    c.template_kwargs.insert("enable_thinking".into(), toml::Value::Boolean(false));
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    let no_thinking =
        [("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", false), ("r<|im_end|>", true), ("\n", false)];
    assert_eq!((ds.examples[1].input_ids.clone(), ds.examples[1].labels.clone()), expect(&no_thinking));
}

#[test]
fn template_that_rewrites_earlier_turns_is_refused_per_row_with_a_reason() {
    // Puts the number of turns into the first line: every prefix renders differently.
    let tmpl = "{{ messages|length }}{% for m in messages %}|{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}";
    let model = model_dir(Some(json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": tmpl})));
    let tok = tok(&model);
    let rec = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]});
    let data = write(model.path(), "m.jsonl", &format!("{rec}\n"));
    let e = prepare_dataset(&cfg(&data), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("line 1:") && e.contains("renders turn 2 differently"), "{e}");
}

#[test]
fn named_template_list_and_generation_blocks_in_model_template() {
    let tool = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let default = "{% for m in messages %}[{{ m.role }}]{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|eot_id|>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
    let model = model_dir(Some(json!({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool}]
    })));
    let tok = tok(&model);
    assert_eq!(tok.chat_templates().map(|(n, _)| n).collect::<Vec<_>>(), vec!["default", "tool_use"]);
    let data = write(model.path(), "a.json", "[{\"instruction\": \"x\", \"output\": \"y\"}]");
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.mask, tunestudio::data::MaskSource::GenerationBlocks);
    let pieces = [("[user]x[assistant]", false), ("y<|eot_id|>", true)];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));

    // A built-in by name overrides the model's template.
    let mut c = cfg(&data);
    c.template = "chatml".into();
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    assert_eq!(ds.report.template, "builtin:chatml");
    let pieces = [("<|begin_of_text|><|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", false), ("y<|im_end|>", true), ("\n", false)];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
}

#[test]
fn raw_text_is_bos_text_eos_all_trained() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(model.path(), "t.jsonl", "{\"text\": \"héllo\"}\n");
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Text);
    let (ids, labels) = expect(&[("<|begin_of_text|>héllo<|eot_id|>", true)]);
    assert_eq!(ds.examples[0].input_ids, ids);
    assert_eq!(ds.examples[0].labels, labels);
    assert_eq!(ds.examples[0].trained_tokens(), ids.len() - 1);
}

#[test]
fn column_mapping_and_train_on_all() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(model.path(), "c.jsonl", "{\"question\": \"Q\", \"context\": \"C\", \"answer\": \"A\"}\n");
    let mut c = cfg(&data);
    c.columns = ColumnMapping { prompt: vec!["question".into(), "context".into()], response: "answer".into(), system: None };
    c.train_on = TrainOn::All;
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Columns);
    let text = format!("<|begin_of_text|>{H_USER}Q\n\nC{EOT_S}{H_ASSIST}A{EOT_S}");
    let (ids, labels) = expect(&[(&text, true)]);
    assert_eq!(ds.examples[0].input_ids, ids);
    assert_eq!(ds.examples[0].labels, labels);
}

#[test]
fn long_rows_truncate_or_drop() {
    let model = model_dir(None);
    let tok = tok(&model);
    let long = "x".repeat(100);
    let data = write(
        model.path(),
        "l.jsonl",
        &format!("{}\n{}\n", json!({"instruction": "q", "output": long}), json!({"instruction": long, "output": "r"})),
    );
    // Prompt scaffolding of the first row is 1 + 10+5+… bytes; 64 tokens keep part of the response.
    let mut c = cfg(&data);
    c.max_bad_fraction = 1.0;
    let ds = prepare_dataset(&c, &tok, 64).unwrap();
    assert_eq!(ds.report.truncated_rows, 1);
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(ds.examples[0].input_ids.len(), 64);
    assert!(ds.report.lengths[0].original_tokens > 100);
    // The second row's prompt alone fills the budget: nothing trained remains, so it is skipped.
    assert_eq!(ds.report.rows_skipped.len(), 1);
    assert_eq!(ds.report.rows_skipped[0].row, 2);
    assert!(ds.report.rows_skipped[0].reason.contains("nothing trained"), "{:?}", ds.report.rows_skipped);

    c.long_rows = LongRows::Drop;
    let ds = prepare_dataset(&c, &tok, 64).unwrap_err().to_string();
    assert!(ds.contains("none of the 2 rows") && ds.contains("long_rows"), "{ds}");
}

#[test]
fn json_array_rows_are_reported_by_line() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(
        model.path(),
        "d.json",
        "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"a\"},\n  {\"instruction\": \"c\",\n   \"output\": \"\"}\n]\n",
    );
    let mut c = cfg(&data);
    c.max_bad_fraction = 1.0;
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    let skipped: Vec<(usize, Option<usize>, &str)> = ds.report.rows_skipped.iter().map(|s| (s.row, s.record, s.reason.as_str())).collect();
    assert_eq!(
        skipped,
        vec![(3, Some(2), "missing column `output`"), (4, Some(3), "column `output` is empty: the row has no response to train on")]
    );
    // Issue 17: the line, and the item of the array a program reading it sees.
    let places: Vec<String> = ds.report.rows_skipped.iter().map(|s| s.place(&ds.report.file_kind)).collect();
    assert_eq!(places, vec!["line 3 (record 2, index 1)", "line 4 (record 3, index 2)"]);
    assert_eq!(ds.report.rows_skipped[0].place("JSONL"), "line 3 (record 2, index 1)");
    let jsonl = tunestudio::data::SkippedRow { row: 7, record: None, reason: String::new() };
    assert_eq!((jsonl.place("JSONL"), jsonl.place("Parquet")), ("line 7".to_string(), "row 7".to_string()));
}

/// Issue 18: a row of hundreds of kilobytes is tokenized only as far as max_seq_len needs, and
/// what training gets is what tokenizing it whole and truncating gives.
#[test]
fn a_very_long_row_is_tokenized_only_as_far_as_training_needs() {
    use tunestudio::data::encode::Encoder;
    use tunestudio::data::format::Sample;
    use tunestudio::model::chat_template::Message;
    let model = model_dir(None);
    let tok = tok(&model);
    let long: String = (0..60_000).map(|i| format!("w{} ", i % 97)).collect();
    let template = tok.resolve_template("auto").unwrap();
    let sample = Sample::Chat(vec![Message::new("user", "Say it all."), Message::new("assistant", long.clone())]);
    let whole =
        Encoder { tok: &tok, template: Some(&template), train_on: TrainOn::Responses, max_tokens: None }.encode(&sample, false).unwrap();
    let part = Encoder { tok: &tok, template: Some(&template), train_on: TrainOn::Responses, max_tokens: Some(64) }
        .encode(&sample, false)
        .unwrap();
    assert!(!whole.cut && part.cut);
    assert!(whole.input_ids.len() > long.len() && part.input_ids.len() < 2000, "{}", part.input_ids.len());
    assert_eq!(part.input_ids[..64], whole.input_ids[..64]);
    assert_eq!(part.labels[..64], whole.labels[..64]);
    // The whole length is estimated from the prefix (exact here: one token per byte).
    let err = part.total_tokens.abs_diff(whole.total_tokens) as f64 / whole.total_tokens as f64;
    assert!(err < 0.01, "{} vs {}", part.total_tokens, whole.total_tokens);
    // Raw text: BOS, the first tokens, and no EOS in the middle of the text.
    let text = Sample::Text(long.clone());
    let part = Encoder { tok: &tok, template: None, train_on: TrainOn::All, max_tokens: Some(64) }.encode(&text, false).unwrap();
    assert!(part.cut && part.input_ids[0] == BOS && !part.input_ids.contains(&tok.eos_id().unwrap()));
    assert_eq!(part.input_ids[1..65], ref_ids(&long)[..64]);

    // Through the dataset: truncated, counted, with the first max_seq_len tokens of the whole row.
    let data = write(model.path(), "long.jsonl", &format!("{}\n", json!({"instruction": "Say it all.", "output": long})));
    let ds = prepare_dataset(&cfg(&data), &tok, 64).unwrap();
    assert_eq!(ds.report.truncated_rows, 1);
    assert_eq!(ds.examples[0].input_ids, whole.input_ids[..64]);
    assert!(ds.report.lengths[0].original_tokens.abs_diff(whole.total_tokens) * 100 < whole.total_tokens);
}

#[test]
fn too_many_bad_rows_refuses_with_the_first_twenty() {
    let model = model_dir(None);
    let tok = tok(&model);
    let mut text = String::from("{\"instruction\": \"a\", \"output\": \"b\"}\n");
    for _ in 0..30 {
        text.push_str("{not json\n");
    }
    let data = write(model.path(), "bad.jsonl", &text);
    let e = prepare_dataset(&cfg(&data), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("30 of 31 rows") && e.contains("the first 20"), "{e}");
    assert!(e.contains("line 2: bad JSON") && e.contains("line 21:") && !e.contains("line 22:"), "{e}");
    assert!(e.starts_with(&data.display().to_string()), "{e}");
}

#[test]
fn unknown_shape_names_the_keys_and_the_way_out() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(model.path(), "u.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    let e = prepare_dataset(&cfg(&data), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("prompt, completion") && e.contains("dataset.columns"), "{e}");
}

#[test]
fn txt_file_paragraphs() {
    let model = model_dir(None);
    let tok = tok(&model);
    let data = write(model.path(), "p.txt", "ab\ncd\n\nef\n");
    let ds = prepare_dataset(&cfg(&data), &tok, 512).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[0].input_ids, ref_ids("<|begin_of_text|>ab\ncd<|eot_id|>"));
    assert_eq!(ds.examples[1].row, 4);
}
