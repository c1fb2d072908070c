//! The target side: listeners and target connections, driven by the I/O loops.
//!
//! Every requested range is checked against the registry (and its access rights) before a
//! byte is touched; payloads move straight between the socket and registered memory.
//!
//! A connection starts in the listener's loop, reads the hello, and moves to the next loop
//! in turn, so that an initiator's connections (and their payload copies) spread over every
//! loop. There it registers in the transport's fence table: a hello with a higher epoch than
//! the initiator used before closes the initiator's older connections — on this loop at once,
//! on other loops through a command to each — and is acknowledged only when every one of
//! them is closed: a write retried after a failure is applied only after every older
//! attempt's connection is gone.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mooncake_core::{BufferRegistry, Region, RegionLease, Requester};
use tracing::{debug, warn};

use crate::io::{
    Body, Dest, Link, OutFrame, Progress, RECV_BUF, RecvBuf, Sink, recv_payload, send_frames,
};
use crate::reactor::{Cx, Entry, LoopHandle, Next, Reactor, Token};
use crate::staging::{self, StagedIn};
use crate::sys::{self, Io};
use crate::tls::{Tls, TlsConfig};
use crate::wire::{self, FrameKind, Header, Hello, MAX_CONTROL_PAYLOAD, Status};

/// Shared state of the target side of one transport.
pub(crate) struct ServerShared {
    /// Identifies the transport in the loops' tables.
    pub(crate) id: u64,
    pub(crate) registry: Arc<BufferRegistry>,
    pub(crate) local_name: String,
    pub(crate) generation: u64,
    /// No progress for this long, with a frame under way, closes the connection.
    pub(crate) timeout: Duration,
    /// The slowest rate a frame may arrive at before its whole-frame deadline.
    pub(crate) min_rate: u64,
    /// An idle connection (no frame for this long) is closed.
    pub(crate) idle_timeout: Duration,
    pub(crate) max_data: u64,
    pub(crate) max_conns: usize,
    pub(crate) conns: AtomicUsize,
    pub(crate) closed: AtomicBool,
    pub(crate) socket_buffer: Option<usize>,
    /// Initiators must prove they hold it before anything else happens.
    pub(crate) secret: Option<mooncake_core::ClusterSecret>,
    /// Every connection speaks TLS under its frames (see `tls`).
    pub(crate) tls: Option<Arc<TlsConfig>>,
    /// The connections of every initiator and the highest epoch each used.
    pub(crate) fences: Mutex<HashMap<FenceKey, Fence>>,
}

/// Who a target connection serves: (initiator name, its generation).
pub(crate) type FenceKey = (String, u64);

/// The connections of one initiator and the highest epoch it used.
#[derive(Default)]
pub(crate) struct Fence {
    max_epoch: u64,
    conns: Vec<ConnRef>,
}

/// Where a registered connection lives.
struct ConnRef {
    lp: Arc<LoopHandle>,
    token: Token,
    epoch: u64,
}

impl ConnRef {
    fn is(&self, lp: &LoopHandle, token: Token) -> bool {
        self.lp.index == lp.index && self.token == token
    }
}

impl ServerShared {
    fn fences(&self) -> MutexGuard<'_, HashMap<FenceKey, Fence>> {
        self.fences.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The deadline of a frame of `len` payload bytes that starts now.
    pub(crate) fn frame_deadline(&self, now: Instant, len: u64) -> Instant {
        now + self.timeout + Duration::from_secs_f64(len as f64 / self.min_rate as f64)
    }
}

/// Responses queued beyond this many bytes stop the reading of new requests until they
/// drain (the initiator is then held back by TCP flow control).
const MAX_OUT_BYTES: u64 = 64 << 20;
/// Bytes a connection may move per loop turn before yielding to others.
const BUDGET: u64 = 4 << 20;
/// Initiators remembered per transport (with their highest epoch) before idle ones are
/// dropped.
const MAX_FENCES: usize = 16_384;

/// A listening socket in a loop.
pub(crate) struct ListenerIo {
    listener: TcpListener,
    shared: Arc<ServerShared>,
}

