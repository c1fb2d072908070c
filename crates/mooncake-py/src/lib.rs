#![doc = include_str!("../README.md")]

//! Module map:
//! - `node`: building an engine the way Mooncake's Python `initialize` does (P2P handshake
//!   port range, metadata URLs, transport choice) and the engine state both classes share.
//! - `engine`: `mooncake.engine` (`TransferEngine`, `TransferOpcode`, `TransferNotify`).
//! - `rpc`: the RPC port's notify and probe frames (server for non-P2P metadata, client).
//! - `mem`: raw addresses from Python: mapping checks, CUDA pointer detection, host allocations.
//! - `store`: `mooncake.store` (`MooncakeDistributedStore`, `ReplicateConfig`, enums).

use pyo3::prelude::*;
use pyo3::types::PyDict;

mod engine;
mod mem;
mod node;
mod rpc;
mod store;

/// Logs go to stderr, filtered by `MC_LOG_LEVEL` or `RUST_LOG` (default `warn`).
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG")
            .or_else(|_| std::env::var("MC_LOG_LEVEL").map(|l| l.to_ascii_lowercase()))
            .unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(filter)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .try_init();
    });
}

/// What this build and this host offer, read at run time (nothing here loads CUDA or
/// rdma-core unless they are already loaded or asked for).
#[pyfunction]
fn features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("transports", mooncake::compiled_transports())?;
    d.set_item("rdma_compiled", cfg!(feature = "rdma"))?;
    d.set_item("metadata", vec!["P2PHANDSHAKE", "http", "redis"])?;
    d.set_item("cuda_loaded", mem::cuda_driver_loaded())?;
    d.set_item("cuda_compiled", cfg!(feature = "cuda"))?;
    d.set_item("device_memory_transport", cfg!(feature = "cuda"))?;
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    Ok(d)
}

/// The native half of the `mooncake` package (`mooncake.engine` and `mooncake.store`
/// re-export its classes; both live in this one extension so a store can share an engine).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    // Device copies for every engine built from now on (loads no driver).
    #[cfg(feature = "cuda")]
    mooncake::cuda::install();
    if let Err(e) = mooncake::tcp::raise_fd_limit() {
        tracing::debug!("cannot raise the open-file limit: {e}");
    }
    m.add_function(wrap_pyfunction!(features, m)?)?;
    engine::register(m)?;
    store::register(m)?;
    Ok(())
}
