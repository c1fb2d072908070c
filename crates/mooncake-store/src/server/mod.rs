//! The master server: [`Master`] behind a mutex, served over the RPC of [`crate::rpc`].
//!
//! # Threads
//!
//! - `mooncake-master-accept`: accepts RPC connections (capped at
//!   [`ServerConfig::max_connections`]); each gets a thread with a blocking socket
//!   (`TCP_NODELAY`) that reads a request, takes the master's lock once, and writes the reply.
//! - `mooncake-master-tick`: runs [`Master::tick`] every [`ServerConfig::tick_interval`]
//!   (client expiry, stale puts, quarantined ranges, the watermark eviction pass).
//! - the admin HTTP port ([`admin`]) and, optionally, the HTTP metadata server of
//!   `mooncake-metadata` in the same process.
//!
//! # Sessions
//!
//! The connection on which a client registers (and heartbeats) is its session connection.
//! When it closes — the process died, or closed the client — the master calls
//! [`Master::client_disconnected`] at once: the client's in-flight puts are revoked (their keys
//! writable again, their ranges quarantined) and its segments take no new allocations until
//! it comes back or expires. A loaded data connection never delays a heartbeat, since
//! heartbeats have their own connection (Mooncake #1753).

#![forbid(unsafe_code)]

pub mod admin;
pub mod events;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::master::{ClientId, ClientStatus, Master, MasterConfig};
use crate::rpc::{self, FrameKind, Request, Response, SessionInfo};
use crate::types::{StoreError, StoreErrorCode};

/// A clock in milliseconds (the master's `now_ms`).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A duration in microseconds from the environment, or `default`.
pub(crate) fn env_us(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Wall-clock Unix milliseconds (so soft pin deadlines survive a master restart).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Configuration of a [`MasterServer`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// RPC address (the reference's `--rpc_address`:`--rpc_port`, default `0.0.0.0:50051`).
    pub rpc_addr: SocketAddr,
    /// Admin HTTP address (`--metrics_port`, default 9003); `None` disables it.
    pub admin_addr: Option<SocketAddr>,
    /// Address of the in-process HTTP metadata server (`--enable_http_metadata_server`,
    /// `--http_metadata_server_port` 8080); `None` disables it.
    pub http_metadata_addr: Option<SocketAddr>,
    /// The state machine's configuration.
    pub master: MasterConfig,
    /// How often `tick` runs. Default 100 ms.
    pub tick_interval: Duration,
    /// RPC connections served at once; more are closed at accept. Default 4096.
    pub max_connections: usize,
    /// The master's clock. Default [`unix_ms`].
    pub clock: Clock,
    /// After replying, a connection thread polls this long for the client's next request
    /// before it sleeps in `read` (saves a wake-up per request on busy connections). Default
    /// 0 (off), or `MC_MASTER_SPIN_US`.
    pub request_spin: Duration,
    /// Clients must prove they hold this secret on every connection before any request is
    /// served (default: from `MC_CLUSTER_SECRET_FILE` / `MC_CLUSTER_SECRET`).
    pub cluster_secret: Option<mooncake_core::ClusterSecret>,
    /// A whole RPC frame must arrive within this plus its length at 1 MiB/s once its first
    /// byte did; with a cluster secret, a connection must also prove it within this. The
    /// admin port's whole request head must arrive within it. Default 10 s.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("rpc_addr", &self.rpc_addr)
            .field("admin_addr", &self.admin_addr)
            .field("http_metadata_addr", &self.http_metadata_addr)
            .field("master", &self.master)
            .field("tick_interval", &self.tick_interval)
            .field("max_connections", &self.max_connections)
            .field("request_spin", &self.request_spin)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            rpc_addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            admin_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9003))),
            http_metadata_addr: None,
            master: MasterConfig::default(),
            tick_interval: Duration::from_millis(100),
            max_connections: 4096,
            clock: Arc::new(unix_ms),
            request_spin: Duration::from_micros(env_us("MC_MASTER_SPIN_US", 0)),
            cluster_secret: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Everything on loopback with free ports, no admin port, no metadata server: what tests
    /// and the embedded bench use.
    pub fn loopback() -> Self {
        Self {
            rpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: None,
            ..Self::default()
        }
    }

    /// Requires clients to prove `secret` on every connection (`None`: no authentication).
    pub fn with_cluster_secret(mut self, secret: Option<mooncake_core::ClusterSecret>) -> Self {
        self.cluster_secret = secret;
        self
    }

    /// Sets the request deadline ([`ServerConfig::request_timeout`]).
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Sets the RPC address.
    pub fn with_rpc_addr(mut self, addr: SocketAddr) -> Self {
        self.rpc_addr = addr;
        self
    }

    /// Sets (or disables) the admin HTTP address.
    pub fn with_admin_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.admin_addr = addr;
        self
    }

    /// Sets (or disables) the in-process HTTP metadata server.
    pub fn with_http_metadata_addr(mut self, addr: Option<SocketAddr>) -> Self {
        self.http_metadata_addr = addr;
        self
    }

    /// Sets the state machine's configuration.
    pub fn with_master(mut self, master: MasterConfig) -> Self {
        self.master = master;
        self
    }

    /// Sets the tick interval.
    pub fn with_tick_interval(mut self, d: Duration) -> Self {
        self.tick_interval = d;
        self
    }

    /// Sets the clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }
}

