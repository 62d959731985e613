//! Record shapes: which one a dataset uses (detected from its first records unless configured) and
//! how one record becomes a conversation or a raw text. Row problems come back as `Err(reason)`.

use serde_json::Value as Json;

use crate::config::{ColumnMapping, DatasetConfig, DatasetFormat};
use crate::error::{Error, Result};
use crate::model::chat_template::Message;

/// What one record turns into before rendering.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A conversation rendered through the chat template.
    Chat(Vec<Message>),
    /// Raw text, trained on every token: BOS + text + EOS.
    Text(String),
}

/// How many records detection looks at before giving up.
const DETECT_RECORDS: usize = 32;

/// The format a single record looks like, if any.
fn record_format(obj: &serde_json::Map<String, Json>) -> Option<DatasetFormat> {
    // CSV cells and some Parquet exports hold the turn list as JSON text.
    let turns = |v: &Json| v.is_array() || v.as_str().is_some_and(|s| s.trim_start().starts_with('['));
    if obj.get("messages").is_some_and(turns) {
        // Some ShareGPT exports use a `messages` key with from/value turns; both parse the same.
        Some(DatasetFormat::Messages)
    } else if obj.get("conversations").is_some_and(turns) {
        Some(DatasetFormat::Sharegpt)
    } else if obj.contains_key("instruction") && obj.contains_key("output") {
        Some(DatasetFormat::Alpaca)
    } else if obj.get("text").is_some_and(Json::is_string) {
        Some(DatasetFormat::Text)
    } else {
        None
    }
}

/// Decide the format: the configured one, or the column mapping when one is given, or the shape of
/// the first records that have a recognisable one.
pub fn detect<'a>(cfg: &DatasetConfig, records: impl Iterator<Item = &'a Json>) -> Result<DatasetFormat> {
    match cfg.format {
        DatasetFormat::Columns => {
            check_columns(&cfg.columns)?;
            return Ok(DatasetFormat::Columns);
        }
        DatasetFormat::Auto => {}
        other => return Ok(other),
    }
    if !cfg.columns.response.is_empty() {
        check_columns(&cfg.columns)?;
        return Ok(DatasetFormat::Columns);
    }
    let mut first_keys: Option<Vec<String>> = None;
    for v in records.take(DETECT_RECORDS) {
        let Some(obj) = v.as_object() else { continue };
        if let Some(f) = record_format(obj) {
            return Ok(f);
        }
        first_keys.get_or_insert_with(|| obj.keys().cloned().collect());
    }
    let seen = match first_keys {
        Some(k) if !k.is_empty() => format!("the records have the keys {}", k.join(", ")),
        _ => "no readable record was found".to_string(),
    };
    Err(Error::config(
        "dataset.format",
        format!(
            "cannot tell the dataset format ({seen}): expected `messages`, `conversations`, \
             `instruction`+`output` or `text`; map other columns with dataset.columns"
        ),
    ))
}

fn check_columns(c: &ColumnMapping) -> Result<()> {
    if c.response.is_empty() {
        return Err(Error::config("dataset.columns.response", "is empty: name the column that holds the response"));
    }
    if c.prompt.is_empty() {
        return Err(Error::config("dataset.columns.prompt", "is empty: name at least one prompt column"));
    }
    Ok(())
}

/// A field as text: strings as they are, numbers and booleans printed, null and absent as None.
/// Other types (arrays, objects) are refused, not stringified: they mean a column mix-up.
fn field_text(obj: &serde_json::Map<String, Json>, key: &str) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Number(n)) => Ok(Some(n.to_string())),
        Some(Json::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(format!("column `{key}` holds {}, expected text", kind_name(other))),
    }
}

fn kind_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// A field the record cannot do without: absent and null are told apart, since a null usually
/// means an export wrote an empty cell rather than that the column is misnamed.
fn required(obj: &serde_json::Map<String, Json>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing column `{key}`")),
        Some(Json::Null) => Err(format!("column `{key}` is null")),
        Some(_) => Ok(field_text(obj, key)?.unwrap_or_default()),
    }
}

/// The response column of a one-turn record (Alpaca's `output`, the mapped response column):
/// blank means the row has nothing to train on, said in the column's own name.
fn response(obj: &serde_json::Map<String, Json>, key: &str) -> std::result::Result<String, String> {
    let text = required(obj, key)?;
    if text.trim().is_empty() {
        return Err(format!("column `{key}` is empty: the row has no response to train on"));
    }
    Ok(text)
}

