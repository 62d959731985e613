//! Dataset files → records. Every file kind becomes the same thing: a list of JSON values, each with
//! the row number a person would look for in the file (the line for JSONL, JSON arrays and CSV,
//! the paragraph's first line for text, the 1-based row for Parquet). A record that cannot be read
//! is kept as an error string so the report can name it; only a file that cannot be read at all is
//! an `Err`.

use std::path::Path;

use serde_json::Value as Json;

use crate::data::record::{FileKind, RawRecord};
use crate::data::tabular;
use crate::error::{Error, IoContext, Result};

pub fn file_kind(path: &Path, head: &[u8]) -> Result<FileKind> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    Ok(match ext.as_str() {
        "jsonl" | "ndjson" => FileKind::Jsonl,
        "json" => FileKind::Json,
        "csv" => FileKind::Csv,
        "tsv" => FileKind::Tsv,
        "parquet" | "pq" => FileKind::Parquet,
        "txt" | "text" | "md" => FileKind::Txt,
        _ => {
            let first = strip_bom(head).iter().copied().find(|b| !b.is_ascii_whitespace());
            match first {
                Some(b'[') => FileKind::Json,
                Some(b'{') => FileKind::Jsonl,
                _ if head.starts_with(b"PAR1") => FileKind::Parquet,
                _ => {
                    return Err(Error::file(path, "unknown dataset file type: use .jsonl, .json, .csv, .tsv, .parquet or .txt"));
                }
            }
        }
    })
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Read every record of a dataset file.
pub fn read_records(path: &Path) -> Result<(FileKind, Vec<RawRecord>)> {
    if !path.exists() {
        return Err(Error::file(path, "dataset file not found"));
    }
    if path.is_dir() {
        return Err(Error::file(path, "is a folder: choose a dataset file (.jsonl, .json, .csv, .parquet, .txt)"));
    }
    let mut head = [0u8; 64];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_path(path)?;
        f.read(&mut head).with_path(path)?
    };
    let kind = file_kind(path, &head[..n])?;
    if kind == FileKind::Parquet {
        // Parquet is read from the file (its footer first), not from one big buffer.
        return Ok((kind, tabular::read_parquet(path)?));
    }
    let bytes = std::fs::read(path).with_path(path)?;
    let records = match kind {
        FileKind::Jsonl => read_jsonl(&bytes),
        FileKind::Json => read_json(path, &bytes)?,
        FileKind::Csv => tabular::read_csv(path, &bytes, b',')?,
        FileKind::Tsv => tabular::read_csv(path, &bytes, b'\t')?,
        FileKind::Txt => read_txt(path, &bytes)?,
        FileKind::Parquet => unreachable!("handled above"),
    };
    Ok((kind, records))
}

/// One JSON value per non-blank line; the row is the line number.
pub fn read_jsonl(bytes: &[u8]) -> Vec<RawRecord> {
    let bytes = strip_bom(bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value = match std::str::from_utf8(line) {
            Err(e) => Err(format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1)),
            Ok(text) => {
                serde_json::from_str::<Json>(text).map_err(|e| format!("bad JSON at column {}: {}", e.column(), strip_position(&e)))
            }
        };
        out.push(RawRecord { row: i + 1, record: None, value });
    }
    out
}

/// serde_json appends " at line L column C" to its messages; the row number already says where.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(p) => s[..p].to_string(),
        None => s,
    }
}

/// A JSON array of records. Each record's row is the line its value starts on. A `.json` file that
/// is really one object per line (as `datasets` writes them) is read as JSONL.
pub fn read_json(path: &Path, bytes: &[u8]) -> Result<Vec<RawRecord>> {
    let body = strip_bom(bytes);
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::file(path, format!("not valid UTF-8 at byte {}", e.valid_up_to() + strip_len(bytes))))?;
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Array(items)) => {
            let lines = top_level_item_lines(text);
            debug_assert_eq!(lines.len(), items.len());
            Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| RawRecord { row: lines.get(i).copied().unwrap_or(i + 1), record: Some(i + 1), value: Ok(v) })
                .collect())
        }
        Ok(Json::Object(_)) => {
            // A single object: either JSONL with one line, or a wrapper we do not guess about.
            if text.trim().lines().count() == 1 {
                Ok(read_jsonl(bytes))
            } else {
                Err(Error::file(path, "expected a JSON array of records (or one JSON record per line)"))
            }
        }
        Ok(_) => Err(Error::file(path, "expected a JSON array of records (or one JSON record per line)")),
        Err(e) => {
            let first = text.trim_start().as_bytes().first().copied();
            if first == Some(b'{') && e.is_syntax() && looks_like_jsonl(text) {
                Ok(read_jsonl(bytes))
            } else {
                Err(Error::line(path, e.line(), format!("not valid JSON: {}", strip_position(&e))))
            }
        }
    }
}