/// Per-request counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct RpcCounter {
    pub(crate) calls: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) keys: AtomicU64,
    pub(crate) micros: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) master: Mutex<Master>,
    pub(crate) clock: Clock,
    pub(crate) epoch: u64,
    stopping: AtomicBool,
    stop_cv: Condvar,
    stop_lock: Mutex<()>,
    sessions: Mutex<HashMap<ClientId, u64>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    max_connections: usize,
    pub(crate) counters: Vec<RpcCounter>,
    pub(crate) connections: AtomicU64,
    pub(crate) started: Instant,
    request_spin: Duration,
    secret: Option<mooncake_core::ClusterSecret>,
    pub(crate) request_timeout: Duration,
    /// Puts, removes and evictions for `GET /kv_events` on the admin port.
    pub(crate) kv_events: events::KvEventLog,
}

/// An open RPC connection, for shutting it down (on stop, or to evict it).
struct Conn {
    stream: TcpStream,
    /// It proved the cluster secret (or none is required).
    proven: Arc<AtomicBool>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Master> {
        self.master.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The admin port's bearer token, when a cluster secret is configured.
    pub(crate) fn admin_token(&self) -> Option<String> {
        self.secret.as_ref().map(|s| s.token("store-admin"))
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// A running master. Stops when [`stop`](Self::stop) is called or the value is dropped.
pub struct MasterServer {
    shared: Arc<Shared>,
    rpc_addr: SocketAddr,
    admin: Option<admin::AdminServer>,
    metadata: Option<mooncake_metadata::http::HttpMetadataServer>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for MasterServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterServer")
            .field("rpc_addr", &self.rpc_addr)
            .field("admin_addr", &self.admin_addr())
            .field("metadata_url", &self.metadata_url())
            .finish_non_exhaustive()
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

impl MasterServer {
    /// Binds the ports and starts serving.
    pub fn start(cfg: ServerConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(cfg.rpc_addr)?;
        let rpc_addr = listener.local_addr()?;
        let epoch = unix_ms() ^ ((std::process::id() as u64) << 40);
        let shared = Arc::new(Shared {
            master: Mutex::new(Master::new(cfg.master.clone())),
            clock: cfg.clock.clone(),
            epoch,
            stopping: AtomicBool::new(false),
            stop_cv: Condvar::new(),
            stop_lock: Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            max_connections: cfg.max_connections.max(1),
            counters: Request::NAMES
                .iter()
                .map(|_| RpcCounter::default())
                .collect(),
            connections: AtomicU64::new(0),
            started: Instant::now(),
            request_spin: cfg.request_spin,
            secret: cfg.cluster_secret.clone(),
            request_timeout: cfg.request_timeout,
            kv_events: events::KvEventLog::default(),
        });
        let metadata = match cfg.http_metadata_addr {
            Some(a) => Some(
                mooncake_metadata::http::HttpMetadataServer::bind(
                    a,
                    mooncake_metadata::http::HttpServerConfig::default().with_token(
                        cfg.cluster_secret
                            .as_ref()
                            .map(mooncake_metadata::auth::metadata_token),
                    ),
                )
                .map_err(|e| io::Error::other(e.to_string()))?,
            ),
            None => None,
        };
        let admin = match cfg.admin_addr {
            Some(a) => Some(admin::AdminServer::start(a, shared.clone())?),
            None => None,
        };
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(spawn("mooncake-master-accept", move || {
            accept_loop(listener, s)
        })?);
        let s = shared.clone();
        let interval = cfg.tick_interval;
        threads.push(spawn("mooncake-master-tick", move || {
            tick_loop(s, interval)
        })?);
        tracing::info!(%rpc_addr, "mooncake master listening");
        Ok(Self {
            shared,
            rpc_addr,
            admin,
            metadata,
            threads,
        })
    }

    /// The bound RPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    /// RPC connections open now (authenticated or not).
    pub fn rpc_connections(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The URL of the in-process HTTP metadata server, if started.
    pub fn metadata_url(&self) -> Option<String> {
        self.metadata.as_ref().map(|m| m.url())
    }

    /// Runs `f` on the state machine under its lock (tests, the embedded bench).
    pub fn with_master<R>(&self, f: impl FnOnce(&mut Master) -> R) -> R {
        f(&mut self.shared.lock())
    }

    /// Blocks until the server stops.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops: closes the listener and every connection (clients see the master die) and joins
    /// the threads. The metadata state is dropped.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let _g = self.shared.stop_lock.lock();
            self.shared.stop_cv.notify_all();
        }
        self.shared.kv_events.wake_all();
        let _ = TcpStream::connect_timeout(&wake_addr(self.rpc_addr), Duration::from_secs(1));
        for (_, c) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        if let Some(m) = self.metadata.take() {
            m.shutdown();
        }
    }
}

impl Drop for MasterServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where to connect to wake an accept loop bound to `addr` (a wildcard becomes loopback).
pub(crate) fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}

/// The challenge-response of one connection: the client sends its nonce (`Auth`), the
/// master answers with its nonce and proof (`Challenge`), the client proves (`Prove`).
/// Nothing else is served before that succeeds.
struct ConnAuth {
    proven: bool,
    /// (client nonce, master nonce) once challenged.
    nonces: Option<([u8; 16], [u8; 16])>,
}

/// Role tags of the store's proofs.
pub(crate) const MASTER_ROLE: &[u8] = b"mooncake-store-master";
pub(crate) const CLIENT_ROLE: &[u8] = b"mooncake-store-client";

impl ConnAuth {
    fn step(&mut self, secret: Option<&mooncake_core::ClusterSecret>, req: Request) -> Response {
        let refuse = |m: &str| Response::Error(StoreError::new(StoreErrorCode::IllegalClient, m));
        let Some(secret) = secret else {
            return refuse("this master has no cluster secret");
        };
        match req {
            Request::Auth { nonce } if self.nonces.is_none() => {
                let mine = mooncake_core::auth::nonce();
                self.nonces = Some((nonce, mine));
                Response::Challenge {
                    nonce: mine,
                    proof: secret.prove(MASTER_ROLE, &[&nonce, &mine]).to_vec(),
                }
            }
            Request::Prove { proof } => match self.nonces {
                Some((c, m)) if secret.verify(CLIENT_ROLE, &[&c, &m], &proof) => {
                    self.proven = true;
                    Response::Pong
                }
                _ => refuse("wrong cluster secret"),
            },
            _ => refuse("unexpected authentication message"),
        }
    }
}

fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    for conn in listener.incoming() {
        if s.stopping() {
            return;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: the connection stays in the backlog; back off rather
                // than spinning.
                tracing::warn!("RPC accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let proven = Arc::new(AtomicBool::new(s.secret.is_none()));
        {
            let mut conns = s.conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns.len() >= s.max_connections {
                // Evict the oldest connection that has not proven the secret (an attacker's
                // connections cannot keep authenticated clients out); refuse if there is none.
                let oldest = conns
                    .iter()
                    .filter(|(_, c)| !c.proven.load(Ordering::Acquire))
                    .map(|(id, _)| *id)
                    .min();
                match oldest.and_then(|id| conns.remove(&id)) {
                    Some(old) => {
                        let _ = old.stream.shutdown(std::net::Shutdown::Both);
                    }
                    None => {
                        tracing::warn!(
                            open = conns.len(),
                            "refusing an RPC connection: too many open"
                        );
                        continue;
                    }
                }
            }
            let _ = conn.set_nodelay(true);
            let id = s.next_conn.fetch_add(1, Ordering::Relaxed);
            let Ok(stream) = conn.try_clone() else {
                continue;
            };
            conns.insert(
                id,
                Conn {
                    stream,
                    proven: proven.clone(),
                },
            );
            drop(conns);
            let s2 = s.clone();
            if spawn("mooncake-master-conn", move || {
                serve_conn(conn, id, proven, s2)
            })
            .is_err()
            {
                s.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
        }
    }
}

/// The socket under a connection's reader, with a deadline: each read waits at most until it
/// (`TimedOut` past it); `None` waits without one.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Option<Instant>,
    /// The read timeout last set on the socket (saves a system call per read).
    set: Option<Option<Duration>>,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            None => None,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "request deadline"));
                }
                // Round up to whole milliseconds so that re-arming is rare.
                Some(Duration::from_millis(left.as_millis() as u64 + 1))
            }
        };
        if self.set != Some(timeout) {
            self.stream.set_read_timeout(timeout)?;
            self.set = Some(timeout);
        }
        match (&*self.stream).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "request deadline"))
            }
            r => r,
        }
    }
}

