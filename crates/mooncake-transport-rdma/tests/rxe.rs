//! End-to-end tests over real verbs devices (soft-RoCE in `cargo xtask rxe`).
//!
//! They need RDMA devices and run only when built with `MOONCAKE_TEST_RDMA=1` (otherwise
//! they are ignored with the reason); then they must pass: a missing device is a failure.
//! The transport conformance suite (`tests/conformance.rs`) covers dead and restarted peers.
//!
//! The VM's rxe devices loop back only to themselves, so engines use
//! [`PathPolicy::SameRailOnly`] (rxe0 ↔ rxe0, rxe1 ↔ rxe1). Tests that need a single rail
//! (so that a failure cannot hide behind a failover) use only `rxe0`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mooncake_core::{
    Access, Batch, ClusterSecret, EmbeddedMetadataStore, ErrorKind, LocalBuffer, MemorySegment,
    MetadataKeys, MetadataStore, Opcode, RemoteSegment, Requester, SegmentDescriptor,
    SegmentHandle, TransferRequest, TransferStatus, TransferTask, block_on,
};
use mooncake_engine::TransferEngine;
use mooncake_testkit::{pattern, unique};
use mooncake_transport_rdma::{
    HANDSHAKE_KEY, PathPolicy, RdmaConfig, RdmaStats, device_names, rdma_tests_enabled,
};
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
#[cfg_attr(
    mooncake_rdma_tests,
    ignore = "for hosts without RDMA devices (this build runs the device tests)"
)]
fn no_devices_is_reported_on_hosts_without_rdma() {
    if !device_names().is_empty() {
        eprintln!(
            "this host has RDMA devices {:?} but the device tests are not built: run `cargo xtask rxe`",
            device_names()
        );
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
    assert!(nics.len() >= 2, "the VM has two RDMA devices: {nics:?}");
    assert!(
        nics.iter().all(|n| n.bytes > 0),
        "traffic must be spread over every NIC: {nics:?}"
    );
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

// ---------------------------------------------------------------------------------------
// Soundness and isolation (issue 11): unregister, blackholed peers, bad completions, the CQ
// bound, the handshake listener.
// ---------------------------------------------------------------------------------------

const TIMEOUT: Duration = Duration::from_secs(5);

fn store() -> Arc<dyn MetadataStore> {
    Arc::new(EmbeddedMetadataStore::new())
}

fn engine_md(name: &str, cfg: RdmaConfig, md: &Arc<dyn MetadataStore>) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(TIMEOUT)
        .with_transport(cfg)
        .build()
        .expect("engine with RDMA transport")
}

fn patterned(e: &TransferEngine, len: usize, seed: u64) -> Arc<LocalBuffer> {
    let b = Arc::new(LocalBuffer::new(len).unwrap());
    b.write_at(0, &pattern(len, seed)).unwrap();
    e.register(b.clone()).unwrap();
    b
}

fn publish(md: &Arc<dyn MetadataStore>, d: &SegmentDescriptor) {
    block_on(md.put(&MetadataKeys::from_env().segment(&d.name), d.to_json())).unwrap();
}

fn handshake_addr(e: &TransferEngine) -> String {
    e.local_descriptor().extra[HANDSHAKE_KEY]
        .as_str()
        .expect("the handshake address is published")
        .to_string()
}

fn endpoints_created(stats: &RdmaStats) -> u64 {
    stats.nics().iter().map(|n| n.endpoints_created).sum()
}

fn failed_slices(stats: &RdmaStats) -> u64 {
    stats.nics().iter().map(|n| n.failed_slices).sum()
}

fn req(op: Opcode, local: u64, h: SegmentHandle, remote: u64, len: u64) -> TransferRequest {
    TransferRequest {
        opcode: op,
        source: local,
        target_id: h,
        target_offset: remote,
        length: len,
    }
}

/// Drops every packet to a TCP port on `lo` (`tc` u32 filter) while it lives.
struct Blackhole;

impl Blackhole {
    fn tcp_port(port: u16) -> Self {
        let tc = |args: &str| {
            let st = Command::new("tc")
                .args(args.split_whitespace())
                .status()
                .expect("run tc");
            assert!(st.success(), "tc {args}");
        };
        // A leftover from an earlier failed run (none normally: the guest starts clean).
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", "lo", "root"])
            .stderr(std::process::Stdio::null())
            .status();
        tc("qdisc add dev lo root handle 1: prio");
        tc(&format!(
            "filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff action drop"
        ));
        Self
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", "lo", "root"])
            .status();
    }
}

/// Target-side unregister racing in-flight READs and WRITEs into the region, on one rail:
/// once `unregister_memory` returns no byte lands in the region, later accesses through the
/// stale descriptor fail with `RemoteAccess`, and the requests of the same batch to another
/// region (on the same QPs, flushed when the NIC refused a slice) all complete.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn unregister_races_remote_reads_and_writes() {
    require_devices();
    init_tracing();
    const LEN: u64 = 4 << 20;
    const N: u64 = 32;
    const BLOCK: u64 = LEN / N;
    let md = store();
    let tname = unique("ur-t");
    let t = engine_md(&tname, config().with_nics(["rxe0"]), &md);
    let i = engine_md(
        &unique("ur-i"),
        config().with_nics(["rxe0"]).with_slice_size(16 << 10),
        &md,
    );
    let lbuf = patterned(&i, 2 * LEN as usize, 1);
    for round in 0..4u64 {
        lbuf.write_at(0, &pattern(2 * LEN as usize, 1)).unwrap();
        let gone = patterned(&t, LEN as usize, 10 + round);
        let kept = patterned(&t, LEN as usize, 20 + round);
        let h = i.open_segment_blocking(&tname).unwrap();
        block_on(i.refresh_segment(h)).unwrap();
        // Interleaved: request 2k goes to `gone`, 2k+1 to `kept`; even blocks write, odd read.
        let mut reqs = Vec::new();
        for k in 0..N {
            let op = if k % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            };
            reqs.push(req(
                op,
                lbuf.base() + k * BLOCK,
                h,
                gone.base() + k * BLOCK,
                BLOCK,
            ));
            reqs.push(req(
                op,
                lbuf.base() + LEN + k * BLOCK,
                h,
                kept.base() + k * BLOCK,
                BLOCK,
            ));
        }
        let batch = i.submit_batch(&reqs).unwrap();
        std::thread::sleep(Duration::from_millis(2 * round));
        t.unregister_memory(gone.base()).unwrap();
        let after = gone.to_vec();
        let _ = batch.wait_blocking(Some(Instant::now() + 3 * TIMEOUT));
        assert!(batch.is_done(), "round {round}: tasks still pending");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            gone.to_vec() == after,
            "round {round}: bytes landed after unregister_memory returned"
        );
        let mut refused = 0;
        for (j, _) in reqs.iter().enumerate() {
            let st = batch.status(j);
            if j % 2 == 1 {
                assert_eq!(
                    st,
                    TransferStatus::Completed,
                    "round {round}: request {j} to the kept region failed: {:?}",
                    batch.error(j)
                );
            } else if st != TransferStatus::Completed {
                refused += 1;
                let e = batch.error(j).expect("a failed task has an error");
                assert_eq!(e.kind(), ErrorKind::RemoteAccess, "round {round}: {e}");
            }
        }
        eprintln!("round {round}: {refused} of {N} requests to the unregistered region refused");
        // The kept region's bytes: writes landed, reads brought its bytes.
        let kept_now = kept.to_vec();
        let kept_was = pattern(LEN as usize, 20 + round);
        let local = lbuf.to_vec();
        let local_was = pattern(2 * LEN as usize, 1);
        for k in 0..N as usize {
            let r = k * BLOCK as usize..(k + 1) * BLOCK as usize;
            let l = LEN as usize + r.start..LEN as usize + r.end;
            if k % 2 == 0 {
                assert!(
                    kept_now[r.clone()] == local_was[l],
                    "round {round}: write {k}"
                );
            } else {
                assert!(local[l] == kept_was[r.clone()], "round {round}: read {k}");
            }
        }
        // Later accesses through the stale descriptor fail; the kept region still works.
        for op in [Opcode::Write, Opcode::Read] {
            let e = i
                .submit_batch(&[req(op, lbuf.base(), h, gone.base(), 4096)])
                .unwrap()
                .wait_blocking(Some(Instant::now() + 3 * TIMEOUT))
                .unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::RemoteAccess,
                "round {round}: {op:?}: {e}"
            );
        }
        assert!(
            gone.to_vec() == after,
            "round {round}: a later write landed"
        );
        i.submit_batch(&[req(Opcode::Write, lbuf.base(), h, kept.base(), 4096)])
            .unwrap()
            .wait_blocking(None)
            .unwrap();
        t.unregister_memory(kept.base()).unwrap();
    }
}

