//! Chat templates: Hugging Face Jinja templates rendered with minijinja, under the conventions the
//! `transformers` library sets for them (`messages`, `add_generation_prompt`, the special-token
//! strings, `raise_exception`, Python string methods, `trim_blocks` + `lstrip_blocks`), plus the
//! `{% generation %}` block that marks what the assistant wrote, so the dataset code can tell which
//! characters to train on. Also the built-in templates offered when a model ships none.

use std::sync::Arc;

use minijinja::value::{Kwargs, Serde, Value, ValueKind, from_args};
use minijinja::{Environment, ErrorKind, State};
use serde::Serialize;

use crate::error::{Error, Result};

/// Written around the body of a `{% generation %}` block while rendering and removed afterwards.
/// Unicode noncharacters: they are never meant to appear in interchanged text, so a data row that
/// contains one is refused rather than allowed to fake a span.
const GEN_OPEN: char = '\u{FDD0}';
const GEN_CLOSE: char = '\u{FDD1}';

/// One chat turn as templates see it: `role`, `content`, and anything else the row carried
/// (`tool_calls`, `name`, …) passed through untouched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into(), extra: serde_json::Map::new() }
    }
}

/// The special-token strings a template may refer to (`bos_token`, `eos_token`, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A rendered conversation and the byte ranges of `text` that `{% generation %}` blocks produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<std::ops::Range<usize>>,
    /// The spans are the span donor's (a built-in that rendered the same text).
    pub lent_spans: bool,
}

/// The built-in templates, by the name `dataset.template` uses.
pub const BUILTIN_NAMES: [&str; 6] = ["llama-3", "chatml", "qwen3", "gemma", "alpaca", "mistral"];

