//! The demo (a tiny model, its dataset and `run.toml`) built into the binary, so that the studio
//! opens ready to train whether it runs from a checkout or from an installed package.
//!
//! From a checkout the files are used where they are (`assets/demo`), so regenerating the demo
//! needs no rebuild to be seen. An installed binary has no checkout to point at: it writes the
//! embedded copy once into the user's cache folder and uses that.

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::error::Result;
use crate::util::{write_atomic, write_dir_atomic};

/// Every file of `assets/demo`, by its path inside that folder. `tests::every_demo_file_is_embedded`
/// fails when the demo gains a file this list lacks.
pub const DEMO_FILES: &[(&str, &[u8])] = &[
    ("README.md", include_bytes!("../assets/demo/README.md")),
    ("run.toml", include_bytes!("../assets/demo/run.toml")),
    ("data/train.jsonl", include_bytes!("../assets/demo/data/train.jsonl")),
    ("data/eval.jsonl", include_bytes!("../assets/demo/data/eval.jsonl")),
    ("model/config.json", include_bytes!("../assets/demo/model/config.json")),
    ("model/generation_config.json", include_bytes!("../assets/demo/model/generation_config.json")),
    ("model/model.safetensors", include_bytes!("../assets/demo/model/model.safetensors")),
    ("model/special_tokens_map.json", include_bytes!("../assets/demo/model/special_tokens_map.json")),
    ("model/tokenizer.json", include_bytes!("../assets/demo/model/tokenizer.json")),
    ("model/tokenizer_config.json", include_bytes!("../assets/demo/model/tokenizer_config.json")),
];

/// The demo's run config file name inside the demo folder.
pub const DEMO_CONFIG: &str = "run.toml";

/// Written last into an extracted copy; its content names the embedded bytes, so a newer binary
/// with a different demo replaces an older extraction instead of trusting it.
const STAMP_FILE: &str = ".embedded-stamp";

/// The checkout's `assets/demo`, when this binary runs where it was built.
pub fn checkout_demo_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("demo");
    dir.join(DEMO_CONFIG).is_file().then_some(dir)
}

/// `$XDG_CACHE_HOME/tunestudio`, else `~/.cache/tunestudio`.
pub fn cache_dir() -> PathBuf {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// `$XDG_CONFIG_HOME/tunestudio`, else `~/.config/tunestudio` (recent models and such).
pub fn config_dir() -> PathBuf {
    xdg_dir("XDG_CONFIG_HOME", ".config")
}

/// `$XDG_DATA_HOME/tunestudio`, else `~/.local/share/tunestudio` (runs of an installed studio).
pub fn data_dir() -> PathBuf {
    xdg_dir("XDG_DATA_HOME", ".local/share")
}

fn xdg_dir(var: &str, fallback: &str) -> PathBuf {
    let base = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)))
        .unwrap_or_else(std::env::temp_dir);
    base.join("tunestudio")
}

/// The demo folder: the checkout's, else the embedded copy extracted under the cache folder.
pub fn demo_dir() -> Result<PathBuf> {
    match checkout_demo_dir() {
        Some(dir) => Ok(dir),
        None => extract_demo(&cache_dir().join("demo")),
    }
}

/// Write the embedded demo into `dest` unless an extraction of these same bytes is already there.
/// The folder is built beside `dest` and renamed into place, so a crash or a second studio
/// starting at the same moment never sees half a model.
pub fn extract_demo(dest: &Path) -> Result<PathBuf> {
    let stamp = embedded_stamp();
    let current = std::fs::read_to_string(dest.join(STAMP_FILE)).unwrap_or_default();
    if current == stamp {
        return Ok(dest.to_path_buf());
    }
    write_dir_atomic(dest, |tmp| {
        for (name, bytes) in DEMO_FILES {
            write_atomic(&tmp.join(name), bytes)?;
        }
        write_atomic(&tmp.join(STAMP_FILE), stamp.as_bytes())
    })?;
    Ok(dest.to_path_buf())
}

