use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{from_multiple, from_str, to_string};

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    mark: u32,
    #[serde(default)]
    flag: bool,
    #[serde(default)]
    name: String,
    #[serde(default)]
    inner: Option<Inner>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Inner {
    mode: Mode,
}

#[derive(Debug, Deserialize, PartialEq)]
enum Mode {
    #[serde(rename = "STRICT")]
    Strict,
}

#[test]
fn integers_are_yaml_1_2_with_hex_and_0o_octal() {
    // `outboundMark: 0x539` in the agent config, as Istio writes the mark.
    assert_eq!(from_str::<Conf>("mark: 0x539").unwrap().mark, 1337);
    assert_eq!(from_str::<Conf>("mark: 0o17").unwrap().mark, 15);
    assert_eq!(from_str::<Conf>("mark: 1337").unwrap().mark, 1337);
    // YAML 1.1's leading-zero octal is not a number in 1.2: refused, not read as 17 or 15.
    let err = from_str::<Conf>("mark: 017").unwrap_err();
    assert_eq!((err.field.as_str(), err.line), ("mark", 1), "{err}");
    assert_eq!(from_str::<Value>("v: 017").unwrap(), json!({"v": "017"}));
}

#[test]
fn booleans_are_yaml_1_2_and_1_1_words_stay_strings() {
    assert!(from_str::<Conf>("flag: true").unwrap().flag);
    assert!(from_str::<Conf>("flag: True").unwrap().flag);
    for word in ["yes", "on", "y", "no", "off"] {
        let err = from_str::<Conf>(&format!("name: x\nflag: {word}")).unwrap_err();
        assert_eq!((err.field.as_str(), err.line), ("flag", 2), "{word}: {err}");
        // As Kubernetes' JSON has them: strings, in a label value as anywhere.
        assert_eq!(
            from_str::<Conf>(&format!("name: {word}")).unwrap().name,
            word
        );
        assert_eq!(
            from_str::<Value>(&format!("v: {word}")).unwrap(),
            json!({ "v": word })
        );
    }
}

#[test]
fn errors_name_field_line_and_column_without_repeating_them() {
    let err = from_str::<Conf>("name: a\ninner:\n  mode: STRICTER\n").unwrap_err();
    assert_eq!(err.field, "inner.mode");
    assert_eq!((err.line, err.column), (3, 9));
    assert!(err.message.contains("STRICTER"), "{err}");
    assert!(!err.message.contains("line"), "location kept apart: {err}");
    assert!(!err.message.contains('\n'), "one line: {err:?}");
    let err = from_str::<Conf>("name: a\nnmae: b\n").unwrap_err();
    assert!(err.message.contains("nmae"), "{err}");
    assert_eq!(err.line, 2, "{err}");
    let err = from_str::<Conf>("mark: \"1\t2\"\n").unwrap_err();
    assert_eq!(
        err.message, "invalid u32: found `\"1\\t2\"`",
        "control characters escaped"
    );
    let err = from_str::<Value>("kind: Pod\nmetadata: [\n").unwrap_err();
    assert!(err.line >= 2, "{err}");
}

#[test]
fn duplicate_keys_are_refused() {
    // A policy with `app: a` and `app: b` means neither: refuse it, do not pick one.
    let err = from_str::<BTreeMap<String, String>>("app: a\napp: b\n").unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    assert!(err.message.contains("duplicate"), "{err}");
    assert!(from_str::<BTreeMap<String, String>>("app: a\nteam: b\n").is_ok());
}

#[test]
fn anchors_aliases_merge_keys_and_standard_tags_work() {
    let v: Value = from_str("a: &x {p: 1}\nb: *x\nc:\n  <<: *x\n  q: 2\nd: !!str 123\n").unwrap();
    assert_eq!(
        v,
        json!({"a": {"p": 1}, "b": {"p": 1}, "c": {"p": 1, "q": 2}, "d": "123"})
    );
    // An integer key (`portLevelMtls: {80: ...}`) is the string "80" in JSON's view.
    let v: Value = from_str("80: {mode: STRICT}").unwrap();
    assert_eq!(v, json!({"80": {"mode": "STRICT"}}));
}

#[test]
fn alias_bombs_and_deep_nesting_are_refused_quickly() {
    let mut bomb = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x]\n");
    for l in 1..10 {
        let refs = vec![format!("*l{}", l - 1); 9].join(", ");
        bomb.push_str(&format!("l{l}: &l{l} [{refs}]\n"));
    }
    for (what, text) in [
        ("alias bomb", bomb),
        ("nested flow sequences", "[".repeat(100_000)),
        ("nested flow mappings", "{a: ".repeat(64_000)),
        (
            "nested block sequences",
            (0..2000)
                .map(|i| format!("{}- \n", " ".repeat(i)))
                .collect(),
        ),
    ] {
        let start = Instant::now();
        assert!(from_str::<Value>(&text).is_err(), "{what}");
        assert!(from_str::<serde::de::IgnoredAny>(&text).is_err(), "{what}");
        let took = start.elapsed();
        // Bounded work (the limits trip early), even in a debug build on a busy machine; a
        // libyaml-based parser spends tens of seconds on the 256 KB of nested flow mappings.
        assert!(took < Duration::from_secs(10), "{what}: {took:?}");
    }
    // The same shapes, small, parse: the limits are not in the way of real files.
    let v: Value = from_str("a: &x [1, 2]\nb: [*x, *x]\nc: [[[[1]]]]\n").unwrap();
    assert_eq!(v["b"], json!([[1, 2], [1, 2]]));
}

#[test]
fn documents_and_round_trip() {
    let docs: Vec<Value> = from_multiple("a: 1\n---\n# nothing\n---\nb: yes\n").unwrap();
    assert_eq!(docs, [json!({"a": 1}), json!({"b": "yes"})]);
    let text = to_string(&json!({"mark": 1337, "s": "yes", "t": "0x10", "n": "017"})).unwrap();
    let back: Value = from_str(&text).unwrap();
    assert_eq!(
        back,
        json!({"mark": 1337, "s": "yes", "t": "0x10", "n": "017"}),
        "{text}"
    );
}
