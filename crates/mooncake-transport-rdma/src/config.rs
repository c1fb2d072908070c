//! [`RdmaConfig`]: the builder of [`crate::RdmaTransport`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{Error, ErrorKind, Result};

use crate::stats::RdmaStats;

/// Which (local NIC, remote NIC) pairs a slice may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// Every pair, sprayed round-robin.
    All,
    /// The remote NIC with the local NIC's name first (rail-optimised fabrics), any other
    /// remote NIC as a fallback.
    #[default]
    PreferSameRail,
    /// Only remote NICs with the local NIC's name (strict rails; also soft-RoCE devices that
    /// loop back to themselves).
    SameRailOnly,
}

/// Configuration of the RDMA transport; build it into an engine with
/// `TransferEngine::builder(name).with_transport(RdmaConfig::new())`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RdmaConfig {
    /// Only these devices (all when empty). `MC_RDMA_NICS` (comma-separated).
    pub nics: Vec<String>,
    /// Port number on each device (default 1). `MC_IB_PORT`.
    pub port: u8,
    /// GID index (default: auto; RoCE v2 IPv4-mapped first). `MC_GID_INDEX`.
    pub gid_index: Option<u8>,
    /// Slice size in bytes (default 64 KiB). `MC_SLICE_SIZE`.
    pub slice_size: u64,
    /// Work requests in flight per QP (default 256). `MC_MAX_WR`.
    pub max_wr: u32,
    /// CQ entries per NIC (default 4096). `MC_MAX_CQE_PER_CTX`.
    pub cqe: u32,
    /// Active endpoints (QPs) per NIC before the least recently used idle one is evicted
    /// (default 256). `MC_MAX_EP_PER_CTX`.
    pub max_endpoints: usize,
    /// Passive (peer-initiated) QPs kept per engine (default 1024). When full, a new peer's
    /// QP replaces a stale never-used one or the least recently used idle one, never one in
    /// use; with none, the handshake is refused as busy.
    pub max_passive: usize,
    /// Never-used passive QPs kept per source address (default 256): one host cannot churn
    /// the QPs of others.
    pub max_pending_per_ip: usize,
    /// A passive QP that saw no request for this long may be evicted when room is needed
    /// (default 30 s).
    pub passive_idle: Duration,
    /// Handshake connections the listener serves at once (default 64); one more closes the
    /// oldest one of the source address holding the most.
    pub max_handshake_conns: usize,
    /// How long a handshake may take, both as client (connect, hello, request, reply) and as
    /// server (the whole request and reply of an accepted connection). Default: half the
    /// engine timeout, at most 2 s. `MC_RDMA_HANDSHAKE_TIMEOUT` (seconds).
    pub handshake_timeout: Option<Duration>,
    /// Path policy (default [`PathPolicy::PreferSameRail`]).
    pub path_policy: PathPolicy,
    /// How long a failing (local NIC, remote NIC) rail is avoided before one probe slice may
    /// use it again; doubles on repeated failure, up to 8× (default 30 s).
    /// `MC_RDMA_RAIL_PAUSE_SECONDS`.
    pub rail_pause: Duration,
    /// Attempts per slice across paths before it fails (default 8). `MC_RETRY_CNT`.
    pub max_attempts: u32,
    /// A QP with work outstanding that completes nothing for this long is broken and its
    /// slices are retried elsewhere (default: half the engine timeout). A deep queue that
    /// makes progress is never broken. `MC_SLICE_TIMEOUT` (seconds).
    pub slice_timeout: Option<Duration>,
    /// RC QP local ACK timeout exponent (4.096 µs × 2^n; default 14 ≈ 67 ms).
    pub qp_timeout: u8,
    /// RC QP transport retries (default 7).
    pub qp_retry_cnt: u8,
    /// Where the handshake listener binds (default `0.0.0.0:0`; the engine's hostname and
    /// the chosen port are published).
    pub listen: SocketAddr,
    /// Mooncake priority-matrix JSON overriding the sysfs topology. `MC_CUSTOM_TOPO_JSON`
    /// (a path).
    pub topology_json: Option<String>,
    /// CQ polls without a completion before a worker sleeps on the completion channel
    /// (default 4096, tens of microseconds to a millisecond; raise for lower latency on dedicated cores, lower to save CPU). `MC_RDMA_POLL_SPIN`.
    pub poll_spin: u32,
    /// Device memory (`cuda:N`) that a NIC cannot register from a dma-buf (GPUDirect RDMA)
    /// fails registering with that NIC's error. Default false: a warning names the NIC; the
    /// region moves over RDMA through the NICs that registered it, and when none did, the
    /// engine moves it with another transport that can (TCP, staged).
    /// `MC_RDMA_REQUIRE_GPUDIRECT=1`.
    pub require_gpudirect: bool,
    /// Per-NIC counters, shared with the transport this config builds.
    pub stats: Arc<RdmaStats>,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            nics: Vec::new(),
            port: 1,
            gid_index: None,
            slice_size: 64 << 10,
            max_wr: 256,
            cqe: 4096,
            max_endpoints: 256,
            max_passive: 1024,
            max_pending_per_ip: 256,
            passive_idle: Duration::from_secs(30),
            max_handshake_conns: 64,
            handshake_timeout: None,
            path_policy: PathPolicy::default(),
            rail_pause: Duration::from_secs(30),
            max_attempts: 8,
            slice_timeout: None,
            qp_timeout: 14,
            qp_retry_cnt: 7,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            topology_json: None,
            poll_spin: 4096,
            require_gpudirect: false,
            stats: Arc::new(RdmaStats::default()),
        }
    }
}

