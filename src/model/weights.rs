//! Memory-mapped safetensors: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Tensors are read on demand and converted to f32 or kept raw
//! (bnb-4bit checkpoints store packed NF4 bytes and their quant state as separate tensors).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, IoContext, Result};

/// One tensor's place in a shard.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the mmap (absolute, header included).
    pub start: usize,
    pub end: usize,
}

pub struct WeightStore {
    pub dir: PathBuf,
    shards: Vec<(PathBuf, Mmap)>,
    /// By the name the engine uses: a multimodal folder's text model (`gemma3`) is listed as a
    /// plain causal LM (`model.layers.…`, `lm_head.weight`); its other tensors keep their names.
    entries: BTreeMap<String, TensorEntry>,
    /// The file's name of every renamed tensor, for writing the folder back in its own layout.
    original: BTreeMap<String, String>,
}

/// Where a multimodal checkpoint keeps its text model, as (file prefix, engine prefix): the
/// layout transformers ≥ 4.52 writes (`model.language_model.layers.…`, `lm_head.weight`) and
/// the earlier one (`language_model.model.layers.…`, `language_model.lm_head.weight`).
const TEXT_TOWER_LAYOUTS: [&[(&str, &str)]; 2] =
    [&[("model.language_model.", "model.")], &[("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")]];

/// The renames that make a multimodal checkpoint's text model read as a causal LM, if the names
/// are one of [`TEXT_TOWER_LAYOUTS`].
fn text_tower_renames<'a>(names: impl Iterator<Item = &'a String> + Clone) -> Option<&'static [(&'static str, &'static str)]> {
    TEXT_TOWER_LAYOUTS.into_iter().find(|layout| {
        let embed = format!("{}embed_tokens.weight", layout[0].0);
        names.clone().any(|n| *n == embed) && !names.clone().any(|n| n == "model.embed_tokens.weight")
    })
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore").field("dir", &self.dir).field("tensors", &self.entries.len()).finish()
    }
}

fn open_shard(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).with_path(path)?;
    // SAFETY: the file is opened read-only and the map is only read; a file truncated by another
    // process while mapped is outside what we can defend against (same as every safetensors user).
    let mmap = unsafe { Mmap::map(&file) }.with_path(path)?;
    Ok(mmap)
}

impl WeightStore {
    /// Open every safetensors file of a model folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_path(&index)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::line(&index, e.line(), format!("invalid JSON: {e}")))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::file(&index, "`weight_map` is missing"))?;
            let mut names: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if single.exists() {
                vec![single]
            } else {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .with_path(dir)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                found.sort();
                if found.is_empty() {
                    return Err(Error::file(dir, "no *.safetensors weights found"));
                }
                found
            }
        };
        let mut shards = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let mmap = open_shard(&path)?;
            let (header_len, _) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::file(&path, format!("corrupt or truncated safetensors file ({e})")))?;
            let st =
                SafeTensors::deserialize(&mmap).map_err(|e| Error::file(&path, format!("corrupt or truncated safetensors file ({e})")))?;
            let data_start = 8 + header_len;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
                debug_assert!(start >= data_start);
                entries.insert(
                    name.to_string(),
                    TensorEntry { shard: i, dtype: view.dtype(), shape: view.shape().to_vec(), start, end: start + data.len() },
                );
            }
            shards.push((path, mmap));
        }
        let mut original = BTreeMap::new();
        if let Some(renames) = text_tower_renames(entries.keys()) {
            let mut renamed = BTreeMap::new();
            for (name, e) in entries {
                match renames.iter().find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}"))) {
                    Some(engine_name) => {
                        original.insert(engine_name.clone(), name);
                        renamed.insert(engine_name, e);
                    }
                    None => {
                        renamed.insert(name, e);
                    }
                }
            }
            entries = renamed;
        }
        Ok(WeightStore { dir: dir.to_path_buf(), shards, entries, original })
    }

    /// The name a tensor has in the files (differs from `name` for a multimodal folder's text
    /// model).
    pub fn original_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.original.get(name).map_or(name, String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shard_path(&self, e: &TensorEntry) -> &Path {
        &self.shards[e.shard].0
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.entries
            .get(name)
            .ok_or_else(|| Error::tensor(self.original_name(name), Some(&self.dir), "is missing from the model's safetensors files"))
    }

    /// The raw bytes of a tensor, as stored.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.shards[e.shard].1[e.start..e.end])
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    /// Read a floating-point tensor as f32, checking its shape.
    pub fn f32(&self, name: &str, expect_shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if e.shape != expect_shape {
            return Err(Error::tensor(name, Some(self.shard_path(e)), format!("has shape {:?}, expected {:?}", e.shape, expect_shape)));
        }
        self.f32_any_shape(name)
    }

    /// Read a floating-point tensor as f32, whatever its shape. A tensor holding NaN or ±inf is
    /// refused here, before anything (quantization included) can hide it.
    pub fn f32_any_shape(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bytes = &self.shards[e.shard].1[e.start..e.end];
        if let Some(bad) = non_finite(bytes, e.dtype) {
            return Err(bad.error(self.original_name(name), Some(self.shard_path(e))));
        }
        to_f32(bytes, e.dtype)
            .ok_or_else(|| Error::tensor(name, Some(self.shard_path(e)), format!("has dtype {:?}; expected f32, f16 or bf16", e.dtype)))
    }

    /// Every floating-point tensor checked for NaN and ±inf, from the stored bits (a fast, parallel
    /// pass); the error names the first bad tensor, its file and how many values are bad.
    pub fn check_finite(&self) -> Result<()> {
        for (name, e) in &self.entries {
            if let Some(bad) = non_finite(&self.shards[e.shard].1[e.start..e.end], e.dtype) {
                return Err(bad.error(self.original_name(name), Some(self.shard_path(e))));
            }
        }
        Ok(())
    }

    /// dtype names present, with counts (for `inspect`).
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in self.entries.values() {
            *m.entry(format!("{:?}", e.dtype)).or_default() += 1;
        }
        m
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| (e.end - e.start) as u64).sum()
    }
}