/// Turn one record into a sample, or say why it cannot be used.
pub fn to_sample(format: DatasetFormat, columns: &ColumnMapping, record: &Json) -> std::result::Result<Sample, String> {
    let obj = record.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind_name(record)))?;
    let sample = match format {
        DatasetFormat::Auto => return Err("format not decided (internal)".into()),
        DatasetFormat::Text => {
            let text = required(obj, "text")?;
            if text.trim().is_empty() {
                return Err("empty text".into());
            }
            return Ok(Sample::Text(text));
        }
        DatasetFormat::Alpaca => {
            let instruction = required(obj, "instruction")?;
            let input = field_text(obj, "input")?.unwrap_or_default();
            let output = response(obj, "output")?;
            let user = match (instruction.trim().is_empty(), input.trim().is_empty()) {
                (_, true) => instruction,
                (true, false) => input,
                (false, false) => format!("{instruction}\n\n{input}"),
            };
            let mut msgs = Vec::new();
            if let Some(sys) = field_text(obj, "system")?.filter(|s| !s.trim().is_empty()) {
                msgs.push(Message::new("system", sys));
            }
            msgs.push(Message::new("user", user));
            msgs.push(Message::new("assistant", output));
            msgs
        }
        DatasetFormat::Columns => {
            let mut parts = Vec::new();
            for col in &columns.prompt {
                let v = required(obj, col)?;
                if !v.trim().is_empty() {
                    parts.push(v);
                }
            }
            let mut msgs = Vec::new();
            if let Some(sys_col) = &columns.system
                && let Some(sys) = field_text(obj, sys_col)?.filter(|s| !s.trim().is_empty())
            {
                msgs.push(Message::new("system", sys));
            }
            msgs.push(Message::new("user", parts.join("\n\n")));
            msgs.push(Message::new("assistant", response(obj, &columns.response)?));
            msgs
        }
        DatasetFormat::Messages | DatasetFormat::Sharegpt => {
            let (primary, other) =
                if format == DatasetFormat::Messages { ("messages", "conversations") } else { ("conversations", "messages") };
            let turns = obj.get(primary).or_else(|| obj.get(other)).ok_or_else(|| format!("missing column `{primary}`"))?;
            let turns = match turns {
                Json::Array(a) => a.clone(),
                Json::String(s) => match serde_json::from_str::<Json>(s) {
                    Ok(Json::Array(a)) => a,
                    _ => return Err(format!("column `{primary}` is text that is not a JSON list of turns")),
                },
                other => return Err(format!("column `{primary}` holds {}, expected a list of turns", kind_name(other))),
            };
            turns.iter().enumerate().map(|(i, t)| parse_turn(i + 1, t)).collect::<std::result::Result<Vec<_>, _>>()?
        }
    };
    check_conversation(&sample)?;
    Ok(Sample::Chat(sample))
}

fn parse_turn(n: usize, turn: &Json) -> std::result::Result<Message, String> {
    let obj = turn.as_object().ok_or_else(|| format!("turn {n} is {}, expected an object", kind_name(turn)))?;
    let role =
        obj.get("role").or_else(|| obj.get("from")).and_then(Json::as_str).ok_or_else(|| format!("turn {n} has no `role` (or `from`)"))?;
    let role = match role.trim().to_ascii_lowercase().as_str() {
        "user" | "human" => "user",
        "assistant" | "gpt" | "model" | "bot" | "chatgpt" => "assistant",
        "system" => "system",
        "tool" | "function" | "ipython" | "observation" => "tool",
        other => return Err(format!("turn {n} has the unknown role `{other}` (use system, user, assistant or tool)")),
    };
    let content = match obj.get("content").or_else(|| obj.get("value")) {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        // OpenAI content parts: keep the text parts, in order.
        Some(Json::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match p.get("text").and_then(Json::as_str).or_else(|| p.as_str()) {
                    Some(t) => text.push_str(t),
                    None => return Err(format!("turn {n} has a non-text content part")),
                }
            }
            text
        }
        Some(other) => return Err(format!("turn {n} content is {}, expected text", kind_name(other))),
    };
    let mut msg = Message::new(role, content);
    for (k, v) in obj {
        if !matches!(k.as_str(), "role" | "from" | "content" | "value") {
            msg.extra.insert(k.clone(), v.clone());
        }
    }
    Ok(msg)
}

