use std::collections::BTreeMap;

use super::*;

mod btf;

/// A mirrored C struct as Rust lays it out (built by `mirror_structs!`).
#[derive(Clone, Copy)]
pub(super) struct CStruct {
    pub(super) name: &'static str,
    pub(super) rust: &'static str,
    pub(super) size: usize,
    pub(super) fields: &'static [CField],
}

/// A field of a mirrored struct: offset and size in bytes, type as written in Rust.
#[derive(Clone, Copy)]
pub(super) struct CField {
    pub(super) name: &'static str,
    pub(super) offset: usize,
    pub(super) size: usize,
    pub(super) ty: &'static str,
}

/// A mirrored C enum: its name, and each enumerator's name and value (built by `mirror_enums!`).
#[derive(Clone, Copy)]
pub(super) struct CEnum {
    pub(super) name: &'static str,
    pub(super) values: &'static [(&'static str, i64)],
}

/// The BTF of the object the agent embeds, as aya-obj parses it for loading.
fn object_btf() -> btf::Btf {
    let obj = aya_obj::Object::parse(crate::redirect::BPF_OBJECT).expect("parse embedded object");
    let bytes = obj
        .btf
        .expect("the object has BTF (built with -g)")
        .to_bytes();
    btf::Btf::parse(&bytes).expect("decode the object's BTF")
}

/// The Rust spelling of a C member type: an array's element type, a fixed-width typedef (where
/// `__be*` keeps its byte order) or a mirrored struct.
fn rust_spelling(btf: &btf::Btf, mut id: u32) -> Result<String, String> {
    loop {
        match btf.get(id)? {
            btf::Type::Array { elem } => id = *elem,
            btf::Type::Qualifier { target } => id = *target,
            btf::Type::Typedef { name, target } => {
                let fixed = match name.as_str() {
                    "__u8" => "u8",
                    "__u16" => "u16",
                    "__u32" => "u32",
                    "__u64" => "u64",
                    "__be16" => "Be16",
                    "__be32" => "Be32",
                    _ => {
                        id = *target;
                        continue;
                    }
                };
                return Ok(fixed.to_string());
            }
            btf::Type::Struct { name, .. } => {
                return MIRROR_STRUCTS
                    .iter()
                    .find(|m| m.name == name)
                    .map(|m| m.rust.to_string())
                    .ok_or(format!("struct {name} has no Rust mirror"));
            }
            btf::Type::Int { name } => {
                return Err(format!(
                    "plain C type {name}: use __u8 ... __u64, __be16, __be32"
                ))
            }
            btf::Type::Other { kind } => return Err(format!("BTF kind {kind}: not a field type")),
            other => return Err(format!("not a fixed-width type: {other:?}")),
        }
    }
}

/// The element type of a Rust field type as written (`[Be32; 4]` -> `Be32`).
fn rust_element(ty: &str) -> &str {
    ty.trim_start_matches('[')
        .split(';')
        .next()
        .unwrap_or(ty)
        .trim()
}

