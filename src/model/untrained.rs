//! Untrained token rows of `embed_tokens` and `lm_head`, of two kinds: rows whose entries are all
//! (nearly) zero, as Llama 3's reserved special tokens are, and rows collapsed onto one shared
//! non-zero vector, as SmolLM2's unused special tokens are (initialised alike, never trained
//! apart; a zero test cannot see them). A row counts only when both matrices flag it (with tied
//! embeddings, the one matrix). Training on such a token drives the loss to NaN or inf, or teaches
//! every token of the group from the same start, so the preflight report lists them and the fix
//! replaces the used ones with the mean of the trained rows.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;

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

/// Why a row counts as untrained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    /// Every |value| ≤ `UNTRAINED_EPS`.
    Zero,
    /// Not zero, but bit for bit the same as at least one other row of the matrix: one vector
    /// shared by several tokens, which training would have pulled apart.
    Collapsed,
}

impl RowKind {
    /// How reports name the kind.
    pub fn words(self) -> &'static str {
        match self {
            RowKind::Zero => "zero",
            RowKind::Collapsed => "shared vector",
        }
    }
}

/// One untrained row of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UntrainedRow {
    pub id: u32,
    /// `Zero` when every matrix checked has it zero, else `Collapsed`.
    pub kind: RowKind,
}

/// The kind of each row of one `[vocab, hidden]` matrix that looks untrained (None: trained).
pub fn untrained_rows(store: &WeightStore, name: &str, spec: &ModelSpec) -> Result<Vec<Option<RowKind>>> {
    let e = store.get(name).ok_or_else(|| Error::tensor(name, Some(&store.dir), "is missing"))?;
    let expect = [spec.vocab_size, spec.hidden_size];
    if e.shape != expect {
        return Err(Error::tensor(name, Some(store.shard_path(e)), format!("has shape {:?}, expected {:?}", e.shape, expect)));
    }
    let row_bytes = spec.hidden_size * e.dtype.bitsize() / 8;
    let bytes = store.bytes(name)?;
    // Per row: zero, or the hash of its bytes (rows are grouped by hash, then compared whole).
    let scanned: Vec<(bool, u64)> = bytes
        .par_chunks(row_bytes)
        .map(|r| {
            let zero = row_is_untrained(r, e.dtype);
            let mut h = std::hash::DefaultHasher::new();
            if !zero {
                r.hash(&mut h);
            }
            (zero, h.finish())
        })
        .collect();
    let mut kinds: Vec<Option<RowKind>> = scanned.iter().map(|&(zero, _)| zero.then_some(RowKind::Zero)).collect();
    let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, &(zero, h)) in scanned.iter().enumerate() {
        if !zero {
            by_hash.entry(h).or_default().push(i);
        }
    }
    let row = |i: usize| &bytes[i * row_bytes..(i + 1) * row_bytes];
    for group in by_hash.values().filter(|g| g.len() > 1) {
        // Equal hashes are split into classes of byte-identical rows (one class, unless the hash
        // collided); a class of two or more is collapsed.
        let mut classes: Vec<Vec<usize>> = Vec::new();
        for &i in group {
            match classes.iter_mut().find(|c| row(c[0]) == row(i)) {
                Some(c) => c.push(i),
                None => classes.push(vec![i]),
            }
        }
        for &i in classes.iter().filter(|c| c.len() > 1).flatten() {
            kinds[i] = Some(RowKind::Collapsed);
        }
    }
    Ok(kinds)
}

/// Token rows untrained in the embedding and in the output head (zero, or collapsed onto a shared
/// vector), minus `exclude` (BOS/EOS/PAD, which models legitimately leave odd), by id.
pub fn classify(store: &WeightStore, spec: &ModelSpec, exclude: &[u32]) -> Result<Vec<UntrainedRow>> {
    let embed = untrained_rows(store, "model.embed_tokens.weight", spec)?;
    let head = if store.contains("lm_head.weight") { Some(untrained_rows(store, "lm_head.weight", spec)?) } else { None };
    Ok((0..spec.vocab_size)
        .filter_map(|i| {
            let e = embed[i]?;
            let kind = match head.as_ref().map(|h| h[i]) {
                None => e,
                Some(None) => return None,
                Some(Some(RowKind::Zero)) if e == RowKind::Zero => RowKind::Zero,
                Some(Some(_)) => RowKind::Collapsed,
            };
            Some(UntrainedRow { id: i as u32, kind })
        })
        .filter(|r| !exclude.contains(&r.id))
        .collect())
}

/// The ids of `classify`, whatever their kind.
pub fn detect(store: &WeightStore, spec: &ModelSpec, exclude: &[u32]) -> Result<Vec<u32>> {
    Ok(classify(store, spec, exclude)?.into_iter().map(|r| r.id).collect())
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