/// Source of a built-in template. Each marks the assistant's text and its end-of-turn token with a
/// generation block, so the label mask never depends on comparing renders.
pub fn builtin_source(name: &str) -> Option<&'static str> {
    Some(match name {
        // Meta's layout: header tokens around the role, content stripped, <|eot_id|> closing every
        // turn; BOS once at the start.
        "llama-3" => concat!(
            "{{- bos_token or '' -}}",
            "{%- for message in messages -%}",
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}",
            "{%- if message['role'] == 'assistant' -%}",
            "{%- generation -%}{{- message['content'] | trim -}}<|eot_id|>{%- endgeneration -%}",
            "{%- else -%}",
            "{{- message['content'] | trim -}}<|eot_id|>",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        ),
        // ChatML as Qwen and many fine-tunes use it; BOS only when the tokenizer defines one.
        "chatml" => concat!(
            "{{- bos_token or '' -}}",
            "{%- for message in messages -%}",
            "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
            "{%- if message['role'] == 'assistant' -%}",
            "{%- generation -%}{{- message['content'] -}}<|im_end|>{%- endgeneration -%}",
            "{%- else -%}",
            "{{- message['content'] -}}<|im_end|>",
            "{%- endif -%}",
            "{{- '\\n' -}}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
        ),
        // Qwen3's layout: ChatML, with the assistant's reasoning in a <think> block that is kept
        // only after the last user query (earlier turns show the answer alone), taken from
        // `reasoning_content` or from a <think>…</think> prefix of the content; the last turn
        // always carries the block, empty when there was no reasoning. `enable_thinking = false`
        // puts the empty block in the generation prompt, so there it is prompt, not response.
        // Tool results are user turns wrapped in <tool_response>.
        "qwen3" => concat!(
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}",
            "{%- endif -%}",
            "{%- set ns = namespace(last_query=messages|length - 1) -%}",
            "{%- for m in messages -%}",
            "{%- if m['role'] == 'user' and not (m['content'].startswith('<tool_response>') and m['content'].endswith('</tool_response>')) -%}",
            "{%- set ns.last_query = loop.index0 -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- set no_thinking = enable_thinking is defined and enable_thinking is false -%}",
            "{%- for m in messages -%}",
            "{%- if m['role'] == 'user' or (m['role'] == 'system' and not loop.first) -%}",
            "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}",
            "{%- elif m['role'] == 'assistant' -%}",
            "{%- set content = m['content'] -%}",
            "{%- set reasoning = '' -%}",
            "{%- if m['reasoning_content'] is string -%}",
            "{%- set reasoning = m['reasoning_content'] -%}",
            "{%- elif '</think>' in content -%}",
            "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}",
            "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}",
            "{%- endif -%}",
            "{{- '<|im_start|>assistant\n' -}}",
            "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}",
            "{%- if no_thinking and not reasoning.strip('\n') -%}",
            "{{- '<think>\n\n</think>\n\n' -}}",
            "{%- generation -%}{{- content.lstrip('\n') + '<|im_end|>' -}}{%- endgeneration -%}",
            "{%- else -%}",
            "{%- generation -%}{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>' -}}{%- endgeneration -%}",
            "{%- endif -%}",
            "{%- else -%}",
            "{%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}",
            "{%- endif -%}",
            "{{- '\n' -}}",
            "{%- elif m['role'] == 'tool' -%}",
            "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}",
            "{{- '\n<tool_response>\n' + m['content'] + '\n</tool_response>' -}}",
            "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "{{- '<|im_start|>assistant\n' -}}",
            "{%- if no_thinking -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}",
            "{%- endif -%}",
        ),
        // Gemma's turns: <start_of_turn>user / model, content trimmed, <end_of_turn>; a system
        // turn goes in front of the first user turn (the format has no place of its own for it).
        "gemma" => concat!(
            "{{- bos_token or '' -}}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set first_prefix = messages[0]['content'] + '\n\n' -%}",
            "{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            "{%- set first_prefix = '' -%}",
            "{%- set turns = messages -%}",
            "{%- endif -%}",
            "{%- for m in turns -%}",
            "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + (first_prefix if loop.first else '') -}}",
            "{%- if m['role'] == 'assistant' -%}",
            "{%- generation -%}{{- m['content'] | trim -}}<end_of_turn>{%- endgeneration -%}",
            "{%- else -%}",
            "{{- m['content'] | trim -}}<end_of_turn>",
            "{%- endif -%}",
            "{{- '\n' -}}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}",
        ),
        // The Stanford Alpaca prompt; the system turn replaces the preamble, and each later
        // user/assistant pair becomes another Instruction/Response block.
        "alpaca" => concat!(
            "{{- bos_token or '' -}}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{{- messages[0]['content'] + '\\n\\n' -}}",
            "{%- else -%}",
            "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' -}}",
            "{%- endif -%}",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'user' -%}",
            "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}",
            "{%- elif message['role'] == 'assistant' -%}",
            "{{- '### Response:\\n' -}}",
            "{%- generation -%}{{- message['content'] + (eos_token or '') -}}{%- endgeneration -%}",
            "{{- '\\n\\n' -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}",
        ),
        // Mistral's [INST] layout; a system turn is put in front of the first user turn, since the
        // format has no place of its own for it.
        "mistral" => concat!(
            "{{- bos_token or '' -}}",
            "{%- set ns = namespace(system='') -%}",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'system' -%}",
            "{%- set ns.system = message['content'] + '\\n\\n' -%}",
            "{%- elif message['role'] == 'user' -%}",
            "{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}",
            "{%- set ns.system = '' -%}",
            "{%- elif message['role'] == 'assistant' -%}",
            "{%- generation -%}{{- message['content'] + (eos_token or '') -}}{%- endgeneration -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ),
        _ => return None,
    })
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    /// The source as given (before the generation tags were rewritten), for display.
    source: String,
    /// Where it came from: `model` / `model:<name>` / `builtin:<name>`.
    origin: String,
    has_generation: bool,
    specials: SpecialTokens,
    /// Template variables beyond the standard ones (`dataset.template_kwargs`: `enable_thinking`).
    vars: serde_json::Map<String, serde_json::Value>,
    /// For a template without `{% generation %}` blocks: a built-in that has them and may render
    /// the same text; where it does for a conversation, its blocks mark the responses.
    span_donor: Option<Box<ChatTemplate>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("has_generation", &self.has_generation).finish_non_exhaustive()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compile `source`; `origin` says where it came from in messages.
    pub fn new(source: &str, origin: impl Into<String>, specials: SpecialTokens) -> Result<Self> {
        let origin = origin.into();
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        // transformers compiles chat templates with both options on; whitespace-sensitive
        // templates render differently without them.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::bug("chat template syntax", e))?,
        );
        env.set_unknown_method_callback(python_method);
        env.add_filter("tojson", tojson);
        env.add_filter("__ts_generation", |body: String| format!("{GEN_OPEN}{body}{GEN_CLOSE}"));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|e| Error::Template { origin: origin.clone(), msg: format!("does not compile: {}", describe(&e)) })?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            source: source.to_string(),
            origin,
            has_generation,
            specials,
            vars: serde_json::Map::new(),
            span_donor: None,
        })
    }

    /// A built-in template by name (`llama-3`, `chatml`, `alpaca`, `mistral`).
    pub fn builtin(name: &str, specials: SpecialTokens) -> Result<Self> {
        let source = builtin_source(name).ok_or_else(|| {
            Error::config("dataset.template", format!("`{name}` is not a built-in template; use one of {}", BUILTIN_NAMES.join(", ")))
        })?;
        Self::new(source, format!("builtin:{name}"), specials)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the template marks assistant text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// The same template rendering with extra variables (HF's `apply_chat_template(**kwargs)`,
    /// e.g. Qwen3's `enable_thinking`); they reach the span donor too.
    pub fn with_vars(mut self, vars: serde_json::Map<String, serde_json::Value>) -> Self {
        if let Some(d) = self.span_donor.take() {
            self.span_donor = Some(Box::new(d.with_vars(vars.clone())));
        }
        self.vars = vars;
        self
    }

    /// For a model's template without generation blocks, the built-in of the same family (by its
    /// turn markers) as a span donor: where both render a conversation to the same text, the
    /// built-in's blocks mark the responses. Needed where rendering prefixes cannot find them:
    /// Qwen3 drops the reasoning of earlier turns once a later user turn follows.
    pub fn with_span_donor(mut self) -> Self {
        if self.has_generation {
            return self;
        }
        let src = &self.source;
        let name = if src.contains("<|im_start|>") && src.contains("<think>") {
            "qwen3"
        } else if src.contains("<start_of_turn>") {
            "gemma"
        } else if src.contains("<|im_start|>") {
            "chatml"
        } else if src.contains("<|start_header_id|>") {
            "llama-3"
        } else if src.contains("[INST]") {
            "mistral"
        } else {
            return self;
        };
        if let Ok(d) = Self::builtin(name, self.specials.clone()) {
            self.span_donor = Some(Box::new(d.with_vars(self.vars.clone())));
        }
        self
    }

    /// The built-in lending its generation blocks, if any (`builtin:<name>`).
    pub fn span_donor(&self) -> Option<&str> {
        self.span_donor.as_deref().map(ChatTemplate::origin)
    }

    /// Render a conversation. Errors (a `raise_exception`, a type error in the template) come back
    /// as messages meant for a dataset row report.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> std::result::Result<Rendered, String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Render with extra template variables (`tools`, `date_string`, …). The standard variables
    /// take precedence over extras of the same name.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<Rendered, String> {
        for (i, m) in messages.iter().enumerate() {
            if m.content.contains([GEN_OPEN, GEN_CLOSE]) || m.role.contains([GEN_OPEN, GEN_CLOSE]) {
                return Err(format!("turn {} contains the Unicode noncharacter U+FDD0 or U+FDD1", i + 1));
            }
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| describe(&e))?;
        let mut vars = self.vars.clone();
        vars.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.specials.bos_token.clone(),
            eos_token => self.specials.eos_token.clone(),
            pad_token => self.specials.pad_token.clone(),
            unk_token => self.specials.unk_token.clone(),
            ..Value::from(Serde(&vars))
        };
        let raw = tmpl.render(ctx).map_err(|e| format!("chat template ({}): {}", self.origin, describe(&e)))?;
        let mut rendered = split_generation_marks(&raw).map_err(|e| format!("chat template ({}): {e}", self.origin))?;
        if let Some(donor) = &self.span_donor
            && let Ok(d) = donor.render_with(messages, add_generation_prompt, extra)
            && d.text == rendered.text
        {
            rendered.generation_spans = d.generation_spans;
            rendered.lent_spans = true;
        }
        Ok(rendered)
    }
}

