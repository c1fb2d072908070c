//! The HTTP metadata server (`mooncake metadata-server`): Mooncake's API plus the
//! mooncake-rs extensions for watch and liveness, hardened for hostile networks.
//!
//! # API
//! | request | answer |
//! |---|---|
//! | `GET /metadata?key=K` | 200 + value, or 404 (Mooncake) |
//! | `PUT /metadata?key=K[&lease=L]` + body | 200 (Mooncake; `lease` is an extension) |
//! | `DELETE /metadata?key=K` | 200, also when absent (Mooncake) |
//! | `GET /metadata/watch?prefix=P[&after=R][&timeout_ms=T]` | long poll, see below |
//! | `POST /metadata/lease?ttl_ms=T` | 200 + lease id (decimal) |
//! | `POST /metadata/lease/keepalive?id=L` | 200, or 404 once the lease expired |
//! | `DELETE /metadata/lease?id=L` | 200: revokes the lease and deletes its keys |
//!
//! **Watch** is a long poll. Without `after` the server answers at once with an empty body and
//! the current revision in `x-mooncake-revision`. With `after=R` it answers as soon as a change
//! under `P` with a revision above `R` exists (or after `timeout_ms`, at most 60 s, with an
//! empty body), the body holding the changes in order ([`super::wire::encode_events`], at
//! most [`HttpServerConfig::max_watch_reply`] bytes unless one change alone is larger) and the
//! header the revision to poll after next. The server keeps the last 65 536 changes (and at
//! most [`HttpServerConfig::max_log_bytes`] of them); a poll for an older revision gets 410
//! Gone, and so does a poll for a revision it never issued (the server restarted since): the
//! client's watch then ends and its owner re-reads.
//!
//! **Liveness**: a key `PUT` with `lease=L` is deleted (and watchers see a delete) when lease
//! `L` is not kept alive for its TTL — the HTTP equivalent of an etcd lease. Keys put without
//! a lease (by Mooncake's own clients) live until deleted, as in the reference.
//!
//! # Security
//! - **Token**: with [`HttpServerConfig::with_token`] every request, reads included (segment
//!   descriptors are sensitive), must carry `Authorization: Bearer <token>`; others get 401
//!   before their body is read and before anything changes. Tokens are compared in constant
//!   time. `mooncake metadata-server` derives the token from the cluster secret
//!   (`ClusterSecret::token("metadata")`), so engines that share the secret need nothing else.
//! - **Bounded**: connections ([`max_connections`](HttpServerConfig::max_connections): at the
//!   cap the longest-idle connection is closed, and when none is idle a new one gets 503),
//!   request heads (431) and bodies (413), request bodies buffered at once (503), keys and
//!   stored bytes (507), leases (503) and their TTL (400), the watch log (entries and bytes)
//!   and watch replies.
//! - **Deadlines**: a request's head and body must arrive whole within
//!   [`request_timeout`](HttpServerConfig::request_timeout) of its first byte (a client
//!   trickling a byte at a time is cut off, 408), an idle keep-alive connection is closed
//!   after [`idle_timeout`](HttpServerConfig::idle_timeout), and a reply must be taken within
//!   [`write_timeout`](HttpServerConfig::write_timeout).
//! - **No panic on any input**: every length and time a client sends is checked arithmetic.
//!
//! Connections are tasks on a few threads ([`workers`](HttpServerConfig::workers)) driven by
//! async-io, so thousands of slow connections cost sockets and small buffers, not threads;
//! no async runtime is needed by the caller.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use event_listener::Event;
use mooncake_core::{Error, Result};
use subtle::ConstantTimeEq;

use super::wire::{self, HeadReader, HeadStatus, HttpLimits, RequestHead};
use crate::serve::{self, Admit, Budget, ConnGuard, Conns, Runtime};

