//! Fuzz target: the HBONE server's HTTP/2 handling (frames, CONNECT checks, accepted streams) on arbitrary client bytes never panics or hangs.
#![no_main]
use std::time::Duration;

use ambit::identity::SpiffeId;
use ambit::tunnel::server::{serve_h2, PendingConnect, ServerLimits};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let _drain_tx = ambit::drain::Trigger::new();
        let drain_rx = _drain_tx.signal();
        let id: SpiffeId = "spiffe://cluster.local/ns/fuzz/sa/client"
            .parse()
            .expect("constant identity");
        let peer = "10.1.0.2:40000".parse().expect("constant address");
        // Even ports are accepted (the stream is echoed, bounded), odd ones refused.
        let handle = |p: PendingConnect| async move {
            if p.connect.authority.port() % 2 == 1 {
                p.refuse(ambit::reason::Reason::PolicyDenied);
                return;
            }
            if let Some(mut stream) = p.accept() {
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = stream.read(&mut buf).await {
                    let _ = stream.write_all(&buf[..n]).await;
                }
                let _ = stream.shutdown().await;
            }
        };
        let serve = serve_h2(server, peer, id, ServerLimits::default(), drain_rx, handle);
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Give the server (same thread, no timers) some turns to answer, reading what it
            // sends, then close: an input costs its CPU time only.
            let mut sink = vec![0u8; 64 * 1024];
            for _ in 0..64 {
                tokio::select! {
                    biased;
                    r = client.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
                    () = tokio::task::yield_now() => {}
                }
            }
            drop(client);
        };
        let served =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serve, feed) }).await;
        assert!(
            served.is_ok(),
            "serve_h2 still running 5 s after its peer closed"
        );
    });
});
