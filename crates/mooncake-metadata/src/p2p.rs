//! Peer handshake (`P2PHANDSHAKE`): no metadata service. Each process serves its own
//! descriptors on its RPC port; a peer's segment name is `host:rpc_port`, and reading
//! `mooncake/ram/host:port` asks that peer directly.
//!
//! # Wire format (Mooncake's handshake socket)
//! A frame is an 8-byte length (little-endian `u64`, the reference's host order on x86-64 and
//! aarch64; it counts the type byte), a 1-byte type and a JSON body. Types: 0 Connection (RDMA
//! QP handshake), 1 Metadata, 2 Notify, 3 Probe. A type byte above 3 is the legacy untyped
//! form, whose whole length is JSON — except 0x10–0x13, the authentication frames below,
//! which no JSON text starts with. A Metadata request carries the caller's own descriptor;
//! the reply carries the callee's (an empty body: it has none published). Frames above the
//! size limit (1 MiB by default, `MC_HANDSHAKE_MAX_LENGTH`) are refused.
//!
//! # Authentication (with a cluster secret)
//! A store with a cluster secret ([`P2pConfig::with_cluster_secret`], or
//! `MC_CLUSTER_SECRET_FILE`/`MC_CLUSTER_SECRET`) answers nothing — no descriptor, probe or
//! notify — on a connection until the peer proved it holds the secret, and proves itself
//! first, so neither side reveals its descriptor to an impostor:
//!
//! ```text
//! initiator → target   AuthHello     (0x10)  target name, initiator name, nonce_i
//! target → initiator   AuthChallenge (0x11)  nonce_t, proof_t = HMAC(secret, "target",    names, nonces)
//! initiator → target   AuthProof     (0x12)  proof_i = HMAC(secret, "initiator", names, nonces)
//!                      + the first request, in the same write
//! target → initiator   the reply
//! ```
//! Both proofs cover both segment names (`host:port`) and both nonces ([`auth_proof`]), so a
//! proof is good for one connection, one direction and one pair of names only; the target
//! refuses a hello naming another segment. A refusal is an AuthRefused (0x13) frame with a
//! message, then the connection closes. Setup costs one extra round trip per connection;
//! connections are pooled, so steady-state lookups cost none. Without a secret everything
//! works as in the reference, and a peer with a secret refuses one without (both ways).
//!
//! # Serving
//! Connections are tasks on one thread (async-io), at most [`P2pConfig::max_connections`]
//! (at the cap the longest-idle one is closed, and when none is idle a new one is); each
//! frame must arrive whole within [`P2pConfig::io_timeout`] of its first byte (and the whole
//! authentication within it of the connection), an idle connection is closed after
//! [`P2pConfig::idle_timeout`], frames before authentication are at most
//! [`MAX_AUTH_FRAME`] bytes, and the frames being received at once hold at most
//! [`P2pConfig::max_inflight`] bytes. Accept errors (EMFILE) back off instead of spinning.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_io::Async;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use mooncake_core::auth::{NONCE_LEN, PROOF_LEN};
use mooncake_core::{
    BoxFuture, ClusterSecret, EmbeddedMetadataStore, Error, ErrorKind, MetadataStore, Result,
    RpcMeta, SegmentDescriptor, WatchStream,
};

use crate::net;
use crate::serve::{self, Admit, Budget, ConnGuard, Conns, Runtime};

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
/// Frame type: an initiator opens authentication ([`AuthHello`]).
pub const FRAME_AUTH_HELLO: u8 = 0x10;
/// Frame type: the target's nonce and proof (48 bytes).
pub const FRAME_AUTH_CHALLENGE: u8 = 0x11;
/// Frame type: the initiator's proof (32 bytes).
pub const FRAME_AUTH_PROOF: u8 = 0x12;
/// Frame type: authentication refused (a UTF-8 message); the connection closes.
pub const FRAME_AUTH_REFUSED: u8 = 0x13;
/// Marks a legacy untyped frame in [`Frame::kind`].
pub const FRAME_LEGACY: u8 = u8::MAX;

