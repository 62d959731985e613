//! Turning generated ids into text as they come, and deciding when an answer is over.
//!
//! Detokenizing one id at a time is wrong for byte-level BPE (a character may span tokens) and
//! for tokenizers that decode a leading space differently at the start; so each step decodes a
//! short window of the latest ids and emits what it adds to the window without them (the way
//! text-generation-inference streams). Text that could still become a stop string is held back
//! until it cannot, so a stop string never reaches the screen.

use crate::error::Result;
use crate::model::tokenizer::TokenizerBundle;

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end token: EOS or the template's end of turn.
    Stop,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// `max_new_tokens` were generated.
    Length,
    /// The context (cache) is full.
    Context,
    /// The user stopped it.
    Cancelled,
}

/// When to stop: end tokens and stop strings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopRules {
    pub token_ids: Vec<u32>,
    pub strings: Vec<String>,
}

/// The text of one answer, streamed.
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the window decoded for context, and the end of what has been turned into text.
    prefix_offset: usize,
    read_offset: usize,
    /// Every character decoded so far, and how much of it has been handed out.
    text: String,
    emitted: usize,
    strings: Vec<String>,
    stopped: bool,
}

impl TextStream {
    pub fn new(stop_strings: &[String]) -> Self {
        TextStream {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            strings: stop_strings.iter().filter(|s| !s.is_empty()).cloned().collect(),
            stopped: false,
        }
    }

    /// Add one id; returns the text that may now be shown, and whether a stop string ended the
    /// answer (the text up to it has then been returned).
    pub fn push(&mut self, tok: &TokenizerBundle, id: u32) -> Result<(String, bool)> {
        if self.stopped {
            return Ok((String::new(), true));
        }
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let after = tok.decode(&self.ids[self.prefix_offset..], true)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = after.get(before.len()..).unwrap_or_default();
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        if let Some(cut) = self.find_stop() {
            self.text.truncate(cut);
            self.stopped = true;
            let out = self.text[self.emitted.min(cut)..].to_string();
            self.emitted = self.text.len();
            return Ok((out, true));
        }
        let safe = self.safe_end();
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok((out, false))
    }

    /// Where the earliest stop string starts in the text, if one appears.
    fn find_stop(&self) -> Option<usize> {
        self.strings.iter().filter_map(|s| self.text.find(s.as_str())).min()
    }

    /// The end of the text that cannot be the beginning of a stop string.
    fn safe_end(&self) -> usize {
        let mut end = self.text.len();
        for s in &self.strings {
            // The longest suffix of the text that is a proper prefix of `s`.
            for (i, _) in self.text.char_indices().rev().take(s.chars().count()) {
                if s.starts_with(&self.text[i..]) {
                    end = end.min(i);
                }
            }
        }
        end.max(self.emitted)
    }

    /// The rest of the text (held back for stop strings that did not come), at the end.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The answer's text (without a stop string that ended it).
    pub fn text(&self) -> &str {
        &self.text
    }
}
