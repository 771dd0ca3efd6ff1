//! Delivery routing inside each enrolled pod: the fwmark rule, `local` route and sysctls that return the app's replies to the agent.
//!
//! The agent delivers an inbound connection from the client's own address (docs/inbound-delivery.md).
//! The app's replies to it leave on `eth0` towards the real client unless the pod's namespace routes
//! packets carrying the delivery mark to `lo`:
//! `tcp_fwmark_accept=1` (the app's accepted socket inherits the SYN's mark), `fwmark_reflect=1`
//! (so do the kernel's own RSTs and ACKs), `ip rule fwmark MARK lookup TABLE pref 100` and
//! `local default dev lo table TABLE`, for IPv4 and IPv6, and for IPv6 link-local clients
//! `local fe80::/10 dev IFACE table TABLE` on each of the pod's other interfaces.
//!
//! Invariants:
//! - Installed before the pod's listeners exist, so no connection is ever delivered without it; a
//!   pod whose routing cannot be installed is not enrolled (fail closed).
//! - Idempotent: the kernel keeps identical `ip rule`s side by side, so the rules are listed first
//!   and one is added only when none is there (with `NLM_F_EXCL`, so two agents racing during a
//!   hand-over cannot both add one); duplicates left by others are removed. The route is replaced,
//!   never added twice.
//! - Removed when the pod is unenrolled, but only once nothing can deliver into it any more: until
//!   every task holding the pod's context has ended, an open delivered connection still needs it.
//!   If the pod is enrolled again meanwhile, the new enrollment owns the routing.
//! - Never removed on drain or exit: the next agent takes the pods over as they are.
mod routes;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion};

use routes::{link_local_route, local_route};

use super::PodContext;
use crate::metrics::RoutingFailures;
use crate::sys::{self, Netns};

/// Preference of the fwmark rule (`ip rule ... pref 100`): before the `main` table (32766).
pub const RULE_PRIORITY: u32 = 100;

/// Errors setting up or tearing down a pod's delivery routing; each names the pod.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Entering the pod's namespace failed.
    #[error("delivery routing of pod {pod}: cannot enter its network namespace")]
    Netns {
        pod: String,
        #[source]
        source: sys::Error,
    },
    /// A sysctl could not be read or set inside the pod's namespace.
    #[error("delivery routing of pod {pod}: cannot set {} to 1 (a read-only /proc/sys in a container needs the host's mounted and `procSysNet`)", path.display())]
    Sysctl {
        pod: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The event loop for the netlink requests could not be started.
    #[error("delivery routing of pod {pod}: cannot start an event loop")]
    Runtime {
        pod: String,
        #[source]
        source: io::Error,
    },
    /// The netlink socket could not be opened inside the pod's namespace.
    #[error("delivery routing of pod {pod}: cannot open a netlink socket")]
    Socket {
        pod: String,
        #[source]
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("delivery routing of pod {pod}: {what} failed")]
    Netlink {
        pod: String,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// The pod's namespace has no loopback device to route to.
    #[error("delivery routing of pod {pod}: no loopback device `lo`")]
    NoLoopback { pod: String },
}

/// What an install or removal changed (for the log; nothing when it was already in place).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Rules added.
    pub rules_added: usize,
    /// Rules removed (duplicates on install, ours on removal).
    pub rules_removed: usize,
}

/// The delivery routing of this agent's configuration, and the removals waiting for open
/// connections of unenrolled pods to end.
pub struct DeliveryRoutes {
    want: Want,
    pending: Mutex<Vec<(Arc<PodContext>, Arc<Netns>)>>,
    failures: RoutingFailures,
}

impl DeliveryRoutes {
    /// Routing for packets marked `mark` through table `table`; sysctls are set through
    /// `proc_sys_net` (the host's `/proc/sys/net`, wherever it is mounted); failures are counted
    /// in `failures`.
    pub fn new(mark: u32, table: u32, proc_sys_net: PathBuf, failures: RoutingFailures) -> Self {
        Self {
            want: Want {
                mark,
                table,
                proc_sys_net: Arc::new(proc_sys_net),
            },
            pending: Mutex::new(Vec::new()),
            failures,
        }
    }

