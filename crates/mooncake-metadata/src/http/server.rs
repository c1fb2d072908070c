//! The HTTP metadata server (`mooncake metadata-server`): Mooncake's API plus the
//! mooncake-rs extensions for watch and liveness.
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
//! under `P` with a revision above `R` exists (or after `timeout_ms`, with an empty body), the
//! body holding every such change in order ([`super::wire::encode_events`]) and the header
//! the revision to poll after next. The server keeps the last 65 536 changes; a poll for an
//! older revision gets 410 Gone, and so does a poll for a revision it never issued (the
//! server restarted since): the client's watch then ends and its owner re-reads.
//!
//! **Liveness**: a key `PUT` with `lease=L` is deleted (and watchers see a delete) when lease
//! `L` is not kept alive for its TTL — the HTTP equivalent of an etcd lease. Keys put without
//! a lease (by Mooncake's own clients) live until deleted, as in the reference.
//!
//! The server is plain threads over `std::net` (one per connection), so it needs no async
//! runtime. Bodies above [`HttpServerConfig::max_body`] are refused with 413 before they are
//! read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{Error, Result};

use super::wire::{self, HeadStatus, HttpLimits, RequestHead, WireEvent};

/// How many changes the server keeps for watchers.
const LOG_CAPACITY: usize = 65_536;
/// Longest long poll a client may ask for.
const MAX_POLL: Duration = Duration::from_secs(60);

/// Configuration of [`HttpMetadataServer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpServerConfig {
    /// Largest accepted request body (default 64 MiB); larger ones get 413.
    pub max_body: usize,
    /// How often expired leases are reaped (default 100 ms).
    pub reap_interval: Duration,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            max_body: wire::DEFAULT_MAX_BODY,
            reap_interval: Duration::from_millis(100),
        }
    }
}

impl HttpServerConfig {
    /// Sets the body limit.
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

struct Entry {
    value: Vec<u8>,
    lease: Option<u64>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

#[derive(Default)]
struct State {
    map: HashMap<String, Entry>,
    log: VecDeque<WireEvent>,
    revision: u64,
    evicted_upto: u64,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
}

impl State {
    fn record(&mut self, key: &str, value: Option<Vec<u8>>) {
        self.revision += 1;
        if self.log.len() == LOG_CAPACITY
            && let Some(old) = self.log.pop_front()
        {
            self.evicted_upto = old.revision;
        }
        self.log.push_back(WireEvent {
            revision: self.revision,
            key: key.to_string(),
            value,
        });
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<u64>) {
        let old = self
            .map
            .get(key)
            .and_then(|e| e.lease)
            .filter(|&old| Some(old) != lease);
        if let Some(l) = old.and_then(|old| self.leases.get_mut(&old)) {
            l.keys.remove(key);
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.to_string());
        }
        self.map.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                lease,
            },
        );
        self.record(key, Some(value));
    }

    fn delete(&mut self, key: &str) -> bool {
        match self.map.remove(key) {
            Some(e) => {
                if let Some(l) = e.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(key);
                }
                self.record(key, None);
                true
            }
            None => false,
        }
    }

    fn drop_lease(&mut self, id: u64) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let mut keys: Vec<_> = lease.keys.into_iter().collect();
        keys.sort();
        for k in keys {
            if self.map.get(&k).is_some_and(|e| e.lease == Some(id)) {
                self.map.remove(&k);
                self.record(&k, None);
            }
        }
        true
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    shutdown: AtomicBool,
    limits: HttpLimits,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running HTTP metadata server. It stops when [`shutdown`](Self::shutdown) is called or
/// the value is dropped.
pub struct HttpMetadataServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for HttpMetadataServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetadataServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpMetadataServer {
    /// Binds `addr` (e.g. `0.0.0.0:8080`, or `127.0.0.1:0` for a free port) and starts serving.
    pub fn bind(addr: impl ToSocketAddrs, config: HttpServerConfig) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io("binding the HTTP metadata server", &e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local_addr", &e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_lease: 1,
                ..Default::default()
            }),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            limits: HttpLimits {
                max_body: config.max_body,
                ..HttpLimits::default()
            },
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("mooncake-http-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io("spawning the accept thread", &e))?;
        let s = shared.clone();
        let interval = config.reap_interval;
        let reaper = std::thread::Builder::new()
            .name("mooncake-http-leases".into())
            .spawn(move || reap_loop(s, interval))
            .map_err(|e| Error::io("spawning the lease thread", &e))?;
        tracing::info!(%addr, "HTTP metadata server listening");
        Ok(Self {
            addr,
            shared,
            threads: vec![accept, reaper],
        })
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

    /// Blocks the calling thread until the server is shut down (from another thread).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting, closes every connection and joins the server threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept thread.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, c) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for HttpMetadataServer {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, c);
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mooncake-http-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = serve_connection(stream, &s) {
                    tracing::debug!(%peer, "HTTP connection ended: {e}");
                }
                s.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot spawn a connection thread: {e}");
        }
    }
}

