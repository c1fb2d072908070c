//! The [`TransferEngine`]: registered memory, opened segments, batches, and the one-shot
//! calls that Mooncake's Python users make.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use event_listener::{Event, EventListener};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mooncake_core::{
    Access, Batch, BufferDesc, BufferRegistry, ClusterSecret, EmbeddedMetadataStore, EngineContext,
    Error, ErrorKind, ForeignMemory, Located, Location, MemorySegment, MetadataKeys, MetadataStore,
    Opcode, RegionLease, RemoteSegment, Requester, Result, RpcMeta, SegmentDescriptor,
    SegmentHandle, TaskCompleter, TransferRequest, TransferStatus, TransferTask, Transport,
    TransportBuilder, TransportCapabilities, WatchEvent, WatchStream, block_on,
};

use crate::background;

/// Default time a peer may make no progress before its tasks fail.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request whose target range failed the cached descriptor's check: it waits for the
/// descriptor to be read again (with the error to report if it still fails).
type Deferred = (TransferRequest, RegionLease, TaskCompleter, Error);

/// An id of a batch allocated with [`TransferEngine::allocate_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId(pub u64);

/// Builds a [`TransferEngine`].
pub struct EngineBuilder {
    local_name: String,
    hostname: String,
    metadata: Option<Arc<dyn MetadataStore>>,
    transports: Vec<Box<dyn TransportBuilder>>,
    timeout: Duration,
    keys: MetadataKeys,
    rpc_port: u16,
    /// `None`: from the environment; `Some(None)`: explicitly none.
    secret: Option<Option<ClusterSecret>>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("local_name", &self.local_name)
            .field("hostname", &self.hostname)
            .field("transports", &self.transports.len())
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Sets the metadata store (default: the process-wide embedded store).
    pub fn with_metadata(mut self, metadata: Arc<dyn MetadataStore>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sets the host name or IP that peers should use (default `127.0.0.1`).
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self
    }

    /// Adds a transport; the first one that can reach a target is used for it.
    pub fn with_transport(mut self, transport: impl TransportBuilder + 'static) -> Self {
        self.transports.push(Box::new(transport));
        self
    }

    /// Adds a boxed transport builder.
    pub fn with_boxed_transport(mut self, transport: Box<dyn TransportBuilder>) -> Self {
        self.transports.push(transport);
        self
    }

    /// Sets how long a peer may make no progress before its tasks fail (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the metadata key layout (default: from `MC_METADATA_CLUSTER_ID`).
    pub fn with_keys(mut self, keys: MetadataKeys) -> Self {
        self.keys = keys;
        self
    }

    /// Sets the cluster secret peers must prove they hold (`None`: no authentication).
    /// Default: `MC_CLUSTER_SECRET_FILE` or `MC_CLUSTER_SECRET` from the environment.
    pub fn with_cluster_secret(mut self, secret: Option<ClusterSecret>) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Sets the RPC port published in `rpc_meta` (the handshake port, if any).
    pub fn with_rpc_port(mut self, port: u16) -> Self {
        self.rpc_port = port;
        self
    }

