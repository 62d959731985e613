//! What has been exported from a run, in `RUN/exports.jsonl`: one line per export (when, what,
//! where), written by every export that reads a run folder (the CLI's and the studio's go through
//! the functions that call `record`), read by the studio's Export page to list a run's exports.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The run folder's file of exports.
pub const FILE: &str = "exports.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    /// `adapter`, `merged bf16`, `gguf q4_k_m`, …
    pub kind: String,
    /// The folder or file written.
    pub path: PathBuf,
}

/// Append an export of `run_dir` to its `exports.jsonl`: one `write` of one line, so two
/// processes appending at once never interleave within a line.
pub fn record(run_dir: &Path, kind: &str, path: &Path) -> Result<()> {
    let (d, t) = crate::util::utc_now();
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let line = serde_json::to_string(&ExportRecord { time: format!("{d}T{t}Z"), kind: kind.into(), path }).expect("json") + "\n";
    let file = run_dir.join(FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| Error::file(&file, e))
}

/// `record`, for an export that has already been written: the export is what was asked for, so
/// a list that cannot be written (a full disk) does not undo or fail it.
pub fn record_done(run_dir: Option<&Path>, kind: &str, path: &Path) {
    if let Some(dir) = run_dir {
        let _ = record(dir, kind, path);
    }
}

/// The exports of `run_dir`, oldest first; lines that do not parse (a crash mid-write) are skipped.
pub fn read(run_dir: &Path) -> Vec<ExportRecord> {
    std::fs::read_to_string(run_dir.join(FILE))
        .map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_listed_in_order_and_a_torn_line_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        assert!(read(d.path()).is_empty());
        record(d.path(), "adapter", &d.path().join("a")).unwrap();
        std::fs::OpenOptions::new().append(true).open(d.path().join(FILE)).unwrap().write_all(b"{\"time\": \"2026-").unwrap();
        std::fs::OpenOptions::new().append(true).open(d.path().join(FILE)).unwrap().write_all(b"\n").unwrap();
        record(d.path(), "gguf q8_0", &d.path().join("b.gguf")).unwrap();
        let got = read(d.path());
        assert_eq!(got.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(), ["adapter", "gguf q8_0"]);
        assert_eq!(got[1].path, d.path().join("b.gguf"));
        assert!(got[0].time.ends_with('Z') && got[0].time.len() == 20, "{}", got[0].time);
    }
}
