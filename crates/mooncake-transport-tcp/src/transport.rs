//! [`TcpTransport`]: the [`Transport`] implementation that ties the server and the
//! connection pools together.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mooncake_core::{
    EngineContext, Error, ErrorKind, RemoteSegment, Result, SegmentDescriptor, TransferTask,
    Transport, TransportCapabilities,
};
use tracing::info;

use crate::client::{ClientShared, Peer, Slice, Stats};
use crate::config::TcpConfig;
use crate::server::{ServerShared, accept_loop};

/// The protocol name published in descriptors.
pub const TCP_SCHEME: &str = "tcp";

/// The framing version published as `tcp_proto_version` (acknowledged writes).
pub const TCP_PROTO_VERSION: u32 = 2;

/// Counters of a [`TcpTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TcpStats {
    /// Connections opened.
    pub connects: u64,
    /// Slices retried on another path.
    pub retries: u64,
    /// Connections that failed.
    pub conn_failures: u64,
    /// Payload bytes moved per path index (in the order of the peer's published addresses).
    pub bytes_per_path: Vec<u64>,
}

/// Moves bytes over TCP: range-checked on the target, pooled and striped on the initiator,
/// acknowledged after the bytes are applied.
pub struct TcpTransport {
    cfg: TcpConfig,
    server: Arc<ServerShared>,
    client: Arc<ClientShared>,
    listen_addrs: Vec<SocketAddr>,
    listener_fds: Vec<TcpListener>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("listen", &self.listen_addrs)
            .finish_non_exhaustive()
    }
}

pub(crate) fn apply_socket_buffer(stream: &TcpStream, size: Option<usize>) {
    if let Some(size) = size {
        let s = socket2::SockRef::from(stream);
        let _ = s.set_send_buffer_size(size);
        let _ = s.set_recv_buffer_size(size);
    }
}

