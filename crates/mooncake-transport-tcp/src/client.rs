//! The initiator side: per peer, a bounded pool of connections over its network paths,
//! driven by the I/O loops. Requests are pipelined; responses complete slices in order.
//!
//! A connection's send side may be driven by any thread (the submitting thread writes small
//! requests itself when the connection is idle, saving a hand-off); its receive side and its
//! teardown belong to its loop. A connection that fails hands its unfinished slices back to
//! the peer, which retries them on another path under a new epoch (see `server.rs` for the
//! fencing) or fails them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use mooncake_core::{Error, ErrorKind, Opcode, Region, RegionLease, SliceCompleter};
use tracing::{debug, warn};

use crate::io::{
    Body, Dest, Link, OutFrame, Progress, RECV_BUF, RecvBuf, Sink, recv_payload, send_frames,
};
use crate::reactor::{Cx, Entry, LoopHandle, Next, Reactor, Token};
use crate::staging::{self, StagedIn};
use crate::sys::{self, Io};
use crate::tls::{Tls, TlsConfig};
use crate::wire::{self, FrameKind, Header, Hello, Status};

/// Settings and counters shared by every connection of a transport.
#[derive(Debug)]
pub(crate) struct ClientShared {
    /// The initiator's segment name and generation (sent in every hello).
    pub(crate) local_name: String,
    pub(crate) generation: u64,
    pub(crate) conns_per_path: usize,
    pub(crate) max_conns: usize,
    pub(crate) timeout: Duration,
    pub(crate) min_rate: u64,
    pub(crate) idle_timeout: Duration,
    pub(crate) path_pause: Duration,
    pub(crate) inline_send_max: u64,
    pub(crate) max_data: u64,
    pub(crate) socket_buffer: Option<usize>,
    pub(crate) closed: AtomicBool,
    pub(crate) conns: AtomicUsize,
    pub(crate) stats: Stats,
    /// The cluster secret: targets must prove they hold it, and we prove it to them.
    pub(crate) secret: Option<mooncake_core::ClusterSecret>,
    /// Connections speak TLS under their frames (see `tls`).
    pub(crate) tls: Option<Arc<TlsConfig>>,
}

/// Counters of the client side.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connects: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) conn_failures: AtomicU64,
    pub(crate) bytes_per_path: Mutex<Vec<u64>>,
}

/// Bytes a connection's loop moves per turn before yielding to other connections.
const LOOP_BUDGET: u64 = 4 << 20;

/// One slice of a task, on its way to a peer.
pub(crate) struct Slice {
    pub(crate) op: Opcode,
    /// The local range; `None` once its region was unregistered (the slice then fails).
    pub(crate) local: Option<RegionLease>,
    pub(crate) len: u64,
    pub(crate) remote_addr: u64,
    pub(crate) done: SliceCompleter,
    pub(crate) attempts: u8,
    pub(crate) failed_paths: u64,
}

/// A slice on the wire, waiting for its response.
struct InFlight {
    id: u64,
    slice: Slice,
    deadline: Instant,
}

/// A remote segment we talk to: its paths and our connections to them.
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) generation: u64,
    paths: Vec<SocketAddr>,
    shared: Arc<ClientShared>,
    state: Mutex<PeerState>,
    rr: AtomicUsize,
}

