//! The agents' admin API as tests see it, through the `ambit` CLI: certificates, connections,
//! effective policies and `explain`.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::agent::{self, Cert, Certs, Connection};
use crate::testbed::Testbed;

impl Testbed {
    /// `ambit certs --json` of `node`'s agent.
    pub fn certs(&self, node: &str) -> Result<Certs> {
        let v = self.admin(node, &["certs"])?;
        let rows: Vec<Cert> = serde_json::from_value(v["certs"].clone())
            .with_context(|| format!("{node}: /certs has an unexpected shape: {v}"))?;
        Ok(Certs(rows))
    }

    /// `node`'s certificate of `identity`; panics when the agent does not answer.
    pub fn cert(&self, node: &str, identity: &str) -> Option<Cert> {
        self.certs(node)
            .unwrap_or_else(|e| panic!("certs of {node}: {e:#}"))
            .get(identity)
            .cloned()
    }

    /// `ambit connections --json` of `node`'s agent.
    pub fn connections(&self, node: &str) -> Result<Vec<Connection>> {
        let v = self.admin(node, &["connections"])?;
        serde_json::from_value(v["connections"].clone())
            .with_context(|| format!("{node}: /connections has an unexpected shape: {v}"))
    }

    /// `ambit policy --json` of `node`'s agent: the entry of pod `pod` (`namespace/name`).
    pub fn policy(&self, node: &str, pod: &str) -> Result<Value> {
        let v = self.admin(node, &["policy"])?;
        v["policies"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["pod"] == pod))
            .cloned()
            .with_context(|| format!("{node}: /policies has no pod {pod}: {v}"))
    }

    /// The effective PeerAuthentication mode of `pod` on `port` per `node`'s `/policies`, with
    /// the level and policy that decided it: `(mode, level, policy)`.
    pub fn peer_auth_mode(
        &self,
        node: &str,
        pod: &str,
        port: u16,
    ) -> Result<(String, String, String)> {
        let p = self.policy(node, pod)?;
        let pa = &p["peer_authentication"];
        let r = match pa["ports"].get(port.to_string()) {
            Some(r) => r,
            None => &pa["default"],
        };
        let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
        Ok((s(&r["mode"]), s(&r["level"]), s(&r["policy"])))
    }

    /// `ambit explain --from FROM --to TO --json` on `node`'s agent.
    pub fn explain(&self, node: &str, from: &str, to: SocketAddr) -> Result<Value> {
        let to = to.to_string();
        self.admin(node, &["explain", "--from", from, "--to", &to])
    }

    /// Runs an admin CLI command with `--json` against `node`'s agent.
    pub fn admin(&self, node: &str, args: &[&str]) -> Result<Value> {
        agent::admin_json(self.agent_bin()?, self.state().node(node)?, args)
    }
}
