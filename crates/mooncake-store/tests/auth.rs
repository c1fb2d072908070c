//! The master's RPC port with a cluster secret: a client that cannot prove it gets no
//! answer but a refusal, and no state changes (no session, no key); a client with it works.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use mooncake_core::ClusterSecret;
use mooncake_engine::TransferEngine;
use mooncake_store::rpc::{FrameKind, Request, Response, encode};
use mooncake_store::{MasterServer, ReplicateConfig, ServerConfig, StoreClient, StoreConfig};
use mooncake_transport_tcp::TcpConfig;

fn secret(s: &str) -> Option<ClusterSecret> {
    Some(ClusterSecret::from_bytes(s.as_bytes()).unwrap())
}

/// An engine proving `s` to the master; its metadata client holds the master's metadata
/// token (the metadata port is not what this test attacks).
fn engine(md: &str, s: Option<ClusterSecret>) -> TransferEngine {
    let right = secret("the master's secret");
    let md = mooncake_metadata::HttpMetadataStore::new(
        md,
        mooncake_metadata::HttpConfig::default().with_cluster_secret(right.as_ref()),
    )
    .unwrap();
    TransferEngine::builder(mooncake_testkit::unique("auth"))
        .with_metadata(std::sync::Arc::new(md))
        .with_cluster_secret(s)
        .with_transport(TcpConfig::new())
        .with_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[test]
fn only_clients_with_the_secret_are_served() {
    let master = MasterServer::start(
        ServerConfig::loopback()
            .with_master(common::master_cfg())
            .with_http_metadata_addr(Some(([127, 0, 0, 1], 0).into()))
            .with_admin_addr(Some(([127, 0, 0, 1], 0).into()))
            .with_cluster_secret(secret("the master's secret")),
    )
    .unwrap();
    let md = master.metadata_url().unwrap();
    let cfg = || {
        StoreConfig::new(master.rpc_addr().to_string())
            .with_segment_size(16 << 20)
            .with_rpc_timeout(Duration::from_secs(2))
    };
    for (s, what) in [
        (None, "no secret"),
        (secret("another secret!!"), "wrong secret"),
    ] {
        let e = StoreClient::connect(cfg(), engine(&md, s)).unwrap_err();
        assert!(
            e.to_string().contains("cluster secret") || e.to_string().contains("refused"),
            "{what}: {e}"
        );
    }
    // A raw client skipping authentication: every request is refused, nothing registers.
    let mut raw = std::net::TcpStream::connect(master.rpc_addr()).unwrap();
    let mut buf = Vec::new();
    encode(
        &mut buf,
        FrameKind::Request,
        1,
        &Request::RegisterClient {
            host: "attacker".into(),
            name: "attacker".into(),
        },
    )
    .unwrap();
    raw.write_all(&buf).unwrap();
    let mut head = [0u8; 16];
    raw.read_exact(&mut head).unwrap();
    let h = mooncake_store::rpc::frame::decode_header(&head).unwrap();
    let mut payload = vec![0u8; h.len as usize];
    raw.read_exact(&mut payload).unwrap();
    let r: Response = mooncake_store::rpc::frame::decode_payload(&payload).unwrap();
    assert!(matches!(r, Response::Error(_)), "{r:?}");
    let good = StoreClient::connect(cfg(), engine(&md, secret("the master's secret"))).unwrap();
    assert_eq!(
        good.master_stats().unwrap().clients,
        1,
        "only the authenticated client has a session"
    );
    good.put("k", b"value", &ReplicateConfig::default())
        .unwrap();
    assert_eq!(good.get("k").unwrap(), b"value");
}