    /// Starts the transports and publishes the (empty) segment.
    pub fn build(self) -> Result<TransferEngine> {
        if self.local_name.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the local segment name must not be empty",
            ));
        }
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let secret = match self.secret {
            Some(s) => s,
            None => ClusterSecret::from_env()?,
        };
        let ctx = EngineContext {
            local_name: self.local_name.clone(),
            hostname: self.hostname.clone(),
            registry: Arc::new(BufferRegistry::new()),
            generation,
            timeout: self.timeout,
            secret,
        };
        let transports = self
            .transports
            .into_iter()
            .map(|b| b.build(&ctx))
            .collect::<Result<Vec<_>>>()?;
        let metadata = self
            .metadata
            .unwrap_or_else(|| Arc::new(EmbeddedMetadataStore::global()));
        let engine = TransferEngine {
            inner: Arc::new(Inner {
                ctx,
                metadata,
                capabilities: transports.iter().map(|t| t.capabilities()).collect(),
                transports,
                keys: self.keys,
                rpc_port: self.rpc_port,
                segments: RwLock::new(SegmentTable::default()),
                batches: Mutex::new(HashMap::new()),
                next_batch: AtomicU64::new(1),
                publish_lock: Mutex::new(()),
                self_segment: Mutex::new(None),
                closed: Event::new(),
                closing: AtomicBool::new(false),
            }),
        };
        engine.publish()?;
        engine.start_watcher()?;
        let rpc = RpcMeta {
            ip_or_host_name: engine.inner.ctx.hostname.clone(),
            rpc_port: engine.inner.rpc_port,
        };
        let key = engine.inner.keys.rpc_meta(&engine.inner.ctx.local_name);
        block_on(
            engine
                .inner
                .metadata
                .put(&key, serde_json::to_vec(&rpc).expect("rpc meta serialises")),
        )?;
        Ok(engine)
    }
}

#[derive(Default)]
struct SegmentTable {
    by_name: HashMap<String, SegmentHandle>,
    by_id: HashMap<SegmentHandle, Arc<RemoteSegment>>,
    next: u64,
}

struct Inner {
    ctx: EngineContext,
    metadata: Arc<dyn MetadataStore>,
    transports: Vec<Arc<dyn Transport>>,
    /// `transports[i].capabilities()`, read once at build.
    capabilities: Vec<TransportCapabilities>,
    keys: MetadataKeys,
    rpc_port: u16,
    segments: RwLock<SegmentTable>,
    batches: Mutex<HashMap<u64, Batch>>,
    next_batch: AtomicU64,
    publish_lock: Mutex<()>,
    /// This engine's own segment for routing local device requests (registry generation).
    self_segment: Mutex<Option<(usize, Arc<RemoteSegment>)>>,
    closed: Event,
    closing: AtomicBool,
}

impl Inner {
    fn segments(&self) -> std::sync::RwLockReadGuard<'_, SegmentTable> {
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    fn segments_mut(&self) -> std::sync::RwLockWriteGuard<'_, SegmentTable> {
        self.segments.write().unwrap_or_else(|p| p.into_inner())
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Batch>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle of an already opened segment.
    fn cached_handle(&self, name: &str) -> Option<SegmentHandle> {
        self.segments().by_name.get(name).copied()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify(usize::MAX);
        for t in &self.transports {
            t.shutdown();
        }
        let name = &self.ctx.local_name;
        let _ = block_on(self.metadata.delete(&self.keys.segment(name)));
        let _ = block_on(self.metadata.delete(&self.keys.rpc_meta(name)));
    }
}

