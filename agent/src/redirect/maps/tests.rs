use std::collections::BTreeMap;
use std::mem::offset_of;

use super::*;

/// `struct.field -> (offset, size)` and `struct -> size` as the C compiler laid them out.
fn c_layout() -> (BTreeMap<String, (usize, usize)>, BTreeMap<String, usize>) {
    let text = include_str!(concat!(env!("OUT_DIR"), "/layout.txt"));
    let (mut fields, mut sizes) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [name, "size", n] => {
                sizes.insert(name.to_string(), n.parse().unwrap());
            }
            [name, off, size] if name.contains('.') => {
                fields.insert(
                    name.to_string(),
                    (off.parse().unwrap(), size.parse().unwrap()),
                );
            }
            [name, v] => {
                sizes.insert(name.to_string(), v.parse().unwrap());
            }
            _ => panic!("unexpected layout line {line:?}"),
        }
    }
    (fields, sizes)
}

macro_rules! field {
    ($ty:ty, $f:ident) => {{
        let probe = <$ty>::default();
        (offset_of!($ty, $f), std::mem::size_of_val(&probe.$f))
    }};
}

#[test]
fn rust_mirror_matches_c_header() {
    let (fields, sizes) = c_layout();
    let rust_sizes: &[(&str, usize)] = &[
        ("amb_cidr", size_of::<AmbCidr>()),
        ("amb_pod", size_of::<AmbPod>()),
        ("amb_pod_stats", size_of::<AmbPodStats>()),
        ("amb_orig_dst", size_of::<AmbOrigDst>()),
        ("amb_conn_key", size_of::<AmbConnKey>()),
        ("amb_addr_key", size_of::<AmbAddrKey>()),
        ("amb_listener_key", size_of::<AmbListenerKey>()),
        ("amb_bypass_key", size_of::<AmbBypassKey>()),
        ("amb_event", size_of::<AmbEvent>()),
        ("AMB_STAT_MAX", STAT_NAMES.len()),
        ("AMB_MAX_SKIP_PORTS", MAX_SKIP_PORTS),
        ("AMB_MAX_SKIP_CIDRS", MAX_SKIP_CIDRS),
        ("AMB_MAX_MESH_DSTS", MAX_MESH_DSTS),
        ("AMB_MAX_AGENT_CGROUPS", MAX_AGENT_CGROUPS),
        ("AMB_POD_F_MESH_ONLY", POD_F_MESH_ONLY as usize),
        ("AMB_MESH_DST_POD", MESH_DST_POD as usize),
        ("AMB_MESH_DST_VIP", MESH_DST_VIP as usize),
        ("AMB_MESH_DST_ALL", MESH_DST_ALL as usize),
    ];
    for (name, size) in rust_sizes {
        assert_eq!(sizes.get(*name), Some(size), "{name}: C vs Rust");
    }
    let rust_fields: Vec<(&str, (usize, usize))> = vec![
        ("amb_cidr.addr", field!(AmbCidr, addr)),
        ("amb_cidr.family", field!(AmbCidr, family)),
        ("amb_cidr.prefix_len", field!(AmbCidr, prefix_len)),
        ("amb_pod.id", field!(AmbPod, id)),
        ("amb_pod.flags", field!(AmbPod, flags)),
        ("amb_pod.skip_ports", field!(AmbPod, skip_ports)),
        ("amb_pod.skip_cidrs", field!(AmbPod, skip_cidrs)),
        ("amb_pod_stats.redirected", field!(AmbPodStats, redirected)),
        ("amb_pod_stats.exempted", field!(AmbPodStats, exempted)),
        ("amb_pod_stats.steered", field!(AmbPodStats, steered)),
        ("amb_pod_stats.bypassed", field!(AmbPodStats, bypassed)),
        ("amb_pod_stats.dropped", field!(AmbPodStats, dropped)),
        (
            "amb_pod_stats.bind_denied",
            field!(AmbPodStats, bind_denied),
        ),
        (
            "amb_pod_stats.passthrough",
            field!(AmbPodStats, passthrough),
        ),
        (
            "amb_pod_stats.forged_mark",
            field!(AmbPodStats, forged_mark),
        ),
        ("amb_orig_dst.addr", field!(AmbOrigDst, addr)),
        ("amb_orig_dst.port", field!(AmbOrigDst, port)),
        ("amb_orig_dst.family", field!(AmbOrigDst, family)),
        (
            "amb_conn_key.netns_cookie",
            field!(AmbConnKey, netns_cookie),
        ),
        ("amb_conn_key.addr", field!(AmbConnKey, addr)),
        ("amb_conn_key.port", field!(AmbConnKey, port)),
        ("amb_conn_key.family", field!(AmbConnKey, family)),
        ("amb_addr_key.addr", field!(AmbAddrKey, addr)),
        ("amb_addr_key.family", field!(AmbAddrKey, family)),
        (
            "amb_listener_key.netns_cookie",
            field!(AmbListenerKey, netns_cookie),
        ),
        ("amb_listener_key.family", field!(AmbListenerKey, family)),
        ("amb_bypass_key.remote", field!(AmbBypassKey, remote)),
        ("amb_bypass_key.local", field!(AmbBypassKey, local)),
        (
            "amb_bypass_key.remote_port",
            field!(AmbBypassKey, remote_port),
        ),
        (
            "amb_bypass_key.local_port",
            field!(AmbBypassKey, local_port),
        ),
        ("amb_bypass_key.family", field!(AmbBypassKey, family)),
        ("amb_event.netns_cookie", field!(AmbEvent, netns_cookie)),
        ("amb_event.addr", field!(AmbEvent, addr)),
        ("amb_event.port", field!(AmbEvent, port)),
        ("amb_event.family", field!(AmbEvent, family)),
        ("amb_event.kind", field!(AmbEvent, kind)),
        ("amb_event.pod_id", field!(AmbEvent, pod_id)),
    ];
    for (name, layout) in &rust_fields {
        assert_eq!(
            fields.get(*name),
            Some(layout),
            "{name}: (offset, size) C vs Rust"
        );
    }
    assert_eq!(
        fields.len(),
        rust_fields.len(),
        "every C field has a Rust check"
    );
}

