//! Which pods are enrolled: ambit's `ambit.io/mode` and Istio's `istio.io/dataplane-mode` labels on a pod and its namespace, and which one decided.
//!
//! The rules, first match wins, are the table in docs/configuration.md ("Enrollment"): host
//! network, then an Istio sidecar (`sidecar.istio.io/status`), then a pod's opt-out
//! (`ambit.io/mode=disabled`, `istio.io/dataplane-mode=none`), then a pod's opt-in
//! (`enabled`, `ambient`), then a namespace's opt-in; nothing else enrolls. The unit test
//! `the_enrollment_table_holds_row_by_row` checks each row.
//!
//! On a namespace the opt-out values say only "not enrolled by this label": a namespace with
//! `ambit.io/mode=enabled` and `istio.io/dataplane-mode=none` is enrolled. Istio reads `none`
//! only on pods (its enablement selector is "pod `ambient`, or namespace `ambient` and pod not
//! `none`"), and of two contradicting namespace labels the one asking for capture is kept:
//! enrolled means captured and protected (mTLS, PeerAuthentication, AuthorizationPolicy).
//! On a pod both labels opt out: a pod is marked `none` because it cannot live in a mesh, and
//! that is the pod owner's last word. Other values of either label decide nothing (Istio's
//! selector treats a pod value other than `none` the same way).
use std::collections::BTreeMap;

use serde::Serialize;

/// ambit's own enrollment label: `enabled` or `disabled`.
pub const MODE_LABEL: &str = "ambit.io/mode";
/// Istio's enrollment label: `ambient` or `none`.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The annotation Istio's sidecar injector puts on every pod it gave a sidecar.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What a pod's labels and annotations, and its namespace's labels, say about its enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decided_by")]
pub enum Enrollment {
    /// No label asks for capture.
    Unlabelled,
    /// The pod shares its node's network namespace (`spec.hostNetwork`): never enrolled.
    HostNetwork,
    /// The pod has an Istio sidecar (`sidecar.istio.io/status`): never enrolled.
    Sidecar,
    /// A label decided.
    Label {
        /// The label that decided.
        label: LabelRef,
        /// Whether it enrolls the pod.
        enrolled: bool,
        /// A label it won over (a namespace's opt-in under a pod's opt-out, or the other
        /// label of the same object when the two contradict).
        overrides: Option<LabelRef>,
    },
}

/// One label on a pod or a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LabelRef {
    /// `pod` or `namespace`.
    pub on: Scope,
    /// The label key.
    pub key: &'static str,
    /// Its value.
    pub value: &'static str,
}

/// Where a label is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// On the pod.
    Pod,
    /// On the pod's namespace.
    Namespace,
}

/// A label value the rules know, as read from a label map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vote {
    In(&'static str, &'static str),
    Out(&'static str, &'static str),
}

impl Enrollment {
    /// Whether the pod is enrolled.
    pub fn enrolled(&self) -> bool {
        matches!(self, Self::Label { enrolled: true, .. })
    }

    /// The decision for a pod labelled `ambit.io/mode=enabled` (`true`) or `disabled` (`false`).
    pub fn by_mode_label(enrolled: bool) -> Self {
        Self::Label {
            label: LabelRef {
                on: Scope::Pod,
                key: MODE_LABEL,
                value: if enrolled { "enabled" } else { "disabled" },
            },
            enrolled,
            overrides: None,
        }
    }
}

/// Decides a pod's enrollment (see the module's table).
pub fn decide(
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    host_network: bool,
) -> Enrollment {
    if host_network {
        return Enrollment::HostNetwork;
    }
    if pod_annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Enrollment::Sidecar;
    }
    let at = |on: Scope, (key, value): (&'static str, &'static str)| LabelRef { on, key, value };
    let pod = votes(pod_labels);
    let ns = namespace_labels.map(votes).unwrap_or_default();
    let first_in = |v: &[Vote]| {
        v.iter().find_map(|v| match v {
            Vote::In(k, x) => Some((*k, *x)),
            Vote::Out(..) => None,
        })
    };
    let first_out = |v: &[Vote]| {
        v.iter().find_map(|v| match v {
            Vote::Out(k, x) => Some((*k, *x)),
            Vote::In(..) => None,
        })
    };
    if let Some(out) = first_out(&pod) {
        let overrides = first_in(&pod)
            .map(|i| at(Scope::Pod, i))
            .or_else(|| first_in(&ns).map(|i| at(Scope::Namespace, i)));
        return Enrollment::Label {
            label: at(Scope::Pod, out),
            enrolled: false,
            overrides,
        };
    }
    if let Some(pod_in) = first_in(&pod) {
        return Enrollment::Label {
            label: at(Scope::Pod, pod_in),
            enrolled: true,
            overrides: None,
        };
    }
    if let Some(ns_in) = first_in(&ns) {
        return Enrollment::Label {
            label: at(Scope::Namespace, ns_in),
            enrolled: true,
            overrides: first_out(&ns).map(|o| at(Scope::Namespace, o)),
        };
    }
    match first_out(&ns) {
        Some(out) => Enrollment::Label {
            label: at(Scope::Namespace, out),
            enrolled: false,
            overrides: None,
        },
        None => Enrollment::Unlabelled,
    }
}

/// The known values of the two labels in `labels`, ambit's first.
fn votes(labels: &BTreeMap<String, String>) -> Vec<Vote> {
    let mode = match labels.get(MODE_LABEL).map(String::as_str) {
        Some("enabled") => Some(Vote::In(MODE_LABEL, "enabled")),
        Some("disabled") => Some(Vote::Out(MODE_LABEL, "disabled")),
        _ => None,
    };
    let dataplane = match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some("ambient") => Some(Vote::In(DATAPLANE_MODE_LABEL, "ambient")),
        Some("none") => Some(Vote::Out(DATAPLANE_MODE_LABEL, "none")),
        _ => None,
    };
    mode.into_iter().chain(dataplane).collect()
}

impl std::fmt::Display for LabelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = match self.on {
            Scope::Pod => "pod",
            Scope::Namespace => "namespace",
        };
        write!(f, "{on} label {}={}", self.key, self.value)
    }
}

impl std::fmt::Display for Enrollment {
    /// The decision in words: `enrolled by namespace label istio.io/dataplane-mode=ambient`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unlabelled => f.write_str(
                "not enrolled: no enrollment label (ambit.io/mode=enabled or \
                 istio.io/dataplane-mode=ambient) on the pod or its namespace",
            ),
            Self::HostNetwork => f.write_str("not enrolled: a host-network pod is never enrolled"),
            Self::Sidecar => f.write_str(
                "not enrolled: the pod has an Istio sidecar (annotation sidecar.istio.io/status)",
            ),
            Self::Label {
                label,
                enrolled,
                overrides,
            } => {
                let verb = if *enrolled {
                    "enrolled by"
                } else {
                    "not enrolled:"
                };
                write!(f, "{verb} {label}")?;
                if let Some(o) = overrides {
                    write!(f, " (overrides {o})")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
