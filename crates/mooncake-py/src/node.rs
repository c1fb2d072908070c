//! One engine as Mooncake's Python `initialize` builds it, shared by `TransferEngine` and
//! `MooncakeDistributedStore` (`setup(..., engine=te.get_engine())`).
//!
//! # Behavior
//! - `metadata_server == "P2PHANDSHAKE"`: the RPC (handshake) port is bound on the host of
//!   `local_hostname` (its port, if any, is ignored) at a free port in
//!   `[MC_MIN_RPC_PORT, MC_MAX_RPC_PORT]` (15000–17000), starting at a random point so that
//!   processes started together do not race for one port; the segment name is `host:port`
//!   (`[v6]:port`). Peers address each other by that string.
//! - Any other metadata URL (`http://…/metadata`, `redis://…`, `etcd://…` or bare `h:p`):
//!   the segment name is `local_hostname` verbatim, and a small RPC listener (notify, probe)
//!   is bound in the same port range and published in `rpc_meta`.
//! - `protocol` does not have to match the host: `"rdma"` installs the RDMA transport when
//!   this build has it and the host has devices (`device_name` = comma-separated NIC
//!   whitelist), and falls back to TCP otherwise; `MC_FORCE_TCP=1` always uses TCP.
//!   `nvlink`/`nvlink_intra` installs the same-host CUDA IPC transport (feature `cuda`) with TCP
//!   behind it. Other names (`ascend`, …) fall back to TCP with a warning.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake::metadata::{P2pConfig, P2pHandshakeStore};
use mooncake::{Batch, LocalBuffer, TransferEngine};

use crate::rpc::{Notifies, RpcServer};

/// The RPC port range (`MC_MIN_RPC_PORT`, `MC_MAX_RPC_PORT`).
pub(crate) fn rpc_port_range() -> (u16, u16) {
    let env = |k: &str, d: u16| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u16>().ok())
            .filter(|&p| p > 0)
            .unwrap_or(d)
    };
    let lo = env("MC_MIN_RPC_PORT", 15000);
    let hi = env("MC_MAX_RPC_PORT", 17000);
    if lo <= hi { (lo, hi) } else { (hi, lo) }
}