/// One line for a minijinja error, with the template line when it has one.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

/// Turn `{% generation %}` / `{% endgeneration %}` (with any whitespace-control marks) into a
/// filter block, which minijinja knows: the body is rendered as usual and the filter wraps it in
/// the two marker characters. Keeping a block tag (rather than an expression) keeps the
/// trim_blocks/lstrip_blocks behaviour of the original tag.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    replace_generation_tags(source, "filter __ts_generation", "endfilter")
}

/// The template with its `{% generation %}` blocks turned into `{% if true %}` blocks (same
/// whitespace control), for tools that do not know the tag (llama.cpp, Ollama): it renders the
/// same text.
pub fn portable_source(source: &str) -> String {
    replace_generation_tags(source, "if true", "endif").0
}

/// Every generation tag replaced by a block tag with `open` / `close` as its body; and whether
/// there was one.
fn replace_generation_tags(source: &str, open: &str, close: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len() + 32);
    let mut rest = source;
    let mut found = false;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        match parse_generation_tag(tag) {
            Some((len, open_mark, end, close_mark)) => {
                found = true;
                let body = if end { close } else { open };
                out.push_str(&format!("{{%{open_mark} {body} {close_mark}%}}"));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// Parse `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: (length, open mark, is end, close mark).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, bool, &str)> {
    let b = s.as_bytes();
    let mut i = 2;
    let open_mark = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &s[i - 1..i]
        }
        _ => "",
    };
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let end = if s[i..].starts_with("endgeneration") {
        i += "endgeneration".len();
        true
    } else if s[i..].starts_with("generation") {
        i += "generation".len();
        false
    } else {
        return None;
    };
    // `generation_x` or similar is a different name.
    if b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
        return None;
    }
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let close_mark = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &s[i - 1..i]
        }
        _ => "",
    };
    if !s[i..].starts_with("%}") {
        return None;
    }
    Some((i + 2, open_mark, end, close_mark))
}

