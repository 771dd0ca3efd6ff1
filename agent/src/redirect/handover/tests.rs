//! Unit tests of the hand-over directory: several agents simulated in one process (each
//! `Handover` opens its own files, so their flocks exclude each other as processes' do).
#![allow(clippy::unwrap_used, reason = "unit tests")]
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{Check, Entry, Handover};

fn pin_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ambit-handover-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn entries(pin: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin.join("agents"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn current(h: &Handover) -> bool {
    h.with_current(|| ()).is_some()
}

#[test]
fn entry_names_round_trip() {
    for (g, p, r) in [(1, 42, false), (17, 1, true)] {
        let name = Entry::name_for(g, p, r);
        assert!(!name.contains('.'), "bpffs refuses dots: {name}");
        let e = Entry::parse(&name).unwrap();
        assert_eq!((e.generation, e.pid, e.ready), (g, p, r));
    }
    for bad in ["gen-3", "agent-x-1", "agent-1", "agent-1-2-done", "other"] {
        assert_eq!(Entry::parse(bad), None, "{bad}");
    }
}

#[test]
fn the_newest_agent_is_current_and_the_older_one_writes_nothing() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    assert_eq!(a.check().unwrap(), Check::Current);
    assert!(current(&a));
    let b = Handover::claim_as(&pin, 200).unwrap();
    assert_eq!(
        a.check().unwrap(),
        Check::Superseded {
            generation: 2,
            pid: 200
        }
    );
    assert!(!current(&a), "a superseded agent still writes shared state");
    assert!(current(&b));
    assert_eq!(b.check().unwrap(), Check::Current);
    let s = a.summary();
    assert_eq!((s.generation, s.newest, s.current), (1, 2, false));
    assert_eq!(entries(&pin), ["agent-1-100", "agent-2-200", "gen-2"]);
}

#[test]
fn a_current_agent_that_leaves_hands_the_node_back_to_the_older_one() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    let b = Handover::claim_as(&pin, 200).unwrap();
    assert!(b.mark_ready().unwrap());
    assert!(
        !a.mark_ready().unwrap(),
        "a superseded agent marked itself ready"
    );
    assert!(
        b.leave().unwrap(),
        "b was current with a running: it must wait"
    );
    assert!(!current(&b), "an agent that left still writes shared state");
    assert_eq!(b.check().unwrap(), Check::Left);
    // Nobody is ready yet: b's wait runs out.
    assert_eq!(b.wait_successor(Duration::from_millis(120)), None);
    assert_eq!(a.check().unwrap(), Check::Reclaimed { generation: 3 });
    assert!(current(&a));
    assert_eq!(
        b.wait_successor(Duration::from_millis(120)),
        None,
        "not ready yet"
    );
    assert!(a.mark_ready().unwrap());
    assert_eq!(b.wait_successor(Duration::from_secs(2)), Some(3));
    assert_eq!(a.check().unwrap(), Check::Current);
    assert_eq!(entries(&pin), ["agent-3-100-ready", "gen-3"]);
}

#[test]
fn an_older_agent_that_leaves_changes_nothing_for_the_current_one() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    let b = Handover::claim_as(&pin, 200).unwrap();
    assert!(
        !a.leave().unwrap(),
        "a was not current: nothing to wait for"
    );
    assert_eq!(b.check().unwrap(), Check::Current);
    assert!(current(&b));
    assert!(!b.leave().unwrap(), "the last agent has nobody to wait for");
    assert_eq!(b.wait_successor(Duration::from_secs(5)), None);
    assert_eq!(entries(&pin), ["gen-2"]);
    // The next agent continues the count.
    let c = Handover::claim_as(&pin, 300).unwrap();
    assert_eq!(c.summary().generation, 3);
}

#[test]
fn a_dead_agent_is_recognised_by_its_free_lock_and_the_older_one_takes_over() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    let b = Handover::claim_as(&pin, 200).unwrap();
    assert!(matches!(a.check().unwrap(), Check::Superseded { .. }));
    drop(b); // killed: its entry stays, its lock goes
    assert!(entries(&pin).contains(&"agent-2-200".to_string()));
    assert_eq!(a.check().unwrap(), Check::Reclaimed { generation: 3 });
    assert_eq!(entries(&pin), ["agent-3-100", "gen-3"]);
}

#[test]
fn the_newest_of_several_older_agents_takes_over() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    let b = Handover::claim_as(&pin, 200).unwrap();
    let c = Handover::claim_as(&pin, 300).unwrap();
    assert!(c.leave().unwrap());
    // a sees b (newer than a) still running: b takes the node, not a.
    assert_eq!(
        a.check().unwrap(),
        Check::Superseded {
            generation: 2,
            pid: 200
        }
    );
    assert_eq!(b.check().unwrap(), Check::Reclaimed { generation: 4 });
    assert_eq!(
        a.check().unwrap(),
        Check::Superseded {
            generation: 4,
            pid: 200
        }
    );
}

#[test]
fn a_newcomer_during_a_take_over_wins() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    let b = Handover::claim_as(&pin, 200).unwrap();
    assert!(b.leave().unwrap());
    assert_eq!(a.check().unwrap(), Check::Reclaimed { generation: 3 });
    let c = Handover::claim_as(&pin, 300).unwrap();
    // a's re-assertion, had it not finished, stops writing at once.
    assert!(!current(&a));
    assert!(!a.mark_ready().unwrap());
    assert!(current(&c));
}

#[test]
fn an_unreadable_directory_keeps_writing_and_a_left_agent_never_writes() {
    let pin = pin_dir();
    let a = Handover::claim_as(&pin, 100).unwrap();
    std::fs::remove_dir_all(pin.join("agents")).unwrap();
    assert!(
        current(&a),
        "cannot tell: the write is skipped (capture could lapse)"
    );
    assert!(a.check().is_err());
    std::fs::create_dir_all(pin.join("agents")).unwrap();
    let _ = a.leave();
    assert!(!current(&a), "an agent that left still writes");
}