/// Moves bytes between registered memory of any two engines.
///
/// Cloning shares the engine; it shuts down (and unpublishes its segment) when the last
/// clone drops.
#[derive(Clone)]
pub struct TransferEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferEngine")
            .field("name", &self.inner.ctx.local_name)
            .field(
                "transports",
                &self
                    .inner
                    .transports
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TransferEngine {
    /// Starts building an engine whose segment is called `local_name`.
    pub fn builder(local_name: impl Into<String>) -> EngineBuilder {
        EngineBuilder {
            local_name: local_name.into(),
            hostname: "127.0.0.1".to_string(),
            metadata: None,
            transports: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            keys: MetadataKeys::from_env(),
            rpc_port: 0,
            secret: None,
        }
    }

    /// Follows descriptor changes of other segments: a peer that re-publishes with a new
    /// generation (it restarted) or disappears gets its cached descriptor replaced and its
    /// connections dropped, so no transfer uses stale state.
    ///
    /// The watch runs on the process-wide background thread. If the backend ends it (a
    /// restarted service, a compacted log, a lost connection), it is re-created with
    /// backoff and every cached descriptor is read again, so no change is missed.
    fn start_watcher(&self) -> Result<()> {
        let prefix = self.inner.keys.segment_prefix();
        // Subscribe before `build` returns, so no change after it is missed.
        let first = block_on(self.inner.metadata.watch(&prefix))?;
        let weak = Arc::downgrade(&self.inner);
        let closed = self.inner.closed.listen();
        background::spawn(watch_segments(weak, prefix, first, closed));
        Ok(())
    }

    fn on_segment_event(&self, prefix: &str, ev: WatchEvent) {
        let Some(name) = ev.key().strip_prefix(prefix).map(str::to_string) else {
            return;
        };
        let name = name.as_str();
        if name == self.local_name() {
            return;
        }
        let Some(handle) = self.inner.cached_handle(name) else {
            return;
        };
        let old_gen = self
            .segment(handle)
            .map(|s| s.descriptor().generation)
            .unwrap_or(0);
        match ev {
            WatchEvent::Put { ref key, ref value } => {
                match SegmentDescriptor::from_json(value, key) {
                    Ok(d) => {
                        let restarted = d.generation != old_gen;
                        self.inner
                            .segments_mut()
                            .by_id
                            .insert(handle, Arc::new(RemoteSegment::new(d)));
                        if restarted {
                            // Transports see the new generation in the descriptor and
                            // replace their stale connections on next use; forgetting here
                            // could race with a connection to the new incarnation.
                            tracing::info!(
                                segment = name,
                                "peer re-published with a new generation"
                            );
                        }
                    }
                    Err(e) => tracing::warn!("ignoring a malformed descriptor update: {e}"),
                }
            }
            WatchEvent::Delete { .. } => {
                tracing::info!(
                    segment = name,
                    "peer's descriptor was deleted; dropping its connections"
                );
                for t in &self.inner.transports {
                    t.forget_peer(name, Some(old_gen));
                }
            }
        }
    }

    /// Reads every cached descriptor again and applies what changed, as the watch would have.
    async fn relist(&self) {
        let cached: Vec<(String, SegmentHandle)> = self
            .inner
            .segments()
            .by_name
            .iter()
            .map(|(n, h)| (n.clone(), *h))
            .collect();
        let prefix = self.inner.keys.segment_prefix();
        for (name, _) in cached {
            let key = self.inner.keys.segment(&name);
            let ev = match self.inner.metadata.get(&key).await {
                Ok(Some(value)) => WatchEvent::Put { key, value },
                Ok(None) => WatchEvent::Delete { key },
                Err(e) => {
                    tracing::warn!(segment = name, "re-reading a descriptor failed: {e}");
                    continue;
                }
            };
            self.on_segment_event(&prefix, ev);
        }
    }

    /// The local segment name.
    pub fn local_name(&self) -> &str {
        &self.inner.ctx.local_name
    }

    /// The cluster secret the engine's transports require of peers (and prove), if any.
    pub fn cluster_secret(&self) -> Option<&ClusterSecret> {
        self.inner.ctx.secret.as_ref()
    }

    /// This engine's generation (changes on every restart).
    pub fn generation(&self) -> u64 {
        self.inner.ctx.generation
    }

    /// The registered memory.
    pub fn registry(&self) -> &Arc<BufferRegistry> {
        &self.inner.ctx.registry
    }

    /// The metadata store.
    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.inner.metadata
    }

    /// The installed transports.
    pub fn transports(&self) -> &[Arc<dyn Transport>] {
        &self.inner.transports
    }

    /// The descriptor this engine publishes right now.
    pub fn local_descriptor(&self) -> SegmentDescriptor {
        let mut d = SegmentDescriptor {
            name: self.inner.ctx.local_name.clone(),
            protocol: self
                .inner
                .transports
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(","),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default(),
            generation: self.inner.ctx.generation,
            buffers: self
                .registry()
                .regions()
                .iter()
                .filter(|r| r.access() != Access::LocalOnly)
                .map(|r| BufferDesc {
                    name: r.location().to_string(),
                    addr: r.base(),
                    length: r.len(),
                    read_only: !r.access().remote_write(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        for t in &self.inner.transports {
            t.publish(&mut d);
        }
        d
    }

    fn publish(&self) -> Result<()> {
        let _g = self
            .inner
            .publish_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let d = self.local_descriptor();
        block_on(
            self.inner
                .metadata
                .put(&self.inner.keys.segment(&d.name), d.to_json()),
        )
    }

    /// Registers `memory` so that transfers (local and remote) can use it, and publishes it.
    ///
    /// Memory tagged `*` is located first: when the installed device runtime knows it as
    /// device memory (`mooncake_core::device::locate`), it is registered as, say, `cuda:0`.
    pub fn register(&self, memory: Arc<dyn MemorySegment>) -> Result<()> {
        let memory = locate_any(memory)?;
        let region = self.registry().register(memory)?;
        for (i, t) in self.inner.transports.iter().enumerate() {
            if let Err(e) = t.on_register(&region) {
                if let Ok(region) = self.registry().remove(region.base()) {
                    for t in &self.inner.transports[..i] {
                        t.on_unregister(&region);
                    }
                    region.wait_drained();
                }
                return Err(e);
            }
        }
        self.publish()
    }

    /// Registers `len` bytes at `addr` that the caller owns (Mooncake's `registerLocalMemory`).
    ///
    /// # Safety
    /// The memory must stay valid until [`unregister_memory`](Self::unregister_memory)
    /// returns for `addr` (or the engine is dropped).
    pub unsafe fn register_memory(
        &self,
        addr: u64,
        len: usize,
        location: &str,
        remote_accessible: bool,
    ) -> Result<()> {
        let location: Location = location.parse()?;
        let access = if remote_accessible {
            Access::ReadWrite
        } else {
            Access::LocalOnly
        };
        // SAFETY: forwarded from this function's contract.
        let mem = unsafe { ForeignMemory::new(addr, len, location, access) };
        self.register(Arc::new(mem))
    }

    /// Unregisters the region starting at `addr`.
    ///
    /// # Behavior
    /// The region leaves the registry first (no new transfer can name it), then every
    /// transport revokes access to it (RDMA deregisters its memory regions, TCP aborts I/O
    /// in progress into or out of it) and transfers using it fail; the call returns once no
    /// transfer holds it any more. After it returns no peer can read or write the memory,
    /// and the caller may free it.
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        let region = self.registry().remove(addr)?;
        for t in &self.inner.transports {
            t.on_unregister(&region);
        }
        region.wait_drained();
        self.publish()
    }

    /// Opens a segment by name: one metadata round trip, then cached.
    pub async fn open_segment(&self, name: &str) -> Result<SegmentHandle> {
        if name == self.local_name() {
            return Ok(SegmentHandle::LOCAL);
        }
        if let Some(h) = self.inner.cached_handle(name) {
            return Ok(h);
        }
        let remote = self.fetch_segment(name).await?;
        let mut t = self.inner.segments_mut();
        if let Some(h) = t.by_name.get(name) {
            return Ok(*h);
        }
        t.next += 1;
        let h = SegmentHandle(t.next);
        t.by_name.insert(name.to_string(), h);
        t.by_id.insert(h, Arc::new(remote));
        Ok(h)
    }

    /// [`open_segment`](Self::open_segment) for synchronous callers.
    pub fn open_segment_blocking(&self, name: &str) -> Result<SegmentHandle> {
        block_on(self.open_segment(name))
    }

    async fn fetch_segment(&self, name: &str) -> Result<RemoteSegment> {
        let key = self.inner.keys.segment(name);
        let bytes = self.inner.metadata.get(&key).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::SegmentNotFound,
                format!("segment {name:?} is not published (key {key})"),
            )
            .with_context("metadata", self.inner.metadata.scheme())
        })?;
        Ok(RemoteSegment::new(SegmentDescriptor::from_json(
            &bytes, &key,
        )?))
    }

    /// Re-reads a segment's descriptor (after the peer registered more memory or restarted);
    /// its handle stays the same.
    pub async fn refresh_segment(&self, handle: SegmentHandle) -> Result<()> {
        let name = self.segment(handle)?.name().to_string();
        let fresh = self.fetch_segment(&name).await?;
        self.inner
            .segments_mut()
            .by_id
            .insert(handle, Arc::new(fresh));
        Ok(())
    }

    /// Forgets a segment; its handle becomes invalid and its connections are dropped.
    pub fn close_segment(&self, handle: SegmentHandle) -> Result<()> {
        let mut t = self.inner.segments_mut();
        let seg = t
            .by_id
            .remove(&handle)
            .ok_or_else(|| Error::invalid(format!("unknown segment handle {}", handle.0)))?;
        t.by_name.remove(seg.name());
        drop(t);
        for tr in &self.inner.transports {
            tr.forget_peer(seg.name(), None);
        }
        Ok(())
    }

    /// The cached descriptor of an opened segment.
    pub fn segment(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        self.inner
            .segments()
            .by_id
            .get(&handle)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("unknown segment handle {}", handle.0)))
    }

    /// Submits `requests` into `batch` (which must have room for them).
    ///
    /// Each request is checked before anything moves: the local range must be registered,
    /// the remote range must be inside a buffer the target published (the target checks it
    /// again). A request that fails a check fails alone; the others proceed.
    pub fn submit_into(&self, batch: &Batch, requests: &[TransferRequest]) -> Result<()> {
        let completers = batch.add_tasks(requests.len())?;
        let mut per_transport: Vec<Vec<TransferTask>> = (0..self.inner.transports.len())
            .map(|_| Vec::new())
            .collect();
        let mut deferred: Vec<Deferred> = Vec::new();
        for (req, completer) in requests.iter().zip(completers) {
            let local = match self
                .registry()
                .lease(req.source, req.length, Requester::Local)
            {
                Ok(l) => l,
                Err(e) => {
                    completer.complete(Err(e));
                    continue;
                }
            };
            if req.target_id == SegmentHandle::LOCAL {
                if !self.local_touches_device(&local, req) {
                    completer.complete(self.local_copy(req.opcode, &local, req.target_offset));
                    continue;
                }
                // Device memory on either side: a device-capable transport that reaches
                // this engine's own segment moves it (the CPU never copies device memory).
                let me = self.self_segment();
                match self.route(&local, &me, req) {
                    Ok(ti) => per_transport[ti].push(TransferTask {
                        opcode: req.opcode,
                        local,
                        remote: me,
                        remote_addr: req.target_offset,
                        completer,
                    }),
                    Err(e) => completer.complete(Err(e)),
                }
                continue;
            }
            let remote = match self.segment(req.target_id) {
                Ok(r) => r,
                Err(e) => {
                    completer.complete(Err(e));
                    continue;
                }
            };
            if let Err(e) = remote.check_range(req.target_offset, req.length) {
                // The cached descriptor may be stale (the peer registered more memory, or
                // restarted): it is read again in the background, without blocking this call.
                deferred.push((*req, local, completer, e));
                continue;
            }
            match self.route(&local, &remote, req) {
                Ok(ti) => per_transport[ti].push(TransferTask {
                    opcode: req.opcode,
                    local,
                    remote,
                    remote_addr: req.target_offset,
                    completer,
                }),
                Err(e) => completer.complete(Err(e)),
            }
        }
        for (t, tasks) in self.inner.transports.iter().zip(per_transport) {
            if !tasks.is_empty() {
                t.submit(tasks);
            }
        }
        if !deferred.is_empty() {
            let engine = self.clone();
            background::spawn(async move { engine.submit_after_refresh(deferred).await });
        }
        Ok(())
    }

    /// Reads the descriptors of `deferred`'s targets again (once each), then submits the
    /// requests that fit the fresh descriptor and fails the others with their first error.
    async fn submit_after_refresh(&self, deferred: Vec<Deferred>) {
        let mut handles: Vec<SegmentHandle> = deferred.iter().map(|d| d.0.target_id).collect();
        handles.sort_unstable();
        handles.dedup();
        for h in handles {
            if let Err(e) = self.refresh_segment(h).await {
                tracing::debug!(segment = h.0, "refreshing a descriptor failed: {e}");
            }
        }
        let mut per_transport: Vec<Vec<TransferTask>> = (0..self.inner.transports.len())
            .map(|_| Vec::new())
            .collect();
        for (req, local, completer, first_error) in deferred {
            let remote = match self.segment(req.target_id) {
                Ok(r) if r.check_range(req.target_offset, req.length).is_ok() => r,
                _ => {
                    completer.complete(Err(first_error));
                    continue;
                }
            };
            match self.route(&local, &remote, &req) {
                Ok(ti) => per_transport[ti].push(TransferTask {
                    opcode: req.opcode,
                    local,
                    remote,
                    remote_addr: req.target_offset,
                    completer,
                }),
                Err(e) => completer.complete(Err(e)),
            }
        }
        for (t, tasks) in self.inner.transports.iter().zip(per_transport) {
            if !tasks.is_empty() {
                t.submit(tasks);
            }
        }
    }

    /// The transport that moves `req`: the first installed one that can reach `remote` and,
    /// when either side of the request is device memory, declares
    /// [`TransportCapabilities::device_memory`]. A write to a buffer the peer published
    /// read-only is refused here, before any transport sees it.
    fn route(
        &self,
        local: &RegionLease,
        remote: &RemoteSegment,
        req: &TransferRequest,
    ) -> Result<usize> {
        let buffer = remote.buffer_at(req.target_offset, req.length)?;
        if req.opcode == Opcode::Write && buffer.read_only {
            return Err(Error::new(
                ErrorKind::RemoteAccess,
                format!(
                    "segment {:?} published the buffer at {:#x} read-only",
                    remote.name(),
                    buffer.addr
                ),
            ));
        }
        let remote_loc: Location = buffer.name.parse().unwrap_or_default();
        let device = !local.region().location().is_host() || !remote_loc.is_host();
        let reach: Vec<usize> = (0..self.inner.transports.len())
            .filter(|&i| {
                let t = &self.inner.transports[i];
                t.can_reach(remote) && t.can_move(local.region(), remote, buffer)
            })
            .collect();
        if let Some(&ti) = reach
            .iter()
            .find(|&&i| !device || self.inner.capabilities[i].device_memory)
        {
            return Ok(ti);
        }
        let names = self
            .inner
            .transports
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",");
        Err(if reach.is_empty() {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "no installed transport ({names}) speaks segment {:?}'s protocol {:?}",
                    remote.name(),
                    remote.descriptor().protocol
                ),
            )
        } else {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "no installed transport ({names}) moves device memory (local {}, remote {remote_loc})",
                    local.region().location()
                ),
            )
        })
    }

    /// Submits `requests` as a new batch and returns it.
    pub fn submit_batch(&self, requests: &[TransferRequest]) -> Result<Batch> {
        let batch = Batch::new(requests.len());
        self.submit_into(&batch, requests)?;
        Ok(batch)
    }

    fn local_copy(&self, op: Opcode, local: &RegionLease, target: u64) -> Result<()> {
        let other = self
            .registry()
            .lease(target, local.len(), Requester::Local)?;
        for r in [local.region(), other.region()] {
            if !r.location().is_host() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "local copies of device memory ({} at {:#x}) need a device-memory transport",
                        r.location(),
                        r.base()
                    ),
                ));
            }
        }
        let (src, dst) = match op {
            Opcode::Read => (other.as_ptr(), local.as_ptr()),
            Opcode::Write => (local.as_ptr(), other.as_ptr()),
        };
        // SAFETY: both ranges are leased from registered regions of `len` bytes; `copy`
        // allows overlap.
        unsafe { std::ptr::copy(src, dst, local.len() as usize) };
        Ok(())
    }

    /// Whether a request to this engine's own segment has device memory on either side
    /// (an unregistered target counts as host: `local_copy` reports it).
    fn local_touches_device(&self, local: &RegionLease, req: &TransferRequest) -> bool {
        if !local.region().location().is_host() {
            return true;
        }
        self.registry()
            .lease(req.target_offset, req.length, Requester::Local)
            .is_ok_and(|t| !t.region().location().is_host())
    }

    /// This engine's own segment as transports see a peer's: every registered region
    /// (local-only and read-only ones too: the local process may use them all), plus what
    /// each transport publishes. Cached until the registry changes.
    fn self_segment(&self) -> Arc<RemoteSegment> {
        let generation = self.registry().generation();
        let mut cache = self
            .inner
            .self_segment
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((g, seg)) = &*cache
            && *g == generation
        {
            return seg.clone();
        }
        let mut d = self.local_descriptor();
        d.buffers = self
            .registry()
            .regions()
            .iter()
            .map(|r| BufferDesc {
                name: r.location().to_string(),
                addr: r.base(),
                length: r.len(),
                ..Default::default()
            })
            .collect();
        let seg = Arc::new(RemoteSegment::new(d));
        *cache = Some((generation, seg.clone()));
        seg
    }

    /// Allocates a batch of `capacity` tasks (Mooncake's `allocateBatchID`).
    pub fn allocate_batch(&self, capacity: usize) -> BatchId {
        let id = self.inner.next_batch.fetch_add(1, Ordering::Relaxed);
        self.inner.batches().insert(id, Batch::new(capacity));
        BatchId(id)
    }

    /// The batch behind an id.
    pub fn batch(&self, id: BatchId) -> Result<Batch> {
        self.inner
            .batches()
            .get(&id.0)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("unknown batch id {}", id.0)))
    }

    /// Submits requests into an allocated batch (Mooncake's `submitTransfer`).
    pub fn submit(&self, id: BatchId, requests: &[TransferRequest]) -> Result<()> {
        self.submit_into(&self.batch(id)?, requests)
    }

    /// Status of one task (Mooncake's `getTransferStatus`); a pure query.
    pub fn transfer_status(&self, id: BatchId, task: usize) -> TransferStatus {
        self.batch(id)
            .map_or(TransferStatus::Invalid, |b| b.status(task))
    }

    /// Waits for every task submitted to the batch so far.
    pub async fn wait(&self, id: BatchId) -> Result<()> {
        self.batch(id)?.wait().await
    }

    /// Frees a batch; refused with [`ErrorKind::Busy`] while a task is unfinished.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        let mut map = self.inner.batches();
        let b = map
            .get(&id.0)
            .ok_or_else(|| Error::invalid(format!("unknown batch id {}", id.0)))?;
        if !b.is_done() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("batch {} has unfinished tasks", id.0),
            ));
        }
        map.remove(&id.0);
        Ok(())
    }

    /// Reads `len` bytes at `remote` of segment `target` into `local`, and waits.
    pub fn transfer_sync_read(
        &self,
        target: &str,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<()> {
        self.transfer_sync(target, Opcode::Read, local, remote, len)
    }

    /// Writes `len` bytes from `local` to `remote` of segment `target`, and waits until they
    /// are applied there.
    pub fn transfer_sync_write(
        &self,
        target: &str,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<()> {
        self.transfer_sync(target, Opcode::Write, local, remote, len)
    }

    /// One synchronous transfer.
    pub fn transfer_sync(
        &self,
        target: &str,
        op: Opcode,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<()> {
        self.batch_transfer_sync(target, op, &[local], &[remote], &[len])
    }

    /// Reads many ranges of `target` and waits for all.
    pub fn batch_transfer_sync_read(
        &self,
        target: &str,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> Result<()> {
        self.batch_transfer_sync(target, Opcode::Read, locals, remotes, lens)
    }

    /// Writes many ranges to `target` and waits for all.
    pub fn batch_transfer_sync_write(
        &self,
        target: &str,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> Result<()> {
        self.batch_transfer_sync(target, Opcode::Write, locals, remotes, lens)
    }

    /// Many transfers of one direction to one target, waited for together.
    pub fn batch_transfer_sync(
        &self,
        target: &str,
        op: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> Result<()> {
        let batch = self.batch_transfer_async(target, op, locals, remotes, lens)?;
        let r = batch.wait_blocking(None);
        if r.as_ref().is_err_and(|e| {
            e.kind() == ErrorKind::PeerUnreachable || e.kind() == ErrorKind::Timeout
        }) && let Some(h) = self.inner.cached_handle(target)
        {
            // The peer may have restarted elsewhere: read its descriptor again in the
            // background. Connections other threads use are left alone.
            let engine = self.clone();
            background::spawn(async move {
                if let Err(e) = engine.refresh_segment(h).await {
                    tracing::debug!(segment = h.0, "refreshing a descriptor failed: {e}");
                }
            });
        }
        r
    }

    /// Submits many transfers of one direction to one target and returns the batch.
    pub fn batch_transfer_async(
        &self,
        target: &str,
        op: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lens: &[u64],
    ) -> Result<Batch> {
        if locals.len() != remotes.len() || locals.len() != lens.len() {
            return Err(Error::invalid(format!(
                "{} local addresses, {} remote addresses and {} lengths",
                locals.len(),
                remotes.len(),
                lens.len()
            )));
        }
        let h = self.open_segment_blocking(target)?;
        let reqs: Vec<TransferRequest> = locals
            .iter()
            .zip(remotes)
            .zip(lens)
            .map(|((&source, &target_offset), &length)| TransferRequest {
                opcode: op,
                source,
                target_id: h,
                target_offset,
                length,
            })
            .collect();
        self.submit_batch(&reqs)
    }
}

/// `memory` tagged `*` and known to the installed device runtime as device memory comes
/// back tagged with its device location; anything else unchanged.
fn locate_any(memory: Arc<dyn MemorySegment>) -> Result<Arc<dyn MemorySegment>> {
    if memory.location() != Location::Any {
        return Ok(memory);
    }
    match mooncake_core::device::locate(memory.base(), memory.len() as u64)? {
        Some(location) => Ok(Arc::new(Located::new(memory, location))),
        None => Ok(memory),
    }
}

/// The engine's metadata watch (see `TransferEngine::start_watcher`).
async fn watch_segments(
    weak: Weak<Inner>,
    prefix: String,
    first: WatchStream,
    mut closed: EventListener,
) {
    let mut stream = Some(first);
    let mut backoff = WATCH_BACKOFF_MIN;
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                // Re-subscribe, then read every cached descriptor again: changes made while
                // the watch was down are not replayed by the backend.
                let Some(inner) = weak.upgrade() else { return };
                match inner.metadata.watch(&prefix).await {
                    Ok(s) => {
                        backoff = WATCH_BACKOFF_MIN;
                        let engine = TransferEngine { inner };
                        engine.relist().await;
                        s
                    }
                    Err(e) => {
                        tracing::warn!(
                            "metadata watch of {prefix} failed: {e}; retrying in {backoff:?}"
                        );
                        drop(inner);
                        let slept = poll_either(&mut closed, background::sleep(backoff)).await;
                        if slept.is_none() {
                            return;
                        }
                        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        loop {
            let next = poll_either(&mut closed, s.next()).await;
            let Some(next) = next else { return };
            let Some(inner) = weak.upgrade() else { return };
            if inner.closing.load(Ordering::Acquire) {
                return;
            }
            match next {
                Some(ev) => TransferEngine { inner }.on_segment_event(&prefix, ev),
                None => {
                    tracing::warn!("metadata watch of {prefix} ended; re-subscribing");
                    break;
                }
            }
        }
        // The stream ended: wait a little before re-subscribing (a restarting service).
        if poll_either(&mut closed, background::sleep(backoff))
            .await
            .is_none()
        {
            return;
        }
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

/// First wait between re-subscriptions of a metadata watch.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between re-subscriptions.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Waits for `f`, or for the engine to close (`None`).
async fn poll_either<F: Future>(closed: &mut EventListener, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        if Pin::new(&mut *closed).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        f.as_mut().poll(cx).map(Some)
    })
    .await
}