/// Default frame size limit (1 MiB), as in the reference.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// Size limit of every frame before a connection is authenticated (and of auth replies).
pub const MAX_AUTH_FRAME: usize = 4096;

/// The role tag of the target's proof.
pub const AUTH_TARGET_ROLE: &[u8] = b"mooncake-p2p-target";
/// The role tag of the initiator's proof.
pub const AUTH_INITIATOR_ROLE: &[u8] = b"mooncake-p2p-initiator";

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

fn is_typed(kind: u8) -> bool {
    kind <= FRAME_PROBE || (FRAME_AUTH_HELLO..=FRAME_AUTH_REFUSED).contains(&kind)
}

/// The declared length of the frame starting `buf` (once 8 bytes arrived), checked against
/// `max`.
fn frame_len(buf: &[u8], max: usize) -> std::result::Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..8) else {
        return Ok(None);
    };
    let len = u64::from_le_bytes(head.try_into().unwrap_or_default());
    if len == 0 {
        return Err(FrameError::EmptyFrame);
    }
    if len > max as u64 {
        return Err(FrameError::TooLarge {
            declared: len,
            limit: max,
        });
    }
    usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .map(Some)
        .ok_or(FrameError::TooLarge {
            declared: len,
            limit: max,
        })
}

/// Decodes one frame from the start of `buf`: `Ok(None)` while incomplete, else the frame
/// and the bytes it used. The length is checked against `max` before the body arrives.
pub fn decode_frame(
    buf: &[u8],
    max: usize,
) -> std::result::Result<Option<(Frame, usize)>, FrameError> {
    let Some(total) = frame_len(buf, max)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(8..total) else {
        return Ok(None);
    };
    let kind = frame[0];
    let frame = if is_typed(kind) {
        Frame {
            kind,
            body: frame[1..].to_vec(),
        }
    } else {
        Frame {
            kind: FRAME_LEGACY,
            body: frame.to_vec(),
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

/// The body of a [`FRAME_AUTH_HELLO`]: who connects to whom.
///
/// ```text
/// u16 target length | target name | u16 initiator length | initiator name | 16-byte nonce
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHello {
    /// The segment (`host:port`) the initiator means to reach.
    pub target: String,
    /// The initiator's own segment name.
    pub initiator: String,
    /// The initiator's fresh nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl AuthHello {
    /// Encodes the body (names longer than 65,535 bytes are cut: no segment name is).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + NONCE_LEN + self.target.len() + self.initiator.len());
        for s in [&self.target, &self.initiator] {
            let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
            v.extend_from_slice(&(b.len() as u16).to_le_bytes());
            v.extend_from_slice(b);
        }
        v.extend_from_slice(&self.nonce);
        v
    }

    /// Decodes a body; refuses truncated, trailing or non-UTF-8 input.
    pub fn decode(b: &[u8]) -> Option<Self> {
        fn name(b: &[u8], at: &mut usize) -> Option<String> {
            let len = b.get(*at..at.checked_add(2)?)?;
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            let s = b.get(*at + 2..(*at + 2).checked_add(len)?)?;
            *at += 2 + len;
            String::from_utf8(s.to_vec()).ok()
        }
        let mut at = 0;
        let target = name(b, &mut at)?;
        let initiator = name(b, &mut at)?;
        let nonce = b.get(at..)?.try_into().ok()?;
        Some(Self {
            target,
            initiator,
            nonce,
        })
    }
}

/// The proof of `role` ([`AUTH_TARGET_ROLE`] or [`AUTH_INITIATOR_ROLE`]) for the connection
/// `hello` opened and the target answered with `target_nonce`: HMAC-SHA256 under the cluster
/// secret over both segment names and both nonces.
pub fn auth_proof(
    secret: &ClusterSecret,
    role: &[u8],
    hello: &AuthHello,
    target_nonce: &[u8],
) -> [u8; PROOF_LEN] {
    secret.prove(
        role,
        &[
            hello.target.as_bytes(),
            hello.initiator.as_bytes(),
            &hello.nonce,
            target_nonce,
        ],
    )
}

/// Checks a proof made by [`auth_proof`] (constant-time).
pub fn auth_verify(
    secret: &ClusterSecret,
    role: &[u8],
    hello: &AuthHello,
    target_nonce: &[u8],
    proof: &[u8],
) -> bool {
    secret.verify(
        role,
        &[
            hello.target.as_bytes(),
            hello.initiator.as_bytes(),
            &hello.nonce,
            target_nonce,
        ],
        proof,
    )
}

/// Configuration of [`P2pHandshakeStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct P2pConfig {
    /// Largest frame accepted or sent (default 1 MiB, or `MC_HANDSHAKE_MAX_LENGTH`).
    pub max_message: usize,
    /// Connect deadline (default 5 s, or `MC_HANDSHAKE_CONNECT_TIMEOUT` seconds).
    pub connect_timeout: Duration,
    /// Deadline of one exchange after connecting (default 5 s). The server holds each whole
    /// frame, and the whole authentication of a connection, to it as well.
    pub io_timeout: Duration,
    /// The server closes a connection idle this long between frames (default 60 s).
    pub idle_timeout: Duration,
    /// Most connections the server keeps open (default 1024).
    pub max_connections: usize,
    /// Most bytes of frames the server receives at once, over all connections (default
    /// 64 MiB, at least twice `max_message`).
    pub max_inflight: usize,
    /// `None`: from the environment at bind time; `Some(s)`: as given.
    secret: Option<Option<ClusterSecret>>,
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
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_inflight: 64 << 20,
            secret: None,
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

    /// Sets the exchange (and server frame) deadline.
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// Sets the server's idle-connection deadline.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the server's connection cap.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the cluster secret peers must prove (`None`: no authentication). Without this
    /// call the secret comes from `MC_CLUSTER_SECRET_FILE`/`MC_CLUSTER_SECRET` at bind time.
    pub fn with_cluster_secret(mut self, secret: Option<ClusterSecret>) -> Self {
        self.secret = Some(secret);
        self
    }
}

struct Inner {
    name: String,
    local: EmbeddedMetadataStore,
    config: P2pConfig,
    secret: Option<ClusterSecret>,
    shutdown: AtomicBool,
    conns: Arc<Conns>,
    inflight: Budget,
    /// Idle client connections to peers (authenticated when we have a secret), reused by
    /// later lookups.
    pool: Mutex<std::collections::HashMap<String, Vec<async_net::TcpStream>>>,
    /// Answers Notify frames (the Python API's `TransferNotify`), when set.
    notify: Mutex<Option<NotifyHandler>>,
}

/// Handles the body of a Notify frame on the RPC port and returns the reply's body. It runs
/// on a blocking-task thread, never on the thread that serves the port.
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
///   changes only). The RPC port serves this process's descriptor to peers — with a cluster
///   secret, only to peers that proved it (see the module docs).
/// - `get` of a local key answers locally. `get("mooncake/[<cluster>/]ram/host:port")` of
///   another peer connects to it and fetches its descriptor (one round trip; two on a new
///   connection with a secret). A peer that is gone gives [`ErrorKind::PeerUnreachable`]; one
///   that publishes nothing gives `Ok(None)`; one that sends malformed JSON gives
///   [`ErrorKind::Protocol`] naming the peer; one that cannot prove the secret (or refuses
///   ours) gives a non-temporary [`ErrorKind::PeerUnreachable`] that says so.
/// - `get("mooncake/rpc_meta/host:port")` of a peer is answered from the name itself.
/// - Dropping the store closes the port: peers then find this node unreachable.
pub struct P2pHandshakeStore {
    inner: Arc<Inner>,
    addr: SocketAddr,
    rt: Runtime,
}

impl std::fmt::Debug for P2pHandshakeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pHandshakeStore")
            .field("name", &self.inner.name)
            .field("authenticated", &self.inner.secret.is_some())
            .finish_non_exhaustive()
    }
}