fn split_generation_marks(raw: &str) -> std::result::Result<Rendered, String> {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GEN_OPEN => {
                if open.is_some() {
                    return Err("nested {% generation %} blocks".into());
                }
                open = Some(text.len());
            }
            GEN_CLOSE => {
                let start = open.take().ok_or("unbalanced {% endgeneration %}")?;
                if start < text.len() {
                    spans.push(start..text.len());
                }
            }
            _ => text.push(c),
        }
    }
    if open.is_some() {
        return Err("unclosed {% generation %} block".into());
    }
    Ok(Rendered { text, generation_spans: spans, lent_spans: false })
}

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

fn unknown() -> minijinja::Error {
    minijinja::Error::from(ErrorKind::UnknownMethod)
}

/// Python's `str.strip` family: with no argument strip whitespace, otherwise any of the given chars.
fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let is_strip = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let mut out = s;
    if left {
        out = out.trim_start_matches(is_strip);
    }
    if right {
        out = out.trim_end_matches(is_strip);
    }
    out.to_string()
}

/// `startswith`/`endswith` take a string or a tuple of strings in Python.
fn prefixes(v: &Value) -> std::result::Result<Vec<String>, minijinja::Error> {
    if let Some(s) = v.as_str() {
        return Ok(vec![s.to_string()]);
    }
    if matches!(v.kind(), ValueKind::Seq) {
        return v
            .try_iter()?
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| invalid("startswith/endswith expects strings")))
            .collect();
    }
    Err(invalid("startswith/endswith expects a string or a tuple of strings"))
}

