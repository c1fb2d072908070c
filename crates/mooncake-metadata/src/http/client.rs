//! [`HttpMetadataStore`]: the client of Mooncake's HTTP metadata API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_net::TcpStream;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use mooncake_core::{BoxFuture, Error, ErrorKind, MetadataStore, Result, WatchEvent, WatchStream};

use super::wire::{self, Decoded, Response};
use crate::net;

/// The URL scheme of this backend.
pub const HTTP_SCHEME: &str = "http";

/// Configuration of [`HttpMetadataStore`].
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Deadline of one request, connect included (default 5 s).
    pub timeout: Duration,
    /// Lease TTL for the keys this client writes (default `Some(10 s)`): a client that stops
    /// (crash, drop) loses its keys within the TTL. `None` writes plain keys, as Mooncake's
    /// C++ client does. Against a server without leases (Mooncake's Go or Python servers)
    /// keys are written plainly, with a warning.
    pub ttl: Option<Duration>,
    /// Largest response body accepted (default 72 MiB: the server's 64 MiB value limit plus
    /// room for a watch reply's framing).
    pub max_response: usize,
    /// Long-poll duration of watches (default 2 s).
    pub watch_poll: Duration,
    /// `None`: from the environment when the store is made; `Some(t)`: as given.
    token: Option<Option<String>>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("timeout", &self.timeout)
            .field("ttl", &self.ttl)
            .field("max_response", &self.max_response)
            .field("watch_poll", &self.watch_poll)
            .field(
                "token",
                &match &self.token {
                    None => "from the environment",
                    Some(None) => "none",
                    Some(Some(_)) => "<redacted>",
                },
            )
            .finish_non_exhaustive()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            ttl: Some(Duration::from_secs(10)),
            max_response: crate::HTTP_DEFAULT_MAX_BODY + (8 << 20),
            watch_poll: Duration::from_secs(2),
            token: None,
        }
    }
}

impl HttpConfig {
    /// Sets the lease TTL (`None`: no liveness).
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the request deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the bearer token sent with every request (`None`: none). Without this call the
    /// token comes from the environment ([`crate::auth::metadata_token_from_env`]:
    /// `MC_METADATA_TOKEN`, else derived from `MC_CLUSTER_SECRET_FILE`/`MC_CLUSTER_SECRET`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the token derived from `secret` (what a server started with that cluster secret
    /// requires), or none.
    pub fn with_cluster_secret(self, secret: Option<&mooncake_core::ClusterSecret>) -> Self {
        self.with_token(secret.map(crate::auth::metadata_token))
    }

