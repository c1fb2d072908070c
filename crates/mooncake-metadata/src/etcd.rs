//! The etcd backend (etcd-client on a private tokio runtime).
//!
//! # Behavior
//! - Keys and values as Mooncake writes them; one etcd `Put` per value (atomic).
//! - Liveness: with [`EtcdConfig::ttl`] (default 10 s) every key this store writes is attached
//!   to one etcd lease, kept alive every TTL/3 by a task on the private runtime. Dropping the
//!   store (or killing the process) stops the keepalive, and etcd deletes the keys within the
//!   TTL. If the lease is lost while the store lives (a long partition), a new lease is granted
//!   and the store's keys are re-published where absent (a create-only transaction).
//! - Watch uses etcd's prefix watch: events arrive in revision order, expiries as deletes.
//! - etcd-client needs a tokio reactor and panics without one, so all its calls run on a
//!   private one-thread tokio runtime (`mooncake-etcd`) and results come back over oneshot
//!   channels: callers may use tokio, smol or a plain `block_on`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures_channel::{mpsc, oneshot};
use mooncake_core::{BoxFuture, Error, ErrorKind, MetadataStore, Result, WatchEvent, WatchStream};

/// The URL scheme of this backend.
pub const ETCD_SCHEME: &str = "etcd";

/// Configuration of [`EtcdMetadataStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Lease TTL of the keys this store writes (default `Some(10 s)`, rounded up to whole
    /// seconds, at least 2 s); `None` writes keys without a lease.
    pub ttl: Option<Duration>,
    /// Deadline of one request and of connecting (default 5 s).
    pub timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            ttl: Some(Duration::from_secs(10)),
            timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// Sets the lease TTL (`None`: no liveness).
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }
}

fn etcd_err(what: &str, server: &str, e: &etcd_client::Error) -> Error {
    let msg = e.to_string();
    let kind = match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            ErrorKind::PeerUnreachable
        }
        etcd_client::Error::GRpcStatus(s)
            if msg.contains("Unavailable") || s.message().contains("connect") =>
        {
            ErrorKind::PeerUnreachable
        }
        _ => ErrorKind::Metadata,
    };
    Error::new(kind, format!("etcd {what} on {server}: {msg}"))
}

struct Shared {
    client: Client,
    server: String,
    lease: AtomicI64,
    ttl_secs: i64,
    owned: Mutex<HashMap<String, Vec<u8>>>,
}

/// A [`MetadataStore`] on etcd. See the [module docs](self) for the contract.
pub struct EtcdMetadataStore {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMetadataStore")
            .field("server", &self.shared.server)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdMetadataStore {
    fn drop(&mut self) {
        // Kills the keepalive and watch tasks without blocking (safe inside any runtime);
        // etcd expires this store's lease within the TTL.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn on_runtime<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    handle.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.await
        .map_err(|_| Error::new(ErrorKind::Closed, "the etcd runtime stopped"))
}

fn endpoints(url: &str) -> Result<Vec<String>> {
    let rest = url
        .strip_prefix("etcd://")
        .unwrap_or(url)
        .trim_end_matches('/');
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if eps.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{url}: no etcd endpoint (etcd://host:2379)"),
        ));
    }
    Ok(eps)
}

impl EtcdMetadataStore {
    /// Connects to `url` (`etcd://h1:2379[,h2:2379]` or `h:2379`), checks the cluster answers
    /// and grants the lease. Blocks the calling thread (setup call); safe to call inside an
    /// async runtime (the work happens on the store's own runtime thread).
    pub fn connect(url: &str, config: EtcdConfig) -> Result<Self> {
        let url = url.to_string();
        std::thread::Builder::new()
            .name("mooncake-etcd-connect".into())
            .spawn(move || Self::connect_here(&url, config))
            .map_err(|e| Error::io("spawning the etcd connect thread", &e))?
            .join()
            .map_err(|_| Error::new(ErrorKind::Metadata, "the etcd connect thread panicked"))?
    }