/// Version, size and an FNV-1a hash of the embedded files: cheap (a few MB once per start) and
/// enough to tell two builds' demos apart.
fn embedded_stamp() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut len = 0usize;
    for (name, bytes) in DEMO_FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        len += bytes.len();
    }
    format!("{} {len} {h:016x}\n", env!("CARGO_PKG_VERSION"))
}

/// The demo's run config with every path made absolute. Its `output.dir` is the checkout's
/// `runs/` when run from a checkout (as the CLI does), and the user's data folder for an
/// extracted copy: runs must not land inside a cache that may be wiped.
pub fn demo_config() -> Result<(PathBuf, RunConfig)> {
    let dir = demo_dir()?;
    let in_checkout = checkout_demo_dir().is_some_and(|c| c == dir);
    demo_config_in(&dir, in_checkout)
}

pub fn demo_config_in(dir: &Path, in_checkout: bool) -> Result<(PathBuf, RunConfig)> {
    let path = dir.join(DEMO_CONFIG);
    let mut cfg = RunConfig::load(&path)?;
    absolutize(&mut cfg, dir);
    if !in_checkout {
        cfg.output.dir = data_dir().join("runs");
    }
    Ok((path, cfg))
}

/// Make the model, dataset and adapter paths absolute against `base` (the config's folder), so
/// the editor shows where they are and a saved copy elsewhere still points at them.
pub fn absolutize(cfg: &mut RunConfig, base: &Path) {
    let join = |p: &Path| if p.is_relative() && !p.as_os_str().is_empty() { normalize(&base.join(p)) } else { p.to_path_buf() };
    cfg.model.path = join(&cfg.model.path);
    cfg.dataset.path = join(&cfg.dataset.path);
    if let Some(a) = cfg.model.adapter.as_mut() {
        *a = join(a);
    }
    if let Some(crate::config::EvalSplit::File(f)) = cfg.dataset.eval_split.as_mut() {
        *f = join(f);
    }
}

/// Drop `.` and fold `..` without touching the file system (the folders may not exist yet).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_demo_file_is_embedded() {
        let Some(dir) = checkout_demo_dir() else { return };
        let mut on_disk = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    on_disk.push(p.strip_prefix(&dir).unwrap().to_string_lossy().replace('\\', "/"));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = DEMO_FILES.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "assets/demo and DEMO_FILES in src/assets.rs disagree");
    }

    #[test]
    fn extraction_is_complete_and_done_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("demo");
        extract_demo(&dest).unwrap();
        for (name, bytes) in DEMO_FILES {
            assert_eq!(std::fs::read(dest.join(name)).unwrap(), *bytes, "{name}");
        }
        // A second call finds the stamp and leaves the folder alone (a marker file survives).
        std::fs::write(dest.join("marker"), b"x").unwrap();
        extract_demo(&dest).unwrap();
        assert!(dest.join("marker").exists());
        // A stale stamp (another build's demo) is replaced whole.
        std::fs::write(dest.join(STAMP_FILE), b"old").unwrap();
        extract_demo(&dest).unwrap();
        assert!(!dest.join("marker").exists());
    }

    #[test]
    fn extracted_demo_config_loads_with_absolute_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = extract_demo(&tmp.path().join("demo")).unwrap();
        let (_, cfg) = demo_config_in(&dir, false).unwrap();
        assert!(cfg.model.path.is_absolute() && cfg.model.path.join("config.json").is_file());
        assert!(cfg.dataset.path.is_absolute() && cfg.dataset.path.is_file());
        assert!(cfg.output.dir.is_absolute() && !cfg.output.dir.starts_with(&dir));
        cfg.validate().unwrap();
    }

    #[test]
    fn normalize_folds_parent_components() {
        assert_eq!(normalize(Path::new("/a/b/demo/../../runs")), PathBuf::from("/a/runs"));
        assert_eq!(normalize(Path::new("/a/./b")), PathBuf::from("/a/b"));
    }
}
