//! Peer handshake (`P2PHANDSHAKE`): no metadata service. Each process serves its own
//! descriptors on its RPC port; a peer's segment name is `host:rpc_port`, and reading
//! `mooncake/ram/host:port` asks that peer directly.
//!
//! # Wire format (Mooncake's handshake socket)
//! A frame is an 8-byte length (little-endian `u64`, the reference's host order on x86-64 and
//! aarch64; it counts the type byte), a 1-byte type and a JSON body. Types: 0 Connection (RDMA
//! QP handshake), 1 Metadata, 2 Notify, 3 Probe. A type byte above 3 is the legacy untyped
//! form, whose whole length is JSON. A Metadata request carries the caller's own descriptor;
//! the reply carries the callee's (an empty body: it has none published). Frames above the
//! size limit (1 MiB by default, `MC_HANDSHAKE_MAX_LENGTH`) are refused.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use mooncake_core::{
    BoxFuture, EmbeddedMetadataStore, Error, ErrorKind, MetadataStore, Result, RpcMeta,
    SegmentDescriptor, WatchStream,
};

use crate::net;

/// The URL of this backend, as Mooncake spells it.
pub const P2P_SCHEME: &str = "P2PHANDSHAKE";

/// Frame type: RDMA connection (QP) handshake.
pub const FRAME_CONNECTION: u8 = 0;
/// Frame type: metadata exchange.
pub const FRAME_METADATA: u8 = 1;
/// Frame type: notify message.
pub const FRAME_NOTIFY: u8 = 2;
/// Frame type: liveness probe.
pub const FRAME_PROBE: u8 = 3;
/// Marks a legacy untyped frame in [`Frame::kind`].
pub const FRAME_LEGACY: u8 = u8::MAX;