/// A peer whose packets are all dropped (its QPs are gone and its handshake port is
/// blackholed with `tc`): its tasks fail within the deadline, transfers to another peer on
/// the same NIC keep completing meanwhile, and unregistering the local source of the stuck
/// tasks returns at once.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn blackholed_peer_fails_within_deadline_without_stalling_others() {
    require_devices();
    init_tracing();
    let md = store();
    let a = engine_md(&unique("bh-a"), config().with_nics(["rxe0"]), &md);
    let hname = unique("bh-h");
    let h = engine_md(&hname, config(), &md);
    // The victim uses its own metadata store: when it goes away, `a` is not told.
    let vname = unique("bh-v");
    let v = engine_md(&vname, config(), &store());
    let abuf = patterned(&a, 8 << 20, 1);
    let hbuf = patterned(&h, 1 << 20, 2);
    let vbuf = patterned(&v, 8 << 20, 3);
    publish(&md, &v.local_descriptor());
    let hv = a.open_segment_blocking(&vname).unwrap();
    let hh = a.open_segment_blocking(&hname).unwrap();
    a.submit_batch(&[req(Opcode::Write, abuf.base(), hv, vbuf.base(), 1 << 20)])
        .unwrap()
        .wait_blocking(None)
        .expect("the victim works before the blackhole");
    let port: u16 = handshake_addr(&v)
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port");
    let _bh = Blackhole::tcp_port(port);
    // Its QPs go away with it; RDMA packets to them are now silently dropped.
    drop(v);
    drop(vbuf);

    // Small transfers to the healthy peer, on the same NIC, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let worst_us = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let pump = {
        let (a, stop, worst_us, done) = (a.clone(), stop.clone(), worst_us.clone(), done.clone());
        let (src, dst) = (abuf.base() + (7 << 20), hbuf.base());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                a.submit_batch(&[req(Opcode::Write, src, hh, dst, 64 << 10)])
                    .unwrap()
                    .wait_blocking(Some(t0 + 3 * TIMEOUT))
                    .expect("transfers to the healthy peer keep working");
                worst_us.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let check_failed = |what: &str, batch: &mooncake_core::Batch, t0: Instant, n: usize| {
        let _ = batch.wait_blocking(Some(t0 + 3 * TIMEOUT));
        let took = t0.elapsed();
        assert!(
            batch.is_done(),
            "{what}: tasks still pending after {took:?}"
        );
        assert!(
            took <= TIMEOUT + Duration::from_secs(1),
            "{what}: took {took:?} (deadline {TIMEOUT:?})"
        );
        assert_eq!(
            batch.failed(),
            n,
            "{what}: a task to a blackholed peer succeeded"
        );
        for j in 0..n {
            let e = batch.error(j).unwrap();
            assert!(
                matches!(e.kind(), ErrorKind::PeerUnreachable | ErrorKind::Timeout),
                "{what}: {e}"
            );
        }
        eprintln!("{what}: failed in {took:?}");
    };
    // 1. Posted on the connected QP: the NIC's retries run out.
    let vbase = a.segment(hv).unwrap().descriptor().buffers[0].addr;
    let reqs: Vec<_> = (0..32)
        .map(|k| {
            req(
                Opcode::Write,
                abuf.base() + (k << 16),
                hv,
                vbase + (k << 16),
                64 << 10,
            )
        })
        .collect();
    let t0 = Instant::now();
    let batch = a.submit_batch(&reqs).unwrap();
    check_failed("posted to a vanished QP", &batch, t0, reqs.len());
    // 2. A new connection: the handshake's packets are dropped.
    let src2 = patterned(&a, 2 << 20, 4);
    let reqs2: Vec<_> = (0..32)
        .map(|k| {
            req(
                Opcode::Write,
                src2.base() + (k << 16),
                hv,
                vbase + (k << 16),
                64 << 10,
            )
        })
        .collect();
    let t0 = Instant::now();
    let batch = a.submit_batch(&reqs2).unwrap();
    check_failed("handshake blackholed", &batch, t0, reqs2.len());
    // 3. Unregistering the source of tasks stuck behind the blackholed handshake is prompt.
    let t0 = Instant::now();
    let batch = a.submit_batch(&reqs2).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    a.unregister_memory(src2.base()).unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "unregister waited {took:?} for tasks stuck behind a blackholed handshake"
    );
    let _ = batch.wait_blocking(Some(Instant::now() + 3 * TIMEOUT));
    assert_eq!(batch.failed(), reqs2.len());
    stop.store(true, Ordering::Relaxed);
    pump.join().unwrap();
    let worst = Duration::from_micros(worst_us.load(Ordering::Relaxed));
    let n = done.load(Ordering::Relaxed);
    eprintln!("healthy peer: {n} transfers, worst {worst:?}");
    assert!(n >= 20, "only {n} transfers to the healthy peer completed");
    assert!(
        worst < Duration::from_secs(1),
        "a transfer to the healthy peer took {worst:?} while another peer was blackholed"
    );
}