/// How many changes the server keeps for watchers.
const LOG_CAPACITY: usize = 65_536;
/// Longest long poll a client may ask for.
const MAX_POLL: Duration = Duration::from_secs(60);
/// What a connection refused at the cap is told.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 38\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections to this server\r\n\r\n";

/// Configuration of [`HttpMetadataServer`].
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpServerConfig {
    /// Largest accepted request body (default 64 MiB); larger ones get 413.
    pub max_body: usize,
    /// Largest request head (default 16 KiB); larger ones get 431.
    pub max_head: usize,
    /// Most open connections (default 4096). At the cap the longest-idle one is closed; when
    /// every one is in a request, a new one gets 503.
    pub max_connections: usize,
    /// Most request-body bytes buffered at once over all connections (default 256 MiB);
    /// a request that would exceed it gets 503.
    pub max_inflight_body: usize,
    /// Most keys stored (default 1,048,576); a put of a new key beyond it gets 507.
    pub max_keys: usize,
    /// Most bytes stored, keys and values (default 1 GiB); a put beyond it gets 507.
    pub max_bytes: usize,
    /// Most live leases (default 65,536); a grant beyond it gets 503.
    pub max_leases: usize,
    /// Longest lease TTL (default 1 day); a longer `ttl_ms` gets 400.
    pub max_lease_ttl: Duration,
    /// Most bytes of changes kept for watchers (default 256 MiB; also at most 65,536 changes).
    pub max_log_bytes: usize,
    /// Largest watch reply (default 16 MiB; one change larger than it is sent alone).
    pub max_watch_reply: usize,
    /// Deadline for a whole request (head and body) from its first byte (default 30 s).
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection may wait for its next request (default 60 s).
    pub idle_timeout: Duration,
    /// Deadline for writing a reply (default 30 s).
    pub write_timeout: Duration,
    /// Threads serving connections (default 2).
    pub workers: usize,
    /// How often expired leases are reaped (default 100 ms).
    pub reap_interval: Duration,
    token: Option<String>,
}

impl std::fmt::Debug for HttpServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServerConfig")
            .field("max_body", &self.max_body)
            .field("max_head", &self.max_head)
            .field("max_connections", &self.max_connections)
            .field("max_inflight_body", &self.max_inflight_body)
            .field("max_keys", &self.max_keys)
            .field("max_bytes", &self.max_bytes)
            .field("max_leases", &self.max_leases)
            .field("max_lease_ttl", &self.max_lease_ttl)
            .field("max_log_bytes", &self.max_log_bytes)
            .field("max_watch_reply", &self.max_watch_reply)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("workers", &self.workers)
            .field("reap_interval", &self.reap_interval)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            max_body: wire::DEFAULT_MAX_BODY,
            max_head: 16 * 1024,
            max_connections: 4096,
            max_inflight_body: 256 << 20,
            max_keys: 1 << 20,
            max_bytes: 1 << 30,
            max_leases: 65_536,
            max_lease_ttl: Duration::from_secs(86_400),
            max_log_bytes: 256 << 20,
            max_watch_reply: 16 << 20,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            workers: 2,
            reap_interval: Duration::from_millis(100),
            token: None,
        }
    }
}

impl HttpServerConfig {
    /// The defaults, with the token the environment configures
    /// ([`crate::auth::metadata_token_from_env`]: `MC_METADATA_TOKEN`, else one derived from
    /// the cluster secret, else none).
    pub fn from_env() -> Result<Self> {
        Ok(Self::default().with_token(crate::auth::metadata_token_from_env()?))
    }

    /// Sets the body limit.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Requires `Authorization: Bearer <token>` on every request (`None`: no token).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Whether a token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Sets the connection cap.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the whole-request deadline.
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    /// Sets the keep-alive idle deadline.
    pub fn with_idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets the key and byte caps of the store.
    pub fn with_store_limits(mut self, max_keys: usize, max_bytes: usize) -> Self {
        self.max_keys = max_keys;
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the lease cap.
    pub fn with_max_leases(mut self, n: usize) -> Self {
        self.max_leases = n;
        self
    }
}

/// Counters of a running server (for operators and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpServerStats {
    /// Keys stored.
    pub keys: usize,
    /// Bytes stored (keys and values).
    pub bytes: usize,
    /// Live leases.
    pub leases: usize,
    /// The revision of the last change.
    pub revision: u64,
    /// Changes kept for watchers.
    pub log_entries: usize,
    /// Open connections.
    pub connections: usize,
}