/// An authentication failure with `peer`: permanent (retrying cannot help).
fn refused(peer: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::PeerUnreachable,
        format!("refused the P2P handshake with {peer}: {why}"),
    )
    .with_context("peer", peer)
    .with_temporary(false)
}

/// Reads one frame of at most `max` bytes; also says whether bytes past it arrived.
async fn read_frame(conn: &mut async_net::TcpStream, max: usize) -> Result<(Frame, bool)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match decode_frame(&buf, max) {
            Ok(Some((f, used))) => return Ok((f, used < buf.len())),
            Ok(None) => {}
            Err(e) => return Err(Error::new(ErrorKind::Protocol, e.to_string())),
        }
        // Read no further than the frame (its length is known once 8 bytes are in).
        let want = match frame_len(&buf, max) {
            Ok(Some(total)) => (total - buf.len()).min(chunk.len()),
            _ => 8 - buf.len(),
        };
        let n = conn
            .read(&mut chunk[..want])
            .await
            .map_err(|e| Error::io("reading the handshake", &e))?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::PeerUnreachable,
                "the peer closed the handshake connection",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl P2pHandshakeStore {
    /// Binds the RPC port `host:port` (port 0 picks a free one). The segment name becomes
    /// `host:<bound port>`, so `host` must be an address peers can reach.
    ///
    /// The cluster secret is the config's, or (when it sets none) the environment's; a bad
    /// secret file is an [`ErrorKind::Config`] error.
    pub fn bind(host: &str, port: u16, config: P2pConfig) -> Result<Self> {
        let secret = match &config.secret {
            Some(s) => s.clone(),
            None => ClusterSecret::from_env()?,
        };
        let listener = serve::bind((host, port), &format!("the handshake port {host}:{port}"))?;
        let addr = listener
            .get_ref()
            .local_addr()
            .map_err(|e| Error::io("local_addr", &e))?;
        let name = if host.contains(':') {
            format!("[{host}]:{}", addr.port())
        } else {
            format!("{host}:{}", addr.port())
        };
        if secret.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %name,
                "the P2P handshake port listens beyond loopback without a cluster secret: anyone who can reach it \
                 reads this node's segment descriptor (set MC_CLUSTER_SECRET_FILE)"
            );
        }
        let inner = Arc::new(Inner {
            name,
            local: EmbeddedMetadataStore::new(),
            inflight: Budget::new(config.max_inflight.max(2 * config.max_message)),
            conns: Conns::new(config.max_connections),
            config,
            secret,
            shutdown: AtomicBool::new(false),
            pool: Mutex::new(Default::default()),
            notify: Mutex::new(None),
        });
        let rt = Runtime::start("mooncake-p2p", 1)?;
        let spawner = rt.spawner();
        let i = inner.clone();
        rt.spawn(serve::accept_loop(
            listener,
            "P2P handshake port",
            move |stream| {
                let stream = Arc::new(stream);
                match i.conns.admit(stream.clone()) {
                    Admit::Yes(guard) => spawner.spawn(serve_connection(i.clone(), stream, guard)),
                    Admit::Full => {
                        tracing::debug!("handshake connection cap reached and none idle: closing");
                        let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
                    }
                }
            },
        ));
        tracing::info!(name = %inner.name, authenticated = inner.secret.is_some(), "P2P handshake port listening");
        Ok(Self { inner, addr, rt })
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

    /// Whether peers must prove the cluster secret (and this store proves it to them).
    pub fn has_cluster_secret(&self) -> bool {
        self.inner.secret.is_some()
    }

    /// Connections the RPC port holds open now.
    pub fn open_connections(&self) -> usize {
        self.inner.conns.len()
    }

    /// Closes the idle client connections this store keeps to peers (the next lookup of
    /// each peer connects, and authenticates, again).
    pub fn close_idle_connections(&self) {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Serves Notify frames on the RPC port with `handler` (without one, a Notify frame
    /// closes the connection). With a cluster secret only authenticated peers reach it.
    pub fn set_notify_handler(&self, handler: NotifyHandler) {
        *self.inner.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Sends one frame of `kind` (Notify, Probe, …) to `peer` (`host:port`) and returns its
    /// reply, over a pooled connection, authenticated when this store has a cluster secret.
    pub async fn call(&self, peer: &str, kind: u8, body: &[u8]) -> Result<Frame> {
        self.request(peer, &encode_frame(kind, body)).await
    }

    /// A new connection to `peer`, authenticated when we have a secret. Returns it and the
    /// bytes to send before the first request (our proof: it travels with the request, so
    /// authentication costs one extra round trip).
    async fn open(&self, peer: &str) -> Result<(async_net::TcpStream, Vec<u8>)> {
        let cfg = &self.inner.config;
        let mut conn = net::connect(peer, cfg.connect_timeout, "the peer's handshake port")
            .await
            .map_err(|e| e.with_context("peer", peer))?;
        let Some(secret) = &self.inner.secret else {
            return Ok((conn, Vec::new()));
        };
        let hello = AuthHello {
            target: peer.to_string(),
            initiator: self.inner.name.clone(),
            nonce: mooncake_core::auth::nonce(),
        };
        let (reply, _) = net::with_timeout(
            cfg.io_timeout,
            &format!("authenticating with {peer}"),
            async {
                conn.write_all(&encode_frame(FRAME_AUTH_HELLO, &hello.encode()))
                    .await
                    .map_err(|e| Error::io("sending the handshake hello", &e))?;
                read_frame(&mut conn, MAX_AUTH_FRAME).await
            },
        )
        .await
        .map_err(|e| e.with_context("peer", peer))?;
        match reply.kind {
            FRAME_AUTH_CHALLENGE if reply.body.len() == NONCE_LEN + PROOF_LEN => {
                let (nonce, proof) = reply.body.split_at(NONCE_LEN);
                if !auth_verify(secret, AUTH_TARGET_ROLE, &hello, nonce, proof) {
                    return Err(refused(
                        peer,
                        "it did not prove the cluster secret (a different secret, or not the segment we asked for)",
                    ));
                }
                let mine = auth_proof(secret, AUTH_INITIATOR_ROLE, &hello, nonce);
                Ok((conn, encode_frame(FRAME_AUTH_PROOF, &mine)))
            }
            FRAME_AUTH_REFUSED => Err(refused(
                peer,
                &format!(
                    "it said: {}",
                    String::from_utf8_lossy(&reply.body[..reply.body.len().min(300)])
                ),
            )),
            other => Err(refused(
                peer,
                &format!(
                    "it did not prove the cluster secret (it answered frame type {other}: it has none configured, \
                     or is not a mooncake-rs peer)"
                ),
            )),
        }
    }

    async fn exchange(
        &self,
        conn: &mut async_net::TcpStream,
        prefix: &[u8],
        request: &[u8],
        peer: &str,
    ) -> Result<(Frame, bool)> {
        let cfg = &self.inner.config;
        net::with_timeout(
            cfg.io_timeout,
            &format!("metadata handshake with {peer}"),
            async {
                if prefix.is_empty() {
                    conn.write_all(request).await
                } else {
                    conn.write_all(&[prefix, request].concat()).await
                }
                .map_err(|e| Error::io("sending the metadata handshake", &e))?;
                read_frame(conn, cfg.max_message).await
            },
        )
        .await
    }

    async fn request(&self, peer: &str, request: &[u8]) -> Result<Frame> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let pooled = if attempt == 1 {
                self.inner.pool_take(peer)
            } else {
                None
            };
            let reused = pooled.is_some();
            let (mut conn, prefix) = match pooled {
                Some(c) => (c, Vec::new()),
                None => self.open(peer).await?,
            };
            match self.exchange(&mut conn, &prefix, request, peer).await {
                Ok((f, _)) if f.kind == FRAME_AUTH_REFUSED => {
                    return Err(refused(
                        peer,
                        &format!(
                            "it refused us: {}",
                            String::from_utf8_lossy(&f.body[..f.body.len().min(300)])
                        ),
                    ));
                }
                Ok((f, extra)) => {
                    if !extra {
                        self.inner.pool_put(peer, conn);
                    }
                    return Ok(f);
                }
                // An idle pooled connection may have been closed by the peer: retry fresh.
                Err(e) if reused && e.kind() != ErrorKind::Protocol => {
                    tracing::debug!(%peer, "pooled handshake connection failed, reconnecting: {e}");
                }
                Err(e) => return Err(e.with_context("peer", peer)),
            }
        }
    }

    async fn fetch(&self, peer: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let mine = self
            .inner
            .own_descriptor()
            .unwrap_or_else(|| b"{}".to_vec());
        let frame = self
            .request(peer, &encode_frame(FRAME_METADATA, &mine))
            .await?;
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
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.rt.stop();
        self.inner.conns.close_all();
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

/// What a connection on the RPC port may do.
enum Auth {
    /// Nothing but an AuthHello (we have a secret).
    Hello,
    /// Nothing but the proof for the challenge we sent.
    Proof(AuthHello, [u8; NONCE_LEN]),
    /// Anything (proven, or no secret configured).
    Open,
}

async fn serve_connection(inner: Arc<Inner>, stream: Arc<Async<TcpStream>>, guard: ConnGuard) {
    let peer = stream
        .get_ref()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(e) = serve(&inner, &stream, &guard).await {
        tracing::debug!(%peer, "handshake connection ended: {e}");
    }
}

/// Sends an AuthRefused frame and closes.
async fn refuse(stream: &Async<TcpStream>, why: &str) {
    let _ = serve::write_parts(
        stream,
        &[&encode_frame(FRAME_AUTH_REFUSED, why.as_bytes())],
        serve::deadline_after(Duration::from_secs(1)),
    )
    .await;
    serve::linger_close(stream, 64 * 1024, Duration::from_millis(500)).await;
}

async fn serve(inner: &Inner, stream: &Async<TcpStream>, guard: &ConnGuard) -> std::io::Result<()> {
    let cfg = &inner.config;
    let mut auth = if inner.secret.is_some() {
        Auth::Hello
    } else {
        Auth::Open
    };
    // The whole authentication must finish within one exchange deadline of the accept.
    let auth_deadline = serve::deadline_after(cfg.io_timeout);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let open = matches!(auth, Auth::Open);
        let max = if open {
            cfg.max_message
        } else {
            MAX_AUTH_FRAME
        };
        // Wait for a frame's first byte: idle (evictable) meanwhile.
        if buf.is_empty() {
            guard.set_idle(true);
            let idle = if open {
                serve::deadline_after(cfg.idle_timeout)
            } else {
                auth_deadline
            };
            let n = serve::read_some(stream, &mut buf, 8, idle).await?;
            if n == 0 || inner.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            guard.set_idle(false);
        }
        // The whole frame must arrive within the deadline, however it trickles.
        let deadline = if open {
            serve::deadline_after(cfg.io_timeout)
        } else {
            auth_deadline
        };
        let mut reserved = None;
        let (frame, used) = loop {
            match decode_frame(&buf, max) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("refusing a handshake frame: {e}");
                    if !open {
                        refuse(stream, &e.to_string()).await;
                    }
                    return Ok(());
                }
            }
            let want = match frame_len(&buf, max) {
                Ok(Some(total)) => {
                    if reserved.is_none() {
                        match inner.inflight.reserve(total) {
                            Some(r) => reserved = Some(r),
                            None => {
                                tracing::warn!(
                                    "too many handshake bytes in flight; closing a connection"
                                );
                                return Ok(());
                            }
                        }
                    }
                    (total - buf.len()).min(64 * 1024)
                }
                _ => 8 - buf.len(),
            };
            if serve::read_some(stream, &mut buf, want, deadline).await? == 0 {
                return Ok(());
            }
        };
        buf.drain(..used);
        let reply_deadline = serve::deadline_after(cfg.io_timeout);
        let reply = match (&auth, frame.kind) {
            (Auth::Open, FRAME_METADATA | FRAME_LEGACY) => {
                if let Ok(d) = SegmentDescriptor::from_json(&frame.body, "a handshake request") {
                    tracing::debug!(peer = %d.name, "metadata handshake");
                }
                encode_frame(FRAME_METADATA, &inner.own_descriptor().unwrap_or_default())
            }
            (Auth::Open, FRAME_PROBE) => encode_frame(FRAME_PROBE, b"{}"),
            (Auth::Open, FRAME_NOTIFY) => {
                let handler = inner
                    .notify
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let Some(h) = handler else {
                    tracing::warn!("a Notify frame and no notify handler; closing");
                    return Ok(());
                };
                let body = frame.body;
                encode_frame(FRAME_NOTIFY, &blocking::unblock(move || h(&body)).await)
            }
            (Auth::Open, FRAME_AUTH_HELLO) => {
                let why = if inner.secret.is_some() {
                    "this connection is already authenticated"
                } else {
                    "this peer has no cluster secret configured, so it cannot prove one"
                };
                refuse(stream, why).await;
                return Ok(());
            }
            (Auth::Open, other) => {
                tracing::warn!(
                    kind = other,
                    "unsupported handshake frame type on the metadata port; closing"
                );
                return Ok(());
            }
            (Auth::Hello, FRAME_AUTH_HELLO) => {
                let Some(hello) = AuthHello::decode(&frame.body) else {
                    refuse(stream, "malformed authentication hello").await;
                    return Ok(());
                };
                if hello.target != inner.name {
                    let why = format!("this is segment {:?}, not {:?}", inner.name, hello.target);
                    refuse(stream, &why).await;
                    return Ok(());
                }
                let Some(secret) = &inner.secret else {
                    return Ok(());
                };
                let nonce = mooncake_core::auth::nonce();
                let proof = auth_proof(secret, AUTH_TARGET_ROLE, &hello, &nonce);
                auth = Auth::Proof(hello, nonce);
                encode_frame(FRAME_AUTH_CHALLENGE, &[&nonce[..], &proof[..]].concat())
            }
            (Auth::Proof(hello, nonce), FRAME_AUTH_PROOF) => {
                let ok = inner.secret.as_ref().is_some_and(|s| {
                    auth_verify(s, AUTH_INITIATOR_ROLE, hello, nonce, &frame.body)
                });
                if !ok {
                    tracing::warn!(
                        initiator = %hello.initiator,
                        "refused a handshake peer that did not prove the cluster secret"
                    );
                    refuse(stream, "you did not prove the cluster secret").await;
                    return Ok(());
                }
                tracing::debug!(initiator = %hello.initiator, "handshake peer authenticated");
                auth = Auth::Open;
                continue;
            }
            (_, _) => {
                refuse(
                    stream,
                    "this peer requires the cluster secret (set MC_CLUSTER_SECRET_FILE or MC_CLUSTER_SECRET)",
                )
                .await;
                return Ok(());
            }
        };
        drop(reserved);
        serve::write_parts(stream, &[&reply], reply_deadline).await?;
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