struct PeerState {
    conns: Vec<Arc<ClientConn>>,
    paused_until: Vec<Option<Instant>>,
    /// Connections are opened under this epoch; a retry after a failure raises it.
    epoch: u64,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peer {
    pub(crate) fn new(
        name: String,
        generation: u64,
        paths: Vec<SocketAddr>,
        shared: Arc<ClientShared>,
    ) -> Arc<Self> {
        let n = paths.len();
        {
            let mut b = lock(&shared.stats.bytes_per_path);
            if b.len() < n {
                b.resize(n, 0);
            }
        }
        Arc::new(Self {
            name,
            generation,
            paths,
            shared,
            state: Mutex::new(PeerState {
                conns: Vec::new(),
                paused_until: vec![None; n],
                epoch: 1,
                closed: false,
            }),
            rr: AtomicUsize::new(0),
        })
    }

    /// How long a connection may make no progress: with several paths, half the timeout, so
    /// that one retry on another path still finishes within the deadline.
    fn progress_timeout(&self) -> Duration {
        if self.paths.len() > 1 {
            self.shared.timeout / 2
        } else {
            self.shared.timeout
        }
    }

    /// Hands slices to the least-loaded connections of eligible paths, opening connections
    /// (up to the per-path and total caps) when every existing one is busy.
    pub(crate) fn dispatch(self: &Arc<Self>, slices: Vec<Slice>) {
        let mut refused: Vec<(Slice, Error)> = Vec::new();
        let mut groups: Vec<(Arc<ClientConn>, Vec<Slice>)> = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.closed || self.shared.closed.load(Ordering::Acquire) {
                drop(st);
                for s in slices {
                    s.done
                        .complete(Err(Error::new(ErrorKind::Closed, "connection pool closed")));
                }
                return;
            }
            st.conns.retain(|c| !c.dead.load(Ordering::Acquire));
            let now = Instant::now();
            let mut assigned: Vec<u64> = vec![0; st.conns.len()];
            for slice in slices {
                let retry = slice.attempts > 0;
                let mut eligible: u64 = (0..self.paths.len())
                    .filter(|&p| slice.failed_paths & (1 << p) == 0)
                    .filter(|&p| st.paused_until[p].is_none_or(|t| t <= now))
                    .fold(0, |m, p| m | 1 << p);
                if eligible == 0 && !retry {
                    // Every path is paused: probe the one paused longest ago rather than refuse.
                    if let Some(p) = (0..self.paths.len()).min_by_key(|&p| st.paused_until[p]) {
                        eligible = 1 << p;
                    }
                }
                if eligible == 0 {
                    let e = Error::new(
                        ErrorKind::PeerUnreachable,
                        format!("no healthy path left to segment {:?}", self.name),
                    );
                    refused.push((slice, e));
                    continue;
                }
                let epoch = st.epoch;
                let usable = |c: &Arc<ClientConn>| {
                    eligible & (1 << c.path) != 0
                        && c.epoch == epoch
                        && !c.dead.load(Ordering::Acquire)
                };
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                let n = st.conns.len();
                let best = (0..n)
                    .map(|i| (start + i) % n)
                    .filter(|&i| usable(&st.conns[i]))
                    .min_by_key(|&i| st.conns[i].outstanding.load(Ordering::Relaxed) + assigned[i]);
                let busy = best.is_none_or(|i| {
                    st.conns[i].outstanding.load(Ordering::Relaxed) + assigned[i] > 0
                });
                let mut pick = best;
                if busy {
                    // Open a connection on the eligible path with the fewest, if caps allow.
                    let path = (0..self.paths.len())
                        .filter(|&p| eligible & (1 << p) != 0)
                        .min_by_key(|&p| {
                            st.conns.iter().filter(|c| usable(c) && c.path == p).count()
                        });
                    if let Some(p) = path {
                        let on_path = st.conns.iter().filter(|c| usable(c) && c.path == p).count();
                        let total = self.shared.conns.load(Ordering::Acquire);
                        if on_path < self.shared.conns_per_path && total < self.shared.max_conns {
                            match ClientConn::open(self, p, epoch) {
                                Ok(c) => {
                                    st.conns.push(c);
                                    assigned.push(0);
                                    pick = Some(st.conns.len() - 1);
                                }
                                Err(e) if best.is_none() => {
                                    refused.push((slice, e));
                                    continue;
                                }
                                Err(e) => {
                                    debug!(peer = %self.name, "cannot open a connection: {e}")
                                }
                            }
                        } else if best.is_none() {
                            let e = Error::new(
                                ErrorKind::Busy,
                                format!(
                                    "tcp connection cap reached ({total} of {} open)",
                                    self.shared.max_conns
                                ),
                            );
                            refused.push((slice, e));
                            continue;
                        }
                    }
                }
                let i = pick.expect("a connection was found or opened");
                assigned[i] += slice.len;
                if retry {
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                let conn = &st.conns[i];
                match groups.iter_mut().find(|(c, _)| Arc::ptr_eq(c, conn)) {
                    Some((_, g)) => g.push(slice),
                    None => groups.push((conn.clone(), vec![slice])),
                }
            }
        }
        for (slice, e) in refused {
            slice.done.complete(Err(e));
        }
        for (conn, group) in groups {
            conn.enqueue(group);
        }
    }

    /// A connection is gone; `slices` are the ones it had not finished.
    fn on_conn_closed(self: &Arc<Self>, conn: &Arc<ClientConn>, err: &Error, slices: Vec<Slice>) {
        let fenced = err.kind() == ErrorKind::Closed && conn.fenced.load(Ordering::Acquire);
        let mut retries = Vec::new();
        let mut siblings = Vec::new();
        {
            let mut st = lock(&self.state);
            st.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if !fenced && conn.failed.load(Ordering::Acquire) {
                self.shared
                    .stats
                    .conn_failures
                    .fetch_add(1, Ordering::Relaxed);
                if err.is_temporary() {
                    st.paused_until[conn.path] = Some(Instant::now() + self.shared.path_pause);
                }
            }
            let closed = st.closed || self.shared.closed.load(Ordering::Acquire);
            for mut s in slices {
                let retryable = s.local.is_some() && !closed;
                if fenced && retryable {
                    retries.push(s);
                } else if retryable
                    && err.is_temporary()
                    && (s.attempts as usize + 1) < self.paths.len()
                {
                    s.attempts += 1;
                    s.failed_paths |= 1 << conn.path;
                    retries.push(s);
                } else {
                    let e = if s.local.is_none() {
                        Error::new(
                            ErrorKind::NotRegistered,
                            "the local region was unregistered during the transfer",
                        )
                    } else {
                        err.clone()
                    };
                    s.done.complete(Err(e));
                }
            }
            // A retry after a failure goes out under a new epoch: the target closes every
            // older connection of ours before it accepts the retry, so no older attempt can
            // land after it. Our own older connections are closed here and their slices
            // re-dispatched.
            if !retries.is_empty() && !fenced && conn.epoch == st.epoch {
                st.epoch += 1;
                let epoch = st.epoch;
                st.conns.retain(|c| {
                    if c.epoch < epoch {
                        siblings.push(c.clone());
                        false
                    } else {
                        true
                    }
                });
            }
        }
        for c in siblings {
            c.fenced.store(true, Ordering::Release);
            c.close(Error::new(
                ErrorKind::Closed,
                "fenced by a retry under a new epoch",
            ));
        }
        if !retries.is_empty() {
            debug!(peer = %self.name, path = %self.paths[conn.path], "retrying {} slices: {err}", retries.len());
            self.dispatch(retries);
        }
    }

    /// Closes every connection; their slices fail with `Closed`.
    pub(crate) fn close(&self) {
        let conns = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.conns)
        };
        for c in conns {
            c.close(Error::new(
                ErrorKind::Closed,
                format!("connections to {:?} closed", self.name),
            ));
        }
    }

    /// Number of network paths to this peer.
    pub(crate) fn path_count(&self) -> usize {
        self.paths.len()
    }

    /// Live connections, for tests and stats.
    pub(crate) fn conn_count(&self) -> usize {
        lock(&self.state)
            .conns
            .iter()
            .filter(|c| !c.dead.load(Ordering::Acquire))
            .count()
    }

    /// Revokes `region` on every connection (see [`ClientConn::revoke`]).
    pub(crate) fn revoke(&self, region: &Arc<Region>) {
        let conns = lock(&self.state).conns.clone();
        for c in conns {
            c.revoke(region);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Hello,
    Ready,
    Dead,
}

struct ConnSt {
    phase: Phase,
    /// Slices not framed yet.
    queue: VecDeque<Slice>,
    /// Frames not (fully) written yet; taken out while a thread is sending them.
    out: VecDeque<OutFrame>,
    inflight: VecDeque<InFlight>,
    /// A thread is writing frames (holding them outside the lock).
    sending: bool,
    /// New work arrived while sending: the sender goes around again.
    more: bool,
    /// The socket is full: the next writable edge resumes sending.
    blocked: bool,
    /// A writable edge arrived while another thread was sending.
    edge: bool,
    /// Regions revoked while a thread held frames outside the lock.
    revoked: Vec<Arc<Region>>,
    next_id: u64,
    last_progress: Instant,
    last_used: Instant,
    /// Why the connection is closing (set once).
    reason: Option<Error>,
    /// The target proved the cluster secret.
    proven: bool,
}

/// One TCP connection to one path of a peer.
pub(crate) struct ClientConn {
    path: usize,
    epoch: u64,
    peer: Weak<Peer>,
    shared: Arc<ClientShared>,
    sock: socket2::Socket,
    tls: Option<Tls>,
    lp: Arc<LoopHandle>,
    token: OnceLock<Token>,
    st: Mutex<ConnSt>,
    outstanding: AtomicU64,
    dead: AtomicBool,
    /// Closed because a newer epoch replaced it (its slices are re-dispatched as they are).
    fenced: AtomicBool,
    /// Closed by a failure (timeout, I/O error), not by us.
    failed: AtomicBool,
    progress_timeout: Duration,
    connect_deadline: Instant,
    /// What we said in the hello (the challenge-response covers it).
    hello: Hello,
}

impl ClientConn {
    /// Starts a non-blocking connect to path `path` of `peer` and hands the connection to a
    /// loop; requests queue until the hello is acknowledged.
    fn open(peer: &Arc<Peer>, path: usize, epoch: u64) -> Result<Arc<Self>, Error> {
        let addr = peer.paths[path];
        let ctx = |e: std::io::Error| {
            Error::io(&format!("connect to {:?} at {addr}", peer.name), &e)
                .with_context("peer", &peer.name)
        };
        let reactor = Reactor::global().map_err(ctx)?;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.nonblocking().cloexec(),
            Some(socket2::Protocol::TCP),
        )
        .map_err(ctx)?;
        sock.set_tcp_nodelay(true).map_err(ctx)?;
        if let Some(size) = peer.shared.socket_buffer {
            let _ = sock.set_send_buffer_size(size);
            let _ = sock.set_recv_buffer_size(size);
        }
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(ctx(e)),
        }
        let tls = match &peer.shared.tls {
            Some(c) => Some(c.connect()?),
            None => None,
        };
        peer.shared.conns.fetch_add(1, Ordering::AcqRel);
        peer.shared.stats.connects.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let progress_timeout = peer.progress_timeout();
        let hello = Hello {
            target: peer.name.clone(),
            initiator: peer.shared.local_name.clone(),
            initiator_generation: peer.shared.generation,
            epoch,
            nonce: mooncake_core::auth::nonce(),
        };
        let bytes = hello.encode();
        let mut out = VecDeque::new();
        out.push_back(OutFrame::new(
            Header::new(FrameKind::Hello, 0, peer.generation, bytes.len() as u64).encode(),
            Body::Owned(bytes),
        ));
        let conn = Arc::new(Self {
            path,
            epoch,
            peer: Arc::downgrade(peer),
            shared: peer.shared.clone(),
            sock,
            tls,
            lp: reactor.next().clone(),
            token: OnceLock::new(),
            st: Mutex::new(ConnSt {
                phase: Phase::Connecting,
                queue: VecDeque::new(),
                out,
                inflight: VecDeque::new(),
                sending: false,
                more: false,
                blocked: true,
                edge: false,
                revoked: Vec::new(),
                next_id: 1,
                last_progress: now,
                last_used: now,
                reason: None,
                proven: false,
            }),
            outstanding: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            progress_timeout,
            connect_deadline: now + progress_timeout,
            hello,
        });
        let c = conn.clone();
        conn.lp.post(move |cx| {
            let io = ClientIo {
                conn: c.clone(),
                rb: RecvBuf::new(RECV_BUF),
                recv: Recv::Header,
            };
            match cx.add(Entry::Client(io), true) {
                Ok(t) => {
                    let _ = c.token.set(t);
                    if c.dead.load(Ordering::Acquire) {
                        cx.close(t);
                    }
                }
                Err(e) => {
                    let err = Error::io("watch a tcp connection", &e);
                    c.fail_unwatched(err);
                }
            }
        });
        Ok(conn)
    }

    fn lock(&self) -> MutexGuard<'_, ConnSt> {
        lock(&self.st)
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn link(&self) -> Link<'_> {
        Link {
            fd: self.sock.as_raw_fd(),
            tls: self.tls.as_ref(),
        }
    }

    /// The TLS session's channel binding (empty without TLS), which proofs cover.
    fn binding(&self) -> Result<Vec<u8>, Error> {
        match &self.tls {
            Some(t) => Ok(t
                .binding()
                .map_err(|e| self.io_error("TLS channel binding", &e))?
                .to_vec()),
            None => Ok(Vec::new()),
        }
    }

    fn peer_name(&self) -> String {
        self.peer
            .upgrade()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    fn io_error(&self, what: &str, e: &std::io::Error) -> Error {
        Error::io(&format!("{what} to segment {:?}", self.peer_name()), e)
            .with_context("path", self.path)
    }

    /// Queues slices and, if the connection is idle, writes them from this thread.
    fn enqueue(self: &Arc<Self>, slices: Vec<Slice>) {
        let bytes: u64 = slices.iter().map(|s| s.len).sum();
        self.outstanding.fetch_add(bytes, Ordering::Relaxed);
        let mut st = self.lock();
        if st.phase == Phase::Dead {
            drop(st);
            self.outstanding.fetch_sub(bytes, Ordering::Relaxed);
            // Lost a race with a failure: go around again (another connection, or a new one).
            match self.peer.upgrade() {
                Some(p) => p.dispatch(slices),
                None => {
                    for s in slices {
                        s.done
                            .complete(Err(Error::new(ErrorKind::Closed, "peer closed")));
                    }
                }
            }
            return;
        }
        st.queue.extend(slices);
        st.last_used = Instant::now();
        drop(st);
        self.kick_send(self.shared.inline_send_max);
    }

    /// Moves queued slices into frames (ids in wire order; each slice becomes in flight).
    fn frame(self: &Arc<Self>, st: &mut ConnSt) {
        let now = Instant::now();
        let unacked = self.outstanding.load(Ordering::Relaxed);
        while let Some(s) = st.queue.pop_front() {
            let id = st.next_id;
            st.next_id += 1;
            let (kind, body) = match (s.op, &s.local) {
                (Opcode::Write, Some(l)) => match l
                    .slice(0, s.len)
                    .and_then(|sub| staging::body(sub, || self.waker()))
                {
                    Ok(body) => (FrameKind::Write, body),
                    Err(e) => {
                        self.outstanding.fetch_sub(s.len, Ordering::Relaxed);
                        s.done.complete(Err(e));
                        continue;
                    }
                },
                (Opcode::Read, Some(_)) => (FrameKind::Read, Body::None),
                (_, None) => {
                    self.outstanding.fetch_sub(s.len, Ordering::Relaxed);
                    s.done.complete(Err(Error::new(
                        ErrorKind::NotRegistered,
                        "the local region was unregistered before the transfer started",
                    )));
                    continue;
                }
            };
            st.out.push_back(OutFrame::new(
                Header::new(kind, id, s.remote_addr, s.len).encode(),
                body,
            ));
            if st.inflight.is_empty() {
                st.last_progress = now;
            }
            // The whole request must finish within the progress timeout plus the time its
            // bytes (and those ahead of it) take at the minimum rate.
            let slack =
                Duration::from_secs_f64((unacked + s.len) as f64 / self.shared.min_rate as f64);
            st.inflight.push_back(InFlight {
                id,
                slice: s,
                deadline: now + self.progress_timeout + slack,
            });
        }
    }

    /// Writes queued frames, as far as the socket and `budget` allow, from whatever thread
    /// calls it; one thread at a time sends, others leave their work to it.
    fn kick_send(self: &Arc<Self>, budget: u64) -> Next {
        let mut st = self.lock();
        loop {
            if st.sending {
                st.more = true;
                return Next::Idle;
            }
            match st.phase {
                Phase::Ready => self.frame(&mut st),
                Phase::Hello | Phase::Connecting => {}
                Phase::Dead => return Next::Idle,
            }
            if st.out.is_empty() || st.blocked || st.phase == Phase::Connecting {
                return Next::Idle;
            }
            st.sending = true;
            st.more = false;
            let mut frames = std::mem::take(&mut st.out);
            drop(st);
            let r = send_frames(self.link(), &mut frames, budget);
            st = self.lock();
            st.sending = false;
            debug_assert!(st.out.is_empty(), "only the sender moves frames into `out`");
            if st.phase == Phase::Dead {
                // Torn down while we were sending: drop the frames (and their leases) now.
                return Next::Idle;
            }
            st.out = frames;
            if !st.revoked.is_empty() {
                let regions = std::mem::take(&mut st.revoked);
                for r in &regions {
                    if !Self::revoke_locked(&mut st, r) {
                        drop(st);
                        self.close(Error::new(
                            ErrorKind::Closed,
                            "a request's local region was unregistered mid-send",
                        ));
                        return Next::Idle;
                    }
                }
            }
            match r {
                Ok(sent) => {
                    if sent.bytes > 0 {
                        st.last_progress = Instant::now();
                        if let Ok(mut b) = self.shared.stats.bytes_per_path.lock()
                            && let Some(x) = b.get_mut(self.path)
                        {
                            *x += sent.bytes;
                        }
                    }
                    if sent.waiting {
                        // A device copy finishes first; it wakes the connection.
                        return Next::Idle;
                    }
                    if sent.would_block {
                        if st.edge {
                            st.edge = false;
                            continue;
                        }
                        st.blocked = true;
                        return Next::Idle;
                    }
                    if !st.out.is_empty() || st.more || !st.queue.is_empty() {
                        if sent.bytes >= budget {
                            // Budget used up: the loop carries on.
                            drop(st);
                            if budget < LOOP_BUDGET {
                                self.wake_loop();
                                return Next::Idle;
                            }
                            return Next::More;
                        }
                        continue;
                    }
                    return Next::Idle;
                }
                Err(e) => {
                    drop(st);
                    self.failed.store(true, Ordering::Release);
                    self.close(self.io_error("send", &e));
                    return Next::Idle;
                }
            }
        }
    }

    fn wake_loop(&self) {
        if let Some(&t) = self.token.get() {
            self.lp.post(move |cx| cx.wake(t));
        }
    }

    /// Wakes this connection's loop (a device copy of a staged payload finished).
    fn waker(self: &Arc<Self>) -> staging::Waker {
        let me = Arc::downgrade(self);
        Arc::new(move || {
            if let Some(c) = me.upgrade() {
                c.wake_loop();
            }
        })
    }

    /// Closes the connection from any thread: its loop tears it down and hands its slices
    /// back to the peer. The first reason given wins.
    pub(crate) fn close(&self, reason: Error) {
        {
            let mut st = self.lock();
            if st.reason.is_none() {
                st.reason = Some(reason);
            }
        }
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(&t) = self.token.get() {
            self.lp.post(move |cx| cx.close_now(t));
        }
        // Otherwise the loop's `add` sees `dead` and closes it.
    }

    /// The loop could not watch the socket: fail everything without a loop entry.
    fn fail_unwatched(self: &Arc<Self>, err: Error) {
        self.dead.store(true, Ordering::Release);
        self.failed.store(true, Ordering::Release);
        self.teardown(err, None);
    }

    /// Final teardown (on the loop, or without one): marks the connection dead, aborts the
    /// socket, and hands every unfinished slice to the peer.
    fn teardown(self: &Arc<Self>, fallback: Error, extra: Option<Slice>) {
        self.dead.store(true, Ordering::Release);
        sys::abort(&self.sock);
        let (reason, mut slices) = {
            let mut st = self.lock();
            st.phase = Phase::Dead;
            st.out.clear();
            let mut v: Vec<Slice> = st.inflight.drain(..).map(|f| f.slice).collect();
            v.extend(st.queue.drain(..));
            (st.reason.take().unwrap_or(fallback), v)
        };
        slices.extend(extra);
        for s in &slices {
            self.outstanding.fetch_sub(s.len, Ordering::Relaxed);
        }
        self.shared.conns.fetch_sub(1, Ordering::AcqRel);
        // An idle pooled connection that the peer closed (it exited or dropped it) costs
        // nothing: only a connection that had work is worth a warning.
        if reason.kind() != ErrorKind::Closed {
            if slices.is_empty() {
                debug!(
                    "idle tcp connection to {:?} closed: {reason}",
                    self.peer_name()
                );
            } else {
                warn!(
                    "tcp connection to {:?} failed with {} slices unfinished: {reason}",
                    self.peer_name(),
                    slices.len()
                );
            }
        }
        match self.peer.upgrade() {
            Some(p) => p.on_conn_closed(self, &reason, slices),
            None => {
                for s in slices {
                    s.done.complete(Err(reason.clone()));
                }
            }
        }
    }

    /// Revokes `region`: queued slices using it fail, frames not started are withdrawn
    /// (with their in-flight entry), in-flight slices drop their lease (a read's data will
    /// be discarded); a frame half written from it closes the connection.
    fn revoke(self: &Arc<Self>, region: &Arc<Region>) {
        let mut st = self.lock();
        if st.sending {
            st.revoked.push(region.clone());
            return;
        }
        if !Self::revoke_locked(&mut st, region) {
            drop(st);
            self.close(Error::new(
                ErrorKind::Closed,
                "a request's local region was unregistered mid-send",
            ));
        }
    }

    /// See [`revoke`](Self::revoke); false when the connection must close.
    fn revoke_locked(st: &mut ConnSt, region: &Arc<Region>) -> bool {
        let uses = |s: &Slice| {
            s.local
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(l.region(), region))
        };
        for s in st.queue.iter_mut().filter(|s| uses(s)) {
            s.local = None;
        }
        let mut ok = true;
        let mut withdraw = Vec::new();
        for f in &st.out {
            if f.body
                .lease()
                .is_some_and(|l| Arc::ptr_eq(l.region(), region))
            {
                if f.started() {
                    ok = false;
                } else if let Ok(h) = Header::decode(&f.head, u64::MAX) {
                    withdraw.push(h.request_id);
                }
            }
        }
        if !ok {
            return false;
        }
        st.out.retain(|f| {
            Header::decode(&f.head, u64::MAX).map_or(true, |h| !withdraw.contains(&h.request_id))
        });
        let mut kept = VecDeque::with_capacity(st.inflight.len());
        for mut f in st.inflight.drain(..) {
            if withdraw.contains(&f.id) {
                f.slice.local = None;
                st.queue.push_front(f.slice);
            } else {
                if uses(&f.slice) {
                    f.slice.local = None;
                }
                kept.push_back(f);
            }
        }
        st.inflight = kept;
        true
    }
}