/// The largest frame a connection may send before it proves the cluster secret (the
/// authentication messages are far smaller).
const PRE_AUTH_MAX_PAYLOAD: u64 = 4096;

/// The slowest rate a frame's payload may arrive at before its deadline.
const MIN_RATE: u64 = 1 << 20;

/// Reads one request frame under deadlines: before its first byte, until `idle` (`None`:
/// no limit); then the whole frame within the request timeout plus its length at
/// [`MIN_RATE`]. The payload grows with the bytes that arrive, never to what a header
/// declares up front; a frame over `max` bytes is `InvalidData`.
fn read_request(
    reader: &mut BufReader<DeadlineReader<'_>>,
    payload: &mut Vec<u8>,
    idle: Option<Instant>,
    timeout: Duration,
    max: u64,
) -> io::Result<rpc::FrameHeader> {
    if reader.buffer().is_empty() {
        reader.get_mut().deadline = idle;
        if reader.fill_buf()?.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let start = Instant::now();
    reader.get_mut().deadline = Some(start + timeout);
    let mut h = [0u8; rpc::HEADER_LEN];
    reader.read_exact(&mut h)?;
    let header = rpc::frame::decode_header(&h)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if header.len as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {} bytes over the limit of {max}", header.len),
        ));
    }
    reader.get_mut().deadline =
        Some(start + timeout + Duration::from_secs_f64(header.len as f64 / MIN_RATE as f64));
    payload.clear();
    let n = (&mut *reader)
        .take(header.len as u64)
        .read_to_end(payload)?;
    if n as u64 != header.len as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(header)
}

