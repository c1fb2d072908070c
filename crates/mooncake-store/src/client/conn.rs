//! Connections to the master: a pool of blocking sockets (used directly by the calling thread,
//! no hand-off) and a pool of `async-io` sockets for the async forms.

use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_io::{Async, Timer};

use mooncake_core::ClusterSecret;

use crate::rpc::{self, FrameKind, Request, Response};
use crate::types::{StoreError, StoreErrorCode, StoreResult};

/// How a call does its I/O: on the calling thread, or as a future that parks in the reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Io {
    Blocking,
    Async,
}

struct BlockingConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
    payload: Vec<u8>,
}

struct AsyncConn {
    stream: Async<TcpStream>,
    buf: Vec<u8>,
    payload: Vec<u8>,
}

pub(crate) struct MasterConns {
    addr: SocketAddr,
    timeout: Duration,
    secret: Option<ClusterSecret>,
    max_idle: usize,
    blocking: Mutex<Vec<BlockingConn>>,
    asynchronous: Mutex<Vec<AsyncConn>>,
    next_id: AtomicU64,
}

/// How long a blocking caller polls for the master's reply before it sleeps in `read`
/// (`MC_RPC_SPIN_US`, default 0: on a small, busy host polling costs more than it saves).
fn reply_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| Duration::from_micros(crate::server::env_us("MC_RPC_SPIN_US", 0)))
}

pub(crate) fn rpc_err(e: &io::Error) -> StoreError {
    let code = if matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) {
        StoreErrorCode::RpcTimeout
    } else {
        StoreErrorCode::RpcFail
    };
    StoreError::new(code, format!("master RPC: {e}"))
}

/// Resolves `host:port`.
pub(crate) fn resolve(addr: &str) -> StoreResult<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| {
            StoreError::new(
                StoreErrorCode::InvalidParams,
                format!("master address {addr:?}: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| {
            StoreError::new(
                StoreErrorCode::InvalidParams,
                format!("master address {addr:?} resolves to nothing"),
            )
        })
}

