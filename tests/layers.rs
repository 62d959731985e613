//! The crate's layers (ARCHITECTURE.md, "Modules"): every top-level module names only modules
//! below it, so no two import each other. The cycles this broke (issue 16), each by moving the
//! shared piece down:
//! - `engine::plan` ↔ `backend`: constants both need live in the backend (`backend::context`,
//!   `backend::cuda`) and the plan imports them;
//! - `export` ↔ `session` and `export` ↔ `generate`: the PEFT adapter files every run, checkpoint
//!   and export write are `crate::adapter` (was `export::adapter`), and the chat template's end of
//!   turn is `model::tokenizer::end_of_turn_token_in` (was in `export::merged`);
//! - `model` → `backend` → `quant` → `model`: the RMSNorm a spec applies is built by the engine
//!   (`engine::norm_of`, was `ModelSpec::norm`), so `model` names no backend type;
//! - `generate` ↔ `session` (samples during training answer through `generate`, which answers
//!   from a run's checkpoints): checkpoints are `crate::checkpoint` (was `session::checkpoint`,
//!   which still re-exports it), below both.

use std::path::Path;

/// The modules that build on the backend.
const ABOVE: [&str; 10] = ["engine", "session", "app", "commands", "export", "generate", "eval", "bench", "preflight", "data"];

/// `crate::NAME` paths in `source` (comments left out) whose NAME is in `ABOVE`.
fn names_above(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in source.lines().map(|l| l.split("//").next().unwrap_or("")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => {
                    group.split('}').next().unwrap_or("").split(',').map(|n| n.trim().split("::").next().unwrap_or("")).collect()
                }
                None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")],
            };
            found.extend(names.into_iter().filter(|n| ABOVE.contains(n)).map(str::to_string));
        }
    }
    found
}

#[test]
fn backend_names_no_module_above_it() {
    // Every file under src/backend, unit tests included, so a new file is held to the rule
    // without being listed.
    let mut paths = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend")];
    let (mut wrong, mut seen) = (Vec::new(), 0);
    while let Some(path) = paths.pop() {
        if path.is_dir() {
            paths.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else if path.extension().is_some_and(|x| x == "rs") {
            seen += 1;
            for name in names_above(&std::fs::read_to_string(&path).unwrap()) {
                wrong.push(format!("{} names crate::{name}", path.display()));
            }
        }
    }
    assert!(seen >= 10, "{seen} files found under src/backend");
    assert!(wrong.is_empty(), "the backend imports a module that builds on it: {wrong:?}");
}

/// The top-level modules, bottom first. A module may name modules before it (and itself); a new
/// module must be placed here, which says where it sits.
const LAYERS: [&str; 21] = [
    "error",
    "util",
    "config",
    "assets",
    "model",
    "quant",
    "backend",
    "data",
    "engine",
    "device",
    "adapter",
    "checkpoint",
    "prepare",
    "preflight",
    "bench",
    "generate",
    "session",
    "export",
    "eval",
    "commands",
    "app",
];

/// The crate-root re-exports (`lib.rs`) and the modules they stand for.
const REEXPORTS: [(&str, &str); 3] = [("Error", "error"), ("Result", "error"), ("RunConfig", "config")];

/// The top-level module of every `crate::…` path in `source` (comments left out), groups
/// (`crate::{a::X, b::{Y, Z}}`, over several lines too) included.
fn crate_names(source: &str) -> Vec<String> {
    let code: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| s.trim().split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_string();
    let mut found = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                // Split at the group's own commas (depth 0), up to its closing brace.
                let (mut depth, mut start) = (0usize, 0usize);
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            found.push(ident(&group[start..j]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.push(ident(&group[start..j]));
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => found.push(ident(rest)),
        }
    }
    found.retain(|n| !n.is_empty());
    for n in &mut found {
        if let Some((_, m)) = REEXPORTS.iter().find(|(r, _)| r == n) {
            *n = m.to_string();
        }
    }
    found
}

#[test]
fn modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let (mut wrong, mut seen) = (Vec::new(), 0);
    let mut paths: Vec<_> = std::fs::read_dir(&src).unwrap().flatten().map(|e| e.path()).collect();
    while let Some(path) = paths.pop() {
        if path.is_dir() {
            paths.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
            continue;
        }
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if first == "main" || first == "lib" {
            continue; // the binary and the crate root name every module
        }
        seen += 1;
        let Some(mine) = rank(&first) else {
            wrong.push(format!("src/{first} is not in LAYERS: place it there"));
            continue;
        };
        for name in crate_names(&std::fs::read_to_string(&path).unwrap()) {
            match rank(&name) {
                Some(r) if r <= mine => {}
                Some(_) => wrong.push(format!("{} names crate::{name}, a module above {first}", rel.display())),
                None => wrong.push(format!("{} names crate::{name}, which is not in LAYERS", rel.display())),
            }
        }
    }
    assert!(seen >= 80, "{seen} files found under src");
    assert!(wrong.is_empty(), "imports against the layers:\n{}", wrong.join("\n"));
}

#[test]
fn the_layer_checker_reads_groups_and_reexports() {
    assert_eq!(crate_names("use crate::{error::Result, model::{A, B}};"), vec!["error", "model"]);
    assert_eq!(crate_names("use crate::{\n    adapter::X,\n    session::{lock, checkpoint},\n};"), vec!["adapter", "session"]);
    assert_eq!(crate_names("fn f() -> crate::Result<crate::RunConfig> {}"), vec!["error", "config"]);
    assert!(crate_names("// crate::app in a comment").is_empty());
    // The cycles broken in issue 16 stay broken: each pair is in order.
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m).unwrap();
    for (below, above) in [
        ("session", "export"),
        ("generate", "export"),
        ("model", "backend"),
        ("quant", "backend"),
        ("model", "quant"),
        ("adapter", "session"),
        ("backend", "engine"),
        ("checkpoint", "generate"),
        ("generate", "session"),
    ] {
        assert!(rank(below) < rank(above), "{below} must sit below {above}");
    }
}

#[test]
fn the_checker_sees_what_it_must_refuse() {
    assert_eq!(names_above("use crate::engine::plan::X;"), vec!["engine"]);
    assert_eq!(names_above("    x + crate::engine::plan::Y.min(1)"), vec!["engine"]);
    assert_eq!(names_above("use crate::{error::Result, session::lock};"), vec!["session"]);
    assert!(names_above("use crate::util::x; // crate::engine::plan in a comment").is_empty());
    assert!(names_above("use crate::backend::context::X;").is_empty());
}
