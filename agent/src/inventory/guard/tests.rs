//! The guard's rules: what is suspicious, and when held content applies.
use std::path::Path;
use std::time::{Duration, Instant};

use super::{suspicion, Guard, GuardSettings, Suspicion, Verdict};
use crate::inventory::file::parse;
use crate::inventory::Snapshot;

/// `pods` as (name, node, enrolled), plus a STRICT policy.
fn inv(pods: &[(&str, &str, bool)]) -> Snapshot {
    let mut text = String::from(
        "kind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    for (name, node, enrolled) in pods {
        let mode = if *enrolled { "enabled" } else { "disabled" };
        text.push_str(&format!(
            "---\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{ambit.io/mode: {mode}}}}}\n\
             spec: {{nodeName: {node}}}\n"
        ));
    }
    parse(Path::new("t.yaml"), &text).unwrap()
}

fn on(node: &str) -> GuardSettings {
    GuardSettings::new(Some(node.into()))
}

const FOUR: [(&str, &str, bool); 4] = [
    ("a", "n1", true),
    ("b", "n1", true),
    ("c", "n1", true),
    ("d", "n1", true),
];

#[test]
fn an_empty_document_or_a_list_without_pods_is_suspicious() {
    let current = inv(&FOUR);
    assert_eq!(
        suspicion(&on("n1"), &current, &Snapshot::default()),
        Some(Suspicion::Empty { pods: 4 })
    );
    // Policies only, no pods (a relist of pods that came back empty).
    assert_eq!(
        suspicion(&on("n1"), &current, &inv(&[])),
        Some(Suspicion::Empty { pods: 4 })
    );
    // Nothing in force, nothing new: nothing to protect.
    assert_eq!(
        suspicion(&on("n1"), &Snapshot::default(), &Snapshot::default()),
        None
    );
    // Policies in force and no pods: an empty document still is suspicious (it drops STRICT).
    assert_eq!(
        suspicion(&on("n1"), &inv(&[]), &Snapshot::default()),
        Some(Suspicion::Empty { pods: 0 })
    );
}

#[test]
fn unenrolling_more_than_the_share_of_the_nodes_pods_is_suspicious() {
    let current = inv(&FOUR);
    // Two of four (50 %) is not more than 50 %.
    assert_eq!(suspicion(&on("n1"), &current, &inv(&FOUR[..2])), None);
    // Three of four dropped.
    assert_eq!(
        suspicion(&on("n1"), &current, &inv(&FOUR[..1])),
        Some(Suspicion::Unenrolls {
            lost: 3,
            of: 4,
            max_percent: 50
        })
    );
    // Unenrolled by label counts as lost, as does a move to another node.
    let changed = inv(&[
        ("a", "n1", false),
        ("b", "n2", true),
        ("c", "n1", false),
        ("d", "n1", true),
    ]);
    assert!(matches!(
        suspicion(&on("n1"), &current, &changed),
        Some(Suspicion::Unenrolls { lost: 3, of: 4, .. })
    ));
    // Another node's pods do not count for this node, but all count for the CA (`None`).
    let other = inv(&[("a", "n1", true), ("x", "n2", true)]);
    assert_eq!(
        suspicion(&on("n1"), &other, &inv(&[("a", "n1", true)])),
        None
    );
    assert!(suspicion(&GuardSettings::new(None), &inv(&FOUR), &inv(&FOUR[..1])).is_some());
    // The share is configurable: 0 holds any unenrollment, 100 only an emptied inventory.
    let strict = GuardSettings {
        max_unenroll_percent: 0,
        ..on("n1")
    };
    assert!(suspicion(&strict, &current, &inv(&FOUR[..3])).is_some());
    let off = GuardSettings {
        max_unenroll_percent: 100,
        ..on("n1")
    };
    assert_eq!(suspicion(&off, &current, &inv(&FOUR[..1])), None);
    // Adding pods never is.
    assert_eq!(suspicion(&on("n1"), &inv(&FOUR[..1]), &current), None);
}

#[test]
fn held_content_applies_only_when_seen_again_after_the_settle_time() {
    let settle = Duration::from_millis(500);
    let mut g: Guard<String> = Guard::new(GuardSettings { settle, ..on("n1") });
    let current = inv(&FOUR);
    let empty = Snapshot::default();
    let t0 = Instant::now();
    let v = g.check(&current, &empty, &String::new(), t0);
    assert!(matches!(v, Verdict::Hold { new: true, .. }), "{v:?}");
    assert_eq!(g.deadline(), Some(t0 + settle));
    // Seen again before the settle time: still held, not new.
    let v = g.check(&current, &empty, &String::new(), t0 + settle / 2);
    assert!(matches!(v, Verdict::Hold { new: false, .. }), "{v:?}");
    // Other suspicious content meanwhile starts over.
    let partial = inv(&FOUR[..1]);
    let v = g.check(
        &current,
        &partial,
        &"partial".to_string(),
        t0 + settle * 3 / 4,
    );
    assert!(matches!(v, Verdict::Hold { new: true, .. }), "{v:?}");
    let v = g.check(&current, &partial, &"partial".to_string(), t0 + settle);
    assert!(matches!(v, Verdict::Hold { new: false, .. }), "{v:?}");
    // The same content once the settle time has passed since it was first seen: applies.
    let v = g.check(
        &current,
        &partial,
        &"partial".to_string(),
        t0 + settle * 7 / 4,
    );
    assert!(
        matches!(v, Verdict::Confirmed { ref why, .. } if matches!(why, Suspicion::Unenrolls { .. })),
        "{v:?}"
    );
    assert_eq!(g.deadline(), None);
}

#[test]
fn content_that_is_not_suspicious_applies_at_once_and_ends_a_hold() {
    let mut g: Guard<String> = Guard::new(on("n1"));
    let current = inv(&FOUR);
    let t0 = Instant::now();
    assert!(matches!(
        g.check(&current, &Snapshot::default(), &String::new(), t0),
        Verdict::Hold { .. }
    ));
    // The writer finished: the full file is not suspicious.
    let full = inv(&FOUR);
    assert_eq!(
        g.check(&current, &full, &"full".to_string(), t0),
        Verdict::Apply
    );
    assert_eq!(g.deadline(), None);
    // A later empty file starts a new hold (the old sighting does not count).
    assert!(matches!(
        g.check(
            &current,
            &Snapshot::default(),
            &String::new(),
            t0 + Duration::from_secs(60)
        ),
        Verdict::Hold { new: true, .. }
    ));
    // Content that could not be read again in between starts over too.
    g.reset();
    assert!(matches!(
        g.check(
            &current,
            &Snapshot::default(),
            &String::new(),
            t0 + Duration::from_secs(120)
        ),
        Verdict::Hold { new: true, .. }
    ));
}
