//! Untrained token rows: rows of `embed_tokens` and `lm_head` whose entries are all (nearly) zero,
//! as Llama 3's reserved special tokens are. A row counts only when both matrices flag it (with
//! tied embeddings, the one matrix). Training on such a token drives the loss to NaN or inf, so
//! the preflight report lists them and the fix replaces them with the mean of the trained rows.

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::{ModelSpec, WeightStore};

/// A row counts as untrained when every |value| ≤ this. bf16 "zeros" in released checkpoints are
/// around 1e-23; real rows are ~1e-3 or larger.
pub const UNTRAINED_EPS: f32 = 1e-16;

fn row_is_untrained(bytes: &[u8], dtype: Dtype) -> bool {
    let eps = UNTRAINED_EPS;
    match dtype {
        Dtype::BF16 => bytes.chunks_exact(2).all(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32().abs() <= eps),
        Dtype::F16 => bytes.chunks_exact(2).all(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().abs() <= eps),
        Dtype::F32 => bytes.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).abs() <= eps),
        _ => false,
    }
}

/// Rows of one `[vocab, hidden]` matrix that look untrained.
pub fn untrained_rows(store: &WeightStore, name: &str, spec: &ModelSpec) -> Result<Vec<bool>> {
    let e = store.get(name).ok_or_else(|| Error::tensor(name, Some(&store.dir), "is missing"))?;
    let expect = [spec.vocab_size, spec.hidden_size];
    if e.shape != expect {
        return Err(Error::tensor(name, Some(store.shard_path(e)), format!("has shape {:?}, expected {:?}", e.shape, expect)));
    }
    let row_bytes = spec.hidden_size * e.dtype.bitsize() / 8;
    let bytes = store.bytes(name)?;
    Ok(bytes.par_chunks(row_bytes).map(|r| row_is_untrained(r, e.dtype)).collect())
}

/// Token ids whose embedding and output rows are both untrained, minus `exclude` (BOS/EOS/PAD,
/// which models legitimately leave odd).
pub fn detect(store: &WeightStore, spec: &ModelSpec, exclude: &[u32]) -> Result<Vec<u32>> {
    let embed = untrained_rows(store, "model.embed_tokens.weight", spec)?;
    let head = if store.contains("lm_head.weight") { Some(untrained_rows(store, "lm_head.weight", spec)?) } else { None };
    Ok((0..spec.vocab_size)
        .filter(|&i| embed[i] && head.as_ref().is_none_or(|h| h[i]))
        .map(|i| i as u32)
        .filter(|id| !exclude.contains(id))
        .collect())
}

/// The mean of the trained rows of a `[vocab, hidden]` matrix, as (sum of all rows − sum of the
/// untrained rows) / (number of trained rows). Accumulated in f64 and returned in f32, so the
/// bf16 near-zeros of untrained rows can neither bias nor swamp it.
pub fn mean_of_trained_rows(store: &WeightStore, name: &str, spec: &ModelSpec, untrained: &[u32]) -> Result<Vec<f32>> {
    let (v, d) = (spec.vocab_size, spec.hidden_size);
    let data = store.f32(name, &[v, d])?;
    let mut all = vec![0f64; d];
    for row in data.chunks_exact(d) {
        all.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
    }
    let mut skip = vec![0f64; d];
    let mut seen = std::collections::BTreeSet::new();
    for &id in untrained {
        if seen.insert(id) {
            let row = &data[id as usize * d..(id as usize + 1) * d];
            skip.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
        }
    }
    let trained = (v - seen.len()).max(1) as f64;
    Ok(all.iter().zip(&skip).map(|(a, s)| ((a - s) / trained) as f32).collect())
}
