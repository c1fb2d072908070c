//! The handshake reactor: one thread (`mooncake-rdma-handshake`) that runs every handshake of
//! a transport, both directions, on non-blocking sockets.
//!
//! - **Server**: the listener accepts, sends a [`Hello`] and reads one [`Request`] frame;
//!   many connections are served at once (at most [`Limits::max_conns`]; a connection beyond
//!   that closes the oldest one of the address holding the most, so one host's flood churns
//!   only its own), and each must deliver its whole request and take its reply within
//!   [`Limits::frame_deadline`] of being accepted. A client that trickles bytes only
//!   holds its own slot until that deadline. The [`Serve`] implementation answers.
//! - **Client**: NIC workers submit [`Job`]s (connect or fetch keys); each runs with its own
//!   deadline, and its outcome is handed to the job's callback. A slow or blackholed peer only
//!   delays its own jobs: the workers never wait on the network. With a cluster secret the
//!   client proves it in the request and accepts only a reply that proves it back for this
//!   request (see [`crate::wire`]); anything else fails the job.
//!
//! Host names are resolved on a separate resolver thread (a stuck DNS lookup delays only
//! jobs to names, each still bounded by its deadline); numeric addresses never wait on it.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{ClusterSecret, Error, ErrorKind, Result};

use crate::sys::{self, EventFd, PollFd};
use crate::wire::{self, FrameReader, Hello, Reply, Request};

/// Answers handshake requests (the passive side of the transport).
pub(crate) trait Serve: Send + Sync + 'static {
    /// Answers one request from `peer`, to whom challenge `nonce` was sent. Implementations
    /// check the request (version, nonce, proof of the cluster secret) before changing any
    /// state.
    fn serve(&self, req: Request, peer: SocketAddr, nonce: &str) -> Reply;

    /// Called about once a second.
    fn tick(&self, _now: Instant) {}
}

/// Bounds of the server side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// An accepted connection must deliver its request and take its reply within this.
    pub frame_deadline: Duration,
    /// Connections served at once; accepting one more closes the oldest of the address that
    /// holds the most.
    pub max_conns: usize,
}

/// The outcome callback of a [`Job`]; it runs on the reactor thread and must not block.
pub(crate) type Done = Box<dyn FnOnce(Result<Reply>) + Send>;

/// One client handshake: send `request` to the listener at `addr` and hand the reply (or the
/// failure) to `done`, by `deadline`.
pub(crate) struct Job {
    /// `host:port` of the peer's listener.
    pub addr: String,
    /// The request; its nonce is filled in from the peer's [`Hello`].
    pub request: Request,
    /// The whole exchange (resolve, connect, hello, request, reply) ends by then.
    pub deadline: Instant,
    /// Receives the reply or the error.
    pub done: Done,
}

/// Submits client jobs to the reactor.
#[derive(Clone)]
pub(crate) struct Client {
    tx: Sender<Job>,
    efd: Arc<EventFd>,
}

impl Client {
    /// Queues `job`; if the reactor is gone the job fails at once.
    pub fn submit(&self, job: Job) {
        match self.tx.send(job) {
            Ok(()) => self.efd.notify(),
            Err(mpsc::SendError(job)) => (job.done)(Err(Error::new(
                ErrorKind::Closed,
                "the RDMA handshake thread has stopped",
            ))),
        }
    }
}

/// The running reactor thread.
pub(crate) struct Reactor {
    stop: Arc<AtomicBool>,
    efd: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Reactor {
    /// Starts the thread serving `listener` with `serve`; client jobs prove `secret`, if
    /// any, and require the peer to prove it too.
    pub fn start(
        listener: TcpListener,
        serve: Arc<dyn Serve>,
        limits: Limits,
        secret: Option<ClusterSecret>,
    ) -> Result<(Self, Client)> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("handshake listener O_NONBLOCK", &e))?;
        let efd = Arc::new(EventFd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let mut l = Loop {
            listener,
            serve,
            limits,
            secret,
            jobs: rx,
            efd: efd.clone(),
            stop: stop.clone(),
            server: VecDeque::new(),
            clients: Vec::new(),
            resolver: None,
            next_id: 0,
            accept_paused_until: None,
        };
        let thread = std::thread::Builder::new()
            .name("mooncake-rdma-handshake".into())
            .spawn(move || l.run())
            .map_err(|e| Error::io("spawn RDMA handshake thread", &e))?;
        Ok((
            Self {
                stop,
                efd: efd.clone(),
                thread: Some(thread),
            },
            Client { tx, efd },
        ))
    }