#[test]
fn embedded_object_has_every_map_with_rust_sizes() {
    let obj = aya_obj::Object::parse(crate::redirect::BPF_OBJECT).unwrap();
    let expect: &[(&str, usize, usize)] = &[
        ("amb_pods", 8, size_of::<AmbPod>()),
        ("amb_pod_stats", 8, size_of::<AmbPodStats>()),
        ("amb_orig_dst", 8, size_of::<AmbOrigDst>()),
        (
            "amb_conns",
            size_of::<AmbConnKey>(),
            size_of::<AmbOrigDst>(),
        ),
        ("amb_listeners", size_of::<AmbListenerKey>(), 4),
        ("amb_bypass", size_of::<AmbBypassKey>(), 4),
        ("amb_stats", 4, 8),
        ("amb_mesh_dsts", size_of::<AmbAddrKey>(), 4),
        ("amb_agent_cgs", 8, 4),
    ];
    for (name, key, value) in expect {
        let map = obj
            .maps
            .get(*name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        assert_eq!(map.key_size() as usize, *key, "{name} key size");
        assert_eq!(map.value_size() as usize, *value, "{name} value size");
    }
    for prog in crate::redirect::PROGRAMS {
        assert!(
            obj.programs.contains_key(*prog),
            "program {prog} missing from the object"
        );
    }
}

#[test]
fn addresses_round_trip_through_map_words() {
    for ip in ["10.1.2.3", "fd00:1::2", "::1"] {
        let ip: IpAddr = ip.parse().unwrap();
        let (fam, w) = addr_words(ip);
        assert_eq!(words_addr(fam, w), Some(ip));
    }
    assert_eq!(words_addr(99, [0; 4]), None);
}

#[test]
fn conn_key_folds_v4_mapped_clients() {
    let a = AmbConnKey::new(7, "[::ffff:127.0.0.1]:4000".parse().unwrap());
    let b = AmbConnKey::new(7, "127.0.0.1:4000".parse().unwrap());
    assert_eq!(a, b);
}

#[test]
fn mesh_dst_keys_match_what_connect4_and_connect6_look_up() {
    // connect4: family AF_INET, user_ip4 (network order) in word 0, the rest zero.
    let k = AmbAddrKey::destination("10.1.2.3".parse().unwrap());
    assert_eq!(k.family, AF_INET);
    assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    assert_eq!(&k.addr[1..], &[0, 0, 0]);
    assert_eq!(k._pad, [0; 3]);
    // connect6 folds a v4-mapped destination to the same IPv4 key.
    let mapped = AmbAddrKey::destination("::ffff:10.1.2.3".parse().unwrap());
    assert_eq!(mapped, k);
    // A real IPv6 address keeps all four words, in network order.
    let v6 = AmbAddrKey::destination("fd00:1::2".parse().unwrap());
    assert_eq!(v6.family, AF_INET6);
    assert_eq!(v6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 1]);
    assert_eq!(v6.addr[3].to_ne_bytes(), [0, 0, 0, 2]);
    assert_eq!(v6.ip(), Some("fd00:1::2".parse().unwrap()));
    // The wildcard is the all-zero key and names no address.
    assert_eq!(AmbAddrKey::WILDCARD, AmbAddrKey::default());
    assert_eq!(AmbAddrKey::WILDCARD.ip(), None);
    assert_ne!(
        AmbAddrKey::destination("0.0.0.0".parse().unwrap()),
        AmbAddrKey::WILDCARD
    );
}

#[test]
fn event_decodes_and_rejects_short_records() {
    assert!(AmbEvent::from_bytes(&[0u8; 31]).is_none());
    let mut b = [0u8; 32];
    b[0] = 9;
    b[8..12].copy_from_slice(&[10, 0, 1, 2]);
    b[24..26].copy_from_slice(&80u16.to_be_bytes());
    b[26] = AF_INET;
    b[27] = 3;
    let e = AmbEvent::from_bytes(&b).unwrap();
    assert_eq!(e.netns_cookie, 9);
    assert_eq!(EventKind::from(e.kind), EventKind::NoListener);
    assert_eq!(e.dst(), Some("10.0.1.2:80".parse().unwrap()));
}