/// Every way the mirrored structs differ from the object's BTF (empty when they agree).
fn struct_drift(btf: &btf::Btf, mirrors: &[CStruct]) -> Vec<String> {
    let mut drift = Vec::new();
    let c_structs: BTreeMap<&str, (u32, &[btf::Member])> = btf
        .types
        .iter()
        .filter_map(|t| match t {
            btf::Type::Struct {
                name,
                size,
                members,
            } if name.starts_with("amb_") => Some((name.as_str(), (*size, members.as_slice()))),
            _ => None,
        })
        .collect();
    for name in c_structs.keys() {
        if !mirrors.iter().any(|m| m.name == *name) {
            drift.push(format!("struct {name}: in the object, no Rust mirror"));
        }
    }
    for m in mirrors {
        let Some((size, members)) = c_structs.get(m.name) else {
            drift.push(format!(
                "struct {}: Rust mirror {}, not in the object's BTF (use it in a map or in amb_abi)",
                m.name, m.rust
            ));
            continue;
        };
        if *size as usize != m.size {
            drift.push(format!("struct {}: C size {size}, Rust {}", m.name, m.size));
        }
        let c_names: Vec<&str> = members.iter().map(|c| c.name.as_str()).collect();
        let rust_names: Vec<&str> = m.fields.iter().map(|f| f.name).collect();
        if c_names != rust_names {
            drift.push(format!(
                "struct {}: C members {c_names:?}, Rust fields {rust_names:?}",
                m.name
            ));
            continue;
        }
        let ends = members
            .iter()
            .skip(1)
            .map(|c| c.bit_offset as usize / 8)
            .chain([*size as usize]);
        for ((c, f), end) in members.iter().zip(m.fields).zip(ends) {
            let (offset, c_size) = (c.bit_offset as usize / 8, end - c.bit_offset as usize / 8);
            let c_type = rust_spelling(btf, c.type_id);
            if c.bitfield_bits != 0 || c.bit_offset % 8 != 0 {
                drift.push(format!("{}.{}: a bit field", m.name, c.name));
            } else if offset != f.offset {
                drift.push(format!(
                    "{}.{}: C offset {offset}, Rust {}",
                    m.name, c.name, f.offset
                ));
            } else if c_size != f.size {
                // The C size runs to the next member: a Rust field that is smaller leaves
                // padding the header does not name.
                drift.push(format!(
                    "{}.{}: C size (to the next member) {c_size}, Rust {}",
                    m.name, c.name, f.size
                ));
            } else if c_type.as_deref() != Ok(rust_element(f.ty)) {
                drift.push(format!(
                    "{}.{}: C type {c_type:?}, Rust {}",
                    m.name, c.name, f.ty
                ));
            }
        }
    }
    drift
}

/// Every way the mirrored constants differ from the object's BTF enums (empty when they agree).
fn enum_drift(
    btf: &btf::Btf,
    mirrors: &[CEnum],
    stat_names: &[&str],
    event_kind: fn(u8) -> EventKind,
) -> Vec<String> {
    let mut drift = Vec::new();
    let c_enums: BTreeMap<&str, &[(String, i64)]> = btf
        .types
        .iter()
        .filter_map(|t| match t {
            btf::Type::Enum { name, values } if name.starts_with("amb_") => {
                Some((name.as_str(), values.as_slice()))
            }
            _ => None,
        })
        .collect();
    let mut expect: BTreeMap<&str, Vec<(String, i64)>> = mirrors
        .iter()
        .map(|m| {
            let values = m.values.iter().map(|(n, v)| (n.to_string(), *v)).collect();
            (m.name, values)
        })
        .collect();
    let mut stats: Vec<(String, i64)> = stat_names
        .iter()
        .zip(0..)
        .map(|(n, i)| (format!("AMB_STAT_{}", n.to_uppercase()), i))
        .collect();
    stats.push(("AMB_STAT_COUNT".into(), stat_names.len() as i64));
    expect.insert("amb_stat", stats);
    let events = (0..=u8::MAX).filter_map(|v| match event_kind(v) {
        EventKind::Unknown(_) => None,
        kind => Some((
            format!("AMB_EVENT_{}", upper_snake(&format!("{kind:?}"))),
            v.into(),
        )),
    });
    expect.insert("amb_event_kind", events.collect());
    for name in c_enums.keys() {
        if !expect.contains_key(name) {
            drift.push(format!("enum {name}: in the object, no Rust mirror"));
        }
    }
    for (name, mut rust) in expect {
        let Some(c) = c_enums.get(name) else {
            drift.push(format!(
                "enum {name}: mirrored in Rust, not in the object's BTF (add it to amb_abi)"
            ));
            continue;
        };
        let mut c = c.to_vec();
        // Stats are compared in index order; the other enums as sets of (name, value).
        if name != "amb_stat" {
            c.sort();
            rust.sort();
        }
        if c != rust {
            let only = |a: &[(String, i64)], b: &[(String, i64)]| -> Vec<String> {
                a.iter()
                    .filter(|x| !b.contains(x))
                    .map(|(n, v)| format!("{n} = {v}"))
                    .collect()
            };
            drift.push(format!(
                "enum {name}: only in C {:?}, only in Rust {:?}{}",
                only(&c, &rust),
                only(&rust, &c),
                if name == "amb_stat" {
                    " (or in another order)"
                } else {
                    ""
                },
            ));
        }
    }
    drift
}