type Value = Arc<Vec<u8>>;

struct Entry {
    value: Value,
    lease: Option<u64>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

struct LogEvent {
    revision: u64,
    key: String,
    value: Option<Value>,
}

impl LogEvent {
    fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, |v| v.len()) + 32
    }
}

#[derive(Default)]
struct State {
    map: HashMap<String, Entry>,
    bytes: usize,
    log: VecDeque<LogEvent>,
    log_bytes: usize,
    revision: u64,
    evicted_upto: u64,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
}

impl State {
    fn record(&mut self, key: &str, value: Option<Value>, max_log_bytes: usize) {
        self.revision += 1;
        let ev = LogEvent {
            revision: self.revision,
            key: key.to_string(),
            value,
        };
        self.log_bytes += ev.size();
        self.log.push_back(ev);
        while self.log.len() > LOG_CAPACITY
            || (self.log_bytes > max_log_bytes && self.log.len() > 1)
        {
            let Some(old) = self.log.pop_front() else {
                break;
            };
            self.log_bytes -= old.size();
            self.evicted_upto = old.revision;
        }
    }

    fn put(
        &mut self,
        key: &str,
        value: Value,
        lease: Option<u64>,
        cfg: &HttpServerConfig,
    ) -> std::result::Result<(), Reply> {
        let old = self.map.get(key);
        let old_size = old.map_or(0, |e| key.len() + e.value.len());
        if old.is_none() && self.map.len() >= cfg.max_keys {
            return Err(text(
                507,
                format!("the server holds its maximum of {} keys", cfg.max_keys),
            ));
        }
        let total = (self.bytes - old_size).saturating_add(key.len() + value.len());
        if total > cfg.max_bytes {
            return Err(text(
                507,
                format!(
                    "the server holds its maximum of {} bytes of metadata",
                    cfg.max_bytes
                ),
            ));
        }
        let old_lease = old.and_then(|e| e.lease).filter(|&old| Some(old) != lease);
        if let Some(l) = old_lease.and_then(|old| self.leases.get_mut(&old)) {
            l.keys.remove(key);
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.to_string());
        }
        self.bytes = total;
        self.map.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                lease,
            },
        );
        self.record(key, Some(value), cfg.max_log_bytes);
        Ok(())
    }

    fn delete(&mut self, key: &str, max_log_bytes: usize) -> bool {
        match self.map.remove(key) {
            Some(e) => {
                self.bytes -= key.len() + e.value.len();
                if let Some(l) = e.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(key);
                }
                self.record(key, None, max_log_bytes);
                true
            }
            None => false,
        }
    }

    fn drop_lease(&mut self, id: u64, max_log_bytes: usize) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let mut keys: Vec<_> = lease.keys.into_iter().collect();
        keys.sort();
        for k in keys {
            if self.map.get(&k).is_some_and(|e| e.lease == Some(id)) {
                self.delete(&k, max_log_bytes);
            }
        }
        true
    }

    fn new_lease_id(&mut self) -> u64 {
        loop {
            let id = self.next_lease;
            self.next_lease = self.next_lease.wrapping_add(1);
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Event,
    shutdown: AtomicBool,
    cfg: HttpServerConfig,
    limits: HttpLimits,
    token: Option<Vec<u8>>,
    conns: Arc<Conns>,
    inflight: Budget,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changed.notify(usize::MAX);
    }

    /// Whether `head` carries the token (constant-time), or no token is required.
    fn authorized(&self, head: &RequestHead) -> bool {
        match &self.token {
            None => true,
            Some(want) => head
                .bearer_token()
                .is_some_and(|got| bool::from(got.as_bytes().ct_eq(want))),
        }
    }
}

