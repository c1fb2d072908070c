//! The redis backend: keys and values as Mooncake writes them (`SET mooncake/ram/<seg> <json>`),
//! plus TTL liveness and a watch channel.
//!
//! # Behavior
//! - `put` runs one Lua script: `SET key value [PX ttl]` and `PUBLISH <watch channel>` of the
//!   change, atomically, so watchers see changes in the order redis applied them and readers
//!   see whole values only.
//! - Liveness: with [`RedisConfig::ttl`] (default 10 s) keys carry a TTL that a keepalive
//!   thread refreshes (`PEXPIRE`, pipelined) every TTL/3. When this store is dropped or its
//!   process dies, its keys expire within the TTL. A key that vanished while the store is alive
//!   (redis restart, eviction) is re-published with `SET … NX`.
//! - Watch subscribes to the store's channel `__mooncake_watch@<db>__` (puts and deletes made
//!   through mooncake-rs) and to `__keyevent@<db>__:expired` (expiries; the store turns on
//!   `notify-keyspace-events Ex` if the server allows `CONFIG SET`, otherwise it warns).
//!   Changes made by Mooncake's C++ client (plain `SET`, no publish) are not seen by watchers.
//! - Connection: a multiplexed connection whose driver runs on smol's executor, created off
//!   any tokio context, so calls work under tokio, smol and plain `block_on`. A broken
//!   connection is replaced on the next call.
//! - `MC_REDIS_PASSWORD`, `MC_REDIS_USERNAME` and `MC_REDIS_DB_INDEX` apply when the URL has
//!   no credentials or database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_lite::StreamExt;
use mooncake_core::{BoxFuture, Error, ErrorKind, MetadataStore, Result, WatchEvent, WatchStream};
use redis::aio::MultiplexedConnection;

/// The URL scheme of this backend.
pub const REDIS_SCHEME: &str = "redis";

const PUT_SCRIPT: &str = r"
if ARGV[2] == '0' then redis.call('SET', KEYS[1], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
redis.call('PUBLISH', ARGV[3], 'P' .. string.len(KEYS[1]) .. ':' .. KEYS[1] .. ARGV[1])
return 1";

const REPUT_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
  redis.call('PUBLISH', ARGV[3], 'P' .. string.len(KEYS[1]) .. ':' .. KEYS[1] .. ARGV[1])
  return 1
end
return 0";

const DELETE_SCRIPT: &str = r"
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('PUBLISH', ARGV[1], 'D' .. string.len(KEYS[1]) .. ':' .. KEYS[1])
  return 1
end
return 0";

/// Configuration of [`RedisMetadataStore`].
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// TTL of the keys this store writes, refreshed while it lives (default `Some(10 s)`);
    /// `None` writes keys without expiry, as Mooncake's C++ client does.
    pub ttl: Option<Duration>,
    /// Deadline of one command (default 5 s).
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            ttl: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(5),
        }
    }
}

impl RedisConfig {
    /// Sets the key TTL (`None`: no liveness).
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }
}

struct Inner {
    client: redis::Client,
    url_shown: String,
    config: RedisConfig,
    db: i64,
    conn: Mutex<Option<MultiplexedConnection>>,
    owned: Mutex<HashMap<String, Vec<u8>>>,
    stop: AtomicBool,
}

/// A [`MetadataStore`] on redis. See the [module docs](self) for the contract.
pub struct RedisMetadataStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMetadataStore")
            .field("server", &self.inner.url_shown)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisMetadataStore {
    fn drop(&mut self) {
        // Stops the keepalive; our keys expire within the TTL.
        self.inner.stop.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn redis_err(what: &str, server: &str, e: &redis::RedisError) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
        ErrorKind::PeerUnreachable
    } else {
        ErrorKind::Metadata
    };
    Error::new(kind, format!("redis {what} on {server}: {e}"))
}

/// Adds `MC_REDIS_USERNAME`/`MC_REDIS_PASSWORD`/`MC_REDIS_DB_INDEX` to a URL that lacks them.
fn effective_url(url: &str) -> Result<(String, i64)> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| Error::new(ErrorKind::Config, format!("{url} is not a redis:// URL")))?;
    let (auth_host, db) = match rest.split_once('/') {
        Some((a, d)) if !d.is_empty() => (a.to_string(), Some(d.to_string())),
        Some((a, _)) => (a.to_string(), None),
        None => (rest.to_string(), None),
    };
    let mut auth_host = auth_host;
    let password = std::env::var("MC_REDIS_PASSWORD")
        .ok()
        .filter(|_| !auth_host.contains('@'));
    if let Some(pw) = password {
        let user = std::env::var("MC_REDIS_USERNAME").unwrap_or_default();
        auth_host = format!("{user}:{pw}@{auth_host}");
    }
    let db = db.or_else(|| std::env::var("MC_REDIS_DB_INDEX").ok());
    let db_n: i64 = match &db {
        Some(d) => d
            .parse()
            .ok()
            .filter(|n| (0..=255).contains(n))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("bad redis database index {d:?} (0..255)"),
                )
            })?,
        None => 0,
    };
    Ok((format!("{scheme}://{auth_host}/{db_n}"), db_n))
}

