//! A write retried on another path after its first attempt stalled is fenced: the target
//! closes the stalled attempt's connection before it accepts the retry, so the old attempt's
//! bytes, delivered late, never land on top of newer writes.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Proxy, buffer, pattern, publish, store};
use mooncake_core::MemorySegment;
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;

#[test]
fn a_stalled_attempt_cannot_land_after_its_retry() {
    let md = store();
    let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
    let target = TransferEngine::builder("fence-target")
        .with_metadata(md.clone())
        .with_transport(TcpConfig::new().with_listen(ips))
        .build()
        .unwrap();
    let tbuf = buffer(&target, 1 << 20, 0);
    // The initiator reaches path 0 through a proxy that can stall it.
    let mut d = target.local_descriptor();
    let proxy = Proxy::start(d.tcp_data_addrs[0].parse().unwrap());
    d.tcp_data_addrs[0] = proxy.addr.to_string();
    publish(&md, &d);
    let init = TransferEngine::builder("fence-init")
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(1))
        .with_transport(TcpConfig::new().with_conns_per_path(1))
        .build()
        .unwrap();
    let a = buffer(&init, 64 << 10, 0xA);
    let b = buffer(&init, 64 << 10, 0xB);
    // Warm up: the first connection goes to path 0 (through the proxy).
    init.transfer_sync_write("fence-target", a.base(), tbuf.base() + (512 << 10), 4096)
        .unwrap();
    assert!(!proxy.upstream_closed.load(Ordering::Acquire));

    // Path 0 stalls with write A on it: it times out and is retried on path 1.
    proxy.hold();
    init.transfer_sync_write("fence-target", a.base(), tbuf.base(), 64 << 10)
        .expect("the stalled write is retried on the other path");
    assert_eq!(tbuf.to_vec()[..64 << 10], pattern(64 << 10, 0xA)[..]);
    // A newer write B to the same range.
    init.transfer_sync_write("fence-target", b.base(), tbuf.base(), 64 << 10)
        .unwrap();
    assert_eq!(tbuf.to_vec()[..64 << 10], pattern(64 << 10, 0xB)[..]);

    // The target closed the stalled attempt's connection before it accepted the retry.
    let t0 = Instant::now();
    while !proxy.upstream_closed.load(Ordering::Acquire) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the target kept the stalled attempt's connection open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Now the stalled bytes (write A) finally arrive: they must not land.
    let held = proxy.release();
    assert!(
        held >= 64 << 10,
        "the proxy held the stalled write ({held} bytes)"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tbuf.to_vec()[..64 << 10],
        pattern(64 << 10, 0xB)[..],
        "the old attempt landed after the newer write"
    );
}