/// Many clients that open handshake connections and trickle a huge frame byte by byte do
/// not keep a legitimate peer from connecting.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn slow_handshake_clients_do_not_stall_the_listener() {
    require_devices();
    init_tracing();
    let md = store();
    let tname = unique("sl-t");
    let t = engine_md(&tname, config(), &md);
    let tbuf = patterned(&t, 1 << 20, 1);
    let addr = handshake_addr(&t);
    let stop = Arc::new(AtomicBool::new(false));
    let n = mooncake_testkit::attack::slow_connections_that_fit();
    let mut slow: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            // A 16 MiB frame, announced but never delivered.
            s.write_all(&(16u32 << 20).to_le_bytes()).unwrap();
            s
        })
        .collect();
    let trickle = {
        let stop = stop.clone();
        let mut socks: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &mut socks {
                    let _ = s.write(b"{");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let i = engine_md(&unique("sl-i"), config(), &md);
    let ibuf = patterned(&i, 1 << 20, 2);
    let t0 = Instant::now();
    i.transfer_sync_write(&tname, ibuf.base(), tbuf.base(), 1 << 20)
        .expect("a legitimate peer connects while others trickle");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "connecting took {took:?}");
    assert!(tbuf.to_vec() == pattern(1 << 20, 2));
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    slow.clear();
}

