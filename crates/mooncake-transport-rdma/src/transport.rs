//! [`RdmaTransport`]: slicing, path choice, rail health, memory registration and the
//! handshake listener. The per-NIC threads are in [`crate::worker`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{
    Access, DeviceDesc, EngineContext, Error, ErrorKind, Opcode, Region, RegionLease,
    RemoteSegment, Result, SegmentDescriptor, SliceCompleter, TransferTask, Transport,
    TransportCapabilities,
};
use sideway::ibverbs::memory_region::MemoryRegion;

use crate::config::{PathPolicy, RdmaConfig};
use crate::sys::{self, Nic, Qp, QpPeer, QpTiming};
use crate::topology::Topology;
use crate::wire::{self, QpInfo, RemoteKey, Reply, Request};
use crate::worker::{self, Cmd, WorkerHandle};

/// The `extra` key of the segment descriptor holding the handshake `host:port`.
pub const HANDSHAKE_KEY: &str = "rdma_handshake";

/// One slice of a task, as it travels between the submitter and the NIC workers.
pub(crate) struct Slice {
    pub op: Opcode,
    pub local: RegionLease,
    pub remote: Arc<RemoteSegment>,
    pub remote_addr: u64,
    pub completer: Option<SliceCompleter>,
    pub deadline: Instant,
    pub attempts: u32,
    pub failed_rails: Vec<Rail>,
    pub seq: usize,
}

impl Slice {
    pub fn complete(&mut self, r: Result<()>) {
        if let Some(c) = self.completer.take() {
            c.complete(r);
        }
    }
}

/// A (local NIC index, remote NIC name) pair.
pub(crate) type Rail = (usize, String);

#[derive(Debug, Clone, Copy)]
enum RailState {
    Paused { until: Instant, backoff: Duration },
    Probing { out: bool, backoff: Duration },
}

struct RegionMrs {
    len: u64,
    access: Access,
    mrs: Vec<Arc<MemoryRegion>>,
}

struct PassiveQp {
    from: String,
    generation: u64,
    from_nic: String,
    my_nic: String,
    _qp: Qp,
}

