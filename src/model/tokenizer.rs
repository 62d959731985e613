//! The tokenizer of a Hugging Face model folder and everything around it that training needs:
//! `tokenizer.json` (through the `tokenizers` crate), the chat template and special tokens from
//! `tokenizer_config.json` (with `special_tokens_map.json`, `chat_template.jinja` and
//! `generation_config.json` when present), and the choice of a pad token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{Error, IoContext, Result};
use crate::model::chat_template::{ChatTemplate, SpecialTokens};

/// Where the pad id came from; the preflight reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSource {
    /// `pad_token` in tokenizer_config.json / special_tokens_map.json.
    Declared,
    /// `pad_token_id` in generation_config.json.
    GenerationConfig,
    /// An unused special token of the vocabulary (a reserved or fine-tune pad token).
    Reserved,
    /// Nothing better: the EOS token. Harmless for training here (pad positions are never
    /// targets and sit in their own segment) but worth a warning: other tools then mask EOS.
    Eos,
}

/// Candidate pad tokens that models ship unused, best first. Llama 3.1+ reserves
/// `<|finetune_right_pad_id|>` for exactly this; Qwen has `<|vision_pad|>`, unused in text models.
const PAD_CANDIDATES: [&str; 7] =
    ["<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|vision_pad|>"];

/// Token ids and, for each, the byte range of the encoded text it covers (special tokens added
/// by the post-processor cover nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// A model's tokenizer with its special tokens and chat templates.
pub struct TokenizerBundle {
    tokenizer: tokenizers::Tokenizer,
    dir: PathBuf,
    specials: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: u32,
    pad_source: PadSource,
    /// Tokens that end a generation: EOS plus generation_config's `eos_token_id` list
    /// (Llama 3 instruct lists `<|eot_id|>` there).
    stop_ids: Vec<u32>,
    /// Chat templates by name; the model's default one is under "default".
    templates: BTreeMap<String, String>,
    /// `added_tokens_decoder` of tokenizer_config.json merged with the added tokens of
    /// tokenizer.json: id → (content, special).
    added: BTreeMap<u32, (String, bool)>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .field("pad_id", &self.pad_id)
            .field("pad_source", &self.pad_source)
            .finish_non_exhaustive()
    }
}

/// A special token is written either as a string or as an AddedToken object (`{"content": …}`).
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_path(path)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::line(path, e.line(), format!("not valid JSON: {e}")))
}