fn env<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some).map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!("{name}={v:?} is not a valid value"),
            )
        }),
        _ => Ok(None),
    }
}

impl RdmaConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The defaults, overridden by the `MC_*` variables named on each field.
    pub fn from_env() -> Result<Self> {
        let mut c = Self::default();
        if let Some(v) = env::<String>("MC_RDMA_NICS")? {
            c.nics = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("MC_IB_PORT")? {
            c.port = v;
        }
        c.gid_index = env("MC_GID_INDEX")?.or(c.gid_index);
        if let Some(v) = env("MC_SLICE_SIZE")? {
            c.slice_size = v;
        }
        if let Some(v) = env("MC_MAX_WR")? {
            c.max_wr = v;
        }
        if let Some(v) = env("MC_MAX_CQE_PER_CTX")? {
            c.cqe = v;
        }
        if let Some(v) = env("MC_MAX_EP_PER_CTX")? {
            c.max_endpoints = v;
        }
        if let Some(v) = env::<u64>("MC_RDMA_RAIL_PAUSE_SECONDS")? {
            c.rail_pause = Duration::from_secs(v);
        }
        if let Some(v) = env("MC_RETRY_CNT")? {
            c.max_attempts = v;
        }
        if let Some(v) = env::<f64>("MC_SLICE_TIMEOUT")? {
            c.slice_timeout = Some(Duration::from_secs_f64(v));
        }
        if let Some(v) = env::<f64>("MC_RDMA_HANDSHAKE_TIMEOUT")? {
            c.handshake_timeout = Some(Duration::from_secs_f64(v));
        }
        if let Some(path) = env::<String>("MC_CUSTOM_TOPO_JSON")? {
            let json = std::fs::read_to_string(&path).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("MC_CUSTOM_TOPO_JSON={path}: {e}"),
                )
            })?;
            c.topology_json = Some(json);
        }
        if let Some(v) = env("MC_RDMA_POLL_SPIN")? {
            c.poll_spin = v;
        }
        if let Some(v) = env::<u8>("MC_RDMA_REQUIRE_GPUDIRECT")? {
            c.require_gpudirect = v != 0;
        }
        if let Some(v) = env::<String>("MC_RDMA_PATH_POLICY")? {
            c.path_policy = match v.as_str() {
                "all" => PathPolicy::All,
                "prefer_same_rail" => PathPolicy::PreferSameRail,
                "same_rail_only" => PathPolicy::SameRailOnly,
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "MC_RDMA_PATH_POLICY={v:?}: expected all, prefer_same_rail or same_rail_only"
                        ),
                    ));
                }
            };
        }
        Ok(c)
    }

    /// Sets [`require_gpudirect`](Self::require_gpudirect).
    pub fn with_require_gpudirect(mut self, yes: bool) -> Self {
        self.require_gpudirect = yes;
        self
    }

    /// Uses only these devices.
    pub fn with_nics<I: IntoIterator<Item = S>, S: Into<String>>(mut self, nics: I) -> Self {
        self.nics = nics.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the device port.
    pub fn with_port(mut self, port: u8) -> Self {
        self.port = port;
        self
    }

    /// Sets the GID index.
    pub fn with_gid_index(mut self, index: u8) -> Self {
        self.gid_index = Some(index);
        self
    }

    /// Sets the slice size (bytes, at least 4 KiB).
    pub fn with_slice_size(mut self, bytes: u64) -> Self {
        self.slice_size = bytes;
        self
    }

    /// Sets the work requests in flight per QP.
    pub fn with_max_wr(mut self, n: u32) -> Self {
        self.max_wr = n;
        self
    }

    /// Sets the endpoint pool size per NIC.
    pub fn with_max_endpoints(mut self, n: usize) -> Self {
        self.max_endpoints = n;
        self
    }

    /// Sets the path policy.
    pub fn with_path_policy(mut self, p: PathPolicy) -> Self {
        self.path_policy = p;
        self
    }

    /// Sets the rail pause.
    pub fn with_rail_pause(mut self, d: Duration) -> Self {
        self.rail_pause = d;
        self
    }

    /// Sets the attempts per slice.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets the software slice timeout.
    pub fn with_slice_timeout(mut self, d: Duration) -> Self {
        self.slice_timeout = Some(d);
        self
    }

    /// Sets the handshake timeout.
    pub fn with_handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = Some(d);
        self
    }

    /// Sets how many passive QPs are kept.
    pub fn with_max_passive(mut self, n: usize) -> Self {
        self.max_passive = n;
        self
    }

    /// Sets the CQ entries per NIC (at least `max_wr`).
    pub fn with_cqe(mut self, n: u32) -> Self {
        self.cqe = n;
        self
    }

    /// Sets the handshake listen address.
    pub fn with_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Uses a Mooncake priority-matrix JSON instead of sysfs NUMA nodes.
    pub fn with_topology_json(mut self, json: impl Into<String>) -> Self {
        self.topology_json = Some(json.into());
        self
    }

    /// Sets the spin count before sleeping on the completion channel.
    pub fn with_poll_spin(mut self, n: u32) -> Self {
        self.poll_spin = n;
        self
    }

    /// The counters the built transport will update.
    pub fn stats(&self) -> Arc<RdmaStats> {
        self.stats.clone()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::Config, m));
        if self.slice_size < 4096 || self.slice_size > (1 << 30) {
            return bad(format!(
                "slice size {} must be within 4 KiB..1 GiB",
                self.slice_size
            ));
        }
        if self.max_wr == 0 || self.cqe < self.max_wr {
            return bad(format!(
                "max_wr {} must be ≥ 1 and ≤ cqe {}",
                self.max_wr, self.cqe
            ));
        }
        if self.max_endpoints == 0 || self.max_attempts == 0 {
            return bad("max_endpoints and max_attempts must be ≥ 1".into());
        }
        if self.max_passive == 0 || self.max_pending_per_ip == 0 || self.max_handshake_conns == 0 {
            return bad(
                "max_passive, max_pending_per_ip and max_handshake_conns must be ≥ 1".into(),
            );
        }
        Ok(())
    }
}
