//! Splits a `CreateCertificate` answer into the certificate chain and the roots.
//!
//! Two shapes reach the client. `ambit ca` sends the leaf, the intermediates, and all roots
//! concatenated in the last entry. istiod sends one certificate per entry (it splits every PEM
//! bundle), its `cert-chain.pem` (which may end with a root) and then each root of its
//! `root-cert.pem`, so during a root rotation the roots take several trailing entries. The
//! roots are therefore every certificate of the last entry plus the self-signed certificates
//! just before it; the chain is the leaf and the rest. Which roots are *trusted* is decided by
//! the caller (they must meet the configured root file).
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;

use crate::identity::verify::parse_certificate;
use crate::identity::{BundleError, TrustBundle};

/// An answer, split.
#[derive(Debug)]
pub(super) struct Split {
    /// The leaf first, then intermediates.
    pub(super) chain: Vec<CertificateDer<'static>>,
    /// The roots sent along (each once).
    pub(super) roots: TrustBundle,
}

/// Why an answer cannot be split.
#[derive(Debug)]
pub(super) enum Error {
    /// No leaf or no roots.
    Short { entries: usize },
    /// An entry is not PEM certificates.
    Pem(pem::Error),
    /// The roots are not usable.
    Roots(BundleError),
}

/// Splits the entries of an answer (see the module doc).
pub(super) fn split(entries: &[String]) -> Result<Split, Error> {
    let short = Error::Short {
        entries: entries.len(),
    };
    let Some((last, before)) = entries
        .split_last()
        .filter(|(_, before)| !before.is_empty())
    else {
        return Err(short);
    };
    let parse = |pem: &String| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Pem)
    };
    let mut chain = Vec::new();
    for entry in before {
        chain.extend(parse(entry)?);
    }
    let mut roots = parse(last)?;
    if chain.is_empty() || roots.is_empty() {
        return Err(short);
    }
    // Self-signed certificates right before the last entry are roots too; never the leaf.
    while chain.len() > 1 && chain.last().is_some_and(self_signed) {
        if let Some(root) = chain.pop() {
            roots.insert(0, root);
        }
    }
    let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
    for root in roots {
        if !unique.contains(&root) {
            unique.push(root);
        }
    }
    let roots = TrustBundle::new(unique).map_err(Error::Roots)?;
    Ok(Split { chain, roots })
}

/// Whether `der` is a certificate whose subject is its issuer (unparsable: no).
fn self_signed(der: &CertificateDer<'_>) -> bool {
    parse_certificate(der).is_ok_and(|x509| x509.subject().as_raw() == x509.issuer().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TestCa;
    use crate::identity::{pem_block, verify_svid, PeerRole};

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn pem(der: &CertificateDer<'_>) -> String {
        pem_block("CERTIFICATE", der)
    }

    #[test]
    fn ambit_ca_shape_roots_concatenated_in_the_last_entry() {
        let (old, new) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
        let inter = old.intermediate();
        let leaf = inter.svid(WEB);
        let both = old.bundle().merged(&new.bundle());
        let entries: Vec<String> = leaf
            .chain()
            .iter()
            .map(pem)
            .chain([both.to_pem()])
            .collect();
        let split = split(&entries).unwrap();
        assert_eq!(split.chain, leaf.chain());
        assert_eq!(split.roots.roots(), both.roots());
    }

    #[test]
    fn istiod_shape_one_certificate_per_entry_with_a_multi_root_bundle() {
        // istiod with plugged-in certificates during a root rotation: leaf, intermediate, the
        // root ending cert-chain.pem, then each root of root-cert.pem (old, new).
        let (old, new) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
        let inter = old.intermediate();
        let leaf = inter.svid(WEB);
        let (old_bundle, new_bundle) = (old.bundle(), new.bundle());
        let (old_root, new_root) = (&old_bundle.roots()[0], &new_bundle.roots()[0]);
        let entries = vec![
            pem(&leaf.chain()[0]),
            pem(&leaf.chain()[1]),
            pem(old_root),
            pem(old_root),
            pem(new_root),
        ];
        let split = split(&entries).unwrap();
        assert_eq!(split.chain, leaf.chain(), "leaf and intermediate only");
        assert_eq!(
            split.roots.roots(),
            [old_root.clone(), new_root.clone()],
            "both roots, once each"
        );
        // The leaf verifies under the roots found; with only the last entry as roots it would not.
        let now = rustls_pki_types::UnixTime::now();
        let domains = ["cluster.local".parse().unwrap()];
        verify_svid(&split.chain, &split.roots, now, &domains, PeerRole::Client).unwrap();
        assert!(verify_svid(&split.chain, &new.bundle(), now, &domains, PeerRole::Client).is_err());
    }

    #[test]
    fn istiod_self_signed_shape_leaf_then_root() {
        let root = TestCa::new("cluster.local");
        let leaf = root.svid(WEB);
        let entries = vec![pem(&leaf.chain()[0]), root.bundle().to_pem()];
        let split = split(&entries).unwrap();
        assert_eq!(split.chain.len(), 1);
        assert_eq!(split.roots.roots(), root.bundle().roots());
    }

    #[test]
    fn a_self_signed_leaf_stays_the_leaf_and_short_answers_are_refused() {
        let root = TestCa::new("cluster.local");
        let root_pem = root.bundle().to_pem();
        // Only roots: the first one is taken as the leaf (and fails verification later).
        let split = split(&[root_pem.clone(), root_pem.clone()]).unwrap();
        assert_eq!(split.chain.len(), 1);
        for entries in [
            vec![],
            vec![root_pem.clone()],
            vec![String::new(), root_pem],
        ] {
            assert!(
                matches!(split_err(&entries), Error::Short { .. }),
                "{entries:?}"
            );
        }
    }

    fn split_err(entries: &[String]) -> Error {
        match split(entries) {
            Ok(s) => panic!("split {} entries: {s:?}", entries.len()),
            Err(e) => e,
        }
    }
}