impl ListenerIo {
    pub(crate) fn new(listener: TcpListener, shared: Arc<ServerShared>) -> Self {
        Self { listener, shared }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub(crate) fn shared(&self) -> &Arc<ServerShared> {
        &self.shared
    }

    pub(crate) fn on_event(&mut self, cx: &mut Cx<'_>) -> Next {
        if self.shared.closed.load(Ordering::Acquire) {
            return Next::Close;
        }
        for _ in 0..256 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Next::Idle,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; try again on
                    // the next tick rather than spinning.
                    warn!("tcp accept failed: {e}");
                    return Next::Idle;
                }
            };
            if self.shared.conns.load(Ordering::Acquire) >= self.shared.max_conns {
                debug!("tcp target at its connection cap: refusing a connection");
                let s = socket2::Socket::from(stream);
                sys::abort(&s);
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let sock = socket2::Socket::from(stream);
            let _ = sock.set_tcp_nodelay(true);
            if let Some(size) = self.shared.socket_buffer {
                let _ = sock.set_send_buffer_size(size);
                let _ = sock.set_recv_buffer_size(size);
            }
            let tls = match self.shared.tls.as_ref().map(|c| c.accept()) {
                None => None,
                Some(Ok(t)) => Some(Box::new(t)),
                Some(Err(e)) => {
                    warn!("tcp target cannot start TLS on a connection: {e}");
                    sys::abort(&sock);
                    continue;
                }
            };
            self.shared.conns.fetch_add(1, Ordering::AcqRel);
            let conn = ServerConn::new(sock, tls, self.shared.clone(), cx.now);
            if let Err(e) = cx.add(Entry::Server(Box::new(conn)), true) {
                warn!("tcp target cannot watch a connection: {e}");
            }
        }
        Next::More
    }
}

enum Phase {
    /// Waiting for the hello (until the deadline).
    Hello { deadline: Instant },
    /// The hello was answered with a challenge; waiting for the initiator's proof.
    Proving {
        hello: Hello,
        nonce: [u8; mooncake_core::auth::NONCE_LEN],
        deadline: Instant,
    },
    /// The hello was read (and proven); the connection is moving to its loop.
    Moving(Hello),
    /// Registered under a newer epoch: waiting until the initiator's older connections on
    /// other loops are closed, then acknowledged (nothing is read meanwhile).
    Fencing { deadline: Instant },
    /// Serving requests.
    Ready,
}

enum Recv {
    /// Between frames.
    Header,
    /// The hello's payload.
    Hello {
        head: Header,
        buf: Vec<u8>,
        sink: Sink,
    },
    /// A write's payload, landing in `lease` (through pinned chunks when it is device
    /// memory).
    Write {
        id: u64,
        lease: RegionLease,
        sink: Sink,
        deadline: Instant,
        staged: Option<StagedIn>,
    },
    /// The initiator's proof.
    Proof { buf: Vec<u8>, sink: Sink },
    /// A refused write's payload, dropped; then `msg` is sent back.
    Discard {
        id: u64,
        sink: Sink,
        msg: String,
        deadline: Instant,
    },
}

/// One target connection.
pub(crate) struct ServerConn {
    sock: socket2::Socket,
    tls: Option<Box<Tls>>,
    shared: Arc<ServerShared>,
    rb: RecvBuf,
    phase: Phase,
    recv: Recv,
    out: VecDeque<OutFrame>,
    out_bytes: u64,
    /// The socket is full; the next writable edge resumes sending.
    blocked: bool,
    /// The next response waits for a device copy (which wakes the connection).
    device_wait: bool,
    /// Closed by a newer epoch of the same initiator: handle nothing more.
    fenced: bool,
    fence: Option<FenceKey>,
    last_activity: Instant,
    last_progress: Instant,
    /// An error was sent; close once the queue is flushed.
    closing: bool,
}

fn error_frame(id: u64, status: Status, msg: &str) -> OutFrame {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_CONTROL_PAYLOAD as usize)];
    let mut h = Header::new(FrameKind::Error, id, 0, msg.len() as u64);
    h.status = status;
    OutFrame::new(h.encode(), Body::Owned(msg.to_vec()))
}

fn hello_ack(generation: u64) -> OutFrame {
    OutFrame::new(
        Header::new(FrameKind::HelloAck, 0, generation, 0).encode(),
        Body::None,
    )
}