pub(crate) struct Inner {
    pub cfg: RdmaConfig,
    pub local_name: String,
    pub generation: u64,
    pub timeout: Duration,
    pub slice_timeout: Duration,
    pub nics: Vec<Arc<Nic>>,
    pub names: Vec<String>,
    pub topo: Topology,
    pub nic_down: Vec<AtomicBool>,
    mrs: RwLock<BTreeMap<u64, RegionMrs>>,
    rails: Mutex<HashMap<Rail, RailState>>,
    passive: Mutex<VecDeque<PassiveQp>>,
    workers: OnceLock<Vec<WorkerHandle>>,
    published: String,
    bound: SocketAddr,
    rr: AtomicUsize,
    pub closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The RDMA transport (RC queue pairs, one-sided READ/WRITE).
///
/// # Behavior
/// - Tasks are cut into slices of [`RdmaConfig::slice_size`] (a tail of at most a quarter
///   slice joins the previous one) and sprayed over the local NICs nearest the local buffer
///   and the peer's NICs ([`PathPolicy`]).
/// - QPs are created lazily per (local NIC, peer, remote NIC) through a TCP handshake with
///   the peer's listener, which also hands over the rkeys of the peer's regions on that NIC.
/// - A failed slice is retried on another rail; the failing rail is paused and later probed
///   with a single slice; a NIC whose port goes down is skipped until it is up again.
/// - Every task completes within the engine timeout (plus one completion poll interval).
pub struct RdmaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("nics", &self.inner.names)
            .field("handshake", &self.inner.published)
            .finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// Opens the NICs, starts one worker per NIC and the handshake listener.
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
        let bound = listener
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
        let slice_timeout = cfg
            .slice_timeout
            .unwrap_or(ctx.timeout / 2)
            .max(Duration::from_millis(100));
        let inner = Arc::new(Inner {
            local_name: ctx.local_name.clone(),
            generation: ctx.generation,
            timeout: ctx.timeout,
            slice_timeout,
            nic_down: nics
                .iter()
                .map(|n| AtomicBool::new(!n.port_active()))
                .collect(),
            nics,
            names,
            topo,
            mrs: RwLock::new(BTreeMap::new()),
            rails: Mutex::new(HashMap::new()),
            passive: Mutex::new(VecDeque::new()),
            workers: OnceLock::new(),
            published,
            bound,
            rr: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            cfg,
        });
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..inner.nics.len() {
            let (h, t) = worker::spawn(inner.clone(), i)?;
            handles.push(h);
            threads.push(t);
        }
        let _ = inner.workers.set(handles);
        let li = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("mooncake-rdma-handshake".into())
                .spawn(move || li.serve(listener))
                .map_err(|e| Error::io("spawn handshake thread", &e))?,
        );
        *lock(&inner.threads) = threads;
        tracing::info!(nics = ?inner.names, handshake = %inner.published, "RDMA transport started");
        Ok(Arc::new(Self { inner }))
    }

    /// The NICs this transport opened.
    pub fn nics(&self) -> &[String] {
        &self.inner.names
    }

    /// The published handshake address.
    pub fn handshake_addr(&self) -> &str {
        &self.inner.published
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        crate::RDMA_SCHEME
    }

    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default()
    }

    fn publish(&self, d: &mut SegmentDescriptor) {
        for n in &self.inner.nics {
            if !d.devices.iter().any(|x| x.name == n.name) {
                d.devices.push(DeviceDesc {
                    name: n.name.clone(),
                    lid: n.lid,
                    gid: n.gid.to_string(),
                });
            }
        }
        for (k, v) in self.inner.topo.to_descriptor(&self.inner.names) {
            d.priority_matrix.entry(k).or_insert(v);
        }
        d.extra.insert(
            HANDSHAKE_KEY.into(),
            serde_json::Value::String(self.inner.published.clone()),
        );
    }

    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        let d = remote.descriptor();
        d.speaks(self.name())
            && !d.devices.is_empty()
            && d.extra.get(HANDSHAKE_KEY).is_some_and(|v| v.is_string())
    }

    fn submit(&self, tasks: Vec<TransferTask>) {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            for t in tasks {
                t.completer.complete(Err(Error::new(
                    ErrorKind::Closed,
                    "RDMA transport is shut down",
                )));
            }
            return;
        }
        let deadline = Instant::now() + inner.timeout;
        let ss = inner.cfg.slice_size;
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
                        seq: inner.rr.fetch_add(1, Ordering::Relaxed),
                    }),
                    Err(e) => c.complete(Err(e)),
                }
            }
        }
        inner.dispatch(out);
    }

    fn on_register(&self, region: &Arc<Region>) -> Result<()> {
        let a = region.access();
        let mrs = self
            .inner
            .nics
            .iter()
            .map(|n| {
                n.reg_mr(
                    region.base(),
                    region.len(),
                    a.remote_read(),
                    a.remote_write(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner
            .mrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                region.base(),
                RegionMrs {
                    len: region.len(),
                    access: a,
                    mrs,
                },
            );
        Ok(())
    }

    fn on_unregister(&self, region: &Arc<Region>) {
        self.inner
            .mrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&region.base());
    }

    fn forget_peer(&self, segment: &str, _generation: Option<u64>) {
        // Endpoints carry their peer's generation and are rebuilt when a task shows a newer
        // one; forgetting drops every endpoint of the segment (they reconnect lazily).
        lock(&self.inner.passive).retain(|p| p.from != segment);
        self.inner.send_all(|| Cmd::Forget(segment.to_string()));
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.send_all(|| Cmd::Shutdown);
        let wake = if inner.bound.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], inner.bound.port()))
        } else {
            inner.bound
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
        let threads = std::mem::take(&mut *lock(&inner.threads));
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        lock(&inner.passive).clear();
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn send_all(&self, cmd: impl Fn() -> Cmd) {
        if let Some(ws) = self.workers.get() {
            for w in ws {
                w.send(cmd());
            }
        }
    }

    pub fn timing(&self) -> QpTiming {
        QpTiming {
            timeout: self.cfg.qp_timeout,
            retry_cnt: self.cfg.qp_retry_cnt,
            rnr_retry: 7,
            max_rd_atomic: 16,
        }
    }

    /// Sends each slice to the worker of the rail chosen for it.
    pub fn dispatch(&self, slices: Vec<Slice>) {
        let Some(workers) = self.workers.get() else {
            return;
        };
        let mut per: Vec<Vec<(Slice, String)>> = (0..workers.len()).map(|_| Vec::new()).collect();
        for mut s in slices {
            match self.choose(&s) {
                Some((l, r)) => per[l].push((s, r)),
                None => {
                    let e = Error::new(
                        ErrorKind::PeerUnreachable,
                        format!(
                            "no usable RDMA path to {:?}: it publishes NICs {:?}; local NICs {:?} (down: {:?})",
                            s.remote.name(),
                            s.remote.descriptor().devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
                            self.names,
                            self.nic_down.iter().map(|d| d.load(Ordering::Relaxed)).collect::<Vec<_>>()
                        ),
                    )
                    .with_context("peer", s.remote.name());
                    s.complete(Err(e));
                }
            }
        }
        for (w, batch) in workers.iter().zip(per) {
            if !batch.is_empty() {
                w.send(Cmd::Post(batch));
            }
        }
    }

    /// Picks a rail: healthy (or claimable for a probe) first, then any rail this slice has
    /// not failed on yet. NICs whose port is down are never picked.
    fn choose(&self, s: &Slice) -> Option<Rail> {
        let d = s.remote.descriptor();
        let remote_all: Vec<&str> = d.devices.iter().map(|x| x.name.as_str()).collect();
        if remote_all.is_empty() {
            return None;
        }
        let remote_loc = d
            .buffers
            .iter()
            .find(|b| s.remote_addr >= b.addr && s.remote_addr - b.addr < b.length)
            .map(|b| b.name.as_str());
        let mut remote_pref: Vec<&str> = remote_loc
            .and_then(|l| d.priority_matrix.get(l))
            .and_then(|t| t.first())
            .map(|p| {
                p.iter()
                    .map(String::as_str)
                    .filter(|n| remote_all.contains(n))
                    .collect()
            })
            .unwrap_or_default();
        if remote_pref.is_empty() {
            remote_pref = remote_all.clone();
        }
        let (lp, lf) = self.topo.tiers(s.local.region().location());
        let now = Instant::now();
        let mut rails = lock(&self.rails);
        for strict in [true, false] {
            for tier in [&lp, &lf] {
                let locals: Vec<usize> = tier
                    .iter()
                    .copied()
                    .filter(|&i| !self.nic_down[i].load(Ordering::Acquire))
                    .collect();
                for k in 0..locals.len() {
                    let l = locals[(s.seq + k) % locals.len()];
                    let lname = self.names[l].as_str();
                    let mut cands: Vec<&str> = Vec::new();
                    let same = remote_all.contains(&lname);
                    if self.cfg.path_policy != PathPolicy::All && same {
                        cands.push(lname);
                    }
                    if self.cfg.path_policy != PathPolicy::SameRailOnly {
                        let n = remote_pref.len();
                        cands.extend(
                            (0..n).map(|j| remote_pref[(s.seq / locals.len().max(1) + j) % n]),
                        );
                        cands.extend(remote_all.iter().filter(|r| !remote_pref.contains(r)));
                    }
                    for r in cands {
                        let key: Rail = (l, r.to_string());
                        if s.failed_rails.contains(&key) {
                            continue;
                        }
                        if strict && !Self::claim(&mut rails, &key, now) {
                            continue;
                        }
                        return Some(key);
                    }
                }
            }
        }
        None
    }

    fn claim(rails: &mut HashMap<Rail, RailState>, key: &Rail, now: Instant) -> bool {
        match rails.get_mut(key) {
            None => true,
            Some(RailState::Paused { until, backoff }) => {
                if now < *until {
                    return false;
                }
                let backoff = *backoff;
                rails.insert(key.clone(), RailState::Probing { out: true, backoff });
                tracing::info!(rail = ?key, "probing paused RDMA rail");
                true
            }
            Some(RailState::Probing { out, .. }) => {
                if *out {
                    return false;
                }
                *out = true;
                true
            }
        }
    }

    /// A slice succeeded on `rail`.
    pub fn rail_ok(&self, rail: &Rail) {
        let mut rails = lock(&self.rails);
        if !rails.is_empty() && rails.remove(rail).is_some() {
            tracing::info!(?rail, "RDMA rail healthy again");
        }
    }

    /// `rail` failed: avoid it for a while (doubling up to 8× the configured pause).
    pub fn rail_failed(&self, rail: &Rail) {
        let base = self.cfg.rail_pause;
        let mut rails = lock(&self.rails);
        let backoff = match rails.get(rail) {
            Some(RailState::Probing { backoff, .. }) => (*backoff * 2).min(base * 8),
            Some(RailState::Paused { backoff, .. }) => *backoff,
            None => base,
        };
        rails.insert(
            rail.clone(),
            RailState::Paused {
                until: Instant::now() + backoff,
                backoff,
            },
        );
        tracing::warn!(?rail, ?backoff, "pausing RDMA rail");
    }

    /// The local NIC came back: its paused rails may be probed at once.
    pub fn nic_up(&self, nic: usize) {
        let mut rails = lock(&self.rails);
        for (k, v) in rails.iter_mut() {
            if k.0 == nic
                && let RailState::Paused { backoff, .. } = *v
            {
                *v = RailState::Probing {
                    out: false,
                    backoff,
                };
            }
        }
    }

    /// Handles a failed slice: permanent errors complete it, temporary ones retry it on a
    /// rail it has not failed on, until attempts, rails or the deadline run out.
    pub fn retry(&self, mut s: Slice, err: Error, rail: Rail) {
        if s.completer.is_none() {
            return;
        }
        if !err.is_temporary() {
            s.complete(Err(err));
            return;
        }
        s.attempts += 1;
        if !s.failed_rails.contains(&rail) {
            s.failed_rails.push(rail);
        }
        if Instant::now() >= s.deadline {
            s.complete(Err(Error::new(
                ErrorKind::Timeout,
                format!("RDMA slice missed its deadline; last error: {err}"),
            )));
            return;
        }
        if s.attempts >= self.cfg.max_attempts {
            s.complete(Err(err.with_context("attempts", s.attempts)));
            return;
        }
        if self.closed.load(Ordering::Acquire) {
            s.complete(Err(Error::new(
                ErrorKind::Closed,
                "RDMA transport is shut down",
            )));
            return;
        }
        self.cfg.stats.retried();
        tracing::debug!(error = %err, attempts = s.attempts, "retrying RDMA slice on another rail");
        match self.choose(&s) {
            Some((l, r)) => {
                if let Some(w) = self.workers.get().and_then(|ws| ws.get(l)) {
                    w.send(Cmd::Post(vec![(s, r)]));
                }
            }
            None => s.complete(Err(err.with_context("paths", "every path failed"))),
        }
    }

    /// lkey of the region `lease` lies in, on NIC `nic`.
    pub fn lkey(&self, lease: &RegionLease, nic: usize) -> Option<u32> {
        let m = self.mrs.read().unwrap_or_else(|p| p.into_inner());
        m.get(&lease.region().base())
            .and_then(|r| r.mrs.get(nic))
            .map(|mr| mr.lkey())
    }

    /// Regions a peer may access through NIC `nic`, with their rkeys.
    pub fn keys_for(&self, nic: usize) -> Vec<RemoteKey> {
        let m = self.mrs.read().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, r)| r.access != Access::LocalOnly)
            .filter_map(|(&addr, r)| {
                r.mrs.get(nic).map(|mr| RemoteKey {
                    addr,
                    len: r.len,
                    rkey: mr.rkey(),
                })
            })
            .collect()
    }

    pub fn qp_info(&self, nic: usize, qp: &Qp) -> QpInfo {
        let n = &self.nics[nic];
        QpInfo {
            qpn: qp.qpn,
            psn: qp.psn,
            gid: wire::gid_to_hex(&n.gid.raw),
            lid: n.lid,
            mtu: sys::mtu_to_u32(n.mtu),
        }
    }

    pub fn qp_peer(info: &QpInfo) -> Result<QpPeer> {
        Ok(QpPeer {
            qpn: info.qpn,
            psn: info.psn,
            gid: sideway::ibverbs::address::Gid {
                raw: wire::gid_from_hex(&info.gid)?,
            },
            lid: info.lid,
            mtu: sys::mtu_from_u32(info.mtu),
        })
    }

    fn serve(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            if self.closed.load(Ordering::Acquire) {
                break;
            }
            let Ok(mut s) = conn else { continue };
            let io_timeout = Some(self.timeout.min(Duration::from_secs(5)));
            let _ = s.set_read_timeout(io_timeout);
            let _ = s.set_write_timeout(io_timeout);
            let _ = s.set_nodelay(true);
            let reply = match wire::recv::<Request>(&mut s) {
                Ok(req) => self.handle(req),
                Err(e) => {
                    tracing::debug!(error = %e, "bad handshake request");
                    continue;
                }
            };
            if let Err(e) = wire::send(&mut s, &reply) {
                tracing::debug!(error = %e, "handshake reply not delivered");
            }
        }
    }

    fn handle(&self, req: Request) -> Reply {
        let refuse = |reason: String| {
            tracing::warn!(%reason, "refusing RDMA handshake");
            Reply::Refused { reason }
        };
        match req {
            Request::Keys { peer_nic, .. } => {
                match self.names.iter().position(|n| *n == peer_nic) {
                    Some(i) => Reply::Ok {
                        generation: self.generation,
                        qp: None,
                        keys: self.keys_for(i),
                    },
                    None => refuse(format!("no NIC {peer_nic:?} here")),
                }
            }
            Request::Connect {
                from,
                generation,
                local_nic,
                peer_nic,
                qp,
            } => {
                let Some(i) = self.names.iter().position(|n| *n == peer_nic) else {
                    return refuse(format!("no NIC {peer_nic:?} here"));
                };
                if self.nic_down[i].load(Ordering::Acquire) {
                    return refuse(format!("NIC {peer_nic} is down"));
                }
                let peer = match Self::qp_peer(&qp) {
                    Ok(p) => p,
                    Err(e) => return refuse(e.to_string()),
                };
                let nic = &self.nics[i];
                let mut mine = match nic.create_qp(self.cfg.max_wr) {
                    Ok(q) => q,
                    Err(e) => return refuse(e.to_string()),
                };
                if let Err(e) = mine.connect(nic, &peer, self.timing()) {
                    return refuse(e.to_string());
                }
                let info = self.qp_info(i, &mine);
                let keys = self.keys_for(i);
                let mut p = lock(&self.passive);
                p.retain(|x| {
                    !(x.from == from
                        && (x.generation < generation
                            || (x.from_nic == local_nic && x.my_nic == peer_nic)))
                });
                p.push_back(PassiveQp {
                    from: from.clone(),
                    generation,
                    from_nic: local_nic,
                    my_nic: peer_nic,
                    _qp: mine,
                });
                while p.len() > self.cfg.max_passive {
                    p.pop_front();
                }
                tracing::debug!(%from, qpn = info.qpn, "accepted RDMA connection");
                Reply::Ok {
                    generation: self.generation,
                    qp: Some(info),
                    keys,
                }
            }
        }
    }
}