    /// Installs the routing in pod `pod`'s namespace (idempotent); failures are counted.
    pub fn install(&self, pod: &str, netns: &Netns) -> Result<Changes, Error> {
        let result = in_pod(pod, netns, self.want.clone(), Op::Install);
        match &result {
            Ok(c) if c.rules_removed > 0 => {
                tracing::info!(
                    pod,
                    rules.removed = c.rules_removed,
                    "duplicate delivery rules removed"
                )
            }
            Ok(c) => tracing::debug!(
                pod,
                rules.added = c.rules_added,
                "delivery routing in place"
            ),
            Err(_) => self.failures.count("install"),
        }
        result
    }

    /// Removes the routing of an unenrolled pod now, or once nothing uses its context any more
    /// (see [`DeliveryRoutes::sweep`]).
    pub fn release(&self, ctx: Arc<PodContext>, netns: Arc<Netns>) {
        lock(&self.pending).push((ctx, netns));
    }

    /// Removes the routing of released pods that nothing uses any more; drops, without removing,
    /// those whose namespace (netns cookie) `enrolled` says is enrolled again.
    pub fn sweep(&self, enrolled: impl Fn(u64) -> bool) {
        let mut due = Vec::new();
        lock(&self.pending).retain(|(ctx, netns)| {
            if enrolled(ctx.netns_cookie) {
                return false;
            }
            // The manager dropped its reference; accept loops and connection tasks hold the
            // others. The last one gone, no connection can be delivered into the pod.
            if Arc::strong_count(ctx) == 1 {
                due.push((ctx.workload.key(), netns.clone()));
                return false;
            }
            true
        });
        for (pod, netns) in due {
            match self.remove(&pod, &netns) {
                Ok(c) => tracing::info!(
                    pod,
                    rules.removed = c.rules_removed,
                    "delivery routing removed"
                ),
                Err(e) => {
                    tracing::warn!(pod, error = %crate::error::error_chain(&e), "cannot remove delivery routing")
                }
            }
        }
    }

    /// Removes the rules and routes (the sysctls stay: without marked packets they do nothing,
    /// and the pod may have set them itself); failures are counted.
    pub fn remove(&self, pod: &str, netns: &Netns) -> Result<Changes, Error> {
        let result = in_pod(pod, netns, self.want.clone(), Op::Remove);
        if result.is_err() {
            self.failures.count("remove");
        }
        result
    }
}

/// The rule and route this agent wants, and where the sysctls are.
#[derive(Debug, Clone)]
struct Want {
    mark: u32,
    table: u32,
    proc_sys_net: Arc<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Install,
    Remove,
}

/// What to do with a family's existing rules.
#[derive(Debug, PartialEq, Eq)]
struct RulePlan {
    /// Whether our rule must be added.
    add: bool,
    /// Indexes (into the listed rules) of the rules to delete.
    delete: Vec<usize>,
}

/// Plans the rule changes: on install, keep one of ours (add it if there is none) and delete
/// the duplicates; on removal, delete every one of ours.
fn plan(rules: &[RuleMessage], want: &Want, op: Op) -> RulePlan {
    let ours: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| is_ours(r, want))
        .map(|(i, _)| i)
        .collect();
    match op {
        Op::Install => RulePlan {
            add: ours.is_empty(),
            delete: ours.into_iter().skip(1).collect(),
        },
        Op::Remove => RulePlan {
            add: false,
            delete: ours,
        },
    }
}