fn frame(v: &serde_json::Value) -> Vec<u8> {
    let body = serde_json::to_vec(v).unwrap();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn read_frame(s: &mut TcpStream) -> serde_json::Value {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// One raw handshake exchange: hello, `request` (with the nonce filled in unless `nonce`
/// overrides it), reply.
fn exchange(addr: &str, mut request: serde_json::Value, nonce: Option<&str>) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = read_frame(&mut s);
    let n = nonce.map_or_else(
        || hello["nonce"].as_str().unwrap().to_string(),
        str::to_string,
    );
    request["nonce"] = serde_json::Value::String(n);
    s.write_all(&frame(&request)).unwrap();
    read_frame(&mut s)
}

/// `Keys` is answered only for a QP the caller set up (and with its token); a request that
/// does not answer the connection's challenge is refused; a flood of `Connect` requests
/// does not evict a QP in use (the peer keeps working without reconnecting).
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn handshake_hands_keys_only_to_qp_owners_and_floods_keep_active_qps() {
    require_devices();
    init_tracing();
    let md = store();
    let tname = unique("kq-t");
    let tcfg = config().with_max_passive(8);
    let tstats = tcfg.stats();
    let t = engine_md(&tname, tcfg, &md);
    let tbuf = patterned(&t, 1 << 20, 1);
    let icfg = config();
    let istats = icfg.stats();
    let i = engine_md(&unique("kq-i"), icfg, &md);
    let ibuf = patterned(&i, 1 << 20, 2);
    let h = i.open_segment_blocking(&tname).unwrap();
    let round = |seed: u64| {
        ibuf.write_at(0, &pattern(1 << 20, seed)).unwrap();
        let reqs: Vec<_> = (0..16u64)
            .map(|k| {
                req(
                    Opcode::Write,
                    ibuf.base() + (k << 16),
                    h,
                    tbuf.base() + (k << 16),
                    64 << 10,
                )
            })
            .collect();
        i.submit_batch(&reqs).unwrap().wait_blocking(None).unwrap();
        assert!(tbuf.to_vec() == pattern(1 << 20, seed));
    };
    round(3);
    let created = endpoints_created(&istats);
    let failed = failed_slices(&istats);
    assert!(created >= 2, "both rails connected: {:?}", istats.nics());
    let addr = handshake_addr(&t);
    let nic = t.local_descriptor().devices[0].clone();
    let gid = nic.gid.replace(':', "");
    // Keys for a QP we never set up, with a guessed token: refused, no keys.
    let r = exchange(
        &addr,
        serde_json::json!({"op": "keys", "version": 3, "from": "mallory", "to": tname,
            "peer_nic": nic.name, "qpn": 1, "token": "00000000000000000000000000000000"}),
        None,
    );
    assert_eq!(r["status"], "refused", "{r}");
    assert!(r.get("keys").is_none(), "{r}");
    // A request that does not answer the connection's challenge: refused.
    let qp =
        |qpn: u32| serde_json::json!({"qpn": qpn, "psn": 1, "gid": gid, "lid": 0, "mtu": 1024});
    let r = exchange(
        &addr,
        serde_json::json!({"op": "connect", "version": 3, "from": "mallory", "generation": 1,
            "to": tname, "local_nic": nic.name, "peer_nic": nic.name, "qp": qp(77)}),
        Some("not-the-nonce"),
    );
    assert_eq!(r["status"], "refused", "{r}");
    // A flood of connects from ever new names.
    let mut accepted = 0;
    let mut busy = 0;
    for k in 0..40u32 {
        let r = exchange(
            &addr,
            serde_json::json!({"op": "connect", "version": 3, "from": format!("mallory{k}"),
                "to": tname, "generation": k, "local_nic": nic.name, "peer_nic": nic.name, "qp": qp(1000 + k)}),
            None,
        );
        if r["status"] == "ok" {
            accepted += 1;
            // A QP owner may list the keys again with its token.
            let again = exchange(
                &addr,
                serde_json::json!({"op": "keys", "version": 3, "from": format!("mallory{k}"),
                    "generation": k, "to": tname, "peer_nic": nic.name, "qpn": r["qp"]["qpn"], "token": r["token"]}),
                None,
            );
            assert_eq!(again["status"], "ok", "{again}");
        } else if r["busy"] == true {
            busy += 1;
        }
    }
    eprintln!(
        "flood: {accepted} accepted, {busy} refused as busy; target refused {} in all, evicted {}",
        tstats.handshakes_refused(),
        tstats.passive_evictions()
    );
    assert!(
        busy > 0,
        "a full table refuses new peers rather than evicting active QPs"
    );
    // The legitimate peer's QPs survived: no reconnect, no failed slice.
    round(4);
    assert_eq!(endpoints_created(&istats), created, "{:?}", istats.nics());
    assert_eq!(failed_slices(&istats), failed, "{:?}", istats.nics());
}

/// One NIC, a CQ of 32 entries and 4 peers with 32 WRs in flight each: completions never
/// overrun the CQ and every byte arrives.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn the_cq_is_never_overrun() {
    require_devices();
    init_tracing();
    const PER: u64 = 512 << 10;
    let md = store();
    let cfg = config()
        .with_nics(["rxe0"])
        .with_cqe(32)
        .with_max_wr(32)
        .with_slice_size(4096);
    let stats = cfg.stats();
    let a = engine_md(&unique("cq-a"), cfg, &md);
    let abuf = patterned(&a, 4 * PER as usize, 1);
    let peers: Vec<(String, TransferEngine, Arc<LocalBuffer>)> = (0..4)
        .map(|k| {
            let name = unique("cq-p");
            let e = engine_md(&name, config(), &md);
            let b = patterned(&e, PER as usize, 10 + k);
            (name, e, b)
        })
        .collect();
    let handles: Vec<SegmentHandle> = peers
        .iter()
        .map(|(n, _, _)| a.open_segment_blocking(n).unwrap())
        .collect();
    for round in 0..3u64 {
        abuf.write_at(0, &pattern(4 * PER as usize, 100 + round))
            .unwrap();
        let mut reqs = Vec::new();
        for (k, (_, _, b)) in peers.iter().enumerate() {
            let l = abuf.base() + k as u64 * PER;
            reqs.push(req(Opcode::Write, l, handles[k], b.base(), PER / 2));
            reqs.push(req(
                Opcode::Read,
                l + PER / 2,
                handles[k],
                b.base() + PER / 2,
                PER / 2,
            ));
        }
        a.submit_batch(&reqs)
            .unwrap()
            .wait_blocking(Some(Instant::now() + 3 * TIMEOUT))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let local = abuf.to_vec();
        let sent = pattern(4 * PER as usize, 100 + round);
        for (k, (_, _, b)) in peers.iter().enumerate() {
            let off = k * PER as usize;
            let remote = b.to_vec();
            let half = PER as usize / 2;
            assert!(
                remote[..half] == sent[off..off + half],
                "round {round}: write to peer {k}"
            );
            assert!(
                local[off + half..off + 2 * half] == remote[half..],
                "round {round}: read from peer {k}"
            );
        }
    }
    assert_eq!(failed_slices(&stats), 0, "{:?}", stats.nics());
}

