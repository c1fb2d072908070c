//! Shared helpers of the TCP transport's integration tests.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{EngineContext, MetadataStore, Transport};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

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

pub use mooncake_testkit::pattern;
pub use mooncake_testkit::transport::{buffer, store};