/// The Python methods real chat templates call on strings and dicts. minijinja calls this for any
/// method it does not know; returning `UnknownMethod` keeps its own error for the rest.
fn python_method(state: &mut State, value: &Value, method: &str, args: &[Value]) -> std::result::Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            match method {
                "strip" | "lstrip" | "rstrip" => {
                    let (chars,): (Option<&str>,) = from_args(args)?;
                    let (l, r) = match method {
                        "strip" => (true, true),
                        "lstrip" => (true, false),
                        _ => (false, true),
                    };
                    Ok(Value::from(py_strip(s, chars, l, r)))
                }
                "startswith" | "endswith" => {
                    let (p,): (Value,) = from_args(args)?;
                    let ps = prefixes(&p)?;
                    let hit = if method == "startswith" {
                        ps.iter().any(|p| s.starts_with(p.as_str()))
                    } else {
                        ps.iter().any(|p| s.ends_with(p.as_str()))
                    };
                    Ok(Value::from(hit))
                }
                "upper" => Ok(Value::from(s.to_uppercase())),
                "lower" => Ok(Value::from(s.to_lowercase())),
                "title" => state.apply_filter("title", std::slice::from_ref(value)),
                "capitalize" => state.apply_filter("capitalize", std::slice::from_ref(value)),
                "replace" => {
                    let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
                    Ok(Value::from(match count {
                        Some(n) if n >= 0 => s.replacen(old, new, n as usize),
                        _ => s.replace(old, new),
                    }))
                }
                "split" | "rsplit" => {
                    let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                    let max = maxsplit.filter(|&n| n >= 0).map(|n| n as usize);
                    let parts: Vec<String> = match (sep, method) {
                        (Some(""), _) => return Err(invalid("empty separator")),
                        (Some(sep), "split") => match max {
                            Some(n) => s.splitn(n + 1, sep).map(str::to_string).collect(),
                            None => s.split(sep).map(str::to_string).collect(),
                        },
                        (Some(sep), _) => {
                            let mut v: Vec<String> = match max {
                                Some(n) => s.rsplitn(n + 1, sep).map(str::to_string).collect(),
                                None => s.rsplit(sep).map(str::to_string).collect(),
                            };
                            v.reverse();
                            v
                        }
                        // Python splits on runs of whitespace and drops empty pieces here.
                        (None, _) => s.split_whitespace().map(str::to_string).collect(),
                    };
                    Ok(Value::from(parts))
                }
                "find" | "index" => {
                    let (needle,): (&str,) = from_args(args)?;
                    match s.find(needle) {
                        Some(b) => Ok(Value::from(s[..b].chars().count() as i64)),
                        None if method == "find" => Ok(Value::from(-1)),
                        None => Err(invalid("substring not found")),
                    }
                }
                "count" => {
                    let (needle,): (&str,) = from_args(args)?;
                    Ok(Value::from(if needle.is_empty() { s.chars().count() + 1 } else { s.matches(needle).count() }))
                }
                "join" => {
                    let (items,): (Value,) = from_args(args)?;
                    let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
                    Ok(Value::from(parts.join(s)))
                }
                "isdigit" => Ok(Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))),
                "isspace" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_whitespace))),
                "isalpha" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic))),
                "isupper" => Ok(Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))),
                "islower" => Ok(Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))),
                _ => Err(unknown()),
            }
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => {
                let _: () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let _: () = from_args(args)?;
                let vals: Vec<Value> = value.try_iter()?.map(|k| value.get_item(&k).unwrap_or_default()).collect();
                Ok(Value::from(vals))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() { default.unwrap_or(Value::from(())) } else { v })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
/// `ensure_ascii=False` (", " and ": " separators, no HTML escaping), optional `indent`.
/// minijinja's own filter escapes `<`, `>`, `&` and `'` for HTML, which would change the prompt.
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v).map_err(|_| invalid("tojson indent must be a non-negative integer"))?),
    };
    let mut json = serde_json::to_value(&value).map_err(|e| invalid(format!("tojson: {e}")))?;
    if sort_keys.unwrap_or(false) {
        sort_json_keys(&mut json);
    }
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from(out))
}

