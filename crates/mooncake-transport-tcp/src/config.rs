//! [`TcpConfig`]: how the TCP transport listens, connects, slices and times out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{EngineContext, Error, ErrorKind, Result, Transport, TransportBuilder};

use crate::transport::TcpTransport;

/// Configuration of a [`TcpTransport`]; also its [`TransportBuilder`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TcpConfig {
    /// Addresses to listen on, one per network path (default: the engine's hostname).
    pub listen: Vec<IpAddr>,
    /// Port for the first listener (0 = any free port); further listeners take any port.
    pub port: u16,
    /// At most this many connections are opened to each path of each peer (more only when
    /// the existing ones are busy).
    pub conns_per_path: usize,
    /// At most this many initiator connections in total (over all peers).
    pub max_connections: usize,
    /// At most this many target connections in total; more are refused at once.
    pub max_server_connections: usize,
    /// Requests at least twice this long are striped over several connections.
    pub stripe_min: u64,
    /// No slice on the wire is longer than this.
    pub max_slice: u64,
    /// No progress for this long fails a connection (default: the engine's timeout).
    pub timeout: Option<Duration>,
    /// A path whose connection failed is avoided for this long, then probed.
    pub path_pause: Duration,
    /// The submitting thread writes up to this many bytes of its requests itself when the
    /// connection is idle (saves a hand-off to an I/O thread); the rest is left to the I/O
    /// thread.
    pub inline_send_max: u64,
    /// `SO_SNDBUF`/`SO_RCVBUF` for data connections (None = kernel default).
    pub socket_buffer: Option<usize>,
    /// An initiator connection with nothing to do for this long is closed (targets close
    /// theirs after twice as long).
    pub idle_timeout: Duration,
    /// The slowest rate (bytes/s) a request may move at: a request fails once it has been
    /// on the wire longer than the no-progress timeout plus its bytes (and those queued
    /// ahead of it on its connection) at this rate, so a peer that trickles bytes cannot
    /// hold it forever.
    pub min_rate: u64,
    /// Encrypt every connection with TLS 1.3 (needs the `tls` feature). Default: on when
    /// the environment has `MC_TCP_TLS=1` (or `true`). A target with TLS on refuses plain
    /// connections and says so in its descriptor; an initiator with TLS on refuses targets
    /// that do not offer it.
    pub tls: bool,
}

/// `MC_TCP_TLS` as a flag.
fn tls_from_env() -> bool {
    std::env::var("MC_TCP_TLS")
        .map(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            port: 0,
            conns_per_path: 4,
            max_connections: 4096,
            max_server_connections: 4096,
            stripe_min: 256 * 1024,
            max_slice: 16 * 1024 * 1024,
            timeout: None,
            path_pause: Duration::from_secs(10),
            inline_send_max: 256 * 1024,
            socket_buffer: None,
            idle_timeout: Duration::from_secs(60),
            min_rate: 1 << 20,
            tls: tls_from_env(),
        }
    }
}

impl TcpConfig {
    /// Defaults: 4 connections per path, striping from 512 KiB, 16 MiB slices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens on these addresses (one listener, and one network path, each).
    pub fn with_listen(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.listen = addrs.into_iter().collect();
        self
    }

    /// Listens on this port (first listener only).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Connections per path per peer.
    pub fn with_conns_per_path(mut self, n: usize) -> Self {
        self.conns_per_path = n;
        self
    }

    /// Minimum stripe size.
    pub fn with_stripe_min(mut self, bytes: u64) -> Self {
        self.stripe_min = bytes;
        self
    }

    /// Maximum slice size.
    pub fn with_max_slice(mut self, bytes: u64) -> Self {
        self.max_slice = bytes;
        self
    }

    /// No-progress timeout (overrides the engine's).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long a failed path is avoided.
    pub fn with_path_pause(mut self, pause: Duration) -> Self {
        self.path_pause = pause;
        self
    }

    /// Largest request written inline by the submitting thread.
    pub fn with_inline_send_max(mut self, bytes: u64) -> Self {
        self.inline_send_max = bytes;
        self
    }

    /// Socket buffer size for data connections.
    pub fn with_socket_buffer(mut self, bytes: usize) -> Self {
        self.socket_buffer = Some(bytes);
        self
    }

    /// Total initiator connections.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Total target connections.
    pub fn with_max_server_connections(mut self, n: usize) -> Self {
        self.max_server_connections = n;
        self
    }

    /// How long an idle initiator connection stays open.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// The slowest rate a request may move at before it fails (see [`Self::min_rate`]).
    pub fn with_min_rate(mut self, bytes_per_sec: u64) -> Self {
        self.min_rate = bytes_per_sec;
        self
    }

    /// Turns TLS of every connection on or off.
    pub fn with_tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::new(ErrorKind::Config, format!("tcp transport: {m}")));
        if self.conns_per_path == 0 || self.conns_per_path > 64 {
            return bad("conns_per_path must be between 1 and 64");
        }
        if self.max_slice < 4096 || self.max_slice > (1 << 30) {
            return bad("max_slice must be between 4 KiB and 1 GiB");
        }
        if self.stripe_min == 0 {
            return bad("stripe_min must be positive");
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout must be positive");
        }
        if self.max_connections == 0 || self.max_server_connections == 0 {
            return bad("connection caps must be positive");
        }
        if self.min_rate == 0 || self.idle_timeout.is_zero() {
            return bad("min_rate and idle_timeout must be positive");
        }
        Ok(())
    }
}

impl TransportBuilder for TcpConfig {
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(TcpTransport::start(*self, ctx)?))
    }
}