    /// Sets the largest response body accepted.
    pub fn with_max_response(mut self, bytes: usize) -> Self {
        self.max_response = bytes;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    Unknown,
    Granted(u64),
    Unsupported,
}

struct Inner {
    authority: String,
    path: String,
    config: HttpConfig,
    token: Option<String>,
    pool: Mutex<Vec<TcpStream>>,
    lease: Mutex<LeaseState>,
    owned: Mutex<HashMap<String, Vec<u8>>>,
    keepalive_started: AtomicBool,
    stop: Arc<AtomicBool>,
}

/// A [`MetadataStore`] over Mooncake's HTTP metadata API (`http://host:port/metadata`).
///
/// # Behavior
/// - `get`/`put`/`delete` map to `GET`/`PUT`/`DELETE <path>?key=K`; 404 means absent. Each
///   value is one request body, so readers never see half of a put.
/// - Liveness: with [`HttpConfig::ttl`] set, keys are attached to a server-side lease that a
///   background thread keeps alive every TTL/3; when this store is dropped (or its process
///   dies) the server deletes them within the TTL. If the lease was lost (server restart),
///   the keepalive grants a new one and re-publishes this store's keys.
/// - `watch` long-polls `<path>/watch` (a mooncake-rs extension, see `mooncake_metadata::http::server`); a
///   Mooncake reference server answers 404 and `watch` fails with
///   [`ErrorKind::Unsupported`].
/// - Connections are HTTP/1.1 keep-alive, pooled; the client is async-io based and runs
///   under tokio, smol and plain `block_on`.
pub struct HttpMetadataStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HttpMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMetadataStore")
            .field("authority", &self.inner.authority)
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for HttpMetadataStore {
    fn drop(&mut self) {
        // Stops the keepalive; the server expires our leased keys within the TTL.
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

impl HttpMetadataStore {
    /// A client for `url` (`http://host:port/metadata`). Nothing is sent yet; see
    /// [`check`](Self::check). Fails with [`ErrorKind::Config`] on a bad URL, or a bad token
    /// or cluster secret in the environment.
    pub fn new(url: &str, config: HttpConfig) -> Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                Error::new(
                    ErrorKind::Config,
                    format!("{url}: https is not supported by the HTTP metadata client"),
                )
            } else {
                Error::new(ErrorKind::Config, format!("{url} is not an http:// URL"))
            }
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("{url}: missing host"),
            ));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let path = match path.trim_end_matches('/') {
            "" => "/metadata".to_string(),
            p => p.to_string(),
        };
        let token = match &config.token {
            Some(t) => t.clone(),
            None => crate::auth::metadata_token_from_env()?,
        };
        if let Some(t) = &token {
            crate::auth::check_token(t)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                authority,
                path,
                config,
                token,
                pool: Mutex::new(Vec::new()),
                lease: Mutex::new(LeaseState::Unknown),
                owned: Mutex::new(HashMap::new()),
                keepalive_started: AtomicBool::new(false),
                stop: Arc::new(AtomicBool::new(false)),
            }),
        })
    }

    /// Checks that the server answers (a `GET` of a key that need not exist).
    pub async fn check(&self) -> Result<()> {
        self.inner.get("mooncake/__ping__").await.map(|_| ())
    }

    /// The `host:port` this client talks to.
    pub fn authority(&self) -> &str {
        &self.inner.authority
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends `request` and decodes the reply as it arrives (each byte once, the body bounded by
/// `max`). Returns the response and whether the connection may be reused.
async fn exchange(conn: &mut TcpStream, request: &[u8], max: usize) -> Result<(Response, bool)> {
    conn.write_all(request)
        .await
        .map_err(|e| Error::io("sending an HTTP request", &e))?;
    let mut decoder = wire::ResponseDecoder::new(max);
    let mut chunk = vec![0u8; 64 * 1024];
    let malformed = |e: wire::ResponseError| match e {
        wire::ResponseError::Truncated => Error::new(
            ErrorKind::PeerUnreachable,
            "the server closed the connection mid-response",
        ),
        e => Error::new(ErrorKind::Protocol, format!("malformed HTTP response: {e}")),
    };
    loop {
        let n = conn
            .read(&mut chunk)
            .await
            .map_err(|e| Error::io("reading an HTTP response", &e))?;
        if n == 0 {
            if !decoder.started() {
                return Err(Error::new(
                    ErrorKind::PeerUnreachable,
                    "the server closed the connection",
                ));
            }
            return decoder.finish().map(|r| (r, false)).map_err(malformed);
        }
        match decoder.feed(&chunk[..n]).map_err(malformed)? {
            // Bytes past the response: the stream is out of step, do not reuse it.
            Decoded::Done(resp, used) => return Ok((resp, used == n)),
            Decoded::NeedMore => {}
        }
    }
}

impl Inner {
    fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }

    async fn request(
        &self,
        method: &str,
        pq: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response> {
        let bytes = wire::encode_request(method, &self.authority, pq, body, self.token.as_deref());
        for attempt in 0..2 {
            let pooled = if attempt == 0 {
                lock(&self.pool).pop()
            } else {
                None
            };
            let reused = pooled.is_some();
            let what = format!("{method} {}", self.url());
            let result = net::with_timeout(timeout, &what, async {
                let mut conn = match pooled {
                    Some(c) => c,
                    None => net::connect(&self.authority, timeout, "the HTTP metadata server")
                        .await
                        .map_err(|e| {
                            Error::new(
                                e.kind(),
                                format!(
                                    "{} (is `mooncake metadata-server` running at {}?)",
                                    e.message(),
                                    self.url()
                                ),
                            )
                        })?,
                };
                let (resp, reusable) =
                    exchange(&mut conn, &bytes, self.config.max_response).await?;
                Ok((conn, resp, reusable))
            })
            .await;
            match result {
                Ok((_, resp, _)) if resp.status == 401 || resp.status == 403 => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "the metadata server at {} refused our credentials (HTTP {}): {} — give this node the \
                             server's cluster secret (MC_CLUSTER_SECRET_FILE or MC_CLUSTER_SECRET) or its token \
                             (MC_METADATA_TOKEN)",
                            self.url(),
                            resp.status,
                            if self.token.is_some() {
                                "the token we sent is not the server's"
                            } else {
                                "we sent no token"
                            }
                        ),
                    ));
                }
                Ok((conn, resp, reusable)) => {
                    if resp.keep_alive && reusable {
                        let mut pool = lock(&self.pool);
                        if pool.len() < 16 {
                            pool.push(conn);
                        }
                    }
                    return Ok(resp);
                }
                // A pooled connection may have been closed by the server while idle.
                Err(e) if reused && e.kind() != ErrorKind::Timeout => {
                    tracing::debug!("retrying on a fresh connection: {e}");
                }
                Err(e) => return Err(e.with_context("server", self.url())),
            }
        }
        unreachable!("the second attempt always returns")
    }

    fn status_error(&self, what: &str, key: &str, resp: &Response) -> Error {
        Error::new(
            ErrorKind::Metadata,
            format!(
                "{what} {key:?} on {}: HTTP {} {}",
                self.url(),
                resp.status,
                String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
            ),
        )
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let pq = format!("{}?key={}", self.path, wire::percent_encode(key));
        let resp = self.request("GET", &pq, None, self.config.timeout).await?;
        match resp.status {
            200 => Ok(Some(resp.body)),
            404 => Ok(None),
            _ => Err(self.status_error("GET", key, &resp)),
        }
    }

    async fn put_raw(&self, key: &str, value: &[u8], lease: Option<u64>) -> Result<Response> {
        let mut pq = format!("{}?key={}", self.path, wire::percent_encode(key));
        if let Some(l) = lease {
            pq.push_str(&format!("&lease={l}"));
        }
        self.request("PUT", &pq, Some(value), self.config.timeout)
            .await
    }

    /// The lease to attach puts to, granting one if needed.
    async fn lease(self: &Arc<Self>) -> Result<Option<u64>> {
        let Some(ttl) = self.config.ttl else {
            return Ok(None);
        };
        match *lock(&self.lease) {
            LeaseState::Granted(id) => return Ok(Some(id)),
            LeaseState::Unsupported => return Ok(None),
            LeaseState::Unknown => {}
        }
        let pq = format!("{}/lease?ttl_ms={}", self.path, ttl.as_millis().max(1));
        let resp = self.request("POST", &pq, None, self.config.timeout).await?;
        let state = match resp.status {
            200 => {
                let id = std::str::from_utf8(&resp.body)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Protocol,
                            format!("{}: bad lease id in the lease reply", self.url()),
                        )
                    })?;
                LeaseState::Granted(id)
            }
            404 | 405 => {
                tracing::warn!(
                    server = %self.url(),
                    "the HTTP metadata server has no leases (not a mooncake-rs server): keys are written without \
                     liveness and stay after this process dies"
                );
                LeaseState::Unsupported
            }
            _ => return Err(self.status_error("POST", "lease", &resp)),
        };
        let mut cur = lock(&self.lease);
        if *cur == LeaseState::Unknown {
            *cur = state;
        }
        let chosen = *cur;
        drop(cur);
        if matches!(chosen, LeaseState::Granted(_))
            && !self.keepalive_started.swap(true, Ordering::SeqCst)
        {
            start_keepalive(self.clone(), ttl);
        }
        Ok(match chosen {
            LeaseState::Granted(id) => Some(id),
            _ => None,
        })
    }

    async fn put(self: &Arc<Self>, key: &str, value: Vec<u8>) -> Result<()> {
        let lease = self.lease().await?;
        if lease.is_some() {
            lock(&self.owned).insert(key.to_string(), value.clone());
        }
        let mut resp = self.put_raw(key, &value, lease).await?;
        if resp.status == 404 && lease.is_some() {
            // Our lease expired on the server (e.g. it restarted): grant a new one.
            {
                let mut l = lock(&self.lease);
                if *l == LeaseState::Granted(lease.unwrap_or_default()) {
                    *l = LeaseState::Unknown;
                }
            }
            let lease = self.lease().await?;
            resp = self.put_raw(key, &value, lease).await?;
        }
        match resp.status {
            200 | 201 | 204 => Ok(()),
            _ => Err(self.status_error("PUT", key, &resp)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        lock(&self.owned).remove(key);
        let pq = format!("{}?key={}", self.path, wire::percent_encode(key));
        let resp = self
            .request("DELETE", &pq, None, self.config.timeout)
            .await?;
        match resp.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.status_error("DELETE", key, &resp)),
        }
    }

    async fn watch_poll(
        &self,
        prefix: &str,
        after: Option<u64>,
    ) -> Result<(u64, Vec<wire::WireEvent>)> {
        let mut pq = format!(
            "{}/watch?prefix={}",
            self.path,
            wire::percent_encode(prefix)
        );
        let mut timeout = self.config.timeout;
        if let Some(a) = after {
            pq.push_str(&format!(
                "&after={a}&timeout_ms={}",
                self.config.watch_poll.as_millis()
            ));
            timeout += self.config.watch_poll;
        }
        let resp = self.request("GET", &pq, None, timeout).await?;
        match resp.status {
            200 => {}
            404 | 405 => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} does not support watch (a mooncake-rs metadata server does)",
                        self.url()
                    ),
                ));
            }
            410 => {
                return Err(Error::new(
                    ErrorKind::Metadata,
                    format!("watch of {prefix:?} fell behind the server"),
                ));
            }
            _ => return Err(self.status_error("watch", prefix, &resp)),
        }
        let rev = resp
            .header("x-mooncake-revision")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "watch reply without x-mooncake-revision",
                )
            })?;
        let events =
            wire::decode_events(&resp.body).map_err(|e| Error::new(ErrorKind::Protocol, e))?;
        Ok((rev, events))
    }
}

