//! The shape of `proxy/src`, checked: data flows one way (parse → check → compile → snapshot →
//! swap), so the folders' imports form no cycle, and `config/` imports no stage, no compiled
//! type and no glue.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `crate::X` references in code (comments, strings and test modules left out), by top-level
/// module of `proxy/src`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = palisade_tests::repo_path("proxy/src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap();
            let top = top_module(rel);
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for line in code.lines() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                // Drop string literals: messages may name modules.
                let code: String = line.split('"').step_by(2).collect();
                for part in code.split("crate::").skip(1) {
                    let m: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !m.is_empty() && m != top {
                        out.entry(top.clone()).or_default().insert(m);
                    }
                }
            }
        }
    }
    out
}

fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn module_folders_import_each_other_without_cycles() {
    let graph = imports();
    assert!(
        graph.contains_key("compile") && graph.contains_key("server"),
        "{graph:?}"
    );
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("import cycle: {:?} -> {n}", &path[i..]);
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            visit(m, graph, path, done);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn config_imports_no_stage_no_compiled_type_and_no_glue() {
    let graph = imports();
    let config = graph.get("config").cloned().unwrap_or_default();
    for forbidden in [
        "rules",
        "schema",
        "ratelimit",
        "pipeline",
        "server",
        "compile",
        "snapshot",
        "upstream",
        "request",
        "metrics",
    ] {
        assert!(
            !config.contains(forbidden),
            "config imports {forbidden}: {config:?}"
        );
    }
}