/// `MapFull` -> `MAP_FULL`.
fn upper_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

#[test]
fn rust_structs_match_the_objects_btf() {
    let btf = object_btf();
    let drift = struct_drift(&btf, MIRROR_STRUCTS);
    assert!(
        drift.is_empty(),
        "ambit_maps.h and maps.rs differ:\n{}",
        drift.join("\n")
    );
}

#[test]
fn rust_constants_match_the_objects_btf_enums() {
    let btf = object_btf();
    let drift = enum_drift(&btf, MIRROR_ENUMS, &STAT_NAMES, EventKind::from);
    assert!(
        drift.is_empty(),
        "ambit_maps.h and maps.rs differ:\n{}",
        drift.join("\n")
    );
}

#[test]
fn the_btf_check_sees_drift_on_either_side() {
    // The checks above pass only because they find nothing: show, in the same run, that they
    // find each kind of drift when it is there (on copies of the mirror tables).
    let btf = object_btf();
    let pod = MIRROR_STRUCTS
        .iter()
        .find(|m| m.name == "amb_pod")
        .expect("amb_pod is mirrored");
    let with = |fields: &'static [CField]| CStruct {
        name: pod.name,
        rust: pod.rust,
        size: pod.size,
        fields,
    };
    let others: Vec<CStruct> = MIRROR_STRUCTS
        .iter()
        .filter(|m| m.name != "amb_pod")
        .copied()
        .collect();
    let drifted = |pod: CStruct| {
        let mut mirrors = others.clone();
        mirrors.push(pod);
        struct_drift(&btf, &mirrors)
    };
    let field = |name, offset, size, ty| CField {
        name,
        offset,
        size,
        ty,
    };
    // A field the C struct lacks; one renamed; one moved; one in host order instead of network.
    let extra: &'static [CField] = Vec::leak(
        pod.fields
            .iter()
            .copied()
            .chain([field("extra", 200, 4, "u32")])
            .collect(),
    );
    let renamed: &'static [CField] = Vec::leak(
        pod.fields
            .iter()
            .map(|f| CField {
                name: if f.name == "flags" { "flag" } else { f.name },
                ..*f
            })
            .collect(),
    );
    let moved: &'static [CField] = Vec::leak(
        pod.fields
            .iter()
            .map(|f| CField {
                offset: if f.name == "flags" { 0 } else { f.offset },
                ..*f
            })
            .collect(),
    );
    let host_order: &'static [CField] = Vec::leak(
        pod.fields
            .iter()
            .map(|f| CField {
                ty: if f.name == "skip_ports" {
                    "[u16; 16]"
                } else {
                    f.ty
                },
                ..*f
            })
            .collect(),
    );
    let agree = "the mirror must agree with the object before drift can be shown";
    assert!(drifted(with(pod.fields)).is_empty(), "{agree}");
    for (what, fields) in [
        ("extra field", extra),
        ("renamed field", renamed),
        ("moved field", moved),
        ("byte order", host_order),
    ] {
        assert!(!drifted(with(fields)).is_empty(), "{what} not seen");
    }
    assert!(
        !struct_drift(&btf, &others).is_empty(),
        "a C struct without mirror not seen"
    );

    // Constants: a changed value, a missing enumerator, stats out of order, an unknown event.
    assert!(
        enum_drift(&btf, MIRROR_ENUMS, &STAT_NAMES, EventKind::from).is_empty(),
        "{agree}"
    );
    let flags = MIRROR_ENUMS
        .iter()
        .find(|e| e.name == "amb_pod_flag")
        .expect("amb_pod_flag is mirrored");
    let rest = || {
        MIRROR_ENUMS
            .iter()
            .filter(|e| e.name != "amb_pod_flag")
            .copied()
    };
    let flag_values: Vec<&'static [(&'static str, i64)]> = vec![
        Vec::leak(flags.values.iter().map(|(n, v)| (*n, v << 4)).collect()),
        &flags.values[1..],
    ];
    for values in flag_values {
        let mirrors: Vec<CEnum> = rest()
            .chain([CEnum {
                name: flags.name,
                values,
            }])
            .collect();
        assert!(!enum_drift(&btf, &mirrors, &STAT_NAMES, EventKind::from).is_empty());
    }
    let mut swapped = STAT_NAMES;
    swapped.swap(0, 1);
    assert!(!enum_drift(&btf, MIRROR_ENUMS, &swapped, EventKind::from).is_empty());
    assert!(!enum_drift(&btf, MIRROR_ENUMS, &STAT_NAMES[1..], EventKind::from).is_empty());
    let one_more = |v: u8| match v {
        7 => EventKind::MapFull,
        v => EventKind::from(v),
    };
    assert!(!enum_drift(&btf, MIRROR_ENUMS, &STAT_NAMES, one_more).is_empty());
}

