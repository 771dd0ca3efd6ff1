//! `apply`: adds Kubernetes-shaped objects (policies, Services, pods of other nodes) to a
//! running testbed's inventory, replacing earlier ones with the same kind, namespace and name,
//! as `kubectl apply` would. The result is checked with the agent's own inventory parser
//! (`ambit check-inventory`) before it is written (atomically), and the call returns once every
//! running agent has loaded it.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config;
use crate::state::{self, Applied};
use crate::testbed::Testbed;

/// How long agents get to load a changed inventory (they poll it every 200 ms).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Kinds without a namespace.
const CLUSTER_SCOPED: &[&str] = &["Namespace", "Node", "ClusterRole", "ClusterRoleBinding"];

/// What one `apply` did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// `Kind namespace/name` of each object, and whether it was `created`, `configured`
    /// (replaced) or `unchanged`.
    pub objects: Vec<(String, &'static str)>,
    /// Agents that loaded the new inventory, with their load count afterwards.
    pub reloaded: Vec<(String, u64)>,
}

/// Splits multi-document YAML into objects; each needs `kind` and `metadata.name`.
pub fn documents(text: &str) -> Result<Vec<Applied>> {
    let mut out = Vec::new();
    for (i, doc) in split_documents(text).into_iter().enumerate() {
        let value: serde_json::Value = serde_saphyr::from_str_with_options(&doc, yaml_options())
            .with_context(|| format!("document {}: not YAML", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"]
            .as_str()
            .with_context(|| format!("document {}: no `kind`", i + 1))?;
        if kind == "List" {
            bail!(
                "document {}: kind List is not supported; write one object per document",
                i + 1
            );
        }
        let name = value["metadata"]["name"]
            .as_str()
            .with_context(|| format!("document {} ({kind}): no `metadata.name`", i + 1))?;
        let namespace = if CLUSTER_SCOPED.contains(&kind) {
            String::new()
        } else {
            value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        };
        out.push(Applied {
            kind: kind.to_string(),
            namespace,
            name: name.to_string(),
            yaml: doc.trim_end().to_string() + "\n",
        });
    }
    Ok(out)
}

/// `Kind namespace/name` (or `Kind name`).
pub fn describe(obj: &Applied) -> String {
    if obj.namespace.is_empty() {
        format!("{} {}", obj.kind, obj.name)
    } else {
        format!("{} {}/{}", obj.kind, obj.namespace, obj.name)
    }
}

impl Testbed {
    /// Adds (or replaces) the objects in `yaml` and waits until every running agent has loaded
    /// the new inventory. Nothing is written when the result would not parse.
    pub fn apply(&mut self, yaml: &str) -> Result<ApplyReport> {
        self.apply_inner(yaml, true)
    }

    /// Like [`Testbed::apply`] but writes objects the agents will reject (bad-input tests),
    /// and returns once every running agent has counted the rejection; the agents keep their
    /// last good inventory. The objects stay in the inventory until deleted.
    pub fn apply_rejected(&mut self, yaml: &str) -> Result<ApplyReport> {
        self.apply_inner(yaml, false)
    }

    fn apply_inner(&mut self, yaml: &str, valid: bool) -> Result<ApplyReport> {
        let objects = documents(yaml)?;
        if objects.is_empty() {
            bail!("nothing to apply: no objects in the input");
        }
        let mut applied = self.state().applied.clone();
        let mut report = Vec::new();
        for obj in objects {
            let what = describe(&obj);
            if obj.kind == "Pod"
                && self
                    .state()
                    .pods
                    .iter()
                    .any(|p| p.in_inventory && p.name == obj.name && p.namespace == obj.namespace)
            {
                bail!("{what} is one of the testbed's own pods; apply a pod with another name");
            }
            let same = |a: &Applied| {
                a.kind == obj.kind && a.namespace == obj.namespace && a.name == obj.name
            };
            let verb = match applied.iter_mut().find(|a| same(a)) {
                Some(old) if *old == obj => "unchanged",
                Some(old) => {
                    *old = obj;
                    "configured"
                }
                None => {
                    applied.push(obj);
                    "created"
                }
            };
            report.push((what, verb));
        }
        let reloaded = self.replace_applied(applied, valid)?;
        Ok(ApplyReport {
            objects: report,
            reloaded,
        })
    }

    /// Removes an applied object; waits for the agents as [`Testbed::apply`] does.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let mut applied = self.state().applied.clone();
        let before = applied.len();
        applied.retain(|a| !(a.kind == kind && a.namespace == namespace && a.name == name));
        if applied.len() == before {
            bail!("no applied {kind} {namespace}/{name}");
        }
        self.replace_applied(applied, true).map(drop)
    }

    /// Writes the inventory with `applied` and waits for the running agents: until they
    /// loaded it (`valid`; checked with the agent's parser first) or rejected it (not `valid`).
    fn replace_applied(
        &mut self,
        applied: Vec<Applied>,
        valid: bool,
    ) -> Result<Vec<(String, u64)>> {
        let mut next = self.state().clone();
        next.applied = applied;
        let text = config::inventory(&next);
        match (
            valid,
            check_inventory(self.agent_bin()?, &next.inventory, &text)?,
        ) {
            (true, Err(why)) => {
                bail!("the agents would reject this inventory; nothing was applied: {why}")
            }
            (false, Ok(())) => bail!("the agents would accept this inventory; use apply"),
            _ => {}
        }
        let unchanged = std::fs::read_to_string(&next.inventory).is_ok_and(|t| t == text);
        let mut nodes = Vec::new();
        for n in next.nodes.iter().filter(|n| self.agent_running(&n.name)) {
            // An agent given a Kubernetes inventory (`restart_agent_with`) does not read the file.
            if self.reads_inventory_file(&n.name)? {
                nodes.push(n.name.clone());
            }
        }
        let mut before = Vec::new();
        for node in &nodes {
            before.push(self.inventory_counts(node)?);
        }
        self.set_applied(next.applied)?;
        state::write_atomic(&next.inventory, text.as_bytes())?;
        let mut reloaded = Vec::new();
        for (node, (loads, errors)) in nodes.iter().zip(before) {
            if unchanged {
                reloaded.push((node.clone(), loads));
                continue;
            }
            let deadline = Instant::now() + RELOAD_TIMEOUT;
            loop {
                let (l, e) = self.inventory_counts(node)?;
                if !valid && e > errors {
                    reloaded.push((node.clone(), l));
                    break;
                }
                if e > errors {
                    bail!(
                        "agent of {node} rejected the inventory:\n{}",
                        crate::agent::log_tail(&self.node(node).log, 10)
                    );
                }
                if l > loads {
                    if !valid {
                        bail!("agent of {node} loaded an inventory its parser rejects");
                    }
                    reloaded.push((node.clone(), l));
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("agent of {node} did not reload the inventory within {RELOAD_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(reloaded)
    }

    /// Whether `node`'s agent takes its inventory from the testbed's file (its status names
    /// the source).
    fn reads_inventory_file(&self, node: &str) -> Result<bool> {
        let st = self.status(node)?;
        let source = st.0["inventory"]["source"]
            .as_str()
            .context("status has no inventory.source")?;
        Ok(Path::new(source) == self.state().inventory)
    }

    /// `(loads, errors)` of `node`'s inventory watcher.
    fn inventory_counts(&self, node: &str) -> Result<(u64, u64)> {
        let st = self.status(node)?;
        let inv = &st.0["inventory"];
        Ok((
            inv["loads"]
                .as_u64()
                .context("status has no inventory.loads")?,
            inv["errors"]
                .as_u64()
                .context("status has no inventory.errors")?,
        ))
    }
}

/// Runs `ambit check-inventory` on `text` (written beside `inventory`): `Ok(Err(why))` when the
/// agent's parser rejects it, with the parser's message.
pub fn check_inventory(bin: &Path, inventory: &Path, text: &str) -> Result<Result<(), String>> {
    let mut name = inventory.as_os_str().to_owned();
    name.push(".check");
    let candidate = std::path::PathBuf::from(name);
    std::fs::write(&candidate, text).with_context(|| format!("writing {}", candidate.display()))?;
    let out = Command::new(bin)
        .arg("check-inventory")
        .arg(&candidate)
        .output()
        .with_context(|| format!("running {} check-inventory", bin.display()));
    let _ = std::fs::remove_file(&candidate);
    let out = out?;
    match out.status.code() {
        Some(0) => Ok(Ok(())),
        Some(1) => Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string())),
        _ => bail!(
            "{} check-inventory failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// How the agent reads YAML (`agent/src/yaml.rs`; this crate does not link the agent), so that
/// `name: yes` or `name: 017` is the same string here as there.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

/// Splits on `---` separator lines (a document may start with one).
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
            continue;
        }
        let cur = docs
            .last_mut()
            .expect("docs starts non-empty and only grows");
        cur.push_str(line);
        cur.push('\n');
    }
    docs.into_iter().filter(|d| !d.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_documents_by_kind_namespace_and_name() {
        let docs = documents(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls: {mode: STRICT}\n---\nkind: Namespace\nmetadata: {name: shop}\n---\nkind: Service\nmetadata: {name: web}\n",
        )
        .unwrap();
        let keys: Vec<String> = docs.iter().map(describe).collect();
        assert_eq!(
            keys,
            [
                "PeerAuthentication shop/strict",
                "Namespace shop",
                "Service default/web"
            ]
        );
        assert!(docs[0].yaml.contains("mode: STRICT"));
    }

    #[test]
    fn reads_names_as_the_agent_does() {
        // YAML 1.1 words and leading-zero digits are strings to the agent: the same here.
        let docs = documents("kind: Pod\nmetadata: {name: yes, namespace: 017}\n").unwrap();
        assert_eq!(describe(&docs[0]), "Pod 017/yes");
        assert!(documents("kind: Pod\nmetadata: {name: a, name: b}\n").is_err());
    }

    #[test]
    fn refuses_documents_without_kind_or_name() {
        assert!(documents("metadata: {name: x}\n").is_err());
        assert!(documents("kind: Service\nmetadata: {}\n").is_err());
        assert!(documents("kind: List\nitems: []\n").is_err());
    }
}