/// A running HTTP metadata server. It stops when [`shutdown`](Self::shutdown) is called or
/// the value is dropped.
pub struct HttpMetadataServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Runtime,
}

impl std::fmt::Debug for HttpMetadataServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetadataServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpMetadataServer {
    /// Binds `addr` (e.g. `127.0.0.1:8080`, or `127.0.0.1:0` for a free port) and starts
    /// serving.
    ///
    /// A token shorter than 16 characters, or with whitespace or control characters, is a
    /// [`mooncake_core::ErrorKind::Config`] error.
    pub fn bind(addr: impl ToSocketAddrs, config: HttpServerConfig) -> Result<Self> {
        if let Some(t) = &config.token {
            crate::auth::check_token(t)?;
        }
        let listener = serve::bind(addr, "the HTTP metadata server")?;
        let addr = listener
            .get_ref()
            .local_addr()
            .map_err(|e| Error::io("local_addr", &e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_lease: 1,
                ..Default::default()
            }),
            changed: Event::new(),
            shutdown: AtomicBool::new(false),
            limits: HttpLimits {
                max_body: config.max_body.min(u32::MAX as usize),
                max_head: config.max_head.max(256),
            },
            token: config.token.as_ref().map(|t| t.as_bytes().to_vec()),
            conns: Conns::new(config.max_connections),
            inflight: Budget::new(config.max_inflight_body.max(config.max_body)),
            cfg: config,
        });
        let rt = Runtime::start("mooncake-http", shared.cfg.workers)?;
        let spawner = rt.spawner();
        let s = shared.clone();
        rt.spawn(serve::accept_loop(
            listener,
            "HTTP metadata server",
            move |stream| {
                let stream = Arc::new(stream);
                match s.conns.admit(stream.clone()) {
                    Admit::Yes(guard) => spawner.spawn(serve_connection(s.clone(), stream, guard)),
                    Admit::Full => {
                        tracing::debug!("connection cap reached and none idle: 503");
                        let mut w: &TcpStream = stream.get_ref();
                        let _ = w.write(BUSY);
                        let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
                    }
                }
            },
        ));
        rt.spawn(reap_loop(shared.clone()));
        tracing::info!(%addr, token = shared.token.is_some(), "HTTP metadata server listening");
        Ok(Self { addr, shared, rt })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metadata URL clients use: `http://<addr>/metadata`.
    pub fn url(&self) -> String {
        format!("http://{}/metadata", self.addr)
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.shared.lock().map.len()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters: keys, bytes, leases, revision, connections.
    pub fn stats(&self) -> HttpServerStats {
        let st = self.shared.lock();
        HttpServerStats {
            keys: st.map.len(),
            bytes: st.bytes,
            leases: st.leases.len(),
            revision: st.revision,
            log_entries: st.log.len(),
            connections: self.shared.conns.len(),
        }
    }

    /// Blocks the calling thread until the server is shut down (from another thread).
    pub fn wait(mut self) {
        self.rt.join();
    }

    /// Stops accepting, closes every connection and joins the server threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed();
        self.rt.stop();
        self.shared.conns.close_all();
    }
}

impl Drop for HttpMetadataServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn reap_loop(shared: Arc<Shared>) {
    loop {
        Timer::after(shared.cfg.reap_interval).await;
        let now = Instant::now();
        let mut st = shared.lock();
        let expired: Vec<u64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            continue;
        }
        for id in expired {
            tracing::info!(lease = id, "lease expired; deleting its keys");
            st.drop_lease(id, shared.cfg.max_log_bytes);
        }
        drop(st);
        shared.changed();
    }
}

