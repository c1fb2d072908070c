//! The initiator side: a pool of persistent connections per peer and path, each with a
//! sender and a receiver thread, pipelining requests and completing slices as responses
//! arrive. A connection that fails hands its unfinished slices to another path.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use mooncake_core::{Error, ErrorKind, Opcode, RegionLease, SliceCompleter};
use tracing::{debug, warn};

use crate::io::RecvBuf;
use crate::sys::{self, Stall};
use crate::wire::{FrameKind, HEADER_LEN, Header, Status};

/// Settings shared by every connection of a transport.
#[derive(Debug)]
pub(crate) struct ClientShared {
    pub(crate) conns_per_path: usize,
    pub(crate) timeout: Duration,
    pub(crate) path_pause: Duration,
    pub(crate) inline_send_max: u64,
    pub(crate) max_data: u64,
    pub(crate) socket_buffer: Option<usize>,
    pub(crate) closed: AtomicBool,
    pub(crate) epoch: Instant,
    pub(crate) next_conn: AtomicU64,
    pub(crate) stats: Stats,
}

/// Counters of the client side.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connects: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) conn_failures: AtomicU64,
    pub(crate) bytes_per_path: Mutex<Vec<u64>>,
}

impl ClientShared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// One slice of a task, on its way to a peer.
pub(crate) struct Slice {
    pub(crate) op: Opcode,
    pub(crate) local: RegionLease,
    pub(crate) remote_addr: u64,
    pub(crate) done: SliceCompleter,
    pub(crate) attempts: u8,
    pub(crate) failed_paths: u64,
    /// The submitting thread may write it itself when the connection is idle.
    pub(crate) inline_ok: bool,
}

impl Slice {
    fn len(&self) -> u64 {
        self.local.len()
    }
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
    conns: Vec<Arc<Conn>>,
    paused_until: Vec<Option<Instant>>,
    closed: bool,
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
            let mut b = shared
                .stats
                .bytes_per_path
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
                closed: false,
            }),
            rr: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Sends slices on the least-loaded connections of eligible paths: each slice goes
    /// where the fewest bytes are outstanding (counting the ones assigned in this call), and
    /// each connection is woken once for all the slices it got.
    pub(crate) fn dispatch_many(self: &Arc<Self>, slices: Vec<Slice>) {
        let mut refused = Vec::new();
        let mut groups: Vec<(Arc<Conn>, Vec<Slice>)> = Vec::new();
        {
            let mut st = self.lock();
            if st.closed {
                drop(st);
                for s in slices {
                    s.done
                        .complete(Err(Error::new(ErrorKind::Closed, "connection pool closed")));
                }
                return;
            }
            st.conns.retain(|c| !c.dead.load(Ordering::Acquire));
            let now = Instant::now();
            let mut assigned: Vec<u64> = Vec::new();
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
                    refused.push(slice);
                    continue;
                }
                for p in (0..self.paths.len()).filter(|p| eligible & (1 << p) != 0) {
                    let have = st.conns.iter().filter(|c| c.path == p).count();
                    for _ in have..self.shared.conns_per_path {
                        st.conns.push(Conn::spawn(self, p));
                    }
                }
                assigned.resize(st.conns.len(), 0);
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                let n = st.conns.len();
                let i = (0..n)
                    .map(|i| (start + i) % n)
                    .filter(|&i| eligible & (1 << st.conns[i].path) != 0)
                    .min_by_key(|&i| st.conns[i].outstanding.load(Ordering::Relaxed) + assigned[i])
                    .expect("an eligible path has connections");
                assigned[i] += slice.len();
                if retry {
                    self.shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                }
                match groups
                    .iter_mut()
                    .find(|(c, _)| Arc::ptr_eq(c, &st.conns[i]))
                {
                    Some((_, g)) => g.push(slice),
                    None => groups.push((st.conns[i].clone(), vec![slice])),
                }
            }
        }
        for slice in refused {
            slice.done.complete(Err(Error::new(
                ErrorKind::PeerUnreachable,
                format!("no healthy path left to segment {:?}", self.name),
            )));
        }
        for (conn, group) in groups {
            conn.enqueue(group);
        }
    }

    fn on_conn_failed(self: &Arc<Self>, conn: &Arc<Conn>, err: &Error, slices: Vec<Slice>) {
        self.shared
            .stats
            .conn_failures
            .fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.lock();
            st.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if err.is_temporary() {
                st.paused_until[conn.path] = Some(Instant::now() + self.shared.path_pause);
            }
        }
        if !slices.is_empty() {
            debug!(peer = %self.name, path = %self.paths[conn.path], "connection failed with {} slices: {err}", slices.len());
        }
        let mut retries = Vec::new();
        for mut s in slices {
            if err.is_temporary()
                && !self.shared.closed.load(Ordering::Acquire)
                && (s.attempts as usize) < self.paths.len()
            {
                s.attempts += 1;
                s.failed_paths |= 1 << conn.path;
                s.inline_ok = false;
                retries.push(s);
            } else {
                s.done.complete(Err(err.clone()));
            }
        }
        if !retries.is_empty() {
            self.dispatch_many(retries);
        }
    }

    /// Fails every connection; their slices fail with `Closed`.
    pub(crate) fn close(&self) {
        let conns = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.conns)
        };
        for c in conns {
            c.fail(
                Error::new(
                    ErrorKind::Closed,
                    format!("connections to {:?} closed", self.name),
                ),
                None,
            );
        }
    }

    /// Number of network paths to this peer.
    pub(crate) fn path_count(&self) -> usize {
        self.paths.len()
    }

    /// Live connections, for tests and stats.
    pub(crate) fn conn_count(&self) -> usize {
        self.lock().conns.len()
    }
}

