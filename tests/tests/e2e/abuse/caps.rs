//! Connection caps under abuse: one pod holding connections on 15001 / 15006 hits its own cap (`limits.maxConnectionsPerPod`) while other pods keep working; idle connections fill the admin socket's cap (`limits.maxAdminConnections`) and are closed by its timeout.
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ambit_e2e::{eventually, testbed, PodSpec, Testbed, ECHO_PORT};

/// Connections one pod may hold on each capture listener in this test.
const POD_CAP: usize = 20;
/// Connections past the cap.
const OVER: usize = 12;
/// Admin connections at once in this test.
const ADMIN_CAP: usize = 8;
/// Echo port of the `many.py` server in the extra server pod.
const PORT: u16 = 9100;

/// `from` holds `POD_CAP + OVER` echo connections to `to:port`; exactly `OVER` are refused
/// (the many.py report, and `counter` of `pod` on `node` rises by `OVER`), while `other`'s
/// echo to `other_to:other_port` works; after the release `from` connects again.
fn hold_past_cap(
    tb: &Testbed,
    (node, pod, counter, listener): (&str, &str, &str, &str),
    from: &str,
    to: IpAddr,
    (other, other_to, other_port): (&str, IpAddr, u16),
) {
    let before = tb.proxy_counter(node, pod, counter);
    let metric = |tb: &Testbed| {
        tb.metrics(node).unwrap().sum(
            "ambit_connection_limit_refusals_total",
            &[("pod", &format!("default/{pod}")), ("listener", listener)],
        )
    };
    let metric0 = metric(tb);
    let n = POD_CAP + OVER;
    let mut held = tb.hold_many(from, to, ECHO_PORT, n, n).unwrap();
    let report = held.wait_for("open", Duration::from_secs(60)).unwrap();
    let refused = tb.proxy_counter(node, pod, counter) - before;
    eprintln!(
        "{listener}: {from} opened {n} connections to {to}:{ECHO_PORT} in {} s: {} open, {} \
         refused; {counter} rose by {refused}",
        report["seconds"], report["open"], report["failed"]
    );
    assert_eq!(report["open"], POD_CAP, "{report}");
    assert_eq!(report["failed"], OVER, "{report}");
    assert_eq!(refused, OVER as u64, "{counter}");
    assert_eq!(
        metric(tb) - metric0,
        OVER as f64,
        "refusal metric of {pod}/{listener}"
    );
    // Fairness: another pod behind the same agent is not affected.
    let msg = format!("{other} while {from} holds its cap");
    let r = tb.request(other, other_to, other_port, Some(&msg)).unwrap();
    assert_eq!(r.data(), msg, "{other}'s echo failed: {r:?}");
    held.release(Duration::from_secs(30)).unwrap();
    // The slots are free again once the agent sees the connections close.
    let again = eventually(Duration::from_secs(10), || {
        let msg = format!("{from} after the release");
        let r = tb.request(from, to, ECHO_PORT, Some(&msg)).ok()?;
        (r.data() == msg).then_some(())
    });
    assert!(again.is_some(), "{from} cannot connect after releasing");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn capture_ports_and_admin_socket_cap_connections() {
    let mut tb = testbed();
    let limits =
        format!("limits:\n  maxConnectionsPerPod: {POD_CAP}\n  maxAdminConnections: {ADMIN_CAP}\n");
    tb.add_pod(&PodSpec::new("client2", "node1", true, false))
        .unwrap();
    tb.add_pod(&PodSpec::new("server2", "node2", true, false))
        .unwrap();
    tb.restart_agent_with("node1", &limits).unwrap();
    tb.restart_agent_with("node2", &limits).unwrap();
    let _echo = tb.start_many_server("server2", PORT).unwrap();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let server2 = IpAddr::V4(tb.pod("server2").ipv4);

    // 15001: the client app opens too many connections; client2 (same agent) is served.
    hold_past_cap(
        &tb,
        ("node1", "client", "outbound_limited", "outbound"),
        "client",
        server,
        ("client2", server, ECHO_PORT),
    );
    // 15006: a plaintext client fills server's cap; server2 (same agent) is served.
    hold_past_cap(
        &tb,
        ("node2", "server", "inbound_limited", "inbound_plaintext"),
        "legacy",
        server,
        ("outsider", server2, PORT),
    );

    // The admin socket: ADMIN_CAP + OVER idle connections; OVER are closed at once.
    let sock = tb.admin_socket("node1");
    let refused0 = admin_refused(&tb);
    let t0 = Instant::now();
    let conns: Vec<UnixStream> = (0..ADMIN_CAP + OVER)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    let closed_at_once = eventually(Duration::from_secs(3), || {
        let n = closed(&conns);
        (n >= OVER).then_some(n)
    })
    .unwrap_or_else(|| closed(&conns));
    let at_once = t0.elapsed();
    // The held ones send nothing: the server's request-head timeout closes them.
    let all = eventually(Duration::from_secs(40), || {
        (closed(&conns) == conns.len()).then_some(t0.elapsed())
    });
    let refused = admin_refused(&tb) - refused0;
    eprintln!(
        "admin socket: {} idle connections, {closed_at_once} closed within {:.2} s, all closed \
         after {:?}; refused_over_limit rose by {refused}",
        conns.len(),
        at_once.as_secs_f64(),
        all.map(|d| d.as_secs_f64())
    );
    assert_eq!(closed_at_once, OVER, "connections past the admin cap");
    assert_eq!(refused, OVER as u64, "refused_over_limit");
    let all = all.expect("idle admin connections never closed by the server");
    assert!(
        all < Duration::from_secs(15),
        "idle admin connections held for {all:?}"
    );
}

/// How many of `conns` the server has closed (EOF or reset).
fn closed(conns: &[UnixStream]) -> usize {
    conns
        .iter()
        .filter(|c| {
            let mut b = [0u8; 64];
            let mut c: &UnixStream = c;
            !matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

fn admin_refused(tb: &Testbed) -> u64 {
    tb.status("node1").unwrap().0["admin"]["refused_over_limit"]
        .as_u64()
        .unwrap()
}