/// A reply body: owned bytes or shared values, written without copying the values.
enum Piece {
    Own(Vec<u8>),
    Shared(Value),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Own(v) => v,
            Self::Shared(v) => v,
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<Piece>,
    /// Close the connection after this reply.
    close: bool,
}

fn text(status: u16, msg: impl Into<String>) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type", "text/plain".into())],
        body: vec![Piece::Own(msg.into().into_bytes())],
        close: false,
    }
}

/// Writes `reply` before the write deadline.
async fn send(
    shared: &Shared,
    stream: &Async<TcpStream>,
    reply: &Reply,
    keep_alive: bool,
) -> std::io::Result<()> {
    let len: usize = reply.body.iter().map(|p| p.bytes().len()).sum();
    let mut head = wire::encode_response_head(reply.status, &reply.headers, len, keep_alive);
    let deadline = serve::deadline_after(shared.cfg.write_timeout);
    // Small replies go out in one segment.
    if len <= 64 * 1024 {
        for p in &reply.body {
            head.extend_from_slice(p.bytes());
        }
        return serve::write_parts(stream, &[&head], deadline).await;
    }
    let mut parts: Vec<&[u8]> = vec![&head];
    parts.extend(reply.body.iter().map(Piece::bytes));
    serve::write_parts(stream, &parts, deadline).await
}