/// `forget_peer` with a generation drops only the endpoints of that generation.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn forget_peer_honours_the_generation() {
    require_devices();
    init_tracing();
    let md = store();
    let cfg = config();
    let stats = cfg.stats();
    let a = engine_md(&unique("fg-a"), cfg, &md);
    let pname = unique("fg-p");
    let p = engine_md(&pname, config(), &md);
    let abuf = patterned(&a, 1 << 20, 1);
    let pbuf = patterned(&p, 1 << 20, 2);
    let write = || {
        a.transfer_sync_write(&pname, abuf.base(), pbuf.base(), 1 << 20)
            .unwrap();
    };
    write();
    let created = endpoints_created(&stats);
    let t = a.transports()[0].clone();
    t.forget_peer(&pname, Some(p.generation().wrapping_add(1)));
    write();
    assert_eq!(
        endpoints_created(&stats),
        created,
        "forgetting another generation dropped the endpoints"
    );
    t.forget_peer(&pname, Some(p.generation()));
    write();
    assert!(
        endpoints_created(&stats) > created,
        "forgetting this generation drops its endpoints"
    );
}

fn engine_secret(
    name: &str,
    cfg: RdmaConfig,
    md: &Arc<dyn MetadataStore>,
    secret: Option<&[u8]>,
) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(TIMEOUT)
        .with_cluster_secret(secret.map(|s| ClusterSecret::from_bytes(s).unwrap()))
        .with_transport(cfg)
        .build()
        .expect("engine with RDMA transport")
}

