//! What the CUDA context takes on a card (the context itself, our loaded kernels, the cuBLAS
//! handles): the memory plan needs it, and it differs by card and driver. A CUDA backend measures
//! it when it opens (device memory in use minus our own buffers) and remembers it in the user's
//! cache folder, keyed by card name and driver version; plans for that card use the remembered
//! value, and [`DEFAULT_CUDA_CONTEXT_BYTES`] until a backend has opened there once.
//!
//! The newest measurement wins. Another process's memory on the card at that moment would make
//! it too large, which errs on the safe side (the plan then asks for more than it will use);
//! keeping the smallest value ever seen would instead hide a driver update that grew it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const FILE: &str = "cuda_context.json";

/// The CUDA context + cuBLAS handles on an H100 with driver 580 before any allocation of ours;
/// plans use it until a backend has measured the card.
pub const DEFAULT_CUDA_CONTEXT_BYTES: u64 = 530 << 20;

/// `NVIDIA H100 80GB HBM3 | CUDA driver 13000`.
pub fn card_key(card: &str, driver_version: Option<i32>) -> String {
    match driver_version {
        Some(v) => format!("{card} | CUDA driver {v}"),
        None => format!("{card} | CUDA driver unknown"),
    }
}

/// The cache file: `$XDG_CACHE_HOME/tunestudio/cuda_context.json` (or under `~/.cache`).
pub fn cache_file() -> PathBuf {
    crate::assets::cache_dir().join(FILE)
}

fn read(path: &Path) -> BTreeMap<String, u64> {
    // A missing or unreadable cache is only a lost measurement: the default stands in.
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

pub fn lookup_in(path: &Path, key: &str) -> Option<u64> {
    read(path).get(key).copied()
}

pub fn remember_in(path: &Path, key: &str, bytes: u64) -> Result<()> {
    let mut all = read(path);
    if all.get(key) == Some(&bytes) {
        return Ok(());
    }
    all.insert(key.to_string(), bytes);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    }
    crate::util::write_atomic(path, &serde_json::to_vec_pretty(&all).expect("json"))
}

/// The context bytes to plan with on `card` under this driver.
pub fn bytes_for(card: &str, driver_version: Option<i32>) -> u64 {
    lookup_in(&cache_file(), &card_key(card, driver_version)).unwrap_or(DEFAULT_CUDA_CONTEXT_BYTES)
}

/// Record a measurement (best effort: a read-only home must not stop a run).
pub fn remember(card: &str, driver_version: Option<i32>, bytes: u64) {
    let _ = remember_in(&cache_file(), &card_key(card, driver_version), bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_are_kept_per_card_and_driver_and_the_newest_wins() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub").join(FILE);
        let h100 = card_key("NVIDIA H100 80GB HBM3", Some(13000));
        assert_eq!(lookup_in(&f, &h100), None, "nothing measured yet");
        remember_in(&f, &h100, 600 << 20).unwrap();
        remember_in(&f, &card_key("NVIDIA H100 80GB HBM3", Some(13010)), 640 << 20).unwrap();
        remember_in(&f, &card_key("NVIDIA A10", Some(13000)), 300 << 20).unwrap();
        assert_eq!(lookup_in(&f, &h100), Some(600 << 20));
        remember_in(&f, &h100, 590 << 20).unwrap();
        assert_eq!(lookup_in(&f, &h100), Some(590 << 20), "the newest measurement wins");
        assert_eq!(lookup_in(&f, &card_key("NVIDIA A10", Some(13000))), Some(300 << 20));
        std::fs::write(&f, "not json").unwrap();
        assert_eq!(lookup_in(&f, &h100), None, "a damaged cache is only a lost measurement");
        remember_in(&f, &h100, 595 << 20).unwrap();
        assert_eq!(lookup_in(&f, &h100), Some(595 << 20), "and is rewritten whole");
    }
}
