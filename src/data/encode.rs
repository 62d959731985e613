//! One sample → token ids and HF-aligned labels. A conversation is rendered once through the chat
//! template and tokenized once (`add_special_tokens = false`: the template writes BOS itself); the
//! trained part is a set of byte spans of the rendered text, mapped onto tokens by their offsets.
//!
//! A text far longer than the token budget is not tokenized whole: only a prefix that yields the
//! budget plus a margin is (`encode_bounded`), so a 15 MB row costs what a row of a few thousand
//! tokens does, and the first `max_seq_len` tokens are the ones a whole tokenization would give.

use std::ops::Range;

use crate::config::TrainOn;
use crate::data::batch::IGNORE_INDEX;
use crate::data::format::Sample;
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::{self, TokenizerBundle};

/// Where the trained spans come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// `{% generation %}` blocks of the template.
    GenerationBlocks,
    /// The difference between rendering up to an assistant turn (with the generation prompt) and
    /// through it.
    RenderedPrefixes,
    /// The `{% generation %}` blocks of the built-in template of the model's family, for each
    /// conversation the model's own template renders to the same text (the others: rendered
    /// prefixes).
    EquivalentBuiltin,
    /// Every token is trained (`train_on = all`, raw text).
    All,
}

impl MaskSource {
    /// Which tokens a run trains on, in a user's words (the CLI and the studio say it alike).
    pub fn words(self) -> &'static str {
        match self {
            MaskSource::GenerationBlocks => "the assistant's replies, as the chat template marks them",
            MaskSource::RenderedPrefixes => "the assistant's replies, found by rendering each turn",
            MaskSource::EquivalentBuiltin => "the assistant's replies, as the built-in template of the model's family marks them",
            MaskSource::All => "every token",
        }
    }
}

/// An encoded sample before truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// All the sample's tokens, or (when `cut`) its first ones, more than `Encoder::max_tokens`.
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub mask: MaskSource,
    /// The rendered text (for chats) — kept for previews, dropped by the caller otherwise.
    pub text: Option<String>,
    /// Tokens of the whole sample: exact, unless `cut`, where it is extrapolated from the prefix.
    pub total_tokens: usize,
    /// Only a prefix of the text was tokenized (it holds more than `max_tokens` tokens).
    pub cut: bool,
}

pub struct Encoder<'a> {
    pub tok: &'a TokenizerBundle,
    /// None for raw-text datasets, which never render a template.
    pub template: Option<&'a ChatTemplate>,
    pub train_on: TrainOn,
    /// The tokens training keeps of a sample (`max_seq_len`): a longer text is tokenized only as
    /// far as these need. None tokenizes every text whole.
    pub max_tokens: Option<usize>,
}

/// Bytes per token assumed for the first prefix: twice English prose and more than most code,
/// so one try is the rule; denser text costs a retry with a prefix twice as long.
const BYTES_PER_TOKEN: usize = 8;
/// Tokens produced past the budget before a prefix is trusted. Cutting the text inside a word can
/// change how the last tokens of that word merge, never tokens this far before the cut.
const CUT_MARGIN: usize = 64;

/// A text tokenized as far as `max_tokens` need (`add_special_tokens = false`).
pub struct Bounded {
    pub enc: tokenizer::Encoded,
    /// Tokens of the whole text: exact unless `cut`, else extrapolated from the prefix by bytes.
    pub total: usize,
    pub cut: bool,
}

/// Tokenize `text`, or only a prefix of it that yields at least `max_tokens + CUT_MARGIN` tokens:
/// the first `max_tokens` tokens are then those of the whole text, and a row of megabytes costs
/// the memory and time of a few thousand tokens.
pub fn encode_bounded(tok: &TokenizerBundle, text: &str, max_tokens: Option<usize>) -> Result<Bounded, String> {
    let whole = |text: &str| -> Result<Bounded, String> {
        let enc = tok.encode_with_offsets(text, false).map_err(|e| e.to_string())?;
        Ok(Bounded { total: enc.ids.len(), enc, cut: false })
    };
    let Some(max_tokens) = max_tokens else { return whole(text) };
    let want = max_tokens.saturating_add(CUT_MARGIN);
    let mut bytes = want.saturating_mul(BYTES_PER_TOKEN);
    while bytes < text.len() {
        let cut = text.floor_char_boundary(bytes);
        let enc = tok.encode_with_offsets(&text[..cut], false).map_err(|e| e.to_string())?;
        if enc.ids.len() >= want {
            // The rest is counted at the density of the prefix's second half, which is past the
            // template's headers and more like the text that follows.
            let half = cut / 2;
            let dense = enc.offsets.iter().filter(|o| o.0 >= half).count() as f64 / (cut - half).max(1) as f64;
            let total = enc.ids.len() + ((text.len() - cut) as f64 * dense).round() as usize;
            return Ok(Bounded { enc, total, cut: true });
        }
        bytes = bytes.saturating_mul(2);
    }
    whole(text)
}

