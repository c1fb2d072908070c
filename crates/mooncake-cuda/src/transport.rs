//! [`CudaIpcTransport`]: device memory between processes (and devices) of one host, through
//! CUDA IPC handles, with the copies on engine-owned streams (GPU↔GPU over NVLink or PCIe
//! peer-to-peer, GPU↔host over PCIe). It also moves this engine's own device memory
//! (requests to `SegmentHandle::LOCAL`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};

use mooncake_core::{
    Access, BufferDesc, BufferRegistry, EngineContext, Error, ErrorKind, Location, Opcode, Region,
    RemoteSegment, Requester, Result, SegmentDescriptor, TransferTask, Transport, TransportBuilder,
    TransportCapabilities,
};
use tracing::{debug, warn};

use crate::driver::cuda;
use crate::ipc::{self, IpcBuffer, PeerInfo, ProcId, ProcWatch};
use crate::sys::{self, CopyEnd, IpcHandle, IpcMapping};

/// The protocol name published in descriptors (the reference's intra-node CUDA IPC
/// transport has the same name).
pub const CUDA_IPC_SCHEME: &str = "nvlink_intra";

/// Configuration of a [`CudaIpcTransport`]; also its [`TransportBuilder`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CudaIpcConfig {
    /// Pin (`cuMemHostRegister`) host regions when they are registered, so that host↔GPU
    /// copies run at pinned speed. Off by default: pinning costs time at registration and
    /// loads the driver in processes that register host memory only.
    pub pin_host_memory: bool,
}

impl CudaIpcConfig {
    /// Defaults: host memory is not pinned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pins host regions at registration.
    pub fn with_pin_host_memory(mut self, yes: bool) -> Self {
        self.pin_host_memory = yes;
        self
    }
}

impl TransportBuilder for CudaIpcConfig {
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(CudaIpcTransport::new(*self, ctx)))
    }
}

/// The registries of the engines of this process that run this transport, by (segment,
/// generation): a peer engine in the same process is reached through its registry (CUDA
/// IPC cannot open a handle exported by the same process).
type InProcess = Mutex<HashMap<(String, u64), Weak<BufferRegistry>>>;

fn in_process() -> &'static InProcess {
    static ENGINES: OnceLock<InProcess> = OnceLock::new();
    ENGINES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A peer process on this host, as far as this transport goes.
struct Peer {
    generation: u64,
    info: PeerInfo,
    watch: ProcWatch,
    /// The peer engine runs in this process: its registry.
    local: Option<Weak<BufferRegistry>>,
    /// Opened allocations, per (handle, local device that opened it).
    maps: Mutex<HashMap<(IpcHandle, u32), Arc<IpcMapping>>>,
}

/// What this transport keeps of a registered local region.
struct Local {
    /// The published IPC entry (device regions whose allocation could be exported).
    ipc: Option<IpcBuffer>,
    /// The host range was pinned by us (unpinned at unregister).
    pinned: bool,
}

/// Moves device memory within one host: see the module docs.
///
/// # Behavior
/// - Reaches its own engine and every same-host engine (same boot id and pid namespace)
///   that publishes `nvlink_intra`; moves a request only when the remote buffer is device
///   memory with a published IPC handle, or the target is its own engine and either side is
///   device memory ([`Transport::can_move`]); other requests go to other transports.
/// - A task completes once its copy has finished on the device (an event polled by the CUDA
///   completion thread). A peer process that exits fails the tasks that reach it, including
///   those whose copy was under way when it exited; new requests to it fail at once.
/// - Ranges are checked against the peer's published buffer (by the engine) and against
///   the opened allocation (here): no copy leaves the allocation the peer exported.
/// - CUDA IPC is one-sided: the target's CPU never sees a request, so read-only and
///   unregistration are enforced by the initiator's engine (from the descriptor it holds).
pub struct CudaIpcTransport {
    cfg: CudaIpcConfig,
    local_name: String,
    generation: u64,
    registry: Arc<mooncake_core::BufferRegistry>,
    host: Option<String>,
    locals: Mutex<HashMap<u64, Local>>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    closed: AtomicBool,
    /// Copies started and not finished yet (shutdown waits for them).
    inflight: Arc<(Mutex<usize>, Condvar)>,
}