    /// Stops the thread and waits for it (unless called on it). Pending client jobs fail
    /// with [`ErrorKind::Closed`]; server connections are closed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.efd.notify();
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.stop();
    }
}

struct ServerConn {
    stream: TcpStream,
    peer: SocketAddr,
    nonce: String,
    deadline: Instant,
    reader: Option<FrameReader>,
    out: Vec<u8>,
    out_pos: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Resolving,
    Connecting,
    Hello,
    Sending,
    Reply,
}

struct ClientConn {
    id: u64,
    addr: String,
    /// Our nonce (hex), which the reply's proof must cover.
    cnonce: String,
    /// Resolved addresses not tried yet (a refused connect moves on to the next).
    more: VecDeque<SocketAddr>,
    stream: Option<TcpStream>,
    stage: Stage,
    request: Request,
    reader: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
    deadline: Instant,
    done: Option<Done>,
}

struct Resolver {
    tx: Sender<(u64, String)>,
    rx: Receiver<(u64, std::io::Result<Vec<SocketAddr>>)>,
}

struct Loop {
    listener: TcpListener,
    serve: Arc<dyn Serve>,
    limits: Limits,
    secret: Option<ClusterSecret>,
    jobs: Receiver<Job>,
    efd: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    server: VecDeque<ServerConn>,
    clients: Vec<ClientConn>,
    resolver: Option<Resolver>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
}

const TICK: Duration = Duration::from_secs(1);
const MAX_ACCEPTS_PER_WAKE: usize = 256;

enum Progress {
    Pending,
    Done,
    Failed(Error),
}

impl Loop {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + TICK;
        let mut fds: Vec<PollFd> = Vec::new();
        // Which connection each poll entry (after the first two) belongs to.
        let mut owners: Vec<(bool, usize)> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            self.take_jobs();
            self.take_resolved();
            let now = Instant::now();
            if now >= next_tick {
                self.serve.tick(now);
                next_tick = now + TICK;
            }
            self.expire(now);

