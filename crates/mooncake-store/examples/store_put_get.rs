//! A Mooncake Store in one process: a master (with its HTTP metadata server), a storage client
//! that contributes 64 MiB of its memory to the pool, and a requester that stores and reads
//! values through it over loopback TCP — with the copying API and the zero-copy batch API —
//! then checks every byte.
//!
//! ```text
//! cargo run -p mooncake-store --example store_put_get
//! ```

use std::sync::Arc;

use mooncake_core::{LocalBuffer, MemorySegment};
use mooncake_engine::TransferEngine;
use mooncake_store::{
    MasterConfig, MasterServer, ReplicateConfig, ServerConfig, StoreClient, StoreConfig,
};
use mooncake_transport_tcp::TcpConfig;

fn engine(metadata_url: &str, name: &str) -> Result<TransferEngine, Box<dyn std::error::Error>> {
    Ok(TransferEngine::builder(name)
        .with_metadata(mooncake_metadata::connect(metadata_url)?)
        .with_transport(TcpConfig::new())
        .build()?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The master: placement and leases only, never values. Port 0 picks free ports.
    let master = MasterServer::start(
        ServerConfig::loopback()
            .with_master(MasterConfig::default())
            .with_http_metadata_addr(Some(([127, 0, 0, 1], 0).into())),
    )?;
    let md = master.metadata_url().ok_or("the master serves metadata")?;
    let cfg = StoreConfig::new(master.rpc_addr().to_string());

    // A client that contributes 64 MiB of DRAM (the values live there) ...
    let node = StoreClient::connect(
        cfg.clone().with_segment_size(64 << 20),
        engine(&md, "example-store-node")?,
    )?;
    // ... and a pure requester: its bytes move straight to and from the node's segment.
    let engine = engine(&md, "example-store-requester")?;
    let client = StoreClient::connect(cfg, engine.clone())?;

    // Copying API.
    let rc = ReplicateConfig::default();
    client.put("greeting", b"hello from the pool", &rc)?;
    assert_eq!(client.get("greeting")?, b"hello from the pool");

    // Zero-copy batch API over registered memory: 16 KV blocks of 256 KiB.
    const BLOCK: usize = 256 << 10;
    const N: usize = 16;
    let src = Arc::new(LocalBuffer::new(BLOCK * N)?);
    let data: Vec<u8> = (0..BLOCK * N).map(|i| (i * 7 % 253) as u8).collect();
    src.write_at(0, &data)?;
    let dst = Arc::new(LocalBuffer::new(BLOCK * N)?);
    engine.register(src.clone())?;
    engine.register(dst.clone())?;
    let keys: Vec<String> = (0..N).map(|i| format!("layer0/block{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let offsets: Vec<u64> = (0..N as u64).map(|i| i * BLOCK as u64).collect();
    let sizes = vec![BLOCK as u64; N];
    let src_addrs: Vec<u64> = offsets.iter().map(|o| src.base() + o).collect();
    for r in client.batch_put_from(&keys, &src_addrs, &sizes, &rc) {
        r?;
    }
    let dst_addrs: Vec<u64> = offsets.iter().map(|o| dst.base() + o).collect();
    for r in client.batch_get_into(&keys, &dst_addrs, &sizes) {
        assert_eq!(r?, BLOCK as u64);
    }
    assert_eq!(
        dst.to_vec(),
        data,
        "every block read back equals what was stored"
    );
    println!(
        "stored and read back {} values ({} KiB); every byte verified",
        N + 1,
        (BLOCK * N) >> 10
    );
    drop(client);
    drop(node);
    master.stop();
    Ok(())
}
