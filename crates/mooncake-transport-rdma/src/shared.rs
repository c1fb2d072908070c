//! State shared by the transport's front (`submit`), its NIC workers and its handshake
//! reactor: the opened NICs, the memory-region table, rail health, the workers' mailboxes,
//! and the routing of slices to workers (path choice, retries).
//!
//! Workers depend on this module, never on [`crate::transport`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use mooncake_core::{
    Access, ClusterSecret, DeviceCopier, Error, ErrorKind, Location, Region, Result,
};

use crate::config::{PathPolicy, RdmaConfig};
use crate::gpudirect::{self, Registration};
use crate::rail::{Claim, RailKey, Rails};
use crate::slice::Slice;
use crate::sys::{self, EventFd, Nic, Qp, QpPeer, QpTiming};
use crate::topology::Topology;
use crate::wire::{self, QpInfo, RemoteKey, Reply};

/// A message for a NIC worker.
pub(crate) enum Cmd {
    /// Queue these slices towards the given remote NIC.
    Post(Vec<(Slice, String)>),
    /// Drop the endpoints of a peer (of one generation, or all).
    Forget {
        peer: String,
        generation: Option<u64>,
    },
    /// A local region was unregistered (its MRs are already gone): fail and release every
    /// slice whose lease is in it.
    Unregister { region: Weak<Region> },
    /// The outcome of a handshake the worker started for endpoint `ep` (`seq` 0: connect;
    /// otherwise the keys refresh of that number).
    Handshake {
        ep: u64,
        seq: u64,
        result: Result<Reply>,
    },
    /// Destroy every QP, hand back every slice, exit.
    Shutdown,
}

/// The sending side of a worker's queue; sending wakes the worker.
#[derive(Clone)]
pub(crate) struct Mailbox {
    tx: Sender<Cmd>,
    efd: Arc<EventFd>,
}

impl Mailbox {
    /// A mailbox and the worker's receiving end.
    pub fn new() -> Result<(Self, Receiver<Cmd>, Arc<EventFd>)> {
        let (tx, rx) = mpsc::channel();
        let efd = Arc::new(EventFd::new()?);
        Ok((
            Self {
                tx,
                efd: efd.clone(),
            },
            rx,
            efd,
        ))
    }

    /// Sends `cmd`; a worker that has exited drops it (its slices fail as dropped).
    pub fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            self.efd.notify();
        }
    }
}

/// One registered region's MRs, one per NIC. Dropping it deregisters them.
struct RegionMrs {
    /// Which registration these MRs belong to (the same address may be registered again
    /// while an earlier registration is still being unregistered).
    region: Weak<Region>,
    len: u64,
    access: Access,
    /// Device memory registered from a dma-buf (GPUDirect RDMA).
    device: bool,
    reg: Registration,
}

/// Every registered region's MRs. The MRs are only ever held here: removing a region
/// deregisters it on every NIC before the call returns.
#[derive(Default)]
pub(crate) struct MrTable {
    map: RwLock<BTreeMap<u64, RegionMrs>>,
}

impl MrTable {
    /// Adds the MRs of `region`.
    pub fn insert(&self, region: &Arc<Region>, reg: Registration) {
        let old = self.map.write().unwrap_or_else(|p| p.into_inner()).insert(
            region.base(),
            RegionMrs {
                region: Arc::downgrade(region),
                len: region.len(),
                access: region.access(),
                device: reg.dmabuf.is_some(),
                reg,
            },
        );
        // An earlier registration of the same address still being unregistered: its MRs go
        // now (it is out of the registry already).
        drop(old);
    }

    /// Deregisters `region` on every NIC (when this returns, no NIC accepts its keys). True
    /// if it was registered.
    pub fn remove(&self, region: &Arc<Region>) -> bool {
        let gone = {
            let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
            match m.get(&region.base()) {
                Some(r) if std::ptr::eq(r.region.as_ptr(), Arc::as_ptr(region)) => {
                    m.remove(&region.base())
                }
                _ => None,
            }
        };
        // Dropped outside the lock: each drop is an `ibv_dereg_mr`.
        gone.is_some()
    }

    /// True while this registration of `region` has its MRs.
    pub fn has(&self, region: &Region) -> bool {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(&region.base())
            .is_some_and(|r| std::ptr::eq(r.region.as_ptr(), region))
    }

