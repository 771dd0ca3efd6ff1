use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::AddressFamily;

use super::*;

const MARK: u32 = 0x53a;

fn want(table: u32) -> Want {
    Want {
        mark: MARK,
        table,
        proc_sys_net: Arc::new(PathBuf::from("/proc/sys/net")),
    }
}

/// A rule as the kernel dumps it (fib_nl_fill_rule): the table in the header (252, "compat",
/// when it does not fit a byte) and always as FRA_TABLE, the protocol, the priority when not 0,
/// and mark and mask when either is set.
fn dumped(action: RuleAction, table: u32, priority: u32, mark: Option<(u32, u32)>) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = AddressFamily::Inet;
    r.header.action = action;
    r.header.table = u8::try_from(table).unwrap_or(252);
    r.attributes.push(RuleAttribute::Table(table));
    r.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Boot));
    if priority != 0 {
        r.attributes.push(RuleAttribute::Priority(priority));
    }
    if let Some((mark, mask)) = mark {
        r.attributes.push(RuleAttribute::FwMark(mark));
        r.attributes.push(RuleAttribute::FwMask(mask));
    }
    r
}

/// `ip rule add fwmark 0x53a lookup TABLE pref 100`, as dumped.
fn ours(table: u32) -> RuleMessage {
    dumped(
        RuleAction::ToTable,
        table,
        RULE_PRIORITY,
        Some((MARK, u32::MAX)),
    )
}

/// The rules every new namespace starts with: local (0), main (32766), default (32767).
fn defaults() -> Vec<RuleMessage> {
    vec![
        dumped(RuleAction::ToTable, 255, 0, None),
        dumped(RuleAction::ToTable, 254, 32766, None),
        dumped(RuleAction::ToTable, 253, 32767, None),
    ]
}

#[test]
fn install_adds_the_rule_to_a_fresh_namespace() {
    let plan = plan(&defaults(), &want(100), Op::Install);
    assert_eq!(
        plan,
        RulePlan {
            add: true,
            delete: vec![]
        }
    );
}

#[test]
fn install_leaves_an_existing_rule_alone() {
    let mut rules = defaults();
    rules.insert(1, ours(100));
    assert_eq!(
        plan(&rules, &want(100), Op::Install),
        RulePlan {
            add: false,
            delete: vec![]
        }
    );
}

#[test]
fn install_keeps_one_of_duplicate_rules() {
    // `ip rule add` twice (an older installer, an operator) leaves two identical rules.
    let mut rules = defaults();
    rules.insert(1, ours(100));
    rules.insert(2, ours(100));
    rules.insert(3, ours(100));
    assert_eq!(
        plan(&rules, &want(100), Op::Install),
        RulePlan {
            add: false,
            delete: vec![2, 3]
        }
    );
}

#[test]
fn remove_deletes_every_copy_and_nothing_else() {
    let mut rules = defaults();
    rules.insert(1, ours(100));
    rules.push(ours(100));
    rules.push(ours(101));
    assert_eq!(
        plan(&rules, &want(100), Op::Remove),
        RulePlan {
            add: false,
            delete: vec![1, 4]
        }
    );
    assert_eq!(
        plan(&defaults(), &want(100), Op::Remove),
        RulePlan {
            add: false,
            delete: vec![]
        }
    );
}

#[test]
fn a_table_above_255_is_read_from_its_attribute() {
    let rules = [ours(1000)];
    assert!(is_ours(&rules[0], &want(1000)));
    assert!(
        !is_ours(&rules[0], &want(252)),
        "header says 252 (compat), the attribute 1000"
    );
}

#[test]
fn a_rule_without_mask_attribute_counts_as_full_mask() {
    let mut r = ours(100);
    r.attributes
        .retain(|a| !matches!(a, RuleAttribute::FwMask(_)));
    assert!(is_ours(&r, &want(100)));
}

#[test]
fn rules_that_match_differently_are_not_ours() {
    let w = want(100);
    let variants: Vec<(&str, RuleMessage)> = vec![
        (
            "other mark",
            dumped(RuleAction::ToTable, 100, 100, Some((0x539, u32::MAX))),
        ),
        (
            "partial mask",
            dumped(RuleAction::ToTable, 100, 100, Some((MARK, 0xfff))),
        ),
        ("other table", ours(101)),
        (
            "other priority",
            dumped(RuleAction::ToTable, 100, 99, Some((MARK, u32::MAX))),
        ),
        ("no mark", dumped(RuleAction::ToTable, 100, 100, None)),
        (
            "blackhole",
            dumped(RuleAction::Blackhole, 100, 100, Some((MARK, u32::MAX))),
        ),
        ("inverted", {
            let mut r = ours(100);
            r.header.flags = RuleFlags::Invert;
            r
        }),
        ("input interface", {
            let mut r = ours(100);
            r.attributes.push(RuleAttribute::Iifname("eth0".into()));
            r
        }),
        ("source prefix", {
            let mut r = ours(100);
            r.header.src_len = 24;
            r.attributes
                .push(RuleAttribute::Source("10.0.0.0".parse().unwrap()));
            r
        }),
        ("suppress prefix length", {
            let mut r = ours(100);
            r.attributes.push(RuleAttribute::SuppressPrefixLen(0));
            r
        }),
        ("tos", {
            let mut r = ours(100);
            r.header.tos = 0x10;
            r
        }),
    ];
    for (what, r) in &variants {
        assert!(!is_ours(r, &w), "{what}: {r:?}");
    }
    // Each variant is one change away from a rule that is ours.
    assert!(is_ours(&ours(100), &w));
    let mut all = defaults();
    all.extend(variants.into_iter().map(|(_, r)| r));
    assert!(plan(&all, &w, Op::Install).add, "none of them is ours");
}

#[test]
fn unset_suppress_values_and_protocol_do_not_make_a_rule_foreign() {
    let mut r = ours(100);
    r.attributes
        .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
    r.attributes.push(RuleAttribute::SuppressIfGroup(u32::MAX));
    r.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Static));
    assert!(is_ours(&r, &want(100)));
}