impl TokenizerBundle {
    /// Load from a model folder. `tokenizer.json` is required; the other files are optional.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::file(
                &tok_path,
                "missing: this folder needs a fast-tokenizer file (save the tokenizer with transformers to create it)",
            ));
        }
        let bytes = std::fs::read(&tok_path).with_path(&tok_path)?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::file(&tok_path, format!("cannot be read as a tokenizer: {e}")))?;
        let config = read_json_if_present(&model_dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_present(&model_dir.join("special_tokens_map.json"))?;
        let generation = read_json_if_present(&model_dir.join("generation_config.json"))?;

        let mut templates = BTreeMap::new();
        if let Some(cfg) = &config {
            match cfg.get("chat_template") {
                Some(Json::String(s)) => {
                    templates.insert("default".to_string(), s.clone());
                }
                Some(Json::Array(list)) => {
                    for item in list {
                        if let (Some(name), Some(t)) =
                            (item.get("name").and_then(Json::as_str), item.get("template").and_then(Json::as_str))
                        {
                            templates.insert(name.to_string(), t.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        // Newer transformers versions save the template beside the config instead of inside it.
        if !templates.contains_key("default") {
            let jinja = model_dir.join("chat_template.jinja");
            if jinja.exists() {
                templates.insert("default".into(), std::fs::read_to_string(&jinja).with_path(&jinja)?);
            } else if let Some(Json::Object(m)) = read_json_if_present(&model_dir.join("chat_template.json"))?
                && let Some(Json::String(s)) = m.get("chat_template")
            {
                templates.insert("default".into(), s.clone());
            }
        }

        let mut added = BTreeMap::new();
        for (id, tok) in tokenizer.get_added_tokens_decoder() {
            added.insert(id, (tok.content.clone(), tok.special));
        }
        if let Some(Json::Object(dec)) = config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            for (id, tok) in dec {
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), token_string(Some(tok))) {
                    let special = tok.get("special").and_then(Json::as_bool).unwrap_or(false);
                    added.entry(id).or_insert((content, special));
                }
            }
        }

        // tokenizer_config.json wins; special_tokens_map.json fills what it leaves out.
        let field = |name: &str| {
            token_string(config.as_ref().and_then(|c| c.get(name))).or_else(|| token_string(special_map.as_ref().and_then(|c| c.get(name))))
        };
        let specials = SpecialTokens {
            bos_token: field("bos_token"),
            eos_token: field("eos_token"),
            pad_token: field("pad_token"),
            unk_token: field("unk_token"),
        };

        let mut bundle = TokenizerBundle {
            tokenizer,
            dir: model_dir.to_path_buf(),
            specials,
            bos_id: None,
            eos_id: None,
            pad_id: 0,
            pad_source: PadSource::Eos,
            stop_ids: Vec::new(),
            templates,
            added,
            warnings: Vec::new(),
        };
        // Some tokenizer.json files carry truncation or padding settings from whoever saved them;
        // the dataset code truncates and pads itself and needs the full, unpadded encoding.
        bundle.tokenizer.with_truncation(None).map_err(|e| Error::file(&tok_path, format!("cannot disable truncation: {e}")))?;
        bundle.tokenizer.with_padding(None);
        bundle.resolve_ids(generation.as_ref());
        Ok(bundle)
    }

    /// Build from an in-memory tokenizer (tests, tools); no templates unless given.
    pub fn from_parts(tokenizer: tokenizers::Tokenizer, specials: SpecialTokens, chat_template: Option<String>) -> Self {
        let mut added = BTreeMap::new();
        for (id, tok) in tokenizer.get_added_tokens_decoder() {
            added.insert(id, (tok.content.clone(), tok.special));
        }
        let mut templates = BTreeMap::new();
        if let Some(t) = chat_template {
            templates.insert("default".to_string(), t);
        }
        let mut bundle = TokenizerBundle {
            tokenizer,
            dir: PathBuf::new(),
            specials,
            bos_id: None,
            eos_id: None,
            pad_id: 0,
            pad_source: PadSource::Eos,
            stop_ids: Vec::new(),
            templates,
            added,
            warnings: Vec::new(),
        };
        bundle.resolve_ids(None);
        bundle
    }

    fn resolve_ids(&mut self, generation: Option<&Json>) {
        let id_of = |s: &Option<String>| s.as_deref().and_then(|t| self.tokenizer.token_to_id(t));
        self.bos_id = id_of(&self.specials.bos_token);
        self.eos_id = id_of(&self.specials.eos_token);
        for (name, tok, id) in [("bos_token", &self.specials.bos_token, self.bos_id), ("eos_token", &self.specials.eos_token, self.eos_id)]
        {
            if let (Some(t), None) = (tok, id) {
                self.warnings.push(format!("{name} `{t}` is not in the vocabulary"));
            }
        }
        let gen_ids = |key: &str| -> Vec<u32> {
            match generation.and_then(|g| g.get(key)) {
                Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).map(|v| v as u32).collect(),
                _ => Vec::new(),
            }
        };
        let gen_eos = gen_ids("eos_token_id");
        if self.eos_id.is_none()
            && let Some(&first) = gen_eos.first()
        {
            self.eos_id = Some(first);
            self.specials.eos_token = self.tokenizer.id_to_token(first);
        }
        if self.bos_id.is_none()
            && let Some(&b) = gen_ids("bos_token_id").first()
            && self.specials.bos_token.is_none()
        {
            // Only when the config named none: a config that names a token we could not find has
            // already been warned about, and guessing would hide that.
            self.bos_id = Some(b);
            self.specials.bos_token = self.tokenizer.id_to_token(b);
        }
        self.stop_ids = self.eos_id.into_iter().chain(gen_eos).collect();
        self.stop_ids.dedup();
        let mut seen = std::collections::BTreeSet::new();
        self.stop_ids.retain(|id| seen.insert(*id));

        let declared = id_of(&self.specials.pad_token);
        let gen_pad = gen_ids("pad_token_id").first().copied().filter(|&p| (p as usize) < self.vocab_size());
        let reserved = PAD_CANDIDATES.iter().find_map(|t| self.tokenizer.token_to_id(t)).or_else(|| self.highest_reserved_special());
        (self.pad_id, self.pad_source) = if let Some(p) = declared {
            (p, PadSource::Declared)
        } else if let Some(p) = gen_pad.filter(|p| Some(*p) != self.eos_id) {
            (p, PadSource::GenerationConfig)
        } else if let Some(p) = reserved {
            (p, PadSource::Reserved)
        } else {
            (self.eos_id.unwrap_or(0), PadSource::Eos)
        };
        // What the pad choice means (`pad_source`) is reported once, by the preflight's checks.
        if self.specials.pad_token.is_none() || self.pad_source != PadSource::Declared {
            self.specials.pad_token = self.tokenizer.id_to_token(self.pad_id);
        }
    }

    /// `<|reserved_special_token_N|>` with the largest N (Llama 3): the least likely to be given a
    /// meaning by a later fine-tune.
    fn highest_reserved_special(&self) -> Option<u32> {
        self.added
            .iter()
            .filter_map(|(&id, (content, _))| {
                let n = content.strip_prefix("<|reserved_special_token_")?.strip_suffix("|>")?.parse::<u32>().ok()?;
                Some((n, id))
            })
            .max()
            .map(|(_, id)| id)
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (which adds
    /// BOS for Llama models).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.ids)
    }

    /// Token ids with the byte range of `text` each one came from.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::file(self.dir.join("tokenizer.json"), format!("encoding failed: {e}")))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| Error::file(self.dir.join("tokenizer.json"), format!("decoding failed: {e}")))
    }

    /// The vocabulary entry of `id` (`Ġthe`, `<|eot_id|>`), not its decoded text.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_to_id(text)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn pad_source(&self) -> PadSource {
        self.pad_source
    }

    /// Ids that end generation (EOS and generation_config's extra end tokens such as `<|eot_id|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Whether `id` is a special added token (BOS, EOS, headers, reserved tokens).
    pub fn is_special(&self, id: u32) -> bool {
        self.added.get(&id).is_some_and(|(_, special)| *special)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.specials
    }

    /// The model's default chat template source, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.templates.get("default").map(String::as_str)
    }

    /// Named chat templates (the default one is "default").
    pub fn chat_templates(&self) -> impl Iterator<Item = (&str, &str)> {
        self.templates.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Problems noticed while loading (unknown special tokens, pad = EOS), for the preflight.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The template `dataset.template` asks for: `auto` → the model's default, else a built-in
    /// that matches the vocabulary's turn markers; a name → one of the model's named templates or
    /// a built-in.
    pub fn resolve_template(&self, name: &str) -> Result<ChatTemplate> {
        let name = name.trim();
        if name.is_empty() || name == "auto" {
            if let Some(src) = self.chat_template() {
                return Ok(ChatTemplate::new(src, "model", self.specials.clone())?.with_span_donor());
            }
            return ChatTemplate::builtin(self.default_builtin(), self.specials.clone());
        }
        if let Some(src) = self.templates.get(name) {
            return Ok(ChatTemplate::new(src, format!("model:{name}"), self.specials.clone())?.with_span_donor());
        }
        ChatTemplate::builtin(name, self.specials.clone())
    }

    /// For a model without a template: the built-in whose turn markers are single tokens here,
    /// else Alpaca, which needs no special tokens at all.
    pub fn default_builtin(&self) -> &'static str {
        let has = |t: &str| self.tokenizer.token_to_id(t).is_some();
        if has("<|start_header_id|>") && has("<|eot_id|>") {
            "llama-3"
        } else if has("<|im_start|>") && has("<|im_end|>") {
            "chatml"
        } else if has("<start_of_turn>") && has("<end_of_turn>") {
            "gemma"
        } else if has("[INST]") {
            "mistral"
        } else {
            "alpaca"
        }
    }
}

/// The end-of-turn token of the chat template: the first special token the template writes after
/// an assistant message. `None` when the model has no template or it ends turns with plain text.
pub fn end_of_turn_token(tok: &TokenizerBundle) -> Option<u32> {
    tok.chat_template()?;
    end_of_turn_token_in(tok, &tok.resolve_template("auto").ok()?)
}

/// The first special token `template` writes after an assistant message (see
/// [`end_of_turn_token`]), for any template, built-ins included.
pub fn end_of_turn_token_in(tok: &TokenizerBundle, template: &ChatTemplate) -> Option<u32> {
    use crate::model::chat_template::Message;
    let marker = "Quokka lantern 7391";
    let msgs = [Message::new("user", "Hello there"), Message::new("assistant", marker)];
    let rendered = template.render(&msgs, false).ok()?;
    let end = rendered.text.rfind(marker)? + marker.len();
    let enc = tok.encode_with_offsets(&rendered.text, false).ok()?;
    enc.ids.iter().zip(&enc.offsets).find(|(id, o)| o.0 >= end && tok.is_special(**id)).map(|(id, _)| *id)
}
