//! What every dataset reader yields: the kind of file, and its records, each with the row a
//! person finds in the file. Kept apart from the readers so that `read` (JSONL, JSON, text, and
//! the dispatch by kind) and `tabular` (CSV, TSV, Parquet) both use it without importing each other.

use serde_json::Value as Json;

/// What kind of file a dataset is, from its extension (or its first byte when that says nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Csv,
    Tsv,
    Parquet,
    Txt,
}

impl FileKind {
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Jsonl => "JSONL",
            FileKind::Json => "JSON",
            FileKind::Csv => "CSV",
            FileKind::Tsv => "TSV",
            FileKind::Parquet => "Parquet",
            FileKind::Txt => "text",
        }
    }
}

/// One record of a dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// 1-based, as a text editor shows it: the line for JSONL, JSON arrays and CSV, the
    /// paragraph's first line for text, the row for Parquet.
    pub row: usize,
    /// For an item of a JSON array, its 1-based position in the array: in a pretty-printed file
    /// the line alone does not say which item a program reading the array sees.
    pub record: Option<usize>,
    pub value: std::result::Result<Json, String>,
}
