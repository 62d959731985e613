//! One sample → token ids and HF-aligned labels. A conversation is rendered once through the chat
//! template and tokenized once (`add_special_tokens = false`: the template writes BOS itself); the
//! trained part is a set of byte spans of the rendered text, mapped onto tokens by their offsets.

use std::ops::Range;

use crate::config::TrainOn;
use crate::data::batch::IGNORE_INDEX;
use crate::data::format::Sample;
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::TokenizerBundle;

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

/// An encoded sample before truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub mask: MaskSource,
    /// The rendered text (for chats) — kept for previews, dropped by the caller otherwise.
    pub text: Option<String>,
}

pub struct Encoder<'a> {
    pub tok: &'a TokenizerBundle,
    /// None for raw-text datasets, which never render a template.
    pub template: Option<&'a ChatTemplate>,
    pub train_on: TrainOn,
}

impl Encoder<'_> {
    pub fn encode(&self, sample: &Sample, keep_text: bool) -> Result<Encoded, String> {
        match sample {
            Sample::Text(text) => {
                let body = self.tok.encode(text, false).map_err(|e| e.to_string())?;
                let ids: Vec<u32> = self.tok.bos_id().into_iter().chain(body).chain(self.tok.eos_id()).collect();
                let labels = ids.iter().map(|&t| t as i32).collect();
                Ok(Encoded { input_ids: ids, labels, mask: MaskSource::All, text: keep_text.then(|| text.clone()) })
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
        let enc = self.tok.encode_with_offsets(&full.text, false).map_err(|e| e.to_string())?;
        let labels = label_tokens(&enc.ids, &enc.offsets, &spans);
        let ids = enc.ids;
        if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            return Err("the rendered conversation has no trained tokens (the template wrote no assistant text)".into());
        }
        Ok(Encoded { input_ids: ids, labels, mask, text: keep_text.then_some(full.text) })
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