/// Non-finite values found in a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonFinite {
    pub count: usize,
    /// Flat index of the first one.
    pub first: usize,
}

impl NonFinite {
    /// In a model's weights.
    pub fn error(&self, tensor: &str, file: Option<&Path>) -> Error {
        self.error_because(tensor, file, "the weights are damaged; download or save the model again")
    }

    /// `why` says what the file is and what to do instead.
    pub fn error_because(&self, tensor: &str, file: Option<&Path>, why: &str) -> Error {
        Error::tensor(
            tensor,
            file,
            format!(
                "holds {} non-finite value{} (NaN or ±inf; the first at flat index {}): {why}",
                self.count,
                if self.count == 1 { "" } else { "s" },
                self.first
            ),
        )
    }

    /// NaN and ±inf among values already read.
    pub fn in_f32(values: &[f32]) -> Option<NonFinite> {
        let first = values.iter().position(|v| !v.is_finite())?;
        Some(NonFinite { count: values[first..].iter().filter(|v| !v.is_finite()).count(), first })
    }
}

/// NaN and ±inf in raw little-endian floats, found by their exponent bits (all ones); `None` when
/// there are none or the dtype is not a float.
pub fn non_finite(bytes: &[u8], dtype: Dtype) -> Option<NonFinite> {
    use rayon::prelude::*;
    let (width, bad): (usize, fn(&[u8]) -> bool) = match dtype {
        Dtype::BF16 => (2, |c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        Dtype::F16 => (2, |c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00),
        Dtype::F32 => (4, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000),
        Dtype::F64 => {
            (8, |c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000)
        }
        _ => return None,
    };
    const CHUNK: usize = 1 << 16;
    let (count, first) = bytes
        .par_chunks(CHUNK * width)
        .enumerate()
        .map(|(i, chunk)| {
            let mut n = 0;
            let mut first = None;
            for (j, c) in chunk.chunks_exact(width).enumerate() {
                if bad(c) {
                    n += 1;
                    first.get_or_insert(i * CHUNK + j);
                }
            }
            (n, first)
        })
        .reduce(|| (0, None), |a, b| (a.0 + b.0, a.1.or(b.1)));
    first.map(|first| NonFinite { count, first })
}

/// Convert raw little-endian bytes of a float dtype to f32.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect(),
        _ => return None,
    })
}

/// A tensor to write: name, shape and f32 data stored as the given dtype.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: &[f32], dtype: Dtype) -> Self {
        let bytes = match dtype {
            Dtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::BF16 => data.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F16 => data.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            other => panic!("OutTensor::from_f32 does not write {other:?}"),
        };
        OutTensor { name: name.into(), shape, dtype, bytes }
    }

    pub fn raw(name: impl Into<String>, shape: Vec<usize>, dtype: Dtype, bytes: Vec<u8>) -> Self {
        OutTensor { name: name.into(), shape, dtype, bytes }
    }
}

