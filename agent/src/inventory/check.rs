//! `ambit check-inventory`: parses an inventory file as `ambit run` reads it and summarises it.
use std::path::Path;

use super::file::{self, Error};

/// Reads and parses `path`; on success, a one-line summary of what the file holds.
pub fn check(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let snap = file::parse(path, &text)?;
    Ok(format!(
        "{}: {} pods, {} namespaces, {} services, {} PeerAuthentications, {} AuthorizationPolicies, {} DestinationRules",
        path.display(),
        snap.workloads.len(),
        snap.namespaces.len(),
        snap.services.len(),
        snap.peer_authentications.len(),
        snap.authorization_policies.len(),
        snap.destination_rules.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_a_valid_file_and_names_the_bad_field_of_another() {
        let dir = std::env::temp_dir().join(format!("ambit-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "kind: Namespace\nmetadata: {name: shop}\n---\nkind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
        )
        .unwrap();
        let summary = check(&good).unwrap();
        assert!(summary.contains("1 namespaces"), "{summary}");
        assert!(summary.contains("1 PeerAuthentications"), "{summary}");
        let bad = dir.join("bad.yaml");
        std::fs::write(
            &bad,
            "kind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: SOMETIMES}}\n",
        )
        .unwrap();
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.yaml") && err.contains("mode"), "{err}");
        assert!(matches!(
            check(&dir.join("missing.yaml")),
            Err(Error::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
