//! docs/configuration.md against the code: every config field listed, no stale row, defaults and examples true.
//!
//! The field lists come from the config types themselves ([`fields::fields`] drives their
//! derived `Deserialize`), so a field added to or removed from any config struct fails
//! [`agent_config_document_lists_every_field`] or [`ca_config_document_lists_every_field`]
//! until the document says so. No list of fields is kept here.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value as Json;

use super::fields::{fields, Field, Kind};
use super::{Config, IstiodSource, KubeSource};
use crate::ca::config::{CaConfig, RawConfig};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

fn doc() -> String {
    std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("reading {DOC}: {e}"))
}

/// One table row of the document.
#[derive(Debug, Clone)]
struct Row {
    path: String,
    ty: String,
    default: String,
    example: String,
}

/// The table after `<!-- config-table: NAME -->`: rows `| `path` | type | default | example | meaning |`.
fn table(doc: &str, name: &str) -> Vec<Row> {
    let marker = format!("<!-- config-table: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("{DOC} has no `{marker}`"));
    let mut rows = Vec::new();
    for line in doc[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.trim_start().starts_with('|'))
        .skip(2)
    {
        let cells = cells(line);
        assert_eq!(cells.len(), 5, "{name} table row needs 5 cells: {line}");
        let path = code(&cells[0]).unwrap_or_else(|| panic!("first cell not `code`: {line}"));
        rows.push(Row {
            path: path.to_string(),
            ty: cells[1].clone(),
            default: cells[2].clone(),
            example: cells[3].clone(),
        });
    }
    assert!(!rows.is_empty(), "{name} table is empty");
    rows
}

/// Cells of a markdown table line, split on `|` not escaped as `\|`.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim().trim_start_matches('|');
    let line = line.strip_suffix('|').unwrap_or(line);
    let mut out = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("one cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().expect("one cell").push(c),
        }
    }
    out.iter().map(|c| c.trim().to_string()).collect()
}

/// The first `code span` of a cell, when the cell starts with one.
fn code(cell: &str) -> Option<&str> {
    let rest = cell.strip_prefix('`')?;
    rest.split_once('`').map(|(c, _)| c)
}

