//! One load run per call: iperf3, sockperf ping-pong, wrk; each with the agents' CPU and RSS.
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::bed::{Bed, Route, IPERF_PORT, NGINX_PORT, SOCKPERF_PORT, TINY_FILE};
use super::procs::run_sampled;

/// How often RSS is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Attempts when iperf3's server is still busy with the previous test.
const IPERF_ATTEMPTS: u32 = 3;

/// What the agents used during a run: CPU seconds and peak RSS (KiB), node1 then node2.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) cpu_secs: [f64; 2],
    pub(crate) rss_max_kib: [u64; 2],
}

/// An iperf3 run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Iperf {
    pub(crate) gbit_per_sec: f64,
    pub(crate) bytes: f64,
    pub(crate) usage: Usage,
}

/// A sockperf ping-pong run: full round trips, µs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PingPong {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
}

/// A wrk run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wrk {
    pub(crate) requests_per_sec: f64,
    pub(crate) requests: f64,
    /// Latency percentiles 50, 90, 99 in ms.
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    /// Socket errors plus non-2xx answers.
    pub(crate) errors: u64,
    pub(crate) usage: Usage,
}

/// Runs `argv` in `route`'s client pod, bounded by `secs` + 30 s, and measures the agents.
fn run(
    bed: &Bed,
    route: &Route,
    name: &str,
    argv: &[String],
    secs: u32,
) -> Result<(String, Usage)> {
    let agents = bed.agents();
    let before = [agents[0].1.cpu_secs()?, agents[1].1.cpu_secs()?];
    let mut rss = [0u64; 2];
    let mut sample = || {
        for (i, (_, a)) in agents.iter().enumerate() {
            if let Ok(kib) = a.rss_kib() {
                rss[i] = rss[i].max(kib);
            }
        }
    };
    sample();
    let timeout = Duration::from_secs(u64::from(secs) + 30);
    let ran = run_sampled(
        bed.pod(route.client),
        &bed.dir,
        name,
        argv,
        timeout,
        SAMPLE_EVERY,
        &mut sample,
    )?;
    sample();
    let after = [agents[0].1.cpu_secs()?, agents[1].1.cpu_secs()?];
    if !ran.success && ran.stdout.trim().is_empty() {
        bail!(
            "`{}` from {} failed: {}",
            argv.join(" "),
            route.client,
            ran.stderr.trim()
        );
    }
    let usage = Usage {
        cpu_secs: [after[0] - before[0], after[1] - before[1]],
        rss_max_kib: rss,
    };
    Ok((ran.stdout, usage))
}

fn server_ip(bed: &Bed, route: &Route) -> String {
    bed.pod(route.server).ipv4.to_string()
}