fn start_keepalive(inner: Arc<Inner>, ttl: Duration) {
    let stop = inner.stop.clone();
    let spawned = std::thread::Builder::new()
        .name("mooncake-http-keepalive".into())
        .spawn(move || {
            let period = (ttl / 3).max(Duration::from_millis(50));
            let weak = Arc::downgrade(&inner);
            drop(inner);
            loop {
                std::thread::sleep(period);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = futures_lite::future::block_on(keepalive_once(&inner)) {
                    tracing::warn!(server = %inner.url(), "lease keepalive failed: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the HTTP lease keepalive thread: {e}");
    }
}

async fn keepalive_once(inner: &Arc<Inner>) -> Result<()> {
    let LeaseState::Granted(id) = *lock(&inner.lease) else {
        return Ok(());
    };
    let pq = format!("{}/lease/keepalive?id={id}", inner.path);
    let resp = inner
        .request("POST", &pq, None, inner.config.timeout)
        .await?;
    if resp.status == 200 {
        return Ok(());
    }
    if resp.status != 404 {
        return Err(inner.status_error("keepalive", "lease", &resp));
    }
    tracing::warn!(server = %inner.url(), lease = id, "lease lost; re-publishing this node's keys under a new lease");
    {
        let mut l = lock(&inner.lease);
        if *l == LeaseState::Granted(id) {
            *l = LeaseState::Unknown;
        }
    }
    let lease = inner.lease().await?;
    let owned: Vec<(String, Vec<u8>)> = lock(&inner.owned)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in owned {
        // Skip keys deleted or rewritten meanwhile.
        if lock(&inner.owned).get(&k) == Some(&v) {
            inner.put_raw(&k, &v, lease).await?;
        }
    }
    Ok(())
}

impl MetadataStore for HttpMetadataStore {
    fn scheme(&self) -> &'static str {
        HTTP_SCHEME
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        Box::pin(self.inner.get(key))
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.put(key, value))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.delete(key))
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        Box::pin(async move {
            let (rev, _) = self.inner.watch_poll(prefix, None).await?;
            // A stream of long polls, driven by whoever polls it (no thread of its own).
            struct State {
                inner: Arc<Inner>,
                prefix: String,
                rev: u64,
                pending: std::collections::VecDeque<WatchEvent>,
                backoff: Duration,
            }
            let state = State {
                inner: self.inner.clone(),
                prefix: prefix.to_string(),
                rev,
                pending: Default::default(),
                backoff: Duration::from_millis(50),
            };
            let stream = futures_lite::stream::unfold(state, |mut st| async move {
                loop {
                    if let Some(ev) = st.pending.pop_front() {
                        return Some((ev, st));
                    }
                    match st.inner.watch_poll(&st.prefix, Some(st.rev)).await {
                        Ok((next, events)) => {
                            st.backoff = Duration::from_millis(50);
                            for e in events {
                                st.rev = st.rev.max(e.revision);
                                st.pending.push_back(match e.value {
                                    Some(value) => WatchEvent::Put { key: e.key, value },
                                    None => WatchEvent::Delete { key: e.key },
                                });
                            }
                            st.rev = st.rev.max(next);
                        }
                        Err(e) if e.kind() == ErrorKind::Metadata => {
                            // 410: changes were lost (the log moved on, or the server
                            // restarted). End the stream: the owner re-subscribes and re-reads.
                            tracing::warn!(prefix = %st.prefix, "watch ended: {e}");
                            return None;
                        }
                        Err(e) => {
                            tracing::warn!(prefix = %st.prefix, "watch poll failed, retrying: {e}");
                            async_io::Timer::after(st.backoff).await;
                            st.backoff = (st.backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            });
            Ok(WatchStream::new(stream))
        })
    }
}