/// What the receive side is in the middle of.
enum Recv {
    /// Between frames.
    Header,
    /// A read's data, landing in the slice's lease (or dropped if it was revoked); through
    /// pinned chunks when the lease is device memory.
    Data {
        f: InFlight,
        sink: Sink,
        staged: Option<Box<StagedIn>>,
    },
    /// An error message for a request.
    ErrMsg {
        f: InFlight,
        status: Status,
        buf: Vec<u8>,
        sink: Sink,
    },
    /// The message of an error in reply to the hello.
    HelloErr { buf: Vec<u8>, sink: Sink },
    /// A target's challenge (its nonce and proof); `generation` is the target's.
    Challenge {
        generation: u64,
        buf: Vec<u8>,
        sink: Sink,
    },
}

/// The loop-owned half of a connection.
pub(crate) struct ClientIo {
    conn: Arc<ClientConn>,
    rb: RecvBuf,
    recv: Recv,
}

impl ClientIo {
    pub(crate) fn fd(&self) -> RawFd {
        self.conn.fd()
    }

    pub(crate) fn shared(&self) -> &Arc<ClientShared> {
        &self.conn.shared
    }

    pub(crate) fn on_event(&mut self, cx: &mut Cx<'_>, readable: bool, writable: bool) -> Next {
        let c = self.conn.clone();
        if c.dead.load(Ordering::Acquire) {
            return Next::Close;
        }
        if writable {
            let mut st = c.lock();
            if st.phase == Phase::Connecting {
                match c.sock.take_error() {
                    Ok(None) => st.phase = Phase::Hello,
                    Ok(Some(e)) | Err(e) => {
                        drop(st);
                        c.failed.store(true, Ordering::Release);
                        c.close(c.io_error("connect", &e));
                        return Next::Close;
                    }
                }
            }
            st.blocked = false;
            if st.sending {
                st.edge = true;
            }
            drop(st);
            // TLS records a send left queued when the socket was full go out now.
            if let Err(e) = c.link().flush() {
                c.failed.store(true, Ordering::Release);
                c.close(c.io_error("send", &e));
                return Next::Close;
            }
        }
        let mut next = c.kick_send(LOOP_BUDGET);
        if readable {
            match self.read(cx) {
                Ok(Next::More) => next = Next::More,
                Ok(_) => {}
                Err(e) => {
                    c.failed.store(true, Ordering::Release);
                    c.close(e);
                    return Next::Close;
                }
            }
        }
        if c.dead.load(Ordering::Acquire) {
            return Next::Close;
        }
        next
    }

