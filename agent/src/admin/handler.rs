//! What the admin socket asks of the agent: the [`Handler`] the pod manager implements, so the
//! admin server reaches no further into the data plane than these calls.
use std::net::SocketAddr;

use crate::identity::manager::CertStatus;
use crate::proxy::conns::ConnRow;
use crate::proxy::explain::{self, Explanation};
use crate::proxy::manager::Manager;
use crate::proxy::pods::{PodPolicy, PodStatus};

/// The agent as the admin socket sees it.
pub trait Handler: Send + Sync {
    /// Certificate status of the local identities (`/certs`).
    fn certs(&self) -> Vec<CertStatus>;
    /// Every open proxied connection (`/connections`).
    fn connections(&self) -> Vec<ConnRow>;
    /// Every pod served or tried (`/status`).
    fn pods(&self) -> Vec<PodStatus>;
    /// The policies of every enrolled pod (`/policies`).
    fn policies(&self) -> Vec<PodPolicy>;
    /// Whether the agent is ready, else what it waits for (`/healthz/ready`).
    fn readiness(&self) -> (bool, Vec<String>);
    /// Starts the agent's drain (`POST /drain`).
    fn begin_drain(&self);
    /// Explains a connection from pod `from` (`namespace/name`) to `to` (`/explain`).
    fn explain(&self, from: &str, to: SocketAddr) -> Result<Explanation, explain::Error>;
}

impl Handler for Manager {
    fn certs(&self) -> Vec<CertStatus> {
        Manager::certs(self)
    }

    fn connections(&self) -> Vec<ConnRow> {
        Manager::connections(self)
    }

    fn pods(&self) -> Vec<PodStatus> {
        self.pods().status()
    }

    fn policies(&self) -> Vec<PodPolicy> {
        self.pods().policies()
    }

    fn readiness(&self) -> (bool, Vec<String>) {
        Manager::readiness(self)
    }

    fn begin_drain(&self) {
        Manager::begin_drain(self);
    }

    fn explain(&self, from: &str, to: SocketAddr) -> Result<Explanation, explain::Error> {
        Manager::explain(self, from, to)
    }
}