/// Whether `rule` is exactly `fwmark MARK lookup TABLE pref 100`: the same selectors as ours and
/// no others (a rule that also matches on source, interface, ... is someone else's).
fn is_ours(rule: &RuleMessage, want: &Want) -> bool {
    let h = &rule.header;
    if h.action != RuleAction::ToTable
        || h.src_len != 0
        || h.dst_len != 0
        || h.tos != 0
        || h.flags.contains(RuleFlags::Invert)
    {
        return false;
    }
    let (mut table, mut priority, mut mark, mut mask) = (u32::from(h.table), 0, None, None);
    for a in &rule.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            // Who added it changes nothing about what it matches.
            RuleAttribute::Protocol(_) => {}
            // The kernel reports "not set" for these as all ones.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => return false,
        }
    }
    table == want.table
        && priority == RULE_PRIORITY
        && mark == Some(want.mark)
        && mask.is_none_or(|m| m == u32::MAX)
}

/// Applies `op` on a fresh thread inside the pod's namespace, with a netlink connection
/// opened there.
fn in_pod(pod: &str, netns: &Netns, want: Want, op: Op) -> Result<Changes, Error> {
    let owned = pod.to_string();
    netns
        .run(move || -> Result<Changes, Error> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|source| Error::Runtime {
                    pod: owned.clone(),
                    source,
                })?;
            rt.block_on(apply(&owned, want, op))
        })
        .map_err(|source| Error::Netns {
            pod: pod.to_string(),
            source,
        })?
}

/// Applies `op` for both families. Runs on a thread inside the pod's namespace, so the netlink
/// socket is the pod's, and so are the sysctls: a net sysctl file resolves against the
/// namespace of the thread that opens it, whichever mount of `/proc/sys/net` it is opened
/// through (checked by tests/tests/e2e/delivery_routing.rs on the pod and the node).
async fn apply(pod: &str, want: Want, op: Op) -> Result<Changes, Error> {
    // Without IPv6 in the kernel (ipv6.disable=1) or on the pod's `lo` (disable_ipv6, as in
    // IPv4-only pods) there is no IPv6 to deliver, and the kernel refuses an IPv6 route via lo.
    let ipv6 = std::fs::read_to_string(want.proc_sys_net.join("ipv6/conf/lo/disable_ipv6"))
        .is_ok_and(|v| v.trim() == "0");
    if op == Op::Install {
        let mut sysctls = vec!["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect"];
        if ipv6 {
            sysctls.push("ipv6/fwmark_reflect");
        }
        for name in sysctls {
            enable(pod, &want.proc_sys_net.join(name))?;
        }
    }
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Socket {
        pod: pod.to_string(),
        source,
    })?;
    let conn = tokio::spawn(conn);
    let result = async {
        let lo = loopback(pod, &handle).await?;
        let mut changes = Changes::default();
        let families: &[IpVersion] = if ipv6 {
            &[IpVersion::V4, IpVersion::V6]
        } else {
            &[IpVersion::V4]
        };
        for family in families {
            let c = apply_family(pod, &handle, &want, op, family, lo).await?;
            changes.rules_added += c.rules_added;
            changes.rules_removed += c.rules_removed;
        }
        Ok(changes)
    }
    .await;
    conn.abort();
    result
}

