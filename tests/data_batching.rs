//! `Batcher`: deterministic order, every example once per epoch, padding and packing layout.

use std::collections::BTreeMap;
use std::sync::Arc;

use tunestudio::data::{Batcher, Example, IGNORE_INDEX};

/// Example `i` has `len` tokens with ids `1000 * (i + 1) + t`, and the first half untrained.
fn examples(lengths: &[usize]) -> Arc<Vec<Example>> {
    Arc::new(
        lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let ids: Vec<u32> = (0..len as u32).map(|t| 1000 * (i as u32 + 1) + t).collect();
                let labels = ids.iter().enumerate().map(|(t, &id)| if t < len / 2 { IGNORE_INDEX } else { id as i32 }).collect();
                Example { input_ids: ids, labels, row: i + 1 }
            })
            .collect(),
    )
}

fn example_of(id: u32) -> usize {
    (id / 1000 - 1) as usize
}

#[test]
fn same_seed_epoch_index_gives_the_same_batch_and_epochs_differ() {
    let ex = examples(&[5; 40]);
    let a = Batcher::new(ex.clone(), 4, 64, false, 3407, 0);
    let b = Batcher::new(ex.clone(), 4, 64, false, 3407, 0);
    assert_eq!(a.batches_per_epoch(), 10);
    // Out of order and repeated calls, as a resume does.
    for (e, i) in [(2, 7), (0, 0), (2, 7), (1, 3), (0, 9)] {
        assert_eq!(a.batch(e, i), b.batch(e, i));
    }
    let order = |bt: &Batcher, e: u64| -> Vec<u32> { (0..10).flat_map(|i| bt.batch(e, i).input_ids.into_iter().step_by(8)).collect() };
    assert_ne!(order(&a, 0), order(&a, 1));
    let c = Batcher::new(ex, 4, 64, false, 1, 0);
    assert_ne!(order(&a, 0), order(&c, 0));
}

#[test]
fn every_example_once_per_epoch_last_batch_partial() {
    let ex = examples(&[3, 9, 4, 7, 1, 12, 6]);
    let bt = Batcher::new(ex, 3, 64, false, 7, 99);
    assert_eq!(bt.batches_per_epoch(), 3);
    let mut seen = Vec::new();
    for i in 0..3 {
        let b = bt.batch(5, i);
        assert_eq!(b.batch_size, if i == 2 { 1 } else { 3 });
        for r in 0..b.batch_size {
            seen.push(example_of(b.input_ids[r * b.seq_len]));
        }
    }
    seen.sort();
    assert_eq!(seen, (0..7).collect::<Vec<_>>());
}

#[test]
fn padding_layout_and_shifted_targets() {
    let ex = examples(&[3, 10]);
    let bt = Batcher::new(ex.clone(), 2, 64, false, 0, 7);
    let b = bt.batch(0, 0);
    assert_eq!(b.seq_len, 16, "longest row 10, rounded up to a multiple of 8");
    for r in 0..2 {
        let row = example_of(b.input_ids[r * 16]);
        let e = &ex[row];
        let n = e.input_ids.len();
        for t in 0..16 {
            let i = r * 16 + t;
            if t < n {
                assert_eq!(b.input_ids[i], e.input_ids[t]);
                assert_eq!(b.positions[i], t as u32);
                assert_eq!(b.segments[i], 0);
                let want = if t + 1 < n { e.labels[t + 1] } else { IGNORE_INDEX };
                assert_eq!(b.targets[i], want, "row {r} t {t}");
            } else {
                assert_eq!(b.input_ids[i], 7);
                assert_eq!(b.targets[i], IGNORE_INDEX);
                assert_ne!(b.segments[i], 0, "padding must not share the example's segment");
            }
        }
    }
    // Rounding never goes past max_seq_len.
    let bt = Batcher::new(ex, 2, 12, false, 0, 7);
    assert_eq!(bt.batch(0, 0).seq_len, 12);
}