/// A pseudo-random number that differs between processes and calls.
fn jitter() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x =
        t ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(0x9e37_79b9, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// Tries `bind` on the ports of the RPC range from a random start; the first success wins.
pub(crate) fn bind_in_range<T>(
    mut bind: impl FnMut(u16) -> mooncake::Result<T>,
) -> Result<T, String> {
    let (lo, hi) = rpc_port_range();
    let n = u64::from(hi - lo) + 1;
    let start = jitter() % n;
    let mut last = String::new();
    for i in 0..n {
        let port = lo + ((start + i) % n) as u16;
        match bind(port) {
            Ok(t) => return Ok(t),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "no free RPC port in [{lo}, {hi}] (MC_MIN_RPC_PORT/MC_MAX_RPC_PORT): {last}"
    ))
}

/// The host part of `host`, `host:port`, `[v6]:port` or a bare IPv6 address
/// (`127.0.0.1` when empty).
pub(crate) fn host_of(local_hostname: &str) -> String {
    let s = local_hostname.trim();
    let host = if let Some(rest) = s.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if s.matches(':').count() == 1 {
        s.split(':').next().unwrap_or(s)
    } else {
        s
    };
    if host.trim().is_empty() {
        "127.0.0.1".to_string()
    } else {
        host.trim().to_string()
    }
}

fn truthy(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The metadata URL for `initialize_ext`'s `metadata_type` (`etcd`, `redis`, `http`, `p2p`).
pub(crate) fn metadata_url(server: &str, metadata_type: &str) -> String {
    let s = server.trim();
    if s.eq_ignore_ascii_case("P2PHANDSHAKE") || s.contains("://") {
        return s.to_string();
    }
    match metadata_type.trim().to_ascii_lowercase().as_str() {
        "http" | "https" => format!("{}://{s}", metadata_type.trim().to_ascii_lowercase()),
        "redis" => format!("redis://{s}"),
        "etcd" => format!("etcd://{s}"),
        "p2p" | "p2phandshake" => "P2PHANDSHAKE".to_string(),
        _ => s.to_string(),
    }
}

/// The transports to install for `protocol` (see the module docs).
fn transports(protocol: &str, device_name: &str) -> Vec<Box<dyn mooncake::TransportBuilder>> {
    let p = protocol.trim().to_ascii_lowercase();
    let tcp =
        || -> Box<dyn mooncake::TransportBuilder> { Box::new(mooncake::tcp::TcpConfig::new()) };
    if truthy("MC_FORCE_TCP") || p == "tcp" || p.is_empty() {
        return vec![tcp()];
    }
    if p == "rdma" {
        #[cfg(feature = "rdma")]
        {
            match mooncake::rdma::RdmaConfig::from_env() {
                Ok(mut cfg) => {
                    let nics: Vec<String> = device_name
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                    if !nics.is_empty() {
                        cfg = cfg.with_nics(nics);
                    }
                    return vec![Box::new(cfg), tcp()];
                }
                Err(e) => tracing::warn!("RDMA unavailable ({e}); using TCP"),
            }
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = device_name;
            tracing::info!("this build has no RDMA transport; protocol \"rdma\" uses TCP");
        }
        return vec![tcp()];
    }
    if matches!(p.as_str(), "nvlink" | "nvlink_intra" | "cuda_ipc") {
        #[cfg(feature = "cuda")]
        {
            return vec![Box::new(mooncake::cuda::CudaIpcConfig::new()), tcp()];
        }
        #[cfg(not(feature = "cuda"))]
        {
            tracing::info!("this build has no CUDA transport; protocol {protocol:?} uses TCP");
            return vec![tcp()];
        }
    }
    tracing::warn!("protocol {protocol:?} is not a transport of this build; using TCP");
    vec![tcp()]
}

/// A batch submitted with the async calls, and when it times out.
pub(crate) struct AsyncBatch {
    pub(crate) batch: Batch,
    pub(crate) deadline: Instant,
}

/// An initialised engine and what the Python API keeps beside it.
pub(crate) struct EngineState {
    pub(crate) engine: TransferEngine,
    /// The P2P handshake store (P2P mode): dropping it closes the RPC port.
    pub(crate) _p2p: Option<Arc<P2pHandshakeStore>>,
    /// The RPC listener (other metadata modes).
    pub(crate) _rpc: Option<RpcServer>,
    pub(crate) rpc_port: u16,
    pub(crate) notifies: Notifies,
    pub(crate) batches: Mutex<HashMap<u64, AsyncBatch>>,
    pub(crate) next_batch: AtomicU64,
    pub(crate) managed: Mutex<HashMap<u64, Arc<LocalBuffer>>>,
    /// `MC_TRANSFER_TIMEOUT` (default 30 s, at least 5 s); a call's deadline adds 1 ns a byte.
    pub(crate) timeout: Duration,
}

impl EngineState {
    /// Builds an engine (see the module docs).
    pub(crate) fn build(
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> Result<Arc<Self>, String> {
        let host = host_of(local_hostname);
        let notifies = Notifies::default();
        let url = metadata_server.trim();
        let (engine, p2p, rpc, rpc_port) = if url.eq_ignore_ascii_case("P2PHANDSHAKE") {
            let store = Arc::new(bind_in_range(|port| {
                P2pHandshakeStore::bind(&host, port, P2pConfig::default())
            })?);
            let n = notifies.clone();
            store.set_notify_handler(Arc::new(move |body| n.on_frame(body)));
            let engine = build_with(protocol, device_name, || {
                mooncake::p2p_engine_builder(&store)
            })?;
            let port = store.rpc_port();
            (engine, Some(store), None, port)
        } else {
            let name = local_hostname.trim();
            if name.is_empty() {
                return Err("local_hostname must name this segment".into());
            }
            let metadata = mooncake::open_metadata(url).map_err(|e| e.to_string())?;
            let rpc = RpcServer::start(&host, notifies.clone())?;
            let port = rpc.port();
            let engine = build_with(protocol, device_name, || {
                TransferEngine::builder(name)
                    .with_hostname(host.clone())
                    .with_metadata(metadata.clone())
                    .with_rpc_port(port)
            })?;
            (engine, None, Some(rpc), port)
        };
        let secs = std::env::var("MC_TRANSFER_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(30)
            .max(5);
        Ok(Arc::new(Self {
            engine,
            _p2p: p2p,
            _rpc: rpc,
            rpc_port,
            notifies,
            batches: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(1),
            managed: Mutex::new(HashMap::new()),
            timeout: Duration::from_secs(secs),
        }))
    }

    /// The deadline of a call moving `bytes`.
    pub(crate) fn deadline(&self, bytes: u64) -> Instant {
        Instant::now() + self.timeout + Duration::from_nanos(bytes)
    }
}

/// Builds with the transports for `protocol`; if an accelerated transport fails to start,
/// retries with TCP alone.
fn build_with(
    protocol: &str,
    device_name: &str,
    builder: impl Fn() -> mooncake::EngineBuilder,
) -> Result<TransferEngine, String> {
    let ts = transports(protocol, device_name);
    let several = ts.len() > 1;
    let mut b = builder();
    for t in ts {
        b = b.with_boxed_transport(t);
    }
    match b.build() {
        Ok(e) => Ok(e),
        Err(e) if several => {
            tracing::warn!("starting the {protocol} transport failed ({e}); using TCP");
            builder()
                .with_transport(mooncake::tcp::TcpConfig::new())
                .build()
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}
