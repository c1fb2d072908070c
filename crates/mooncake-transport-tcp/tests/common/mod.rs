//! Shared helpers of the TCP transport's integration tests.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{
    EmbeddedMetadataStore, EngineContext, LocalBuffer, MetadataStore, TransferEngine, Transport,
};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

/// Runs the same async body under tokio (current-thread and multi-thread), smol, and a bare
/// `block_on`: the public async API must work under every executor.
pub fn on_all_runtimes<F, Fut>(body: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body("tokio-current-thread"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body("tokio-multi-thread"));
    smol::block_on(body("smol"));
    futures_lite::future::block_on(body("block_on"));
}

/// An engine named `name` with a TCP transport, on `store`.
pub fn engine(name: &str, store: &Arc<dyn MetadataStore>, cfg: TcpConfig) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(store.clone())
        .with_timeout(Duration::from_secs(2))
        .with_transport(cfg)
        .build()
        .expect("engine starts")
}

/// Like [`engine`], also returning the TCP transport itself (for its stats).
pub fn engine_with_transport(
    name: &str,
    store: &Arc<dyn MetadataStore>,
    cfg: TcpConfig,
    timeout: Duration,
) -> (TransferEngine, Arc<TcpTransport>) {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let engine = TransferEngine::builder(name)
        .with_metadata(store.clone())
        .with_timeout(timeout)
        .with_transport(
            move |ctx: &EngineContext| -> mooncake_core::Result<Arc<dyn Transport>> {
                let t = Arc::new(TcpTransport::start(cfg, ctx)?);
                *s2.lock().unwrap() = Some(t.clone());
                Ok(t)
            },
        )
        .build()
        .expect("engine starts");
    let t = slot.lock().unwrap().take().expect("transport built");
    (engine, t)
}

/// A fresh embedded store.
pub fn store() -> Arc<dyn MetadataStore> {
    Arc::new(EmbeddedMetadataStore::new())
}

/// A registered buffer of `len` bytes filled with a pattern derived from `seed`.
pub fn buffer(engine: &TransferEngine, len: usize, seed: u64) -> Arc<LocalBuffer> {
    let b = Arc::new(LocalBuffer::new(len).unwrap());
    b.write_at(0, &pattern(len, seed)).unwrap();
    engine.register(b.clone()).unwrap();
    b
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
