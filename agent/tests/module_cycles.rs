//! No import cycle between the agent's top-level modules: a type two modules share lives below both.
//!
//! Reads `agent/src` as text: every `crate::X` path (and `use crate::{X, ...}` group) in a
//! top-level module's non-test code is an edge to module `X`. Test code (`tests.rs`, files
//! under a `tests/` directory, `testing.rs` and `#[cfg(test)] mod ... { }` blocks at a file's
//! end) does not count: tests may reach anywhere.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → (module it uses → first `file:line` that uses it).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read agent/src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_test_file(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || name == "testing.rs"
        || rel.components().any(|c| c.as_os_str() == "tests")
}

/// The module names a `crate::` path or `use crate::{...}` group names, on each line.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // An inline `#[cfg(test)] mod name {` block runs to the end of the file (STYLE: tests last).
    let mut code = text;
    let mut from = 0;
    while let Some(i) = text[from..].find("#[cfg(test)]\nmod ") {
        let at = from + i;
        if text[at..]
            .lines()
            .nth(1)
            .is_some_and(|l| l.trim_end().ends_with('{'))
        {
            code = &text[..at];
            break;
        }
        from = at + 1;
    }
    for (n, line) in code.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split([',', '}']) {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.push((n + 1, name));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
            }
        }
    }
    out
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g = Graph::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        if matches!(top.as_str(), "main" | "lib") || is_test_file(rel) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for (line, dst) in uses(&text) {
            if dst != top {
                g.entry(top.clone())
                    .or_default()
                    .entry(dst)
                    .or_insert_with(|| format!("{}:{line}", rel.display()));
            }
        }
    }
    g
}

/// Modules from which `to` can be reached.
fn reaches(g: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(m) = stack.pop() {
        if m == to {
            return true;
        }
        if seen.insert(m.clone()) {
            stack.extend(g.get(&m).into_iter().flat_map(|d| d.keys().cloned()));
        }
    }
    false
}

/// Every edge that lies on a cycle, with where it is made.
fn cycle_edges(g: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for (from, deps) in g {
        for (to, at) in deps {
            if reaches(g, to, from) {
                out.push(format!("{from} -> {to} ({at})"));
            }
        }
    }
    out
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.len() > 10, "read too few modules: {:?}", g.keys());
    let cycles = cycle_edges(&g);
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules of agent/src (move the shared type below both):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_group_imports() {
    let text = "use crate::{alpha, beta::X};\n// crate::commented\nfn f() { crate::gamma::g(); }\n#[cfg(test)]\nmod tests;\nfn h() { crate::delta::d(); }\n#[cfg(test)]\nmod inline {\n    use crate::epsilon;\n}\n";
    let names: Vec<String> = uses(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["alpha", "beta", "gamma", "delta"]);
    let mut g = Graph::new();
    g.entry("a".into())
        .or_default()
        .insert("b".into(), "a.rs:1".into());
    g.entry("b".into())
        .or_default()
        .insert("c".into(), "b.rs:1".into());
    assert!(cycle_edges(&g).is_empty());
    g.entry("c".into())
        .or_default()
        .insert("a".into(), "c.rs:9".into());
    assert_eq!(
        cycle_edges(&g),
        ["a -> b (a.rs:1)", "b -> c (b.rs:1)", "c -> a (c.rs:9)"]
    );
}
