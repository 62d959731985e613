//! What the engine consumes: one micro-batch of token ids with shifted targets, positions and
//! segment ids (packing keeps attention within each example).

use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::data::Example;

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

    /// Whether causal attention over each whole row, without segments, gives the same loss and
    /// gradients as the segment mask: each row is one segment, or one segment followed by a tail
    /// in which no position is trained (its padding). Tail positions then attend to the example
    /// instead of only to themselves, but nothing comes after them, no loss reads them, so their
    /// gradient is exactly zero at every layer and the trained positions never see them.
    pub fn rows_attend_causally(&self) -> bool {
        let n = self.seq_len;
        (0..self.batch_size).all(|r| {
            let (seg, tgt) = (&self.segments[r * n..(r + 1) * n], &self.targets[r * n..(r + 1) * n]);
            match seg.iter().position(|&s| s != seg[0]) {
                None => true,
                Some(cut) => seg[cut..].iter().all(|&s| s == seg[cut]) && tgt[cut..].iter().all(|&t| t == IGNORE_INDEX),
            }
        })
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

/// Serves micro-batches of a prepared dataset in an order fixed by `(seed, epoch)`, so that a
/// resumed run sees exactly the batches the interrupted one would have.
///
/// The unit of shuffling is a *row*: one example when padding, or the examples packed together
/// when packing. Packing happens once, at construction, over an order drawn from the seed alone;
/// each epoch then shuffles the packed rows. Packing anew each epoch would change the number of
/// batches per epoch, which the schedule and a resume both need to know up front.
pub struct Batcher {
    examples: Arc<Vec<Example>>,
    batch_size: usize,
    max_seq_len: usize,
    seed: u64,
    pad_id: u32,
    /// Example indices of each row.
    rows: Vec<Vec<u32>>,
    /// The last epoch's row order: every micro-batch of an epoch needs it.
    order_cache: Mutex<Option<(u64, Arc<Vec<u32>>)>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("examples", &self.examples.len())
            .field("rows", &self.rows.len())
            .field("batch_size", &self.batch_size)
            .field("max_seq_len", &self.max_seq_len)
            .finish_non_exhaustive()
    }
}

/// A ChaCha stream for `(seed, stream)`. The 32-byte key is spelled out rather than taken from
/// `seed_from_u64`, whose expansion belongs to another crate and could change under us.
pub(crate) fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(b"tunestud");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// Uniform in `0..n` (n > 0) without modulo bias: draws below 2^64 mod n are redrawn.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let reject_under = n.wrapping_neg() % n;
    loop {
        let x = rng.next_u64();
        if x >= reject_under {
            return x % n;
        }
    }
}