fn check_conversation(msgs: &[Message]) -> std::result::Result<(), String> {
    let mut any = false;
    for (i, m) in msgs.iter().enumerate() {
        if m.role == "assistant" {
            any = true;
            let has_tool_calls = m.extra.get("tool_calls").is_some_and(|v| !v.is_null());
            if m.content.trim().is_empty() && !has_tool_calls {
                return Err(format!("empty response in turn {}", i + 1));
            }
        }
    }
    if !any {
        return Err("no assistant turn".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> DatasetConfig {
        DatasetConfig::default()
    }

    #[test]
    fn detection_by_keys() {
        let cases = [
            (json!({"messages": [{"role": "user", "content": "a"}]}), DatasetFormat::Messages),
            (json!({"conversations": [{"from": "human", "value": "a"}]}), DatasetFormat::Sharegpt),
            (json!({"instruction": "a", "input": "", "output": "b"}), DatasetFormat::Alpaca),
            (json!({"text": "hello"}), DatasetFormat::Text),
        ];
        for (rec, want) in cases {
            assert_eq!(detect(&cfg(), [json!(5), rec].iter()).unwrap(), want);
        }
        let e = detect(&cfg(), [json!({"q": 1, "a": 2})].iter()).unwrap_err().to_string();
        assert!(e.contains("keys") && e.contains('q') && e.contains("dataset.columns"), "{e}");
    }

    #[test]
    fn alpaca_joins_input_with_a_blank_line() {
        let s = to_sample(
            DatasetFormat::Alpaca,
            &ColumnMapping::default(),
            &json!({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Math."}),
        )
        .unwrap();
        let Sample::Chat(m) = s else { panic!() };
        assert_eq!(
            m.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect::<Vec<_>>(),
            vec![("system", "Math."), ("user", "Sum\n\n1 2"), ("assistant", "3")]
        );
    }

    #[test]
    fn row_reasons() {
        let none = ColumnMapping::default();
        let r = |f, v: Json| to_sample(f, &none, &v).unwrap_err();
        assert_eq!(r(DatasetFormat::Alpaca, json!({"instruction": "x"})), "missing column `output`");
        assert_eq!(r(DatasetFormat::Alpaca, json!({"instruction": "x", "output": null})), "column `output` is null");
        assert_eq!(r(DatasetFormat::Alpaca, json!({"instruction": null, "output": "y"})), "column `instruction` is null");
        assert_eq!(
            r(DatasetFormat::Alpaca, json!({"instruction": "x", "output": "  "})),
            "column `output` is empty: the row has no response to train on"
        );
        let cols = ColumnMapping { prompt: vec!["q".into()], response: "a".into(), system: None };
        assert_eq!(
            to_sample(DatasetFormat::Columns, &cols, &json!({"q": "x", "a": ""})).unwrap_err(),
            "column `a` is empty: the row has no response to train on"
        );
        assert_eq!(
            r(DatasetFormat::Messages, json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})),
            "empty response in turn 2"
        );
        assert_eq!(r(DatasetFormat::Messages, json!({"messages": [{"role": "user", "content": "x"}]})), "no assistant turn");
        assert!(r(DatasetFormat::Sharegpt, json!({"conversations": [{"from": "alien", "value": "x"}]})).contains("unknown role `alien`"));
        assert_eq!(r(DatasetFormat::Text, json!([1])), "expected a JSON object, found a list");
    }

    #[test]
    fn sharegpt_and_content_parts() {
        let none = ColumnMapping::default();
        let s = to_sample(
            DatasetFormat::Sharegpt,
            &none,
            &json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
        )
        .unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "hi"), Message::new("assistant", "yo")]));
        let s = to_sample(
            DatasetFormat::Messages,
            &none,
            &json!({"messages": "[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":\"assistant\",\"content\":\"c\"}]"}),
        )
        .unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("user", "ab"), Message::new("assistant", "c")]));
    }

    #[test]
    fn columns_mapping() {
        let cols = ColumnMapping { prompt: vec!["q".into(), "ctx".into()], response: "a".into(), system: Some("sys".into()) };
        let s = to_sample(DatasetFormat::Columns, &cols, &json!({"q": "Why?", "ctx": "", "a": 42, "sys": "S"})).unwrap();
        assert_eq!(s, Sample::Chat(vec![Message::new("system", "S"), Message::new("user", "Why?"), Message::new("assistant", "42")]));
        let mut c = cfg();
        c.columns = cols;
        assert_eq!(detect(&c, std::iter::empty()).unwrap(), DatasetFormat::Columns);
    }
}