/// With a cluster secret, only peers that prove it get a QP or a key, both ways: an
/// initiator without the secret or with another one is refused before any QP exists (the
/// target's memory is untouched), an unauthenticated raw request is denied, a target that
/// cannot prove the secret is refused by the initiator, and holders of the secret work.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn the_cluster_secret_guards_the_handshake() {
    require_devices();
    init_tracing();
    const GOOD: &[u8] = b"rdma-test-secret-0123456789";
    const OTHER: &[u8] = b"rdma-test-secret-9876543210";
    let md = store();
    let tname = unique("cs-t");
    let tcfg = config();
    let tstats = tcfg.stats();
    let t = engine_secret(&tname, tcfg, &md, Some(GOOD));
    let tbuf = patterned(&t, 1 << 20, 1);
    let guard = pattern(1 << 20, 1);
    for (what, secret) in [("no secret", None), ("another secret", Some(OTHER))] {
        let cfg = config();
        let stats = cfg.stats();
        let i = engine_secret(&unique("cs-x"), cfg, &md, secret);
        let ibuf = patterned(&i, 1 << 20, 2);
        let refused = tstats.handshakes_refused();
        let e = i
            .transfer_sync_write(&tname, ibuf.base(), tbuf.base(), 1 << 20)
            .expect_err(what);
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{what}: {e}");
        assert!(!e.is_temporary(), "{what}: {e}");
        assert!(tstats.handshakes_refused() > refused, "{what}");
        assert_eq!(endpoints_created(&stats), 0, "{what}: {:?}", stats.nics());
        // A READ is refused the same way (no key ever reached the peer).
        let e = i
            .transfer_sync_read(&tname, ibuf.base(), tbuf.base(), 4096)
            .expect_err(what);
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{what}: {e}");
        assert!(
            ibuf.to_vec() == pattern(1 << 20, 2),
            "{what}: bytes were read"
        );
        assert!(
            tbuf.to_vec() == guard,
            "{what}: the target's memory changed"
        );
    }
    // A raw request without a proof: denied, no QP, no keys.
    let nic = t.local_descriptor().devices[0].clone();
    let gid = nic.gid.replace(':', "");
    let r = exchange(
        &handshake_addr(&t),
        serde_json::json!({"op": "connect", "version": 3, "from": "mallory", "generation": 1,
            "to": tname, "local_nic": nic.name, "peer_nic": nic.name,
            "qp": {"qpn": 77, "psn": 1, "gid": gid, "lid": 0, "mtu": 1024}}),
        None,
    );
    assert_eq!(r["status"], "refused", "{r}");
    assert_eq!(r["denied"], true, "{r}");
    assert!(r.get("keys").is_none() && r.get("token").is_none(), "{r}");
    // An initiator with the secret refuses a target that cannot prove it.
    let oname = unique("cs-open");
    let open = engine_secret(&oname, config(), &md, None);
    let obuf = patterned(&open, 1 << 16, 3);
    let cfg = config();
    let stats = cfg.stats();
    let i = engine_secret(&unique("cs-i"), cfg, &md, Some(GOOD));
    let ibuf = patterned(&i, 1 << 20, 4);
    let e = i
        .transfer_sync_write(&oname, ibuf.base(), obuf.base(), 1 << 16)
        .expect_err("a target without the secret");
    assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
    assert!(
        obuf.to_vec() == pattern(1 << 16, 3),
        "bytes reached an impostor"
    );
    // Holders of the secret work, both ways.
    i.transfer_sync_write(&tname, ibuf.base(), tbuf.base(), 1 << 20)
        .unwrap();
    assert!(tbuf.to_vec() == pattern(1 << 20, 4));
    let back = patterned(&i, 1 << 20, 5);
    i.transfer_sync_read(&tname, back.base(), tbuf.base(), 1 << 20)
        .unwrap();
    assert!(back.to_vec() == pattern(1 << 20, 4));
    assert!(endpoints_created(&stats) > 0);
}

