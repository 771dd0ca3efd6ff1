//! The CLI's words: admin API answers (JSON) rendered as the tables and sentences operators read.
//!
//! Pure functions from the admin socket's JSON documents to text, so that the exact output is
//! unit-tested here and the CLI client only fetches, prints and picks the exit code. A field
//! that is missing or of an unexpected type shows as `-`, never as JSON or a Rust debug form.
use std::fmt::Write as _;

use serde_json::Value;

/// The message of an admin API error answer: the `error` field of its JSON body when there is
/// one (`no pod "client" in the inventory (use namespace/name)`), else the request, the status
/// and the body as received.
pub fn error_message(method: &str, path: &str, status: http::StatusCode, body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(msg) = parsed.as_ref().and_then(|v| v["error"].as_str()) {
        return msg.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("{method} {path}: {status}")
    } else {
        format!("{method} {path}: {status}: {text}")
    }
}

/// `ambit status`.
pub fn status(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}  version {}  up {}s",
        s(&v["node"]),
        s(&v["version"]),
        n(&v["uptime_s"])
    );
    let _ = writeln!(
        out,
        "inventory {}  loads {}  errors {}",
        s(&v["inventory"]["source"]),
        n(&v["inventory"]["loads"]),
        n(&v["inventory"]["errors"])
    );
    if let Some(x) = v["inventory"]["istiod"].as_object() {
        istiod_lines(&mut out, x);
    }
    if let Some(h) = v["inventory"]["held"].as_object() {
        let _ = writeln!(
            out,
            "inventory reload held back: {} (last good inventory in force; applies if unchanged after {} ms)",
            s(&h["message"]),
            n(&h["settle_ms"])
        );
    }
    let mesh = &v["mesh"];
    if mesh["mesh_only"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "capture mesh-only: {} of {} destinations listed{}",
            n(&mesh["destinations"]),
            n(&mesh["capacity"]),
            if mesh["capture_everything"].as_bool() == Some(true) {
                " (list incomplete: capturing every destination)"
            } else {
                ""
            }
        );
    } else {
        let _ = writeln!(out, "capture: every destination");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:<9} {:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "POD", "STATE", "IPS", "REDIR", "EXEMPT", "STEER", "BYPASS", "DROP", "OUT", "IN"
    );
    for p in items(&v["pods"]) {
        let c = &p["counters"];
        let x = &p["proxy"];
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
            pod_key(p),
            s(&p["state"]),
            list(&p["ips"]),
            n(&c["redirected"]),
            n(&c["exempted"]),
            n(&c["steered"]),
            n(&c["bypassed"]),
            n(&c["dropped"]),
            n(&x["outbound_accepted"]),
            n(&x["inbound_accepted"]),
        );
        if let Some(e) = p["error"].as_str() {
            let _ = writeln!(out, "    error: {e}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "kernel counters:");
    for (name, val) in v["kernel"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {name:<28} {}", n(val));
    }
    out
}

/// `ambit workloads`.
pub fn workloads(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<8} {:<6} {:<9} {:<30} IDENTITY",
        "POD", "NODE", "LOCAL", "ENROLLED", "IPS"
    );
    for w in items(&v["workloads"]) {
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:<6} {:<9} {:<30} {}",
            pod_key(w),
            s(&w["node"]),
            yes_no(&w["local"]),
            yes_no(&w["enrolled"]),
            list(&w["ips"]),
            s(&w["identity"]),
        );
    }
    out
}

/// `ambit certs`.
pub fn certs(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<48} {:<13} {:<5} {:<22} {:<22} {:<22} SERIAL",
        "IDENTITY", "STATE", "PODS", "NOT AFTER", "NEXT RENEWAL", "LAST ERROR"
    );
    for c in items(&v["certs"]) {
        let _ = writeln!(
            out,
            "{:<48} {:<13} {:<5} {:<22} {:<22} {:<22} {}",
            s(&c["identity"]),
            s(&c["state"]),
            n(&c["pods"]),
            s(&c["notAfter"]),
            s(&c["nextRenewal"]),
            s(&c["lastError"]),
            s(&c["serial"]),
        );
    }
    out
}

/// `ambit connections`.
pub fn connections(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:<20} {:<24} {:<24} {:<10} {:>8} {:>10} {:>10}  PEER IDENTITY",
        "DIRECTION", "POD", "SOURCE", "DESTINATION", "SECURITY", "AGE(s)", "SENT", "RECEIVED"
    );
    for c in items(&v["connections"]) {
        let peer = if c["direction"] == "outbound" {
            &c["dst_identity"]
        } else {
            &c["src_identity"]
        };
        let _ = writeln!(
            out,
            "{:<9} {:<20} {:<24} {:<24} {:<10} {:>8.1} {:>10} {:>10}  {}",
            s(&c["direction"]),
            s(&c["pod"]),
            s(&c["src"]),
            s(&c["dst"]),
            s(&c["security"]),
            c["age_s"].as_f64().unwrap_or(0.0),
            n(&c["bytes_sent"]),
            n(&c["bytes_received"]),
            s(peer),
        );
    }
    out
}