/// The YAML block after `<!-- config-example: NAME -->`.
fn example(doc: &str, name: &str) -> String {
    let marker = format!("<!-- config-example: {name} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("{DOC} has no `{marker}`"));
    let rest = &doc[start + marker.len()..];
    let body = rest
        .split_once("```yaml\n")
        .and_then(|(_, b)| b.split_once("```"))
        .unwrap_or_else(|| panic!("no ```yaml block after `{marker}`"));
    body.0.to_string()
}

/// The rows a type's fields call for: every leaf, enum and opaque value, and every optional
/// section (a required section is only a prefix). `inside` names the type behind an opaque
/// path (an untagged enum's mapping form), whose fields follow under that path.
fn wanted(fields: Vec<Field>, inside: &[(&str, Vec<Field>)]) -> BTreeMap<String, Field> {
    let mut out = BTreeMap::new();
    for f in fields {
        if f.kind == Kind::Opaque {
            let Some((_, more)) = inside.iter().find(|(p, _)| *p == f.path) else {
                panic!(
                    "cannot see inside `{}` (untagged enum or map): name the type behind it in \
                     this test's `inside` list",
                    f.path
                );
            };
            for m in more {
                let path = format!("{}.{}", f.path, m.path);
                out.insert(path.clone(), Field { path, ..m.clone() });
            }
        }
        if f.kind != Kind::Struct || f.optional {
            out.insert(f.path.clone(), f);
        }
    }
    out
}

/// What differs between the fields and the rows, as lines for a failure message.
fn differences(wanted: &BTreeMap<String, Field>, rows: &[Row]) -> Vec<String> {
    let documented: BTreeSet<&str> = rows.iter().map(|r| r.path.as_str()).collect();
    let mut out = Vec::new();
    for path in wanted.keys() {
        if !documented.contains(path.as_str()) {
            out.push(format!("field `{path}` is not in the document"));
        }
    }
    for path in &documented {
        if !wanted.contains_key(*path) {
            out.push(format!("row `{path}` names no field of the config"));
        }
    }
    let mut seen = BTreeSet::new();
    for r in rows {
        if !seen.insert(&r.path) {
            out.push(format!("row `{}` appears twice", r.path));
        }
        if let Some(Field {
            kind: Kind::Enum(variants),
            ..
        }) = wanted.get(&r.path)
        {
            for v in variants {
                if !r.ty.contains(&format!("`{v}`")) {
                    out.push(format!("row `{}`: type does not list `{v}`", r.path));
                }
            }
        }
    }
    out
}

fn agent_wanted() -> BTreeMap<String, Field> {
    // `inventory` is a path or one of two mappings: their fields side by side, one `kind` row
    // listing both kinds.
    let mut inventory = fields::<KubeSource>();
    for f in fields::<IstiodSource>() {
        match (inventory.iter_mut().find(|k| k.path == f.path), &f.kind) {
            (
                Some(Field {
                    kind: Kind::Enum(kinds),
                    ..
                }),
                Kind::Enum(more),
            ) => kinds.extend(more.iter().copied()),
            (Some(_), _) => panic!("inventory.{} differs between the sources", f.path),
            (None, _) => inventory.push(f),
        }
    }
    wanted(fields::<Config>(), &[("inventory", inventory)])
}

fn ca_wanted() -> BTreeMap<String, Field> {
    wanted(
        fields::<RawConfig>(),
        &[("inventory", fields::<KubeSource>())],
    )
}

#[test]
fn agent_config_document_lists_every_field() {
    let diff = differences(&agent_wanted(), &table(&doc(), "agent"));
    assert!(diff.is_empty(), "{DOC}, agent table:\n{}", diff.join("\n"));
}

#[test]
fn ca_config_document_lists_every_field() {
    let diff = differences(&ca_wanted(), &table(&doc(), "ca"));
    assert!(diff.is_empty(), "{DOC}, ca table:\n{}", diff.join("\n"));
}

/// The comparison itself sees a missing field, a stale row and an undocumented enum value.
#[test]
fn differences_name_missing_stale_and_enum_rows() {
    let mut want = agent_wanted();
    let rows = table(&doc(), "agent");
    assert!(differences(&want, &rows).is_empty());
    want.insert(
        "limits.newCap".into(),
        Field {
            path: "limits.newCap".into(),
            kind: Kind::Leaf,
            optional: false,
        },
    );
    want.remove("drainDeadlineMs");
    if let Some(f) = want.get_mut("logFormat") {
        f.kind = Kind::Enum(vec!["text", "json", "logfmt"]);
    }
    assert_eq!(
        differences(&want, &rows),
        [
            "field `limits.newCap` is not in the document",
            "row `drainDeadlineMs` names no field of the config",
            "row `logFormat`: type does not list `logfmt`",
        ]
    );
}

/// Every key path of a YAML mapping (lists and scalars end a path).
fn yaml_paths(v: &Json, prefix: &str, out: &mut BTreeSet<String>) {
    if let Json::Object(m) = v {
        for (k, v) in m {
            let path = if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            };
            yaml_paths(v, &path, out);
            out.insert(path);
        }
    }
}

/// Examples parse with the real parser, and between them show every documented field.
fn check_examples(name: &str, which: &[&str], parse: impl Fn(&str) -> Result<(), String>) {
    let doc = doc();
    let rows = table(&doc, name);
    let mut shown = BTreeSet::new();
    for which in which {
        let text = example(&doc, &format!("{name}-{which}"));
        parse(&text).unwrap_or_else(|e| panic!("{name}-{which} example: {e}"));
        let v: Json = crate::yaml::from_str(&text).expect("example is YAML");
        yaml_paths(&v, "", &mut shown);
    }
    let documented: BTreeSet<String> = rows.iter().map(|r| r.path.clone()).collect();
    // A required section (`limits:`) has no row of its own, only its fields.
    let section = |p: &str| documented.iter().any(|d| d.starts_with(&format!("{p}.")));
    let unknown: Vec<_> = shown
        .iter()
        .filter(|p| !documented.contains(*p) && !section(p))
        .collect();
    assert!(
        unknown.is_empty(),
        "{name} examples use undocumented keys {unknown:?}"
    );
    let unshown: Vec<_> = documented.difference(&shown).collect();
    assert!(unshown.is_empty(), "{name} examples never show {unshown:?}");
}

