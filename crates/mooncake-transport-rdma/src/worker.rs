//! One thread per NIC (`mooncake-rdma-cq-<nic>`): it owns that NIC's active QPs (the
//! endpoint pool), posts slices, polls the CQ, completes slices, and watches the port.
//!
//! The thread spins on the CQ for a few polls after activity, then arms the CQ and sleeps
//! on the completion channel and its eventfd, so an idle engine uses no CPU.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{Error, ErrorKind, Opcode, RemoteSegment, Result};
use sideway::ibverbs::completion::WorkCompletionStatus;

use crate::sys::{EventFd, Nic, Qp, Wr, wait_readable};
use crate::transport::{HANDSHAKE_KEY, Inner, Rail, Slice};
use crate::wire::{self, RemoteKey, Reply, Request};

/// A command for a NIC worker.
pub(crate) enum Cmd {
    /// Post these slices on the given remote NIC.
    Post(Vec<(Slice, String)>),
    /// Drop the endpoints of a peer.
    Forget(String),
    /// Fail everything and exit.
    Shutdown,
}

/// The submitting side of a worker.
pub(crate) struct WorkerHandle {
    tx: Sender<Cmd>,
    efd: Arc<EventFd>,
}

impl WorkerHandle {
    pub fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            self.efd.notify();
        }
    }
}

pub(crate) fn spawn(inner: Arc<Inner>, nic: usize) -> Result<(WorkerHandle, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let efd = Arc::new(EventFd::new()?);
    let w = Worker {
        nic_ref: inner.nics[nic].clone(),
        inner,
        nic,
        rx,
        efd: efd.clone(),
        eps: HashMap::new(),
        inflight: HashMap::new(),
        next_wr: 1,
        dirty: HashSet::new(),
        port_up: true,
    };
    let name = format!("mooncake-rdma-cq-{}", w.nic_ref.name);
    let t = std::thread::Builder::new()
        .name(name)
        .spawn(move || w.run())
        .map_err(|e| Error::io("spawn RDMA worker", &e))?;
    Ok((WorkerHandle { tx, efd }, t))
}

type EpKey = (String, String);

struct Endpoint {
    qp: Qp,
    generation: u64,
    keys: Vec<RemoteKey>,
    outstanding: usize,
    backlog: VecDeque<Slice>,
    last_used: Instant,
    broken: bool,
}

struct Inflight {
    slice: Slice,
    ep: EpKey,
    posted: Instant,
    len: u64,
}

struct Worker {
    inner: Arc<Inner>,
    nic: usize,
    nic_ref: Arc<Nic>,
    rx: Receiver<Cmd>,
    efd: Arc<EventFd>,
    eps: HashMap<EpKey, Endpoint>,
    inflight: HashMap<u64, Inflight>,
    next_wr: u64,
    dirty: HashSet<EpKey>,
    port_up: bool,
}

fn classify(st: WorkCompletionStatus, nic: &str) -> (Error, bool) {
    use WorkCompletionStatus as S;
    match st {
        S::WorkRequestFlushedError => (
            Error::new(
                ErrorKind::PeerUnreachable,
                format!("RDMA work request flushed on {nic} (QP broken)"),
            ),
            false,
        ),
        S::RemoteAccessError | S::RemoteInvalidRequestError => (
            Error::new(
                ErrorKind::RemoteAccess,
                format!("the peer's NIC refused the access ({st:?}) via {nic}"),
            ),
            false,
        ),
        other => (
            Error::new(
                ErrorKind::PeerUnreachable,
                format!("RDMA completion error {other:?} on {nic}"),
            ),
            true,
        ),
    }
}

fn covering(keys: &[RemoteKey], addr: u64, len: u64) -> Option<u32> {
    keys.iter()
        .find(|k| addr >= k.addr && addr - k.addr <= k.len && len <= k.len - (addr - k.addr))
        .map(|k| k.rkey)
}