impl Encoder<'_> {
    pub fn encode(&self, sample: &Sample, keep_text: bool) -> Result<Encoded, String> {
        match sample {
            Sample::Text(text) => {
                let body = encode_bounded(self.tok, text, self.max_tokens)?;
                let bos = self.tok.bos_id();
                // EOS ends the whole text: after a cut prefix it would stand where the text goes on.
                let eos = self.tok.eos_id().filter(|_| !body.cut);
                let ids: Vec<u32> = bos.into_iter().chain(body.enc.ids).chain(eos).collect();
                let labels = ids.iter().map(|&t| t as i32).collect();
                let total_tokens = body.total + bos.is_some() as usize + self.tok.eos_id().is_some() as usize;
                Ok(Encoded {
                    input_ids: ids,
                    labels,
                    mask: MaskSource::All,
                    text: keep_text.then(|| text.clone()),
                    total_tokens,
                    cut: body.cut,
                })
            }
            Sample::Chat(msgs) => self.encode_chat(msgs, keep_text),
        }
    }

    fn encode_chat(&self, msgs: &[Message], keep_text: bool) -> Result<Encoded, String> {
        let template = self.template.ok_or("a conversation needs a chat template (internal)")?;
        let full = template.render(msgs, false)?;
        let (spans, mask) = match self.train_on {
            TrainOn::All => (std::iter::once(0..full.text.len()).collect(), MaskSource::All),
            TrainOn::Responses if full.lent_spans && !full.generation_spans.is_empty() => {
                (full.generation_spans.clone(), MaskSource::EquivalentBuiltin)
            }
            TrainOn::Responses if !full.generation_spans.is_empty() => (full.generation_spans.clone(), MaskSource::GenerationBlocks),
            TrainOn::Responses => (prefix_spans(template, msgs, &full.text)?, MaskSource::RenderedPrefixes),
        };
        let Bounded { enc, total, cut } = encode_bounded(self.tok, &full.text, self.max_tokens)?;
        let labels = label_tokens(&enc.ids, &enc.offsets, &spans);
        let ids = enc.ids;
        // After a cut the trained text may lie past the prefix; the caller's truncation check
        // says so in its own words.
        let untrained = if cut { spans.iter().all(|s| s.is_empty()) } else { labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) };
        if untrained {
            return Err("the rendered conversation has no trained tokens (the template wrote no assistant text)".into());
        }
        Ok(Encoded { input_ids: ids, labels, mask, text: keep_text.then_some(full.text), total_tokens: total, cut })
    }
}

/// Assistant spans of `full` found by rendering prefixes of the conversation: what rendering
/// through turn i adds to rendering up to turn i with the generation prompt is what the model
/// must produce for that turn, end-of-turn token included. This only holds when the template
/// renders earlier turns the same whatever follows; when it does not, the row is refused with
/// a reason rather than guessed at.
fn prefix_spans(template: &ChatTemplate, msgs: &[Message], full: &str) -> Result<Vec<Range<usize>>, String> {
    let mut spans = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&msgs[..i], true)?.text;
        let through = template.render(&msgs[..=i], false)?.text;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "chat template ({}) renders turn {} differently once later turns are added, so the \
                 response span cannot be found; use a template with {{% generation %}} blocks or pick \
                 another dataset.template",
                template.origin(),
                i + 1
            ));
        }
        if through.len() > before.len() {
            spans.push(before.len()..through.len());
        }
    }
    Ok(spans)
}

/// Label each token: its own id where its byte range touches a trained span, else IGNORE_INDEX.
/// A token that straddles a span edge is trained: it carries response text the model must learn
/// to produce. Tokens with an empty range (some tokenizers trim whitespace out of offsets) count
/// at their position.
pub fn label_tokens(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i32> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(a, b))| {
            let hit = spans.iter().any(|s| if a == b { s.contains(&a) } else { a < s.end && b > s.start });
            if hit { id as i32 } else { IGNORE_INDEX }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn straddling_and_empty_tokens() {
        let ids = [10, 11, 12, 13];
        let offsets = [(0, 3), (3, 6), (6, 6), (8, 9)];
        let span = 5..7;
        assert_eq!(label_tokens(&ids, &offsets, &[span]), vec![-100, 11, 12, -100]);
        assert_eq!(label_tokens(&ids, &offsets, &[]), vec![-100; 4]);
    }
}
