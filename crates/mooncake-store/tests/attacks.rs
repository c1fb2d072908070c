//! The attacker suite of the master's ports (issue 14), with a cluster secret configured:
//!
//! - RPC: a frame over the pre-authentication limit, or one declaring more than the frame
//!   limit, closes the connection before anything is allocated for it or served; 1,000 slow
//!   connections (trickling a frame, or idle without proving the secret) leave the master
//!   serving clients and are dropped at the request deadline; at the connection cap, the
//!   oldest unauthenticated connection makes room for a new one.
//! - Admin HTTP: without the admin token, or with a wrong one, `remove_all` and the read
//!   routes are refused (401) and nothing changes; 1,000 slow connections leave it serving.
//!
//! Unauthenticated and wrong-secret RPC clients are in `auth.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::ClusterSecret;
use mooncake_engine::TransferEngine;
use mooncake_store::rpc::{FrameKind, Request, encode};
use mooncake_store::{MasterServer, ReplicateConfig, ServerConfig, StoreClient, StoreConfig};
use mooncake_testkit::attack::{Legit, SlowClients, eventually, slow_connections_that_fit};
use mooncake_transport_tcp::TcpConfig;

const SECRET: &str = "the store's cluster secret";

fn secret() -> Option<ClusterSecret> {
    Some(ClusterSecret::from_bytes(SECRET.as_bytes()).unwrap())
}

/// A master with the secret, its admin port, and `timeout` as its request deadline.
fn master(timeout: Duration, max_connections: Option<usize>) -> MasterServer {
    let mut cfg = ServerConfig::loopback()
        .with_master(common::master_cfg())
        .with_admin_addr(Some(([127, 0, 0, 1], 0).into()))
        .with_cluster_secret(secret())
        .with_request_timeout(timeout);
    if let Some(n) = max_connections {
        cfg.max_connections = n;
    }
    MasterServer::start(cfg).unwrap()
}

fn client(master: &MasterServer, md: &Arc<dyn mooncake_core::MetadataStore>) -> StoreClient {
    let engine = TransferEngine::builder(mooncake_testkit::unique("attack"))
        .with_metadata(md.clone())
        .with_cluster_secret(secret())
        .with_transport(TcpConfig::new())
        .with_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    StoreClient::connect(
        StoreConfig::new(master.rpc_addr().to_string())
            .with_segment_size(4 << 20)
            .with_rpc_timeout(Duration::from_secs(4)),
        engine,
    )
    .unwrap()
}

/// The connection is closed (EOF or reset) within 10 s, without a reply.
fn closed_without_reply(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: {n} bytes of reply"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {e}"),
    }
}

#[test]
fn oversize_rpc_frames_are_refused_before_authentication() {
    let m = master(Duration::from_secs(10), None);
    let md = mooncake_testkit::transport::store();
    let good = client(&m, &md);
    good.put("k", b"value", &ReplicateConfig::default())
        .unwrap();
    let mut register = Vec::new();
    encode(
        &mut register,
        FrameKind::Request,
        1,
        &Request::RegisterClient {
            host: "attacker".into(),
            name: "attacker".into(),
        },
    )
    .unwrap();
    let header = |len: u32| {
        let mut h = register[..16].to_vec();
        // The header's length field (bytes 0..4).
        h[0..4].copy_from_slice(&len.to_le_bytes());
        h
    };
    for (what, bytes) in [
        // 64 MiB - 1: within the frame limit, far over the pre-authentication one; the old
        // server allocated it before reading a byte of it.
        ("a 64 MiB frame", header((64 << 20) - 1)),
        ("a frame over the frame limit", header(u32::MAX)),
        ("a garbage header", vec![0xFF; 16]),
    ] {
        let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
        s.write_all(&bytes).unwrap();
        let _ = s.write_all(&[0u8; 4096]);
        closed_without_reply(&mut s, what);
    }
    // The master still serves, and nothing registered.
    assert_eq!(good.get("k").unwrap(), b"value");
    assert_eq!(good.master_stats().unwrap().clients, 1);
}