fn sort_json_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = std::mem::take(m).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut val) in entries {
                sort_json_keys(&mut val);
                m.insert(k, val);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Python uses "," between items when indenting (the newline separates), ", " otherwise.
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, val)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(val, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> SpecialTokens {
        SpecialTokens { bos_token: Some("<|begin_of_text|>".into()), eos_token: Some("<|eot_id|>".into()), ..Default::default() }
    }

    fn convo() -> Vec<Message> {
        vec![Message::new("system", "Be brief."), Message::new("user", "Hi"), Message::new("assistant", "Hello!")]
    }

    #[test]
    fn llama3_builtin_renders_and_marks_assistant() {
        let t = ChatTemplate::builtin("llama-3", specials()).unwrap();
        let r = t.render(&convo(), false).unwrap();
        assert_eq!(
            r.text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        );
        assert_eq!(r.generation_spans.len(), 1);
        assert_eq!(&r.text[r.generation_spans[0].clone()], "Hello!<|eot_id|>");
        let g = t.render(&convo()[..2], true).unwrap();
        assert!(g.text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"), "{}", g.text);
        assert!(g.generation_spans.is_empty());
    }

    #[test]
    fn every_builtin_compiles_and_marks_the_response() {
        for name in BUILTIN_NAMES {
            let t = ChatTemplate::builtin(name, specials()).unwrap();
            assert!(t.has_generation_blocks(), "{name}");
            let r = t.render(&convo(), false).unwrap();
            assert_eq!(r.generation_spans.len(), 1, "{name}: {}", r.text);
            // Qwen3's last response opens with its (here empty) <think> block.
            let span = &r.text[r.generation_spans[0].clone()];
            assert!(span.starts_with("Hello!") || span.starts_with("<think>\n\n</think>\n\nHello!"), "{name}: {span}");
        }
    }

    #[test]
    fn hf_style_template_with_python_methods() {
        let src = "{% for m in messages %}{% if m['content'].strip().startswith(('Hi', 'Yo')) %}[{{ m.role.upper() }}]{% endif %}\
                   {{ m.content.split(' ')|length }}{% endfor %}{{ {'a': '<b>', 'c': [1, 2]}|tojson }}";
        let t = ChatTemplate::new(src, "test", specials()).unwrap();
        let r = t.render(&[Message::new("user", "  Hi there ")], false).unwrap();
        // Python: "  Hi there ".split(' ') has five pieces, three of them empty.
        assert_eq!(r.text, "[USER]5{\"a\": \"<b>\", \"c\": [1, 2]}");
    }

    #[test]
    fn raise_exception_becomes_a_row_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "test", specials()).unwrap();
        let e = t.render(&convo(), false).unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn generation_tags_keep_block_whitespace_rules() {
        // With trim_blocks the newline after a block tag disappears, for generation tags too.
        let src = "{% for m in messages %}\n{% if m.role == 'assistant' %}\n{% generation %}\n{{ m.content }}\n{% endgeneration %}\n{% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "test", specials()).unwrap();
        let r = t.render(&convo(), false).unwrap();
        assert_eq!(r.text, "Hello!\n");
        assert_eq!(r.generation_spans, vec![0..7]);
    }

    #[test]
    fn indented_generation_tags_with_dash_marks() {
        // The layout the demo model's template uses: tags on their own indented lines.
        let src = "{{- bos_token }}\n{%- for m in messages %}\n    {{- '<' + m.role + '>' }}\n    {%- if m.role == 'assistant' %}\n        {%- generation %}\n            {{- m.content | trim + '<|eot_id|>' }}\n        {%- endgeneration %}\n    {%- else %}\n        {{- m.content | trim }}\n    {%- endif %}\n{%- endfor %}\n";
        let t = ChatTemplate::new(src, "test", specials()).unwrap();
        let r = t.render(&convo()[1..], false).unwrap();
        assert_eq!(r.text, "<|begin_of_text|><user>Hi<assistant>Hello!<|eot_id|>");
        assert_eq!(&r.text[r.generation_spans[0].clone()], "Hello!<|eot_id|>");
    }

    /// Qwen3: the reasoning of turns before the last user query is dropped, the last turn keeps
    /// its <think> block (empty when there was none); each response, block included, is trained.
    /// With `enable_thinking = false` the empty block is the generation prompt's, not trained.
    #[test]
    fn qwen3_builtin_thinking_spans() {
        let t = ChatTemplate::builtin("qwen3", SpecialTokens::default()).unwrap();
        let msgs = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "2+2?"),
            Message::new("assistant", "<think>\nadd them\n</think>\n\n4"),
            Message::new("user", "3+3?"),
            Message::new("assistant", "<think>\nagain\n</think>\n\n6"),
        ];
        let r = t.render(&msgs, false).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nagain\n</think>\n\n6<|im_end|>\n"
        );
        let spans: Vec<&str> = r.generation_spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, ["4<|im_end|>", "<think>\nagain\n</think>\n\n6<|im_end|>"]);
        // No reasoning in the last turn: an empty block, trained in thinking mode…
        let plain = [Message::new("user", "hi"), Message::new("assistant", "hello")];
        let r = t.render(&plain, false).unwrap();
        assert_eq!(&r.text[r.generation_spans[0].clone()], "<think>\n\n</think>\n\nhello<|im_end|>");
        assert!(t.render(&plain[..1], true).unwrap().text.ends_with("<|im_start|>assistant\n"));
        // …and prompt in non-thinking mode, where the generation prompt writes it.
        let mut vars = serde_json::Map::new();
        vars.insert("enable_thinking".into(), serde_json::json!(false));
        let nt = ChatTemplate::builtin("qwen3", SpecialTokens::default()).unwrap().with_vars(vars);
        let r = nt.render(&plain, false).unwrap();
        assert!(r.text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n"), "{}", r.text);
        assert_eq!(&r.text[r.generation_spans[0].clone()], "hello<|im_end|>");
        assert!(nt.render(&plain[..1], true).unwrap().text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        // reasoning_content as a field of its own.
        let mut m = Message::new("assistant", "5");
        m.extra.insert("reasoning_content".into(), serde_json::json!("count"));
        let r = t.render(&[Message::new("user", "?"), m], false).unwrap();
        assert!(r.text.ends_with("<think>\ncount\n</think>\n\n5<|im_end|>\n"), "{}", r.text);
    }

    /// A model's template without generation blocks borrows the built-in's where both render a
    /// conversation to the same text: a multi-turn Qwen3 chat, whose earlier reasoning vanishes
    /// once a later turn follows (so rendering prefixes cannot find the responses), gets the
    /// built-in's spans; a conversation the two render differently keeps none.
    #[test]
    fn span_donor_lends_blocks_where_the_texts_agree() {
        let builtin = ChatTemplate::builtin("qwen3", SpecialTokens::default()).unwrap();
        let plain_src = builtin.source().replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "");
        let model = ChatTemplate::new(&plain_src, "model", SpecialTokens::default()).unwrap();
        assert!(!model.has_generation_blocks());
        let model = model.with_span_donor();
        assert_eq!(model.span_donor(), Some("builtin:qwen3"));
        let msgs = vec![
            Message::new("user", "a"),
            Message::new("assistant", "<think>x</think>b"),
            Message::new("user", "c"),
            Message::new("assistant", "d"),
        ];
        let (m, b) = (model.render(&msgs, false).unwrap(), builtin.render(&msgs, false).unwrap());
        assert_eq!((&m.text, &m.generation_spans, m.lent_spans), (&b.text, &b.generation_spans, true));
        // A template of another layout lends nothing.
        let other = ChatTemplate::new("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", "model", SpecialTokens::default())
            .unwrap()
            .with_span_donor();
        assert_eq!(other.span_donor(), Some("builtin:chatml"));
        assert!(other.render(&msgs, false).unwrap().generation_spans.is_empty());
    }

    #[test]
    fn gemma_builtin_layout() {
        let t = ChatTemplate::builtin("gemma", SpecialTokens { bos_token: Some("<bos>".into()), ..Default::default() }).unwrap();
        let r = t.render(&convo(), false).unwrap();
        assert_eq!(r.text, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n");
        assert_eq!(&r.text[r.generation_spans[0].clone()], "Hello!<end_of_turn>");
        assert!(t.render(&convo()[..2], true).unwrap().text.ends_with("<start_of_turn>model\n"));
    }

    #[test]
    fn marker_characters_in_data_are_refused() {
        let t = ChatTemplate::builtin("chatml", specials()).unwrap();
        let e = t.render(&[Message::new("user", "a\u{FDD0}b")], false).unwrap_err();
        assert!(e.contains("U+FDD0"), "{e}");
    }

    #[test]
    fn tojson_indent_matches_python() {
        let t = ChatTemplate::new("{{ x|tojson(indent=2) }}", "t", specials()).unwrap();
        let env = &t.env;
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(minijinja::context! { x => Serde(serde_json::json!({"a": [1, {"b": "é"}], "e": {}})) })
            .unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"é\"\n    }\n  ],\n  \"e\": {}\n}");
    }
}
