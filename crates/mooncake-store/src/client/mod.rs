//! [`StoreClient`]: the store's client library (requester, and storage node when it mounts a
//! segment).
//!
//! # Blocking and async forms
//!
//! Every operation has a blocking form (`put_from`) and an async form (`put_from_async`).
//! Both run the same code: the blocking form does its socket I/O on the calling thread (a pool
//! of master connections, no hand-off to another thread) and waits for transfers with
//! [`Batch::wait_blocking`](mooncake_core::Batch::wait_blocking); the async form uses
//! `async-io` sockets and [`Batch::wait`](mooncake_core::Batch::wait), so any executor (tokio,
//! smol, a plain `block_on`) can poll it. Dropping an async future abandons the operation: an
//! unfinished put is revoked by the master after `put_start_discard_timeout`, and buffers stay
//! leased by the engine until their transfers end.
//!
//! # Operations
//!
//! - **Put** = `BatchPutStart` (one RPC for the batch) → every replica of every key written
//!   through ONE engine batch (or a memcpy for a segment mapped in this process) →
//!   `BatchPutFinish` (one RPC: publish the keys whose writes all succeeded, revoke the others,
//!   report the segments that failed so they leave placement at once). Putting an existing
//!   key succeeds and keeps the old value; `upsert` replaces it.
//! - **Get** = `BatchGetReplicas` (one RPC, grants a read lease) → read the nearest replica
//!   (this process's segment or a same-host store-node's mapping: a memcpy; else the
//!   engine), failing over to the next replica when a read fails → `LEASE_EXPIRED` (-707) for
//!   any read that finished after the lease, whose deadline is computed from when the lookup
//!   was *sent*. Bytes that may have been reclaimed are never reported as the value.
//! - **Exists** grants no lease.
//! - **Sessions**: a put session allocates every key at start and commits at end; a get
//!   session caches replica lists and leases at start; ranged transfers in between make no
//!   master round trip.

#![forbid(unsafe_code)]

mod conn;
mod data;
mod session;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{
    BufferRegistry, LocalBuffer, MemorySegment, RegionLease, Requester, SegmentHandle,
};
use mooncake_engine::TransferEngine;

use self::conn::{Io, MasterConns};
use self::data::{Piece, ReadJob, WriteJob};
use crate::alloc::OffsetAllocator;
use crate::master::{ClientId, GetReply, HeldObject, ObjectInfo, SegmentId};
use crate::rpc::{PutItem, Request, Response};
use crate::sys::SharedMemory;
use crate::types::{
    DEFAULT_TENANT, ReplicaDesc, ReplicateConfig, StoreError, StoreErrorCode, StoreResult,
};

/// Configuration of a [`StoreClient`] (the reference's `setup(...)` arguments).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreConfig {
    /// The master's RPC address, `host:port`.
    pub master_addr: String,
    /// Tenant namespace of every key. Default `"default"`.
    pub tenant: String,
    /// This client's host (for `prefer_alloc_in_same_node`). Default: the engine's hostname.
    pub local_hostname: Option<String>,
    /// Bytes of this process's memory contributed to the pool (0: pure requester).
    pub global_segment_size: u64,
    /// Registered staging buffer of the copying API (`put`, `get`; 0: none).
    pub local_buffer_size: u64,
    /// Unix socket of a same-host `mooncake store-node`: its segment is mapped here and its
    /// replicas are read and written with a memcpy.
    pub local_node_socket: Option<PathBuf>,
    /// Deadline of one master RPC. Default 10 s.
    pub rpc_timeout: Duration,
    /// Deadline of one engine batch. Default 10 s (2× the engine's default no-progress
    /// timeout; keep the master's `inflight_quarantine_ms` at least this).
    pub transfer_deadline: Duration,
    /// Heartbeat period on the session connection. Default 200 ms (it also ships the journal
    /// of this client's segment).
    pub heartbeat_interval: Duration,
    /// Idle master connections kept per pool. Default 64.
    pub max_idle_conns: usize,
    /// Fault the segment's pages in at start (and, with `local_node_socket`, map every page of
    /// the node's segment at attach).
    pub populate_segment: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            master_addr: "127.0.0.1:50051".into(),
            tenant: DEFAULT_TENANT.into(),
            local_hostname: None,
            global_segment_size: 0,
            local_buffer_size: 16 << 20,
            local_node_socket: None,
            rpc_timeout: Duration::from_secs(10),
            transfer_deadline: Duration::from_secs(10),
            heartbeat_interval: Duration::from_millis(200),
            max_idle_conns: 64,
            populate_segment: false,
        }
    }
}

impl StoreConfig {
    /// A config for the master at `addr`.
    pub fn new(master_addr: impl Into<String>) -> Self {
        Self {
            master_addr: master_addr.into(),
            ..Self::default()
        }
    }

    /// Sets the tenant.
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// Sets the host used for same-node placement.
    pub fn with_local_hostname(mut self, host: impl Into<String>) -> Self {
        self.local_hostname = Some(host.into());
        self
    }

    /// Sets `global_segment_size`.
    pub fn with_segment_size(mut self, bytes: u64) -> Self {
        self.global_segment_size = bytes;
        self
    }

    /// Sets `local_buffer_size`.
    pub fn with_local_buffer_size(mut self, bytes: u64) -> Self {
        self.local_buffer_size = bytes;
        self
    }

    /// Attaches to the store-node listening on `path`.
    pub fn with_local_node(mut self, path: impl Into<PathBuf>) -> Self {
        self.local_node_socket = Some(path.into());
        self
    }

    /// Sets the RPC deadline.
    pub fn with_rpc_timeout(mut self, d: Duration) -> Self {
        self.rpc_timeout = d;
        self
    }

    /// Sets the transfer deadline.
    pub fn with_transfer_deadline(mut self, d: Duration) -> Self {
        self.transfer_deadline = d;
        self
    }

    /// Sets the heartbeat period.
    pub fn with_heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// Faults the segment in at start.
    pub fn with_populate(mut self, yes: bool) -> Self {
        self.populate_segment = yes;
        self
    }
}

/// A range of a registered buffer and where it sits inside an object (session range calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferRange {
    /// Local address (inside registered memory).
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// Offset inside the object.
    pub offset: u64,
}

/// A put session: every key allocated at start, committed at end. See
/// [`StoreClient::batch_put_session_start`].
#[derive(Debug)]
pub struct PutSession {
    keys: Vec<String>,
    index: HashMap<String, usize>,
    sizes: Vec<u64>,
    /// Per key: where to write (`None`: the key already existed, nothing to do), or why the
    /// start failed.
    started: Vec<StoreResult<Option<Vec<ReplicaDesc>>>>,
    failed: Vec<Option<StoreError>>,
    failed_segments: Vec<String>,
}

impl PutSession {
    /// The session's keys, in order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Per key: `Ok(true)` if allocated (to be written), `Ok(false)` if it already existed
    /// (kept, nothing to write), or why it could not start.
    pub fn start_results(&self) -> Vec<StoreResult<bool>> {
        self.started
            .iter()
            .map(|r| r.as_ref().map(Option::is_some).map_err(Clone::clone))
            .collect()
    }

