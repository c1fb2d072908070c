//! The attacker suite of the TCP data port (issue 14), with a cluster secret configured:
//!
//! - 1,000 slow connections — half trickling a hello a byte every 100 ms, half idle — leave
//!   the port serving: a legitimate initiator keeps writing over its pooled connection, a new
//!   initiator connects and proves the secret meanwhile, and the port drops the slow ones at
//!   the hello deadline (a byte does not reset it). No byte of memory changes but those the
//!   legitimate initiators wrote.
//! - Oversized and overflowing hello fields before authentication are refused without
//!   allocating what they declare, and the port keeps serving.
//!
//! Unauthenticated and wrong-secret initiators are in `auth.rs`; forged frames after the
//! hello in `range_checks.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{buffer, pattern, store};
use mooncake_core::{ClusterSecret, MemorySegment, MetadataStore};
use mooncake_engine::TransferEngine;
use mooncake_testkit::attack::{Legit, SlowClients, eventually, slow_connections_that_fit};
use mooncake_transport_tcp::TcpConfig;
use mooncake_transport_tcp::wire::{FrameKind, HEADER_LEN, Header, Hello, MAX_CONTROL_PAYLOAD};

const SECRET: &str = "the tcp port's cluster secret";

fn secret() -> Option<ClusterSecret> {
    Some(ClusterSecret::from_bytes(SECRET.as_bytes()).unwrap())
}

fn initiator(name: &str, md: &Arc<dyn MetadataStore>) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(4))
        .with_cluster_secret(secret())
        .with_transport(TcpConfig::new())
        .build()
        .unwrap()
}

/// A target with the secret and its TCP transport (for its connection count); its hello
/// deadline is its engine timeout, 8 s (opening 1,000 connections on a loaded two-core
/// machine takes seconds).
fn target(
    name: &str,
    md: &Arc<dyn MetadataStore>,
) -> (TransferEngine, Arc<mooncake_transport_tcp::TcpTransport>) {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let e = TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(8))
        .with_cluster_secret(secret())
        .with_transport(
            move |ctx: &mooncake_core::EngineContext| -> mooncake_core::Result<Arc<dyn mooncake_core::Transport>> {
                let t = Arc::new(mooncake_transport_tcp::TcpTransport::start(TcpConfig::new(), ctx)?);
                *s2.lock().unwrap() = Some(t.clone());
                Ok(t)
            },
        )
        .build()
        .unwrap();
    let t = slot.lock().unwrap().take().unwrap();
    (e, t)
}

fn hello_payload(target: &str) -> Vec<u8> {
    Hello {
        target: target.to_string(),
        initiator: "slow-client".to_string(),
        initiator_generation: 1,
        epoch: 1,
        nonce: [9; 16],
    }
    .encode()
}

#[test]
fn slow_connections_do_not_stall_legitimate_initiators() {
    let n = slow_connections_that_fit();
    let md = store();
    let (target, ttcp) = target("slow-target", &md);
    let tbuf = buffer(&target, 1 << 20, 1);
    let good = Arc::new(initiator("slow-good", &md));
    let gbuf = buffer(&good, 1 << 20, 2);
    good.transfer_sync_write("slow-target", gbuf.base(), tbuf.base(), 4096)
        .unwrap();
    let (g, base, tbase) = (good.clone(), gbuf.base(), tbuf.base());
    let legit = Legit::start(move |_| {
        g.transfer_sync_write("slow-target", base, tbase, 4096)
            .unwrap();
    });
    let t0 = Instant::now();
    let hello = hello_payload("slow-target");
    let prefix = [
        &Header::new(FrameKind::Hello, 0, 0, hello.len() as u64).encode()[..],
        &hello[..4],
    ]
    .concat();
    let addr = target.local_descriptor().tcp_data_addrs[0].parse().unwrap();
    let slow = SlowClients::start(addr, n, prefix, b'x');
    std::thread::sleep(Duration::from_millis(300));
    let open = ttcp.stats().open_server_connections;
    eprintln!(
        "{n} slow connections opened in {:?}; the port holds {open}",
        t0.elapsed()
    );
    assert!(open >= n * 9 / 10, "{open}");
    // A new initiator connects, proves the secret and writes while every slow one is open.
    let fresh = initiator("slow-fresh", &md);
    let fbuf = buffer(&fresh, 1 << 20, 3);
    fresh
        .transfer_sync_write("slow-target", fbuf.base(), tbuf.base() + 8192, 4096)
        .unwrap();
    assert!(
        ttcp.stats().open_server_connections >= n * 9 / 10,
        "the slow connections were dropped before the new initiator was served"
    );
    let (worst, calls) = legit.finish();
    eprintln!("{calls} legitimate 4 KiB writes meanwhile, slowest {worst:?}");
    assert!(calls > 0);
    // The port drops them at the 8 s hello deadline (trickled bytes do not extend it).
    let took = eventually(Duration::from_secs(30), "slow connections dropped", || {
        ttcp.stats().open_server_connections <= 16
    });
    eprintln!(
        "port down to {} connections {:?} after the first slow one",
        ttcp.stats().open_server_connections,
        t0.elapsed()
    );
    assert!(
        took > Duration::from_millis(500),
        "dropped before their deadline?"
    );
    eventually(Duration::from_secs(5), "tricklers see the close", || {
        slow.closed.load(Ordering::SeqCst) > 0
    });
    drop(slow);
    // Memory: only the legitimate writes landed.
    let mut want = pattern(1 << 20, 1);
    want[..4096].copy_from_slice(&pattern(1 << 20, 2)[..4096]);
    want[8192..8192 + 4096].copy_from_slice(&pattern(1 << 20, 3)[..4096]);
    assert!(
        tbuf.to_vec() == want,
        "memory changed beyond the legitimate writes"
    );
    good.transfer_sync_write("slow-target", gbuf.base(), tbuf.base(), 4096)
        .unwrap();
}