impl std::fmt::Debug for CudaIpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaIpcTransport")
            .field("segment", &self.local_name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn device_of(loc: &Location) -> Option<u32> {
    match loc {
        Location::Cuda(n) => Some(*n),
        _ => None,
    }
}

impl CudaIpcTransport {
    /// A transport for the engine of `ctx`. Loads no driver: that happens when device
    /// memory is first registered or moved.
    pub fn new(cfg: CudaIpcConfig, ctx: &EngineContext) -> Self {
        crate::install();
        lock(in_process()).insert(
            (ctx.local_name.clone(), ctx.generation),
            Arc::downgrade(&ctx.registry),
        );
        Self {
            cfg,
            local_name: ctx.local_name.clone(),
            generation: ctx.generation,
            registry: ctx.registry.clone(),
            host: ipc::host_identity(),
            locals: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            inflight: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    fn is_self(&self, remote: &RemoteSegment) -> bool {
        remote.name() == self.local_name && remote.descriptor().generation == self.generation
    }

    /// The cached peer for `remote` (replaced when it restarted), if it shares this host.
    fn peer(&self, remote: &RemoteSegment) -> Option<Arc<Peer>> {
        let d = remote.descriptor();
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get(&d.name)
            && p.generation == d.generation
        {
            return Some(p.clone());
        }
        let info = PeerInfo::parse(d)?;
        if self.host.as_deref() != Some(info.host.as_str()) {
            return None;
        }
        let local = (info.proc == ProcId::current())
            .then(|| {
                lock(in_process())
                    .get(&(d.name.clone(), d.generation))
                    .cloned()
            })
            .flatten();
        let p = Arc::new(Peer {
            generation: d.generation,
            watch: ProcWatch::new(info.proc),
            info,
            local,
            maps: Mutex::new(HashMap::new()),
        });
        peers.insert(d.name.clone(), p.clone());
        Some(p)
    }

    /// Drops a peer that exited (its mappings close once their copies finished).
    fn drop_peer(&self, name: &str, peer: &Arc<Peer>) {
        let mut peers = lock(&self.peers);
        if peers.get(name).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            peers.remove(name);
        }
    }

    /// Starts the copy of one task; the task's completer is not touched.
    fn start(
        &self,
        opcode: Opcode,
        local: mooncake_core::RegionLease,
        remote: &RemoteSegment,
        remote_addr: u64,
    ) -> Result<(mooncake_core::DeviceCopy, Option<Arc<Peer>>)> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                "cuda ipc transport shut down",
            ));
        }
        let cuda = cuda()?;
        let len = local.len();
        let local_dev = device_of(local.region().location());
        let (remote_end, issue_dev, peer) = if self.is_self(remote) {
            let other = self.registry.lease(remote_addr, len, Requester::Local)?;
            let dev = device_of(other.region().location());
            let issue = match opcode {
                // The source's device pushes.
                Opcode::Read => dev.or(local_dev),
                Opcode::Write => local_dev.or(dev),
            };
            (CopyEnd::Lease(other), issue.unwrap_or(0), None)
        } else {
            let peer = self.peer(remote).ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("segment {:?} is not on this host", remote.name()),
                )
            })?;
            if !peer.watch.alive() {
                self.drop_peer(remote.name(), &peer);
                return Err(Error::new(
                    ErrorKind::PeerUnreachable,
                    format!("the process of segment {:?} exited", remote.name()),
                )
                .with_context("peer", remote.name()));
            }
            if let Some(registry) = &peer.local {
                // An engine of this process: lease its range as a network target would.
                let registry = registry.upgrade().ok_or_else(|| {
                    Error::new(
                        ErrorKind::PeerUnreachable,
                        format!("segment {:?} was shut down", remote.name()),
                    )
                })?;
                let who = match opcode {
                    Opcode::Read => Requester::RemoteRead,
                    Opcode::Write => Requester::RemoteWrite,
                };
                let other = registry.lease(remote_addr, len, who)?;
                let dev = device_of(other.region().location());
                let issue = match opcode {
                    Opcode::Read => dev.or(local_dev),
                    Opcode::Write => local_dev.or(dev),
                };
                let device = cuda.device(issue.unwrap_or(0))?;
                let (dst, src) = match opcode {
                    Opcode::Read => (CopyEnd::Lease(local), CopyEnd::Lease(other)),
                    Opcode::Write => (CopyEnd::Lease(other), CopyEnd::Lease(local)),
                };
                return Ok((cuda.copy(&device, dst, src), None));
            }
            let buf = peer.info.buffer(remote_addr, len).ok_or_else(|| {
                Error::new(
                    ErrorKind::RemoteAccess,
                    format!(
                        "{remote_addr:#x}+{len} is not inside a device buffer segment {:?} \
                         published for CUDA IPC",
                        remote.name()
                    ),
                )
            })?;
            let open_dev = local_dev
                .or_else(|| buf.uuid().and_then(|u| cuda.ordinal_of(&u)))
                .unwrap_or(0);
            let map = self.mapping(&peer, buf, open_dev)?;
            let offset = (remote_addr - buf.addr)
                .checked_add(buf.offset)
                .ok_or_else(|| Error::new(ErrorKind::RemoteAccess, "offset overflows"))?;
            let end = CopyEnd::mapped(map, offset, len)?;
            (end, open_dev, Some(peer))
        };
        let device = cuda.device(issue_dev)?;
        let (dst, src) = match opcode {
            Opcode::Read => (CopyEnd::Lease(local), remote_end),
            Opcode::Write => (remote_end, CopyEnd::Lease(local)),
        };
        Ok((cuda.copy(&device, dst, src), peer))
    }

    /// The peer's allocation behind `buf`, opened in `device`'s context (once).
    fn mapping(&self, peer: &Peer, buf: &IpcBuffer, device: u32) -> Result<Arc<IpcMapping>> {
        let handle = buf.handle()?;
        let mut maps = lock(&peer.maps);
        if let Some(m) = maps.get(&(handle, device)) {
            return Ok(m.clone());
        }
        let ctx = cuda()?.device(device)?.ctx;
        let m = Arc::new(sys::ipc_open(&ctx, &handle).map_err(|e| {
            Error::new(
                ErrorKind::PeerUnreachable,
                format!("cannot open the peer's CUDA IPC handle: {e}"),
            )
        })?);
        debug!(
            device,
            len = m.len(),
            "opened a peer's device allocation over CUDA IPC"
        );
        maps.insert((handle, device), m.clone());
        Ok(m)
    }

    /// The IPC entry of a device region being registered.
    fn export(&self, region: &Region) -> Result<Option<IpcBuffer>> {
        let cuda = cuda()?;
        let want = device_of(region.location()).expect("device regions only");
        let info = cuda.pointer(region.base())?.ok_or_else(|| {
            Error::invalid(format!(
                "{:#x} is registered as {} but is not device memory",
                region.base(),
                region.location()
            ))
        })?;
        if info.ordinal != want {
            return Err(Error::invalid(format!(
                "{:#x} is registered as cuda:{want} but lives on cuda:{}",
                region.base(),
                info.ordinal
            )));
        }
        if region.base() + region.len() > info.alloc_base + info.alloc_len {
            return Err(Error::invalid(format!(
                "{:#x}+{} runs past its device allocation",
                region.base(),
                region.len()
            )));
        }
        if region.access() == Access::LocalOnly {
            return Ok(None);
        }
        let ctx = cuda.device(want)?.ctx;
        match sys::ipc_handle(&ctx, info.alloc_base) {
            Ok(h) => Ok(Some(IpcBuffer {
                addr: region.base(),
                len: region.len(),
                handle: ipc::hex(&h.0),
                offset: region.base() - info.alloc_base,
                uuid: cuda.uuid(want).map(|u| ipc::hex(&u)).unwrap_or_default(),
            })),
            Err(e) => {
                // Memory from the virtual memory API (torch's expandable segments) has no
                // legacy IPC handle: peers reach it over a staging transport instead.
                warn!(
                    "device region {:#x} cannot be shared over CUDA IPC ({e}); peers on this \
                     host reach it through other transports",
                    region.base()
                );
                Ok(None)
            }
        }
    }
}

