//! Threads do not grow with peers: 100 initiator engines, each talking to one target (all in
//! this process), cost no thread of their own — the TCP I/O threads and the engines'
//! background thread are shared by the process. (`mooncake bench scale` measures 1,000
//! peers in other processes, with descriptors and memory per peer.)

mod common;

use std::sync::Arc;

use common::{buffer, pattern, store};
use mooncake_core::{LocalBuffer, MemorySegment};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_hundred_peers_add_no_threads() {
    const PEERS: usize = 100;
    const BLOCK: usize = 4096;
    let md = store();
    let target = TransferEngine::builder("scale-target")
        .with_metadata(md.clone())
        .with_transport(TcpConfig::new())
        .build()
        .unwrap();
    let tbuf = buffer(&target, PEERS * BLOCK, 0);
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let e = TransferEngine::builder(format!("scale-init-{i}"))
            .with_metadata(md.clone())
            .with_transport(TcpConfig::new())
            .build()
            .unwrap();
        let b = Arc::new(LocalBuffer::new(BLOCK).unwrap());
        b.write_at(0, &pattern(BLOCK, i as u64 + 1)).unwrap();
        e.register(b.clone()).unwrap();
        e.transfer_sync_write(
            "scale-target",
            b.base(),
            tbuf.base() + (i * BLOCK) as u64,
            BLOCK as u64,
        )
        .unwrap();
        peers.push((e, b));
    }
    let got = tbuf.to_vec();
    for i in 0..PEERS {
        assert!(
            got[i * BLOCK..(i + 1) * BLOCK] == pattern(BLOCK, i as u64 + 1)[..],
            "peer {i}"
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = threads();
    // cores + 8 for the library, plus the test harness's main and test threads.
    assert!(
        n <= cpus + 8 + 2,
        "{n} threads with {PEERS} peers (cores {cpus}): threads must not grow with peers"
    );
}
