//! Fuzz target: admin API query parsing (percent-decoding, parameters, explain targets) never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let q = String::from_utf8_lossy(data);
    for name in ["from", "to", "level"] {
        if let Some(v) = ambit::admin::server::param(&q, name) {
            let _ = v.parse::<std::net::SocketAddr>();
        }
    }
});