/// Closes the connection `token` of this loop because a newer epoch of its initiator
/// arrived: it handles nothing more, and its leases are dropped before this returns.
fn fence_close(cx: &mut Cx<'_>, token: Token) {
    if let Some(Entry::Server(s)) = cx.get(token) {
        s.fence_off();
        s.fence = None;
    }
    cx.close_now(token);
}

/// Every older connection of the initiator of `token` (on this loop) is closed: acknowledge
/// its hello and read what waited.
fn fence_done(cx: &mut Cx<'_>, token: Token) {
    if let Some(Entry::Server(s)) = cx.get(token)
        && matches!(s.phase, Phase::Fencing { .. })
    {
        s.phase = Phase::Ready;
        s.push(hello_ack(s.shared.generation));
        cx.wake(token);
    }
}

impl ServerConn {
    fn new(
        sock: socket2::Socket,
        tls: Option<Box<Tls>>,
        shared: Arc<ServerShared>,
        now: Instant,
    ) -> Self {
        Self {
            tls,
            phase: Phase::Hello {
                deadline: now + shared.timeout,
            },
            sock,
            shared,
            rb: RecvBuf::new(RECV_BUF),
            recv: Recv::Header,
            out: VecDeque::new(),
            out_bytes: 0,
            blocked: false,
            device_wait: false,
            fenced: false,
            fence: None,
            last_activity: now,
            last_progress: now,
            closing: false,
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn link(&self) -> Link<'_> {
        Link {
            fd: self.sock.as_raw_fd(),
            tls: self.tls.as_deref(),
        }
    }

    /// The TLS session's channel binding (empty without TLS), which proofs cover.
    fn binding(&self) -> std::io::Result<Vec<u8>> {
        match &self.tls {
            Some(t) => Ok(t.binding()?.to_vec()),
            None => Ok(Vec::new()),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<ServerShared> {
        &self.shared
    }

    /// Marks the connection as closed by fencing: it handles nothing more.
    pub(crate) fn fence_off(&mut self) {
        self.fenced = true;
    }

    fn push(&mut self, f: OutFrame) {
        self.out_bytes += f.total();
        self.out.push_back(f);
    }

    /// Sends what is queued, as far as the socket allows. Returns false on a broken socket.
    fn flush(&mut self) -> bool {
        if self.blocked {
            return true;
        }
        if self.out.is_empty() {
            // TLS records still queued from the last send go out now.
            return match self.link().flush() {
                Ok(done) => {
                    self.blocked = !done;
                    true
                }
                Err(e) => {
                    debug!("tcp target send failed: {e}");
                    false
                }
            };
        }
        let link = Link {
            fd: self.sock.as_raw_fd(),
            tls: self.tls.as_deref(),
        };
        match send_frames(link, &mut self.out, BUDGET) {
            Ok(s) => {
                if s.bytes > 0 {
                    self.last_progress = Instant::now();
                }
                self.out_bytes = self.out.iter().map(|f| f.total() - f.written).sum();
                self.blocked = s.would_block;
                self.device_wait = s.waiting;
                true
            }
            Err(e) => {
                debug!("tcp target send failed: {e}");
                false
            }
        }
    }

    pub(crate) fn on_event(&mut self, cx: &mut Cx<'_>, _readable: bool, writable: bool) -> Next {
        if self.fenced || self.shared.closed.load(Ordering::Acquire) {
            return Next::Close;
        }
        if let Phase::Moving(_) = self.phase {
            // Arrived at its loop.
            let Phase::Moving(hello) = std::mem::replace(&mut self.phase, Phase::Ready) else {
                unreachable!()
            };
            if !self.accept_hello(cx, hello) {
                return self.close_after_flush();
            }
        }
        if let Phase::Fencing { .. } = self.phase {
            // Requests wait in the socket until the fence is done (`fence_done` wakes us).
            return Next::Idle;
        }
        if writable {
            self.blocked = false;
        }
        if !self.flush() {
            return Next::Close;
        }
        if self.closing {
            return if self.out.is_empty() && !self.blocked {
                Next::Close
            } else {
                Next::Idle
            };
        }
        let mut moved = 0u64;
        loop {
            if self.out_bytes > MAX_OUT_BYTES {
                // Let the responses drain first; the writable edge (or the device copy they
                // wait for) brings us back.
                return if self.blocked || self.device_wait {
                    Next::Idle
                } else {
                    Next::More
                };
            }
            if moved >= BUDGET {
                let _ = self.flush();
                return Next::More;
            }
            match self.step(cx, &mut moved) {
                Ok(Step::Continue) => {}
                Ok(Step::Blocked) => break,
                Ok(Step::Move(to)) => return Next::Move(to),
                Ok(Step::Close) => return self.close_after_flush(),
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        debug!("tcp target connection failed: {e}");
                    }
                    return Next::Close;
                }
            }
        }
        if !self.flush() {
            return Next::Close;
        }
        Next::Idle
    }

    fn close_after_flush(&mut self) -> Next {
        self.closing = true;
        let _ = self.flush();
        if self.out.is_empty() && !self.blocked {
            Next::Close
        } else {
            Next::Idle
        }
    }

    fn step(&mut self, cx: &mut Cx<'_>, moved: &mut u64) -> std::io::Result<Step> {
        let fd = Link {
            fd: self.sock.as_raw_fd(),
            tls: self.tls.as_deref(),
        };
        match &mut self.recv {
            Recv::Header => {
                let Some(raw) = self.rb.take_header() else {
                    return match self.rb.fill(fd)? {
                        Io::Done(_) => {
                            self.last_progress = cx.now;
                            Ok(Step::Continue)
                        }
                        Io::WouldBlock => Ok(Step::Blocked),
                        Io::Eof => Err(std::io::ErrorKind::UnexpectedEof.into()),
                    };
                };
                self.last_activity = cx.now;
                self.last_progress = cx.now;
                let h = match Header::decode(&raw, self.shared.max_data) {
                    Ok(h) => h,
                    Err(e) => {
                        // The stream can't be trusted past a bad header: say why, then close.
                        self.push(error_frame(0, Status::BadRequest, &e.to_string()));
                        return Ok(Step::Close);
                    }
                };
                self.on_header(cx, h)
            }
            Recv::Hello { buf, sink, .. } => {
                match recv_payload(fd, &mut self.rb, sink, Dest::Vec(buf), u64::MAX, moved)? {
                    Progress::Done => {}
                    _ => return Ok(Step::Blocked),
                }
                let Recv::Hello { head, buf, .. } = std::mem::replace(&mut self.recv, Recv::Header)
                else {
                    unreachable!()
                };
                self.on_hello(cx, head, &buf)
            }
            Recv::Proof { buf, sink } => {
                match recv_payload(fd, &mut self.rb, sink, Dest::Vec(buf), u64::MAX, moved)? {
                    Progress::Done => {}
                    _ => return Ok(Step::Blocked),
                }
                let Recv::Proof { buf, .. } = std::mem::replace(&mut self.recv, Recv::Header)
                else {
                    unreachable!()
                };
                let Phase::Proving { hello, nonce, .. } =
                    std::mem::replace(&mut self.phase, Phase::Ready)
                else {
                    unreachable!("a proof is only read while proving")
                };
                let secret = self
                    .shared
                    .secret
                    .as_ref()
                    .expect("proving implies a secret");
                if !wire::verify(
                    secret,
                    wire::INITIATOR_ROLE,
                    &hello,
                    self.shared.generation,
                    &nonce,
                    &self.binding()?,
                    &buf,
                ) {
                    warn!(
                        initiator = %hello.initiator,
                        "tcp target refused an initiator that did not prove the cluster secret"
                    );
                    self.push(error_frame(0, Status::WrongSegment, "wrong cluster secret"));
                    return Ok(Step::Close);
                }
                self.proven(cx, hello)
            }
            Recv::Write {
                lease,
                sink,
                staged,
                ..
            } => {
                let dest = match staged.as_mut() {
                    Some(s) => Dest::Staged(s),
                    None => Dest::Lease(lease),
                };
                let p = recv_payload(fd, &mut self.rb, sink, dest, BUDGET, moved)?;
                self.last_progress = cx.now;
                match p {
                    Progress::Done => {}
                    Progress::Blocked => return Ok(Step::Blocked),
                    Progress::Budget => return Ok(Step::Continue),
                }
                let Recv::Write {
                    id, lease, staged, ..
                } = std::mem::replace(&mut self.recv, Recv::Header)
                else {
                    unreachable!()
                };
                drop(lease);
                self.last_progress = cx.now;
                let ack = OutFrame::new(
                    Header::new(FrameKind::WriteAck, id, 0, 0).encode(),
                    Body::None,
                );
                // A write into device memory is acknowledged once its last chunk is there.
                self.push(match staged {
                    Some(s) => {
                        let gate = s.into_copy();
                        let wake = loop_waker(cx);
                        gate.on_done(move |_| wake());
                        ack.gated(gate)
                    }
                    None => ack,
                });
                Ok(Step::Continue)
            }
            Recv::Discard { sink, .. } => {
                let p = recv_payload(fd, &mut self.rb, sink, Dest::Discard, BUDGET, moved)?;
                self.last_progress = cx.now;
                match p {
                    Progress::Done => {}
                    Progress::Blocked => return Ok(Step::Blocked),
                    Progress::Budget => return Ok(Step::Continue),
                }
                let Recv::Discard { id, msg, .. } = std::mem::replace(&mut self.recv, Recv::Header)
                else {
                    unreachable!()
                };
                self.push(error_frame(id, Status::OutOfRange, &msg));
                Ok(Step::Continue)
            }
        }
    }

    fn on_header(&mut self, cx: &mut Cx<'_>, h: Header) -> std::io::Result<Step> {
        match (&self.phase, h.kind) {
            (Phase::Hello { .. }, FrameKind::Hello) => {
                self.recv = Recv::Hello {
                    head: h,
                    buf: Vec::with_capacity(h.len as usize),
                    sink: Sink { got: 0, len: h.len },
                };
                Ok(Step::Continue)
            }
            (Phase::Hello { .. }, _) => {
                self.push(error_frame(
                    h.request_id,
                    Status::BadRequest,
                    "expected a hello frame first",
                ));
                Ok(Step::Close)
            }
            (Phase::Proving { .. }, FrameKind::Proof)
                if h.len == mooncake_core::auth::PROOF_LEN as u64 =>
            {
                self.recv = Recv::Proof {
                    buf: Vec::with_capacity(h.len as usize),
                    sink: Sink { got: 0, len: h.len },
                };
                Ok(Step::Continue)
            }
            (Phase::Proving { .. }, _) => {
                self.push(error_frame(
                    h.request_id,
                    Status::BadRequest,
                    "expected the proof of the cluster secret",
                ));
                Ok(Step::Close)
            }
            (Phase::Ready, FrameKind::Read) => {
                match self
                    .shared
                    .registry
                    .lease(h.addr, h.len, Requester::RemoteRead)
                    .and_then(|lease| staging::body(lease, || loop_waker(cx)))
                {
                    Ok(body) => self.push(OutFrame::new(
                        Header::new(FrameKind::ReadData, h.request_id, h.addr, h.len).encode(),
                        body,
                    )),
                    Err(e) => self.push(error_frame(
                        h.request_id,
                        Status::OutOfRange,
                        &e.to_string(),
                    )),
                }
                Ok(Step::Continue)
            }
            (Phase::Ready, FrameKind::Write) => {
                let deadline = self.shared.frame_deadline(cx.now, h.len);
                let sink = Sink { got: 0, len: h.len };
                self.recv = match self
                    .shared
                    .registry
                    .lease(h.addr, h.len, Requester::RemoteWrite)
                    .and_then(|lease| {
                        let staged = staging::receiver(&lease, || loop_waker(cx))?;
                        Ok((lease, staged))
                    }) {
                    Ok((lease, staged)) => Recv::Write {
                        id: h.request_id,
                        lease,
                        sink,
                        deadline,
                        staged,
                    },
                    Err(e) => Recv::Discard {
                        id: h.request_id,
                        sink,
                        msg: e.to_string(),
                        deadline,
                    },
                };
                Ok(Step::Continue)
            }
            (_, other) => {
                let msg = format!("unexpected {other:?} frame from a client");
                self.push(error_frame(h.request_id, Status::BadRequest, &msg));
                Ok(Step::Close)
            }
        }
    }

    fn on_hello(&mut self, cx: &mut Cx<'_>, head: Header, payload: &[u8]) -> std::io::Result<Step> {
        let hello = match Hello::decode(payload) {
            Ok(h) => h,
            Err(e) => {
                self.push(error_frame(
                    head.request_id,
                    Status::BadRequest,
                    &e.to_string(),
                ));
                return Ok(Step::Close);
            }
        };
        if hello.target != self.shared.local_name
            || (head.addr != 0 && head.addr != self.shared.generation)
        {
            let msg = format!(
                "this is segment {:?} generation {}, not {:?} generation {}",
                self.shared.local_name, self.shared.generation, hello.target, head.addr
            );
            self.push(error_frame(head.request_id, Status::WrongSegment, &msg));
            return Ok(Step::Close);
        }
        if let Some(secret) = &self.shared.secret {
            // Prove ourselves and ask for the initiator's proof before anything changes.
            let nonce = mooncake_core::auth::nonce();
            let proof = wire::proof(
                secret,
                wire::TARGET_ROLE,
                &hello,
                self.shared.generation,
                &nonce,
                &self.binding()?,
            );
            let mut payload = nonce.to_vec();
            payload.extend_from_slice(&proof);
            self.push(OutFrame::new(
                Header::new(
                    FrameKind::Challenge,
                    0,
                    self.shared.generation,
                    payload.len() as u64,
                )
                .encode(),
                Body::Owned(payload),
            ));
            let deadline = match self.phase {
                Phase::Hello { deadline } => deadline,
                _ => cx.now + self.shared.timeout,
            };
            self.phase = Phase::Proving {
                hello,
                nonce,
                deadline,
            };
            return Ok(Step::Continue);
        }
        self.proven(cx, hello)
    }

    /// The initiator is who it says (or no secret is configured): move to the next loop in
    /// turn, or register it here.
    fn proven(&mut self, cx: &mut Cx<'_>, hello: Hello) -> std::io::Result<Step> {
        let reactor = Reactor::global()?;
        let home = reactor.next();
        if home.index != cx.handle.index {
            self.phase = Phase::Moving(hello);
            return Ok(Step::Move(home.clone()));
        }
        self.phase = Phase::Ready;
        Ok(if self.accept_hello(cx, hello) {
            Step::Continue
        } else {
            Step::Close
        })
    }

    /// Registers the connection under its initiator in the fence table and acknowledges it,
    /// once the initiator's older-epoch connections are closed: those on this loop at once,
    /// those on other loops by a command to each (the acknowledgement then waits in
    /// `Phase::Fencing` until the last one ran). False if the epoch is stale.
    fn accept_hello(&mut self, cx: &mut Cx<'_>, hello: Hello) -> bool {
        let key: FenceKey = (hello.initiator, hello.initiator_generation);
        let me = cx.current;
        let mut older = Vec::new();
        {
            let mut fences = self.shared.fences();
            let fence = fences.entry(key.clone()).or_default();
            if hello.epoch < fence.max_epoch {
                let msg = format!(
                    "epoch {} is older than {} already used by this initiator",
                    hello.epoch, fence.max_epoch
                );
                drop(fences);
                self.push(error_frame(0, Status::WrongSegment, &msg));
                return false;
            }
            if hello.epoch > fence.max_epoch {
                fence.max_epoch = hello.epoch;
                let (old, keep): (Vec<_>, Vec<_>) =
                    fence.conns.drain(..).partition(|c| c.epoch < hello.epoch);
                fence.conns = keep;
                older = old;
            }
            fence.conns.push(ConnRef {
                lp: cx.handle.clone(),
                token: me,
                epoch: hello.epoch,
            });
        }
        self.fence = Some(key);
        let (here, elsewhere): (Vec<_>, Vec<_>) = older
            .into_iter()
            .partition(|c| c.lp.index == cx.handle.index);
        for c in here {
            fence_close(cx, c.token);
        }
        if elsewhere.is_empty() {
            self.push(hello_ack(self.shared.generation));
            return true;
        }
        self.phase = Phase::Fencing {
            deadline: cx.now + self.shared.timeout,
        };
        let pending = Arc::new(AtomicUsize::new(elsewhere.len()));
        let home = cx.handle.clone();
        for c in elsewhere {
            let pending = pending.clone();
            let home = home.clone();
            c.lp.post(move |cx| {
                fence_close(cx, c.token);
                if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    home.post(move |cx| fence_done(cx, me));
                }
            });
        }
        true
    }

