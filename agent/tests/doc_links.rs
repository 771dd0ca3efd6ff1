//! The repository's markdown documents: every relative link names a file that exists (and a heading that exists, for `#anchors`), and none points outside the repository.
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

/// Every `*.md` file of the repository, outside build output and vendored trees.
fn documents(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if !(name.starts_with('.') || name == "target" || name == "corpus") {
                documents(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// Targets of inline links and images, `[text](target)`, outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans: a `[x](y)` inside backticks is not a link. A code span that is a
        // path going up (`../x`) is a reference all the same, and checked like a link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            } else if part.starts_with("../") && !part.contains(char::is_whitespace) {
                out.push(part.to_string());
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// What is wrong with `target`, a link in `doc`; `None` when it resolves.
fn problem(root: &Path, doc: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://")
        || target.starts_with("https://")
        || target.starts_with("mailto:")
    {
        return None;
    }
    let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
    let path = if file.is_empty() {
        doc.to_path_buf()
    } else {
        doc.parent().expect("a document has a directory").join(file)
    };
    let mut normal = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            c => normal.push(c),
        }
    }
    if !normal.starts_with(root) {
        return Some(format!("`{target}` points outside the repository"));
    }
    if !normal.exists() {
        return Some(format!("`{target}`: no such file"));
    }
    if !anchor.is_empty() && normal.extension().is_some_and(|e| e == "md") {
        let text = std::fs::read_to_string(&normal).unwrap_or_default();
        if !anchors(&text).contains(anchor) {
            return Some(format!("`{target}`: no heading #{anchor}"));
        }
    }
    None
}

#[test]
fn markdown_links_resolve_inside_the_repository() {
    let root = root();
    let mut docs = Vec::new();
    documents(&root, &mut docs);
    assert!(
        docs.iter().any(|d| d.ends_with("README.md")) && docs.len() > 5,
        "found only {docs:?}"
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("readable document");
        for target in links(&text) {
            checked += 1;
            if let Some(p) = problem(&root, doc, &target) {
                problems.push(format!(
                    "{}: {p}",
                    doc.strip_prefix(&root).unwrap_or(doc).display()
                ));
            }
        }
    }
    assert!(checked > 20, "only {checked} links seen");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker sees a missing file, a missing heading and a link out of the repository.
#[test]
fn broken_links_are_reported() {
    let root = root();
    let readme = root.join("README.md");
    assert_eq!(problem(&root, &readme, "ARCHITECTURE.md"), None);
    assert_eq!(
        problem(&root, &readme, "ARCHITECTURE.md#runtimes-and-threads"),
        None
    );
    assert!(problem(&root, &readme, "docs/nope.md").is_some());
    assert!(problem(&root, &readme, "ARCHITECTURE.md#no-such-heading").is_some());
    assert!(problem(&root, &readme, "../shared/research/inbound-recipe.md").is_some());
    assert_eq!(
        links("see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n![d](e.svg) `../up.md`"),
        ["x.md", "../up.md", "e.svg"]
    );
    assert_eq!(slug(" Runtimes and threads"), "runtimes-and-threads");
    assert_eq!(slug(" The `ambit` CLI"), "the-ambit-cli");
}

/// The README stays short enough to read in five minutes; details live in docs/ (linked).
#[test]
fn the_readme_stays_under_twelve_thousand_characters() {
    let text = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let chars = text.chars().count();
    assert!(
        chars <= 12_000,
        "README.md has {chars} characters; move details to docs/ and link them"
    );
}
