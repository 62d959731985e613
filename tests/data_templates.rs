//! A chat template written in the style of the ones models ship (Python string methods, slices,
//! namespace, `is defined` fallbacks, `tojson(indent=…)`, `raise_exception`, whitespace control
//! under trim_blocks/lstrip_blocks), rendered here and compared with what Python's Jinja2 3.1.6
//! renders under the settings transformers uses. The expected strings were produced by Jinja2.

use serde_json::json;
use tunestudio::model::chat_template::{ChatTemplate, Message, SpecialTokens};

fn template(bos: &str) -> ChatTemplate {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/hf_style_template.jinja");
    let src = std::fs::read_to_string(path).unwrap();
    let specials = SpecialTokens { bos_token: Some(bos.into()), eos_token: Some("<|eot_id|>".into()), ..Default::default() };
    ChatTemplate::new(&src, "fixture", specials).unwrap()
}

fn convo() -> Vec<Message> {
    vec![
        Message::new("system", "  Be exact. "),
        Message::new("user", "2+2?"),
        Message::new("assistant", "<think>add</think>  4"),
        Message::new("user", "3+3?"),
        Message::new("assistant", "6"),
    ]
}

#[test]
fn renders_like_jinja2() {
    let t = template("<|begin_of_text|>");
    let full = t.render(&convo(), false).unwrap();
    assert_eq!(
        full.text,
        "<|begin_of_text|><|im_start|>system\nBe exact. (2 Mar 2025, 2 answers)\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
    );
    let prompt = t.render(&convo()[..4], true).unwrap();
    assert_eq!(
        prompt.text,
        "<|begin_of_text|><|im_start|>system\nBe exact. (2 Mar 2025, 1 answers)\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?\n<|im_start|>assistant\n"
    );
}

#[test]
fn extra_variables_and_python_style_tojson() {
    let t = template("<s>");
    let mut extra = serde_json::Map::new();
    extra.insert("tools".into(), json!([{"name": "calc", "parameters": {"b": 1, "a": [1, 2]}}]));
    let r = t.render_with(&convo()[1..2], true, &extra).unwrap();
    assert_eq!(
        r.text,
        "<s><|im_start|>system\nYou answer briefly. (2 Mar 2025, 0 answers)\nTools: [\n    {\n        \"name\": \"calc\",\n        \"parameters\": {\n            \"b\": 1,\n            \"a\": [\n                1,\n                2\n            ]\n        }\n    }\n]\n<|im_end|>\n<|im_start|>user\n2+2?\n<|im_start|>assistant\n"
    );
}

#[test]
fn raise_exception_message_reaches_the_row_report() {
    let t = template("");
    let user = Message::new("user", "hi");
    let e = t.render(&[user.clone(), user], false).unwrap_err();
    assert!(e.contains("turns must go user, assistant, user, and so on"), "{e}");
}
