//! [`TcpTransport`]: the [`Transport`] implementation that ties listeners, target
//! connections and initiator connection pools to the process-wide I/O loops.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mooncake_core::{
    EngineContext, Error, ErrorKind, Region, RemoteSegment, Result, SegmentDescriptor,
    TransferTask, Transport, TransportCapabilities,
};
use tracing::info;

use crate::client::{ClientShared, Peer, Slice, Stats};
use crate::config::TcpConfig;
use crate::reactor::{Entry, Reactor};
use crate::server::{ListenerIo, ServerShared};
use crate::tls::TlsConfig;

/// The protocol name published in descriptors.
pub const TCP_SCHEME: &str = "tcp";

/// The descriptor field (in `extra`) that says a target speaks TLS under its frames.
pub const TLS_FIELD: &str = "tcp_tls";

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
    /// Initiator connections open now.
    pub open_connections: usize,
    /// Target connections open now.
    pub open_server_connections: usize,
}

/// Moves bytes over TCP: range-checked on the target, pooled and striped on the initiator,
/// acknowledged after the bytes are applied, driven by a fixed set of I/O threads shared by
/// every transport of the process.
pub struct TcpTransport {
    cfg: TcpConfig,
    server: Arc<ServerShared>,
    client: Arc<ClientShared>,
    listen_addrs: Vec<SocketAddr>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("listen", &self.listen_addrs)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TcpTransport {
    /// Binds the listeners and hands them to the I/O loops.
    pub fn start(cfg: TcpConfig, ctx: &EngineContext) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        cfg.validate()?;
        let reactor = Reactor::global().map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot start the tcp I/O threads: {e}"),
            )
        })?;
        let timeout = cfg.timeout.unwrap_or(ctx.timeout);
        let mut ips = cfg.listen.clone();
        if ips.is_empty() {
            ips.push(
                ctx.hostname
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            );
        }
        let tls = if cfg.tls {
            Some(Arc::new(TlsConfig::new()?))
        } else {
            None
        };
        if tls.is_some() && ctx.secret.is_none() {
            tracing::warn!(
                "tcp transport TLS without a cluster secret: traffic is encrypted, but peers \
                 are not authenticated (set MC_CLUSTER_SECRET_FILE)"
            );
        }
        let server = Arc::new(ServerShared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry: ctx.registry.clone(),
            local_name: ctx.local_name.clone(),
            generation: ctx.generation,
            timeout,
            min_rate: cfg.min_rate,
            idle_timeout: cfg.idle_timeout * 2,
            max_data: cfg.max_slice,
            max_conns: cfg.max_server_connections,
            conns: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            socket_buffer: cfg.socket_buffer,
            secret: ctx.secret.clone(),
            tls: tls.clone(),
            fences: Default::default(),
        });
        let mut listen_addrs = Vec::new();
        let mut listeners = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let port = if i == 0 { cfg.port } else { 0 };
            let l = TcpListener::bind((*ip, port)).map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("tcp transport cannot listen on {ip}:{port}: {e}"),
                )
            })?;
            l.set_nonblocking(true)
                .map_err(|e| Error::io("listener", &e))?;
            let addr = l
                .local_addr()
                .map_err(|e| Error::io("listener address", &e))?;
            info!(segment = %ctx.local_name, %addr, "tcp transport listening");
            if ctx.secret.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "tcp transport listens beyond loopback without a cluster secret: anyone who \
                     can reach {addr} can read and write registered memory (set \
                     MC_CLUSTER_SECRET_FILE)"
                );
            }
            listen_addrs.push(addr);
            listeners.push(l);
        }
        for (i, l) in listeners.into_iter().enumerate() {
            let io = ListenerIo::new(l, server.clone());
            reactor.at(server.id as usize + i).post(move |cx| {
                if let Err(e) = cx.add(Entry::Listener(io), false) {
                    tracing::error!("tcp transport cannot watch its listener: {e}");
                }
            });
        }
        let client = Arc::new(ClientShared {
            local_name: ctx.local_name.clone(),
            generation: ctx.generation,
            conns_per_path: cfg.conns_per_path,
            max_conns: cfg.max_connections,
            timeout,
            min_rate: cfg.min_rate,
            idle_timeout: cfg.idle_timeout,
            path_pause: cfg.path_pause,
            inline_send_max: cfg.inline_send_max,
            max_data: cfg.max_slice,
            socket_buffer: cfg.socket_buffer,
            closed: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            stats: Stats::default(),
            secret: ctx.secret.clone(),
            tls,
        });
        Ok(Self {
            cfg,
            server,
            client,
            listen_addrs,
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
            bytes_per_path: lock(&s.bytes_per_path).clone(),
            open_connections: self.client.conns.load(Ordering::Relaxed),
            open_server_connections: self.server.conns.load(Ordering::Relaxed),
        }
    }

    /// Open connections to `segment` (0 if none).
    pub fn connections_to(&self, segment: &str) -> usize {
        lock(&self.peers).get(segment).map_or(0, |p| p.conn_count())
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
        let mut peers = lock(&self.peers);
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
        let offers_tls = d.extra.get(TLS_FIELD).and_then(|v| v.as_bool()) == Some(true);
        if offers_tls != self.cfg.tls {
            let why = if self.cfg.tls {
                "does not offer TLS on its tcp transport, which this engine requires (MC_TCP_TLS)"
            } else {
                "requires TLS on its tcp transport: set MC_TCP_TLS=1 (or TcpConfig::with_tls)"
            };
            return Err(
                Error::new(ErrorKind::Config, format!("segment {:?} {why}", d.name))
                    .with_temporary(false),
            );
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

    /// Runs `f` on every I/O loop for each of this transport's entries there, and waits.
    fn on_every_loop(&self, f: impl Fn(&mut crate::reactor::Cx<'_>) + Send + Sync + 'static) {
        let Ok(reactor) = Reactor::global() else {
            return;
        };
        let f = Arc::new(f);
        for lp in reactor.all() {
            let f = f.clone();
            lp.post_and_wait(move |cx| f(cx));
        }
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        TCP_SCHEME
    }

    fn capabilities(&self) -> TransportCapabilities {
        // Device memory is staged through pinned host chunks by the installed device runtime
        // (see `staging`); without one it is refused.
        TransportCapabilities::default()
            .with_device_memory(mooncake_core::device::device_copier().is_some())
    }

    fn publish(&self, d: &mut SegmentDescriptor) {
        d.tcp_data_port = self.listen_addrs[0].port();
        d.tcp_proto_version = TCP_PROTO_VERSION;
        d.tcp_data_addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
        if self.cfg.tls {
            d.extra
                .insert(TLS_FIELD.to_string(), serde_json::Value::Bool(true));
        }
    }

    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        remote.descriptor().speaks(TCP_SCHEME) && !Self::paths_of(remote).is_empty()
    }

    fn submit(&self, tasks: Vec<TransferTask>) {
        // A batch with at least one task per connection already spreads over all of them:
        // slicing its tasks further only adds frames.
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
                        local: Some(local),
                        len: this,
                        remote_addr: task.remote_addr + off,
                        done,
                        attempts: 0,
                        failed_paths: 0,
                    }),
                    Err(e) => done.complete(Err(e)),
                }
                off += this;
            }
        }
        for (peer, slices) in per_peer {
            peer.dispatch(slices);
        }
    }

    fn on_unregister(&self, region: &Arc<Region>) {
        // Slices queued or in flight from this engine drop their hold on the region; target
        // connections stop writing into it (the rest of a write's payload is discarded) and
        // stop reading from it. Leases go on the loop threads, which the engine then waits for.
        let peers: Vec<Arc<Peer>> = lock(&self.peers).values().cloned().collect();
        for p in &peers {
            p.revoke(region);
        }
        let (id, client) = (self.server.id, self.client.clone());
        let region = region.clone();
        let Ok(reactor) = Reactor::global() else {
            return;
        };
        for lp in reactor.all() {
            let (region, client) = (region.clone(), client.clone());
            lp.post(move |cx| {
                let mut close = Vec::new();
                for (t, e) in cx.entries() {
                    let keep = match e {
                        Entry::Server(s) if s.shared().id == id => s.revoke(&region),
                        Entry::Client(c) if Arc::ptr_eq(c.shared(), &client) => {
                            c.revoke(&region);
                            true
                        }
                        _ => true,
                    };
                    if !keep {
                        close.push(t);
                    }
                }
                for t in close {
                    cx.close_now(t);
                }
            });
        }
    }

    fn forget_peer(&self, segment: &str, generation: Option<u64>) {
        let mut peers = lock(&self.peers);
        let matches = peers
            .get(segment)
            .is_some_and(|p| generation.is_none_or(|g| p.generation == g));
        if let Some(p) = matches.then(|| peers.remove(segment)).flatten() {
            drop(peers);
            p.close();
        }
    }

    fn shutdown(&self) {
        if self.server.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.client.closed.store(true, Ordering::Release);
        let peers: Vec<_> = lock(&self.peers).drain().map(|(_, p)| p).collect();
        for p in peers {
            p.close();
        }
        // Close every listener and connection of this transport on every loop, and wait:
        // once this returns no loop touches this transport's memory any more.
        let (id, client) = (self.server.id, self.client.clone());
        self.on_every_loop(move |cx| {
            let mine: Vec<_> = cx
                .entries()
                .filter(|(_, e)| match e {
                    Entry::Server(s) => s.shared().id == id,
                    Entry::Listener(l) => l.shared().id == id,
                    Entry::Client(c) => Arc::ptr_eq(c.shared(), &client),
                })
                .map(|(t, _)| t)
                .collect();
            for t in mine {
                cx.close_now(t);
            }
        });
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
