//! Tests of the reasons: labels unique and stable, and each maps where the paths expect it.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::collections::HashSet;

use super::*;

#[test]
fn every_reason_has_its_own_label_and_is_read_back_from_it() {
    let labels: HashSet<_> = ALL.iter().map(|r| r.label()).collect();
    assert_eq!(labels.len(), ALL.len(), "two reasons share a label");
    for r in ALL {
        assert_eq!(Reason::from_label(r.label().as_bytes()), Some(r));
        assert!(
            r.label()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{r:?}: {}",
            r.label()
        );
        assert!(
            ["NR", "UF", "DENY", "UO"].contains(&r.response_flags()),
            "{r:?}"
        );
        assert!(!r.to_string().is_empty());
    }
    assert_eq!(Reason::from_label(b"nonsense"), None);
}

#[test]
fn connect_answers_keep_their_statuses() {
    let cases = [
        (Reason::Method, StatusCode::METHOD_NOT_ALLOWED),
        (Reason::BadAuthority, StatusCode::BAD_REQUEST),
        (Reason::ForeignTarget, StatusCode::BAD_REQUEST),
        (Reason::AgentPort, StatusCode::BAD_REQUEST),
        (Reason::PolicyDenied, StatusCode::UNAUTHORIZED),
        (Reason::NotFromWaypoint, StatusCode::UNAUTHORIZED),
        (Reason::CertificateExpired, StatusCode::SERVICE_UNAVAILABLE),
        (Reason::AppUnreachable, StatusCode::SERVICE_UNAVAILABLE),
        (Reason::AppTimeout, StatusCode::SERVICE_UNAVAILABLE),
        (Reason::BypassMap, StatusCode::SERVICE_UNAVAILABLE),
    ];
    for (r, status) in cases {
        assert_eq!(r.status(), status, "{r:?}");
    }
}

#[test]
fn a_status_without_a_reason_reads_as_the_closest_one() {
    assert_eq!(
        Reason::of_status(StatusCode::UNAUTHORIZED),
        Reason::PolicyDenied
    );
    assert_eq!(
        Reason::of_status(StatusCode::FORBIDDEN),
        Reason::PolicyDenied
    );
    assert_eq!(
        Reason::of_status(StatusCode::BAD_REQUEST),
        Reason::ForeignTarget
    );
    assert_eq!(
        Reason::of_status(StatusCode::GATEWAY_TIMEOUT),
        Reason::DestinationUnavailable
    );
    assert_eq!(Reason::of_status(StatusCode::IM_A_TEAPOT), Reason::Refused);
}

#[test]
fn only_policy_decisions_are_denials() {
    let denials: Vec<_> = ALL.iter().filter_map(|r| r.denial()).collect();
    assert_eq!(
        denials,
        [
            "route",
            "ambiguous_address",
            "waypoint_unavailable",
            "authorization",
            "strict_plaintext"
        ]
    );
    assert_eq!(Reason::PolicyDenied.response_flags(), "DENY");
    assert_eq!(Reason::StrictPlaintext.response_flags(), "DENY");
}