    fn read(&mut self, cx: &mut Cx<'_>) -> Result<Next, Error> {
        let c = self.conn.clone();
        let fd = c.link();
        let mut moved = 0u64;
        loop {
            if moved >= LOOP_BUDGET {
                return Ok(Next::More);
            }
            match &mut self.recv {
                Recv::Header => {
                    let Some(raw) = self.rb.take_header() else {
                        match self.rb.fill(fd).map_err(|e| c.io_error("receive", &e))? {
                            Io::Done(_) => continue,
                            Io::WouldBlock => return Ok(Next::Idle),
                            Io::Eof => {
                                return Err(c.io_error(
                                    "receive",
                                    &std::io::Error::new(
                                        std::io::ErrorKind::UnexpectedEof,
                                        "peer closed the connection",
                                    ),
                                ));
                            }
                        }
                    };
                    let h = Header::decode(&raw, c.shared.max_data).map_err(|e| {
                        Error::new(ErrorKind::Protocol, format!("bad frame from peer: {e}"))
                    })?;
                    self.on_header(cx, h)?;
                }
                Recv::Data { f, sink, staged } => {
                    let dest = match (&f.slice.local, staged.as_deref_mut()) {
                        (Some(_), Some(s)) => Dest::Staged(s),
                        (Some(l), None) => Dest::Lease(l),
                        (None, _) => Dest::Discard,
                    };
                    let p = recv_payload(fd, &mut self.rb, sink, dest, LOOP_BUDGET, &mut moved)
                        .map_err(|e| c.io_error("receive", &e))?;
                    c.lock().last_progress = cx.now;
                    match p {
                        Progress::Blocked => return Ok(Next::Idle),
                        Progress::Budget => return Ok(Next::More),
                        Progress::Done => {}
                    }
                    let Recv::Data { f, staged, .. } =
                        std::mem::replace(&mut self.recv, Recv::Header)
                    else {
                        unreachable!()
                    };
                    if let Ok(mut b) = c.shared.stats.bytes_per_path.lock()
                        && let Some(x) = b.get_mut(c.path)
                    {
                        *x += f.slice.len;
                    }
                    match staged {
                        // The read completes once its last chunk is in device memory.
                        Some(s) if f.slice.local.is_some() => {
                            let c = c.clone();
                            s.finish(move |r| c.finish(f, r));
                        }
                        _ => c.finish(f, Ok(())),
                    }
                }
                Recv::ErrMsg { buf, sink, .. } => {
                    let p =
                        recv_payload(fd, &mut self.rb, sink, Dest::Vec(buf), u64::MAX, &mut moved)
                            .map_err(|e| c.io_error("receive", &e))?;
                    if p != Progress::Done {
                        return Ok(Next::Idle);
                    }
                    let Recv::ErrMsg { f, status, buf, .. } =
                        std::mem::replace(&mut self.recv, Recv::Header)
                    else {
                        unreachable!()
                    };
                    let kind = if status == Status::OutOfRange {
                        ErrorKind::RemoteAccess
                    } else {
                        ErrorKind::Protocol
                    };
                    let e = Error::new(
                        kind,
                        format!(
                            "segment {:?} refused: {}",
                            c.peer_name(),
                            String::from_utf8_lossy(&buf)
                        ),
                    );
                    c.finish(f, Err(e));
                }
                Recv::Challenge { buf, sink, .. } => {
                    let p =
                        recv_payload(fd, &mut self.rb, sink, Dest::Vec(buf), u64::MAX, &mut moved)
                            .map_err(|e| c.io_error("receive", &e))?;
                    if p != Progress::Done {
                        return Ok(Next::Idle);
                    }
                    let Recv::Challenge {
                        generation, buf, ..
                    } = std::mem::replace(&mut self.recv, Recv::Header)
                    else {
                        unreachable!()
                    };
                    c.answer_challenge(generation, &buf)?;
                }
                Recv::HelloErr { buf, sink } => {
                    let p =
                        recv_payload(fd, &mut self.rb, sink, Dest::Vec(buf), u64::MAX, &mut moved)
                            .map_err(|e| c.io_error("receive", &e))?;
                    if p != Progress::Done {
                        return Ok(Next::Idle);
                    }
                    return Err(Error::new(
                        ErrorKind::PeerUnreachable,
                        format!(
                            "segment {:?} refused the connection: {}",
                            c.peer_name(),
                            String::from_utf8_lossy(buf)
                        ),
                    )
                    .with_context("peer", c.peer_name())
                    .with_temporary(false));
                }
            }
        }
    }