            fds.clear();
            owners.clear();
            fds.push(PollFd::new(self.efd.fd(), true, false));
            let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
            fds.push(PollFd::new(self.listener.as_raw_fd(), accepting, false));
            for (i, c) in self.server.iter().enumerate() {
                let write = c.out_pos < c.out.len();
                fds.push(PollFd::new(c.stream.as_raw_fd(), c.reader.is_some(), write));
                owners.push((true, i));
            }
            for (i, c) in self.clients.iter().enumerate() {
                let Some(s) = &c.stream else { continue };
                let (r, w) = match c.stage {
                    Stage::Resolving => continue,
                    Stage::Connecting | Stage::Sending => (false, true),
                    Stage::Hello | Stage::Reply => (true, false),
                };
                fds.push(PollFd::new(s.as_raw_fd(), r, w));
                owners.push((false, i));
            }
            let mut wake = next_tick;
            for d in self
                .server
                .iter()
                .map(|c| c.deadline)
                .chain(self.clients.iter().map(|c| c.deadline))
            {
                wake = wake.min(d);
            }
            if let Some(t) = self.accept_paused_until {
                wake = wake.min(t);
            }
            let ms = wake
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(1000) as i32;
            sys::poll_fds(&mut fds, ms.max(1));
            if fds[0].readable() {
                self.efd.drain();
            }
            if !accepting {
                if self
                    .accept_paused_until
                    .is_some_and(|t| Instant::now() >= t)
                {
                    self.accept_paused_until = None;
                }
            } else if fds[1].readable() {
                self.accept();
            }
            // Progress connections; collect finished ones (indices stay valid until removal).
            let mut server_done = Vec::new();
            let mut client_done = Vec::new();
            for (p, &(is_server, i)) in fds[2..].iter().zip(owners.iter()) {
                if !(p.readable() || p.writable()) {
                    continue;
                }
                if is_server {
                    if self.progress_server(i) {
                        server_done.push(i);
                    }
                } else {
                    match self.progress_client(i) {
                        Progress::Pending => {}
                        Progress::Done => client_done.push((i, None)),
                        Progress::Failed(e) => client_done.push((i, Some(e))),
                    }
                }
            }
            for i in server_done.into_iter().rev() {
                self.server.remove(i);
            }
            client_done.sort_by_key(|(i, _)| *i);
            for (i, err) in client_done.into_iter().rev() {
                let mut c = self.clients.swap_remove(i);
                if let Some(e) = err {
                    finish(&mut c, Err(e));
                }
            }
        }
        for mut c in self.clients.drain(..) {
            finish(
                &mut c,
                Err(Error::new(ErrorKind::Closed, "RDMA transport is shut down")),
            );
        }
        self.server.clear();
    }

    fn take_jobs(&mut self) {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.start_job(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    fn start_job(&mut self, job: Job) {
        self.next_id += 1;
        let mut c = ClientConn {
            id: self.next_id,
            addr: job.addr,
            cnonce: wire::hex(&mooncake_core::auth::nonce()),
            more: VecDeque::new(),
            stream: None,
            stage: Stage::Resolving,
            request: job.request,
            reader: FrameReader::new(wire::MAX_HELLO),
            out: Vec::new(),
            out_pos: 0,
            deadline: job.deadline,
            done: Some(job.done),
        };
        match c.addr.parse::<SocketAddr>() {
            Ok(sa) => {
                if let Err(e) = start_connect(&mut c, sa) {
                    finish(&mut c, Err(e));
                    return;
                }
            }
            Err(_) => {
                if let Err(e) = self.resolve(c.id, &c.addr) {
                    finish(&mut c, Err(e));
                    return;
                }
            }
        }
        self.clients.push(c);
    }

    fn resolve(&mut self, id: u64, addr: &str) -> Result<()> {
        if self.resolver.is_none() {
            let (tx, jobs) = mpsc::channel::<(u64, String)>();
            let (results, rx) = mpsc::channel();
            let efd = self.efd.clone();
            // Detached: a lookup cannot be interrupted; the thread ends with the channel.
            std::thread::Builder::new()
                .name("mooncake-rdma-resolve".into())
                .spawn(move || {
                    for (id, name) in jobs {
                        let r = name.to_socket_addrs().and_then(|it| {
                            let all: Vec<SocketAddr> = it.collect();
                            if all.is_empty() {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::NotFound,
                                    "resolves to no address",
                                ));
                            }
                            Ok(all)
                        });
                        if results.send((id, r)).is_err() {
                            return;
                        }
                        efd.notify();
                    }
                })
                .map_err(|e| Error::io("spawn resolver thread", &e))?;
            self.resolver = Some(Resolver { tx, rx });
        }
        let r = self.resolver.as_ref().expect("started above");
        r.tx.send((id, addr.to_string()))
            .map_err(|_| Error::new(ErrorKind::Closed, "the RDMA handshake resolver has stopped"))
    }

    fn take_resolved(&mut self) {
        let Some(r) = &self.resolver else { return };
        let got: Vec<_> = r.rx.try_iter().collect();
        for (id, res) in got {
            let Some(i) = self.clients.iter().position(|c| c.id == id) else {
                continue;
            };
            let c = &mut self.clients[i];
            let r = res
                .map_err(|e| Error::io(&format!("resolve {}", c.addr), &e))
                .and_then(|all| {
                    c.more = all.into();
                    next_connect(c)
                });
            if let Err(e) = r {
                let mut c = self.clients.swap_remove(i);
                finish(&mut c, Err(e));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(c) = self.server.front() {
            // Connections are ordered by accept time, so deadlines are too.
            if c.deadline > now {
                break;
            }
            tracing::debug!(peer = %c.peer, "handshake connection missed its deadline; closing it");
            self.server.pop_front();
        }
        let mut i = 0;
        while i < self.clients.len() {
            if self.clients[i].deadline <= now {
                let mut c = self.clients.swap_remove(i);
                let e = Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "RDMA handshake with {} did not finish in time ({:?})",
                        c.addr, c.stage
                    ),
                );
                finish(&mut c, Err(e));
            } else {
                i += 1;
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_WAKE {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (or similar): stop accepting for a moment instead of
                    // spinning on a listener that stays readable.
                    tracing::warn!(error = %e, "handshake accept failed; pausing accepts");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// The connection to close to make room for one more from `incoming`: the oldest one of
    /// the address that holds the most slots (counting the new connection, and preferring the
    /// new one's address on a tie), so a flood from one host churns its own connections and
    /// not those of other hosts; the oldest of all when every address holds one.
    fn victim(&self, incoming: IpAddr) -> usize {
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for c in &self.server {
            *counts.entry(c.peer.ip()).or_default() += 1;
        }
        *counts.entry(incoming).or_default() += 1;
        let top = counts.values().copied().max().unwrap_or(0);
        let ip = if counts[&incoming] == top {
            incoming
        } else {
            counts
                .iter()
                .find(|(_, n)| **n == top)
                .map(|(ip, _)| *ip)
                .unwrap_or(incoming)
        };
        self.server
            .iter()
            .position(|c| c.peer.ip() == ip)
            .unwrap_or(0)
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        while self.server.len() >= self.limits.max_conns.max(1) {
            let i = self.victim(peer.ip());
            if let Some(old) = self.server.remove(i) {
                tracing::debug!(peer = %old.peer, "too many handshake connections; closing one");
            }
        }
        let nonce = wire::hex(&sys::random_bytes::<16>());
        let hello = Hello {
            version: wire::VERSION,
            nonce: nonce.clone(),
        };
        let Ok(out) = wire::encode(&hello) else {
            return;
        };
        self.server.push_back(ServerConn {
            stream,
            peer,
            nonce,
            deadline: Instant::now() + self.limits.frame_deadline,
            reader: Some(FrameReader::new(wire::MAX_REQUEST)),
            out,
            out_pos: 0,
        });
        // Send the hello right away; most of the time it fits in the socket buffer.
        let i = self.server.len() - 1;
        if self.progress_server(i) {
            self.server.pop_back();
        }
    }

    /// Advances a server connection; true when it is finished (to be closed).
    fn progress_server(&mut self, i: usize) -> bool {
        let c = &mut self.server[i];
        if let Err(e) = flush(&mut c.stream, &c.out, &mut c.out_pos) {
            tracing::debug!(peer = %c.peer, error = %e, "handshake connection failed");
            return true;
        }
        if let Some(reader) = &mut c.reader {
            match read_frame(&mut c.stream, reader) {
                Ok(None) => {}
                Ok(Some(body)) => {
                    c.reader = None;
                    let reply = match wire::decode::<Request>(&body) {
                        Ok(req) => self.serve.serve(req, c.peer, &c.nonce),
                        Err(e) => Reply::Refused {
                            reason: e.to_string(),
                            busy: false,
                            denied: false,
                        },
                    };
                    match wire::encode(&reply) {
                        Ok(bytes) => {
                            c.out.extend_from_slice(&bytes);
                        }
                        Err(_) => return true,
                    }
                    if let Err(e) = flush(&mut c.stream, &c.out, &mut c.out_pos) {
                        tracing::debug!(peer = %c.peer, error = %e, "handshake reply not delivered");
                        return true;
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %c.peer, error = %e, "bad handshake request");
                    return true;
                }
            }
        }
        c.reader.is_none() && c.out_pos >= c.out.len()
    }

    fn progress_client(&mut self, i: usize) -> Progress {
        let c = &mut self.clients[i];
        match client_step(c, self.secret.as_ref()) {
            Ok(Some(reply)) => {
                finish(c, Ok(reply));
                Progress::Done
            }
            Ok(None) => Progress::Pending,
            // A name with several addresses: a failed connect tries the next one.
            Err(e) if c.stage == Stage::Connecting && !c.more.is_empty() => {
                tracing::debug!(addr = %c.addr, error = %e, "trying the next address");
                match next_connect(c) {
                    Ok(()) => Progress::Pending,
                    Err(e) => Progress::Failed(e),
                }
            }
            Err(e) => Progress::Failed(e),
        }
    }
}

fn finish(c: &mut ClientConn, r: Result<Reply>) {
    if let Some(done) = c.done.take() {
        done(r);
    }
}

/// Connects to the next resolved address, if any is left.
fn next_connect(c: &mut ClientConn) -> Result<()> {
    let mut last = None;
    while let Some(sa) = c.more.pop_front() {
        match start_connect(c, sa) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::PeerUnreachable,
            format!("{} resolves to no reachable address", c.addr),
        )
    }))
}