async fn apply_family(
    pod: &str,
    handle: &Handle,
    want: &Want,
    op: Op,
    family: &IpVersion,
    lo: u32,
) -> Result<Changes, Error> {
    let name = match family {
        IpVersion::V4 => "IPv4",
        IpVersion::V6 => "IPv6",
    };
    let err = |what: String| {
        move |source| Error::Netlink {
            pod: pod.to_string(),
            what,
            source,
        }
    };
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(family.clone())
        .execute()
        .try_collect()
        .await
        .map_err(err(format!("listing {name} rules")))?;
    let plan = plan(&rules, want, op);
    let mut changes = Changes::default();
    if op == Op::Install {
        // The routes before the rule: a rule pointing at an empty table would send marked
        // packets on to `main`, which is what it is there to prevent.
        set_routes(pod, handle, want.table, family, lo, op).await?;
    }
    if plan.add {
        let add = handle
            .rule()
            .add()
            .fw_mark(want.mark)
            .table_id(want.table)
            .priority(RULE_PRIORITY);
        let added = match family {
            IpVersion::V4 => add.v4().action(RuleAction::ToTable).execute().await,
            IpVersion::V6 => add.v6().action(RuleAction::ToTable).execute().await,
        };
        match added {
            Ok(()) => changes.rules_added += 1,
            // Another agent (a hand-over) added the same rule since we listed them.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(err(format!(
                    "adding {name} rule fwmark {:#x} lookup {} pref {RULE_PRIORITY}",
                    want.mark, want.table
                ))(e))
            }
        }
    }
    for i in plan.delete {
        match handle.rule().del(rules[i].clone()).execute().await {
            Ok(()) => changes.rules_removed += 1,
            // Removed by someone else since we listed them.
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => return Err(err(format!("deleting {name} rule fwmark {:#x}", want.mark))(e)),
        }
    }
    if op == Op::Remove {
        set_routes(pod, handle, want.table, family, lo, op).await?;
    }
    Ok(changes)
}

/// Replaces (install) or deletes (remove; one already gone is fine) the `local` routes of
/// `family` in `table`: the default route via `lo`, and for IPv6 the link-local route of each
/// other interface.
async fn set_routes(
    pod: &str,
    handle: &Handle,
    table: u32,
    family: &IpVersion,
    lo: u32,
    op: Op,
) -> Result<(), Error> {
    // Deleting matches any protocol and scope, as `ip route del` does: a route may have been
    // added by an older installer.
    let (protocol, scope) = match op {
        Op::Install => (RouteProtocol::Static, RouteScope::Host),
        Op::Remove => (RouteProtocol::Unspec, RouteScope::NoWhere),
    };
    let mut routes = vec![(
        local_route(family, table, lo, protocol, scope),
        "local default dev lo".to_string(),
    )];
    if matches!(family, IpVersion::V6) {
        for device in other_links(pod, handle, lo).await? {
            routes.push((
                link_local_route(table, device, protocol, scope),
                format!("local fe80::/10 dev #{device}"),
            ));
        }
    }
    for (route, what) in routes {
        let done = match op {
            Op::Install => handle.route().add(route).replace().execute().await,
            Op::Remove => match handle.route().del(route).execute().await {
                Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
                r => r,
            },
        };
        done.map_err(|source| Error::Netlink {
            pod: pod.to_string(),
            what: format!(
                "{} route {what} table {table}",
                if op == Op::Install {
                    "replacing"
                } else {
                    "deleting"
                }
            ),
            source,
        })?;
    }
    Ok(())
}

/// The indexes of the namespace's links other than `lo` (link-local clients arrive on them).
async fn other_links(pod: &str, handle: &Handle, lo: u32) -> Result<Vec<u32>, Error> {
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| Error::Netlink {
            pod: pod.to_string(),
            what: "listing links".to_string(),
            source,
        })?;
    Ok(links
        .iter()
        .map(|l| l.header.index)
        .filter(|i| *i != lo)
        .collect())
}

/// The index of the namespace's `lo`.
async fn loopback(pod: &str, handle: &Handle) -> Result<u32, Error> {
    let links: Vec<_> = handle
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_collect()
        .await
        .map_err(|source| Error::Netlink {
            pod: pod.to_string(),
            what: "looking up link lo".to_string(),
            source,
        })?;
    links
        .first()
        .map(|l| l.header.index)
        .ok_or_else(|| Error::NoLoopback {
            pod: pod.to_string(),
        })
}

/// Sets the sysctl at `path` to 1 unless it is already: a container whose `/proc/sys` is
/// read-only can still serve pods that something else prepared.
fn enable(pod: &str, path: &Path) -> Result<(), Error> {
    let err = |source| Error::Sysctl {
        pod: pod.to_string(),
        path: path.to_path_buf(),
        source,
    };
    if std::fs::read_to_string(path).map_err(err)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(err)
}

/// The errno of a netlink error answer.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
