//! End-to-end tests over real verbs devices (soft-RoCE in `cargo xtask rxe`).
//!
//! They need RDMA devices and run only with `MOONCAKE_TEST_RDMA=1`; without it each prints
//! why it was skipped. With it set they must pass: a missing device is a failure. The
//! transport conformance suite (`tests/conformance.rs`) covers dead and restarted peers.
//!
//! The VM's rxe devices loop back only to themselves, so engines use
//! [`PathPolicy::SameRailOnly`] (rxe0 ↔ rxe0, rxe1 ↔ rxe1).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{
    Access, ErrorKind, LocalBuffer, MemorySegment, Opcode, SegmentHandle, TransferRequest,
};
use mooncake_engine::TransferEngine;
use mooncake_transport_rdma::{PathPolicy, RdmaConfig, device_names, rdma_tests_enabled};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

/// Device tests are compiled in as `#[ignore]`d unless built with `MOONCAKE_TEST_RDMA=1`;
/// when they do run, the variable must still be set (the VM runner sets it).
fn require_devices() {
    assert!(
        rdma_tests_enabled(),
        "built for RDMA tests but MOONCAKE_TEST_RDMA=1 is not set at run time"
    );
    assert!(
        !device_names().is_empty(),
        "MOONCAKE_TEST_RDMA=1 but this host has no RDMA devices"
    );
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn config() -> RdmaConfig {
    RdmaConfig::new().with_path_policy(PathPolicy::SameRailOnly)
}

fn engine(name: &str, cfg: RdmaConfig) -> TransferEngine {
    TransferEngine::builder(name)
        .with_transport(cfg)
        .build()
        .expect("engine with RDMA transport")
}

fn buffer(e: &TransferEngine, len: usize) -> Arc<LocalBuffer> {
    let b = Arc::new(LocalBuffer::new(len).unwrap());
    e.register(b.clone()).unwrap();
    b
}

fn seed() -> u64 {
    let s = std::env::var("MOONCAKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {s} (MOONCAKE_TEST_SEED)");
    s
}

#[test]
fn no_devices_is_reported_on_hosts_without_rdma() {
    if !device_names().is_empty() {
        eprintln!("SKIPPED: this host has RDMA devices {:?}", device_names());
        return;
    }
    let err = TransferEngine::builder("no-rdma")
        .with_transport(RdmaConfig::new())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("no RDMA devices"), "{err}");
}

#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn random_batches_round_trip() {
    require_devices();
    init_tracing();
    let mut rng = StdRng::seed_from_u64(seed());
    let cfg_a = config().with_slice_size(16 << 10);
    let stats = cfg_a.stats();
    let a = engine("rt-a", cfg_a);
    let b = engine("rt-b", config());
    const LEN: usize = 8 << 20;
    let src = buffer(&a, LEN);
    let back = buffer(&a, LEN);
    let dst = buffer(&b, LEN);
    let mut data = vec![0u8; LEN];
    rng.fill_bytes(&mut data);
    src.write_at(0, &data).unwrap();
    let h = a.open_segment_blocking("rt-b").unwrap();
    for round in 0..12 {
        // Random disjoint ranges: split [0, LEN) at random points, keep a random subset.
        let mut cuts: Vec<usize> = (0..rng.random_range(1..24))
            .map(|_| rng.random_range(0..LEN))
            .collect();
        cuts.push(0);
        cuts.push(LEN);
        cuts.sort_unstable();
        cuts.dedup();
        let ranges: Vec<(usize, usize)> = cuts
            .windows(2)
            .map(|w| (w[0], w[1] - w[0]))
            .filter(|_| rng.random_bool(0.7))
            .collect();
        if ranges.is_empty() {
            continue;
        }
        let fill = round as u8;
        dst.fill(0, LEN, fill).unwrap();
        back.fill(0, LEN, !fill).unwrap();
        let writes: Vec<TransferRequest> = ranges
            .iter()
            .map(|&(o, l)| TransferRequest {
                opcode: Opcode::Write,
                source: src.base() + o as u64,
                target_id: h,
                target_offset: dst.base() + o as u64,
                length: l as u64,
            })
            .collect();
        a.submit_batch(&writes)
            .unwrap()
            .wait_blocking(None)
            .unwrap();
        let got = dst.to_vec();
        let mut pos = 0;
        for &(o, l) in &ranges {
            assert!(
                got[pos..o].iter().all(|&x| x == fill),
                "round {round}: bytes outside the writes changed"
            );
            assert!(
                got[o..o + l] == data[o..o + l],
                "round {round}: write {o}+{l} differs"
            );
            pos = o + l;
        }
        assert!(got[pos..].iter().all(|&x| x == fill));
        let reads: Vec<TransferRequest> = ranges
            .iter()
            .map(|&(o, l)| TransferRequest {
                opcode: Opcode::Read,
                source: back.base() + o as u64,
                target_id: h,
                target_offset: dst.base() + o as u64,
                length: l as u64,
            })
            .collect();
        futures_block_on(a.submit_batch(&reads).unwrap());
        let got = back.to_vec();
        for &(o, l) in &ranges {
            assert!(
                got[o..o + l] == data[o..o + l],
                "round {round}: read {o}+{l} differs"
            );
        }
    }
    let nics = stats.nics();
    eprintln!("per-NIC stats: {nics:?}");
    if nics.len() >= 2 {
        assert!(
            nics.iter().all(|n| n.bytes > 0),
            "traffic must be spread over every NIC: {nics:?}"
        );
    }
}