/// Sends an error reply and closes the connection (reading a little of what the client still
/// sends, so the reply is not lost to a reset).
async fn refuse(shared: &Shared, stream: &Async<TcpStream>, reply: Reply) {
    if send(shared, stream, &reply, false).await.is_ok() {
        serve::linger_close(stream, 256 * 1024, Duration::from_secs(1)).await;
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: Arc<Async<TcpStream>>, guard: ConnGuard) {
    let peer = stream
        .get_ref()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(e) = serve_requests(&shared, &stream, &guard).await {
        tracing::debug!(%peer, "HTTP connection ended: {e}");
    }
}

async fn serve_requests(
    shared: &Shared,
    stream: &Async<TcpStream>,
    guard: &ConnGuard,
) -> std::io::Result<()> {
    let cfg = &shared.cfg;
    let limits = shared.limits;
    // The body limit is checked after the credentials (an unauthenticated client learns
    // nothing but 401), so the head parser takes any length.
    let parse_limits = HttpLimits {
        max_body: usize::MAX,
        ..limits
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut reader = HeadReader::new();
    loop {
        // Wait for the first byte of a request: the connection is idle (evictable) meanwhile.
        if buf.is_empty() {
            guard.set_idle(true);
            let n = serve::read_some(
                stream,
                &mut buf,
                4096,
                serve::deadline_after(cfg.idle_timeout),
            )
            .await?;
            if n == 0 || shared.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            guard.set_idle(false);
        }
        // The whole request must arrive within the deadline, however it trickles.
        let deadline = serve::deadline_after(cfg.request_timeout);
        let (head, head_len) = loop {
            match reader.poll(&mut buf, &parse_limits) {
                Ok(HeadStatus::Complete { head, len }) => break (head, len),
                Ok(HeadStatus::Incomplete) => {
                    let want = limits.max_head.saturating_sub(buf.len()).clamp(1, 4096);
                    if !read_before(shared, stream, &mut buf, want, deadline, "head").await? {
                        return Ok(());
                    }
                }
                Err(e) => {
                    refuse(shared, stream, text(e.status(), e.to_string())).await;
                    return Ok(());
                }
            }
        };
        // Nothing else happens (not even 100 Continue or reading the body) before the
        // credentials check.
        if !shared.authorized(&head) {
            tracing::debug!(path = %head.path, "refused a request without the right token");
            let mut r = text(
                401,
                "missing or wrong bearer token (Authorization: Bearer …)",
            );
            r.headers.push((
                "WWW-Authenticate",
                "Bearer realm=\"mooncake-metadata\"".into(),
            ));
            refuse(shared, stream, r).await;
            return Ok(());
        }
        if head.content_length > limits.max_body {
            let e = wire::RequestError::BodyTooLarge {
                declared: head.content_length as u64,
                limit: limits.max_body,
            };
            refuse(shared, stream, text(e.status(), e.to_string())).await;
            return Ok(());
        }
        let total = head_len + head.content_length;
        let _reserved = if head.content_length > 0 {
            match shared.inflight.reserve(head.content_length) {
                Some(r) => Some(r),
                None => {
                    let mut r = text(503, "too many request bodies in flight; retry");
                    r.headers.push(("Retry-After", "1".into()));
                    refuse(shared, stream, r).await;
                    return Ok(());
                }
            }
        } else {
            None
        };
        if head.expect_continue && buf.len() < total {
            serve::write_parts(
                stream,
                &[b"HTTP/1.1 100 Continue\r\n\r\n"],
                serve::deadline_after(cfg.write_timeout),
            )
            .await?;
        }
        while buf.len() < total {
            let want = (total - buf.len()).min(1 << 20);
            if !read_before(shared, stream, &mut buf, want, deadline, "body").await? {
                return Ok(());
            }
        }
        // Split off the next request's bytes; what remains is head + body.
        let rest = buf.split_off(total);
        let mut body = std::mem::replace(&mut buf, rest);
        body.drain(..head_len);
        reader.reset();
        let reply = handle(shared, &head, body).await;
        drop(_reserved);
        let keep = head.keep_alive && !reply.close && !shared.shutdown.load(Ordering::SeqCst);
        send(shared, stream, &reply, keep).await?;
        if !keep {
            return Ok(());
        }
        if buf.capacity() > 64 * 1024 && buf.len() < 4096 {
            buf.shrink_to(4096);
        }
    }
}

/// Reads up to `want` more bytes of the request's `part` ("head" or "body") into `buf`
/// before `deadline`: false if the client closed the connection; past the deadline, answers
/// 408 and fails with `TimedOut`.
async fn read_before(
    shared: &Shared,
    stream: &Async<TcpStream>,
    buf: &mut Vec<u8>,
    want: usize,
    deadline: std::time::Instant,
    part: &str,
) -> std::io::Result<bool> {
    match serve::read_some(stream, buf, want, deadline).await {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            let msg = format!("request {part} not received in time");
            refuse(shared, stream, text(408, msg)).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn parse_id(head: &RequestHead, name: &str) -> std::result::Result<u64, Reply> {
    head.query(name)
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or_else(|| text(400, format!("missing or bad {name}")))
}

async fn handle(shared: &Shared, head: &RequestHead, body: Vec<u8>) -> Reply {
    let cfg = &shared.cfg;
    match (head.path.as_str(), head.method.as_str()) {
        ("/metadata", m) => {
            let Some(key) = head.query("key") else {
                return text(400, "missing key parameter");
            };
            match m {
                "GET" => match shared.lock().map.get(key) {
                    Some(e) => Reply {
                        status: 200,
                        headers: vec![("Content-Type", "application/json".into())],
                        body: vec![Piece::Shared(e.value.clone())],
                        close: false,
                    },
                    None => text(404, "metadata not found"),
                },
                "PUT" | "POST" => {
                    let lease = match head.query("lease").map(str::parse::<u64>) {
                        None => None,
                        Some(Ok(l)) => Some(l),
                        Some(Err(_)) => return text(400, "bad lease id"),
                    };
                    let mut st = shared.lock();
                    if let Some(l) = lease.filter(|l| !st.leases.contains_key(l)) {
                        return text(404, format!("lease {l} not found"));
                    }
                    if let Err(r) = st.put(key, Arc::new(body), lease, cfg) {
                        return r;
                    }
                    drop(st);
                    shared.changed();
                    text(200, "metadata updated")
                }
                "DELETE" => {
                    if shared.lock().delete(key, cfg.max_log_bytes) {
                        shared.changed();
                    }
                    text(200, "metadata deleted")
                }
                _ => text(405, "method not allowed"),
            }
        }
        ("/metadata/watch", "GET") => watch(shared, head).await,
        ("/metadata/lease", "POST") => {
            let Some(ttl_ms) = head
                .query("ttl_ms")
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|&t| t > 0)
            else {
                return text(400, "missing or bad ttl_ms");
            };
            let ttl = Duration::from_millis(ttl_ms);
            if ttl > cfg.max_lease_ttl {
                return text(
                    400,
                    format!(
                        "ttl_ms {ttl_ms} exceeds the longest lease ({} ms)",
                        cfg.max_lease_ttl.as_millis()
                    ),
                );
            }
            let mut st = shared.lock();
            if st.leases.len() >= cfg.max_leases {
                let mut r = text(
                    503,
                    format!("the server holds its maximum of {} leases", cfg.max_leases),
                );
                r.headers.push(("Retry-After", "1".into()));
                return r;
            }
            let id = st.new_lease_id();
            st.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: serve::deadline_after(ttl),
                    keys: HashSet::new(),
                },
            );
            text(200, id.to_string())
        }
        ("/metadata/lease", "DELETE") => {
            let id = match parse_id(head, "id") {
                Ok(id) => id,
                Err(r) => return r,
            };
            if shared.lock().drop_lease(id, cfg.max_log_bytes) {
                shared.changed();
            }
            text(200, "lease revoked")
        }
        ("/metadata/lease/keepalive", "POST") => {
            let id = match parse_id(head, "id") {
                Ok(id) => id,
                Err(r) => return r,
            };
            match shared.lock().leases.get_mut(&id) {
                Some(l) => {
                    l.deadline = serve::deadline_after(l.ttl);
                    text(200, "ok")
                }
                None => text(404, format!("lease {id} not found")),
            }
        }
        ("/metadata/watch" | "/metadata/lease" | "/metadata/lease/keepalive", _) => {
            text(405, "method not allowed")
        }
        _ => text(404, "no such endpoint"),
    }
}

/// Appends `e` to a watch reply (the layout of [`wire::encode_events`]), sharing its value.
fn push_event(body: &mut Vec<Piece>, e: &LogEvent) {
    let mut h = Vec::with_capacity(17 + e.key.len());
    h.extend_from_slice(&e.revision.to_le_bytes());
    h.push(if e.value.is_some() { 1 } else { 2 });
    h.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
    h.extend_from_slice(e.key.as_bytes());
    if let Some(v) = &e.value {
        h.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    match (body.last_mut(), &e.value) {
        (Some(Piece::Own(last)), _) if last.len() < 64 * 1024 => last.extend_from_slice(&h),
        _ => body.push(Piece::Own(h)),
    }
    if let Some(v) = &e.value {
        if v.len() <= 4096 {
            match body.last_mut() {
                Some(Piece::Own(last)) => last.extend_from_slice(v),
                _ => body.push(Piece::Own(v.to_vec())),
            }
        } else {
            body.push(Piece::Shared(v.clone()));
        }
    }
}

async fn watch(shared: &Shared, head: &RequestHead) -> Reply {
    let prefix = head.query("prefix").unwrap_or_default();
    let timeout = head
        .query("timeout_ms")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
        .min(MAX_POLL);
    let Some(after) = head.query("after") else {
        let rev = shared.lock().revision;
        return Reply {
            status: 200,
            headers: vec![("x-mooncake-revision", rev.to_string())],
            body: Vec::new(),
            close: false,
        };
    };
    let Ok(after) = after.parse::<u64>() else {
        return text(400, "bad after");
    };
    let deadline = serve::deadline_after(timeout);
    // Changes up to `scanned` are known not to match: later wake-ups look only past it.
    let mut scanned = after;
    loop {
        let listener = {
            let st = shared.lock();
            if after < st.evicted_upto {
                return text(410, format!("revision {after} is no longer retained"));
            }
            if after > st.revision {
                // A revision this server never issued: the client watched a previous instance
                // (the server restarted). It must re-read what it watches.
                return text(
                    410,
                    format!(
                        "revision {after} is ahead of this server ({}): it restarted",
                        st.revision
                    ),
                );
            }
            let first = st.log.front().map_or(st.revision + 1, |e| e.revision);
            let start = scanned.saturating_add(1).saturating_sub(first);
            let start = usize::try_from(start)
                .unwrap_or(usize::MAX)
                .min(st.log.len());
            let mut body = Vec::new();
            let mut size = 0usize;
            let mut upto = st.revision;
            let mut any = false;
            for e in st.log.range(start..) {
                if !e.key.starts_with(prefix) {
                    continue;
                }
                if any && size + e.size() > shared.cfg.max_watch_reply {
                    // The reply is full: the client polls again after the last change sent.
                    upto = e.revision - 1;
                    break;
                }
                size += e.size();
                any = true;
                push_event(&mut body, e);
            }
            let now = Instant::now();
            if any || now >= deadline || shared.shutdown.load(Ordering::SeqCst) {
                return Reply {
                    status: 200,
                    headers: vec![("x-mooncake-revision", upto.to_string())],
                    body,
                    close: false,
                };
            }
            scanned = st.revision;
            // Registered before the lock is released: no change is missed.
            shared.changed.listen()
        };
        serve::until(deadline, listener).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::wire::WireEvent;

    #[test]
    fn shared_watch_bodies_match_the_wire_encoding() {
        let evs = [
            LogEvent {
                revision: 3,
                key: "a".into(),
                value: Some(Arc::new(vec![7; 5000])),
            },
            LogEvent {
                revision: 4,
                key: "b".into(),
                value: None,
            },
            LogEvent {
                revision: 5,
                key: "c".into(),
                value: Some(Arc::new(b"xy".to_vec())),
            },
        ];
        let mut body = Vec::new();
        for e in &evs {
            push_event(&mut body, e);
        }
        let flat: Vec<u8> = body.iter().flat_map(|p| p.bytes().to_vec()).collect();
        let want = wire::encode_events(
            &evs.iter()
                .map(|e| WireEvent {
                    revision: e.revision,
                    key: e.key.clone(),
                    value: e.value.as_ref().map(|v| v.to_vec()),
                })
                .collect::<Vec<_>>(),
        );
        assert_eq!(flat, want);
    }

    #[test]
    fn the_log_is_bounded_in_bytes() {
        let cfg = HttpServerConfig {
            max_log_bytes: 10_000,
            ..Default::default()
        };
        let mut st = State::default();
        for i in 0..100 {
            st.put(&format!("k{}", i % 3), Arc::new(vec![0; 1000]), None, &cfg)
                .unwrap_or_else(|_| panic!());
        }
        assert!(st.log_bytes <= 10_000, "{}", st.log_bytes);
        assert!(st.evicted_upto > 0);
        assert_eq!(st.map.len(), 3);
        assert_eq!(st.bytes, 3 * (2 + 1000));
    }

    #[test]
    fn store_caps_are_enforced() {
        let cfg = HttpServerConfig::default().with_store_limits(2, 100);
        let mut st = State::default();
        assert!(st.put("a", Arc::new(vec![0; 10]), None, &cfg).is_ok());
        assert!(st.put("b", Arc::new(vec![0; 10]), None, &cfg).is_ok());
        assert_eq!(
            st.put("c", Arc::new(vec![0; 1]), None, &cfg)
                .err()
                .unwrap()
                .status,
            507
        );
        // Replacing a key is fine within the byte cap, and not beyond it.
        assert!(st.put("a", Arc::new(vec![0; 80]), None, &cfg).is_ok());
        assert_eq!(
            st.put("b", Arc::new(vec![0; 20]), None, &cfg)
                .err()
                .unwrap()
                .status,
            507
        );
        assert!(st.delete("a", cfg.max_log_bytes));
        assert_eq!(st.bytes, 11);
    }
}
