use std::collections::HashMap;
use std::net::IpAddr;

use super::*;
use crate::redirect::maps::{MESH_DST_POD, MESH_DST_VIP};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> AmbAddrKey {
    AmbAddrKey::destination(ip(s))
}

#[test]
fn plan_writes_new_and_changed_entries_and_removes_stale_ones_but_not_the_wildcard() {
    let installed: HashMap<_, _> = [
        (key("10.1.0.2"), MESH_DST_POD),
        (key("10.1.0.3"), MESH_DST_POD),
        (key("10.96.0.1"), MESH_DST_POD),
        (AmbAddrKey::WILDCARD, MESH_DST_ALL),
    ]
    .into();
    let desired: HashMap<_, _> = [
        (key("10.1.0.2"), MESH_DST_POD),
        (key("10.96.0.1"), MESH_DST_VIP),
        (key("fd00::5"), MESH_DST_POD),
    ]
    .into();
    let p = plan(&installed, &desired);
    assert_eq!(
        p.put,
        vec![
            (key("10.96.0.1"), MESH_DST_VIP),
            (key("fd00::5"), MESH_DST_POD)
        ]
    );
    assert_eq!(p.remove, vec![key("10.1.0.3")]);
    // Idempotent: nothing to do once in line.
    assert_eq!(plan(&desired, &desired), Plan::default());
}

/// A map with a kernel-like capacity limit that can refuse writes of one key.
#[derive(Default)]
struct FakeMap {
    entries: HashMap<AmbAddrKey, u32>,
    max: usize,
    refuse: Option<AmbAddrKey>,
}

impl DstMap for FakeMap {
    fn put(&mut self, k: AmbAddrKey, v: u32) -> Result<(), MapError> {
        if self.refuse == Some(k)
            || (!self.entries.contains_key(&k) && self.entries.len() >= self.max)
        {
            return Err(MapError::KeyNotFound);
        }
        self.entries.insert(k, v);
        Ok(())
    }
    fn delete(&mut self, k: &AmbAddrKey) -> Result<(), MapError> {
        self.entries
            .remove(k)
            .map(|_| ())
            .ok_or(MapError::KeyNotFound)
    }
}

fn fake(max: usize) -> MeshDsts<FakeMap> {
    MeshDsts::with(
        FakeMap {
            max,
            ..FakeMap::default()
        },
        HashMap::new(),
        max,
    )
}

fn desired(addrs: &[&str]) -> HashMap<AmbAddrKey, u32> {
    addrs.iter().map(|a| (key(a), MESH_DST_POD)).collect()
}

#[test]
fn sync_follows_the_inventory_and_is_idempotent() {
    let mut m = fake(16);
    let r = m.sync(&desired(&["10.1.0.2", "10.2.0.2"]));
    assert_eq!(
        (r.put, r.removed, r.entries, r.failed, r.wildcard),
        (2, 0, 2, 0, false)
    );
    assert_eq!(m.map.entries, desired(&["10.1.0.2", "10.2.0.2"]));
    // The same snapshot again: no writes.
    assert_eq!(m.sync(&desired(&["10.1.0.2", "10.2.0.2"])).put, 0);
    // A pod leaves, another joins.
    let r = m.sync(&desired(&["10.2.0.2", "10.2.0.3"]));
    assert_eq!((r.put, r.removed, r.entries), (1, 1, 2));
    assert_eq!(m.map.entries, desired(&["10.2.0.2", "10.2.0.3"]));
}

#[test]
fn sync_removes_what_a_previous_agent_left_in_the_pinned_map() {
    let left: HashMap<_, _> = desired(&["10.9.9.9"]);
    let mut m = MeshDsts::with(
        FakeMap {
            entries: left.clone(),
            max: 8,
            refuse: None,
        },
        left,
        8,
    );
    m.sync(&desired(&["10.1.0.2"]));
    assert_eq!(m.map.entries, desired(&["10.1.0.2"]));
}