    /// The device regions registered from dma-bufs (GPUDirect RDMA): base address and the
    /// NICs (named by `names`) holding an MR of it.
    pub fn device_regions(&self, names: &[String]) -> Vec<(u64, Vec<String>)> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, r)| r.device)
            .map(|(&a, r)| {
                let nics = r
                    .reg
                    .mrs
                    .iter()
                    .zip(names)
                    .filter(|(mr, _)| mr.is_some())
                    .map(|(_, n)| n.clone())
                    .collect();
                (a, nics)
            })
            .collect()
    }

    /// Deregisters everything.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.map.write().unwrap_or_else(|p| p.into_inner()));
        drop(all);
    }

    /// lkey of `region` on NIC `nic` (`None` once it was unregistered).
    pub fn lkey(&self, region: &Arc<Region>, nic: usize) -> Option<u32> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(&region.base())
            .filter(|r| std::ptr::eq(r.region.as_ptr(), Arc::as_ptr(region)))
            .and_then(|r| r.reg.mrs.get(nic))
            .and_then(Option::as_ref)
            .map(|mr| mr.lkey())
    }

    /// Regions a peer may access through NIC `nic`, with their rkeys.
    pub fn keys_for(&self, nic: usize) -> Vec<RemoteKey> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, r)| r.access.remote_read() || r.access.remote_write())
            .filter_map(|(&addr, r)| {
                r.reg
                    .mrs
                    .get(nic)
                    .and_then(Option::as_ref)
                    .map(|mr| RemoteKey {
                        addr,
                        len: r.len,
                        rkey: mr.rkey(),
                        writable: r.access.remote_write(),
                    })
            })
            .collect()
    }
}

/// What the front, the workers and the reactor share.
pub(crate) struct Shared {
    pub cfg: RdmaConfig,
    pub local_name: String,
    pub generation: u64,
    /// The cluster secret handshakes prove, both ways (none: peers are not authenticated).
    pub secret: Option<ClusterSecret>,
    /// The engine timeout (every task's deadline).
    pub timeout: Duration,
    /// A posted slice without a completion after this long breaks its QP.
    pub slice_timeout: Duration,
    /// A handshake (connect or keys) ends by this long after it started.
    pub handshake_timeout: Duration,
    pub nics: Vec<Arc<Nic>>,
    pub names: Vec<String>,
    /// Which NICs serve which location (`cpu:N` rows, or the JSON topology).
    topo: Topology,
    /// `topo` with `cuda:N` rows by PCIe distance, made when the first device region is
    /// registered (asking the device runtime for PCI addresses loads its driver).
    gpu_topo: OnceLock<Topology>,
    pub nic_down: Vec<AtomicBool>,
    pub mrs: MrTable,
    rails: Mutex<Rails>,
    /// Mirrors `!rails.is_empty()`, so the hot path skips the lock while every rail is fine.
    rails_unhealthy: AtomicBool,
    pub mailboxes: Vec<Mailbox>,
    pub closed: AtomicBool,
    rr: std::sync::atomic::AtomicUsize,
}

impl Shared {
    #[expect(clippy::too_many_arguments, reason = "built once, in one place")]
    pub fn new(
        cfg: RdmaConfig,
        local_name: String,
        generation: u64,
        timeout: Duration,
        nics: Vec<Arc<Nic>>,
        topo: Topology,
        mailboxes: Vec<Mailbox>,
        handshake_timeout: Duration,
        secret: Option<ClusterSecret>,
    ) -> Self {
        let slice_timeout = cfg
            .slice_timeout
            .unwrap_or(timeout / 2)
            .max(Duration::from_millis(100));
        let names = nics.iter().map(|n| n.name.clone()).collect();
        let rails = Rails::new(cfg.rail_pause, slice_timeout.max(handshake_timeout) * 2);
        Self {
            local_name,
            generation,
            secret,
            timeout,
            slice_timeout,
            handshake_timeout,
            nic_down: nics
                .iter()
                .map(|n| AtomicBool::new(!n.port_active()))
                .collect(),
            nics,
            names,
            topo,
            gpu_topo: OnceLock::new(),
            mrs: MrTable::default(),
            rails: Mutex::new(rails),
            rails_unhealthy: AtomicBool::new(false),
            mailboxes,
            closed: AtomicBool::new(false),
            rr: std::sync::atomic::AtomicUsize::new(0),
            cfg,
        }
    }