/// Serialize tensors (sorted by name, as safetensors does) with optional string metadata.
pub fn serialize_safetensors(tensors: &[OutTensor], metadata: Option<BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::tensor(&t.name, None, format!("cannot be serialized: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = metadata.map(|m| m.into_iter().collect::<std::collections::HashMap<_, _>>());
    safetensors::tensor::serialize(views, meta).map_err(|e| Error::bug("safetensors serialization", e))
}

/// Tensors by name, each as (shape, f32 data).
pub type SmallTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Read a whole small safetensors file into name → (shape, f32 data) (adapters, checkpoints).
/// `read_small_f32` for an adapter's or a checkpoint's tensors, refusing NaN and ±inf by tensor:
/// continuing training from them, resuming, evaluating or exporting them would carry the NaNs on
/// in silence (a model's own weights are checked by `WeightStore`).
pub fn read_small_f32_finite(path: &Path) -> Result<SmallTensors> {
    let tensors = read_small_f32(path)?;
    for (name, (_, values)) in &tensors {
        if let Some(bad) = NonFinite::in_f32(values) {
            return Err(bad.error_because(
                name,
                Some(path),
                "the file is damaged or was written by a run that had diverged; for a checkpoint, delete its \
                 checkpoints/step-* folder to resume from the one before, else train again (with a lower optim.lr if it diverged)",
            ));
        }
    }
    Ok(tensors)
}

pub fn read_small_f32(path: &Path) -> Result<SmallTensors> {
    let bytes = std::fs::read(path).with_path(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("corrupt or truncated safetensors file ({e})")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(view.data(), view.dtype())
            .ok_or_else(|| Error::tensor(&name, Some(path), format!("has unsupported dtype {:?}", view.dtype())))?;
        out.insert(name.to_string(), (view.shape().to_vec(), data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let vals = [1.0f32, f32::NAN, -2.5, f32::INFINITY, 0.0, f32::NEG_INFINITY];
        let bf: Vec<u8> = vals.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let hf: Vec<u8> = vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let f: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let d: Vec<u8> = vals.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
        for (bytes, dtype) in [(bf, Dtype::BF16), (hf, Dtype::F16), (f, Dtype::F32), (d, Dtype::F64)] {
            assert_eq!(non_finite(&bytes, dtype), Some(NonFinite { count: 3, first: 1 }), "{dtype:?}");
        }
        let big: Vec<u8> = (0..200_000).flat_map(|i| bf16::from_f32(if i == 150_001 { f32::NAN } else { 1.0 }).to_le_bytes()).collect();
        assert_eq!(non_finite(&big, Dtype::BF16), Some(NonFinite { count: 1, first: 150_001 }));
        assert_eq!(non_finite(&[0u8; 16], Dtype::U8), None);
        assert_eq!(non_finite(&f32::MAX.to_le_bytes(), Dtype::F32), None);
        assert_eq!(NonFinite::in_f32(&vals), Some(NonFinite { count: 3, first: 1 }));
        assert_eq!(NonFinite::in_f32(&[1.0, f32::MAX, -0.0]), None);
    }

    fn write(dir: &Path, names: &[&str]) {
        let tensors: Vec<OutTensor> = names.iter().map(|n| OutTensor::from_f32(*n, vec![2], &[1.0, 2.0], Dtype::F32)).collect();
        std::fs::write(dir.join("model.safetensors"), serialize_safetensors(&tensors, None).unwrap()).unwrap();
    }

    /// Both layouts transformers writes for a multimodal folder's text model read as a causal
    /// LM; the vision tower keeps its names, and every tensor remembers the file's name.
    #[test]
    fn text_model_of_a_multimodal_folder_reads_as_a_causal_lm() {
        for (embed, head) in [
            ("model.language_model.embed_tokens.weight", "lm_head.weight"),
            ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let layer = embed.replace("embed_tokens.weight", "layers.0.self_attn.q_proj.weight");
            write(d.path(), &[embed, head, &layer, "vision_tower.encoder.layers.0.self_attn.q_proj.weight"]);
            let s = WeightStore::open(d.path()).unwrap();
            let names: Vec<&str> = s.names().collect();
            assert_eq!(
                names,
                [
                    "lm_head.weight",
                    "model.embed_tokens.weight",
                    "model.layers.0.self_attn.q_proj.weight",
                    "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
                ],
                "{embed}"
            );
            assert_eq!(s.original_name("model.embed_tokens.weight"), embed);
            assert_eq!(s.original_name("lm_head.weight"), head);
            assert_eq!(
                s.original_name("vision_tower.encoder.layers.0.self_attn.q_proj.weight"),
                "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
            );
            assert_eq!(s.f32("model.layers.0.self_attn.q_proj.weight", &[2]).unwrap(), vec![1.0, 2.0]);
            // A missing tensor is named as the file would name it.
            let e = s.f32("model.layers.1.self_attn.q_proj.weight", &[2]).unwrap_err().to_string();
            assert!(e.contains("model.layers.1"), "{e}");
        }
        // A plain causal LM is left as it is.
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &["model.embed_tokens.weight", "model.language_model.embed_tokens.weight"]);
        assert_eq!(WeightStore::open(d.path()).unwrap().names().count(), 2);
    }
}
