//! Fuzz target: X.509-SVID verification and CSR parsing on arbitrary DER never panic.
#![no_main]
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use ambit::identity::{verify_svid, CertificateAuthority, Csr, PeerRole, TrustBundle, TrustDomain};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

fn bundle() -> &'static (TrustBundle, Vec<TrustDomain>) {
    static B: OnceLock<(TrustBundle, Vec<TrustDomain>)> = OnceLock::new();
    B.get_or_init(|| {
        let td: TrustDomain = "cluster.local".parse().expect("constant trust domain");
        let ca = CertificateAuthority::generate_root(td.clone(), Duration::from_secs(86400), SystemTime::now())
            .expect("generate a root");
        (ca.roots().clone(), vec![td])
    })
}

fuzz_target!(|data: &[u8]| {
    let (roots, tds) = bundle();
    let whole = vec![CertificateDer::from(data.to_vec())];
    let _ = verify_svid(&whole, roots, UnixTime::now(), tds, PeerRole::Server);
    // First byte splits the input into a leaf and an intermediate.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len().saturating_sub(1));
    let rest = data.get(1..).unwrap_or_default();
    let (a, b) = rest.split_at(split.min(rest.len()));
    let chain = vec![CertificateDer::from(a.to_vec()), CertificateDer::from(b.to_vec())];
    let _ = verify_svid(&chain, roots, UnixTime::now(), tds, PeerRole::Client);
    let _ = verify_svid(&chain[..1], roots, UnixTime::now(), tds, PeerRole::Server);
    let _ = Csr::from_der(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Csr::from_pem(s);
        let _ = s.parse::<ambit::identity::SpiffeId>();
    }
});
