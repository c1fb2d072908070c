//! [`RdmaTransport`]: the `Transport` front (slicing, registration, unregistration,
//! shutdown). Routing and shared state are in [`crate::shared`], the per-NIC threads in
//! [`crate::worker`], handshakes in [`crate::handshake`] and [`crate::passive`].

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{
    BufferDesc, DeviceDesc, EngineContext, Error, ErrorKind, Region, RemoteSegment, Result,
    SegmentDescriptor, TransferTask, Transport, TransportBuilder, TransportCapabilities,
    device_copier,
};

use crate::config::RdmaConfig;
use crate::gpudirect::{self, MrTarget};
use crate::handshake::{self, Reactor};
use crate::passive::{self, Passive};
use crate::shared::{Cmd, Mailbox, Shared};
use crate::slice::Slice;
use crate::sys;
use crate::topology::Topology;
use crate::wire::HANDSHAKE_KEY;
use crate::worker;

/// The protocol name published in segment descriptors.
pub const RDMA_SCHEME: &str = "rdma";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The RDMA transport (RC queue pairs, one-sided READ/WRITE).
///
/// # Behavior
/// - Tasks are cut into slices of [`RdmaConfig::slice_size`] (a tail of at most a quarter
///   slice joins the previous one) and sprayed over the local NICs nearest the local buffer
///   and the peer's NICs ([`crate::PathPolicy`]).
/// - QPs are created lazily per (local NIC, peer, remote NIC), connected once through a
///   handshake with the peer's listener that runs off the NIC threads and is bounded by
///   [`RdmaConfig::handshake_timeout`]; it also hands over the rkeys of the peer's regions on
///   that NIC. Slices for an endpoint being connected wait for it.
/// - A failed slice is retried on another rail; the failing rail is paused and later probed
///   with a single slice; a NIC whose port goes down is skipped until it is up again. A slice
///   the peer's NIC refuses fails alone: the other slices of its QP are re-posted on a fresh
///   QP of the same rail.
/// - The engine timeout is how long a task's path may make no progress: a task queued behind
///   a QP that keeps completing work waits; a QP with work outstanding that completes nothing
///   for the slice timeout (half the engine timeout) is broken and its slices fail over; a task
///   whose path made no progress past its deadline fails with `Timeout`.
/// - `on_unregister` deregisters the region's MRs on every NIC before it returns (no peer can
///   reach the memory through a key from then on) and makes the workers fail and release
///   every slice using it at once.
/// - `shutdown` stops the handshake thread (destroying the QPs peers connected), destroys
///   every QP of the workers and joins them, deregisters every MR, and only then fails the
///   slices still held (releasing their leases).
pub struct RdmaTransport {
    sh: Arc<Shared>,
    passive: Arc<Passive>,
    reactor: Mutex<Option<Reactor>>,
    workers: Mutex<Vec<JoinHandle<Vec<Slice>>>>,
    published: String,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("nics", &self.sh.names)
            .field("handshake", &self.published)
            .finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// Opens the NICs, starts one worker per NIC and the handshake thread.
    ///
    /// Fails with [`ErrorKind::Unsupported`] ("no RDMA devices …") on hosts without RDMA.
    pub fn start(cfg: RdmaConfig, ctx: &EngineContext) -> Result<Arc<Self>> {
        cfg.validate()?;
        let nics = sys::open_nics(&cfg.nics, cfg.port, cfg.gid_index, cfg.cqe)?;
        let names: Vec<String> = nics.iter().map(|n| n.name.clone()).collect();
        let topo = match &cfg.topology_json {
            Some(j) => Topology::from_json(j, &names)?,
            None => Topology::from_numa(&nics.iter().map(|n| n.numa_node).collect::<Vec<_>>()),
        };
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| Error::io(&format!("bind {}", cfg.listen), &e))?;
        let bound: SocketAddr = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", &e))?;
        let host = if bound.ip().is_unspecified() {
            ctx.hostname.clone()
        } else {
            bound.ip().to_string()
        };
        let published = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", bound.port())
        } else {
            format!("{host}:{}", bound.port())
        };
        cfg.stats.init(&names);
        let handshake_timeout = cfg
            .handshake_timeout
            .unwrap_or((ctx.timeout / 2).min(Duration::from_secs(2)))
            .max(Duration::from_millis(50));
        let mut mailboxes = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..nics.len() {
            let (m, rx, efd) = Mailbox::new()?;
            mailboxes.push(m);
            inboxes.push((rx, efd));
        }
        let limits = handshake::Limits {
            frame_deadline: handshake_timeout,
            max_conns: cfg.max_handshake_conns,
        };
        let passive_limits = passive::Limits {
            max: cfg.max_passive,
            max_pending_per_ip: cfg.max_pending_per_ip,
            pending_grace: (handshake_timeout * 4).max(Duration::from_secs(2)),
            idle_after: cfg.passive_idle,
        };
        let sh = Arc::new(Shared::new(
            cfg,
            ctx.local_name.clone(),
            ctx.generation,
            ctx.timeout,
            nics,
            topo,
            mailboxes,
            handshake_timeout,
            ctx.secret.clone(),
        ));
        let passive = Arc::new(Passive::new(sh.clone(), passive_limits));
        let (reactor, client) =
            Reactor::start(listener, passive.clone(), limits, sh.secret.clone())?;
        let transport = Self {
            sh: sh.clone(),
            passive,
            reactor: Mutex::new(Some(reactor)),
            workers: Mutex::new(Vec::new()),
            published,
        };
        for (i, (rx, efd)) in inboxes.into_iter().enumerate() {
            // On failure `transport` drops here and shuts down what started.
            let t = worker::spawn(sh.clone(), i, rx, efd, client.clone())?;
            lock(&transport.workers).push(t);
        }
        tracing::info!(nics = ?sh.names, handshake = %transport.published, "RDMA transport started");
        Ok(Arc::new(transport))
    }

    /// The NICs this transport opened.
    pub fn nics(&self) -> &[String] {
        &self.sh.names
    }

    /// The published handshake address.
    pub fn handshake_addr(&self) -> &str {
        &self.published
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        RDMA_SCHEME
    }

    /// Device memory when a device runtime is installed (it exports the dma-bufs); which
    /// device buffers this transport moves is decided per request by `can_move`.
    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default().with_device_memory(device_copier().is_some())
    }

    fn publish(&self, d: &mut SegmentDescriptor) {
        for n in &self.sh.nics {
            if !d.devices.iter().any(|x| x.name == n.name) {
                d.devices.push(DeviceDesc {
                    name: n.name.clone(),
                    lid: n.lid,
                    gid: n.gid.to_string(),
                });
            }
        }
        for (k, v) in self.sh.topology().to_descriptor(&self.sh.names) {
            d.priority_matrix.entry(k).or_insert(v);
        }
        d.extra.insert(
            HANDSHAKE_KEY.into(),
            serde_json::Value::String(self.published.clone()),
        );
        gpudirect::publish(d, &self.sh.mrs.device_regions(&self.sh.names));
    }

    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        let d = remote.descriptor();
        d.speaks(self.name())
            && !d.devices.is_empty()
            && d.extra.get(HANDSHAKE_KEY).is_some_and(|v| v.is_string())
    }

    /// Host memory on both sides, or device memory registered with the NICs from a dma-buf:
    /// a local device region whose registration succeeded here, a remote device buffer its
    /// owner published under [`crate::GPUDIRECT_KEY`].
    fn can_move(&self, region: &Region, remote: &RemoteSegment, buffer: &BufferDesc) -> bool {
        if !self.can_reach(remote) {
            return false;
        }
        gpudirect::can_move(
            region.location(),
            region.location().is_host() || self.sh.mrs.has(region),
            buffer,
            remote.descriptor(),
        )
    }

    fn submit(&self, tasks: Vec<TransferTask>) {
        let sh = &self.sh;
        if sh.closed.load(Ordering::Acquire) {
            for t in tasks {
                t.completer.complete(Err(Error::new(
                    ErrorKind::Closed,
                    "RDMA transport is shut down",
                )));
            }
            return;
        }
        let deadline = Instant::now() + sh.timeout;
        let ss = sh.cfg.slice_size;
        let mut out = Vec::new();
        for t in tasks {
            let len = t.local.len();
            let mut n = len.div_ceil(ss);
            if n > 1 && len % ss != 0 && len % ss <= ss / 4 {
                n -= 1;
            }
            let completers = t.completer.into_slices(n as usize);
            for (i, c) in completers.into_iter().enumerate() {
                let off = i as u64 * ss;
                let l = if i as u64 == n - 1 { len - off } else { ss };
                match t.local.slice(off, l) {
                    Ok(local) => out.push(Slice {
                        op: t.opcode,
                        local,
                        remote: t.remote.clone(),
                        remote_addr: t.remote_addr + off,
                        completer: Some(c),
                        deadline,
                        attempts: 0,
                        failed_rails: Vec::new(),
                        seq: sh.next_seq(),
                        keys_stamp: 0,
                        refused_rkey: None,
                    }),
                    Err(e) => c.complete(Err(e)),
                }
            }
        }
        sh.dispatch(out);
    }

    /// Registers the region on every NIC: host memory by address, device memory from the
    /// dma-buf the installed device runtime exports (GPUDirect RDMA). A NIC refusing the
    /// dma-buf is named in a warning and the region moves only through the others; a region
    /// no NIC registered is left to other transports (`can_move` says no for it). Under
    /// [`RdmaConfig::require_gpudirect`] any refusal fails the registration instead.
    fn on_register(&self, region: &Arc<Region>) -> Result<()> {
        let copier = device_copier();
        if let Some(c) = &copier
            && !region.location().is_host()
        {
            self.sh.learn_gpus(&**c);
        }
        let targets: Vec<&dyn MrTarget> =
            self.sh.nics.iter().map(|n| &**n as &dyn MrTarget).collect();
        match gpudirect::register(&targets, region, copier.as_deref()) {
            Ok(reg) if self.sh.cfg.require_gpudirect && !reg.refused.is_empty() => {
                Err(reg.refused.into_iter().next().expect("not empty"))
            }
            Ok(mut reg) => {
                for e in std::mem::take(&mut reg.refused) {
                    tracing::warn!(
                        error = %e,
                        "this device region moves over RDMA only through the NICs that registered it"
                    );
                }
                self.sh.mrs.insert(region, reg);
                Ok(())
            }
            Err(e) if !region.location().is_host() && !self.sh.cfg.require_gpudirect => {
                tracing::warn!(
                    error = %e,
                    "RDMA leaves this device region to other transports (MC_RDMA_REQUIRE_GPUDIRECT=1 makes this an error)"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn on_unregister(&self, region: &Arc<Region>) {
        // First revoke: every NIC deregisters the region's MRs, so from now on neither a
        // peer (through an rkey) nor one of our own WRs (through an lkey) can touch it.
        self.sh.mrs.remove(region);
        // Then release: the workers fail every slice using it and drop their leases.
        let weak = Arc::downgrade(region);
        self.sh.send_all(|| Cmd::Unregister {
            region: weak.clone(),
        });
    }

    fn forget_peer(&self, segment: &str, generation: Option<u64>) {
        self.passive.forget(segment, generation);
        if generation.is_none() {
            self.sh.forget_rails(segment);
        }
        let peer = segment.to_string();
        self.sh.send_all(|| Cmd::Forget {
            peer: peer.clone(),
            generation,
        });
    }

    fn shutdown(&self) {
        let sh = &self.sh;
        if sh.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // 1. No new handshakes, and the QPs peers connected to us are destroyed.
        if let Some(mut r) = lock(&self.reactor).take() {
            r.stop();
        }
        self.passive.clear();
        // 2. Each worker destroys its QPs and hands back the slices it held.
        sh.send_all(|| Cmd::Shutdown);
        let me = std::thread::current().id();
        let mut held = Vec::new();
        for t in std::mem::take(&mut *lock(&self.workers)) {
            if t.thread().id() != me
                && let Ok(slices) = t.join()
            {
                held.extend(slices);
            }
        }
        // 3. No MR stays registered...
        sh.mrs.clear();
        // 4. ...before the leases are released.
        drop(held);
    }
}

impl TransportBuilder for RdmaConfig {
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        Ok(RdmaTransport::start(*self, ctx)?)
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