/// Runs `f` on a fresh thread with no tokio context (so redis spawns its drivers on smol's
/// executor, which outlives any caller's runtime) and awaits its result.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("mooncake-redis-connect".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Error::io("spawning a redis helper thread", &e))?;
    rx.await
        .map_err(|_| Error::new(ErrorKind::Metadata, "redis helper thread died"))
}

impl Inner {
    fn watch_channel(&self) -> String {
        format!("__mooncake_watch@{}__", self.db)
    }

    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        let client = self.client.clone();
        let timeout = self.config.timeout;
        let c = off_runtime(move || {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            futures_lite::future::block_on(
                client.get_multiplexed_async_connection_with_config(&cfg),
            )
        })
        .await?
        .map_err(|e| redis_err("connect", &self.url_shown, &e))?;
        *lock(&self.conn) = Some(c.clone());
        Ok(c)
    }

    async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        let mut c = self.conn().await?;
        match cmd.query_async::<T>(&mut c).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    *lock(&self.conn) = None;
                }
                Err(redis_err(what, &self.url_shown, &e))
            }
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.config.ttl.map_or(0, |t| t.as_millis().max(1) as u64)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        if self.config.ttl.is_some() {
            lock(&self.owned).insert(key.to_string(), value.clone());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUT_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(value)
            .arg(self.ttl_ms())
            .arg(self.watch_channel());
        self.run::<i64>("SET", &cmd)
            .await
            .map_err(|e| e.with_context("key", key))?;
        Ok(())
    }

    async fn keepalive_once(&self) -> Result<()> {
        let owned: Vec<(String, Vec<u8>)> = lock(&self.owned)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if owned.is_empty() {
            return Ok(());
        }
        let ttl = self.ttl_ms();
        let mut pipe = redis::pipe();
        for (k, _) in &owned {
            pipe.cmd("PEXPIRE").arg(k).arg(ttl);
        }
        let mut c = self.conn().await?;
        let alive: Vec<i64> = pipe.query_async(&mut c).await.map_err(|e| {
            *lock(&self.conn) = None;
            redis_err("PEXPIRE", &self.url_shown, &e)
        })?;
        for ((k, v), a) in owned.into_iter().zip(alive) {
            if a == 0 && lock(&self.owned).get(&k) == Some(&v) {
                tracing::warn!(key = %k, "key vanished while its owner is alive; re-publishing it");
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(REPUT_SCRIPT)
                    .arg(1)
                    .arg(&k)
                    .arg(v)
                    .arg(ttl)
                    .arg(self.watch_channel());
                self.run::<i64>("SET NX", &cmd).await?;
            }
        }
        Ok(())
    }
}

impl RedisMetadataStore {
    /// Connects to `url` (`redis://[user:pass@]host:6379[/db]`) and checks it with `PING`.
    /// Blocks the calling thread (setup call).
    pub fn connect(url: &str, config: RedisConfig) -> Result<Self> {
        mooncake_core::block_on(Self::connect_async(url, config))
    }