/// A pooled connection that the peer closed (the master restarted) reads as EOF or an error.
fn stale(s: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(s).recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(_) => true, // EOF, or bytes nobody asked for
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

pub(crate) fn connect_blocking(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// The client half of the cluster-secret challenge-response on a fresh connection (one round
/// trip, once per pooled connection): send a nonce and check the master's proof. Returns our
/// proof, which the caller writes without waiting for its `Pong`: the master handles a
/// connection's requests in order, so the request written after it is served proven, and
/// the reader skips the `Pong` (another request id). A master that refuses the proof closes
/// the connection, so that request then fails.
pub(crate) fn authenticate(
    secret: &ClusterSecret,
    call: &mut dyn FnMut(&Request) -> io::Result<Response>,
) -> io::Result<Request> {
    let cn = mooncake_core::auth::nonce();
    let proof = check_challenge(secret, &cn, call(&Request::Auth { nonce: cn })?)?;
    Ok(Request::Prove { proof })
}

fn denied(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// Checks the master's proof and returns ours.
fn check_challenge(secret: &ClusterSecret, cn: &[u8; 16], r: Response) -> io::Result<Vec<u8>> {
    match r {
        Response::Challenge { nonce, proof }
            if secret.verify(crate::server::MASTER_ROLE, &[cn, &nonce], &proof) =>
        {
            Ok(secret
                .prove(crate::server::CLIENT_ROLE, &[cn, &nonce])
                .to_vec())
        }
        Response::Challenge { .. } => {
            Err(denied("the master did not prove the cluster secret".into()))
        }
        Response::Error(e) => Err(denied(format!("the master refused authentication: {e}"))),
        _ => Err(denied("unexpected reply to authentication".into())),
    }
}

/// One blocking request/response on `stream` (used by the session thread too).
pub(crate) fn call_on(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    buf: &mut Vec<u8>,
    payload: &mut Vec<u8>,
    id: u64,
    req: &Request,
) -> io::Result<Response> {
    rpc::write_frame(stream, buf, FrameKind::Request, id, req)?;
    loop {
        if reader.buffer().is_empty() {
            rpc::spin_for_data(stream, reply_spin());
        }
        let h = rpc::read_frame(reader, payload)?;
        if h.kind != FrameKind::Response {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the master sent a request frame",
            ));
        }
        if h.request_id == id {
            return rpc::frame::decode_payload(payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
}

impl MasterConns {
    pub(crate) fn new(
        addr: SocketAddr,
        timeout: Duration,
        max_idle: usize,
        secret: Option<ClusterSecret>,
    ) -> Self {
        Self {
            addr,
            timeout,
            secret,
            max_idle: max_idle.max(1),
            blocking: Mutex::new(Vec::new()),
            asynchronous: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops every idle connection (after a master restart was noticed).
    pub(crate) fn clear(&self) {
        self.blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.asynchronous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub(crate) async fn call(&self, io: Io, req: &Request) -> StoreResult<Response> {
        let resp = match io {
            Io::Blocking => self.call_blocking(req)?,
            Io::Async => self.call_async(req).await?,
        };
        match resp {
            Response::Error(e) => Err(e),
            r => Ok(r),
        }
    }

    fn take_blocking(&self) -> io::Result<BlockingConn> {
        loop {
            let c = self
                .blocking
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            match c {
                Some(c) if stale(&c.stream) => continue,
                Some(c) => return Ok(c),
                None => break,
            }
        }
        let stream = connect_blocking(self.addr, self.timeout)?;
        let reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
        let mut c = BlockingConn {
            stream,
            reader,
            buf: Vec::new(),
            payload: Vec::new(),
        };
        if let Some(secret) = &self.secret {
            let mut call = |req: &Request| {
                call_on(
                    &mut c.stream,
                    &mut c.reader,
                    &mut c.buf,
                    &mut c.payload,
                    self.id(),
                    req,
                )
            };
            let prove = authenticate(secret, &mut call)?;
            rpc::write_frame(
                &mut c.stream,
                &mut c.buf,
                FrameKind::Request,
                self.id(),
                &prove,
            )?;
        }
        Ok(c)
    }

    fn call_blocking(&self, req: &Request) -> StoreResult<Response> {
        let mut c = self.take_blocking().map_err(|e| rpc_err(&e))?;
        let id = self.id();
        let r = call_on(
            &mut c.stream,
            &mut c.reader,
            &mut c.buf,
            &mut c.payload,
            id,
            req,
        );
        match r {
            Ok(resp) => {
                if c.buf.capacity() > (1 << 20) {
                    c.buf = Vec::new();
                }
                if c.payload.capacity() > (1 << 20) {
                    c.payload = Vec::new();
                }
                let mut pool = self.blocking.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < self.max_idle {
                    pool.push(c);
                }
                Ok(resp)
            }
            Err(e) => Err(rpc_err(&e)),
        }
    }

    async fn take_async(&self) -> io::Result<AsyncConn> {
        loop {
            let c = self
                .asynchronous
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            match c {
                Some(c) if stale(c.stream.get_ref()) => continue,
                Some(c) => return Ok(c),
                None => break,
            }
        }
        let stream = Async::<TcpStream>::connect(self.addr).await?;
        stream.get_ref().set_nodelay(true)?;
        let mut c = AsyncConn {
            stream,
            buf: Vec::new(),
            payload: Vec::new(),
        };
        if let Some(secret) = &self.secret {
            let cn = mooncake_core::auth::nonce();
            let r = self
                .exchange_async(&mut c, &Request::Auth { nonce: cn })
                .await?;
            let proof = check_challenge(secret, &cn, r)?;
            // Not waiting for the `Pong` (see `authenticate`).
            let id = self.id();
            rpc::write_frame_async(
                &mut c.stream,
                &mut c.buf,
                FrameKind::Request,
                id,
                &Request::Prove { proof },
            )
            .await?;
        }
        Ok(c)
    }

    /// One request/response on an async connection (no pooling).
    async fn exchange_async(&self, c: &mut AsyncConn, req: &Request) -> io::Result<Response> {
        let id = self.id();
        rpc::write_frame_async(&mut c.stream, &mut c.buf, FrameKind::Request, id, req).await?;
        loop {
            let h = rpc::read_frame_async(&mut c.stream, &mut c.payload).await?;
            if h.kind == FrameKind::Response && h.request_id == id {
                return rpc::frame::decode_payload(&c.payload)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    async fn call_async(&self, req: &Request) -> StoreResult<Response> {
        let work = async {
            let mut c = self.take_async().await?;
            let id = self.id();
            rpc::write_frame_async(&mut c.stream, &mut c.buf, FrameKind::Request, id, req).await?;
            loop {
                let h = rpc::read_frame_async(&mut c.stream, &mut c.payload).await?;
                if h.kind != FrameKind::Response {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the master sent a request frame",
                    ));
                }
                if h.request_id == id {
                    break;
                }
            }
            let resp: Response = rpc::frame::decode_payload(&c.payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let mut pool = self.asynchronous.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < self.max_idle {
                pool.push(c);
            }
            Ok(resp)
        };
        let timeout = async {
            Timer::after(self.timeout).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no reply before the RPC deadline",
            ))
        };
        futures_lite::future::or(work, timeout)
            .await
            .map_err(|e| rpc_err(&e))
    }
}