impl Worker {
    fn run(mut self) {
        let mut spins = 0u32;
        let mut last_tick = Instant::now();
        let mut wcs = Vec::with_capacity(64);
        let fds = [self.nic_ref.channel_fd(), self.efd.fd()];
        loop {
            let mut progressed = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                        self.shutdown();
                        return;
                    }
                    Ok(cmd) => {
                        progressed = true;
                        self.command(cmd);
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.post_dirty();
            progressed |= self.poll(&mut wcs);
            let now = Instant::now();
            if now.duration_since(last_tick) >= Duration::from_millis(20) {
                last_tick = now;
                self.tick(now);
            }
            if progressed {
                spins = 0;
                continue;
            }
            spins += 1;
            if spins < self.inner.cfg.poll_spin {
                std::hint::spin_loop();
                continue;
            }
            if let Err(e) = self.nic_ref.arm_cq() {
                tracing::error!(error = %e, "cannot arm CQ; polling every millisecond");
            }
            if self.poll(&mut wcs) {
                continue;
            }
            let timeout = if self.inflight.is_empty() { 100 } else { 20 };
            wait_readable(&fds, timeout);
            self.nic_ref.drain_channel();
            self.efd.drain();
            spins = 0;
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Post(batch) => {
                for (s, rnic) in batch {
                    self.enqueue(s, rnic);
                }
            }
            Cmd::Forget(peer) => {
                let keys: Vec<EpKey> = self.eps.keys().filter(|k| k.0 == peer).cloned().collect();
                for k in keys {
                    self.break_ep(&k, "peer forgotten", false);
                }
                self.reap();
            }
            Cmd::Shutdown => {}
        }
    }

    fn rail(&self, rnic: &str) -> Rail {
        (self.nic, rnic.to_string())
    }

    fn enqueue(&mut self, mut s: Slice, rnic: String) {
        if s.completer.is_none() {
            return;
        }
        let peer = s.remote.name().to_string();
        let key: EpKey = (peer, rnic.clone());
        let gen_now = s.remote.descriptor().generation;
        if self
            .eps
            .get(&key)
            .is_some_and(|ep| !ep.broken && gen_now > ep.generation)
        {
            self.break_ep(&key, "peer restarted", false);
        }
        if self.eps.get(&key).is_some_and(|e| e.broken) {
            // A broken endpoint is still draining; a fresh one replaces it under a new key slot
            // once it is reaped. Until then, retry elsewhere rather than wait.
            if self.eps.get(&key).is_some_and(|e| e.outstanding == 0) {
                self.eps.remove(&key);
            } else {
                let e = Error::new(
                    ErrorKind::PeerUnreachable,
                    format!("endpoint to {}@{rnic} is draining", key.0),
                );
                self.inner.retry(s, e, self.rail(&rnic));
                return;
            }
        }
        if !self.eps.contains_key(&key) {
            match self.connect(&s.remote, &rnic) {
                Ok(ep) => {
                    self.evict_if_full();
                    self.eps.insert(key.clone(), ep);
                }
                Err(e) => {
                    if let Some(c) = self.inner.cfg.stats.nic(self.nic) {
                        c.failed_slices.fetch_add(1, Ordering::Relaxed);
                    }
                    if e.is_temporary() {
                        self.inner.rail_failed(&self.rail(&rnic));
                    }
                    self.inner.retry(s, e, self.rail(&rnic));
                    return;
                }
            }
        }
        let ep = self.eps.get_mut(&key).expect("endpoint inserted above");
        ep.last_used = Instant::now();
        if s.deadline <= ep.last_used {
            s.complete(Err(Error::new(
                ErrorKind::Timeout,
                "RDMA slice missed its deadline before posting",
            )));
            return;
        }
        ep.backlog.push_back(s);
        self.dirty.insert(key);
    }