fn strip_len(bytes: &[u8]) -> usize {
    bytes.len() - strip_bom(bytes).len()
}

/// A file whose first line alone parses as a JSON object is one-record-per-line.
fn looks_like_jsonl(text: &str) -> bool {
    text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| matches!(serde_json::from_str::<Json>(l), Ok(Json::Object(_))))
}

/// The 1-based line on which each element of a (valid) top-level JSON array starts.
fn top_level_item_lines(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut expect_item = false;
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        if depth == 1 && expect_item && !b.is_ascii_whitespace() && b != b']' {
            out.push(line);
            expect_item = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_item = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_item = true,
            _ => {}
        }
    }
    out
}

/// Plain text: one example per paragraph (lines separated by one or more blank lines), row = the
/// paragraph's first line. A file without any blank line is taken one example per line instead:
/// such files are lists of short texts, and one giant example would be truncated to nothing useful.
pub fn read_txt(path: &Path, bytes: &[u8]) -> Result<Vec<RawRecord>> {
    let text = std::str::from_utf8(strip_bom(bytes))
        .map_err(|e| Error::file(path, format!("not valid UTF-8 at byte {}", e.valid_up_to() + strip_len(bytes))))?;
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let blank = |l: &str| l.trim().is_empty();
    let non_blank: Vec<usize> = (0..lines.len()).filter(|&i| !blank(lines[i])).collect();
    let has_gap = non_blank.windows(2).any(|w| w[1] > w[0] + 1);
    let record = |row: usize, text: String| RawRecord { row, record: None, value: Ok(serde_json::json!({ "text": text })) };
    let mut out = Vec::new();
    if !has_gap {
        for i in non_blank {
            out.push(record(i + 1, lines[i].to_string()));
        }
        return Ok(out);
    }
    let mut start: Option<usize> = None;
    for i in 0..=lines.len() {
        let is_blank = i == lines.len() || blank(lines[i]);
        match (is_blank, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push(record(s + 1, lines[s..i].join("\n")));
                start = None;
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_are_line_numbers_and_bad_lines_are_kept() {
        let recs = read_jsonl(b"\xEF\xBB\xBF{\"a\":1}\n\n{\"a\":\n{\"a\":3}\r\n");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].row, 1);
        assert_eq!(recs[1].row, 3);
        assert!(recs[1].value.as_ref().unwrap_err().starts_with("bad JSON"));
        assert_eq!(recs[2].row, 4);
        assert_eq!(recs[2].value, Ok(serde_json::json!({"a": 3})));
    }

    #[test]
    fn json_array_rows_are_start_lines() {
        let text = "[\n  {\"a\": \"x,[\\\"\"},\n  {\n    \"a\": [1, 2]\n  }, 5\n]\n";
        let recs = read_json(Path::new("d.json"), text.as_bytes()).unwrap();
        let rows: Vec<usize> = recs.iter().map(|r| r.row).collect();
        assert_eq!(rows, vec![2, 3, 5]);
        let records: Vec<Option<usize>> = recs.iter().map(|r| r.record).collect();
        assert_eq!(records, vec![Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn json_file_holding_jsonl_is_read_as_jsonl() {
        let recs = read_json(Path::new("d.json"), b"{\"a\":1}\n{\"a\":2}\n").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].row, 2);
    }

    #[test]
    fn broken_json_array_names_the_line() {
        let e = read_json(Path::new("d.json"), b"[\n{\"a\":1},\n{\"a\" 2}\n]").unwrap_err().to_string();
        assert!(e.starts_with("d.json:3:"), "{e}");
    }

    #[test]
    fn txt_paragraphs_or_lines() {
        let recs = read_txt(Path::new("t.txt"), b"one\ntwo\n\n\nthree\n").unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].row, recs[1].row), (1, 5));
        assert_eq!(recs[0].value.as_ref().unwrap()["text"], "one\ntwo");
        let recs = read_txt(Path::new("t.txt"), b"one\ntwo\nthree").unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].row, 3);
    }
}
