//! Fuzz target: the inventory parser (Kubernetes YAML: pods, services, Istio policies) never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ambit::inventory::file::parse(std::path::Path::new("fuzz.yaml"), text);
    }
});
