//! The enrollment rules as one table: pod labels, pod annotations, namespace labels, host network → decision.
use std::collections::BTreeMap;

use super::*;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

const AMBIT_ON: (&str, &str) = (MODE_LABEL, "enabled");
const AMBIT_OFF: (&str, &str) = (MODE_LABEL, "disabled");
const ISTIO_ON: (&str, &str) = (DATAPLANE_MODE_LABEL, "ambient");
const ISTIO_OFF: (&str, &str) = (DATAPLANE_MODE_LABEL, "none");
const SIDECAR: (&str, &str) = (SIDECAR_STATUS_ANNOTATION, "{\"containers\":[\"app\"]}");

/// (pod labels, pod annotations, namespace labels, host network, enrolled, words).
type Row<'a> = (
    &'a [(&'a str, &'a str)],
    &'a [(&'a str, &'a str)],
    Option<&'a [(&'a str, &'a str)]>,
    bool,
    bool,
    &'a str,
);

#[test]
fn the_enrollment_table_holds_row_by_row() {
    let rows: &[Row<'_>] = &[
        // Nothing asks: not enrolled, whatever else the pod carries.
        (&[("app", "web")], &[], None, false, false, "not enrolled: no enrollment label (ambit.io/mode=enabled or istio.io/dataplane-mode=ambient) on the pod or its namespace"),
        (&[], &[], Some(&[]), false, false, "not enrolled: no enrollment label (ambit.io/mode=enabled or istio.io/dataplane-mode=ambient) on the pod or its namespace"),
        // Either opt-in on the namespace enrolls.
        (&[], &[], Some(&[AMBIT_ON]), false, true, "enrolled by namespace label ambit.io/mode=enabled"),
        (&[], &[], Some(&[ISTIO_ON]), false, true, "enrolled by namespace label istio.io/dataplane-mode=ambient"),
        (&[], &[], Some(&[AMBIT_ON, ISTIO_ON]), false, true, "enrolled by namespace label ambit.io/mode=enabled"),
        // Either opt-in on the pod enrolls, whatever the namespace says.
        (&[AMBIT_ON], &[], None, false, true, "enrolled by pod label ambit.io/mode=enabled"),
        (&[ISTIO_ON], &[], Some(&[]), false, true, "enrolled by pod label istio.io/dataplane-mode=ambient"),
        (&[ISTIO_ON], &[], Some(&[ISTIO_OFF]), false, true, "enrolled by pod label istio.io/dataplane-mode=ambient"),
        (&[ISTIO_ON], &[], Some(&[AMBIT_OFF]), false, true, "enrolled by pod label istio.io/dataplane-mode=ambient"),
        // A pod's opt-out wins over its namespace and over its own opt-in.
        (&[ISTIO_OFF], &[], Some(&[ISTIO_ON]), false, false, "not enrolled: pod label istio.io/dataplane-mode=none (overrides namespace label istio.io/dataplane-mode=ambient)"),
        (&[ISTIO_OFF], &[], Some(&[AMBIT_ON]), false, false, "not enrolled: pod label istio.io/dataplane-mode=none (overrides namespace label ambit.io/mode=enabled)"),
        (&[AMBIT_OFF], &[], Some(&[ISTIO_ON]), false, false, "not enrolled: pod label ambit.io/mode=disabled (overrides namespace label istio.io/dataplane-mode=ambient)"),
        (&[AMBIT_ON, ISTIO_OFF], &[], None, false, false, "not enrolled: pod label istio.io/dataplane-mode=none (overrides pod label ambit.io/mode=enabled)"),
        (&[AMBIT_OFF, ISTIO_ON], &[], Some(&[ISTIO_ON]), false, false, "not enrolled: pod label ambit.io/mode=disabled (overrides pod label istio.io/dataplane-mode=ambient)"),
        (&[ISTIO_OFF], &[], Some(&[]), false, false, "not enrolled: pod label istio.io/dataplane-mode=none"),
        // On a namespace an opt-out only means "not by this label": the opt-in is kept.
        (&[], &[], Some(&[AMBIT_ON, ISTIO_OFF]), false, true, "enrolled by namespace label ambit.io/mode=enabled (overrides namespace label istio.io/dataplane-mode=none)"),
        (&[], &[], Some(&[AMBIT_OFF, ISTIO_ON]), false, true, "enrolled by namespace label istio.io/dataplane-mode=ambient (overrides namespace label ambit.io/mode=disabled)"),
        (&[], &[], Some(&[AMBIT_OFF]), false, false, "not enrolled: namespace label ambit.io/mode=disabled"),
        (&[], &[], Some(&[ISTIO_OFF]), false, false, "not enrolled: namespace label istio.io/dataplane-mode=none"),
        // Unknown values decide nothing (Istio's selector: a pod value other than `none`).
        (&[(DATAPLANE_MODE_LABEL, "Ambient")], &[], Some(&[ISTIO_ON]), false, true, "enrolled by namespace label istio.io/dataplane-mode=ambient"),
        (&[(MODE_LABEL, "on")], &[], Some(&[]), false, false, "not enrolled: no enrollment label (ambit.io/mode=enabled or istio.io/dataplane-mode=ambient) on the pod or its namespace"),
        (&[], &[], Some(&[(DATAPLANE_MODE_LABEL, "sidecar")]), false, false, "not enrolled: no enrollment label (ambit.io/mode=enabled or istio.io/dataplane-mode=ambient) on the pod or its namespace"),
        // An Istio sidecar, or host networking, rules the pod out before any label.
        (&[ISTIO_ON], &[SIDECAR], Some(&[ISTIO_ON]), false, false, "not enrolled: the pod has an Istio sidecar (annotation sidecar.istio.io/status)"),
        (&[AMBIT_ON], &[SIDECAR], None, false, false, "not enrolled: the pod has an Istio sidecar (annotation sidecar.istio.io/status)"),
        (&[AMBIT_ON], &[], Some(&[ISTIO_ON]), true, false, "not enrolled: a host-network pod is never enrolled"),
        // `sidecar.istio.io/inject` is a request to the injector, not a sidecar: no effect.
        (&[("sidecar.istio.io/inject", "true")], &[("sidecar.istio.io/inject", "true")], Some(&[ISTIO_ON]), false, true, "enrolled by namespace label istio.io/dataplane-mode=ambient"),
    ];
    for (i, (pod, ann, ns, host, enrolled, words)) in rows.iter().enumerate() {
        let ns_map = ns.map(map);
        let got = decide(&map(pod), &map(ann), ns_map.as_ref(), *host);
        assert_eq!(got.enrolled(), *enrolled, "row {i}: {got:?}");
        assert_eq!(got.to_string(), *words, "row {i}");
    }
}

#[test]
fn the_decision_serializes_with_the_deciding_label() {
    let got = decide(
        &map(&[ISTIO_OFF]),
        &map(&[]),
        Some(&map(&[ISTIO_ON])),
        false,
    );
    assert_eq!(
        serde_json::to_value(got).unwrap(),
        serde_json::json!({
            "decided_by": "label",
            "label": {"on": "pod", "key": "istio.io/dataplane-mode", "value": "none"},
            "enrolled": false,
            "overrides": {"on": "namespace", "key": "istio.io/dataplane-mode", "value": "ambient"},
        })
    );
    assert_eq!(
        serde_json::to_value(Enrollment::Sidecar).unwrap(),
        serde_json::json!({"decided_by": "sidecar"})
    );
}