    /// [`connect`](Self::connect) as a future.
    pub async fn connect_async(url: &str, config: RedisConfig) -> Result<Self> {
        let (eff, db) = effective_url(url)?;
        let client = redis::Client::open(eff.as_str())
            .map_err(|e| Error::new(ErrorKind::Config, format!("bad redis URL {url}: {e}")))?;
        let url_shown = url
            .split('@')
            .next_back()
            .map(|h| format!("redis://{}", h.trim_start_matches("redis://")))
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            client,
            url_shown,
            config,
            db,
            conn: Mutex::new(None),
            owned: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let pong: String = inner.run("PING", &redis::cmd("PING")).await?;
        if pong != "PONG" {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("{url} answered PING with {pong:?}"),
            ));
        }
        if let Some(ttl) = inner.config.ttl {
            let weak = Arc::downgrade(&inner);
            let period = (ttl / 3).max(Duration::from_millis(50));
            std::thread::Builder::new()
                .name("mooncake-redis-keepalive".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(period);
                        let Some(inner) = weak.upgrade() else { return };
                        if inner.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Err(e) = futures_lite::future::block_on(inner.keepalive_once()) {
                            tracing::warn!("redis keepalive failed: {e}");
                        }
                    }
                })
                .map_err(|e| Error::io("spawning the redis keepalive thread", &e))?;
        }
        Ok(Self { inner })
    }

    async fn watch_impl(&self, prefix: &str) -> Result<WatchStream> {
        let inner = &self.inner;
        // Expiry notifications need `E` (keyevent) and `x` (expired) in notify-keyspace-events.
        let cfg: Vec<String> = inner
            .run(
                "CONFIG GET",
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("notify-keyspace-events"),
            )
            .await
            .unwrap_or_default();
        let flags = cfg.get(1).cloned().unwrap_or_default();
        if !(flags.contains('E') && (flags.contains('x') || flags.contains('A'))) {
            let want = format!("{flags}Ex");
            if let Err(e) = inner
                .run::<()>(
                    "CONFIG SET",
                    redis::cmd("CONFIG")
                        .arg("SET")
                        .arg("notify-keyspace-events")
                        .arg(&want),
                )
                .await
            {
                tracing::warn!(
                    "cannot enable expiry notifications (watchers will miss expiries): {e}"
                );
            }
        }
        let client = inner.client.clone();
        let channel = inner.watch_channel();
        let expired = format!("__keyevent@{}__:expired", inner.db);
        let server = inner.url_shown.clone();
        let prefix = prefix.to_string();
        let (tx, rx) = mpsc::unbounded();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        std::thread::Builder::new()
            .name("mooncake-redis-watch".into())
            .spawn(move || {
                futures_lite::future::block_on(async move {
                    let sub = async {
                        let mut ps = client.get_async_pubsub().await?;
                        ps.subscribe(&channel).await?;
                        ps.subscribe(&expired).await?;
                        Ok::<_, redis::RedisError>(ps)
                    };
                    let ps = match sub.await {
                        Ok(ps) => {
                            let _ = ready_tx.send(Ok(()));
                            ps
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(redis_err("SUBSCRIBE", &server, &e)));
                            return;
                        }
                    };
                    let mut stream = ps.into_on_message();
                    loop {
                        let next = futures_lite::future::or(async { Some(stream.next().await) }, async {
                            async_io::Timer::after(Duration::from_millis(500)).await;
                            None
                        })
                        .await;
                        if tx.is_closed() {
                            return;
                        }
                        let msg = match next {
                            None => continue,
                            Some(None) => {
                                tracing::error!(%server, "redis watch connection closed");
                                return;
                            }
                            Some(Some(m)) => m,
                        };
                        let payload = msg.get_payload_bytes();
                        let ev = if msg.get_channel_name() == expired {
                            String::from_utf8(payload.to_vec()).ok().map(|key| WatchEvent::Delete { key })
                        } else {
                            decode_change(payload)
                        };
                        match ev {
                            Some(ev) if ev.key().starts_with(prefix.as_str()) => {
                                if tx.unbounded_send(ev).is_err() {
                                    return;
                                }
                            }
                            Some(_) => {}
                            None => tracing::warn!(%server, "malformed watch message on {}", msg.get_channel_name()),
                        }
                    }
                });
            })
            .map_err(|e| Error::io("spawning the redis watch thread", &e))?;
        ready_rx
            .await
            .map_err(|_| Error::new(ErrorKind::Metadata, "redis watch thread died"))??;
        Ok(WatchStream::new(rx))
    }
}

/// Decodes `P<keylen>:<key><value>` or `D<keylen>:<key>`.
fn decode_change(p: &[u8]) -> Option<WatchEvent> {
    let op = *p.first()?;
    let colon = p.iter().position(|&b| b == b':')?;
    let klen: usize = std::str::from_utf8(&p[1..colon]).ok()?.parse().ok()?;
    let key_end = colon.checked_add(1)?.checked_add(klen)?;
    let key = String::from_utf8(p.get(colon + 1..key_end)?.to_vec()).ok()?;
    match op {
        b'P' => Some(WatchEvent::Put {
            key,
            value: p[key_end..].to_vec(),
        }),
        b'D' if key_end == p.len() => Some(WatchEvent::Delete { key }),
        _ => None,
    }
}

impl MetadataStore for RedisMetadataStore {
    fn scheme(&self) -> &'static str {
        REDIS_SCHEME
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        Box::pin(async move {
            self.inner
                .run::<Option<Vec<u8>>>("GET", redis::cmd("GET").arg(key))
                .await
                .map_err(|e| e.with_context("key", key))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.put(key, value))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            lock(&self.inner.owned).remove(key);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(DELETE_SCRIPT)
                .arg(1)
                .arg(key)
                .arg(self.inner.watch_channel());
            self.inner
                .run::<i64>("DEL", &cmd)
                .await
                .map_err(|e| e.with_context("key", key))?;
            Ok(())
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        Box::pin(self.watch_impl(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_messages() {
        assert_eq!(
            decode_change(b"P3:a:bxyz"),
            Some(WatchEvent::Put {
                key: "a:b".into(),
                value: b"xyz".to_vec()
            })
        );
        assert_eq!(
            decode_change(b"D1:k"),
            Some(WatchEvent::Delete { key: "k".into() })
        );
        assert_eq!(decode_change(b"D9:k"), None);
        assert_eq!(decode_change(b"X1:k"), None);
        assert_eq!(decode_change(b""), None);
    }

    #[test]
    fn urls_take_env_defaults() {
        assert_eq!(effective_url("redis://h:1").unwrap().1, 0);
        assert_eq!(
            effective_url("redis://h:1/3").unwrap(),
            ("redis://h:1/3".to_string(), 3)
        );
        assert!(effective_url("redis://h:1/999").is_err());
    }
}
