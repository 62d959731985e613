//! Tabular dataset files: CSV/TSV (a header row, then one record per row) and Parquet (string
//! columns, and `list<struct>` columns for `messages` / `conversations`). Both become JSON objects
//! keyed by column name, so the record-shape code downstream is the same for every file kind.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::Value as Json;

use crate::data::record::RawRecord;
use crate::error::{Error, IoContext, Result};

/// CSV or TSV with a header row. Fields may be quoted and hold newlines; a UTF-8 BOM is skipped.
/// Each record's row is the line it starts on, as an editor shows it (the header is line 1).
/// Cells are text; a cell that holds a JSON list (a `messages` column) is decoded downstream.
pub fn read_csv(path: &Path, bytes: &[u8], delimiter: u8) -> Result<Vec<RawRecord>> {
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).has_headers(true).flexible(true).from_reader(body);
    let headers = reader.byte_headers().map_err(|e| Error::line(path, 1, format!("cannot read the header row: {e}")))?.clone();
    let mut names = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        let name = std::str::from_utf8(h).map_err(|_| Error::line(path, 1, format!("header {} is not valid UTF-8", i + 1)))?;
        let name = name.trim().to_string();
        if name.is_empty() {
            return Err(Error::line(path, 1, format!("header {} is empty: every column needs a name", i + 1)));
        }
        if names.contains(&name) {
            return Err(Error::line(path, 1, format!("column `{name}` appears twice in the header")));
        }
        names.push(name);
    }
    // The csv crate's record position is where reading began, before any blank lines it skipped,
    // so the row is recomputed from the first byte that is not a line break. A lone CR ends a
    // record for the csv crate (and a line for most editors), so it counts as a line break too.
    let newlines: Vec<usize> =
        (0..body.len()).filter(|&i| body[i] == b'\n' || (body[i] == b'\r' && body.get(i + 1) != Some(&b'\n'))).collect();
    let line_at = |pos: Option<&csv::Position>, fallback: usize| -> usize {
        let Some(p) = pos else { return fallback };
        let mut at = p.byte() as usize;
        while at < body.len() && matches!(body[at], b'\n' | b'\r') {
            at += 1;
        }
        newlines.partition_point(|&n| n < at) + 1
    };
    let mut out = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let start_line = reader.position().line() as usize;
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let row = line_at(record.position(), start_line);
                // A line with nothing on it is not a record anyone meant.
                if record.len() == 1 && record[0].iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                out.push(RawRecord { row, record: None, value: csv_row(&names, &record) });
            }
            Err(e) => {
                let row = line_at(e.position(), start_line);
                out.push(RawRecord { row, record: None, value: Err(format!("unreadable CSV record: {}", csv_error_kind(&e))) });
                if !matches!(e.kind(), csv::ErrorKind::Utf8 { .. } | csv::ErrorKind::UnequalLengths { .. }) {
                    // I/O errors do not go away by reading on.
                    break;
                }
            }
        }
    }
    Ok(out)
}

fn csv_error_kind(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("field {} is not valid UTF-8", err.field() + 1),
        other => format!("{other:?}"),
    }
}

fn csv_row(names: &[String], record: &csv::ByteRecord) -> std::result::Result<Json, String> {
    if record.len() > names.len() {
        return Err(format!("{} fields but the header has {} (an unquoted delimiter in a field?)", record.len(), names.len()));
    }
    let mut obj = serde_json::Map::with_capacity(names.len());
    for (i, field) in record.iter().enumerate() {
        let text = std::str::from_utf8(field).map_err(|_| format!("column `{}` is not valid UTF-8", names[i]))?;
        obj.insert(names[i].clone(), Json::String(text.to_string()));
    }
    // Missing trailing fields stay absent, so the format code reports "missing column".
    Ok(Json::Object(obj))
}