    /// Moves `keys` out of this session into a new one, so that they can be committed or
    /// revoked apart from the rest (the Python API ends and revokes sessions key by key).
    /// Keys that are not in this session are skipped. Segments that failed a write so far are
    /// reported by both sessions.
    pub fn split_off(&mut self, keys: &[&str]) -> PutSession {
        let mut moved = vec![false; self.keys.len()];
        let mut order = Vec::new();
        for k in keys {
            if let Some(&i) = self.index.get(*k)
                && !moved[i]
            {
                moved[i] = true;
                order.push(i);
            }
        }
        let mut out = PutSession {
            keys: Vec::with_capacity(order.len()),
            index: HashMap::with_capacity(order.len()),
            sizes: Vec::with_capacity(order.len()),
            started: Vec::with_capacity(order.len()),
            failed: Vec::with_capacity(order.len()),
            failed_segments: self.failed_segments.clone(),
        };
        for &i in &order {
            out.index.insert(self.keys[i].clone(), out.keys.len());
            out.keys.push(self.keys[i].clone());
            out.sizes.push(self.sizes[i]);
            out.started.push(self.started[i].clone());
            out.failed.push(self.failed[i].clone());
        }
        let mut kept = PutSession {
            keys: Vec::new(),
            index: HashMap::new(),
            sizes: Vec::new(),
            started: Vec::new(),
            failed: Vec::new(),
            failed_segments: std::mem::take(&mut self.failed_segments),
        };
        for i in (0..self.keys.len()).filter(|&i| !moved[i]) {
            kept.index.insert(self.keys[i].clone(), kept.keys.len());
            kept.keys.push(std::mem::take(&mut self.keys[i]));
            kept.sizes.push(self.sizes[i]);
            kept.started
                .push(std::mem::replace(&mut self.started[i], Ok(None)));
            kept.failed.push(self.failed[i].take());
        }
        *self = kept;
        out
    }
}

/// A get session: replica lists and leases cached at start. See
/// [`StoreClient::batch_get_session_start`].
#[derive(Debug)]
pub struct GetSession {
    index: HashMap<String, usize>,
    entries: Vec<StoreResult<(Vec<ReplicaDesc>, Instant)>>,
}

impl GetSession {
    /// Object size of `key`, if the session found it.
    pub fn size(&self, key: &str) -> Option<u64> {
        let i = *self.index.get(key)?;
        self.entries[i].as_ref().ok()?.0.first().map(|r| r.len)
    }

    /// What the session's start found for `key`: the object size, or why it has none
    /// (`OBJECT_NOT_FOUND`, …); `None` if `key` is not in the session.
    pub fn status(&self, key: &str) -> Option<StoreResult<u64>> {
        let i = *self.index.get(key)?;
        Some(match &self.entries[i] {
            Ok((replicas, _)) => Ok(replicas.first().map_or(0, |r| r.len)),
            Err(e) => Err(e.clone()),
        })
    }
}

/// A shared mapping of a segment in this process: our own, or a same-host store-node's.
#[derive(Debug)]
pub(crate) struct LocalMap {
    /// The segment's base address in its owner's address space (what replica addresses use).
    pub(crate) remote_base: u64,
    pub(crate) mem: Arc<SharedMemory>,
    /// The mapping as a registered region, for device copies (made on first use).
    leases: OnceLock<BufferRegistry>,
}

impl LocalMap {
    pub(crate) fn new(remote_base: u64, mem: Arc<SharedMemory>) -> Self {
        Self {
            remote_base,
            mem,
            leases: OnceLock::new(),
        }
    }

    /// Copies between the mapping at `offset` and `device` (registered device memory) with
    /// the installed device runtime, and waits: `into_map` from the device into the
    /// mapping, else out of it. The CPU never touches device memory.
    pub(crate) fn device_copy(
        &self,
        offset: u64,
        device: RegionLease,
        into_map: bool,
        deadline: Duration,
    ) -> mooncake_core::Result<()> {
        let copier = mooncake_core::device::device_copier().ok_or_else(|| {
            mooncake_core::Error::new(
                mooncake_core::ErrorKind::Unsupported,
                "device memory needs a device runtime (no CUDA copier is installed)",
            )
        })?;
        let registry = self.leases.get_or_init(|| {
            let r = BufferRegistry::new();
            if let Err(e) = r.register(self.mem.clone()) {
                tracing::warn!("cannot lease a shared segment for device copies: {e}");
            }
            r
        });
        let mapped = registry.lease(self.mem.addr() + offset, device.len(), Requester::Local)?;
        let copy = if into_map {
            copier.copy(mapped, device)?
        } else {
            copier.copy(device, mapped)?
        };
        copy.wait(Some(Instant::now() + deadline))
    }
}

#[derive(Debug, Clone)]
struct SessionState {
    client: ClientId,
    lease_ttl_ms: u64,
    master_epoch: u64,
    segment: Option<SegmentId>,
}

#[derive(Debug)]
struct OwnSegment {
    name: String,
    mem: Arc<SharedMemory>,
    /// What the segment holds, from the journal: re-reported after a master restart.
    mirror: Mutex<BTreeMap<u64, HeldObject>>,
}

#[derive(Debug)]
struct Staging {
    buf: Arc<LocalBuffer>,
    alloc: Mutex<OffsetAllocator>,
}

/// Stops and pokes the session thread.
#[derive(Debug, Default)]
struct Signal {
    state: Mutex<(bool, u64)>,
    cv: Condvar,
}

pub(crate) struct Inner {
    cfg: StoreConfig,
    host: String,
    engine: TransferEngine,
    conns: MasterConns,
    session: RwLock<SessionState>,
    segment: Option<OwnSegment>,
    maps: RwLock<HashMap<String, Arc<LocalMap>>>,
    handles: RwLock<HashMap<String, SegmentHandle>>,
    staging: Option<Staging>,
    node_link: Mutex<Option<UnixStream>>,
    signal: Arc<Signal>,
    steps: AtomicU64,
    steps_cv: (Mutex<()>, Condvar),
    closed: AtomicBool,
    hb_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut st = self.signal.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = true;
        self.signal.cv.notify_all();
    }
}

/// The store's client. Cheap to clone (clones share the connection pools and the session).
///
/// ```no_run
/// use mooncake_store::{ReplicateConfig, StoreClient, StoreConfig};
/// # fn engine() -> mooncake_engine::TransferEngine { unimplemented!() }
/// let client = StoreClient::connect(StoreConfig::new("127.0.0.1:50051"), engine())?;
/// client.put("k", b"value", &ReplicateConfig::default())?;
/// assert_eq!(client.get("k")?, b"value");
/// # Ok::<(), mooncake_store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("master", &self.inner.conns.addr())
            .field("client", &self.client_id())
            .field("segment", &self.inner.segment.as_ref().map(|s| &s.name))
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorCode::InvalidParams, msg)
}

