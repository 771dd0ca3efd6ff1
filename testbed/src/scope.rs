//! Which testbed `cargo xtask testbed` commands act on: one per scope (a checkout, or `--name`).
//!
//! Each scope keeps a pointer file `<BASE_DIR>/cli-instance.<scope>` holding the instance id, so
//! two people (or two checkouts) on one machine never attach to, or remove, each other's testbed.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::state::{self, BASE_DIR, CLI_POINTER};

/// A validated scope name: `[A-Za-z0-9._-]`, 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    name: String,
    origin: String,
}

impl Scope {
    /// A scope given by name (`--name`, `AMBIT_TESTBED`).
    pub fn named(name: &str) -> Result<Self> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            bail!("testbed name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ -");
        }
        Ok(Self {
            name: name.to_string(),
            origin: "--name".to_string(),
        })
    }

    /// The default scope of the checkout at `root`: its directory name and a hash of its path,
    /// so two checkouts never share a testbed by accident.
    pub fn of_checkout(root: &Path) -> Self {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let base: String = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .take(40)
            .collect();
        Self {
            name: format!(
                "{base}-{:08x}",
                fnv1a(root.as_os_str().as_encoded_bytes()) as u32
            ),
            origin: format!("checkout {}", root.display()),
        }
    }

    /// The scope's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the scope came from, for `status`: `checkout /path` or `--name`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The pointer file of this scope.
    pub fn pointer(&self) -> PathBuf {
        Path::new(BASE_DIR).join(format!("{CLI_POINTER}.{}", self.name))
    }

    /// The instance id this scope points at, if any.
    pub fn instance_id(&self) -> Option<String> {
        let id = fs::read_to_string(self.pointer()).ok()?;
        let id = id.trim();
        (!id.is_empty()).then(|| id.to_string())
    }

    /// Points this scope at instance `id`.
    pub fn point_at(&self, id: &str) -> Result<()> {
        fs::create_dir_all(BASE_DIR).with_context(|| format!("creating {BASE_DIR}"))?;
        state::write_atomic(&self.pointer(), id.as_bytes())
    }
}

/// Every scope pointer on this machine: `(scope name, instance id)`.
pub fn all_pointers() -> Vec<(String, String)> {
    let Ok(entries) = fs::read_dir(BASE_DIR) else {
        return Vec::new();
    };
    let prefix = format!("{CLI_POINTER}.");
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let scope = name.strip_prefix(&prefix)?.to_string();
            let id = fs::read_to_string(e.path()).ok()?.trim().to_string();
            Some((scope, id))
        })
        .collect();
    out.sort();
    out
}

/// Removes every scope pointer that points at instance `id` (its teardown).
pub fn forget_instance(id: &str) -> Result<()> {
    for (scope, pointed) in all_pointers() {
        if pointed == id {
            let file = Path::new(BASE_DIR).join(format!("{CLI_POINTER}.{scope}"));
            match fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("removing {}", file.display()))
                    )
                }
            }
        }
    }
    Ok(())
}

/// 64-bit FNV-1a: a stable hash (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(Scope::named("alice").is_ok());
        assert!(Scope::named("ci.run-2_b").is_ok());
        for bad in ["", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(Scope::named(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn checkouts_get_distinct_stable_scopes() {
        let a = Scope::of_checkout(Path::new("/nonexistent/alice/ambit"));
        let b = Scope::of_checkout(Path::new("/nonexistent/bob/ambit"));
        assert_ne!(a.name(), b.name());
        assert!(a.name().starts_with("ambit-"), "{}", a.name());
        assert_eq!(a, Scope::of_checkout(Path::new("/nonexistent/alice/ambit")));
        assert_eq!(a.origin(), "checkout /nonexistent/alice/ambit");
        assert!(
            Scope::named(a.name()).is_ok(),
            "derived names are valid names"
        );
        assert_ne!(a.pointer(), b.pointer());
    }

    #[test]
    fn fnv1a_matches_its_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
