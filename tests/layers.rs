//! The crate's layers below the studio (ARCHITECTURE.md, "Modules"): the backend names no module
//! that builds on it. The engine's memory plan once gave the backend its default context size,
//! which made `engine::plan` and `backend` import each other; constants both need live in the
//! backend (`backend::context`, `backend::cuda`) and the plan imports them.

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

#[test]
fn the_checker_sees_what_it_must_refuse() {
    assert_eq!(names_above("use crate::engine::plan::X;"), vec!["engine"]);
    assert_eq!(names_above("    x + crate::engine::plan::Y.min(1)"), vec!["engine"]);
    assert_eq!(names_above("use crate::{error::Result, session::lock};"), vec!["session"]);
    assert!(names_above("use crate::util::x; // crate::engine::plan in a comment").is_empty());
    assert!(names_above("use crate::backend::context::X;").is_empty());
}