/// Fisher–Yates over `0..n`, written out so the order never depends on a library's choice.
pub(crate) fn permutation(n: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// The stream that orders examples for packing; epochs use their own number as the stream.
const PACKING_STREAM: u64 = u64::MAX;

/// Greedy first-fit: each item goes into the first row that still has room for it. A max-tree
/// over the rows' free space finds that row in O(log n) instead of scanning every open row.
fn first_fit(lengths: &[usize], order: &[u32], capacity: usize) -> Vec<Vec<u32>> {
    let n = order.len().max(1);
    let leaves = n.next_power_of_two();
    // Rows not opened yet have the full capacity, so "leftmost with room" opens them in order.
    let mut tree = vec![capacity; 2 * leaves];
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for &ex in order {
        let need = lengths[ex as usize].clamp(1, capacity);
        let mut node = 1;
        while node < leaves {
            node = if tree[2 * node] >= need { 2 * node } else { 2 * node + 1 };
        }
        let row = node - leaves;
        if row >= rows.len() {
            rows.resize_with(row + 1, Vec::new);
        }
        rows[row].push(ex);
        tree[node] -= need;
        let mut up = node / 2;
        while up >= 1 {
            tree[up] = tree[2 * up].max(tree[2 * up + 1]);
            up /= 2;
        }
    }
    rows
}

impl Batcher {
    /// `examples` longer than `max_seq_len` are cut to it when batched (prepare_dataset already
    /// does so; this keeps the memory plan's bound whatever the caller passes).
    pub fn new(examples: Arc<Vec<Example>>, batch_size: usize, max_seq_len: usize, packing: bool, seed: u64, pad_id: u32) -> Self {
        let batch_size = batch_size.max(1);
        let max_seq_len = max_seq_len.max(1);
        let rows = if packing {
            let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
            let order = permutation(examples.len(), &mut rng_for(seed, PACKING_STREAM));
            first_fit(&lengths, &order, max_seq_len)
        } else {
            (0..examples.len() as u32).map(|i| vec![i]).collect()
        };
        Batcher { examples, batch_size, max_seq_len, seed, pad_id, rows, order_cache: Mutex::new(None) }
    }

    /// Micro-batches in one epoch; the last one may hold fewer rows.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// Rows (packed sequences, or examples when not packing) per epoch.
    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len()
    }

    /// Example indices of every row, in packing order (for statistics).
    pub fn rows(&self) -> &[Vec<u32>] {
        &self.rows
    }

    fn epoch_order(&self, epoch: u64) -> Arc<Vec<u32>> {
        let mut cache = self.order_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, order)) = cache.as_ref()
            && *e == epoch
        {
            return order.clone();
        }
        let order = Arc::new(permutation(self.rows.len(), &mut rng_for(self.seed, epoch)));
        *cache = Some((epoch, order.clone()));
        order
    }

    fn picked<'o>(&self, order: &'o [u32], index: usize) -> &'o [u32] {
        &order[index * self.batch_size..((index + 1) * self.batch_size).min(order.len())]
    }

    /// Tokens of a row as batched (examples cut to max_seq_len, the row too).
    fn row_len(&self, row: u32) -> usize {
        let r = &self.rows[row as usize];
        r.iter().map(|&e| self.examples[e as usize].input_ids.len().min(self.max_seq_len)).sum::<usize>().min(self.max_seq_len)
    }

    /// The longest row of the micro-batch rounded up to a multiple of 8, never past max_seq_len.
    fn seq_len(&self, picked: &[u32]) -> usize {
        let longest = picked.iter().map(|&r| self.row_len(r)).max().unwrap_or(1).max(1);
        longest.next_multiple_of(8).min(self.max_seq_len.max(longest))
    }

    /// (real tokens, tokens including padding) over an epoch's batches, without building them.
    pub fn token_counts(&self, epoch: u64) -> (usize, usize) {
        let order = self.epoch_order(epoch);
        let (mut real, mut padded) = (0, 0);
        for index in 0..self.batches_per_epoch() {
            let picked = self.picked(&order, index);
            real += picked.iter().map(|&r| self.row_len(r)).sum::<usize>();
            padded += picked.len() * self.seq_len(picked);
        }
        (real, padded)
    }

    /// Deterministic for (seed, epoch, index): a resumed run must see exactly the same batches.
    ///
    /// Rows are padded to the longest in the micro-batch, rounded up to a multiple of 8 (but never
    /// past `max_seq_len`). Padding has input `pad_id`, target `IGNORE_INDEX` and a segment id of
    /// its own. Packed examples each get a segment id and positions from 0, and the last token of
    /// each example has no target, so nothing is learned across an example boundary.
    ///
    /// Panics if `index >= batches_per_epoch()`: that is a caller bug, not a data problem.
    pub fn batch(&self, epoch: u64, index: usize) -> Batch {
        let n = self.batches_per_epoch();
        assert!(index < n, "batch index {index} out of range: {n} batches per epoch");
        let order = self.epoch_order(epoch);
        let picked = self.picked(&order, index);
        let seq_len = self.seq_len(picked);
        let b = picked.len();
        let mut batch = Batch {
            batch_size: b,
            seq_len,
            input_ids: vec![self.pad_id; b * seq_len],
            targets: vec![IGNORE_INDEX; b * seq_len],
            positions: vec![0; b * seq_len],
            segments: vec![0; b * seq_len],
        };
        for (slot, &r) in picked.iter().enumerate() {
            let base = slot * seq_len;
            let mut at = 0;
            let mut segment = 0u32;
            for &e in &self.rows[r as usize] {
                let ex = &self.examples[e as usize];
                let len = ex.input_ids.len().min(self.max_seq_len).min(seq_len - at);
                if len == 0 {
                    continue;
                }
                for t in 0..len {
                    let i = base + at + t;
                    batch.input_ids[i] = ex.input_ids[t];
                    batch.positions[i] = t as u32;
                    batch.segments[i] = segment;
                    if t + 1 < len {
                        batch.targets[i] = ex.labels[t + 1];
                    }
                }
                at += len;
                segment += 1;
            }
            // Padding: a segment of its own, positions from 0 like any segment.
            for t in at..seq_len {
                batch.positions[base + t] = (t - at) as u32;
                batch.segments[base + t] = segment;
            }
        }
        batch
    }
}
