//! Fuzz target: the HBONE server's HTTP/2 handling (frames, CONNECT checks) on arbitrary client bytes never panics or hangs.
#![no_main]
use std::time::Duration;

use ambit::tunnel::server::{serve_h2, PendingConnect, ServerLimits};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (_drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let id = "spiffe://cluster.local/ns/fuzz/sa/client".parse().expect("constant identity");
        let peer = "10.1.0.2:40000".parse().expect("constant address");
        let serve = serve_h2(server, peer, id, ServerLimits::default(), drain_rx, |p: PendingConnect| async move {
            p.refuse(http::StatusCode::UNAUTHORIZED);
        });
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Keep our end open briefly so the server can answer.
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(client);
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(serve, feed) }).await;
    });
});