fn reap_loop(shared: Arc<Shared>, interval: Duration) {
    while !shared.shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(interval);
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
            st.drop_lease(id);
        }
        drop(st);
        shared.changed.notify_all();
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut idle = Instant::now();
    loop {
        let (head, head_len) = match wire::decode_request_head(&buf, &shared.limits) {
            Err(e) => {
                let body = e.to_string();
                stream.write_all(&wire::encode_response(
                    e.status(),
                    &[],
                    body.as_bytes(),
                    false,
                ))?;
                return Ok(());
            }
            Ok(HeadStatus::Complete { head, len }) => (head, len),
            Ok(HeadStatus::Incomplete) => {
                if !read_more(&mut stream, &mut buf, &mut chunk, shared, &mut idle)? {
                    return Ok(());
                }
                continue;
            }
        };
        let total = head_len + head.content_length;
        if head.expect_continue && buf.len() < total {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        while buf.len() < total {
            if !read_more(&mut stream, &mut buf, &mut chunk, shared, &mut idle)? {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf[head_len..total].to_vec();
        buf.drain(..total);
        let (status, headers, reply) = handle(shared, &head, body);
        let keep = head.keep_alive && !shared.shutdown.load(Ordering::SeqCst);
        stream.write_all(&wire::encode_response(status, &headers, &reply, keep))?;
        if !keep {
            return Ok(());
        }
        idle = Instant::now();
    }
}

/// Reads more bytes; false on EOF, shutdown or a 10-minute idle connection.
fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    shared: &Shared,
    idle: &mut Instant,
) -> std::io::Result<bool> {
    loop {
        if shared.shutdown.load(Ordering::SeqCst) || idle.elapsed() > Duration::from_secs(600) {
            return Ok(false);
        }
        match stream.read(chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                *idle = Instant::now();
                return Ok(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

type Reply = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn text(status: u16, msg: impl Into<String>) -> Reply {
    (
        status,
        vec![("Content-Type", "text/plain".into())],
        msg.into().into_bytes(),
    )
}

fn handle(shared: &Shared, head: &RequestHead, body: Vec<u8>) -> Reply {
    match (head.path.as_str(), head.method.as_str()) {
        ("/metadata", m) => {
            let Some(key) = head.query("key") else {
                return text(400, "missing key parameter");
            };
            match m {
                "GET" => match shared.lock().map.get(key) {
                    Some(e) => (
                        200,
                        vec![("Content-Type", "application/json".into())],
                        e.value.clone(),
                    ),
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
                    st.put(key, body, lease);
                    drop(st);
                    shared.changed.notify_all();
                    text(200, "metadata updated")
                }
                "DELETE" => {
                    if shared.lock().delete(key) {
                        shared.changed.notify_all();
                    }
                    text(200, "metadata deleted")
                }
                _ => text(405, "method not allowed"),
            }
        }
        ("/metadata/watch", "GET") => watch(shared, head),
        ("/metadata/lease", "POST") => {
            let Some(ttl) = head
                .query("ttl_ms")
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|&t| t > 0)
            else {
                return text(400, "missing or bad ttl_ms");
            };
            let ttl = Duration::from_millis(ttl);
            let mut st = shared.lock();
            let id = st.next_lease;
            st.next_lease += 1;
            st.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: HashSet::new(),
                },
            );
            text(200, id.to_string())
        }
        ("/metadata/lease", "DELETE") => {
            let Some(id) = head.query("id").and_then(|t| t.parse::<u64>().ok()) else {
                return text(400, "missing or bad id");
            };
            if shared.lock().drop_lease(id) {
                shared.changed.notify_all();
            }
            text(200, "lease revoked")
        }
        ("/metadata/lease/keepalive", "POST") => {
            let Some(id) = head.query("id").and_then(|t| t.parse::<u64>().ok()) else {
                return text(400, "missing or bad id");
            };
            match shared.lock().leases.get_mut(&id) {
                Some(l) => {
                    l.deadline = Instant::now() + l.ttl;
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

fn watch(shared: &Shared, head: &RequestHead) -> Reply {
    let prefix = head.query("prefix").unwrap_or_default();
    let timeout = head
        .query("timeout_ms")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
        .min(MAX_POLL);
    let mut st = shared.lock();
    let Some(after) = head.query("after") else {
        return (
            200,
            vec![("x-mooncake-revision", st.revision.to_string())],
            Vec::new(),
        );
    };
    let Ok(after) = after.parse::<u64>() else {
        return text(400, "bad after");
    };
    let deadline = Instant::now() + timeout;
    loop {
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
        let events: Vec<WireEvent> = st
            .log
            .iter()
            .filter(|e| e.revision > after && e.key.starts_with(prefix))
            .cloned()
            .collect();
        let now = Instant::now();
        if !events.is_empty() || now >= deadline || shared.shutdown.load(Ordering::SeqCst) {
            let rev = st.revision;
            return (
                200,
                vec![("x-mooncake-revision", rev.to_string())],
                wire::encode_events(&events),
            );
        }
        st = shared
            .changed
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}