    /// [`connect`](Self::connect) as a future (runtime-agnostic).
    pub async fn connect_async(url: &str, config: EtcdConfig) -> Result<Self> {
        let url = url.to_string();
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("mooncake-etcd-connect".into())
            .spawn(move || {
                let _ = tx.send(Self::connect_here(&url, config));
            })
            .map_err(|e| Error::io("spawning the etcd connect thread", &e))?;
        rx.await
            .map_err(|_| Error::new(ErrorKind::Metadata, "the etcd connect thread panicked"))?
    }

    fn connect_here(url: &str, config: EtcdConfig) -> Result<Self> {
        let eps = endpoints(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mooncake-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the etcd runtime", &e))?;
        let handle = runtime.handle().clone();
        let server = url.to_string();
        let timeout = config.timeout;
        let ttl_secs = config
            .ttl
            .map_or(0, |t| (t.as_millis().div_ceil(1000) as i64).max(2));
        let s = server.clone();
        let connect = async move {
            let opts = ConnectOptions::new()
                .with_connect_timeout(timeout)
                .with_timeout(timeout);
            let mut client = tokio::time::timeout(timeout, Client::connect(eps, Some(opts)))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("connecting to etcd at {s} took over {timeout:?}"),
                    )
                })?
                .map_err(|e| etcd_err("connect", &s, &e))?;
            // A cheap request proves the cluster answers.
            tokio::time::timeout(timeout, client.get("mooncake/__ping__", None))
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::PeerUnreachable,
                        format!("etcd at {s} did not answer within {timeout:?}"),
                    )
                })?
                .map_err(|e| etcd_err("get", &s, &e))?;
            let lease = if ttl_secs > 0 {
                client
                    .lease_grant(ttl_secs, None)
                    .await
                    .map_err(|e| etcd_err("lease grant", &s, &e))?
                    .id()
            } else {
                0
            };
            Ok::<_, Error>((client, lease))
        };
        let (client, lease) = runtime.block_on(connect)?;
        let shared = Arc::new(Shared {
            client,
            server,
            lease: AtomicI64::new(lease),
            ttl_secs,
            owned: Mutex::new(HashMap::new()),
        });
        if ttl_secs > 0 {
            handle.spawn(keepalive(shared.clone()));
        }
        Ok(Self {
            shared,
            handle,
            runtime: Some(runtime),
        })
    }

    /// The lease id this store's keys live under (0 without liveness).
    pub fn lease_id(&self) -> i64 {
        self.shared.lease.load(Ordering::SeqCst)
    }
}

async fn keepalive(shared: Arc<Shared>) {
    let period = Duration::from_millis((shared.ttl_secs as u64 * 1000 / 3).max(300));
    loop {
        let lease = shared.lease.load(Ordering::SeqCst);
        let mut client = shared.client.clone();
        let alive = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<bool, etcd_client::Error>(false),
                }
                tokio::time::sleep(period).await;
            }
        }
        .await;
        match alive {
            Ok(_) => {
                tracing::warn!(server = %shared.server, lease, "etcd lease lost; re-publishing this node's keys");
                if let Err(e) = regrant(&shared).await {
                    tracing::warn!(server = %shared.server, "re-publishing failed: {e}");
                    tokio::time::sleep(period).await;
                }
            }
            Err(e) => {
                tracing::warn!(server = %shared.server, lease, "etcd keepalive failed, retrying: {e}");
                tokio::time::sleep(period.min(Duration::from_secs(1))).await;
            }
        }
    }
}

async fn regrant(shared: &Shared) -> Result<()> {
    let mut client = shared.client.clone();
    let id = client
        .lease_grant(shared.ttl_secs, None)
        .await
        .map_err(|e| etcd_err("lease grant", &shared.server, &e))?
        .id();
    shared.lease.store(id, Ordering::SeqCst);
    let owned: Vec<(String, Vec<u8>)> = lock(&shared.owned)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in owned {
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k.clone(),
                v,
                Some(PutOptions::new().with_lease(id)),
            )]);
        client
            .txn(txn)
            .await
            .map_err(|e| etcd_err("txn", &shared.server, &e))?;
    }
    Ok(())
}