/// `iperf3 -c SERVER -P streams -t secs --json` from the client pod.
pub(crate) fn iperf(bed: &Bed, route: &Route, streams: u32, secs: u32, tag: &str) -> Result<Iperf> {
    let argv: Vec<String> = [
        "iperf3",
        "-c",
        &server_ip(bed, route),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "--json",
    ]
    .map(str::to_string)
    .to_vec();
    let mut last = String::new();
    for attempt in 1..=IPERF_ATTEMPTS {
        let (out, usage) = run(bed, route, &format!("iperf-{tag}-{attempt}"), &argv, secs)?;
        match parse_iperf(&out) {
            Ok((gbit_per_sec, bytes)) => {
                return Ok(Iperf {
                    gbit_per_sec,
                    bytes,
                    usage,
                })
            }
            Err(e) => last = format!("{e:#}"),
        }
        // "the server is busy running a test": the previous test's teardown is still going.
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!(
        "iperf3 from {} to {} failed: {last}",
        route.client,
        route.server
    )
}

/// Gbit/s and bytes received, from iperf3's JSON.
fn parse_iperf(out: &str) -> Result<(f64, f64)> {
    let v: Value = serde_json::from_str(out).context("iperf3 printed no JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().context("no end.sum_received.bytes")?;
    Ok((bps / 1e9, bytes))
}

/// `sockperf pp --tcp -m 64 --full-rtt -t secs` from the client pod.
pub(crate) fn ping_pong(bed: &Bed, route: &Route, secs: u32, tag: &str) -> Result<PingPong> {
    let argv: Vec<String> = [
        "sockperf",
        "pp",
        "--tcp",
        "-i",
        &server_ip(bed, route),
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-m",
        "64",
        "--full-rtt",
        "-t",
        &secs.to_string(),
    ]
    .map(str::to_string)
    .to_vec();
    let (out, _) = run(bed, route, &format!("sockperf-{tag}"), &argv, secs)?;
    parse_sockperf(&out).with_context(|| format!("sockperf output:\n{out}"))
}

/// p50, p99 and p99.9 from sockperf's `---> percentile X = V` lines (µs).
fn parse_sockperf(out: &str) -> Result<PingPong> {
    let pct = |want: &str| -> Result<f64> {
        out.lines()
            .find_map(|l| {
                let rest = l.split("percentile").nth(1)?;
                let (p, v) = rest.split_once('=')?;
                (p.trim() == want).then(|| v.trim().parse::<f64>().ok())?
            })
            .with_context(|| format!("no percentile {want}"))
    };
    Ok(PingPong {
        p50: pct("50.000")?,
        p99: pct("99.000")?,
        p999: pct("99.900")?,
    })
}

/// `wrk -H 'Connection: close'` for `secs` against nginx's tiny file, from the client pod.
pub(crate) fn wrk(bed: &Bed, route: &Route, conns: u32, secs: u32, tag: &str) -> Result<Wrk> {
    let url = format!("http://{}:{NGINX_PORT}{TINY_FILE}", server_ip(bed, route));
    let argv: Vec<String> = [
        "wrk",
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "5s",
        "-H",
        "Connection: close",
        &url,
    ]
    .map(str::to_string)
    .to_vec();
    let (out, usage) = run(bed, route, &format!("wrk-{tag}"), &argv, secs)?;
    let mut w = parse_wrk(&out).with_context(|| format!("wrk output:\n{out}"))?;
    w.usage = usage;
    Ok(w)
}

fn parse_wrk(out: &str) -> Result<Wrk> {
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .context("no Requests/sec")?
        .parse()
        .context("bad Requests/sec")?;
    let requests: f64 = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no `N requests in` line")?;
    let pct = |p: &str| -> Result<f64> {
        let v = field(p).with_context(|| format!("no latency {p}"))?;
        duration_ms(v).with_context(|| format!("bad latency {p} {v}"))
    };
    let mut errors = 0;
    if let Some(s) = field("Socket errors:") {
        errors += s
            .split(',')
            .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = field("Non-2xx or 3xx responses:") {
        errors += n.parse::<u64>().unwrap_or(0);
    }
    Ok(Wrk {
        requests_per_sec: rps,
        requests,
        p50_ms: pct("50%")?,
        p90_ms: pct("90%")?,
        p99_ms: pct("99%")?,
        errors,
        usage: Usage::default(),
    })
}

/// wrk's `635.00us`, `1.43ms`, `2.00s` in ms.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_percentiles() {
        let out = "sockperf: ---> <MAX> observation = 9462.103\n\
                   sockperf: ---> percentile 99.900 = 4900.147\n\
                   sockperf: ---> percentile 99.000 =   57.214\n\
                   sockperf: ---> percentile 50.000 =   15.743\n";
        let p = parse_sockperf(out).unwrap();
        assert_eq!((p.p50, p.p99, p.p999), (15.743, 57.214, 4900.147));
        assert!(parse_sockperf("nothing").is_err());
    }

    #[test]
    fn parses_wrk_rate_latency_and_errors() {
        let out = "Running 2s test @ http://10.2.0.3:8088/tiny.txt\n\
  1 threads and 8 connections\n\
  Latency Distribution\n\
     50%  635.00us\n\
     75%    1.00ms\n\
     90%    1.43ms\n\
     99%    3.16ms\n\
  24980 requests in 2.00s, 5.93MB read\n\
  Socket errors: connect 0, read 3, write 0, timeout 1\n\
Requests/sec:  12489.73\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.requests_per_sec, 12489.73);
        assert_eq!(w.requests, 24980.0);
        assert_eq!((w.p50_ms, w.p90_ms, w.p99_ms), (0.635, 1.43, 3.16));
        assert_eq!(w.errors, 4);
    }

    #[test]
    fn parses_iperf_json_and_its_errors() {
        let ok = r#"{"end":{"sum_received":{"bits_per_second":3.1e9,"bytes":3.875e9}}}"#;
        assert_eq!(parse_iperf(ok).unwrap(), (3.1, 3.875e9));
        let busy = r#"{"error":"the server is busy running a test. try again later"}"#;
        assert!(format!("{:#}", parse_iperf(busy).unwrap_err()).contains("busy"));
    }
}