fn tick_loop(s: Arc<Shared>, interval: Duration) {
    loop {
        {
            let g = s.stop_lock.lock().unwrap_or_else(|p| p.into_inner());
            if s.stopping() {
                return;
            }
            let _ = s.stop_cv.wait_timeout(g, interval);
        }
        if s.stopping() {
            return;
        }
        let now = s.now();
        let mut m = s.lock();
        let report = m.tick(now);
        let lost = report.lost_objects > 0 || !report.dropped_segments.is_empty();
        s.kv_events.reconcile(&m, lost);
        drop(m);
        if !report.expired_clients.is_empty() {
            tracing::info!(
                clients = ?report.expired_clients,
                segments = report.dropped_segments.len(),
                lost_objects = report.lost_objects,
                "expired silent clients"
            );
        }
    }
}

fn serve_conn(stream: TcpStream, id: u64, proven: Arc<AtomicBool>, s: Arc<Shared>) {
    s.connections.fetch_add(1, Ordering::Relaxed);
    let mut session: Option<ClientId> = None;
    let mut auth = ConnAuth {
        proven: s.secret.is_none(),
        nonces: None,
    };
    // With a secret, the connection must prove it by this deadline.
    let auth_deadline = Instant::now() + s.request_timeout;
    let mut reader = BufReader::with_capacity(
        64 << 10,
        DeadlineReader {
            stream: &stream,
            deadline: None,
            set: None,
        },
    );
    let mut payload = Vec::new();
    let mut out = Vec::new();
    let mut writer = &stream;
    loop {
        if reader.buffer().is_empty() {
            // The next request of a client often follows within microseconds (put_end after
            // the transfer of a small value): poll briefly before sleeping in read.
            rpc::spin_for_data(&stream, s.request_spin);
        }
        let (idle, max) = if auth.proven {
            (None, rpc::MAX_PAYLOAD as u64)
        } else {
            (Some(auth_deadline), PRE_AUTH_MAX_PAYLOAD)
        };
        let header = match read_request(&mut reader, &mut payload, idle, s.request_timeout, max) {
            Ok(h) => h,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::TimedOut
                ) {
                    tracing::debug!("closing an RPC connection: {e}");
                }
                break;
            }
        };
        if header.kind != FrameKind::Request {
            break;
        }
        let resp = match rpc::frame::decode_payload::<Request>(&payload) {
            Ok(req @ (Request::Auth { .. } | Request::Prove { .. })) => {
                let r = auth.step(s.secret.as_ref(), req);
                let refused = matches!(r, Response::Error(_));
                proven.store(auth.proven, Ordering::Release);
                if refused {
                    let _ = rpc::write_frame(
                        &mut writer,
                        &mut out,
                        FrameKind::Response,
                        header.request_id,
                        &r,
                    );
                    tracing::warn!(
                        "closing an RPC connection that failed to prove the cluster secret"
                    );
                    break;
                }
                r
            }
            Ok(_) if !auth.proven => Response::Error(StoreError::new(
                StoreErrorCode::IllegalClient,
                "this master requires the cluster secret: prove it first (set MC_CLUSTER_SECRET_FILE)",
            )),
            Ok(req) => handle(&s, req, id, &mut session),
            Err(e) => Response::Error(StoreError::new(
                StoreErrorCode::InvalidParams,
                format!("malformed request: {e}"),
            )),
        };
        let mut sent = rpc::write_frame(
            &mut writer,
            &mut out,
            FrameKind::Response,
            header.request_id,
            &resp,
        );
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::InvalidData) {
            // The reply does not fit in a frame: say so instead of dropping the connection.
            let e = Response::Error(StoreError::new(
                StoreErrorCode::InvalidParams,
                "the reply exceeds the RPC frame limit; use smaller batches",
            ));
            sent = rpc::write_frame(
                &mut writer,
                &mut out,
                FrameKind::Response,
                header.request_id,
                &e,
            );
        }
        if sent.is_err() {
            break;
        }
        if out.capacity() > (4 << 20) {
            out = Vec::new();
        }
        if payload.capacity() > (4 << 20) {
            payload = Vec::new();
        }
    }
    s.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if let Some(c) = session {
        let mine = {
            let mut m = s.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if m.get(&c) == Some(&id) {
                m.remove(&c);
                true
            } else {
                false
            }
        };
        if mine && !s.stopping() {
            let now = s.now();
            let revoked = s.lock().client_disconnected(c, now);
            tracing::info!(client = c.0, revoked, "client session closed");
        }
    }
    s.connections.fetch_sub(1, Ordering::Relaxed);
}