#[test]
fn a_list_that_does_not_fit_captures_everything_until_it_fits_again() {
    // Room for 3 entries: 2 destinations and the wildcard.
    let mut m = fake(3);
    let r = m.sync(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert!(r.wildcard, "{r:?}");
    assert_eq!((r.entries, r.failed), (2, 1));
    assert_eq!(
        m.map.entries.get(&AmbAddrKey::WILDCARD),
        Some(&MESH_DST_ALL)
    );
    // It fits again: the wildcard goes, the list is complete.
    let r = m.sync(&desired(&["10.0.0.1", "10.0.0.3"]));
    assert!(!r.wildcard, "{r:?}");
    assert_eq!(m.map.entries, desired(&["10.0.0.1", "10.0.0.3"]));
}

#[test]
fn a_failed_write_sets_the_wildcard_instead_of_leaving_a_gap() {
    let mut m = fake(8);
    m.sync(&desired(&["10.0.0.1"]));
    m.map.refuse = Some(key("10.0.0.2"));
    let r = m.sync(&desired(&["10.0.0.1", "10.0.0.2"]));
    assert_eq!((r.failed, r.wildcard), (1, true), "{r:?}");
    assert!(m.map.entries.contains_key(&AmbAddrKey::WILDCARD));
    // Transient failure: the next sync completes the list and clears the wildcard.
    m.map.refuse = None;
    let r = m.sync(&desired(&["10.0.0.1", "10.0.0.2"]));
    assert_eq!((r.put, r.failed, r.wildcard), (1, 0, false), "{r:?}");
    assert_eq!(m.map.entries, desired(&["10.0.0.1", "10.0.0.2"]));
    // If even the wildcard cannot be written, the sync says so.
    m.map.refuse = Some(AmbAddrKey::WILDCARD);
    m.map.max = 2;
    let r = m.sync(&desired(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert_eq!((r.failed, r.wildcard), (1, false), "{r:?}");
}

#[test]
fn applied_changes_touch_only_their_entries_and_missing_ones_wait_for_room() {
    // Room for 3 entries: 2 destinations and the wildcard.
    let mut m = fake(3);
    let r = m.sync(&desired(&["10.0.0.1"]));
    assert_eq!((r.put, r.wildcard), (1, false));
    let r = m.apply(&[
        (key("10.0.0.2"), Some(MESH_DST_POD)),
        (key("10.0.0.3"), Some(MESH_DST_VIP)),
    ]);
    assert_eq!((r.put, r.failed, r.entries, r.wildcard), (1, 1, 2, true));
    // Unchanged and unknown removals write nothing.
    let r = m.apply(&[
        (key("10.0.0.1"), Some(MESH_DST_POD)),
        (key("10.9.9.9"), None),
    ]);
    assert_eq!((r.put, r.removed, r.wildcard), (0, 0, true));
    // A removal makes room: the missing destination is written and the wildcard goes.
    let r = m.apply(&[(key("10.0.0.1"), None)]);
    assert_eq!((r.put, r.removed, r.wildcard), (1, 1, false), "{r:?}");
    let mut expected = desired(&["10.0.0.2"]);
    expected.insert(key("10.0.0.3"), MESH_DST_VIP);
    assert_eq!(m.map.entries, expected);
    // A changed destination is rewritten; a missing one that goes away is forgotten.
    let r = m.apply(&[(key("10.0.0.2"), Some(MESH_DST_POD | MESH_DST_VIP))]);
    assert_eq!((r.put, r.wildcard), (1, false));
    m.apply(&[(key("10.0.0.4"), Some(MESH_DST_POD))]);
    let r = m.apply(&[(key("10.0.0.4"), None)]);
    assert!(!r.wildcard, "nothing is missing any more: {r:?}");
    assert!(!m.map.entries.contains_key(&AmbAddrKey::WILDCARD));
}