#[test]
fn embedded_object_has_every_map_with_rust_sizes() {
    let obj = aya_obj::Object::parse(crate::redirect::BPF_OBJECT).unwrap();
    // name, key size, value size, and capacity where the agent relies on it
    let expect: &[(&str, usize, usize, Option<usize>)] = &[
        ("amb_pods", 8, size_of::<AmbPod>(), None),
        ("amb_pod_stats", 8, size_of::<AmbPodStats>(), None),
        ("amb_orig_dst", 8, size_of::<AmbOrigDst>(), None),
        (
            "amb_conns",
            size_of::<AmbConnKey>(),
            size_of::<AmbOrigDst>(),
            None,
        ),
        ("amb_listeners", size_of::<AmbListenerKey>(), 4, None),
        ("amb_bypass", size_of::<AmbBypassKey>(), 4, None),
        ("amb_stats", 4, 8, Some(STAT_NAMES.len())),
        (
            "amb_mesh_dsts",
            size_of::<AmbAddrKey>(),
            4,
            Some(MAX_MESH_DSTS),
        ),
        ("amb_agent_cgs", 8, 4, Some(MAX_AGENT_CGROUPS)),
    ];
    for (name, key, value, capacity) in expect {
        let map = obj
            .maps
            .get(*name)
            .unwrap_or_else(|| panic!("map {name} missing"));
        assert_eq!(map.key_size() as usize, *key, "{name} key size");
        assert_eq!(map.value_size() as usize, *value, "{name} value size");
        if let Some(capacity) = capacity {
            assert_eq!(map.max_entries() as usize, *capacity, "{name} capacity");
        }
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

#[test]
fn ports_in_map_structs_are_in_network_order() {
    // As the kernel writes them: sockops `bpf_htons(local_port)`, sk_lookup's `remote_port` as
    // is and `bpf_htons(local_port)`, connect4/6 compare skip ports with `user_port` as is.
    let conn = AmbConnKey::new(7, "127.0.0.1:4000".parse().unwrap());
    assert_eq!(conn.port.to_ne_bytes(), 4000u16.to_be_bytes());
    let bypass = AmbBypassKey::new(
        "10.0.0.1:40000".parse().unwrap(),
        "10.0.0.2:8080".parse().unwrap(),
    );
    assert_eq!(bypass.remote_port.to_ne_bytes(), 40000u16.to_be_bytes());
    assert_eq!(bypass.local_port.to_ne_bytes(), 8080u16.to_be_bytes());
    let pod = AmbPod::new(1, POD_F_CAPTURE_OUT, &[22, 2379], &[]);
    assert_eq!(pod.skip_ports[0].to_ne_bytes(), 22u16.to_be_bytes());
    assert_eq!(pod.skip_ports[1].to_ne_bytes(), 2379u16.to_be_bytes());
    assert_eq!(pod.skip_ports[2], 0, "unused slots stay zero");
}