    fn on_header(&mut self, cx: &mut Cx<'_>, h: Header) -> Result<(), Error> {
        let c = self.conn.clone();
        let mut st = c.lock();
        st.last_progress = cx.now;
        if st.phase == Phase::Hello {
            return match h.kind {
                FrameKind::HelloAck if c.shared.secret.is_some() && !st.proven => Err(c.refused(
                    "it answered without proving the cluster secret (it runs without one)",
                )),
                FrameKind::HelloAck => {
                    st.phase = Phase::Ready;
                    drop(st);
                    c.kick_send(LOOP_BUDGET);
                    Ok(())
                }
                FrameKind::Challenge if h.len == 48 => {
                    self.recv = Recv::Challenge {
                        generation: h.addr,
                        buf: Vec::new(),
                        sink: Sink { got: 0, len: h.len },
                    };
                    Ok(())
                }
                FrameKind::Error => {
                    self.recv = Recv::HelloErr {
                        buf: Vec::new(),
                        sink: Sink { got: 0, len: h.len },
                    };
                    Ok(())
                }
                k => Err(Error::new(
                    ErrorKind::Protocol,
                    format!("unexpected {k:?} in reply to a hello"),
                )),
            };
        }
        let f = match st.inflight.front() {
            Some(f) if f.id == h.request_id => st.inflight.pop_front().expect("front exists"),
            _ => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("response {} matches no request in flight", h.request_id),
                ));
            }
        };
        drop(st);
        match (h.kind, f.slice.op) {
            (FrameKind::ReadData, Opcode::Read) if h.len == f.slice.len => {
                let staged = match f.slice.local.as_ref() {
                    Some(l) => match staging::receiver(l, || c.waker()) {
                        Ok(s) => s.map(Box::new),
                        Err(e) => {
                            // Cannot stage into device memory: the bytes are dropped.
                            c.finish(f, Err(e));
                            return Err(Error::new(
                                ErrorKind::Closed,
                                "cannot receive into device memory",
                            ));
                        }
                    },
                    None => None,
                };
                self.recv = Recv::Data {
                    f,
                    sink: Sink { got: 0, len: h.len },
                    staged,
                };
            }
            (FrameKind::WriteAck, Opcode::Write) => c.finish(f, Ok(())),
            (FrameKind::Error, _) => {
                self.recv = Recv::ErrMsg {
                    f,
                    status: h.status,
                    buf: Vec::new(),
                    sink: Sink { got: 0, len: h.len },
                };
            }
            (k, op) => {
                let len = f.slice.len;
                c.finish(
                    f,
                    Err(Error::new(ErrorKind::Protocol, "mismatched response")),
                );
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "{k:?} frame of {} bytes in reply to a {op:?} of {len}",
                        h.len
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn on_tick(&mut self, now: Instant) -> Next {
        let c = &self.conn;
        if c.dead.load(Ordering::Acquire) || c.shared.closed.load(Ordering::Acquire) {
            return Next::Close;
        }
        let st = c.lock();
        let connecting = matches!(st.phase, Phase::Connecting | Phase::Hello);
        let mid_frame = !matches!(self.recv, Recv::Header) || self.rb.buffered() > 0;
        let busy = !st.inflight.is_empty() || !st.out.is_empty() || mid_frame;
        let why = if connecting && now >= c.connect_deadline {
            Some(format!(
                "connecting took longer than {:?}",
                c.progress_timeout
            ))
        } else if busy && now.duration_since(st.last_progress) >= c.progress_timeout {
            Some(format!(
                "peer made no progress for {:?}",
                c.progress_timeout
            ))
        } else if st.inflight.front().is_some_and(|f| now >= f.deadline)
            || matches!(&self.recv, Recv::Data { f, .. } if now >= f.deadline)
        {
            Some("a request ran past its deadline (the peer is too slow)".to_string())
        } else {
            None
        };
        if let Some(msg) = why {
            drop(st);
            c.failed.store(true, Ordering::Release);
            c.close(
                Error::new(ErrorKind::Timeout, msg)
                    .with_context("peer", c.peer_name())
                    .with_temporary(true),
            );
            return Next::Close;
        }
        let idle = st.phase == Phase::Ready
            && !busy
            && st.queue.is_empty()
            && now.duration_since(st.last_used) >= c.shared.idle_timeout;
        drop(st);
        if idle {
            c.close(Error::new(ErrorKind::Closed, "idle connection closed"));
            return Next::Close;
        }
        Next::Idle
    }

    /// Revokes `region` in the receive state (the connection's shared state is revoked by
    /// the peer).
    pub(crate) fn revoke(&mut self, region: &Arc<Region>) {
        if let Recv::Data { f, staged, .. } = &mut self.recv
            && f.slice
                .local
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(l.region(), region))
        {
            f.slice.local = None;
            // No more copies into the region (those under way finish first: the engine
            // waits for their leases).
            *staged = None;
        }
    }

    pub(crate) fn on_close(self) {
        let extra = match self.recv {
            Recv::Data { f, .. } | Recv::ErrMsg { f, .. } => Some(f.slice),
            _ => None,
        };
        self.conn.teardown(
            Error::new(ErrorKind::PeerUnreachable, "connection closed"),
            extra,
        );
    }
}