fn start_connect(c: &mut ClientConn, sa: SocketAddr) -> Result<()> {
    let s = sys::connect_nonblocking(&sa)
        .map_err(|e| Error::io(&format!("RDMA handshake connect to {}", c.addr), &e))?;
    let _ = s.set_nodelay(true);
    c.stream = Some(s);
    c.stage = Stage::Connecting;
    Ok(())
}

/// Advances a client handshake as far as the socket allows; `Some` when the reply is in (and,
/// with a `secret`, proven by the peer).
fn client_step(c: &mut ClientConn, secret: Option<&ClusterSecret>) -> Result<Option<Reply>> {
    let addr = c.addr.clone();
    let io =
        |what: &str, e: std::io::Error| Error::io(&format!("RDMA handshake {what} {addr}"), &e);
    let Some(s) = c.stream.as_mut() else {
        return Ok(None);
    };
    loop {
        match c.stage {
            Stage::Resolving => return Ok(None),
            Stage::Connecting => {
                if let Some(e) = s.take_error().map_err(|e| io("connect to", e))? {
                    return Err(io("connect to", e));
                }
                // Writable without an error: connected (or still in progress on a spurious
                // wake-up, which `peer_addr` tells apart).
                if s.peer_addr().is_err() {
                    return Ok(None);
                }
                c.stage = Stage::Hello;
            }
            Stage::Hello => {
                let Some(body) = read_frame(s, &mut c.reader)? else {
                    return Ok(None);
                };
                let hello: Hello = wire::decode(&body)?;
                if hello.version != wire::VERSION {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!(
                            "peer {addr} speaks RDMA handshake version {} (we speak {})",
                            hello.version,
                            wire::VERSION
                        ),
                    ));
                }
                c.request.answer(&hello.nonce, &c.cnonce, secret);
                c.out = wire::encode(&c.request)?;
                c.out_pos = 0;
                c.reader = FrameReader::new(wire::MAX_REPLY);
                c.stage = Stage::Sending;
            }
            Stage::Sending => {
                flush(s, &c.out, &mut c.out_pos).map_err(|e| io("send to", e))?;
                if c.out_pos < c.out.len() {
                    return Ok(None);
                }
                c.stage = Stage::Reply;
            }
            Stage::Reply => {
                let Some(body) = read_frame(s, &mut c.reader)? else {
                    return Ok(None);
                };
                let reply: Reply = wire::decode(&body)?;
                if let Some(secret) = secret
                    && matches!(reply, Reply::Ok { .. })
                    && !reply.verify(secret, &c.request)
                {
                    return Err(Error::new(
                        ErrorKind::PeerUnreachable,
                        format!(
                            "refused RDMA peer {:?} at {addr}: it did not prove the cluster secret",
                            c.request.to()
                        ),
                    )
                    .with_temporary(false));
                }
                return Ok(Some(reply));
            }
        }
    }
}