/// Waits with the runtime-free future, polled by a small executor.
fn futures_block_on(batch: mooncake_core::Batch) {
    smol::block_on(batch.wait()).unwrap();
}

#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn tokio_and_smol_waiters_complete() {
    require_devices();
    init_tracing();
    let a = engine("rt2-a", config());
    let b = engine("rt2-b", config());
    let src = buffer(&a, 1 << 20);
    let dst = buffer(&b, 1 << 20);
    src.fill(0, 1 << 20, 0x5a).unwrap();
    let h = a.open_segment_blocking("rt2-b").unwrap();
    let req = [TransferRequest {
        opcode: Opcode::Write,
        source: src.base(),
        target_id: h,
        target_offset: dst.base(),
        length: 1 << 20,
    }];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(a.submit_batch(&req).unwrap().wait()).unwrap();
    assert!(dst.to_vec().iter().all(|&x| x == 0x5a));
    dst.fill(0, 1 << 20, 0).unwrap();
    smol::block_on(a.submit_batch(&req).unwrap().wait()).unwrap();
    assert!(dst.to_vec().iter().all(|&x| x == 0x5a));
}

#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn out_of_range_and_forbidden_access_is_rejected() {
    require_devices();
    init_tracing();
    let a = engine("oor-a", config());
    let b = engine("oor-b", config());
    let src = buffer(&a, 1 << 20);
    let dst = buffer(&b, 1 << 20);
    let ro = Arc::new(
        LocalBuffer::new(1 << 16)
            .unwrap()
            .with_access(Access::ReadOnly),
    );
    b.register(ro.clone()).unwrap();
    let hidden = Arc::new(
        LocalBuffer::new(1 << 16)
            .unwrap()
            .with_access(Access::LocalOnly),
    );
    b.register(hidden.clone()).unwrap();
    let h = a.open_segment_blocking("oor-b").unwrap();
    let one = |op, target: u64, len: u64| {
        let r = [TransferRequest {
            opcode: op,
            source: src.base(),
            target_id: h,
            target_offset: target,
            length: len,
        }];
        a.submit_batch(&r)
            .unwrap()
            .wait_blocking(Some(Instant::now() + Duration::from_secs(15)))
    };
    // Works in range.
    one(Opcode::Write, dst.base(), 4096).unwrap();
    // Past the end, before the start, wrapping: refused before anything moves.
    for (addr, len) in [
        (dst.base() + (1 << 20) - 10, 20),
        (dst.base() - 1, 8),
        (u64::MAX - 4, 16),
    ] {
        let e = one(Opcode::Write, addr, len).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RemoteAccess, "{e}");
    }
    // A LocalOnly region is not published at all.
    assert_eq!(
        one(Opcode::Read, hidden.base(), 64).unwrap_err().kind(),
        ErrorKind::RemoteAccess
    );
    // A ReadOnly region may be read, and the NIC refuses writes (its MR has no remote write).
    one(Opcode::Read, ro.base(), 4096).unwrap();
    let e = one(Opcode::Write, ro.base(), 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteAccess, "{e}");
    assert!(
        ro.to_vec().iter().all(|&x| x == 0),
        "a refused write must not land"
    );
    // A region unregistered after the descriptor was cached: the peer hands out no key.
    let gone = buffer(&b, 1 << 16);
    let h2 = {
        a.close_segment(h).unwrap();
        a.open_segment_blocking("oor-b").unwrap()
    };
    b.unregister_memory(gone.base()).unwrap();
    let r = [TransferRequest {
        opcode: Opcode::Write,
        source: src.base(),
        target_id: h2,
        target_offset: gone.base(),
        length: 64,
    }];
    let e = a
        .submit_batch(&r)
        .unwrap()
        .wait_blocking(Some(Instant::now() + Duration::from_secs(15)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteAccess, "{e}");
    // And the endpoint still works afterwards.
    let r = [TransferRequest {
        opcode: Opcode::Write,
        source: src.base(),
        target_id: h2,
        target_offset: dst.base(),
        length: 1 << 20,
    }];
    a.submit_batch(&r).unwrap().wait_blocking(None).unwrap();
}