/// Default frame size limit (1 MiB), as in the reference.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// One handshake frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The type byte ([`FRAME_METADATA`], …), or [`FRAME_LEGACY`].
    pub kind: u8,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is zero (it must count at least the type byte).
    EmptyFrame,
    /// The frame is larger than the limit.
    TooLarge {
        /// The declared length.
        declared: u64,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EmptyFrame => f.write_str("handshake frame of length 0"),
            Self::TooLarge { declared, limit } => write!(
                f,
                "handshake frame of {declared} bytes exceeds the limit of {limit} bytes (raise MC_HANDSHAKE_MAX_LENGTH)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Decodes one frame from the start of `buf`: `Ok(None)` while incomplete, else the frame
/// and the bytes it used. The length is checked against `max` before the body arrives.
pub fn decode_frame(
    buf: &[u8],
    max: usize,
) -> std::result::Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if len == 0 {
        return Err(FrameError::EmptyFrame);
    }
    if len > max as u64 {
        return Err(FrameError::TooLarge {
            declared: len,
            limit: max,
        });
    }
    let total = 8 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let kind = buf[8];
    let frame = if kind <= FRAME_PROBE {
        Frame {
            kind,
            body: buf[9..total].to_vec(),
        }
    } else {
        Frame {
            kind: FRAME_LEGACY,
            body: buf[8..total].to_vec(),
        }
    };
    Ok(Some((frame, total)))
}

/// Encodes a typed frame.
pub fn encode_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + body.len());
    out.extend_from_slice(&(body.len() as u64 + 1).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Configuration of [`P2pHandshakeStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct P2pConfig {
    /// Largest frame accepted or sent (default 1 MiB, or `MC_HANDSHAKE_MAX_LENGTH`).
    pub max_message: usize,
    /// Connect deadline (default 5 s, or `MC_HANDSHAKE_CONNECT_TIMEOUT` seconds).
    pub connect_timeout: Duration,
    /// Deadline of one exchange after connecting (default 5 s).
    pub io_timeout: Duration,
}

impl Default for P2pConfig {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Self {
            max_message: env("MC_HANDSHAKE_MAX_LENGTH").map_or(DEFAULT_MAX_MESSAGE, |v| {
                v.clamp(1 << 20, 128 << 20) as usize
            }),
            connect_timeout: Duration::from_secs(
                env("MC_HANDSHAKE_CONNECT_TIMEOUT").unwrap_or(5).max(1),
            ),
            io_timeout: Duration::from_secs(5),
        }
    }
}

impl P2pConfig {
    /// Sets the frame size limit.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Sets the connect deadline.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

struct Inner {
    name: String,
    local: EmbeddedMetadataStore,
    config: P2pConfig,
    shutdown: AtomicBool,
    conns: Mutex<std::collections::HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Idle client connections to peers, reused by later lookups.
    pool: Mutex<std::collections::HashMap<String, Vec<async_net::TcpStream>>>,
    /// Answers Notify frames (the Python API's `TransferNotify`), when set.
    notify: Mutex<Option<NotifyHandler>>,
}

/// Handles the body of a Notify frame on the RPC port and returns the reply's body.
pub type NotifyHandler = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

impl Inner {
    fn pool_take(&self, peer: &str) -> Option<async_net::TcpStream> {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(peer)
            .and_then(Vec::pop)
    }

    fn pool_put(&self, peer: &str, conn: async_net::TcpStream) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(peer.to_string()).or_default();
        if idle.len() < 4 {
            idle.push(conn);
        }
    }

    /// Our own segment descriptor, whatever the cluster prefix.
    fn own_descriptor(&self) -> Option<Vec<u8>> {
        let suffix = format!("ram/{}", self.name);
        self.local
            .keys("mooncake/")
            .into_iter()
            .find(|k| k.ends_with(&suffix))
            .and_then(|k| self.local.get_now(&k))
    }
}

/// A [`MetadataStore`] for `P2PHANDSHAKE`: no central service.
///
/// # Behavior
/// - Binds a TCP RPC port; [`local_name`](Self::local_name) (`host:port`) is the only segment
///   name this process may publish, and the engine must use it as its segment name, with
///   [`rpc_port`](Self::rpc_port) as its RPC port (`mooncake::p2p_engine_builder` does both).
/// - `put`/`delete`/`watch` act on this process's own keys (a local map; watch sees local
///   changes only). The RPC port serves this process's descriptor to peers.
/// - `get` of a local key answers locally. `get("mooncake/[<cluster>/]ram/host:port")` of
///   another peer connects to it and fetches its descriptor (one round trip). A peer that is
///   gone gives [`ErrorKind::PeerUnreachable`]; one that publishes nothing gives `Ok(None)`;
///   one that sends malformed JSON gives [`ErrorKind::Protocol`] naming the peer.
/// - `get("mooncake/rpc_meta/host:port")` of a peer is answered from the name itself.
/// - Dropping the store closes the port: peers then find this node unreachable.
pub struct P2pHandshakeStore {
    inner: Arc<Inner>,
    addr: SocketAddr,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for P2pHandshakeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pHandshakeStore")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl P2pHandshakeStore {
    /// Binds the RPC port `host:port` (port 0 picks a free one). The segment name becomes
    /// `host:<bound port>`, so `host` must be an address peers can reach.
    pub fn bind(host: &str, port: u16, config: P2pConfig) -> Result<Self> {
        let listener = TcpListener::bind((host, port))
            .map_err(|e| Error::io(&format!("binding the handshake port {host}:{port}"), &e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("local_addr", &e))?;
        let name = if host.contains(':') {
            format!("[{host}]:{}", addr.port())
        } else {
            format!("{host}:{}", addr.port())
        };
        let inner = Arc::new(Inner {
            name,
            local: EmbeddedMetadataStore::new(),
            config,
            shutdown: AtomicBool::new(false),
            conns: Mutex::new(Default::default()),
            next_conn: AtomicU64::new(0),
            pool: Mutex::new(Default::default()),
            notify: Mutex::new(None),
        });
        let i = inner.clone();
        let accept = std::thread::Builder::new()
            .name("mooncake-p2p-accept".into())
            .spawn(move || accept_loop(listener, i))
            .map_err(|e| Error::io("spawning the handshake thread", &e))?;
        tracing::info!(name = %inner.name, "P2P handshake port listening");
        Ok(Self {
            inner,
            addr,
            threads: Mutex::new(vec![accept]),
        })
    }

    /// This process's segment name: `host:rpc_port`.
    pub fn local_name(&self) -> &str {
        &self.inner.name
    }

    /// The bound RPC port.
    pub fn rpc_port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves Notify frames on the RPC port with `handler` (without one, a Notify frame
    /// closes the connection).
    pub fn set_notify_handler(&self, handler: NotifyHandler) {
        *self.inner.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    fn stop(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, c) in self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }

    async fn exchange(
        &self,
        conn: &mut async_net::TcpStream,
        request: &[u8],
        peer: &str,
    ) -> Result<Frame> {
        let cfg = &self.inner.config;
        let max = cfg.max_message;
        net::with_timeout(
            cfg.io_timeout,
            &format!("metadata handshake with {peer}"),
            async {
                conn.write_all(request)
                    .await
                    .map_err(|e| Error::io("sending the metadata handshake", &e))?;
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    match decode_frame(&buf, max) {
                        Ok(Some((f, _))) => return Ok(f),
                        Ok(None) => {}
                        Err(e) => return Err(Error::new(ErrorKind::Protocol, e.to_string())),
                    }
                    let n = conn
                        .read(&mut chunk)
                        .await
                        .map_err(|e| Error::io("reading the metadata handshake", &e))?;
                    if n == 0 {
                        return Err(Error::new(
                            ErrorKind::PeerUnreachable,
                            "the peer closed the handshake connection",
                        ));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            },
        )
        .await
    }

    async fn fetch(&self, peer: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let cfg = &self.inner.config;
        let mine = self
            .inner
            .own_descriptor()
            .unwrap_or_else(|| b"{}".to_vec());
        let request = encode_frame(FRAME_METADATA, &mine);
        let mut attempt = 0;
        let frame = loop {
            attempt += 1;
            let pooled = if attempt == 1 {
                self.inner.pool_take(peer)
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                None => net::connect(peer, cfg.connect_timeout, "the peer's handshake port")
                    .await
                    .map_err(|e| e.with_context("peer", peer))?,
            };
            match self.exchange(&mut conn, &request, peer).await {
                Ok(f) => {
                    self.inner.pool_put(peer, conn);
                    break f;
                }
                // An idle pooled connection may have been closed by the peer: retry fresh.
                Err(e) if reused && e.kind() != ErrorKind::Protocol => {
                    tracing::debug!(%peer, "pooled handshake connection failed, reconnecting: {e}");
                }
                Err(e) => return Err(e.with_context("peer", peer)),
            }
        };
        if frame.kind != FRAME_METADATA && frame.kind != FRAME_LEGACY {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "peer {peer} answered a metadata handshake with frame type {}",
                    frame.kind
                ),
            ));
        }
        let body = frame.body;
        if body.is_empty() {
            return Ok(None);
        }
        SegmentDescriptor::from_json(&body, &format!("peer {peer} (key {key})")).map_err(|e| {
            Error::new(ErrorKind::Protocol, e.message().to_string()).with_context("peer", peer)
        })?;
        Ok(Some(body))
    }
}

impl Drop for P2pHandshakeStore {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Splits a metadata key into (kind, segment name): `("ram", n)` for `…ram/n`,
/// `("rpc_meta", n)` for `…rpc_meta/n`.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (head, name) = key.rsplit_once('/')?;
    let kind = head.rsplit('/').next()?;
    matches!(kind, "ram" | "rpc_meta").then_some((kind, name))
}

/// Parses `host:port` (or `[v6]:port`).
fn parse_peer(name: &str) -> Option<(String, u16)> {
    let (host, port) = name.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port))
}

impl MetadataStore for P2pHandshakeStore {
    fn scheme(&self) -> &'static str {
        "p2phandshake"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        Box::pin(async move {
            if let Some(v) = self.inner.local.get_now(key) {
                return Ok(Some(v));
            }
            let Some((kind, name)) = split_key(key) else {
                return Ok(None);
            };
            if name == self.inner.name {
                return Ok(None);
            }
            let Some((host, port)) = parse_peer(name) else {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "in P2PHANDSHAKE mode segment names are host:rpc_port, and {name:?} is not (key {key})"
                    ),
                ));
            };
            if kind == "rpc_meta" {
                let meta = RpcMeta {
                    ip_or_host_name: host,
                    rpc_port: port,
                };
                return Ok(Some(
                    serde_json::to_vec(&meta).expect("rpc meta serialises"),
                ));
            }
            self.fetch(name, key).await
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        if let Some(name) = split_key(key)
            .filter(|&(kind, name)| kind == "ram" && name != self.inner.name)
            .map(|k| k.1)
        {
            return Box::pin(std::future::ready(Err(Error::new(
                ErrorKind::Config,
                format!(
                    "in P2PHANDSHAKE mode this process can only publish segment {:?} (its host:rpc_port), not {name:?}",
                    self.inner.name
                ),
            ))));
        }
        self.inner.local.put_now(key, value);
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.local.delete_now(key);
        Box::pin(std::future::ready(Ok(())))
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        Box::pin(std::future::ready(Ok(self.inner.local.watch_now(prefix))))
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for conn in listener.incoming() {
        if inner.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else { continue };
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            inner
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, c);
        }
        let i = inner.clone();
        let _ = std::thread::Builder::new()
            .name("mooncake-p2p-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = serve(stream, &i) {
                    tracing::debug!(%peer, "handshake connection ended: {e}");
                }
                i.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
    }
}

fn serve(mut stream: TcpStream, inner: &Inner) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let (frame, used) = match decode_frame(&buf, inner.config.max_message) {
            Ok(Some(f)) => f,
            Ok(None) => {
                let n = stream.read(&mut chunk)?;
                if n == 0 || inner.shutdown.load(Ordering::SeqCst) {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                continue;
            }
            Err(e) => {
                tracing::warn!("refusing a handshake frame: {e}");
                return Ok(());
            }
        };
        buf.drain(..used);
        match frame.kind {
            FRAME_METADATA | FRAME_LEGACY => {
                if let Ok(d) = SegmentDescriptor::from_json(&frame.body, "a handshake request") {
                    tracing::debug!(peer = %d.name, "metadata handshake");
                }
                let mine = inner.own_descriptor().unwrap_or_default();
                stream.write_all(&encode_frame(FRAME_METADATA, &mine))?;
            }
            FRAME_PROBE => stream.write_all(&encode_frame(FRAME_PROBE, b"{}"))?,
            FRAME_NOTIFY
                if let Some(h) = inner
                    .notify
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone() =>
            {
                stream.write_all(&encode_frame(FRAME_NOTIFY, &h(&frame.body)))?
            }
            other => {
                tracing::warn!(
                    kind = other,
                    "unsupported handshake frame type on the metadata port; closing"
                );
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_and_names() {
        assert_eq!(
            split_key("mooncake/ram/1.2.3.4:5"),
            Some(("ram", "1.2.3.4:5"))
        );
        assert_eq!(
            split_key("mooncake/c1/rpc_meta/h:7"),
            Some(("rpc_meta", "h:7"))
        );
        assert_eq!(split_key("mooncake/other/x"), None);
        assert_eq!(parse_peer("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(parse_peer("host:0"), None);
        assert_eq!(parse_peer("host"), None);
    }

    #[test]
    fn frame_limits() {
        let f = encode_frame(FRAME_METADATA, b"{}");
        assert_eq!(f.len(), 11);
        assert_eq!(
            decode_frame(&f, 16).unwrap(),
            Some((
                Frame {
                    kind: 1,
                    body: b"{}".to_vec()
                },
                11
            ))
        );
        assert_eq!(
            decode_frame(&f, 2),
            Err(FrameError::TooLarge {
                declared: 3,
                limit: 2
            })
        );
        assert_eq!(decode_frame(&[0; 8], 16), Err(FrameError::EmptyFrame));
        let legacy = [&3u64.to_le_bytes()[..], b"{1}"].concat();
        assert_eq!(
            decode_frame(&legacy, 16).unwrap().unwrap().0,
            Frame {
                kind: FRAME_LEGACY,
                body: b"{1}".to_vec()
            }
        );
    }

    proptest! {
        #[test]
        fn frame_roundtrip(kind in 0u8..=3, body in proptest::collection::vec(any::<u8>(), 0..500), cut in 0usize..600) {
            let f = encode_frame(kind, &body);
            prop_assert_eq!(decode_frame(&f[..cut.min(f.len() - 1)], 1024).unwrap(), None);
            let (frame, used) = decode_frame(&f, 1024).unwrap().unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(frame, Frame { kind, body });
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100), max in 0usize..64) {
            if let Ok(Some((frame, used))) = decode_frame(&bytes, max) {
                prop_assert!(used <= bytes.len());
                prop_assert!(frame.body.len() <= max);
            }
        }
    }
}