#[test]
fn packing_keeps_examples_apart() {
    let lengths = [5, 9, 3, 14, 2, 7, 11, 4, 6, 8, 1, 16];
    let ex = examples(&lengths);
    let bt = Batcher::new(ex.clone(), 2, 16, true, 42, 0);
    let total: usize = lengths.iter().sum();
    assert!(bt.rows_per_epoch() * 16 >= total);
    assert!(bt.rows_per_epoch() < lengths.len(), "packing should merge some examples");
    let mut seen = BTreeMap::new();
    for i in 0..bt.batches_per_epoch() {
        let b = bt.batch(3, i);
        assert!(b.seq_len <= 16);
        for r in 0..b.batch_size {
            let base = r * b.seq_len;
            let mut t = 0;
            let mut segment = 0;
            while t < b.seq_len {
                let id = b.input_ids[base + t];
                if b.positions[base + t] != 0 || id < 1000 {
                    break; // padding follows
                }
                let e = example_of(id);
                let n = ex[e].input_ids.len();
                for k in 0..n {
                    let i = base + t + k;
                    assert_eq!(b.input_ids[i], ex[e].input_ids[k]);
                    assert_eq!(b.positions[i], k as u32, "positions restart per example");
                    assert_eq!(b.segments[i], segment);
                    let want = if k + 1 < n { ex[e].labels[k + 1] } else { IGNORE_INDEX };
                    assert_eq!(b.targets[i], want, "no target crosses an example boundary");
                }
                assert!(seen.insert(e, ()).is_none(), "example {e} twice");
                t += n;
                segment += 1;
            }
            for k in t..b.seq_len {
                assert_eq!(b.targets[base + k], IGNORE_INDEX);
                assert_eq!(b.segments[base + k], segment, "padding has a segment of its own");
            }
        }
    }
    assert_eq!(seen.len(), lengths.len());
    // Packing is fixed by the seed, so every epoch has the same number of batches.
    let again = Batcher::new(ex, 2, 16, true, 42, 0);
    assert_eq!(again.rows(), bt.rows());
}

#[test]
fn first_fit_fills_earlier_rows_first() {
    // Capacity 10: whatever the shuffled order, no two rows can be merged into one afterwards
    // except where first-fit's greediness prevents it; here every size pairs up exactly.
    let ex = examples(&[5, 5, 5, 5, 5, 5]);
    let bt = Batcher::new(ex, 1, 10, true, 9, 0);
    assert_eq!(bt.rows_per_epoch(), 3);
    assert!(bt.rows().iter().all(|r| r.len() == 2));
}

#[test]
fn examples_longer_than_max_seq_len_are_cut() {
    let ex = examples(&[40]);
    for packing in [false, true] {
        let b = Batcher::new(ex.clone(), 1, 24, packing, 0, 0).batch(0, 0);
        assert_eq!(b.seq_len, 24);
        assert_eq!(b.targets[23], IGNORE_INDEX);
        assert_eq!(b.targets[22], ex[0].labels[23]);
    }
}

#[test]
fn an_epoch_trains_exactly_the_examples_trained_tokens() {
    let ex = examples(&[5, 9, 3, 14, 2, 7, 11, 4, 6, 8, 1, 16, 13]);
    let want: usize = ex.iter().map(Example::trained_tokens).sum();
    for packing in [false, true] {
        let bt = Batcher::new(ex.clone(), 3, 16, packing, 5, 0);
        let got: usize = (0..bt.batches_per_epoch()).map(|i| bt.batch(1, i).trained_tokens()).sum();
        assert_eq!(got, want, "packing = {packing}");
        let (real, padded) = bt.token_counts(1);
        assert_eq!(real, ex.iter().map(|e| e.input_ids.len()).sum::<usize>());
        assert!(padded >= real);
    }
}

/// Unpacked rows (one example, padding after it) may run plain causal attention; a packed row of
/// two trained examples may not, nor one whose tail after the first example is trained.
#[test]
fn only_rows_of_one_example_and_padding_attend_causally() {
    let ex = examples(&[5, 9, 3, 14, 2, 7]);
    let unpacked = Batcher::new(ex.clone(), 3, 16, false, 5, 0);
    for i in 0..unpacked.batches_per_epoch() {
        let b = unpacked.batch(0, i);
        assert!(b.segments.iter().any(|&s| s != 0) || b.seq_len == 14, "some row has a padding tail");
        assert!(b.rows_attend_causally(), "unpacked batch {i}");
    }
    let packed = Batcher::new(ex, 1, 16, true, 42, 0);
    let multi =
        (0..packed.batches_per_epoch()).map(|i| packed.batch(0, i)).find(|b| b.segments.iter().any(|&s| s > 1)).expect("a packed row");
    assert!(!multi.rows_attend_causally(), "two trained examples in one row");
    let mut tail_trained = multi.clone();
    // One example then a trained second segment: not padding.
    let n = tail_trained.seq_len;
    tail_trained.segments = (0..n as u32).map(|t| u32::from(t >= 4)).collect();
    tail_trained.targets = vec![IGNORE_INDEX; n];
    tail_trained.targets[n - 2] = 7;
    assert!(!tail_trained.rows_attend_causally());
    tail_trained.targets[n - 2] = IGNORE_INDEX;
    assert!(tail_trained.rows_attend_causally(), "an untrained tail is padding");
}