/// `ambit policy`: the effective PeerAuthentication of every enrolled pod (all ports, then the
/// ports with their own mode), then the AuthorizationPolicies that select each pod.
pub fn policy(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<8} {:<12} {:<10} DECIDED BY",
        "POD", "PORT", "MODE", "LEVEL"
    );
    let pods = items(&v["policies"]);
    for p in &pods {
        let pa = &p["peer_authentication"];
        let mut row = |port: &str, r: &Value| {
            let _ = writeln!(
                out,
                "{:<28} {:<8} {:<12} {:<10} {}",
                s(&p["pod"]),
                port,
                s(&r["mode"]),
                s(&r["level"]),
                r["policy"].as_str().unwrap_or("(default: nothing set)")
            );
        };
        row("*", &pa["default"]);
        for (port, r) in pa["ports"].as_object().into_iter().flatten() {
            row(port, r);
        }
    }
    let selected: Vec<(&Value, &Value)> = pods
        .iter()
        .flat_map(|p| items(&p["authorization"]).into_iter().map(move |a| (*p, a)))
        .collect();
    let _ = writeln!(out);
    if selected.is_empty() {
        let _ = writeln!(
            out,
            "no AuthorizationPolicy selects an enrolled pod: every connection that passes \
             PeerAuthentication is allowed"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<28} {:<36} {:<7} NOTES",
        "POD", "AUTHORIZATIONPOLICY", "ACTION"
    );
    for (p, a) in selected {
        let _ = writeln!(
            out,
            "{:<28} {:<36} {:<7} {}",
            s(&p["pod"]),
            s(&a["policy"]),
            s(&a["action"]),
            authz_note(a)
        );
    }
    out
}

/// What an operator must know about one policy of a pod (an `AppliedAuthz`): that the node
/// proxy does not apply it and why, or the fields it cannot check at L4, or `-`.
fn authz_note(a: &Value) -> String {
    if let Some(why) = a["not_for_node_proxy"].as_str() {
        return format!("not for the node proxy ({why})");
    }
    let unsupported = list(&a["unsupported"]);
    if unsupported.is_empty() {
        "-".to_string()
    } else {
        format!("not checked at L4, fails safe: {unsupported}")
    }
}

/// `ambit explain`: the verdict, which label enrolled (or did not enroll) each pod, the source
/// agent's steps, the destination agent's checks in words, and warnings.
pub fn explain(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {}: {}",
        s(&v["from"]),
        s(&v["to"]),
        s(&v["verdict"])
    );
    let enrollment = items(&v["enrollment"]);
    if !enrollment.is_empty() {
        let _ = writeln!(out, "\nenrollment:");
        for e in enrollment {
            let (role, pod, reason) = (s(&e["role"]), s(&e["pod"]), s(&e["reason"]));
            let _ = writeln!(out, "  - {role} {pod}: {reason}");
        }
    }
    let _ = writeln!(out, "\nsource agent:");
    for step in items(&v["outbound"]["steps"]) {
        let _ = writeln!(out, "  - {}", s(step));
    }
    if let Some(r) = v["outbound"]["reason"].as_str() {
        let _ = writeln!(out, "  refused: {r}");
    }
    let i = &v["inbound"];
    if i.is_object() {
        let _ = writeln!(out, "\ndestination agent ({}):", s(&i["pod"]));
        let _ = writeln!(
            out,
            "  - PeerAuthentication: {}",
            peer_authentication(&i["peer_authentication"])
        );
        let _ = writeln!(out, "  - AuthorizationPolicy: {}", authorization(i));
    }
    let warnings = items(&v["warnings"]);
    if !warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for w in warnings {
            let _ = writeln!(out, "  ! {}", s(w));
        }
    }
    out
}

/// A PeerAuthentication resolution (`{"mode", "policy", "level"}`) in words:
/// `STRICT (default/strict, namespace-wide)`, `PERMISSIVE (no PeerAuthentication applies: the default)`.
fn peer_authentication(r: &Value) -> String {
    let mode = s(&r["mode"]);
    let Some(policy) = r["policy"].as_str() else {
        return format!("{mode} (no PeerAuthentication applies: the default)");
    };
    let scope = match r["level"].as_str() {
        Some("mesh") => "mesh-wide".to_string(),
        Some("namespace") => "namespace-wide".to_string(),
        Some("workload") => "workload selector".to_string(),
        Some("port") => "port-level".to_string(),
        other => other.unwrap_or("-").to_string(),
    };
    format!("{mode} ({policy}, {scope})")
}