impl TcpTransport {
    /// Binds the listeners and starts the accept threads.
    pub fn start(cfg: TcpConfig, ctx: &EngineContext) -> Result<Self> {
        cfg.validate()?;
        let timeout = cfg.timeout.unwrap_or(ctx.timeout);
        let mut ips = cfg.listen.clone();
        if ips.is_empty() {
            ips.push(
                ctx.hostname
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            );
        }
        let max_data = cfg.max_slice;
        let server = Arc::new(ServerShared {
            registry: ctx.registry.clone(),
            local_name: ctx.local_name.clone(),
            generation: ctx.generation,
            timeout,
            max_data,
            closed: AtomicBool::new(false),
            socket_buffer: cfg.socket_buffer,
        });
        let mut listen_addrs = Vec::new();
        let mut listener_fds = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let port = if i == 0 { cfg.port } else { 0 };
            let l = TcpListener::bind((*ip, port)).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("tcp transport cannot listen on {ip}:{port}: {e}"),
                )
            })?;
            let addr = l
                .local_addr()
                .map_err(|e| Error::io("listener address", &e))?;
            let keep = l.try_clone().map_err(|e| Error::io("listener clone", &e))?;
            let s = server.clone();
            std::thread::Builder::new()
                .name(format!("mooncake-tcp-accept-{}", addr.port()))
                .spawn(move || accept_loop(l, s))
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot spawn the accept thread: {e}"),
                    )
                })?;
            info!(segment = %ctx.local_name, %addr, "tcp transport listening");
            listen_addrs.push(addr);
            listener_fds.push(keep);
        }
        let client = Arc::new(ClientShared {
            conns_per_path: cfg.conns_per_path,
            timeout,
            path_pause: cfg.path_pause,
            inline_send_max: cfg.inline_send_max,
            max_data,
            socket_buffer: cfg.socket_buffer,
            closed: AtomicBool::new(false),
            epoch: Instant::now(),
            next_conn: AtomicU64::new(0),
            stats: Stats::default(),
        });
        Ok(Self {
            cfg,
            server,
            client,
            listen_addrs,
            listener_fds,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// The addresses the transport listens on, one per path.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Counters since start.
    pub fn stats(&self) -> TcpStats {
        let s = &self.client.stats;
        TcpStats {
            connects: s.connects.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            conn_failures: s.conn_failures.load(Ordering::Relaxed),
            bytes_per_path: s
                .bytes_per_path
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Open connections to `segment` (0 if none).
    pub fn connections_to(&self, segment: &str) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(segment)
            .map_or(0, |p| p.conn_count())
    }

    fn paths_of(remote: &RemoteSegment) -> Vec<SocketAddr> {
        remote
            .descriptor()
            .tcp_data_addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    fn peer(&self, remote: &RemoteSegment) -> Result<Arc<Peer>> {
        let d = remote.descriptor();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get(&d.name) {
            if p.generation == d.generation {
                return Ok(p.clone());
            }
            // The peer restarted: its old connections are stale.
            p.close();
        }
        let paths = Self::paths_of(remote);
        if paths.is_empty() || paths.len() > 64 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "segment {:?} publishes {} TCP addresses (need 1 to 64)",
                    d.name,
                    paths.len()
                ),
            ));
        }
        let p = Peer::new(d.name.clone(), d.generation, paths, self.client.clone());
        peers.insert(d.name.clone(), p.clone());
        Ok(p)
    }

    /// How many slices a lone request of `len` bytes becomes over `conns` connections.
    fn stripes(&self, len: u64, conns: u64) -> u64 {
        let by_stripe = if len >= 2 * self.cfg.stripe_min {
            (len / self.cfg.stripe_min).min(conns)
        } else {
            1
        };
        by_stripe.max(len.div_ceil(self.cfg.max_slice)).max(1)
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        TCP_SCHEME
    }

    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default()
    }

    fn publish(&self, d: &mut SegmentDescriptor) {
        d.tcp_data_port = self.listen_addrs[0].port();
        d.tcp_proto_version = TCP_PROTO_VERSION;
        d.tcp_data_addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
    }

    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        remote.descriptor().speaks(TCP_SCHEME) && !Self::paths_of(remote).is_empty()
    }

    fn submit(&self, tasks: Vec<TransferTask>) {
        // A batch with at least one task per connection already spreads over all of them:
        // slicing its tasks further only adds frames. A lone small task is written by the
        // submitting thread when its connection is idle.
        let count = tasks.len();
        let mut per_peer: Vec<(Arc<Peer>, Vec<Slice>)> = Vec::new();
        for task in tasks {
            if self.client.closed.load(Ordering::Acquire) {
                task.completer.complete(Err(Error::new(
                    ErrorKind::Closed,
                    "tcp transport shut down",
                )));
                continue;
            }
            let peer = match self.peer(&task.remote) {
                Ok(p) => p,
                Err(e) => {
                    task.completer.complete(Err(e));
                    continue;
                }
            };
            let len = task.local.len();
            let conns = self.cfg.conns_per_path * peer.path_count();
            let n = if count >= conns {
                len.div_ceil(self.cfg.max_slice)
            } else {
                self.stripes(len, conns as u64)
            };
            let piece = len.div_ceil(n).next_multiple_of(4096).min(len);
            let mut dones = task
                .completer
                .into_slices(len.div_ceil(piece) as usize)
                .into_iter();
            let slices = match per_peer.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &peer)) {
                Some((_, v)) => v,
                None => {
                    per_peer.push((peer, Vec::new()));
                    &mut per_peer.last_mut().expect("just pushed").1
                }
            };
            let mut off = 0;
            while off < len {
                let this = piece.min(len - off);
                let done = dones.next().expect("one completer per slice");
                match task.local.slice(off, this) {
                    Ok(local) => slices.push(Slice {
                        op: task.opcode,
                        local,
                        remote_addr: task.remote_addr + off,
                        done,
                        attempts: 0,
                        failed_paths: 0,
                        inline_ok: count == 1,
                    }),
                    Err(e) => done.complete(Err(e)),
                }
                off += this;
            }
        }
        for (peer, slices) in per_peer {
            peer.dispatch_many(slices);
        }
    }

    fn forget_peer(&self, segment: &str, generation: Option<u64>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let matches = peers
            .get(segment)
            .is_some_and(|p| generation.is_none_or(|g| p.generation == g));
        if let Some(p) = matches.then(|| peers.remove(segment)).flatten() {
            drop(peers);
            p.close();
        }
    }

    fn shutdown(&self) {
        self.server.closed.store(true, Ordering::Release);
        self.client.closed.store(true, Ordering::Release);
        for l in &self.listener_fds {
            // SAFETY: shutting down a listening socket we own wakes its blocked `accept`.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let peers: Vec<_> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in peers {
            p.close();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