fn refused_or_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut h = [0u8; HEADER_LEN];
    match s.read_exact(&mut h) {
        Ok(()) => {
            let h = Header::decode(&h, 1 << 30).unwrap();
            assert_eq!(h.kind, FrameKind::Error, "{h:?}");
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
    }
}

#[test]
fn oversize_hello_fields_are_refused() {
    let md = store();
    let (target, ttcp) = target("big-target", &md);
    let tbuf = buffer(&target, 1 << 20, 1);
    let before = tbuf.to_vec();
    let addr = target.local_descriptor().tcp_data_addrs[0].clone();
    let valid = hello_payload("big-target");
    let mut long_name = valid.clone();
    // The target name's length prefix claims 65,535 bytes.
    long_name[..2].copy_from_slice(&u16::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "hello declaring u64::MAX bytes",
            Header::new(FrameKind::Hello, 0, 0, u64::MAX)
                .encode()
                .to_vec(),
        ),
        (
            "hello over the control limit",
            Header::new(FrameKind::Hello, 0, 0, MAX_CONTROL_PAYLOAD + 1)
                .encode()
                .to_vec(),
        ),
        (
            "hello with a name longer than the frame",
            [
                &Header::new(FrameKind::Hello, 0, 0, long_name.len() as u64).encode()[..],
                &long_name[..],
            ]
            .concat(),
        ),
        (
            "a write before any hello",
            [
                &Header::new(FrameKind::Write, 1, tbuf.base(), 4096).encode()[..],
                &[0xEE; 4096][..],
            ]
            .concat(),
        ),
        (
            "a proof before any hello",
            [
                &Header::new(FrameKind::Proof, 0, 0, 32).encode()[..],
                &[0; 32][..],
            ]
            .concat(),
        ),
        (
            "a proof longer than the control limit",
            [
                &Header::new(FrameKind::Hello, 0, 0, valid.len() as u64).encode()[..],
                &valid[..],
                &Header::new(FrameKind::Proof, 0, 0, 1 << 40).encode()[..],
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        if what.starts_with("a proof longer") {
            let h = {
                let mut b = [0u8; HEADER_LEN];
                s.read_exact(&mut b).unwrap();
                Header::decode(&b, 1 << 30).unwrap()
            };
            assert_eq!(h.kind, FrameKind::Challenge, "{what}: {h:?}");
            let mut c = vec![0u8; h.len as usize];
            s.read_exact(&mut c).unwrap();
        }
        refused_or_closed(&mut s);
        assert!(tbuf.to_vec() == before, "{what}: memory changed");
    }
    eventually(
        Duration::from_secs(10),
        "refused connections closed",
        || ttcp.stats().open_server_connections == 0,
    );
    let good = initiator("big-good", &md);
    let gbuf = buffer(&good, 1 << 20, 2);
    good.transfer_sync_write("big-target", gbuf.base(), tbuf.base(), 4096)
        .unwrap();
    assert_eq!(tbuf.to_vec()[..4096], pattern(1 << 20, 2)[..4096]);
}
