//! What the engine consumes: one micro-batch of token ids with shifted targets, positions and
//! segment ids (packing keeps attention within each example).

/// Label value that contributes nothing to the loss (Hugging Face convention).
pub const IGNORE_INDEX: i32 = -100;

/// One micro-batch, row-major `[batch_size, seq_len]` in every field.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// The token the model must predict at each position (already shifted: `targets[t]` is the
    /// label of position `t + 1` of the same example), or `IGNORE_INDEX`.
    pub targets: Vec<i32>,
    /// Position ids for rotary embeddings; restart at 0 for each packed example.
    pub positions: Vec<u32>,
    /// Attention is causal and only between positions with equal segment ids (block-diagonal
    /// for packed rows; padding gets its own segment).
    pub segments: Vec<u32>,
}

impl Batch {
    pub fn tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// Positions that contribute to the loss.
    pub fn trained_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Build one unpacked row per example from HF-aligned `(input_ids, labels)` pairs, padding to
    /// the longest (or to `pad_to`); `labels[i]` is the label of `input_ids[i]` (−100 = ignored).
    pub fn from_examples(examples: &[(&[u32], &[i32])], pad_id: u32, pad_to: Option<usize>) -> Batch {
        let seq_len = pad_to.unwrap_or_else(|| examples.iter().map(|e| e.0.len()).max().unwrap_or(1)).max(1);
        let b = examples.len();
        let mut batch = Batch {
            batch_size: b,
            seq_len,
            input_ids: vec![pad_id; b * seq_len],
            targets: vec![IGNORE_INDEX; b * seq_len],
            positions: vec![0; b * seq_len],
            segments: vec![1; b * seq_len],
        };
        for (row, (ids, labels)) in examples.iter().enumerate() {
            let n = ids.len().min(seq_len);
            let base = row * seq_len;
            for t in 0..seq_len {
                if t < n {
                    batch.input_ids[base + t] = ids[t];
                    batch.positions[base + t] = t as u32;
                    batch.segments[base + t] = 0;
                    if t + 1 < n {
                        batch.targets[base + t] = labels[t + 1];
                    }
                } else {
                    batch.positions[base + t] = t as u32;
                }
            }
        }
        batch
    }
}