/// Submits one WRITE of `len` bytes from `buf` to `remote_addr` of `remote` straight to the
/// engine's RDMA transport (so the test picks which descriptor the task carries).
fn write_via(
    e: &TransferEngine,
    buf: &LocalBuffer,
    remote: &SegmentDescriptor,
    remote_addr: u64,
    len: u64,
) -> mooncake_core::Result<()> {
    let batch = Batch::new(1);
    let completer = batch.add_tasks(1).unwrap().pop().unwrap();
    let local = e
        .registry()
        .lease(buf.base(), len, Requester::Local)
        .unwrap();
    e.transports()[0].submit(vec![TransferTask {
        opcode: Opcode::Write,
        local,
        remote: Arc::new(RemoteSegment::new(remote.clone())),
        remote_addr,
        completer,
    }]);
    batch.wait_blocking(Some(Instant::now() + 3 * TIMEOUT))
}

/// A task still addressed to an earlier incarnation of a peer (its descriptor shows an older
/// generation than the endpoint's) fails with a permanent `PeerUnreachable` instead of
/// landing in the new incarnation's memory, even at an address that is valid there.
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn a_request_for_an_earlier_generation_never_reaches_the_new_one() {
    require_devices();
    init_tracing();
    const LEN: u64 = 64 << 10;
    let md = store();
    let tname = unique("gen-t");
    let i = engine_md(&unique("gen-i"), config().with_nics(["rxe0"]), &md);
    let ibuf = patterned(&i, LEN as usize, 1);
    let first = engine_md(&tname, config().with_nics(["rxe0"]), &md);
    let fbuf = patterned(&first, LEN as usize, 2);
    let old = first.local_descriptor();
    write_via(&i, &ibuf, &old, fbuf.base(), LEN).unwrap();
    assert!(fbuf.to_vec() == pattern(LEN as usize, 1));
    drop(first);
    let second = engine_md(&tname, config().with_nics(["rxe0"]), &md);
    let sbuf = patterned(&second, LEN as usize, 3);
    let new = second.local_descriptor();
    assert!(new.generation > old.generation);
    // The new incarnation is reached through its own descriptor.
    ibuf.write_at(0, &pattern(LEN as usize, 4)).unwrap();
    write_via(&i, &ibuf, &new, sbuf.base(), LEN).unwrap();
    assert!(sbuf.to_vec() == pattern(LEN as usize, 4));
    // A task carrying the old descriptor, at an address valid in the new incarnation.
    ibuf.write_at(0, &pattern(LEN as usize, 5)).unwrap();
    let e = write_via(&i, &ibuf, &old, sbuf.base(), LEN).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
    assert!(!e.is_temporary(), "{e}");
    assert!(
        sbuf.to_vec() == pattern(LEN as usize, 4),
        "a request for the earlier incarnation wrote into the new one"
    );
}

