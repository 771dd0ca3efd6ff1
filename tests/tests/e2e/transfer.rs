//! Bulk data through both agents: 20 MB each way, byte-exact (sha256).
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::client::sha256_file;
use ambit_e2e::{both_modes, Testbed, ECHO_PORT, HTTP_PORT};

const TWENTY_MB: usize = 20 * 1000 * 1000;

both_modes!(twenty_megabytes_echo_back_with_matching_sha256);
fn twenty_megabytes_echo_back_with_matching_sha256(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let report = tb.transfer("client", server, ECHO_PORT, TWENTY_MB).unwrap();
    assert_eq!(report["sent"], TWENTY_MB, "{report}");
    assert_eq!(report["recv"], TWENTY_MB, "{report}");
    assert_eq!(report["sent_sha256"], report["recv_sha256"], "{report}");
    assert!(tb.proxy_counter("node1", "client", "bytes_sent") >= TWENTY_MB as u64);
    assert!(tb.proxy_counter("node1", "client", "bytes_received") >= TWENTY_MB as u64);
}

both_modes!(twenty_megabyte_http_download_matches_the_served_file);
fn twenty_megabyte_http_download_matches_the_served_file(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let got = tb
        .http_download("client", server, HTTP_PORT, "/big.bin")
        .unwrap();
    let served = ambit_e2e::servers::web_root(tb.state()).join("big.bin");
    assert_eq!(
        std::fs::metadata(&got).unwrap().len(),
        ambit_e2e::servers::BIG_FILE_BYTES as u64
    );
    assert_eq!(sha256_file(&got).unwrap(), sha256_file(&served).unwrap());
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect"),
        redirects + 1
    );
}
