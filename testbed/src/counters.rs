//! Reading agents' counters in tests: kernel (per hook), per pod, per pod proxy, and snapshots.
use std::collections::BTreeMap;

use crate::testbed::Testbed;

/// All kernel counters of one agent at one moment.
pub type KernelSnapshot = BTreeMap<String, u64>;

impl Testbed {
    /// Kernel counter `name` of `node`'s agent; panics (with the status) if it is missing.
    pub fn kernel_counter(&self, node: &str, name: &str) -> u64 {
        let st = self
            .status(node)
            .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
        st.kernel_required(name)
            .unwrap_or_else(|e| panic!("{node}: {e:#}"))
    }

    /// Every kernel counter of `node`'s agent.
    pub fn kernel_snapshot(&self, node: &str) -> KernelSnapshot {
        let st = self
            .status(node)
            .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
        let map = st.0["kernel"]
            .as_object()
            .unwrap_or_else(|| panic!("{node}: no `kernel` in status: {}", st.0));
        map.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }

    /// Counter `name` of pod `pod` (`redirected`, `exempted`, `steered`, `bypassed`, `dropped`),
    /// as reported by `node`'s agent; panics if the pod or counter is missing.
    pub fn pod_counter(&self, node: &str, pod: &str, name: &str) -> u64 {
        let st = self
            .status(node)
            .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
        st.pod_counter(pod, name).unwrap_or_else(|| {
            panic!(
                "{node}: no counter `{name}` for pod {pod}: {}",
                st.0["pods"]
            )
        })
    }

    /// Proxy statistic `name` of pod `pod` (`outbound_accepted`, `inbound_accepted`, ...).
    pub fn proxy_counter(&self, node: &str, pod: &str, name: &str) -> u64 {
        let st = self
            .status(node)
            .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
        st.pod(pod)
            .and_then(|p| p["proxy"][name].as_u64())
            .unwrap_or_else(|| {
                panic!(
                    "{node}: no proxy stat `{name}` for pod {pod}: {}",
                    st.0["pods"]
                )
            })
    }
}

/// Counters that differ between two snapshots, as `name: before -> after`.
pub fn changed(before: &KernelSnapshot, after: &KernelSnapshot) -> Vec<String> {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: {} -> {v}",
                before.get(k).map_or("-".into(), u64::to_string)
            )
        })
        .collect()
}
