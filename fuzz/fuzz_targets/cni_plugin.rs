//! Fuzz target: the CNI plugin on arbitrary environment and stdin answers with a result or an error JSON, never panics.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: `KEY=VALUE` lines, a NUL, then the network configuration for stdin.
    let (env_part, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut env = BTreeMap::new();
    for line in String::from_utf8_lossy(env_part).lines() {
        if let Some((k, v)) = line.split_once('=') {
            // Never let fuzz input point the plugin at a real agent socket or netns.
            if k == "CNI_NETNS" {
                continue;
            }
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.insert("CNI_NETNS".into(), "/nonexistent/ambit-fuzz-netns".into());
    let mut stdin = stdin;
    let mut out = Vec::new();
    let code = ambit::cni::plugin::run(&env, &mut stdin, &mut out);
    assert!(code == 0 || !out.is_empty(), "a failing CNI call must print an error JSON");
});