    fn evict_if_full(&mut self) {
        if self.eps.len() < self.inner.cfg.max_endpoints {
            return;
        }
        let victim = self
            .eps
            .iter()
            .filter(|(_, e)| e.outstanding == 0 && e.backlog.is_empty())
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            tracing::debug!(peer = %k.0, rnic = %k.1, "evicting idle RDMA endpoint");
            self.eps.remove(&k);
        }
    }

    fn handshake(&self, remote: &RemoteSegment, req: &Request) -> Result<Reply> {
        let addr = remote
            .descriptor()
            .extra
            .get(HANDSHAKE_KEY)
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "segment {:?} publishes no RDMA handshake address",
                        remote.name()
                    ),
                )
            })?;
        let t = self.inner.timeout.min(Duration::from_secs(2));
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| Error::io(&format!("resolve {addr}"), &e))?
            .next()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::PeerUnreachable,
                    format!("{addr} resolves to nothing"),
                )
            })?;
        let mut s = TcpStream::connect_timeout(&sa, t).map_err(|e| {
            Error::io(&format!("RDMA handshake connect to {addr}"), &e)
                .with_context("peer", remote.name())
        })?;
        let _ = s.set_read_timeout(Some(t));
        let _ = s.set_write_timeout(Some(t));
        let _ = s.set_nodelay(true);
        wire::send(&mut s, req)?;
        let r = wire::recv::<Reply>(&mut s).map_err(|e| {
            if e.kind() == ErrorKind::Protocol {
                e
            } else {
                e.with_temporary(true).with_context("peer", remote.name())
            }
        })?;
        match r {
            Reply::Refused { reason } => Err(Error::new(
                ErrorKind::PeerUnreachable,
                format!(
                    "peer {:?} refused the RDMA handshake: {reason}",
                    remote.name()
                ),
            )),
            ok => Ok(ok),
        }
    }

    fn connect(&self, remote: &RemoteSegment, rnic: &str) -> Result<Endpoint> {
        let mut qp = self.nic_ref.create_qp(self.inner.cfg.max_wr)?;
        let req = Request::Connect {
            from: self.inner.local_name.clone(),
            generation: self.inner.generation,
            local_nic: self.nic_ref.name.clone(),
            peer_nic: rnic.to_string(),
            qp: self.inner.qp_info(self.nic, &qp),
        };
        let Reply::Ok {
            generation,
            qp: Some(info),
            keys,
        } = self.handshake(remote, &req)?
        else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "RDMA handshake reply without a QP",
            ));
        };
        qp.connect(&self.nic_ref, &Inner::qp_peer(&info)?, self.inner.timing())?;
        if let Some(c) = self.inner.cfg.stats.nic(self.nic) {
            c.endpoints_created.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(peer = %remote.name(), nic = %self.nic_ref.name, %rnic, qpn = qp.qpn, "RDMA endpoint connected");
        Ok(Endpoint {
            qp,
            generation,
            keys,
            outstanding: 0,
            backlog: VecDeque::new(),
            last_used: Instant::now(),
            broken: false,
        })
    }

    fn post_dirty(&mut self) {
        let dirty: Vec<EpKey> = self.dirty.drain().collect();
        for key in dirty {
            self.post_ep(&key);
        }
    }

    fn post_ep(&mut self, key: &EpKey) {
        let max = self.inner.cfg.max_wr as usize;
        let mut wrs = Vec::new();
        let mut refreshed = false;
        loop {
            let Some(ep) = self.eps.get_mut(key) else {
                return;
            };
            if ep.broken || ep.outstanding + wrs.len() >= max {
                break;
            }
            let Some(mut s) = ep.backlog.pop_front() else {
                break;
            };
            if s.completer.is_none() {
                continue;
            }
            let len = s.local.len();
            let mut rkey = covering(&ep.keys, s.remote_addr, len);
            if rkey.is_none() && !refreshed {
                refreshed = true;
                let remote = s.remote.clone();
                let req = Request::Keys {
                    from: self.inner.local_name.clone(),
                    peer_nic: key.1.clone(),
                };
                match self.handshake(&remote, &req) {
                    Ok(Reply::Ok { keys, .. }) => {
                        if let Some(ep) = self.eps.get_mut(key) {
                            ep.keys = keys;
                            rkey = covering(&ep.keys, s.remote_addr, len);
                        }
                    }
                    Ok(Reply::Refused { .. }) => {}
                    Err(e) => tracing::debug!(error = %e, "rkey refresh failed"),
                }
            }
            let Some(rkey) = rkey else {
                s.complete(Err(Error::new(
                    ErrorKind::RemoteAccess,
                    format!(
                        "{:#x}+{len} is not inside memory {:?} lets us access",
                        s.remote_addr,
                        s.remote.name()
                    ),
                )
                .with_context("peer", s.remote.name())));
                continue;
            };
            let Some(lkey) = self.inner.lkey(&s.local, self.nic) else {
                s.complete(Err(Error::new(
                    ErrorKind::NotRegistered,
                    "local region has no RDMA registration",
                )));
                continue;
            };
            let wr_id = self.next_wr;
            self.next_wr += 1;
            wrs.push(Wr {
                wr_id,
                write: s.op == Opcode::Write,
                lkey,
                laddr: s.local.addr(),
                len: len as u32,
                rkey,
                raddr: s.remote_addr,
            });
            self.inflight.insert(
                wr_id,
                Inflight {
                    slice: s,
                    ep: key.clone(),
                    posted: Instant::now(),
                    len,
                },
            );
        }
        if wrs.is_empty() {
            return;
        }
        let Some(ep) = self.eps.get_mut(key) else {
            return;
        };
        match ep.qp.post(&wrs) {
            Ok(()) => {
                ep.outstanding += wrs.len();
                tracing::trace!(peer = %key.0, rnic = %key.1, n = wrs.len(), outstanding = ep.outstanding, "posted");
            }
            Err(e) => {
                let rail = self.rail(&key.1);
                for w in &wrs {
                    if let Some(inf) = self.inflight.remove(&w.wr_id) {
                        self.inner.retry(inf.slice, e.clone(), rail.clone());
                    }
                }
                self.inner.rail_failed(&rail);
                self.break_ep(key, "post failed", false);
            }
        }
    }

    fn poll(&mut self, wcs: &mut Vec<(u64, WorkCompletionStatus)>) -> bool {
        let mut any = false;
        loop {
            wcs.clear();
            if let Err(e) = self.nic_ref.poll(wcs) {
                tracing::error!(error = %e, "CQ poll failed");
                return any;
            }
            if wcs.is_empty() {
                return any;
            }
            any = true;
            let batch = std::mem::take(wcs);
            for &(wr_id, st) in &batch {
                self.completion(wr_id, st);
            }
            *wcs = batch;
            self.reap();
            self.post_dirty();
        }
    }

    fn completion(&mut self, wr_id: u64, st: WorkCompletionStatus) {
        let Some(mut inf) = self.inflight.remove(&wr_id) else {
            return;
        };
        let rail = self.rail(&inf.ep.1);
        if let Some(ep) = self.eps.get_mut(&inf.ep) {
            ep.outstanding = ep.outstanding.saturating_sub(1);
            if !ep.backlog.is_empty() {
                self.dirty.insert(inf.ep.clone());
            }
        }
        let stats = self.inner.cfg.stats.nic(self.nic);
        if st == WorkCompletionStatus::Success {
            if let Some(c) = stats {
                c.bytes.fetch_add(inf.len, Ordering::Relaxed);
                c.slices.fetch_add(1, Ordering::Relaxed);
            }
            inf.slice.complete(Ok(()));
            self.inner.rail_ok(&rail);
            return;
        }
        if let Some(c) = stats {
            c.failed_slices.fetch_add(1, Ordering::Relaxed);
        }
        let (err, pause) = classify(st, &self.nic_ref.name);
        tracing::debug!(error = %err, peer = %inf.ep.0, "RDMA slice failed");
        if pause {
            self.inner.rail_failed(&rail);
        }
        self.break_ep(&inf.ep.clone(), "completion error", false);
        self.inner.retry(
            inf.slice,
            err.with_context("peer", &inf.ep.0)
                .with_context("nic", &self.nic_ref.name),
            rail,
        );
    }

    /// Marks an endpoint broken: its QP goes to ERROR (flushing posted WRs, which come back
    /// as flush completions and are retried) and its backlog is retried elsewhere now.
    fn break_ep(&mut self, key: &EpKey, why: &str, pause: bool) {
        let rail = self.rail(&key.1);
        let Some(ep) = self.eps.get_mut(key) else {
            return;
        };
        let backlog: Vec<Slice> = ep.backlog.drain(..).collect();
        if !ep.broken {
            ep.broken = true;
            tracing::debug!(peer = %key.0, nic = %self.nic_ref.name, rnic = %key.1, why, "breaking RDMA endpoint");
            ep.qp.set_error();
        }
        if pause {
            self.inner.rail_failed(&rail);
        }
        for s in backlog {
            let e = Error::new(
                ErrorKind::PeerUnreachable,
                format!("RDMA endpoint broken: {why}"),
            );
            self.inner.retry(s, e, rail.clone());
        }
    }

    fn reap(&mut self) {
        self.eps.retain(|_, e| !(e.broken && e.outstanding == 0));
    }

    fn tick(&mut self, now: Instant) {
        let up = self.nic_ref.port_active();
        if up != self.port_up {
            self.port_up = up;
            self.inner.nic_down[self.nic].store(!up, Ordering::Release);
            if up {
                tracing::warn!(nic = %self.nic_ref.name, "RDMA port is active again; probing its rails");
                self.inner.nic_up(self.nic);
            } else {
                tracing::warn!(nic = %self.nic_ref.name, "RDMA port went down; failing over its slices");
                let keys: Vec<EpKey> = self.eps.keys().cloned().collect();
                for k in keys {
                    self.break_ep(&k, "port down", true);
                }
            }
        }
        let st = self.inner.slice_timeout;
        let mut stuck: HashSet<EpKey> = HashSet::new();
        for inf in self.inflight.values_mut() {
            if now.duration_since(inf.posted) >= st {
                stuck.insert(inf.ep.clone());
            }
            if now >= inf.slice.deadline {
                // The WR may still be in the NIC: keep the lease until it completes or is
                // flushed, but the caller gets its answer now.
                inf.slice.complete(Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "RDMA slice to {:?} did not complete before the deadline",
                        inf.ep.0
                    ),
                )));
                stuck.insert(inf.ep.clone());
            }
        }
        for k in stuck {
            if self.eps.get(&k).is_some_and(|e| !e.broken) {
                tracing::warn!(peer = %k.0, nic = %self.nic_ref.name, rnic = %k.1, "RDMA slice timed out; breaking the endpoint");
                self.break_ep(&k, "slice timeout", true);
            }
        }
        self.reap();
    }

    fn shutdown(&mut self) {
        let keys: Vec<EpKey> = self.eps.keys().cloned().collect();
        for k in keys {
            if let Some(ep) = self.eps.get_mut(&k) {
                ep.qp.set_error();
                for mut s in ep.backlog.drain(..) {
                    s.complete(Err(Error::new(
                        ErrorKind::Closed,
                        "RDMA transport is shut down",
                    )));
                }
            }
        }
        // Give the NIC a moment to flush posted WRs so their memory is no longer in use.
        let end = Instant::now() + Duration::from_millis(500);
        let mut wcs = Vec::new();
        while !self.inflight.is_empty() && Instant::now() < end {
            wcs.clear();
            if self.nic_ref.poll(&mut wcs).is_err() {
                break;
            }
            for (id, _) in wcs.drain(..) {
                if let Some(mut inf) = self.inflight.remove(&id) {
                    inf.slice.complete(Err(Error::new(
                        ErrorKind::Closed,
                        "RDMA transport is shut down",
                    )));
                }
            }
            std::thread::yield_now();
        }
        for (_, mut inf) in self.inflight.drain() {
            inf.slice.complete(Err(Error::new(
                ErrorKind::Closed,
                "RDMA transport is shut down",
            )));
        }
        self.eps.clear();
    }
}