#[test]
fn slow_rpc_connections_do_not_stall_clients() {
    let n = slow_connections_that_fit();
    // Opening 1,000 connections (a thread each on the master) takes seconds on a loaded
    // two-core machine: the deadline is longer than that.
    let m = master(Duration::from_secs(12), None);
    let md = mooncake_testkit::transport::store();
    let good = Arc::new(client(&m, &md));
    good.put("live", b"value", &ReplicateConfig::default())
        .unwrap();
    let g = good.clone();
    let legit = Legit::start(move |i| {
        g.put(&format!("k{}", i % 5), b"v", &ReplicateConfig::default())
            .unwrap();
        assert_eq!(g.get("live").unwrap(), b"value");
    });
    let before = m.rpc_connections();
    let t0 = Instant::now();
    // A header declaring a 2,000-byte frame, then a byte every 100 ms.
    let mut prefix = Vec::new();
    encode(&mut prefix, FrameKind::Request, 1, &Request::Ping).unwrap();
    prefix.truncate(16);
    prefix[0..4].copy_from_slice(&2000u32.to_le_bytes());
    let slow = SlowClients::start(m.rpc_addr(), n, prefix, 0);
    std::thread::sleep(Duration::from_millis(300));
    let open = m.rpc_connections() - before;
    eprintln!(
        "{n} slow connections opened in {:?}; the master holds {open}",
        t0.elapsed()
    );
    assert!(open >= n * 9 / 10, "{open}");
    // A new client connects and authenticates while every slow connection is open.
    let fresh = client(&m, &md);
    assert_eq!(fresh.get("live").unwrap(), b"value");
    assert!(
        m.rpc_connections() - before >= n * 9 / 10,
        "the slow connections were dropped before the new client was served"
    );
    let (worst, calls) = legit.finish();
    eprintln!("{calls} legitimate put+get pairs meanwhile, slowest {worst:?}");
    assert!(calls > 0);
    // Both kinds go at the 12 s deadline: the tricklers' bytes do not extend it, and the idle
    // ones never proved the secret.
    let took = eventually(Duration::from_secs(40), "slow connections dropped", || {
        m.rpc_connections() <= before + 8
    });
    eprintln!(
        "master down to {} connections {:?} after the first slow one",
        m.rpc_connections(),
        t0.elapsed()
    );
    assert!(
        took > Duration::from_millis(500),
        "dropped before their deadline?"
    );
    drop(slow);
    assert_eq!(good.master_stats().unwrap().clients, 2);
    assert_eq!(good.get("live").unwrap(), b"value");
}

#[test]
fn at_the_cap_unauthenticated_connections_make_room() {
    let m = master(Duration::from_secs(60), Some(40));
    let md = mooncake_testkit::transport::store();
    let idle: Vec<TcpStream> = (0..60)
        .map(|_| TcpStream::connect(m.rpc_addr()).unwrap())
        .collect();
    eventually(Duration::from_secs(10), "accepted", || {
        m.rpc_connections() == 40
    });
    // Within the 60 s deadline, the idle ones would hold every slot: the client's own
    // connections evict them.
    let good = client(&m, &md);
    good.put("k", b"value", &ReplicateConfig::default())
        .unwrap();
    assert_eq!(good.get("k").unwrap(), b"value");
    assert!(m.rpc_connections() <= 40);
    drop(idle);
}

/// One request to the admin port; the status and body.
fn admin(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn admin_refuses_without_the_token_before_any_change() {
    let m = master(Duration::from_secs(10), None);
    let a = m.admin_addr().unwrap();
    let md = mooncake_testkit::transport::store();
    let good = client(&m, &md);
    good.put("k", b"value", &ReplicateConfig::default())
        .unwrap();
    let right = secret().unwrap().token("store-admin");
    let wrong = ClusterSecret::from_bytes(b"another cluster secret")
        .unwrap()
        .token("store-admin");
    for auth in [
        String::new(),
        format!("Authorization: Bearer {wrong}\r\n"),
        format!("Authorization: Bearer {right}x\r\n"),
        format!("Authorization: Basic {right}\r\n"),
        format!("Authorization: Bearer {}\r\n", &right[..right.len() - 1]),
    ] {
        for req in [
            "POST /remove_all?force=true HTTP/1.1\r\n",
            "POST /api/v1/remove_all?force=true HTTP/1.1\r\n",
            "GET /query_key?key=k HTTP/1.1\r\n",
            "GET /get_all_segments HTTP/1.1\r\n",
        ] {
            let (status, body) = admin(a, &format!("{req}{auth}\r\n"));
            assert_eq!(status, 401, "{req}{auth}: {body}");
            assert!(
                !body.contains("removed") && !body.contains("attack"),
                "{body}"
            );
        }
    }
    assert_eq!(
        good.get("k").unwrap(),
        b"value",
        "a refused remove_all removed"
    );
    assert_eq!(admin(a, "GET /health HTTP/1.1\r\n\r\n").0, 200);
    let (status, body) = admin(
        a,
        &format!("GET /query_key?key=k HTTP/1.1\r\nAuthorization: Bearer {right}\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    // Oversized heads: 431, not growth.
    let big = format!(
        "GET /health HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let mut s = TcpStream::connect(a).unwrap();
    let _ = s.write_all(big.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

#[test]
fn slow_admin_connections_do_not_stall_it() {
    let n = slow_connections_that_fit();
    let m = master(Duration::from_secs(8), None);
    let a = m.admin_addr().unwrap();
    let token = secret().unwrap().token("store-admin");
    let t0 = Instant::now();
    let slow = SlowClients::start(a, n, b"GET /metrics HTTP/1.1\r\nX-Slow: ".to_vec(), b'a');
    eprintln!("{n} slow connections opened in {:?}", t0.elapsed());
    // Every request is served although slow connections fill every slot of the port.
    let legit = Legit::start(move |_| {
        let (status, body) = admin(
            a,
            &format!("GET /get_all_segments HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"),
        );
        assert_eq!(status, 200, "{body}");
    });
    std::thread::sleep(Duration::from_secs(1));
    let (worst, calls) = legit.finish();
    eprintln!(
        "{calls} admin requests meanwhile, slowest {worst:?}, {:?} after the first slow connection",
        t0.elapsed()
    );
    assert!(calls > 0);
    drop(slow);
}