/// The destination's AuthorizationPolicy decision (`inbound.authorization`, as
/// `policy::authz::Decision` serializes) in words, with the policies that select the pod
/// (`inbound.authorization_policies`).
fn authorization(inbound: &Value) -> String {
    let pod = s(&inbound["pod"]);
    let d = &inbound["authorization"];
    let listed = items(&inbound["authorization_policies"]);
    let (skipped, selecting): (Vec<&Value>, Vec<&Value>) = listed
        .into_iter()
        .partition(|a| a["not_for_node_proxy"].is_string());
    let named = |action: &str| -> Vec<String> {
        selecting
            .iter()
            .filter(|a| a["action"] == action)
            .map(|a| s(&a["policy"]))
            .collect()
    };
    // Policies the node proxy leaves to others do not count as "selecting" the pod here.
    let none = if skipped.is_empty() {
        "no AuthorizationPolicy"
    } else {
        "no AuthorizationPolicy for the node proxy"
    };
    let decided = decision(&pod, d, none, &named);
    if skipped.is_empty() {
        return decided;
    }
    let skipped: Vec<String> = skipped
        .iter()
        .map(|a| format!("{} ({})", s(&a["policy"]), s(&a["not_for_node_proxy"])))
        .collect();
    format!("{decided}; not for the node proxy: {}", skipped.join(", "))
}

/// The decision `d` in words; `named(action)` names the node proxy's policies of that
/// action that select `pod`, `none` says there are none.
fn decision(pod: &str, d: &Value, none: &str, named: &dyn Fn(&str) -> Vec<String>) -> String {
    if let Some(allow) = d.get("Allow") {
        if let Some(p) = allow["policy"].as_str() {
            return format!("ALLOW (by {p})");
        }
        let denies = named("DENY");
        return if denies.is_empty() {
            format!("ALLOW ({none} selects {pod})")
        } else {
            format!(
                "ALLOW (no ALLOW policy selects {pod}; no DENY policy matches: {})",
                denies.join(", ")
            )
        };
    }
    if let Some(p) = d.get("Denied").map(|x| &x["policy"]) {
        return format!("DENY (by {})", s(p));
    }
    if d == "NotAllowed" {
        let allows = named("ALLOW");
        return if allows.is_empty() {
            "DENY (no ALLOW policy matches)".to_string()
        } else {
            format!("DENY (no ALLOW policy matches: {})", allows.join(", "))
        };
    }
    // A decision this CLI does not know (a newer agent): show what the agent said.
    d.to_string()
}

/// `namespace/name` of a pod document.
fn pod_key(p: &Value) -> String {
    format!("{}/{}", s(&p["namespace"]), s(&p["name"]))
}

/// The elements of an array, or none.
fn items(v: &Value) -> Vec<&Value> {
    v.as_array().into_iter().flatten().collect()
}

/// A list of strings joined by commas.
fn list(v: &Value) -> String {
    items(v)
        .into_iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// A string field as written; a number or bool as text; `-` for null or missing.
fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Number(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
        _ => "-".to_string(),
    }
}

/// A count, or `-`.
fn n(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_string(), |x| x.to_string())
}

fn yes_no(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

#[cfg(test)]
mod tests;

/// The istiod stream's lines of `ambit status`: its state, then one line per resource type.
fn istiod_lines(out: &mut String, x: &serde_json::Map<String, Value>) {
    let _ = writeln!(
        out,
        "istiod {}  {}  pushes {}  acks {}  nacks {}  reconnects {}",
        s(&x["address"]),
        s(&x["state"]),
        n(&x["pushes"]),
        n(&x["acks"]),
        n(&x["nacks"]),
        n(&x["reconnects"])
    );
    if let Some(e) = x["last_error"].as_str() {
        let _ = writeln!(out, "  last error: {e}");
    }
    for (type_url, t) in x["types"].as_object().into_iter().flatten() {
        let short = type_url.rsplit('/').next().unwrap_or(type_url);
        let _ = writeln!(
            out,
            "  {short:<28} {} resources  acked version {}{}{}",
            n(&t["resources"]),
            t["last_ack_version"].as_str().unwrap_or("-"),
            if t["synced"].as_bool() == Some(true) {
                ""
            } else {
                "  (not synced)"
            },
            t["last_nack"]
                .as_str()
                .map(|e| format!("  last NACK: {e}"))
                .unwrap_or_default()
        );
    }
}
