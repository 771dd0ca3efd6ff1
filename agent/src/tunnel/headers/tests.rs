//! Tests of the CONNECT headers: what is sent, and that malformed ones are read as absent.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use super::*;

fn client() -> Baggage {
    Baggage {
        cluster: "Kubernetes".into(),
        namespace: "default".into(),
        pod: "client-7d9f".into(),
        service: "client".into(),
        version: "v1".into(),
    }
}

#[test]
fn baggage_names_the_source_workload_with_ztunnels_keys() {
    let v = client().value().unwrap();
    assert_eq!(
        v,
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.pod.name=client-7d9f,\
         service.name=client,service.version=v1"
    );
    let mut h = HeaderMap::new();
    h.insert(BAGGAGE, v);
    assert_eq!(Baggage::parse(&h), client());
}

#[test]
fn baggage_leaves_out_empty_and_unsafe_values() {
    let b = Baggage {
        cluster: String::new(),
        version: "a,b=c".into(),
        ..client()
    };
    assert_eq!(
        b.value().unwrap(),
        "k8s.namespace.name=default,k8s.pod.name=client-7d9f,service.name=client"
    );
    assert_eq!(Baggage::default().value(), None);
}

#[test]
fn baggage_from_ztunnel_reads_its_workload_keys_and_skips_junk() {
    let mut h = HeaderMap::new();
    h.append(
        BAGGAGE,
        HeaderValue::from_static("k8s.cluster.name=K1,k8s.deployment.name=web;prop=1,junk"),
    );
    h.append(
        BAGGAGE,
        HeaderValue::from_static("service.version=v2, other=x"),
    );
    let b = Baggage::parse(&h);
    assert_eq!(b.cluster, "K1");
    assert_eq!(b.pod, "web");
    assert_eq!(b.version, "v2");
    assert_eq!(b.namespace, "");
}

#[test]
fn traceparent_round_trips_and_is_random() {
    let a = TraceParent::random();
    let b = TraceParent::random();
    assert_ne!(a.trace_id, b.trace_id);
    let text = a.to_string();
    assert_eq!(text.len(), 55, "{text}");
    assert!(text.starts_with("00-") && text.ends_with("-00"), "{text}");
    assert_eq!(TraceParent::parse(&text), Some(a));
    assert_eq!(a.trace_id().len(), 32);
    let id = a.id().unwrap();
    assert_eq!(id.to_string(), a.trace_id());
    assert_eq!(id.hex(&mut [0; 32]), a.trace_id());
    let small = TraceId(NonZeroU128::new(0xab).unwrap());
    assert_eq!(small.hex(&mut [0; 32]), format!("{:032x}", 0xab));
    assert_eq!(
        serde_json::to_string(&id).unwrap(),
        format!("\"{}\"", a.trace_id())
    );
    let zero = TraceParent { trace_id: 0, ..a };
    assert_eq!(zero.id(), None, "an all-zero trace id is no trace");
}

#[test]
fn malformed_traceparents_are_absent() {
    for bad in [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ] {
        assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
    }
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let tp = TraceParent::parse(good).unwrap();
    assert_eq!(tp.to_string(), good);
    assert_eq!(tp.flags, 1);
}

#[test]
fn forwarded_quotes_the_client_and_names_the_service_host() {
    let h = ConnectHeaders::new(&client(), "10.1.0.5:40000".parse().unwrap(), None);
    assert_eq!(h.forwarded.unwrap(), "for=\"10.1.0.5:40000\"");
    let h = ConnectHeaders::new(
        &client(),
        "[fd00::5]:40000".parse().unwrap(),
        Some("echo.default.svc.cluster.local"),
    );
    assert_eq!(
        h.forwarded.unwrap(),
        "for=\"[fd00::5]:40000\";host=echo.default.svc.cluster.local"
    );
}