/// Dropping an engine mid-transfer: once the drop returns no byte lands in its memory any
/// more, neither from its own READs (its QPs are destroyed before any lease is released) nor
/// from a peer's WRITEs (the QPs peers connected and the MRs are gone).
#[test]
#[cfg_attr(
    not(mooncake_rdma_tests),
    ignore = "needs RDMA devices: run `cargo xtask rxe` (MOONCAKE_TEST_RDMA=1)"
)]
fn nothing_lands_after_an_engine_is_dropped() {
    require_devices();
    init_tracing();
    const LEN: usize = 8 << 20;
    let md = store();
    // The initiator is dropped while its READs are in flight.
    let tname = unique("dr-t");
    let t = engine_md(&tname, config().with_nics(["rxe0"]), &md);
    let tbuf = patterned(&t, LEN, 1);
    let i = engine_md(&unique("dr-i"), config().with_nics(["rxe0"]), &md);
    let ibuf = Arc::new(LocalBuffer::new(LEN).unwrap());
    i.register(ibuf.clone()).unwrap();
    let h = i.open_segment_blocking(&tname).unwrap();
    let reads: Vec<_> = (0..(LEN as u64 >> 16))
        .map(|k| {
            req(
                Opcode::Read,
                ibuf.base() + (k << 16),
                h,
                tbuf.base() + (k << 16),
                64 << 10,
            )
        })
        .collect();
    let batch = i.submit_batch(&reads).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(i);
    let after = ibuf.to_vec();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ibuf.to_vec() == after,
        "a READ landed after the initiator was dropped"
    );
    let _ = batch.wait_blocking(Some(Instant::now() + 3 * TIMEOUT));
    // The target is dropped while a peer's WRITEs are in flight.
    let w = engine_md(&unique("dr-w"), config().with_nics(["rxe0"]), &md);
    let wbuf = patterned(&w, LEN, 2);
    let h = w.open_segment_blocking(&tname).unwrap();
    let writes: Vec<_> = (0..(LEN as u64 >> 16))
        .map(|k| {
            req(
                Opcode::Write,
                wbuf.base() + (k << 16),
                h,
                tbuf.base() + (k << 16),
                64 << 10,
            )
        })
        .collect();
    let batch = w.submit_batch(&writes).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(t);
    let after = tbuf.to_vec();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        tbuf.to_vec() == after,
        "a WRITE landed after the target was dropped"
    );
    let _ = batch.wait_blocking(Some(Instant::now() + 3 * TIMEOUT));
}