/// `MOONCAKE_RXE_NETDEVS=rxe0=mc0,rxe1=mc1`, set by the VM runner.
fn netdev_of(nic: &str) -> Option<String> {
    std::env::var("MOONCAKE_RXE_NETDEVS")
        .ok()?
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == nic)
        .map(|(_, v)| v.to_string())
}

fn ip_link(dev: &str, state: &str) {
    let st = Command::new("ip")
        .args(["link", "set", dev, state])
        .status()
        .expect("run ip");
    assert!(st.success(), "ip link set {dev} {state}");
}

#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn link_down_fails_over_to_the_other_nic() {
    require_devices();
    init_tracing();
    let names = device_names();
    assert!(
        names.len() >= 2,
        "this test needs two RDMA devices, found {names:?}"
    );
    let victim = names[1].clone();
    let dev = netdev_of(&victim).expect("MOONCAKE_RXE_NETDEVS names the victim's netdev");
    let cfg = config().with_rail_pause(Duration::from_secs(1));
    let stats = cfg.stats();
    let a = engine("lf-a", cfg);
    let b = engine("lf-b", config());
    const LEN: usize = 4 << 20;
    let src = buffer(&a, LEN);
    let dst = buffer(&b, LEN);
    let mut rng = StdRng::seed_from_u64(seed());
    let h = a.open_segment_blocking("lf-b").unwrap();
    let victim_idx = stats.nics().iter().position(|n| n.name == victim).unwrap();
    let run = |rng: &mut StdRng, h: SegmentHandle| {
        let mut data = vec![0u8; LEN];
        rng.fill_bytes(&mut data);
        src.write_at(0, &data).unwrap();
        let reqs: Vec<TransferRequest> = (0..16)
            .map(|i| TransferRequest {
                opcode: Opcode::Write,
                source: src.base() + (i * LEN / 16) as u64,
                target_id: h,
                target_offset: dst.base() + (i * LEN / 16) as u64,
                length: (LEN / 16) as u64,
            })
            .collect();
        a.submit_batch(&reqs)
            .unwrap()
            .wait_blocking(None)
            .expect("every request completes");
        assert!(dst.to_vec() == data, "bytes differ after a batch");
    };
    for _ in 0..3 {
        run(&mut rng, h);
    }
    let before = stats.nics()[victim_idx].bytes;
    assert!(
        before > 0,
        "both NICs carry traffic before the failure: {:?}",
        stats.nics()
    );
    // Take the link down while a batch is in flight.
    let downer = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            ip_link(&dev, "down");
        })
    };
    for _ in 0..6 {
        run(&mut rng, h);
    }
    downer.join().unwrap();
    let during = stats.nics();
    eprintln!("after link down: {during:?}, retries {}", stats.retries());
    for _ in 0..3 {
        run(&mut rng, h);
    }
    assert_eq!(
        stats.nics()[victim_idx].bytes,
        during[victim_idx].bytes,
        "a down NIC carries nothing"
    );
    ip_link(&dev, "up");
    // The rail is probed and used again once the port is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let resumed = loop {
        run(&mut rng, h);
        if stats.nics()[victim_idx].bytes > during[victim_idx].bytes {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        resumed,
        "the NIC is used again after link up: {:?}",
        stats.nics()
    );
}

#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn endpoint_pool_is_bounded() {
    require_devices();
    init_tracing();
    // One endpoint slot per NIC, three peers: endpoints are evicted and re-created, and every
    // transfer still lands.
    let cfg = config().with_max_endpoints(1);
    let stats = cfg.stats();
    let a = engine("pool-a", cfg);
    let src = buffer(&a, 1 << 16);
    src.fill(0, 1 << 16, 3).unwrap();
    let peers: Vec<(TransferEngine, Arc<LocalBuffer>)> = (0..3)
        .map(|i| {
            let e = engine(&format!("pool-p{i}"), config());
            let b = buffer(&e, 1 << 16);
            (e, b)
        })
        .collect();
    for round in 0..3 {
        for (i, (_, b)) in peers.iter().enumerate() {
            let h = a.open_segment_blocking(&format!("pool-p{i}")).unwrap();
            let r = [TransferRequest {
                opcode: Opcode::Write,
                source: src.base(),
                target_id: h,
                target_offset: b.base(),
                length: 1 << 16,
            }];
            a.submit_batch(&r)
                .unwrap()
                .wait_blocking(None)
                .unwrap_or_else(|e| panic!("round {round} peer {i}: {e}"));
            assert!(b.to_vec().iter().all(|&x| x == 3));
            b.fill(0, 1 << 16, 0).unwrap();
        }
    }
    let created: u64 = stats.nics().iter().map(|n| n.endpoints_created).sum();
    assert!(
        created > 3,
        "evicted endpoints are re-created: {:?}",
        stats.nics()
    );
}