impl Transport for CudaIpcTransport {
    fn name(&self) -> &'static str {
        CUDA_IPC_SCHEME
    }

    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default().with_device_memory(true)
    }

    fn publish(&self, d: &mut SegmentDescriptor) {
        let Some(host) = &self.host else {
            return;
        };
        let mut bufs: Vec<IpcBuffer> = lock(&self.locals)
            .values()
            .filter_map(|l| l.ipc.clone())
            .collect();
        bufs.sort_by_key(|b| b.addr);
        ipc::publish(d, host, &bufs);
    }

    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        self.is_self(remote)
            || (remote.descriptor().speaks(CUDA_IPC_SCHEME) && self.peer(remote).is_some())
    }

    fn can_move(&self, region: &Region, remote: &RemoteSegment, buffer: &BufferDesc) -> bool {
        let remote_device = buffer.name.parse::<Location>().is_ok_and(|l| !l.is_host());
        if self.is_self(remote) {
            return remote_device || !region.location().is_host();
        }
        remote_device
            && self.peer(remote).is_some_and(|p| {
                p.local.is_some() || p.info.buffer(buffer.addr, buffer.length).is_some()
            })
    }

    fn submit(&self, tasks: Vec<TransferTask>) {
        for t in tasks {
            let TransferTask {
                opcode,
                local,
                remote,
                remote_addr,
                completer,
            } = t;
            match self.start(opcode, local, &remote, remote_addr) {
                Err(e) => completer.complete(Err(e)),
                Ok((copy, peer)) => {
                    let name = remote.name().to_string();
                    *lock(&self.inflight.0) += 1;
                    let inflight = self.inflight.clone();
                    copy.on_done(move |r| {
                        let mut n = lock(&inflight.0);
                        *n -= 1;
                        if *n == 0 {
                            inflight.1.notify_all();
                        }
                        drop(n);
                        let r = match (r, peer) {
                            (Ok(()), Some(p)) if !p.watch.alive() => Err(Error::new(
                                ErrorKind::PeerUnreachable,
                                format!("the process of segment {name:?} exited during the copy"),
                            )
                            .with_context("peer", &name)),
                            (r, _) => r.clone(),
                        };
                        completer.complete(r);
                    });
                }
            }
        }
    }

    fn on_register(&self, region: &Arc<Region>) -> Result<()> {
        let local = if region.location().is_host() {
            let pinned = if self.cfg.pin_host_memory && sys::present() {
                match (
                    cuda(),
                    self.registry
                        .lease(region.base(), region.len(), Requester::Local),
                ) {
                    (Ok(c), Ok(lease)) => sys::host_register(&c.device(0)?.ctx, &lease)?,
                    _ => false,
                }
            } else {
                false
            };
            Local { ipc: None, pinned }
        } else if device_of(region.location()).is_some() {
            Local {
                ipc: self.export(region)?,
                pinned: false,
            }
        } else {
            return Ok(());
        };
        lock(&self.locals).insert(region.base(), local);
        Ok(())
    }

    fn on_unregister(&self, region: &Arc<Region>) {
        let Some(local) = lock(&self.locals).remove(&region.base()) else {
            return;
        };
        if local.pinned
            && let Ok(c) = cuda()
            && let Ok(d) = c.device(0)
        {
            // Copies using the region hold leases; the engine waits for them before the
            // caller may free the memory, but unpinning while one runs is allowed.
            sys::host_unregister(&d.ctx, region.base());
        }
    }

    fn forget_peer(&self, segment: &str, generation: Option<u64>) {
        let mut peers = lock(&self.peers);
        if peers
            .get(segment)
            .is_some_and(|p| generation.is_none_or(|g| p.generation == g))
        {
            peers.remove(segment);
        }
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        // Copies already on the device finish (they cannot be recalled); wait for them, so
        // that no registered memory is touched once this returns.
        let (n, cv) = &*self.inflight;
        let mut g = lock(n);
        while *g > 0 {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        lock(&self.peers).clear();
        lock(in_process()).remove(&(self.local_name.clone(), self.generation));
    }
}