    /// The next submission sequence number.
    pub fn next_seq(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    pub fn nic_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn rails(&self) -> MutexGuard<'_, Rails> {
        self.rails.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a command to every worker.
    pub fn send_all(&self, cmd: impl Fn() -> Cmd) {
        for m in &self.mailboxes {
            m.send(cmd());
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

    /// Sends each slice to the worker of the rail chosen for it.
    pub fn dispatch(&self, slices: Vec<Slice>) {
        let mut per: Vec<Vec<(Slice, String)>> =
            (0..self.mailboxes.len()).map(|_| Vec::new()).collect();
        for mut s in slices {
            match self.choose(&s) {
                Some((l, r)) => per[l].push((s, r)),
                None => {
                    let e = self.no_path(&s);
                    s.complete(Err(e));
                }
            }
        }
        for (m, batch) in self.mailboxes.iter().zip(per) {
            if !batch.is_empty() {
                m.send(Cmd::Post(batch));
            }
        }
    }

    fn no_path(&self, s: &Slice) -> Error {
        Error::new(
            ErrorKind::PeerUnreachable,
            format!(
                "no usable RDMA path to {:?}: it publishes NICs {:?}; local NICs {:?} (down: {:?})",
                s.peer(),
                s.remote
                    .descriptor()
                    .devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>(),
                self.names,
                self.nic_down
                    .iter()
                    .map(|d| d.load(Ordering::Relaxed))
                    .collect::<Vec<_>>()
            ),
        )
        .with_context("peer", s.peer())
    }

    /// The NIC tiers of every location (with `cuda:N` rows once [`Self::learn_gpus`] ran).
    pub fn topology(&self) -> &Topology {
        self.gpu_topo.get().unwrap_or(&self.topo)
    }

    /// Adds `cuda:N` rows, ranking the NICs by PCIe distance to each GPU `copier` knows
    /// (once; rows the JSON topology has are kept).
    pub fn learn_gpus(&self, copier: &dyn DeviceCopier) {
        self.gpu_topo.get_or_init(|| {
            let mut t = self.topo.clone();
            t.add_cuda_devices(std::path::Path::new("/"), copier, &self.names);
            t
        });
    }

    /// Picks a rail: healthy (or claimable for a probe) first, then any rail this slice has
    /// not failed on yet. NICs whose port is down are never picked.
    pub fn choose(&self, s: &Slice) -> Option<(usize, String)> {
        let d = s.remote.descriptor();
        let remote_all: Vec<&str> = d.devices.iter().map(|x| x.name.as_str()).collect();
        if remote_all.is_empty() {
            return None;
        }
        let buffer = d
            .buffers
            .iter()
            .find(|b| s.remote_addr >= b.addr && s.remote_addr - b.addr < b.length);
        let remote_loc = buffer.map(|b| b.name.as_str());
        // A remote device buffer is reachable only through the NICs that registered its
        // dma-buf.
        let mut remote_all = remote_all;
        if let Some(b) = buffer
            && !b.name.parse::<Location>().unwrap_or_default().is_host()
        {
            let through = gpudirect::remote_nics(d, b.addr).unwrap_or_default();
            remote_all.retain(|n| through.contains(n));
            if remote_all.is_empty() {
                return None;
            }
        }
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
        let (lp, lf) = self.topology().tiers(s.local.region().location());
        // A local device region only on the NICs that registered its dma-buf.
        let local_host = s.local.region().location().is_host();
        let now = Instant::now();
        let mut rails = self
            .rails_unhealthy
            .load(Ordering::Acquire)
            .then(|| self.rails());
        for strict in [true, false] {
            for tier in [&lp, &lf] {
                let locals: Vec<usize> = tier
                    .iter()
                    .copied()
                    .filter(|&i| !self.nic_down[i].load(Ordering::Acquire))
                    .filter(|&i| local_host || self.mrs.lkey(s.local.region(), i).is_some())
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
                        if s.failed_rails.iter().any(|(fl, fr)| *fl == l && fr == r) {
                            continue;
                        }
                        if strict
                            && let Some(rails) = rails.as_mut()
                            && rails.claim(&RailKey::new(l, s.peer(), r), now) == Claim::Denied
                        {
                            continue;
                        }
                        return Some((l, r.to_string()));
                    }
                }
            }
        }
        None
    }

    /// A slice succeeded on this rail.
    pub fn rail_ok(&self, nic: usize, peer: &str, rnic: &str) {
        if !self.rails_unhealthy.load(Ordering::Acquire) {
            return;
        }
        let mut r = self.rails();
        r.ok(&RailKey::new(nic, peer, rnic));
        self.rails_unhealthy.store(!r.is_empty(), Ordering::Release);
    }

    /// This rail failed: avoid it for a while.
    pub fn rail_failed(&self, nic: usize, peer: &str, rnic: &str) {
        let mut r = self.rails();
        r.failed(&RailKey::new(nic, peer, rnic), Instant::now());
        self.rails_unhealthy.store(true, Ordering::Release);
    }

    /// Local NIC `nic` came back: its paused rails may be probed at once.
    pub fn nic_up(&self, nic: usize) {
        self.rails().nic_up(nic);
    }

    /// Drops rail health of `peer`.
    pub fn forget_rails(&self, peer: &str) {
        let mut r = self.rails();
        r.forget_peer(peer);
        self.rails_unhealthy.store(!r.is_empty(), Ordering::Release);
    }

    /// Handles a failed slice: permanent errors complete it, temporary ones retry it on a
    /// rail it has not failed on, until attempts, rails or the deadline run out.
    pub fn retry(&self, mut s: Slice, err: Error, nic: usize, rnic: &str) {
        if s.is_done() {
            return;
        }
        if !err.is_temporary() {
            s.complete(Err(err));
            return;
        }
        s.attempts += 1;
        if !s.failed_rails.iter().any(|(l, r)| *l == nic && r == rnic) {
            s.failed_rails.push((nic, rnic.to_string()));
        }
        if Instant::now() >= s.deadline {
            s.complete(Err(Error::new(
                ErrorKind::Timeout,
                format!("RDMA slice missed its deadline; last error: {err}"),
            )
            .with_context("peer", s.peer())));
            return;
        }
        if s.attempts >= self.cfg.max_attempts {
            let attempts = s.attempts;
            s.complete(Err(err.with_context("attempts", attempts)));
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
            Some((l, r)) => self.mailboxes[l].send(Cmd::Post(vec![(s, r)])),
            None => s.complete(Err(err.with_context("paths", "every path failed"))),
        }
    }
}