fn all_err<T>(n: usize, e: StoreError) -> Vec<StoreResult<T>> {
    (0..n).map(|_| Err(e.clone())).collect()
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    mooncake_core::block_on(f)
}

/// Generates the blocking and the async form of each operation from one body.
macro_rules! api {
    ($(
        $(#[$doc:meta])*
        fn $name:ident / $aname:ident ($this:ident, $io:ident $(, $arg:ident : $ty:ty)*) -> $ret:ty $body:block
    )*) => {$(
        $(#[$doc])*
        pub fn $name(&self $(, $arg: $ty)*) -> $ret {
            let $this: &Inner = &self.inner;
            let $io = Io::Blocking;
            block(async move $body)
        }

        #[doc = concat!("The async form of [`", stringify!($name), "`](Self::", stringify!($name), ").")]
        pub async fn $aname(&self $(, $arg: $ty)*) -> $ret {
            let $this: &Inner = &self.inner;
            let $io = Io::Async;
            $body
        }
    )*};
}

impl StoreClient {
    /// Connects to the master, registers a session, allocates and mounts the segment
    /// (`global_segment_size`), registers the staging buffer, and attaches to a same-host
    /// store-node if configured. Blocking.
    ///
    /// The engine must be reachable by the other clients and storage nodes of the cluster
    /// (same metadata service).
    pub fn connect(cfg: StoreConfig, engine: TransferEngine) -> StoreResult<Self> {
        let addr = conn::resolve(&cfg.master_addr)?;
        let host = cfg.local_hostname.clone().unwrap_or_else(system_hostname);
        let mut maps = HashMap::new();
        let segment = if cfg.global_segment_size > 0 {
            let name = engine.local_name().to_string();
            let mem = Arc::new(
                SharedMemory::create(
                    &format!("mooncake-segment-{name}"),
                    cfg.global_segment_size as usize,
                    cfg.populate_segment,
                )
                .map_err(|e| invalid(format!("cannot allocate the segment: {e}")))?,
            );
            engine
                .register(mem.clone())
                .map_err(|e| invalid(format!("cannot register the segment: {e}")))?;
            maps.insert(
                name.clone(),
                Arc::new(LocalMap::new(mem.addr(), mem.clone())),
            );
            Some(OwnSegment {
                name,
                mem,
                mirror: Mutex::new(BTreeMap::new()),
            })
        } else {
            None
        };
        let staging = if cfg.local_buffer_size > 0 {
            let buf = Arc::new(
                LocalBuffer::new(cfg.local_buffer_size as usize)
                    .map_err(|e| invalid(format!("cannot allocate the local buffer: {e}")))?,
            );
            engine
                .register(buf.clone())
                .map_err(|e| invalid(format!("cannot register the local buffer: {e}")))?;
            Some(Staging {
                alloc: Mutex::new(OffsetAllocator::new(cfg.local_buffer_size, 64)?),
                buf,
            })
        } else {
            None
        };
        let mut node_link = None;
        if let Some(path) = &cfg.local_node_socket {
            let (link, name, map) = crate::node::attach(path, cfg.populate_segment)?;
            maps.insert(name, Arc::new(map));
            node_link = Some(link);
        }
        let inner = Arc::new(Inner {
            conns: MasterConns::new(
                addr,
                cfg.rpc_timeout,
                cfg.max_idle_conns,
                engine.cluster_secret().cloned(),
            ),
            host,
            engine,
            session: RwLock::new(SessionState {
                client: ClientId(0),
                lease_ttl_ms: 0,
                master_epoch: 0,
                segment: None,
            }),
            segment,
            maps: RwLock::new(maps),
            handles: RwLock::new(HashMap::new()),
            staging,
            node_link: Mutex::new(node_link),
            signal: Arc::new(Signal::default()),
            steps: AtomicU64::new(0),
            steps_cv: (Mutex::new(()), Condvar::new()),
            closed: AtomicBool::new(false),
            hb_thread: Mutex::new(None),
            cfg,
        });
        let first = session::open_session(&inner)?;
        let t = session::spawn(&inner, first)?;
        *inner.hb_thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(Self { inner })
    }

    /// The transfer engine.
    pub fn engine(&self) -> &TransferEngine {
        &self.inner.engine
    }

    /// This client's id at the master (changes when it re-registers after a master restart).
    pub fn client_id(&self) -> ClientId {
        self.inner.session().client
    }

    /// This client's segment name (the engine's segment name): what LMCache passes as
    /// `preferred_segment`. Without a segment, the engine's name all the same.
    pub fn get_hostname(&self) -> String {
        self.inner.engine.local_name().to_string()
    }

    /// The segment's name and memory, if this client mounts one.
    pub fn segment_memory(&self) -> Option<(String, Arc<SharedMemory>)> {
        self.inner
            .segment
            .as_ref()
            .map(|s| (s.name.clone(), s.mem.clone()))
    }

    /// The read lease the master grants, in milliseconds.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.inner.session().lease_ttl_ms
    }

    /// The tenant.
    pub fn tenant(&self) -> &str {
        &self.inner.cfg.tenant
    }

    /// The objects this client's segment holds, as far as the journal told it so far.
    pub fn held_objects(&self) -> Vec<HeldObject> {
        self.inner
            .segment
            .as_ref()
            .map(|s| {
                s.mirror
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the session thread completed a heartbeat that started after this call
    /// (so the journal mirror holds every commit made before it), or `timeout`.
    pub fn sync_session(&self, timeout: Duration) -> bool {
        self.inner.sync_session(timeout)
    }

    /// Registers caller memory so that `put_from` / `get_into` may name it (the reference's
    /// `register_buffer(ptr, size)`: the Python layer wraps the pointer in a
    /// [`mooncake_core::ForeignMemory`]).
    pub fn register_buffer(&self, memory: Arc<dyn MemorySegment>) -> StoreResult<()> {
        self.inner
            .engine
            .register(memory)
            .map_err(|e| invalid(format!("register_buffer: {e}")))
    }

    /// Unregisters the buffer starting at `addr`; waits for transfers that use it.
    pub fn unregister_buffer(&self, addr: u64) -> StoreResult<()> {
        self.inner
            .engine
            .unregister_memory(addr)
            .map_err(|e| invalid(format!("unregister_buffer: {e}")))
    }

    /// Unmounts the segment, ends the session (the master revokes this client's in-flight
    /// puts) and stops the session thread. Idempotent. Objects on the segment are dropped by
    /// the master.
    pub fn close(&self) -> StoreResult<()> {
        self.inner.close()
    }

    api! {
        /// Stores `value` under `key` (copying API: staged through the local buffer). An
        /// existing key keeps its value and this returns `Ok`.
        fn put / put_async(this, io, key: &str, value: &[u8], config: &ReplicateConfig) -> StoreResult<()> {
            this.put_copy(io, key, &[value], config, false).await
        }

        /// Stores the concatenation of `parts` under `key` (copying API).
        fn put_parts / put_parts_async(this, io, key: &str, parts: &[&[u8]], config: &ReplicateConfig) -> StoreResult<()> {
            this.put_copy(io, key, parts, config, false).await
        }

        /// Stores `value` under `key`, replacing an existing value (copying API).
        fn upsert / upsert_async(this, io, key: &str, value: &[u8], config: &ReplicateConfig) -> StoreResult<()> {
            this.put_copy(io, key, &[value], config, true).await
        }

        /// Reads the value of `key` (copying API). `OBJECT_NOT_FOUND` (-704) on a miss.
        fn get / get_async(this, io, key: &str) -> StoreResult<Vec<u8>> {
            this.get_copy(io, key).await
        }

        /// Stores each value under its key (copying API, one RPC pair for the batch).
        fn put_batch / put_batch_async(this, io, keys: &[&str], values: &[&[u8]], config: &ReplicateConfig) -> Vec<StoreResult<()>> {
            this.put_batch_copy(io, keys, values, config).await
        }

        /// Reads many values (copying API).
        fn get_batch / get_batch_async(this, io, keys: &[&str]) -> Vec<StoreResult<Vec<u8>>> {
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                out.push(this.get_copy(io, k).await);
            }
            out
        }

        /// Zero-copy put of `size` bytes at `addr` (inside a registered buffer).
        fn put_from / put_from_async(this, io, key: &str, addr: u64, size: u64, config: &ReplicateConfig) -> StoreResult<()> {
            one(this.put_objects(io, vec![(key.to_string(), vec![(addr, size)])], config, false).await)
        }

        /// Zero-copy upsert.
        fn upsert_from / upsert_from_async(this, io, key: &str, addr: u64, size: u64, config: &ReplicateConfig) -> StoreResult<()> {
            one(this.put_objects(io, vec![(key.to_string(), vec![(addr, size)])], config, true).await)
        }

        /// Zero-copy get into `size` bytes at `addr`; returns the bytes read (the object
        /// size). `INVALID_PARAMS` (-600) if the buffer is too small.
        fn get_into / get_into_async(this, io, key: &str, addr: u64, size: u64) -> StoreResult<u64> {
            one(this.get_objects(io, &[key], vec![vec![(addr, size)]]).await)
        }

        /// Zero-copy batch put: one RPC to start, one engine batch, one RPC to finish.
        fn batch_put_from / batch_put_from_async(this, io, keys: &[&str], addrs: &[u64], sizes: &[u64], config: &ReplicateConfig) -> Vec<StoreResult<()>> {
            if keys.len() != addrs.len() || keys.len() != sizes.len() {
                return all_err(keys.len(), invalid("keys, addrs and sizes differ in length"));
            }
            let items = keys.iter().zip(addrs.iter().zip(sizes)).map(|(k, (&a, &s))| (k.to_string(), vec![(a, s)])).collect();
            this.put_objects(io, items, config, false).await
        }

        /// Zero-copy batch upsert.
        fn batch_upsert_from / batch_upsert_from_async(this, io, keys: &[&str], addrs: &[u64], sizes: &[u64], config: &ReplicateConfig) -> Vec<StoreResult<()>> {
            if keys.len() != addrs.len() || keys.len() != sizes.len() {
                return all_err(keys.len(), invalid("keys, addrs and sizes differ in length"));
            }
            let items = keys.iter().zip(addrs.iter().zip(sizes)).map(|(k, (&a, &s))| (k.to_string(), vec![(a, s)])).collect();
            this.put_objects(io, items, config, true).await
        }

        /// Zero-copy batch get; per key the bytes read.
        fn batch_get_into / batch_get_into_async(this, io, keys: &[&str], addrs: &[u64], sizes: &[u64]) -> Vec<StoreResult<u64>> {
            if keys.len() != addrs.len() || keys.len() != sizes.len() {
                return all_err(keys.len(), invalid("keys, addrs and sizes differ in length"));
            }
            this.get_objects(io, keys, addrs.iter().zip(sizes).map(|(&a, &s)| vec![(a, s)]).collect()).await
        }

        /// Batch put where each object is the concatenation of scattered buffers
        /// (`(addr, len)` pairs, e.g. one page per layer).
        fn batch_put_from_multi_buffers / batch_put_from_multi_buffers_async(this, io, keys: &[&str], buffers: &[Vec<(u64, u64)>], config: &ReplicateConfig) -> Vec<StoreResult<()>> {
            if keys.len() != buffers.len() {
                return all_err(keys.len(), invalid("keys and buffers differ in length"));
            }
            let items = keys.iter().zip(buffers).map(|(k, b)| (k.to_string(), b.clone())).collect();
            this.put_objects(io, items, config, false).await
        }

        /// Batch get scattering each object over its buffers, in order; per key the bytes read.
        fn batch_get_into_multi_buffers / batch_get_into_multi_buffers_async(this, io, keys: &[&str], buffers: &[Vec<(u64, u64)>]) -> Vec<StoreResult<u64>> {
            if keys.len() != buffers.len() {
                return all_err(keys.len(), invalid("keys and buffers differ in length"));
            }
            this.get_objects(io, keys, buffers.to_vec()).await
        }

        /// Starts a put session: allocates every key (one RPC). Write ranges with
        /// [`batch_put_from_multi_buffer_ranges`](Self::batch_put_from_multi_buffer_ranges),
        /// then commit with [`batch_put_session_end`](Self::batch_put_session_end).
        fn batch_put_session_start / batch_put_session_start_async(this, io, keys: &[&str], sizes: &[u64], config: &ReplicateConfig) -> StoreResult<PutSession> {
            this.put_session_start(io, keys, sizes, config).await
        }

        /// Writes ranges of session keys (no master round trip); per key.
        fn batch_put_from_multi_buffer_ranges / batch_put_from_multi_buffer_ranges_async(this, io, session: &mut PutSession, keys: &[&str], ranges: &[Vec<BufferRange>]) -> Vec<StoreResult<()>> {
            this.put_session_ranges(io, session, keys, ranges).await
        }

        /// Commits the session (one RPC): keys whose writes all succeeded become visible,
        /// the others are revoked.
        fn batch_put_session_end / batch_put_session_end_async(this, io, session: PutSession) -> Vec<StoreResult<()>> {
            this.put_session_finish(io, session, false).await
        }

        /// Revokes every key of the session (one RPC).
        fn batch_put_session_revoke / batch_put_session_revoke_async(this, io, session: PutSession) -> StoreResult<()> {
            this.put_session_finish(io, session, true).await;
            Ok(())
        }

        /// Starts a get session: replica lists and leases of every key (one RPC).
        fn batch_get_session_start / batch_get_session_start_async(this, io, keys: &[&str]) -> StoreResult<GetSession> {
            this.get_session_start(io, keys).await
        }

        /// Reads ranges of session keys (no master round trip); per key the bytes read.
        /// `LEASE_EXPIRED` (-707) for a key whose lease ended.
        fn batch_get_into_multi_buffer_ranges / batch_get_into_multi_buffer_ranges_async(this, io, session: &GetSession, keys: &[&str], ranges: &[Vec<BufferRange>]) -> Vec<StoreResult<u64>> {
            this.get_session_ranges(io, session, keys, ranges).await
        }

        /// Ends a get session (its leases simply run out).
        fn batch_get_session_end / batch_get_session_end_async(this, io, session: GetSession) -> StoreResult<()> {
            let _ = (this, io, session);
            Ok(())
        }

        /// Whether `key` exists (complete). Grants no lease.
        fn is_exist / is_exist_async(this, io, key: &str) -> StoreResult<bool> {
            one(this.exists(io, &[key]).await)
        }

        /// Existence of many keys in one RPC. Grants no lease.
        fn batch_is_exist / batch_is_exist_async(this, io, keys: &[&str]) -> Vec<StoreResult<bool>> {
            this.exists(io, keys).await
        }

        /// Removes `key`; without `force`, `OBJECT_HAS_LEASE` (-706) while leased.
        fn remove / remove_async(this, io, key: &str, force: bool) -> StoreResult<()> {
            one(this.remove(io, &[key], force).await)
        }

        /// Removes many keys in one RPC.
        fn batch_remove / batch_remove_async(this, io, keys: &[&str], force: bool) -> Vec<StoreResult<()>> {
            this.remove(io, keys, force).await
        }

        /// Removes every key of the tenant (leased and in-flight ones only with `force`);
        /// returns how many.
        fn remove_all / remove_all_async(this, io, force: bool) -> StoreResult<u64> {
            match this.conns.call(io, &Request::RemoveAll { tenant: this.cfg.tenant.clone(), force }).await? {
                Response::RemovedAll(n) => Ok(n),
                r => Err(unexpected(&r)),
            }
        }

        /// Replica descriptors of many keys (no lease; `OBJECT_NOT_FOUND` for a miss,
        /// `REPLICA_IS_NOT_READY` while being written).
        fn batch_get_replica_desc / batch_get_replica_desc_async(this, io, keys: &[&str]) -> Vec<StoreResult<Vec<ReplicaDesc>>> {
            this.query(io, keys).await.into_iter().map(|r| r.and_then(|info| {
                if info.state == crate::master::ObjectState::Complete {
                    Ok(info.replicas)
                } else {
                    Err(StoreError::from(StoreErrorCode::ReplicaIsNotReady))
                }
            })).collect()
        }

        /// What the master knows about many keys (no lease).
        fn batch_query / batch_query_async(this, io, keys: &[&str]) -> Vec<StoreResult<ObjectInfo>> {
            this.query(io, keys).await
        }

        /// The master answers.
        fn health_check / health_check_async(this, io) -> StoreResult<()> {
            match this.conns.call(io, &Request::Ping).await? {
                Response::Pong => Ok(()),
                r => Err(unexpected(&r)),
            }
        }

        /// Every mounted segment (admin).
        fn segments / segments_async(this, io) -> StoreResult<Vec<crate::master::SegmentStatus>> {
            match this.conns.call(io, &Request::Segments).await? {
                Response::Segments(s) => Ok(s),
                r => Err(unexpected(&r)),
            }
        }

        /// The master's totals (admin).
        fn master_stats / master_stats_async(this, io) -> StoreResult<crate::master::MasterStats> {
            match this.conns.call(io, &Request::Stats).await? {
                Response::Stats(s) => Ok(s),
                r => Err(unexpected(&r)),
            }
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn one<T>(v: Vec<StoreResult<T>>) -> StoreResult<T> {
    v.into_iter()
        .next()
        .unwrap_or_else(|| Err(StoreError::from(StoreErrorCode::InternalError)))
}

fn unexpected(r: &Response) -> StoreError {
    StoreError::new(
        StoreErrorCode::RpcFail,
        format!("unexpected reply from the master: {r:?}"),
    )
}

fn too_small(have: u64, need: u64) -> StoreError {
    StoreError::new(
        StoreErrorCode::InvalidParams,
        format!("buffer too small: {have} bytes for an object of {need}"),
    )
}

/// Lays an object of `size` bytes over `buffers` in order.
fn scatter(buffers: &[(u64, u64)], size: u64) -> StoreResult<Vec<Piece>> {
    let mut pieces = Vec::with_capacity(buffers.len());
    let mut off = 0u64;
    for &(addr, len) in buffers {
        if off >= size {
            break;
        }
        let take = len.min(size - off);
        if take > 0 {
            pieces.push(Piece {
                obj_off: off,
                local: addr,
                len: take,
            });
        }
        off += take;
    }
    if off < size {
        return Err(too_small(off, size));
    }
    Ok(pieces)
}

impl Inner {
    fn session(&self) -> SessionState {
        self.session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn local_map(&self, segment: &str) -> Option<Arc<LocalMap>> {
        self.maps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(segment)
            .cloned()
    }

    fn check_open(&self) -> StoreResult<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(StoreError::new(
                StoreErrorCode::UnavailableInCurrentStatus,
                "the client is closed",
            ))
        } else {
            Ok(())
        }
    }

    fn sync_session(&self, timeout: Duration) -> bool {
        let target = self.steps.load(Ordering::Acquire) + 2;
        {
            let mut st = self.signal.state.lock().unwrap_or_else(|p| p.into_inner());
            st.1 += 1;
            self.signal.cv.notify_all();
        }
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &self.steps_cv;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.steps.load(Ordering::Acquire) < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            let mut st = self.signal.state.lock().unwrap_or_else(|p| p.into_inner());
            st.1 += 1;
            self.signal.cv.notify_all();
        }
        true
    }

    fn close(&self) -> StoreResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let st = self.session();
        if let (Some(seg), Some(_)) = (st.segment, &self.segment) {
            let _ = block(self.conns.call(
                Io::Blocking,
                &Request::UnmountSegment {
                    client: st.client,
                    segment: seg,
                },
            ));
        }
        {
            let mut s = self.signal.state.lock().unwrap_or_else(|p| p.into_inner());
            s.0 = true;
            self.signal.cv.notify_all();
        }
        if let Some(t) = self
            .hb_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        self.conns.clear();
        *self.node_link.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(seg) = &self.segment {
            let _ = self.engine.unregister_memory(seg.mem.addr());
        }
        if let Some(st) = &self.staging {
            let _ = self.engine.unregister_memory(st.buf.base());
        }
        Ok(())
    }

    /// Keys with their scattered sources → start, write, finish.
    async fn put_objects(
        &self,
        io: Io,
        items: Vec<(String, Vec<(u64, u64)>)>,
        config: &ReplicateConfig,
        upsert: bool,
    ) -> Vec<StoreResult<()>> {
        if let Err(e) = self.check_open() {
            return all_err(items.len(), e);
        }
        let n = items.len();
        let mut out: Vec<Option<StoreResult<()>>> = vec![None; n];
        let mut req_items = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        for (i, (key, bufs)) in items.into_iter().enumerate() {
            let size: u64 = bufs.iter().map(|b| b.1).sum();
            if size == 0 || bufs.iter().any(|b| b.1 == 0) {
                out[i] = Some(Err(invalid("empty value or buffer")));
                continue;
            }
            let group = config.group_ids.get(i).cloned();
            req_items.push(PutItem { key, size, group });
            idx.push(i);
            sources.push(bufs);
        }
        if !req_items.is_empty() {
            let client = self.session().client;
            let keys: Vec<String> = req_items.iter().map(|it| it.key.clone()).collect();
            let started = self
                .conns
                .call(
                    io,
                    &Request::BatchPutStart {
                        client,
                        tenant: self.cfg.tenant.clone(),
                        items: req_items,
                        config: config.clone(),
                        upsert,
                    },
                )
                .await;
            let started = match started {
                Ok(Response::PutStarted(v)) if v.len() == keys.len() => v,
                Ok(r) => all_err(keys.len(), unexpected(&r)),
                Err(e) => all_err(keys.len(), e),
            };
            let mut jobs = Vec::new();
            let mut job_of = Vec::new();
            for (j, r) in started.into_iter().enumerate() {
                let i = idx[j];
                match r {
                    Ok(replicas) => {
                        let mut off = 0;
                        let pieces = sources[j]
                            .iter()
                            .map(|&(addr, len)| {
                                let p = Piece {
                                    obj_off: off,
                                    local: addr,
                                    len,
                                };
                                off += len;
                                p
                            })
                            .collect();
                        jobs.push(WriteJob {
                            replicas,
                            pieces,
                            error: None,
                        });
                        job_of.push(j);
                    }
                    Err(e) if !upsert && e.error_code() == StoreErrorCode::ObjectAlreadyExists => {
                        out[i] = Some(Ok(()))
                    }
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            if !jobs.is_empty() {
                let mut failed = Vec::new();
                self.write_objects(io, &mut jobs, &mut failed).await;
                let (mut end, mut revoke) = (Vec::new(), Vec::new());
                let (mut end_i, mut revoke_i) = (Vec::new(), Vec::new());
                for (k, job) in jobs.iter().enumerate() {
                    let j = job_of[k];
                    if job.error.is_none() {
                        end.push(keys[j].clone());
                        end_i.push(idx[j]);
                    } else {
                        revoke.push(keys[j].clone());
                        revoke_i.push((idx[j], k));
                    }
                }
                let fin = self
                    .conns
                    .call(
                        io,
                        &Request::BatchPutFinish {
                            client,
                            tenant: self.cfg.tenant.clone(),
                            end,
                            revoke,
                            failed_segments: failed,
                        },
                    )
                    .await;
                match fin {
                    Ok(Response::PutFinished { end, .. }) if end.len() == end_i.len() => {
                        for (r, i) in end.into_iter().zip(&end_i) {
                            out[*i] = Some(r);
                        }
                    }
                    Ok(r) => {
                        let e = unexpected(&r);
                        for i in &end_i {
                            out[*i] = Some(Err(e.clone()));
                        }
                    }
                    Err(e) => {
                        for i in &end_i {
                            out[*i] = Some(Err(e.clone()));
                        }
                    }
                }
                for (i, k) in revoke_i {
                    out[i] = Some(Err(jobs[k]
                        .error
                        .clone()
                        .unwrap_or_else(|| StoreErrorCode::TransferFail.into())));
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreErrorCode::InternalError.into())))
            .collect()
    }

    /// One lookup RPC; returns the per-key replies and when the request was sent.
    async fn lookup(&self, io: Io, keys: &[&str]) -> (Vec<StoreResult<GetReply>>, Instant) {
        let sent = Instant::now();
        let r = self
            .conns
            .call(
                io,
                &Request::BatchGetReplicas {
                    tenant: self.cfg.tenant.clone(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                },
            )
            .await;
        let v = match r {
            Ok(Response::Replicas(v)) if v.len() == keys.len() => v,
            Ok(r) => all_err(keys.len(), unexpected(&r)),
            Err(e) => all_err(keys.len(), e),
        };
        (v, sent)
    }

    /// Local replicas first (this process's segment, a same-host node's mapping).
    fn order(&self, mut replicas: Vec<ReplicaDesc>) -> Vec<ReplicaDesc> {
        if replicas.len() > 1 {
            let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
            replicas.sort_by_key(|r| !maps.contains_key(&r.segment));
        }
        replicas
    }

    async fn report_failures(&self, io: Io, failed: Vec<String>) {
        if !failed.is_empty() {
            let _ = self
                .conns
                .call(io, &Request::ReportFailure { segments: failed })
                .await;
        }
    }

    async fn get_objects(
        &self,
        io: Io,
        keys: &[&str],
        buffers: Vec<Vec<(u64, u64)>>,
    ) -> Vec<StoreResult<u64>> {
        if let Err(e) = self.check_open() {
            return all_err(keys.len(), e);
        }
        let (replies, sent) = self.lookup(io, keys).await;
        let mut out: Vec<Option<StoreResult<u64>>> = vec![None; keys.len()];
        let mut jobs = Vec::new();
        let mut job_of = Vec::new();
        for (i, (r, bufs)) in replies.into_iter().zip(buffers).enumerate() {
            match r {
                Ok(reply) => {
                    let Some(size) = reply.replicas.first().map(|r| r.len) else {
                        out[i] = Some(Err(StoreErrorCode::ObjectNotFound.into()));
                        continue;
                    };
                    match scatter(&bufs, size) {
                        Ok(pieces) => {
                            jobs.push(ReadJob {
                                replicas: self.order(reply.replicas),
                                pieces,
                                deadline: sent + Duration::from_millis(reply.lease_ttl_ms),
                                next: 0,
                                result: None,
                            });
                            job_of.push((i, size));
                        }
                        Err(e) => out[i] = Some(Err(e)),
                    }
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        if !jobs.is_empty() {
            let mut failed = Vec::new();
            self.read_objects(io, &mut jobs, &mut failed).await;
            self.report_failures(io, failed).await;
            for (job, (i, size)) in jobs.into_iter().zip(job_of) {
                out[i] = Some(match job.result {
                    Some(Ok(())) => Ok(size),
                    Some(Err(e)) => Err(e),
                    None => Err(StoreErrorCode::InternalError.into()),
                });
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreErrorCode::InternalError.into())))
            .collect()
    }

    fn staging(&self) -> StoreResult<&Staging> {
        self.staging
            .as_ref()
            .ok_or_else(|| invalid("the copying API needs a local buffer (local_buffer_size is 0)"))
    }

    fn stage(&self, len: u64) -> StoreResult<(u64, u32)> {
        let st = self.staging()?;
        let a = st
            .alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocate(len)
            .ok_or_else(|| {
                invalid(format!(
                    "the local buffer ({} bytes) has no room for {len} bytes",
                    st.buf.len()
                ))
            })?;
        Ok((a.offset, a.handle))
    }

    fn unstage(&self, handle: u32) {
        if let Some(st) = &self.staging {
            st.alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free(handle);
        }
    }

    async fn put_copy(
        &self,
        io: Io,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
        upsert: bool,
    ) -> StoreResult<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len == 0 {
            return Err(invalid("empty value"));
        }
        let (off, h) = self.stage(len)?;
        let st = self.staging()?;
        let mut o = off as usize;
        for p in parts {
            st.buf.write_at(o, p).map_err(|e| invalid(e.to_string()))?;
            o += p.len();
        }
        let r = self
            .put_objects(
                io,
                vec![(key.to_string(), vec![(st.buf.base() + off, len)])],
                config,
                upsert,
            )
            .await;
        self.unstage(h);
        one(r)
    }

    async fn put_batch_copy(
        &self,
        io: Io,
        keys: &[&str],
        values: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Vec<StoreResult<()>> {
        if keys.len() != values.len() {
            return all_err(keys.len(), invalid("keys and values differ in length"));
        }
        let total: u64 = values.iter().map(|v| v.len() as u64).sum();
        let (off, h) = match self.stage(total.max(1)) {
            Ok(x) => x,
            Err(e) => return all_err(keys.len(), e),
        };
        let st = match self.staging() {
            Ok(s) => s,
            Err(e) => return all_err(keys.len(), e),
        };
        let mut items = Vec::with_capacity(keys.len());
        let mut o = off;
        for (k, v) in keys.iter().zip(values) {
            let _ = st.buf.write_at(o as usize, v);
            items.push((k.to_string(), vec![(st.buf.base() + o, v.len() as u64)]));
            o += v.len() as u64;
        }
        let r = self.put_objects(io, items, config, false).await;
        self.unstage(h);
        r
    }

    async fn get_copy(&self, io: Io, key: &str) -> StoreResult<Vec<u8>> {
        self.check_open()?;
        let (replies, sent) = self.lookup(io, &[key]).await;
        let reply = one(replies)?;
        let size = reply
            .replicas
            .first()
            .map(|r| r.len)
            .ok_or_else(|| StoreError::from(StoreErrorCode::ObjectNotFound))?;
        let (off, h) = self.stage(size)?;
        let st = self.staging()?;
        let mut jobs = [ReadJob {
            replicas: self.order(reply.replicas),
            pieces: vec![Piece {
                obj_off: 0,
                local: st.buf.base() + off,
                len: size,
            }],
            deadline: sent + Duration::from_millis(reply.lease_ttl_ms),
            next: 0,
            result: None,
        }];
        let mut failed = Vec::new();
        self.read_objects(io, &mut jobs, &mut failed).await;
        self.report_failures(io, failed).await;
        let [job] = jobs;
        let r = match job.result {
            Some(Ok(())) => {
                let mut v = vec![0u8; size as usize];
                st.buf
                    .read_at(off as usize, &mut v)
                    .map(|()| v)
                    .map_err(|e| invalid(e.to_string()))
            }
            Some(Err(e)) => Err(e),
            None => Err(StoreErrorCode::InternalError.into()),
        };
        self.unstage(h);
        r
    }

    async fn exists(&self, io: Io, keys: &[&str]) -> Vec<StoreResult<bool>> {
        let r = self
            .conns
            .call(
                io,
                &Request::BatchExists {
                    tenant: self.cfg.tenant.clone(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                },
            )
            .await;
        match r {
            Ok(Response::Exists(v)) if v.len() == keys.len() => v.into_iter().map(Ok).collect(),
            Ok(r) => all_err(keys.len(), unexpected(&r)),
            Err(e) => all_err(keys.len(), e),
        }
    }

    async fn remove(&self, io: Io, keys: &[&str], force: bool) -> Vec<StoreResult<()>> {
        let r = self
            .conns
            .call(
                io,
                &Request::BatchRemove {
                    tenant: self.cfg.tenant.clone(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                    force,
                },
            )
            .await;
        match r {
            Ok(Response::Removed(v)) if v.len() == keys.len() => v,
            Ok(r) => all_err(keys.len(), unexpected(&r)),
            Err(e) => all_err(keys.len(), e),
        }
    }

    async fn query(&self, io: Io, keys: &[&str]) -> Vec<StoreResult<ObjectInfo>> {
        let r = self
            .conns
            .call(
                io,
                &Request::BatchQuery {
                    tenant: self.cfg.tenant.clone(),
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                },
            )
            .await;
        match r {
            Ok(Response::Query(v)) if v.len() == keys.len() => v
                .into_iter()
                .map(|o| o.ok_or_else(|| StoreErrorCode::ObjectNotFound.into()))
                .collect(),
            Ok(r) => all_err(keys.len(), unexpected(&r)),
            Err(e) => all_err(keys.len(), e),
        }
    }

    async fn put_session_start(
        &self,
        io: Io,
        keys: &[&str],
        sizes: &[u64],
        config: &ReplicateConfig,
    ) -> StoreResult<PutSession> {
        self.check_open()?;
        if keys.len() != sizes.len() {
            return Err(invalid("keys and sizes differ in length"));
        }
        let mut index = HashMap::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            if index.insert(k.to_string(), i).is_some() {
                return Err(invalid(format!("key {k:?} appears twice in the session")));
            }
        }
        let items = keys
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, (k, &size))| PutItem {
                key: k.to_string(),
                size,
                group: config.group_ids.get(i).cloned(),
            })
            .collect();
        let r = self
            .conns
            .call(
                io,
                &Request::BatchPutStart {
                    client: self.session().client,
                    tenant: self.cfg.tenant.clone(),
                    items,
                    config: config.clone(),
                    upsert: false,
                },
            )
            .await?;
        let started = match r {
            Response::PutStarted(v) if v.len() == keys.len() => v
                .into_iter()
                .map(|r| match r {
                    Ok(reps) => Ok(Some(reps)),
                    Err(e) if e.error_code() == StoreErrorCode::ObjectAlreadyExists => Ok(None),
                    Err(e) => Err(e),
                })
                .collect(),
            r => return Err(unexpected(&r)),
        };
        Ok(PutSession {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            index,
            sizes: sizes.to_vec(),
            started,
            failed: vec![None; keys.len()],
            failed_segments: Vec::new(),
        })
    }

    async fn put_session_ranges(
        &self,
        io: Io,
        s: &mut PutSession,
        keys: &[&str],
        ranges: &[Vec<BufferRange>],
    ) -> Vec<StoreResult<()>> {
        if keys.len() != ranges.len() {
            return all_err(keys.len(), invalid("keys and ranges differ in length"));
        }
        let mut out: Vec<StoreResult<()>> = Vec::with_capacity(keys.len());
        let mut jobs = Vec::new();
        let mut job_of = Vec::new();
        for (k, rs) in keys.iter().zip(ranges) {
            let Some(&i) = s.index.get(*k) else {
                out.push(Err(invalid(format!("{k:?} is not in the session"))));
                continue;
            };
            match &s.started[i] {
                Err(e) => out.push(Err(e.clone())),
                Ok(None) => out.push(Ok(())),
                Ok(Some(reps)) => {
                    if let Some(bad) = rs
                        .iter()
                        .find(|r| r.len == 0 || r.offset.saturating_add(r.len) > s.sizes[i])
                    {
                        out.push(Err(invalid(format!(
                            "range {}+{} outside an object of {} bytes",
                            bad.offset, bad.len, s.sizes[i]
                        ))));
                        continue;
                    }
                    jobs.push(WriteJob {
                        replicas: reps.clone(),
                        pieces: rs
                            .iter()
                            .map(|r| Piece {
                                obj_off: r.offset,
                                local: r.addr,
                                len: r.len,
                            })
                            .collect(),
                        error: None,
                    });
                    job_of.push((out.len(), i));
                    out.push(Ok(()));
                }
            }
        }
        if !jobs.is_empty() {
            let mut failed = Vec::new();
            self.write_objects(io, &mut jobs, &mut failed).await;
            for f in failed {
                if !s.failed_segments.contains(&f) {
                    s.failed_segments.push(f);
                }
            }
            for (job, (o, i)) in jobs.into_iter().zip(job_of) {
                if let Some(e) = job.error {
                    s.failed[i].get_or_insert(e.clone());
                    out[o] = Err(e);
                }
            }
        }
        out
    }

    async fn put_session_finish(
        &self,
        io: Io,
        s: PutSession,
        revoke_all: bool,
    ) -> Vec<StoreResult<()>> {
        let mut out: Vec<StoreResult<()>> = Vec::with_capacity(s.keys.len());
        let (mut end, mut revoke, mut end_i) = (Vec::new(), Vec::new(), Vec::new());
        for (i, k) in s.keys.iter().enumerate() {
            match (&s.started[i], &s.failed[i]) {
                (Err(e), _) => out.push(Err(e.clone())),
                (Ok(None), _) => out.push(Ok(())),
                (Ok(Some(_)), Some(e)) => {
                    revoke.push(k.clone());
                    out.push(Err(e.clone()));
                }
                (Ok(Some(_)), None) if revoke_all => {
                    revoke.push(k.clone());
                    out.push(Err(StoreError::new(
                        StoreErrorCode::WriteFail,
                        "revoked by the caller",
                    )));
                }
                (Ok(Some(_)), None) => {
                    end.push(k.clone());
                    end_i.push(out.len());
                    out.push(Ok(()));
                }
            }
        }
        if end.is_empty() && revoke.is_empty() && s.failed_segments.is_empty() {
            return out;
        }
        let r = self
            .conns
            .call(
                io,
                &Request::BatchPutFinish {
                    client: self.session().client,
                    tenant: self.cfg.tenant.clone(),
                    end,
                    revoke,
                    failed_segments: s.failed_segments,
                },
            )
            .await;
        match r {
            Ok(Response::PutFinished { end, .. }) if end.len() == end_i.len() => {
                for (r, i) in end.into_iter().zip(end_i) {
                    out[i] = r;
                }
            }
            Ok(r) => {
                let e = unexpected(&r);
                for i in end_i {
                    out[i] = Err(e.clone());
                }
            }
            Err(e) => {
                for i in end_i {
                    out[i] = Err(e.clone());
                }
            }
        }
        out
    }

    async fn get_session_start(&self, io: Io, keys: &[&str]) -> StoreResult<GetSession> {
        self.check_open()?;
        let (replies, sent) = self.lookup(io, keys).await;
        let mut index = HashMap::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            index.insert(k.to_string(), i);
        }
        let entries = replies
            .into_iter()
            .map(|r| {
                r.map(|g| {
                    (
                        self.order(g.replicas),
                        sent + Duration::from_millis(g.lease_ttl_ms),
                    )
                })
            })
            .collect();
        Ok(GetSession { index, entries })
    }

    async fn get_session_ranges(
        &self,
        io: Io,
        s: &GetSession,
        keys: &[&str],
        ranges: &[Vec<BufferRange>],
    ) -> Vec<StoreResult<u64>> {
        if keys.len() != ranges.len() {
            return all_err(keys.len(), invalid("keys and ranges differ in length"));
        }
        let mut out: Vec<StoreResult<u64>> = Vec::with_capacity(keys.len());
        let mut jobs = Vec::new();
        let mut job_of = Vec::new();
        for (k, rs) in keys.iter().zip(ranges) {
            let Some(&i) = s.index.get(*k) else {
                out.push(Err(invalid(format!("{k:?} is not in the session"))));
                continue;
            };
            match &s.entries[i] {
                Err(e) => out.push(Err(e.clone())),
                Ok((reps, deadline)) => {
                    let size = reps.first().map_or(0, |r| r.len);
                    if let Some(bad) = rs
                        .iter()
                        .find(|r| r.len == 0 || r.offset.saturating_add(r.len) > size)
                    {
                        out.push(Err(invalid(format!(
                            "range {}+{} outside an object of {size} bytes",
                            bad.offset, bad.len
                        ))));
                        continue;
                    }
                    if Instant::now() >= *deadline {
                        out.push(Err(StoreErrorCode::LeaseExpired.into()));
                        continue;
                    }
                    jobs.push(ReadJob {
                        replicas: reps.clone(),
                        pieces: rs
                            .iter()
                            .map(|r| Piece {
                                obj_off: r.offset,
                                local: r.addr,
                                len: r.len,
                            })
                            .collect(),
                        deadline: *deadline,
                        next: 0,
                        result: None,
                    });
                    job_of.push((out.len(), rs.iter().map(|r| r.len).sum::<u64>()));
                    out.push(Ok(0));
                }
            }
        }
        if !jobs.is_empty() {
            let mut failed = Vec::new();
            self.read_objects(io, &mut jobs, &mut failed).await;
            self.report_failures(io, failed).await;
            for (job, (o, n)) in jobs.into_iter().zip(job_of) {
                out[o] = match job.result {
                    Some(Ok(())) => Ok(n),
                    Some(Err(e)) => Err(e),
                    None => Err(StoreErrorCode::InternalError.into()),
                };
            }
        }
        out
    }
}

/// Compile-time checks: the client and its futures are `Send` (tokio multi-thread spawns).
#[allow(dead_code, reason = "compile-time assertions only")]
fn _assert_send() {
    fn send<T: Send>(_: &T) {}
    fn sync<T: Send + Sync>() {}
    sync::<StoreClient>();
    let c: &StoreClient = todo_client();
    send(&c.put_async("k", b"v", &ReplicateConfig::default()));
    send(&c.get_async("k"));
    send(&c.batch_get_into_async(&["k"], &[0], &[0]));
    send(&c.batch_is_exist_async(&["k"]));
}

#[allow(dead_code, reason = "compile-time assertions only")]
fn todo_client() -> &'static StoreClient {
    unreachable!()
}

/// Connects a fresh TCP session socket (used by the session thread).
pub(crate) fn session_socket(inner: &Inner) -> std::io::Result<TcpStream> {
    conn::connect_blocking(inner.conns.addr(), inner.cfg.rpc_timeout)
}