impl MetadataStore for EtcdMetadataStore {
    fn scheme(&self) -> &'static str {
        ETCD_SCHEME
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        let shared = self.shared.clone();
        let k = key.to_string();
        Box::pin(async move {
            on_runtime(&self.handle, async move {
                let mut c = shared.client.clone();
                let r = c
                    .get(k.as_str(), None)
                    .await
                    .map_err(|e| etcd_err("get", &shared.server, &e).with_context("key", &k))?;
                Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
            })
            .await?
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        let shared = self.shared.clone();
        let k = key.to_string();
        Box::pin(async move {
            on_runtime(&self.handle, async move {
                let c = shared.client.clone();
                if shared.ttl_secs > 0 {
                    lock(&shared.owned).insert(k.clone(), value.clone());
                }
                let put = |lease: i64| {
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    let mut c = c.clone();
                    let (k, v) = (k.clone(), value.clone());
                    async move { c.put(k, v, opts).await }
                };
                let lease = shared.lease.load(Ordering::SeqCst);
                match put(lease).await {
                    Ok(_) => Ok(()),
                    Err(e) if lease != 0 && e.to_string().contains("lease not found") => {
                        // The lease expired under us: take a new one (and re-publish), retry.
                        regrant(&shared).await?;
                        put(shared.lease.load(Ordering::SeqCst))
                            .await
                            .map(|_| ())
                            .map_err(|e| {
                                etcd_err("put", &shared.server, &e).with_context("key", &k)
                            })
                    }
                    Err(e) => Err(etcd_err("put", &shared.server, &e).with_context("key", &k)),
                }
            })
            .await?
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        let shared = self.shared.clone();
        let k = key.to_string();
        Box::pin(async move {
            on_runtime(&self.handle, async move {
                lock(&shared.owned).remove(&k);
                let mut c = shared.client.clone();
                c.delete(k.as_str(), None)
                    .await
                    .map_err(|e| etcd_err("delete", &shared.server, &e).with_context("key", &k))?;
                Ok(())
            })
            .await?
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        let shared = self.shared.clone();
        let p = prefix.to_string();
        let (tx, rx) = mpsc::unbounded();
        Box::pin(async move {
            on_runtime(&self.handle, async move {
                let mut c = shared.client.clone();
                let mut stream = c
                    .watch(p.as_str(), Some(WatchOptions::new().with_prefix()))
                    .await
                    .map_err(|e| etcd_err("watch", &shared.server, &e))?;
                // Wait until etcd confirms the watch, so later changes are all seen.
                loop {
                    match stream
                        .message()
                        .await
                        .map_err(|e| etcd_err("watch", &shared.server, &e))?
                    {
                        Some(r) if r.created() => break,
                        Some(_) => {}
                        None => {
                            return Err(Error::new(
                                ErrorKind::Metadata,
                                "etcd closed the watch at creation",
                            ));
                        }
                    }
                }
                let server = shared.server.clone();
                tokio::spawn(async move {
                    loop {
                        let msg = tokio::select! {
                            m = stream.message() => m,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                                if tx.is_closed() { return; }
                                continue;
                            }
                        };
                        let resp = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => {
                                tracing::error!(%server, "etcd closed the watch");
                                return;
                            }
                            Err(e) => {
                                tracing::error!(%server, "etcd watch failed: {e}");
                                return;
                            }
                        };
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Ok(key) = String::from_utf8(kv.key().to_vec()) else {
                                continue;
                            };
                            let out = match ev.event_type() {
                                EventType::Put => WatchEvent::Put {
                                    key,
                                    value: kv.value().to_vec(),
                                },
                                EventType::Delete => WatchEvent::Delete { key },
                            };
                            if tx.unbounded_send(out).is_err() {
                                return;
                            }
                        }
                    }
                });
                Ok(())
            })
            .await??;
            Ok(WatchStream::new(rx))
        })
    }
}