/// Writes as much of `out[*pos..]` as the socket takes.
fn flush(s: &mut TcpStream, out: &[u8], pos: &mut usize) -> std::io::Result<()> {
    while *pos < out.len() {
        match s.write(&out[*pos..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is available of one frame (never past its end).
fn read_frame(s: &mut TcpStream, r: &mut FrameReader) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 16 << 10];
    loop {
        let want = r.want().min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::PeerUnreachable,
                    "the handshake peer closed the connection mid-frame",
                ));
            }
            Ok(n) => {
                if let Some(body) = r.push(&buf[..n])? {
                    return Ok(Some(body));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("handshake receive", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{QpInfo, RemoteKey};
    use std::sync::atomic::AtomicUsize;

    /// Answers every request with one key; counts requests.
    struct Echo(AtomicUsize);

    impl Serve for Echo {
        fn serve(&self, req: Request, _peer: SocketAddr, nonce: &str) -> Reply {
            self.0.fetch_add(1, Ordering::Relaxed);
            if req.nonce() != nonce {
                return Reply::Refused {
                    reason: "nonce".into(),
                    busy: false,
                    denied: false,
                };
            }
            Reply::Ok {
                generation: 1,
                qp: None,
                token: None,
                keys: vec![RemoteKey {
                    addr: 0x1000,
                    len: 1,
                    rkey: 1,
                    writable: true,
                }],
                auth: None,
            }
        }
    }

    fn request() -> Request {
        Request::Connect {
            version: wire::VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: "t".into(),
            generation: 1,
            to: "s".into(),
            local_nic: "a".into(),
            peer_nic: "b".into(),
            qp: QpInfo {
                qpn: 1,
                psn: 1,
                gid: wire::gid_to_hex(&[0; 16]),
                lid: 0,
                mtu: 1024,
            },
        }
    }

    fn start(limits: Limits) -> (Reactor, Client, SocketAddr, Arc<Echo>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let echo = Arc::new(Echo(AtomicUsize::new(0)));
        let (r, c) = Reactor::start(l, echo.clone(), limits, None).unwrap();
        (r, c, addr, echo)
    }

    fn call(c: &Client, addr: &str, within: Duration) -> Result<Reply> {
        let (tx, rx) = mpsc::channel();
        c.submit(Job {
            addr: addr.to_string(),
            request: request(),
            deadline: Instant::now() + within,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv_timeout(within + Duration::from_secs(2))
            .expect("the job reports by its deadline")
    }

    #[test]
    fn many_trickling_clients_do_not_stall_the_listener() {
        // Tricklers would hold a one-at-a-time listener for the whole frame deadline, longer
        // than the legitimate client's job may take.
        let limits = Limits {
            frame_deadline: Duration::from_secs(4),
            max_conns: 16,
        };
        let (_r, c, addr, echo) = start(limits);
        // 1,000 clients (as many as the descriptor limit allows) announce a 16 MiB frame
        // and then send one byte at a time, every 100 ms.
        let n = mooncake_testkit::attack::slow_connections_that_fit();
        let slow = mooncake_testkit::attack::SlowClients::all_trickling(
            addr,
            n,
            (16u32 << 20).to_le_bytes()[..3].to_vec(),
            b'{',
        );
        let r = call(&c, &addr.to_string(), Duration::from_secs(2)).unwrap();
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        // Every trickler is cut off: by the whole-frame deadline, or earlier as the oldest
        // when the cap is reached.
        mooncake_testkit::attack::eventually(
            limits.frame_deadline * 3 + Duration::from_secs(5),
            "every trickling client is disconnected",
            || slow.closed.load(Ordering::SeqCst) == n,
        );
        drop(slow);
        assert_eq!(echo.0.load(Ordering::Relaxed), 1);
    }

    /// Reads one frame from a blocking stream (`None` if the connection closed first).
    fn read_blocking(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// Opens a connection to `to` from the local address `from` (another loopback address
    /// stands for another host).
    fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&from.parse::<SocketAddr>().unwrap().into())?;
        s.connect(&to.into())?;
        Ok(s.into())
    }

    #[test]
    fn a_connection_flood_from_one_host_does_not_push_out_another() {
        let (_r, c, addr, echo) = start(Limits {
            frame_deadline: Duration::from_secs(30),
            max_conns: 16,
        });
        // Another host opens connections as fast as it can and never sends a byte (keeping
        // its most recent 200 open).
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut open = VecDeque::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = connect_from("127.0.0.2:0", addr) {
                        open.push_back(s);
                        n += 1;
                    }
                    if open.len() > 200 {
                        open.pop_front();
                    }
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        // Legitimate clients on a slow network: each takes a while to answer the hello, while
        // the flood opens far more connections than the listener has slots.
        for _ in 0..3 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let hello: Hello = wire::decode(&read_blocking(&mut s).unwrap()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let mut req = request();
            req.answer(&hello.nonce, "00", None);
            s.write_all(&wire::encode(&req).unwrap()).unwrap();
            let body = read_blocking(&mut s).expect("the slow client kept its slot");
            let r: Reply = wire::decode(&body).unwrap();
            assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        }
        // The listener's own client jobs work too.
        let r = call(&c, &addr.to_string(), Duration::from_secs(10)).unwrap();
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
        stop.store(true, Ordering::Relaxed);
        let n = flood.join().unwrap();
        assert!(n > 16, "the flood opened {n} connections");
        assert_eq!(echo.0.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn an_oversized_frame_is_refused_without_buffering() {
        let (_r, _c, addr, echo) = start(Limits {
            frame_deadline: Duration::from_secs(5),
            max_conns: 4,
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&(16u32 << 20).to_le_bytes()).unwrap();
        let _ = s.write_all(&[b'{'; 1024]);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        // Only the hello came back, then the connection closed.
        let mut r = FrameReader::new(wire::MAX_HELLO);
        let hello = r.push(&all[..4]).unwrap();
        assert!(hello.is_none());
        assert_eq!(all.len(), 4 + r.want());
        assert_eq!(echo.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_silent_peer_fails_the_job_at_its_deadline() {
        // A listener that accepts (in the kernel backlog) but never says hello.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_r, c, _addr, _echo) = start(Limits {
            frame_deadline: Duration::from_secs(5),
            max_conns: 4,
        });
        let t0 = Instant::now();
        let e = call(
            &c,
            &silent.local_addr().unwrap().to_string(),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.is_temporary());
        assert!(t0.elapsed() < Duration::from_millis(1500));
        // Refused connections fail at once, as temporary.
        let port = silent.local_addr().unwrap().port();
        drop(silent);
        let e = call(&c, &format!("127.0.0.1:{port}"), Duration::from_secs(2)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
    }

    #[test]
    fn names_are_resolved_off_the_reactor() {
        let (_r, c, addr, _echo) = start(Limits {
            frame_deadline: Duration::from_secs(5),
            max_conns: 4,
        });
        let r = call(
            &c,
            &format!("localhost:{}", addr.port()),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(matches!(r, Reply::Ok { .. }));
        // Stopping fails the jobs still pending.
        let (mut r2, c2, _, _) = start(Limits {
            frame_deadline: Duration::from_secs(5),
            max_conns: 4,
        });
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::channel();
        c2.submit(Job {
            addr: silent.local_addr().unwrap().to_string(),
            request: request(),
            deadline: Instant::now() + Duration::from_secs(60),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        std::thread::sleep(Duration::from_millis(50));
        r2.stop();
        let e = rx
            .recv_timeout(Duration::from_secs(1))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
    }
}