#[test]
fn applied_headers_are_read_back() {
    let h = ConnectHeaders::new(&client(), "10.1.0.5:40000".parse().unwrap(), None);
    let mut map = HeaderMap::new();
    h.apply(&mut map);
    let r = Received::new(map);
    assert_eq!(r.trace, h.traceparent);
    assert_eq!(r.baggage(), client());
    assert_eq!(r.forwarded(), Some("for=\"10.1.0.5:40000\""));
    let none = Received::new(HeaderMap::new());
    assert_eq!(
        (none.trace, none.baggage(), none.forwarded()),
        (None, Baggage::default(), None)
    );
}

#[test]
fn trace_ids_are_distinct_and_never_zero_across_threads() {
    let ids = |n| (0..n).map(|_| TraceParent::random()).collect::<Vec<_>>();
    let mut all = ids(10_000);
    let others = std::thread::spawn(move || ids(10_000)).join().unwrap();
    all.extend(others);
    assert!(all.iter().all(|t| t.trace_id != 0 && t.parent_id != 0));
    let mut traces: Vec<u128> = all.iter().map(|t| t.trace_id).collect();
    traces.sort_unstable();
    traces.dedup();
    assert_eq!(traces.len(), 20_000, "a trace id came twice");
    let mut parents: Vec<u64> = all.iter().map(|t| t.parent_id).collect();
    parents.sort_unstable();
    parents.dedup();
    assert_eq!(parents.len(), 20_000, "a parent id came twice");
}

/// Per-connection header costs, old way and new (not a check: prints nanoseconds per call).
#[test]
#[ignore = "measurement, not a check: prints numbers"]
fn measure_header_costs() {
    const N: u32 = 200_000;
    let time = |what: &str, f: &mut dyn FnMut()| {
        let start = std::time::Instant::now();
        for _ in 0..N {
            f();
        }
        println!(
            "{what}: {:.0} ns",
            start.elapsed().as_nanos() as f64 / f64::from(N)
        );
    };
    let rng = ring::rand::SystemRandom::new();
    time("24 bytes from the system RNG (old random)", &mut || {
        let mut b = [0u8; 24];
        ring::rand::SecureRandom::fill(&rng, &mut b).unwrap();
        std::hint::black_box(b);
    });
    time("TraceParent::random", &mut || {
        std::hint::black_box(TraceParent::random());
    });
    let mut map = HeaderMap::new();
    ConnectHeaders::new(
        &client(),
        "10.1.0.5:40000".parse().unwrap(),
        Some("echo.default.svc"),
    )
    .apply(&mut map);
    time(
        "inbound headers, parsed eagerly (old Received::parse)",
        &mut || {
            let m = map.clone();
            let r = Received::new(m);
            std::hint::black_box((r.trace, r.baggage(), r.forwarded().map(str::to_string)));
        },
    );
    time("inbound headers, trace only (Received::new)", &mut || {
        let m = map.clone();
        std::hint::black_box(Received::new(m));
    });
    let t = TraceParent::random();
    time(
        "traceparent value, old way (to_string + from_str)",
        &mut || {
            std::hint::black_box(HeaderValue::from_str(&t.to_string()).unwrap());
        },
    );
    let only_trace = ConnectHeaders {
        traceparent: Some(t),
        ..ConnectHeaders::default()
    };
    time("traceparent value, as applied", &mut || {
        let mut m = HeaderMap::new();
        only_trace.apply(&mut m);
        std::hint::black_box(m);
    });
    time("(an empty HeaderMap, made and dropped)", &mut || {
        std::hint::black_box(HeaderMap::new());
    });
    let src = "10.1.0.5:40000".parse().unwrap();
    let baggage = client().value();
    time("outbound ConnectHeaders + apply", &mut || {
        let h = ConnectHeaders::with_baggage(baggage.clone(), src, Some("echo.default.svc"));
        let mut m = HeaderMap::new();
        h.apply(&mut m);
        std::hint::black_box(m);
    });
}
