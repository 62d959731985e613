//! Property tests: the file parsers and the template renderer never panic, whatever they are fed,
//! and what they return keeps its invariants (row numbers in range and increasing).

use std::path::Path;

use proptest::prelude::*;
use tunestudio::data::read::{read_json, read_jsonl, read_txt};
use tunestudio::data::tabular::read_csv;
use tunestudio::model::chat_template::{BUILTIN_NAMES, ChatTemplate, Message, SpecialTokens};

/// Bytes that look enough like the formats to reach deep into the parsers.
fn structured_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\"messages\"".to_vec()),
        Just(b"\xff".to_vec()),
        Just("é".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..4),
    ];
    proptest::collection::vec(piece, 0..64).prop_map(|v| v.concat())
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![structured_bytes(), proptest::collection::vec(any::<u8>(), 0..256)]
}

fn lines_in(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count() + 1
}

fn rows_ok(rows: &[usize], lines: usize) -> bool {
    rows.windows(2).all(|w| w[0] < w[1]) && rows.iter().all(|&r| r >= 1 && r <= lines)
}

/// CSV also breaks lines at a lone CR.
fn csv_lines_in(bytes: &[u8]) -> usize {
    lines_in(bytes) + bytes.iter().enumerate().filter(|&(i, &b)| b == b'\r' && bytes.get(i + 1) != Some(&b'\n')).count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_never_panics(bytes in any_bytes()) {
        let recs = read_jsonl(&bytes);
        let rows: Vec<usize> = recs.iter().map(|r| r.row).collect();
        prop_assert!(rows_ok(&rows, lines_in(&bytes)), "{rows:?}");
    }

    #[test]
    fn json_never_panics(bytes in any_bytes()) {
        if let Ok(recs) = read_json(Path::new("f.json"), &bytes) {
            let rows: Vec<usize> = recs.iter().map(|r| r.row).collect();
            prop_assert!(rows.iter().all(|&r| r >= 1 && r <= lines_in(&bytes)), "{rows:?}");
        }
    }

    #[test]
    fn csv_never_panics(bytes in any_bytes(), tab in any::<bool>()) {
        if let Ok(recs) = read_csv(Path::new("f.csv"), &bytes, if tab { b'\t' } else { b',' }) {
            let rows: Vec<usize> = recs.iter().map(|r| r.row).collect();
            prop_assert!(rows_ok(&rows, csv_lines_in(&bytes)), "{rows:?}");
        }
    }

    #[test]
    fn txt_never_panics(bytes in any_bytes()) {
        if let Ok(recs) = read_txt(Path::new("f.txt"), &bytes) {
            let rows: Vec<usize> = recs.iter().map(|r| r.row).collect();
            prop_assert!(rows_ok(&rows, lines_in(&bytes)), "{rows:?}");
        }
    }

    /// Arbitrary template sources: compile errors and render errors are fine, panics are not.
    #[test]
    fn template_source_never_panics(src in "(\\{%-? ?(end)?generation ?-?%\\}|\\{\\{|\\}\\}|\\{%|%\\}|[a-z_.()'|\\[\\] ]|messages|loop|for|if|endfor|endif|in|raise_exception|strip|tojson){0,40}") {
        if let Ok(t) = ChatTemplate::new(&src, "fuzz", SpecialTokens::default()) {
            let _ = t.render(&[Message::new("user", "a"), Message::new("assistant", "b")], true);
        }
    }

    /// Arbitrary conversations through every built-in: rendering succeeds and the generation
    /// spans are valid ranges of the output, on character boundaries.
    #[test]
    fn builtins_render_any_conversation(turns in proptest::collection::vec((0usize..4, ".{0,12}"), 0..6)) {
        let roles = ["system", "user", "assistant", "tool"];
        let msgs: Vec<Message> = turns.iter().map(|(r, c)| Message::new(roles[*r], c.clone())).collect();
        let specials = SpecialTokens { bos_token: Some("<s>".into()), eos_token: Some("</s>".into()), ..Default::default() };
        for name in BUILTIN_NAMES {
            let t = ChatTemplate::builtin(name, specials.clone()).unwrap();
            match t.render(&msgs, false) {
                Ok(r) => {
                    for s in &r.generation_spans {
                        prop_assert!(s.start < s.end && s.end <= r.text.len());
                        prop_assert!(r.text.is_char_boundary(s.start) && r.text.is_char_boundary(s.end));
                    }
                }
                // Only the noncharacter guard may refuse.
                Err(e) => prop_assert!(e.contains("noncharacter"), "{name}: {e}"),
            }
        }
    }
}
