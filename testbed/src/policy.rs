//! Istio policy objects for tests, rendered exactly as a user would `kubectl apply` them.
use std::fmt::Write as _;

/// A `security.istio.io` PeerAuthentication.
#[derive(Debug, Clone)]
pub struct PeerAuthentication {
    namespace: String,
    name: String,
    api_version: &'static str,
    app: Option<String>,
    mode: Option<String>,
    ports: Vec<(u16, String)>,
    created: Option<String>,
}

impl PeerAuthentication {
    /// `namespace/name`, no selector (namespace-wide; mesh-wide in `istio-system`), no mode.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            api_version: "security.istio.io/v1",
            app: None,
            mode: None,
            ports: Vec::new(),
            created: None,
        }
    }

    /// `spec.mtls.mode` (STRICT, PERMISSIVE, DISABLE, UNSET).
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_string());
        self
    }

    /// `spec.selector.matchLabels: {app: APP}` (the testbed labels each pod `app: <name>`).
    pub fn selector(mut self, app: &str) -> Self {
        self.app = Some(app.to_string());
        self
    }

    /// A `spec.portLevelMtls` entry.
    pub fn port(mut self, port: u16, mode: &str) -> Self {
        self.ports.push((port, mode.to_string()));
        self
    }

    /// `metadata.creationTimestamp` (RFC 3339), for oldest-wins.
    pub fn created(mut self, timestamp: &str) -> Self {
        self.created = Some(timestamp.to_string());
        self
    }

    /// Uses `security.istio.io/v1beta1` instead of `v1`.
    pub fn v1beta1(mut self) -> Self {
        self.api_version = "security.istio.io/v1beta1";
        self
    }

    /// The YAML document.
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: {}\nkind: PeerAuthentication\nmetadata:\n  name: {}\n  namespace: {}\n",
            self.api_version, self.name, self.namespace
        );
        if let Some(ts) = &self.created {
            let _ = writeln!(y, "  creationTimestamp: \"{ts}\"");
        }
        y.push_str("spec:\n");
        if let Some(app) = &self.app {
            let _ = writeln!(y, "  selector:\n    matchLabels:\n      app: {app}");
        }
        if let Some(mode) = &self.mode {
            let _ = writeln!(y, "  mtls:\n    mode: {mode}");
        }
        if !self.ports.is_empty() {
            y.push_str("  portLevelMtls:\n");
            for (port, mode) in &self.ports {
                let _ = writeln!(y, "    {port}:\n      mode: {mode}");
            }
        }
        y
    }
}

/// A Pod the testbed does not run, as another node's inventory entry: enrolled, on `node`,
/// with service account `service_account` and the given addresses.
pub fn foreign_pod(
    name: &str,
    node: &str,
    service_account: &str,
    ips: &[std::net::IpAddr],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    \
         app: {name}\n    ambit.io/mode: enabled\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {service_account}\n  containers:\n  \
         - name: app\n    image: testbed\n\
         status:\n  phase: Running\n"
    );
    if let Some(first) = ips.first() {
        let _ = writeln!(y, "  podIP: {first}\n  podIPs:");
        for ip in ips {
            let _ = writeln!(y, "  - ip: {ip}");
        }
    }
    y
}
