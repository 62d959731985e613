//! The demo tokenizer: byte-level BPE trained on the generator's own text, with Llama 3's special
//! tokens appended after the learned vocabulary, and the three Hugging Face side files
//! (`tokenizer_config.json` with our chat template, `special_tokens_map.json`).

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
    TokenizerBuilder,
};

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS_TEXT: &str = "<|end_of_text|>";
pub const EOT: &str = "<|eot_id|>";
pub const PAD: &str = "<|finetune_right_pad_id|>";
pub const RESERVED: usize = 8;

/// Special tokens in id order, appended after the BPE vocabulary. The order follows Llama 3 for
/// the first five; `finetune_right_pad_id` is Llama 3.1's padding token.
pub fn special_tokens() -> Vec<String> {
    let mut v: Vec<String> = [BOS, EOS_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT, PAD].iter().map(|s| s.to_string()).collect();
    v.extend((0..RESERVED).map(|i| format!("<|reserved_special_token_{i}|>")));
    v
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Pre-token boundaries: a word with at most one leading space, a number, a run of punctuation,
/// a run of line breaks (with any spaces before them), other whitespace. Line breaks stay apart
/// from the word after them: the chat template ends a prompt on `<|end_header_id|>\n\n`, and
/// the answer must start on a fresh token there in training and in generation alike. (GPT-2's
/// split, which ByteLevel applies by default, cuts "\n\nThe" as "\n" "\n" "The" but a
/// trailing "\n\n" as one piece, so the two would disagree.)
const SPLIT: &str = r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Train the BPE on `texts` (which must not contain special-token strings: the trainer would learn
/// merges for them) so that the vocabulary plus the specials comes to `total_vocab`.
pub fn train(texts: &[String], total_vocab: usize) -> Result<Tokenizer, Error> {
    let specials = special_tokens();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(
            PreSequence::new(vec![
                Split::new(SplitPattern::Regex(SPLIT.into()), SplitDelimiterBehavior::Isolated, false)?.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
        ))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()?;
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(total_vocab - specials.len())
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .build();
    tok.train(&mut trainer, texts.iter())?;
    // Added after training, the specials take the ids right after the learned vocabulary.
    tok.add_special_tokens(specials.iter().map(|s| AddedToken::from(s.as_str(), true)))?;
    let bos_id = tok.token_to_id(BOS).ok_or("begin_of_text was not added")?;
    // As in Llama 3's tokenizer.json: byte-level offsets first, then begin_of_text in front.
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))?
        .try_pair(format!("{BOS} $A:0 {BOS}:1 $B:1"))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()?;
    let post = Sequence::new(vec![ByteLevel::new(true, false, true).into(), template.into()]);
    tok.with_post_processor(Some(PostProcessorWrapper::from(post)));
    Ok(Tokenizer::from(tok))
}

/// Llama-3 style, written for this project. The assistant turn sits between `generation` markers
/// (Hugging Face's `return_assistant_tokens_mask`), and `<|eot_id|>` is inside them so a model
/// trained on responses only also learns to stop.
pub const CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

pub fn tokenizer_config(tok: &Tokenizer, model_max_length: usize) -> Value {
    let mut decoder = Map::new();
    for s in special_tokens() {
        let id = tok.token_to_id(&s).expect("special tokens were added");
        decoder.insert(
            id.to_string(),
            json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    json!({
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

pub fn special_tokens_map() -> Value {
    let tok = |s: &str| json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    json!({"bos_token": tok(BOS), "eos_token": tok(EOT), "pad_token": tok(PAD)})
}
