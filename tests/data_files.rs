//! File kinds beyond JSONL: CSV/TSV, Parquet (fixtures written by pyarrow, see
//! tests/fixtures/data/make_parquet.py), and the malformed-rows fixtures.

mod data_support;

use std::path::PathBuf;

use data_support::*;
use tunestudio::config::{DatasetConfig, DatasetFormat};
use tunestudio::data::prepare_dataset;
use tunestudio::model::tokenizer::TokenizerBundle;

const H_USER: &str = "<|start_header_id|>user<|end_header_id|>\n\n";
const H_ASSIST: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn cfg(path: PathBuf) -> DatasetConfig {
    DatasetConfig { path, ..DatasetConfig::default() }
}

fn skipped(ds: &tunestudio::data::PreparedDataset) -> Vec<(usize, String)> {
    ds.report.rows_skipped.iter().map(|s| (s.row, s.reason.clone())).collect()
}

#[test]
fn five_malformed_jsonl_rows_among_100_are_named_exactly() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let ds = prepare_dataset(&cfg(fixture("malformed_100.jsonl")), &tok, 512).unwrap();
    assert_eq!(ds.report.rows_total, 100);
    assert_eq!(ds.report.rows_used, 95);
    let got = skipped(&ds);
    let rows: Vec<usize> = got.iter().map(|s| s.0).collect();
    assert_eq!(rows, vec![7, 23, 48, 61, 99], "{got:?}");
    assert!(got[0].1.starts_with("bad JSON"), "{got:?}");
    assert_eq!(got[1].1, "missing column `messages`");
    assert_eq!(got[2].1, "empty response in turn 2");
    assert_eq!(got[3].1, "no assistant turn");
    assert!(got[4].1.contains("unknown role `narrator`"), "{got:?}");
    // Examples keep their file rows.
    assert_eq!(ds.examples[6].row, 8);
}

#[test]
fn five_malformed_csv_rows_among_100_are_named_by_starting_line() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let ds = prepare_dataset(&cfg(fixture("malformed_100.csv")), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Alpaca);
    assert_eq!(ds.report.file_kind, "CSV");
    assert_eq!(ds.report.rows_total, 100);
    let got = skipped(&ds);
    let rows: Vec<usize> = got.iter().map(|s| s.0).collect();
    // `grep -n BAD tests/fixtures/data/malformed_100.csv` shows the same numbers.
    assert_eq!(rows, vec![15, 41, 64, 79, 107], "{got:?}");
    assert_eq!(got[0].1, "missing column `output`");
    assert_eq!(got[1].1, "column `output` is empty: the row has no response to train on");
    assert!(got[2].1.contains("4 fields but the header has 3"), "{got:?}");
    assert_eq!(got[3].1, "column `output` is empty: the row has no response to train on");
    assert_eq!(got[4].1, "missing column `output`");
    // The tenth record spans two lines (quoted newline) and keeps both in the user turn.
    let tenth = ds.examples.iter().find(|e| e.row == 11).expect("record 10 starts on line 11");
    let text = tok.decode(&tenth.input_ids, false).unwrap();
    assert!(text.contains("poem 10\n\nfirst line\nsecond line"), "{text}");
}

#[test]
fn tsv_and_bom_and_messages_cell_as_json() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let data = write(
        model.path(),
        "m.tsv",
        "\u{feff}messages\tnote\n[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]\tx\n",
    );
    let ds = prepare_dataset(&cfg(data), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Messages);
    let pieces = [("<|begin_of_text|>", false), (H_USER, false), ("a<|eot_id|>", false), (H_ASSIST, false), ("b<|eot_id|>", true)];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
    assert_eq!(ds.examples[0].row, 2);
}

#[test]
fn parquet_messages_list_of_struct_across_row_groups() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let mut c = cfg(fixture("messages.parquet"));
    c.max_bad_fraction = 0.5;
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Messages);
    assert_eq!(ds.report.file_kind, "Parquet");
    assert_eq!(ds.report.rows_total, 4);
    let pieces = [("<|begin_of_text|>", false), (H_USER, false), ("q1<|eot_id|>", false), (H_ASSIST, false), ("r1<|eot_id|>", true)];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
    assert_eq!(ds.examples[1].row, 2);
    let text = tok.decode(&ds.examples[1].input_ids, false).unwrap();
    assert!(text.contains("system<|end_header_id|>\n\nS<|eot_id|>"), "{text}");
    // Rows 3 and 4 sit in the second row group.
    assert_eq!(skipped(&ds), vec![(3, "no assistant turn".to_string()), (4, "empty response in turn 2".to_string())]);
}

#[test]
fn parquet_string_columns_zstd_and_sharegpt_gzip() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let mut c = cfg(fixture("alpaca_zstd.parquet"));
    c.max_bad_fraction = 0.5;
    let ds = prepare_dataset(&c, &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Alpaca);
    assert_eq!(ds.examples.len(), 2);
    let text = tok.decode(&ds.examples[0].input_ids, false).unwrap();
    assert!(text.contains("Add\n\n1 2<|eot_id|>"), "{text}");
    assert_eq!(skipped(&ds), vec![(3, "column `output` is null".to_string())]);

    let ds = prepare_dataset(&cfg(fixture("sharegpt_gzip.parquet")), &tok, 512).unwrap();
    assert_eq!(ds.report.format, DatasetFormat::Sharegpt);
    let pieces = [("<|begin_of_text|>", false), (H_USER, false), ("hey<|eot_id|>", false), (H_ASSIST, false), ("hello<|eot_id|>", true)];
    assert_eq!((ds.examples[0].input_ids.clone(), ds.examples[0].labels.clone()), expect(&pieces));
}

#[test]
fn not_a_parquet_file_is_a_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.parquet", "hello");
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let e = prepare_dataset(&cfg(p), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("x.parquet") && e.contains("not a readable Parquet file"), "{e}");
}

/// Issue 18: an empty file and a binary one are said to be what they are, naming the file, and
/// not blamed on `dataset.format` (which detection would otherwise say it cannot tell).
#[test]
fn empty_and_binary_files_name_the_file_not_the_format() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let p = write(model.path(), "empty.jsonl", "\n\n");
    let e = prepare_dataset(&cfg(p), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl: has no rows") && !e.contains("dataset.format"), "{e}");
    let noise: Vec<u8> = (0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let p = model.path().join("noise.jsonl");
    std::fs::write(&p, &noise).unwrap();
    let e = prepare_dataset(&cfg(p.clone()), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("noise.jsonl: none of its") && e.contains("is it a dataset file?") && e.contains("line 1:"), "{e}");
    assert!(!e.contains("dataset.format"), "{e}");
    let csv = model.path().join("noise.csv");
    std::fs::write(&csv, [b"a,b\n".as_slice(), &[0xff, 0xfe, b',', 0xff, b'\n'], &[0xc3, 0x28, b',', b'x', b'\n']].concat()).unwrap();
    let e = prepare_dataset(&cfg(csv), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("noise.csv: none of its 2 rows") && !e.contains("dataset.format"), "{e}");
}

#[test]
fn missing_dataset_and_unknown_extension() {
    let model = model_dir(None);
    let tok = TokenizerBundle::load(model.path()).unwrap();
    let e = prepare_dataset(&cfg(model.path().join("nope.jsonl")), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("nope.jsonl") && e.contains("not found"), "{e}");
    let p = write(model.path(), "data.xyz", "hello");
    let e = prepare_dataset(&cfg(p), &tok, 512).unwrap_err().to_string();
    assert!(e.contains("data.xyz") && e.contains(".jsonl"), "{e}");
}