/// Parquet via the record API. Rows are numbered from 1 across row groups.
pub fn read_parquet(path: &Path) -> Result<Vec<RawRecord>> {
    let file = std::fs::File::open(path).with_path(path)?;
    let reader = SerializedFileReader::new(file).map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::file(path, format!("cannot read rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        // A decoding error here comes from a page (codec, corruption), and later rows share it.
        let row = row.map_err(|e| Error::line(path, i + 1, format!("cannot decode row {}: {e}", i + 1)))?;
        let mut obj = serde_json::Map::new();
        let mut value = Ok(());
        for (name, field) in row.get_column_iter() {
            match field_json(field) {
                Ok(v) => {
                    obj.insert(name.clone(), v);
                }
                Err(e) => {
                    value = Err(format!("column `{name}`: {e}"));
                    break;
                }
            }
        }
        out.push(RawRecord { row: i + 1, record: None, value: value.map(|()| Json::Object(obj)) });
    }
    Ok(out)
}

fn number(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number)
}

/// A Parquet value as JSON: structs become objects, lists arrays, maps objects with text keys.
fn field_json(f: &Field) -> std::result::Result<Json, String> {
    Ok(match f {
        Field::Null => Json::Null,
        Field::Bool(b) => Json::Bool(*b),
        Field::Byte(n) => Json::from(*n),
        Field::Short(n) => Json::from(*n),
        Field::Int(n) => Json::from(*n),
        Field::Long(n) => Json::from(*n),
        Field::UByte(n) => Json::from(*n),
        Field::UShort(n) => Json::from(*n),
        Field::UInt(n) => Json::from(*n),
        Field::ULong(n) => Json::from(*n),
        Field::Float16(n) => number(f64::from(*n)),
        Field::Float(n) => number(f64::from(*n)),
        Field::Double(n) => number(*n),
        Field::Str(s) => Json::String(s.clone()),
        // Binary columns without a string annotation still hold text in many exports.
        Field::Bytes(b) => Json::String(b.as_utf8().map_err(|_| "binary data that is not UTF-8 text")?.to_string()),
        Field::Group(row) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in row.get_column_iter() {
                obj.insert(k.clone(), field_json(v)?);
            }
            Json::Object(obj)
        }
        Field::ListInternal(list) => Json::Array(list.elements().iter().map(field_json).collect::<std::result::Result<_, _>>()?),
        Field::MapInternal(map) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in map.entries() {
                let key = match field_json(k)? {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, field_json(v)?);
            }
            Json::Object(obj)
        }
        // Dates, times and decimals are not text a chat template can use; keep their printed form.
        other => Json::String(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<RawRecord> {
        read_csv(Path::new("d.csv"), text.as_bytes(), b',').unwrap()
    }

    #[test]
    fn quoted_fields_with_newlines_keep_the_starting_line() {
        let r = rows("\u{feff}instruction,output\n\"multi\nline\",\"say \"\"hi\"\"\"\nplain,\"a,b\"\n");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].row, 2);
        assert_eq!(r[0].value, Ok(serde_json::json!({"instruction": "multi\nline", "output": "say \"hi\""})));
        assert_eq!(r[1].row, 4);
        assert_eq!(r[1].value, Ok(serde_json::json!({"instruction": "plain", "output": "a,b"})));
    }

    #[test]
    fn short_long_and_non_utf8_rows() {
        let r = read_csv(Path::new("d.csv"), b"a,b\n1\n1,2,3\n\xff,2\n\n4,5\r\n6,7\r8,9", b',').unwrap();
        let rows: Vec<usize> = r.iter().map(|x| x.row).collect();
        assert_eq!(rows, vec![2, 3, 4, 6, 7, 8]);
        assert_eq!(r[0].value, Ok(serde_json::json!({"a": "1"})));
        assert!(r[1].value.as_ref().unwrap_err().contains("3 fields but the header has 2"));
        assert!(r[2].value.as_ref().unwrap_err().contains("not valid UTF-8"));
        assert_eq!(r[3].value, Ok(serde_json::json!({"a": "4", "b": "5"})));
    }

    #[test]
    fn bad_headers_are_file_errors() {
        let e = read_csv(Path::new("d.csv"), b"a,a\n1,2\n", b',').unwrap_err().to_string();
        assert!(e.starts_with("d.csv:1:") && e.contains("twice"), "{e}");
        let e = read_csv(Path::new("d.csv"), b"a,,c\n", b',').unwrap_err().to_string();
        assert!(e.contains("header 2 is empty"), "{e}");
    }
}
