#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use mooncake_core::*;
pub use mooncake_engine::*;

/// Metadata backends (`mooncake-metadata`).
pub use mooncake_metadata as metadata;

/// The TCP transport (feature `tcp`, on by default).
#[cfg(feature = "tcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "tcp")))]
pub use mooncake_transport_tcp as tcp;

/// The RDMA transport (feature `rdma`).
#[cfg(feature = "rdma")]
#[cfg_attr(docsrs, doc(cfg(feature = "rdma")))]
pub use mooncake_transport_rdma as rdma;

/// GPU memory (feature `cuda`): VRAM segments, the device copier, the CUDA IPC transport.
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub use mooncake_cuda as cuda;

/// Names of the transports compiled into this build.
pub fn compiled_transports() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "tcp") {
        v.push("tcp");
    }
    if cfg!(feature = "rdma") {
        v.push("rdma");
    }
    if cfg!(feature = "cuda") {
        v.push("nvlink_intra");
    }
    v
}

/// A transport builder for `protocol` with default settings, or a clear error when the
/// protocol is unknown or was not compiled in.
///
/// With feature `cuda`, the CUDA device copier is installed first (no driver is loaded), so
/// that every transport built here can move device memory.
pub fn transport_builder(protocol: &str) -> Result<Box<dyn TransportBuilder>> {
    #[cfg(feature = "cuda")]
    mooncake_cuda::install();
    #[allow(
        unreachable_patterns,
        reason = "which arms are reachable depends on the features"
    )]
    match protocol {
        #[cfg(feature = "tcp")]
        "tcp" => Ok(Box::new(mooncake_transport_tcp::TcpConfig::new())),
        #[cfg(feature = "rdma")]
        "rdma" => Ok(Box::new(mooncake_transport_rdma::RdmaConfig::from_env()?)),
        #[cfg(feature = "cuda")]
        "nvlink_intra" => Ok(Box::new(mooncake_cuda::CudaIpcConfig::new())),
        "nvlink_intra" => Err(Error::new(
            ErrorKind::Config,
            "this build has no CUDA transport: rebuild with `--features cuda`",
        )),
        known @ ("tcp" | "rdma" | "nvmeof") => Err(Error::new(
            ErrorKind::Config,
            format!(
                "this build has no {known} transport: rebuild with `--features {known}` (compiled in: {})",
                compiled_transports().join(", ")
            ),
        )),
        other => Err(Error::new(
            ErrorKind::Config,
            format!("unknown protocol {other:?} (known: tcp, rdma, nvmeof, nvlink_intra)"),
        )),
    }
}

/// Opens the metadata store named by `url` (see [`mooncake_metadata::connect`]): empty for
/// the process-wide embedded store, `http://host:port/metadata`, `P2PHANDSHAKE`,
/// `etcd://host:2379`, `redis://host:6379`. A backend not compiled into this build gives an
/// error naming the cargo feature to enable.
pub fn open_metadata(url: &str) -> Result<std::sync::Arc<dyn MetadataStore>> {
    mooncake_metadata::connect(url)
}

/// An engine builder for `P2PHANDSHAKE` mode: the engine is named `store.local_name()`
/// (`host:port` of the store's RPC port), publishes that port and host, and uses `store` as
/// its metadata (feature `metadata-p2p`).
#[cfg(feature = "metadata-p2p")]
#[cfg_attr(docsrs, doc(cfg(feature = "metadata-p2p")))]
pub fn p2p_engine_builder(
    store: &std::sync::Arc<mooncake_metadata::P2pHandshakeStore>,
) -> EngineBuilder {
    TransferEngine::builder(store.local_name())
        .with_hostname(store.local_addr().ip().to_string())
        .with_rpc_port(store.rpc_port())
        .with_metadata(store.clone() as std::sync::Arc<dyn MetadataStore>)
}
