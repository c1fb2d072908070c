//! Two transfer engines, each with its own metadata store (as two processes would have), find
//! each other through each backend and move bytes over the TCP transport.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{
    EmbeddedMetadataStore, LocalBuffer, MemorySegment, MetadataKeys, MetadataStore, Opcode,
    TransferRequest,
};
use mooncake_engine::{EngineBuilder, TransferEngine};
use mooncake_testkit::{Rt, run, unique};
use mooncake_transport_tcp::TcpConfig;

const LEN: usize = 1 << 20;

fn pattern(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn buffer(engine: &TransferEngine, seed: u8) -> Arc<LocalBuffer> {
    let b = Arc::new(LocalBuffer::new(LEN).unwrap());
    b.write_at(0, &pattern(seed)).unwrap();
    engine.register(b.clone()).unwrap();
    b
}

fn read(b: &LocalBuffer) -> Vec<u8> {
    let mut out = vec![0; LEN];
    b.read_at(0, &mut out).unwrap();
    out
}

/// Builds two engines from `make(i)` (a builder with its own store), then, under every
/// runtime: opens the other's segment (one metadata read), writes and reads 1 MiB, and checks
/// the bytes; finally a restarted peer is seen with a new generation.
fn two_engines(make: impl Fn(usize) -> EngineBuilder) {
    let keys = MetadataKeys::new(Some(&unique("engine")));
    let build = |i: usize| {
        make(i)
            .with_keys(keys.clone())
            .with_timeout(Duration::from_secs(3))
            .with_transport(TcpConfig::new())
            .build()
            .unwrap()
    };
    let (a, b) = (build(0), build(1));
    let (abuf, bbuf) = (buffer(&a, 1), buffer(&b, 2));
    for rt in Rt::ALL {
        run(rt, async {
            let seg = a.open_segment(b.local_name()).await.unwrap();
            assert_eq!(
                a.segment(seg).unwrap().descriptor().generation,
                b.generation()
            );
            // Write A's pattern into B, then read B's (now A's) bytes back into A's buffer tail.
            abuf.write_at(0, &pattern(rt as u8 + 10)).unwrap();
            let req = |opcode| TransferRequest {
                opcode,
                source: abuf.base(),
                target_id: seg,
                target_offset: bbuf.base(),
                length: LEN as u64,
            };
            a.submit_batch(&[req(Opcode::Write)])
                .unwrap()
                .wait()
                .await
                .unwrap();
            assert_eq!(
                read(&bbuf),
                pattern(rt as u8 + 10),
                "{rt:?}: write did not land"
            );
            bbuf.write_at(0, &pattern(rt as u8 + 20)).unwrap();
            a.submit_batch(&[req(Opcode::Read)])
                .unwrap()
                .wait()
                .await
                .unwrap();
            assert_eq!(
                read(&abuf),
                pattern(rt as u8 + 20),
                "{rt:?}: read returned wrong bytes"
            );
            // And the other way round.
            let back = b.open_segment(a.local_name()).await.unwrap();
            assert_eq!(b.segment(back).unwrap().descriptor().buffers.len(), 1);
        });
    }
}

#[test]
fn embedded() {
    let store: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    two_engines(|i| TransferEngine::builder(format!("emb-{i}")).with_metadata(store.clone()));
}

#[cfg(all(feature = "http", feature = "http-server"))]
#[test]
fn http() {
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
    let url = server.url();
    two_engines(|i| {
        let store = mooncake_metadata::connect(&url).unwrap();
        TransferEngine::builder(unique(&format!("http-{i}"))).with_metadata(store)
    });
}

#[cfg(feature = "p2p")]
#[test]
fn p2p() {
    use mooncake_metadata::{P2pConfig, P2pHandshakeStore};
    two_engines(|_| {
        // What `mooncake::p2p_engine_builder` does: the segment is named by the RPC port.
        let store =
            Arc::new(P2pHandshakeStore::bind("127.0.0.1", 0, P2pConfig::default()).unwrap());
        TransferEngine::builder(store.local_name())
            .with_hostname(store.local_addr().ip().to_string())
            .with_rpc_port(store.rpc_port())
            .with_metadata(store)
    });
}

#[cfg(feature = "etcd")]
#[test]
fn etcd() {
    let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_ETCD") else {
        return;
    };
    two_engines(|i| {
        TransferEngine::builder(unique(&format!("etcd-{i}")))
            .with_metadata(mooncake_metadata::connect(&url).unwrap())
    });
}

#[cfg(feature = "redis")]
#[test]
fn redis() {
    let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_REDIS") else {
        return;
    };
    two_engines(|i| {
        TransferEngine::builder(unique(&format!("redis-{i}")))
            .with_metadata(mooncake_metadata::connect(&url).unwrap())
    });
}

/// A peer that restarts publishes a new generation, which a refresh picks up.
#[cfg(all(feature = "http", feature = "http-server"))]
#[test]
fn restart_is_seen_as_a_new_generation() {
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
    let store = mooncake_metadata::connect(&server.url()).unwrap();
    let name = unique("restart");
    let a = TransferEngine::builder("restart-a")
        .with_metadata(store.clone())
        .build()
        .unwrap();
    let b1 = TransferEngine::builder(&name)
        .with_metadata(store.clone())
        .build()
        .unwrap();
    let h = a.open_segment_blocking(&name).unwrap();
    let g1 = a.segment(h).unwrap().descriptor().generation;
    drop(b1);
    std::thread::sleep(Duration::from_millis(2));
    let b2 = TransferEngine::builder(&name)
        .with_metadata(store)
        .build()
        .unwrap();
    assert_ne!(g1, b2.generation());
    mooncake_core::block_on(a.refresh_segment(h)).unwrap();
    assert_eq!(
        a.segment(h).unwrap().descriptor().generation,
        b2.generation()
    );
}

/// The HTTP metadata server restarts (losing its state and its revision counter): the
/// engine's watch ends, is re-created, and the engine re-reads what it caches — so a peer
/// that restarts afterwards is still followed, without any transfer to trigger a refresh.
#[cfg(all(feature = "http", feature = "http-server"))]
#[test]
fn the_watch_survives_a_metadata_server_restart() {
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
    let url = server.url();
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let build = |name: &str| {
        TransferEngine::builder(name)
            .with_metadata(mooncake_metadata::connect(&url).unwrap())
            .with_transport(TcpConfig::new())
            .build()
            .unwrap()
    };
    let a = build("restart-a");
    let b = build("restart-b");
    let h = a.open_segment_blocking("restart-b").unwrap();
    assert_eq!(
        a.segment(h).unwrap().descriptor().generation,
        b.generation()
    );
    drop(server);
    let server = HttpMetadataServer::bind(addr.as_str(), HttpServerConfig::default()).unwrap();
    // The peer restarts after the metadata service did.
    std::thread::sleep(Duration::from_millis(300));
    drop(b);
    let b2 = build("restart-b");
    let t0 = std::time::Instant::now();
    while a.segment(h).unwrap().descriptor().generation != b2.generation() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the engine never saw the restarted peer's descriptor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(server);
}