#[test]
fn agent_examples_parse_and_show_every_field() {
    check_examples("agent", &["minimal", "full", "istiod"], |t| {
        Config::parse_with_node(Path::new("example.yaml"), t, None)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

#[test]
fn ca_examples_parse_and_show_every_field() {
    check_examples("ca", &["minimal", "full"], |t| {
        CaConfig::parse(Path::new("example.yaml"), t)
            .map(drop)
            .map_err(|e| e.to_string())
    });
}

/// The value at a dotted path.
fn at<'a>(v: &'a Json, path: &str) -> Option<&'a Json> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// The minimal example with every optional section added, holding only its required fields
/// (their examples), parsed by `parse` into its serialized form; each documented default
/// (a `code` value, or `unset`) must be what the parser filled in.
fn check_defaults(name: &str, wanted: &BTreeMap<String, Field>, parse: impl Fn(&str) -> Json) {
    let doc = doc();
    let rows = table(&doc, name);
    let mut base: Json =
        crate::yaml::from_str(&example(&doc, &format!("{name}-minimal"))).expect("minimal YAML");
    let sections: Vec<&Field> = wanted
        .values()
        .filter(|f| f.kind == Kind::Struct && f.optional)
        .collect();
    for s in &sections {
        let mut section = serde_json::Map::new();
        for r in rows.iter().filter(|r| {
            r.path
                .strip_prefix(&format!("{}.", s.path))
                .is_some_and(|rest| !rest.contains('.'))
                && r.default.starts_with("required")
        }) {
            let value = code(&r.example)
                .unwrap_or_else(|| panic!("row `{}`: example is not `code`", r.path));
            let key = r.path.rsplit('.').next().expect("a key");
            section.insert(
                key.into(),
                crate::yaml::from_str(value).expect("example is YAML"),
            );
        }
        let Json::Object(m) = &mut base else {
            panic!("{name}-minimal is not a mapping")
        };
        assert!(
            !s.path.contains('.'),
            "nested optional section `{}`",
            s.path
        );
        m.entry(s.path.as_str()).or_insert(Json::Object(section));
    }
    let text = crate::yaml::to_string(&base).expect("YAML");
    let actual = parse(&text);
    // Fields under an untagged enum's mapping form have no default to compare here.
    let opaque: Vec<&str> = wanted
        .values()
        .filter(|f| f.kind == Kind::Opaque)
        .map(|f| f.path.as_str())
        .collect();
    let mut checked = 0;
    for r in &rows {
        let section = wanted.get(&r.path).is_some_and(|f| f.kind == Kind::Struct);
        if section
            || r.default.starts_with("required")
            || opaque.iter().any(|p| r.path.starts_with(&format!("{p}.")))
        {
            continue;
        }
        let want: Json = if r.default.starts_with("unset") {
            Json::Null
        } else {
            let value = code(&r.default).unwrap_or_else(|| {
                panic!(
                    "row `{}`: default must be `value`, `unset ...` or `required ...`",
                    r.path
                )
            });
            crate::yaml::from_str(value).expect("default is YAML")
        };
        let got = at(&actual, &r.path).unwrap_or(&Json::Null);
        assert_eq!(got, &want, "{name}: default of `{}`", r.path);
        checked += 1;
    }
    assert!(checked > 10, "{name}: only {checked} defaults checked");
}

#[test]
fn agent_defaults_are_documented_truly() {
    check_defaults("agent", &agent_wanted(), |t| {
        let cfg = Config::parse_with_node(Path::new("defaults.yaml"), t, None)
            .unwrap_or_else(|e| panic!("{e}\n{t}"));
        serde_json::to_value(cfg).expect("config serializes")
    });
}

#[test]
fn ca_defaults_are_documented_truly() {
    check_defaults("ca", &ca_wanted(), |t| {
        let raw: RawConfig = crate::yaml::from_str(t).unwrap_or_else(|e| panic!("{e}\n{t}"));
        serde_json::to_value(raw).expect("config serializes")
    });
}