fn bind_session(s: &Shared, client: ClientId, conn: u64, session: &mut Option<ClientId>) {
    if *session != Some(client) {
        *session = Some(client);
        s.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client, conn);
    }
}

fn keys_of(req: &Request) -> usize {
    match req {
        Request::BatchPutStart { items, .. } => items.len(),
        Request::BatchPutFinish { end, revoke, .. } => end.len() + revoke.len(),
        Request::BatchGetReplicas { keys, .. }
        | Request::BatchExists { keys, .. }
        | Request::BatchQuery { keys, .. }
        | Request::BatchRemove { keys, .. } => keys.len(),
        _ => 1,
    }
}

/// Serves one request: one acquisition of the master's lock.
pub(crate) fn handle(
    s: &Shared,
    req: Request,
    conn: u64,
    session: &mut Option<ClientId>,
) -> Response {
    let started = Instant::now();
    let name = req.name();
    let nkeys = keys_of(&req);
    let resp = handle_inner(s, req, conn, session);
    if let Some(i) = Request::NAMES.iter().position(|n| *n == name) {
        let c = &s.counters[i];
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.keys.fetch_add(nkeys as u64, Ordering::Relaxed);
        c.micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if matches!(resp, Response::Error(_)) {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    resp
}

fn handle_inner(s: &Shared, req: Request, conn: u64, session: &mut Option<ClientId>) -> Response {
    let now = s.now();
    match req {
        Request::Ping => Response::Pong,
        // Answered by the connection's `ConnAuth` before `handle` is reached.
        Request::Auth { .. } | Request::Prove { .. } => Response::Error(StoreError::new(
            StoreErrorCode::InvalidParams,
            "authentication messages are answered per connection",
        )),
        Request::RegisterClient { host, name } => {
            let mut m = s.lock();
            let client = m.register_client(&host, now);
            let cfg = m.config();
            let info = SessionInfo {
                client,
                lease_ttl_ms: cfg.default_kv_lease_ttl_ms,
                client_live_ttl_ms: cfg.client_live_ttl_ms,
                master_epoch: s.epoch,
            };
            drop(m);
            tracing::info!(client = client.0, host, name, "client registered");
            bind_session(s, client, conn, session);
            Response::Registered(info)
        }
        Request::Heartbeat { client } => {
            let mut m = s.lock();
            let status = match m.heartbeat(client, now) {
                Ok(r) => r.status,
                Err(e) => return Response::Error(e),
            };
            let mut journal = Vec::new();
            if status == ClientStatus::Ok {
                for seg in m.client_segments(client) {
                    if let Ok(d) = m.drain_journal(seg) {
                        journal.push((seg, d));
                    }
                }
            }
            drop(m);
            if status == ClientStatus::Ok {
                bind_session(s, client, conn, session);
            }
            Response::Heartbeat { status, journal }
        }
        Request::MountSegment { client, mount } => {
            match s.lock().mount_segment(client, mount, now) {
                Ok(id) => Response::Mounted(id),
                Err(e) => Response::Error(e),
            }
        }
        Request::UnmountSegment { client, segment } => {
            let mut m = s.lock();
            let r = m.unmount_segment(client, segment, now);
            s.kv_events.reconcile(&m, true);
            match r {
                Ok(()) => Response::Done,
                Err(e) => Response::Error(e),
            }
        }
        Request::BatchPutStart {
            client,
            tenant,
            items,
            config,
            upsert,
        } => {
            let mut m = s.lock();
            let mut out = Vec::with_capacity(items.len());
            let mut grouped = None;
            for it in items {
                let cfg = match it.group {
                    Some(g) => {
                        let c = grouped.get_or_insert_with(|| config.clone());
                        c.group_id = Some(g);
                        &*c
                    }
                    None => &config,
                };
                out.push(if upsert {
                    m.upsert_start(client, &tenant, &it.key, it.size, cfg, now)
                } else {
                    m.put_start(client, &tenant, &it.key, it.size, cfg, now)
                });
            }
            // A put may have evicted objects to make room.
            s.kv_events.reconcile(&m, false);
            Response::PutStarted(out)
        }
        Request::BatchPutFinish {
            client,
            tenant,
            end,
            revoke,
            failed_segments,
        } => {
            let mut m = s.lock();
            for seg in &failed_segments {
                let _ = m.report_failure(seg, now);
            }
            let end: Vec<_> = end
                .iter()
                .map(|k| (k, m.put_end(client, &tenant, k, now)))
                .collect();
            let revoke = revoke
                .iter()
                .map(|k| m.put_revoke(client, &tenant, k, now))
                .collect();
            let stored = end
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(k, _)| (*k).clone())
                .collect();
            s.kv_events
                .record(events::KvEventKind::Stored, &tenant, stored);
            drop(m);
            let end = end.into_iter().map(|(_, r)| r).collect();
            Response::PutFinished { end, revoke }
        }
        Request::BatchGetReplicas { tenant, keys } => {
            let mut m = s.lock();
            Response::Replicas(
                keys.iter()
                    .map(|k| m.get_replicas(&tenant, k, now))
                    .collect(),
            )
        }
        Request::BatchExists { tenant, keys } => {
            let m = s.lock();
            Response::Exists(keys.iter().map(|k| m.exists(&tenant, k)).collect())
        }
        Request::BatchQuery { tenant, keys } => {
            let m = s.lock();
            Response::Query(keys.iter().map(|k| m.query_key(&tenant, k)).collect())
        }
        Request::BatchRemove {
            tenant,
            keys,
            force,
        } => {
            let mut m = s.lock();
            let out: Vec<_> = keys
                .iter()
                .map(|k| m.remove(&tenant, k, force, now))
                .collect();
            let removed = keys
                .iter()
                .zip(&out)
                .filter(|(_, r)| r.is_ok())
                .map(|(k, _)| k.clone())
                .collect();
            s.kv_events
                .record(events::KvEventKind::Removed, &tenant, removed);
            Response::Removed(out)
        }
        Request::RemoveAll { tenant, force } => {
            let mut m = s.lock();
            let n = m.remove_all(&tenant, force, now);
            s.kv_events.reconcile(&m, true);
            Response::RemovedAll(n)
        }
        Request::ReportFailure { segments } => {
            let mut m = s.lock();
            for seg in &segments {
                let _ = m.report_failure(seg, now);
            }
            Response::Done
        }
        Request::Segments => Response::Segments(s.lock().segments(now)),
        Request::Stats => Response::Stats(s.lock().stats()),
    }
}