struct ConnState {
    queue: VecDeque<Slice>,
    inflight: VecDeque<(u64, Slice)>,
    sending: bool,
    connected: bool,
    dead: bool,
    next_id: u64,
}

/// One TCP connection to one path of a peer.
pub(crate) struct Conn {
    path: usize,
    peer: Weak<Peer>,
    shared: Arc<ClientShared>,
    state: Mutex<ConnState>,
    cv: Condvar,
    stream: OnceLock<TcpStream>,
    outstanding: AtomicU64,
    last_progress: AtomicU64,
    dead: AtomicBool,
    progress_timeout: Duration,
}

/// A request ready to go on the wire, holding its own lease on the local bytes.
struct WireReq {
    head: [u8; HEADER_LEN],
    payload: Option<RegionLease>,
}

impl Conn {
    fn spawn(peer: &Arc<Peer>, path: usize) -> Arc<Self> {
        let conn = Arc::new(Self {
            path,
            peer: Arc::downgrade(peer),
            shared: peer.shared.clone(),
            state: Mutex::new(ConnState {
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                sending: false,
                connected: false,
                dead: false,
                next_id: 1,
            }),
            cv: Condvar::new(),
            stream: OnceLock::new(),
            outstanding: AtomicU64::new(0),
            last_progress: AtomicU64::new(peer.shared.now()),
            dead: AtomicBool::new(false),
            progress_timeout: peer.progress_timeout(),
        });
        let addr = peer.paths[path];
        let (name, generation) = (peer.name.clone(), peer.generation);
        let c = conn.clone();
        let id = conn.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("mooncake-tcp-tx-{id}"))
            .spawn(move || match c.connect(addr, &name, generation) {
                Ok(()) => c.send_loop(),
                Err(e) => c.fail(e, None),
            });
        if let Err(e) = spawned {
            conn.fail(
                Error::new(ErrorKind::Io, format!("cannot spawn a sender thread: {e}")),
                None,
            );
        }
        conn
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp(&self) {
        self.last_progress
            .store(self.shared.now(), Ordering::Relaxed);
    }

    fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
        name: &str,
        generation: u64,
    ) -> Result<(), Error> {
        let ctx = |e: io::Error| {
            Error::io(&format!("connect to {name:?} at {addr}"), &e).with_context("peer", name)
        };
        let stream = TcpStream::connect_timeout(&addr, self.progress_timeout).map_err(ctx)?;
        self.shared.stats.connects.fetch_add(1, Ordering::Relaxed);
        stream.set_nodelay(true).map_err(ctx)?;
        let tick = self.progress_timeout.min(Duration::from_millis(250));
        stream.set_read_timeout(Some(tick)).map_err(ctx)?;
        stream.set_write_timeout(Some(tick)).map_err(ctx)?;
        crate::transport::apply_socket_buffer(&stream, self.shared.socket_buffer);
        let fd = stream.as_raw_fd();
        let mut stall = sys::Deadline::new(self.progress_timeout);
        let hello = Header::new(FrameKind::Hello, 0, generation, name.len() as u64);
        // SAFETY: the payload is the live `name` string.
        unsafe { sys::send_gather(fd, &hello.encode(), name.as_ptr(), name.len(), &mut stall) }
            .map_err(ctx)?;
        let mut hdr = [0u8; HEADER_LEN];
        sys::recv_into(fd, &mut hdr, &mut stall).map_err(ctx)?;
        let h = Header::decode(&hdr, self.shared.max_data).map_err(|e| {
            Error::new(ErrorKind::Protocol, format!("hello reply from {addr}: {e}"))
        })?;
        match h.kind {
            FrameKind::HelloAck => {}
            FrameKind::Error => {
                let mut msg = vec![0u8; h.len as usize];
                sys::recv_into(fd, &mut msg, &mut stall).map_err(ctx)?;
                return Err(Error::new(
                    ErrorKind::PeerUnreachable,
                    format!(
                        "{addr} refused the connection: {}",
                        String::from_utf8_lossy(&msg)
                    ),
                )
                .with_context("peer", name)
                .with_temporary(false));
            }
            k => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("unexpected {k:?} in reply to hello from {addr}"),
                ));
            }
        }
        let reader = stream.try_clone().map_err(ctx)?;
        let _ = self.stream.set(stream);
        self.stamp();
        let c = self.clone();
        std::thread::Builder::new()
            .name("mooncake-tcp-rx".into())
            .spawn(move || c.recv_loop(reader))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("cannot spawn a receiver thread: {e}"),
                )
            })?;
        let mut st = self.lock();
        if st.dead {
            return Err(Error::new(
                ErrorKind::Closed,
                "connection closed while connecting",
            ));
        }
        st.connected = true;
        Ok(())
    }

    fn enqueue(self: &Arc<Self>, mut slices: Vec<Slice>) {
        let bytes: u64 = slices.iter().map(Slice::len).sum();
        self.outstanding.fetch_add(bytes, Ordering::Relaxed);
        let mut st = self.lock();
        if st.dead {
            drop(st);
            self.outstanding.fetch_sub(bytes, Ordering::Relaxed);
            // Lost a race with a failure: go around again (another connection, or a new one).
            match self.peer.upgrade() {
                Some(p) => p.dispatch_many(slices),
                None => {
                    for s in slices {
                        s.done
                            .complete(Err(Error::new(ErrorKind::Closed, "peer closed")));
                    }
                }
            }
            return;
        }
        let inline = slices.len() == 1
            && st.connected
            && !st.sending
            && st.queue.is_empty()
            && slices[0].inline_ok
            && slices[0].len() <= self.shared.inline_send_max;
        if !inline {
            st.queue.extend(slices);
            drop(st);
            self.cv.notify_one();
            return;
        }
        st.sending = true;
        let req = self.prepare(&mut st, slices.pop().expect("one slice"));
        drop(st);
        let result = self.write(&req);
        drop(req);
        let mut st = self.lock();
        st.sending = false;
        let more = !st.queue.is_empty();
        drop(st);
        if more {
            self.cv.notify_one();
        }
        if let Err(e) = result {
            self.fail(e, None);
        }
    }

    /// Moves a slice to the in-flight list and builds its frame. Called with the sending
    /// token held, so in-flight order is wire order.
    fn prepare(&self, st: &mut ConnState, slice: Slice) -> WireReq {
        let id = st.next_id;
        st.next_id += 1;
        let (kind, payload) = match slice.op {
            Opcode::Read => (FrameKind::Read, None),
            Opcode::Write => (FrameKind::Write, slice.local.slice(0, slice.len()).ok()),
        };
        let head = Header::new(kind, id, slice.remote_addr, slice.len()).encode();
        if st.inflight.is_empty() {
            self.stamp();
        }
        st.inflight.push_back((id, slice));
        WireReq { head, payload }
    }

    fn write(&self, req: &WireReq) -> Result<(), Error> {
        self.write_all(std::slice::from_ref(req))
    }

    /// Sends frames with as few gathered writes as possible.
    fn write_all(&self, reqs: &[WireReq]) -> Result<(), Error> {
        let stream = self
            .stream
            .get()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "not connected"))?;
        let mut iov = Vec::with_capacity(reqs.len() * 2);
        let mut payload = 0u64;
        for r in reqs {
            iov.push(libc::iovec {
                iov_base: r.head.as_ptr() as *mut _,
                iov_len: HEADER_LEN,
            });
            if let Some(l) = &r.payload {
                iov.push(libc::iovec {
                    iov_base: l.as_ptr().cast(),
                    iov_len: l.len() as usize,
                });
                payload += l.len();
            }
        }
        let mut stall = ConnStall {
            conn: self,
            mid_frame: true,
        };
        // SAFETY: the iovecs point into `reqs`' headers and into ranges their leases keep
        // registered; `reqs` outlives the call.
        unsafe { sys::send_iovecs(stream.as_raw_fd(), &mut iov, &mut stall) }
            .map_err(|e| self.io_error("send", &e))?;
        if payload > 0 {
            let mut b = self
                .shared
                .stats
                .bytes_per_path
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            b[self.path] += payload;
        }
        Ok(())
    }

    fn io_error(&self, what: &str, e: &io::Error) -> Error {
        let peer = self
            .peer
            .upgrade()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        Error::io(&format!("{what} to segment {peer:?}"), e).with_context("path", self.path)
    }

    fn send_loop(self: &Arc<Self>) {
        loop {
            let reqs: Vec<WireReq> = {
                let mut st = self.lock();
                loop {
                    if st.dead {
                        return;
                    }
                    if !st.sending && !st.queue.is_empty() {
                        break;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.sending = true;
                let n = st.queue.len().min(64);
                let batch: Vec<Slice> = st.queue.drain(..n).collect();
                batch
                    .into_iter()
                    .map(|s| self.prepare(&mut st, s))
                    .collect()
            };
            let result = self.write_all(&reqs);
            drop(reqs);
            self.lock().sending = false;
            if let Err(e) = result {
                self.fail(e, None);
                return;
            }
        }
    }

    fn recv_loop(self: Arc<Self>, stream: TcpStream) {
        let mut rb = RecvBuf::new(stream.as_raw_fd(), crate::io::RECV_BUF);
        loop {
            let mut stall = ConnStall {
                conn: &self,
                mid_frame: rb.buffered() > 0,
            };
            let hdr = match rb.header(&mut stall) {
                Ok(h) => h,
                Err(e) => {
                    let err = self.io_error("receive", &e);
                    self.fail(err, None);
                    return;
                }
            };
            let h = match Header::decode(&hdr, self.shared.max_data) {
                Ok(h) => h,
                Err(e) => {
                    self.fail(
                        Error::new(ErrorKind::Protocol, format!("bad frame from peer: {e}")),
                        None,
                    );
                    return;
                }
            };
            let slice = {
                let mut st = self.lock();
                match st.inflight.front() {
                    Some((id, _)) if *id == h.request_id => st.inflight.pop_front().map(|(_, s)| s),
                    _ => None,
                }
            };
            let Some(slice) = slice else {
                let msg = format!("response {} matches no request in flight", h.request_id);
                self.fail(Error::new(ErrorKind::Protocol, msg), None);
                return;
            };
            let mut stall = ConnStall {
                conn: &self,
                mid_frame: true,
            };
            let outcome: Result<Result<(), Error>, Error> = match (h.kind, slice.op) {
                (FrameKind::ReadData, Opcode::Read) if h.len == slice.len() => {
                    // SAFETY: the slice's lease keeps its local range valid; `h.len` equals its length.
                    match unsafe { rb.payload(slice.local.as_ptr(), h.len as usize, &mut stall) } {
                        Ok(()) => {
                            let mut b = self
                                .shared
                                .stats
                                .bytes_per_path
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            b[self.path] += h.len;
                            Ok(Ok(()))
                        }
                        Err(e) => Err(self.io_error("receive", &e)),
                    }
                }
                (FrameKind::WriteAck, Opcode::Write) => Ok(Ok(())),
                (FrameKind::Error, _) => match rb.bytes(h.len as usize, &mut stall) {
                    Ok(msg) => {
                        let kind = if h.status == Status::OutOfRange {
                            ErrorKind::RemoteAccess
                        } else {
                            ErrorKind::Protocol
                        };
                        let peer = self
                            .peer
                            .upgrade()
                            .map(|p| p.name.clone())
                            .unwrap_or_default();
                        Ok(Err(Error::new(
                            kind,
                            format!(
                                "segment {peer:?} refused: {}",
                                String::from_utf8_lossy(&msg)
                            ),
                        )))
                    }
                    Err(e) => Err(self.io_error("receive", &e)),
                },
                (k, op) => Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "{k:?} frame of {} bytes in reply to a {op:?} of {}",
                        h.len,
                        slice.len()
                    ),
                )),
            };
            match outcome {
                Ok(result) => {
                    self.outstanding.fetch_sub(slice.len(), Ordering::Relaxed);
                    self.stamp();
                    slice.done.complete(result);
                }
                Err(e) => {
                    self.fail(e, Some(slice));
                    return;
                }
            }
        }
    }

    /// Marks the connection dead, closes the socket, and hands every unfinished slice (plus
    /// `extra`) back to the peer for a retry on another path or a failure.
    fn fail(self: &Arc<Self>, err: Error, extra: Option<Slice>) {
        let first = !self.dead.swap(true, Ordering::AcqRel);
        if let Some(s) = self.stream.get() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let mut slices: Vec<Slice> = extra.into_iter().collect();
        {
            let mut st = self.lock();
            st.dead = true;
            slices.extend(st.inflight.drain(..).map(|(_, s)| s));
            slices.extend(st.queue.drain(..));
        }
        self.cv.notify_all();
        for s in &slices {
            self.outstanding.fetch_sub(s.len(), Ordering::Relaxed);
        }
        if first && !matches!(err.kind(), ErrorKind::Closed) {
            warn!("tcp connection failed: {err}");
        }
        match self.peer.upgrade() {
            Some(p) if first || !slices.is_empty() => p.on_conn_failed(self, &err, slices),
            Some(_) => {}
            None => {
                for s in slices {
                    s.done.complete(Err(err.clone()));
                }
            }
        }
    }
}

/// Stall policy of a connection: idle waits are fine, but with work in flight the peer must
/// make progress within the timeout.
struct ConnStall<'a> {
    conn: &'a Conn,
    mid_frame: bool,
}

impl Stall for ConnStall<'_> {
    fn on_stall(&mut self) -> io::Result<()> {
        let c = self.conn;
        if c.dead.load(Ordering::Acquire) || c.shared.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed",
            ));
        }
        let busy = self.mid_frame || !c.lock().inflight.is_empty();
        let idle_ns = c
            .shared
            .now()
            .saturating_sub(c.last_progress.load(Ordering::Relaxed));
        if busy && idle_ns >= c.progress_timeout.as_nanos() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("peer made no progress for {:?}", c.progress_timeout),
            ));
        }
        Ok(())
    }

    fn on_progress(&mut self, _bytes: usize) {
        self.mid_frame = true;
        self.conn.stamp();
    }
}