impl ClientConn {
    /// A refusal of the connection by us, not to be retried elsewhere.
    fn refused(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::PeerUnreachable,
            format!("refused segment {:?}: {why}", self.peer_name()),
        )
        .with_context("peer", self.peer_name())
        .with_temporary(false)
    }

    /// Checks the target's proof and sends ours (the hello acknowledgement follows).
    fn answer_challenge(self: &Arc<Self>, generation: u64, payload: &[u8]) -> Result<(), Error> {
        let Some(secret) = &self.shared.secret else {
            return Err(self.refused(
                "it requires the cluster secret (set MC_CLUSTER_SECRET_FILE or MC_CLUSTER_SECRET)",
            ));
        };
        let (nonce, proof) = payload.split_at(mooncake_core::auth::NONCE_LEN);
        let binding = self.binding()?;
        if !wire::verify(
            secret,
            wire::TARGET_ROLE,
            &self.hello,
            generation,
            nonce,
            &binding,
            proof,
        ) {
            return Err(self.refused("it did not prove the cluster secret"));
        }
        let mine = wire::proof(
            secret,
            wire::INITIATOR_ROLE,
            &self.hello,
            generation,
            nonce,
            &binding,
        );
        {
            let mut st = self.lock();
            st.proven = true;
            st.out.push_back(OutFrame::new(
                Header::new(FrameKind::Proof, 0, 0, mine.len() as u64).encode(),
                Body::Owned(mine.to_vec()),
            ));
        }
        self.kick_send(LOOP_BUDGET);
        Ok(())
    }

    /// Completes an in-flight slice.
    fn finish(&self, f: InFlight, result: Result<(), Error>) {
        self.outstanding.fetch_sub(f.slice.len, Ordering::Relaxed);
        let result = match (result, &f.slice.local) {
            (Ok(()), None) if f.slice.op == Opcode::Read => Err(Error::new(
                ErrorKind::NotRegistered,
                "the local region was unregistered during the read; its data was dropped",
            )),
            (r, _) => r,
        };
        f.slice.done.complete(result);
    }
}