    pub(crate) fn on_tick(&mut self, _cx: &mut Cx<'_>, now: Instant) -> Next {
        if self.fenced || self.shared.closed.load(Ordering::Acquire) {
            return Next::Close;
        }
        let late = match (&self.phase, &self.recv) {
            (
                Phase::Hello { deadline }
                | Phase::Proving { deadline, .. }
                | Phase::Fencing { deadline },
                _,
            ) => now >= *deadline,
            (_, Recv::Write { deadline, .. } | Recv::Discard { deadline, .. }) => now >= *deadline,
            _ => false,
        };
        let mid_frame = !matches!(self.recv, Recv::Header) || self.rb.buffered() > 0;
        let stalled = (mid_frame || !self.out.is_empty())
            && now.duration_since(self.last_progress) >= self.shared.timeout;
        let idle = matches!(self.phase, Phase::Ready)
            && !mid_frame
            && self.out.is_empty()
            && now.duration_since(self.last_activity) >= self.shared.idle_timeout;
        if late || stalled || idle {
            debug!(late, stalled, idle, "tcp target closes a connection");
            return Next::Close;
        }
        if self.closing && self.out.is_empty() {
            return Next::Close;
        }
        Next::Idle
    }

    /// Revokes access to `region`: a write landing in it is discarded from here on (its
    /// initiator gets an error), queued reads of it become errors; a response already half
    /// sent from it cannot be withdrawn, so the connection closes. Returns false to close.
    pub(crate) fn revoke(&mut self, region: &Arc<Region>) -> bool {
        if let Recv::Write { lease, .. } = &self.recv
            && Arc::ptr_eq(lease.region(), region)
        {
            let Recv::Write {
                id, sink, deadline, ..
            } = std::mem::replace(&mut self.recv, Recv::Header)
            else {
                unreachable!()
            };
            self.recv = Recv::Discard {
                id,
                sink,
                msg: format!(
                    "region {:#x} was unregistered during the write",
                    region.base()
                ),
                deadline,
            };
        }
        let mut keep = true;
        for f in self.out.iter_mut() {
            let hit = f
                .body
                .lease()
                .is_some_and(|l| Arc::ptr_eq(l.region(), region));
            if !hit {
                continue;
            }
            if f.started() {
                keep = false;
                break;
            }
            let id = Header::decode(&f.head, u64::MAX).map_or(0, |h| h.request_id);
            *f = error_frame(
                id,
                Status::OutOfRange,
                &format!("region {:#x} was unregistered", region.base()),
            );
        }
        if !keep {
            self.out.clear();
        }
        self.out_bytes = self.out.iter().map(|f| f.total() - f.written).sum();
        keep
    }

    pub(crate) fn on_close(self, cx: &mut Cx<'_>) {
        if let Some(key) = &self.fence {
            let mut fences = self.shared.fences();
            if let Some(f) = fences.get_mut(key) {
                let me = cx.current;
                f.conns.retain(|c| !c.is(cx.handle, me));
            }
            // An initiator's highest epoch is kept after its connections close (a late hello
            // with an older epoch is still refused); initiators with no connection left are
            // forgotten only when the table grows large.
            if fences.len() > MAX_FENCES {
                fences.retain(|_, f| !f.conns.is_empty());
            }
        }
        sys::abort(&self.sock);
        self.shared.conns.fetch_sub(1, Ordering::AcqRel);
        // Dropping `self` drops every lease it holds, on this loop thread.
    }
}

/// Wakes the connection being handled in `cx` from another thread (a device copy finished).
fn loop_waker(cx: &Cx<'_>) -> staging::Waker {
    let (lp, token) = (cx.handle.clone(), cx.current);
    Arc::new(move || lp.post(move |cx| cx.wake(token)))
}

enum Step {
    Continue,
    Blocked,
    Move(Arc<crate::reactor::LoopHandle>),
    Close,
}
