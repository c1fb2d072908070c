//! What the two servers (the HTTP metadata server and the P2P handshake port) share: a small,
//! fixed set of executor threads that drive every connection as a task (so a thousand slow
//! connections cost a thousand sockets and small buffers, not a thousand threads), a
//! connection cap that first evicts the longest-idle connection and only then refuses, an
//! accept loop that backs off on errors (EMFILE does not spin), and deadline helpers.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use event_listener::Event;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use mooncake_core::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `now + d`, saturating far in the future instead of panicking on overflow.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// Runs `fut` until `deadline`; `None` when the deadline passed first.
pub(crate) async fn until<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::at(deadline).await;
        None
    })
    .await
}

/// Reads at most `max` more bytes into `buf` before `deadline`: `Ok(0)` on EOF,
/// `Err(TimedOut)` past the deadline.
pub(crate) async fn read_some(
    stream: &Async<TcpStream>,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> io::Result<usize> {
    let old = buf.len();
    buf.resize(old + max.max(1), 0);
    let mut s = stream;
    let r = until(deadline, s.read(&mut buf[old..])).await;
    let n = match r {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            buf.truncate(old);
            return Err(e);
        }
        None => {
            buf.truncate(old);
            return Err(io::Error::new(io::ErrorKind::TimedOut, "read deadline"));
        }
    };
    buf.truncate(old + n);
    Ok(n)
}

/// Writes every slice of `parts` before `deadline`.
pub(crate) async fn write_parts(
    stream: &Async<TcpStream>,
    parts: &[&[u8]],
    deadline: Instant,
) -> io::Result<()> {
    let mut s = stream;
    let all = async {
        for p in parts {
            s.write_all(p).await?;
        }
        s.flush().await
    };
    match until(deadline, all).await {
        Some(r) => r,
        None => Err(io::Error::new(io::ErrorKind::TimedOut, "write deadline")),
    }
}

/// Half-closes `stream` and reads (and drops) what the peer still sends, up to `max` bytes or
/// `linger`, so an error reply sent before the request was read is not lost to a reset.
pub(crate) async fn linger_close(stream: &Async<TcpStream>, max: usize, linger: Duration) {
    let _ = stream.get_ref().shutdown(Shutdown::Write);
    let deadline = deadline_after(linger);
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = max;
    let mut s = stream;
    while left > 0 {
        match until(deadline, s.read(&mut sink)).await {
            Some(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

struct Slot {
    stream: Arc<Async<TcpStream>>,
    /// Since when the connection waits for a new request (None: in a request).
    idle_since: Option<Instant>,
}

/// The open connections of one server, capped.
pub(crate) struct Conns {
    cap: usize,
    inner: Mutex<(u64, HashMap<u64, Slot>)>,
}

/// What [`Conns::admit`] decided.
pub(crate) enum Admit {
    /// Serve it; the guard removes it when dropped.
    Yes(ConnGuard),
    /// Every slot is busy with a request: refuse it.
    Full,
}

impl Conns {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            inner: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admits a connection. At the cap, the connection idle the longest (between requests)
    /// is closed to make room; when none is idle the new one is refused.
    pub(crate) fn admit(self: &Arc<Self>, stream: Arc<Async<TcpStream>>) -> Admit {
        let mut g = lock(&self.inner);
        if g.1.len() >= self.cap {
            let victim =
                g.1.iter()
                    .filter_map(|(id, s)| s.idle_since.map(|t| (t, *id)))
                    .min()
                    .map(|(_, id)| id);
            match victim.and_then(|id| g.1.remove(&id)) {
                Some(v) => {
                    tracing::debug!("connection cap reached: closing the longest-idle connection");
                    let _ = v.stream.get_ref().shutdown(Shutdown::Both);
                }
                None => return Admit::Full,
            }
        }
        let id = g.0;
        g.0 += 1;
        g.1.insert(
            id,
            Slot {
                stream,
                idle_since: Some(Instant::now()),
            },
        );
        Admit::Yes(ConnGuard {
            conns: self.clone(),
            id,
        })
    }

    /// Number of open connections.
    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).1.len()
    }

    /// Closes every connection (shutdown).
    pub(crate) fn close_all(&self) {
        for (_, s) in lock(&self.inner).1.drain() {
            let _ = s.stream.get_ref().shutdown(Shutdown::Both);
        }
    }
}

/// A connection's place in [`Conns`].
pub(crate) struct ConnGuard {
    conns: Arc<Conns>,
    id: u64,
}

impl ConnGuard {
    /// Marks the connection idle (waiting for a request: evictable) or busy.
    pub(crate) fn set_idle(&self, idle: bool) {
        if let Some(s) = lock(&self.conns.inner).1.get_mut(&self.id) {
            s.idle_since = idle.then(Instant::now);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.conns.inner).1.remove(&self.id);
    }
}

/// A reservation of bytes against a shared budget (request bodies being buffered).
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

/// Bytes held from a [`Budget`] until dropped.
pub(crate) struct Reserved<'a> {
    budget: &'a Budget,
    n: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Reserves `n` bytes, or `None` when that would exceed the limit.
    pub(crate) fn reserve(&self, n: usize) -> Option<Reserved<'_>> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(n).filter(|&v| v <= self.limit)?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(Reserved { budget: self, n }),
                Err(v) => cur = v,
            }
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// A fixed set of named threads running one executor, stopped and joined by
/// [`Runtime::stop`] (which also drops every task, closing its sockets).
pub(crate) struct Runtime {
    ex: Option<Arc<Executor<'static>>>,
    stop: Arc<(AtomicBool, Event)>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    pub(crate) fn start(name: &str, threads: usize) -> Result<Self> {
        let ex = Arc::new(Executor::new());
        let stop = Arc::new((AtomicBool::new(false), Event::new()));
        let mut rt = Self {
            ex: Some(ex.clone()),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let (ex, stop) = (ex.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    async_io::block_on(ex.run(async {
                        loop {
                            if stop.0.load(Ordering::SeqCst) {
                                return;
                            }
                            let l = stop.1.listen();
                            if stop.0.load(Ordering::SeqCst) {
                                return;
                            }
                            l.await;
                        }
                    }))
                })
                .map_err(|e| Error::io("spawning a server thread", &e))?;
            rt.threads.push(t);
        }
        Ok(rt)
    }

    /// Spawns a detached task.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        if let Some(ex) = &self.ex {
            ex.spawn(fut).detach();
        }
    }

    /// A handle that spawns tasks from inside other tasks.
    pub(crate) fn spawner(&self) -> Spawner {
        Spawner(self.ex.as_ref().map(Arc::downgrade))
    }

    /// Stops the threads, joins them and drops every task.
    pub(crate) fn stop(&mut self) {
        self.stop.0.store(true, Ordering::SeqCst);
        self.stop.1.notify(usize::MAX);
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        // The last strong reference: dropping it drops every task and closes its sockets.
        self.ex = None;
    }

    /// Blocks until the threads end (another thread calls `stop`).
    #[cfg_attr(
        not(feature = "http-server"),
        expect(dead_code, reason = "only the HTTP server waits")
    )]
    pub(crate) fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns tasks on a [`Runtime`] from inside its tasks (a weak handle: no cycle).
#[derive(Clone)]
pub(crate) struct Spawner(Option<std::sync::Weak<Executor<'static>>>);

impl Spawner {
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        if let Some(ex) = self.0.as_ref().and_then(std::sync::Weak::upgrade) {
            ex.spawn(fut).detach();
        }
    }
}

/// Accepts connections forever, handing each to `on_conn`. Errors (EMFILE, ENFILE,
/// ECONNABORTED, …) back off exponentially from 5 ms to 1 s instead of spinning, and are
/// logged at most once per second.
pub(crate) async fn accept_loop(
    listener: Async<TcpListener>,
    what: &'static str,
    mut on_conn: impl FnMut(Async<TcpStream>),
) {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);
    let mut backoff = MIN;
    let mut last_log: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                backoff = MIN;
                let _ = s.get_ref().set_nodelay(true);
                on_conn(s);
            }
            Err(e) => {
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!("{what}: accept failed ({e}); backing off {backoff:?}");
                    last_log = Some(Instant::now());
                }
                Timer::after(backoff).await;
                backoff = (backoff * 2).min(MAX);
            }
        }
    }
}

/// The listen backlog of the servers: a burst of connections (a thousand peers starting at
/// once, or a flood) waits in the kernel instead of having its SYNs dropped, which would cost
/// every client caught in it a one-second retransmission.
const BACKLOG: i32 = 1024;

fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds `addr` (the first of its addresses that binds) for a server.
pub(crate) fn bind(addr: impl std::net::ToSocketAddrs, what: &str) -> Result<Async<TcpListener>> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to bind");
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| Error::io(&format!("resolving the address of {what}"), &e))?;
    for a in addrs {
        match listen(a) {
            Ok(l) => {
                return Async::new(l).map_err(|e| Error::io(&format!("registering {what}"), &e));
            }
            Err(e) => last = e,
        }
    }
    Err(Error::io(&format!("binding {what}"), &last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_never_exceed_their_limit() {
        let b = Budget::new(10);
        let r = b.reserve(6).unwrap();
        assert!(b.reserve(5).is_none());
        assert!(b.reserve(usize::MAX).is_none());
        let r2 = b.reserve(4).unwrap();
        drop(r);
        assert!(b.reserve(6).is_some());
        drop(r2);
        assert_eq!(b.used.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn deadlines_saturate() {
        let _ = deadline_after(Duration::MAX);
        let _ = deadline_after(Duration::from_millis(u64::MAX));
    }
}
