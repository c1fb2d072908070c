//! One thread per NIC (`mooncake-rdma-cq-<nic>`): it owns that NIC's active QPs (the
//! endpoint pool), posts slices, polls the CQ, completes slices, and watches the port.
//!
//! The thread never waits on the network: handshakes run on the handshake reactor
//! ([`crate::handshake`]) and come back as [`Cmd::Handshake`]. It spins on the CQ for a few
//! polls after activity, then arms the CQ and sleeps on the completion channel and its
//! eventfd, so an idle engine uses no CPU.
//!
//! # Endpoints
//! An endpoint is the QP to one (peer, remote NIC). It is created by the first slice that
//! needs it and connected once (slices wait in its backlog meanwhile); when the handshake
//! fails, its slices fail over like any failed slice. A QP that breaks leaves the endpoint
//! for a *draining* list until the NIC flushed every WR posted on it, so a slice is never
//! retried while its WR may still run.
//!
//! # Failures stay local
//! A completion error that is the slice's own fault (the peer's NIC refused its range, its
//! local region is gone) fails that slice only: the QP it broke is replaced and the other
//! slices on it are queued again on the same rail, without counting an attempt. A failure of
//! the path (retries exceeded, a flushed QP nobody broke, a slice that hangs) pauses the rail
//! and sends the QP's slices to other rails.
//!
//! # Bounds
//! At most `max_wr` WRs per QP and at most `cqe` WRs per NIC (the CQ's depth) are
//! outstanding, counted from post to polled completion, so the CQ never overruns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::{Error, ErrorKind, Opcode, Region, RemoteSegment, Result};

use crate::handshake::{self, Job};
use crate::shared::{Cmd, Mailbox, Shared};
use crate::slice::Slice;
use crate::sys::{EventFd, Nic, PostBuf, Qp, Wc, WcStatus, Wr, wait_readable};
use crate::wire::{self, HANDSHAKE_KEY, RemoteKey, Reply, Request};

/// Starts the worker of NIC `nic`; the thread returns the slices it still held when it shut
/// down (after destroying its QPs), for the caller to fail once the MRs are gone too.
pub(crate) fn spawn(
    sh: Arc<Shared>,
    nic: usize,
    rx: Receiver<Cmd>,
    efd: Arc<EventFd>,
    hs: handshake::Client,
) -> Result<JoinHandle<Vec<Slice>>> {
    let nic_ref = sh.nics[nic].clone();
    let name = format!("mooncake-rdma-cq-{}", nic_ref.name);
    let w = Worker {
        cq_depth: sh.cfg.cqe as usize,
        me: sh.mailboxes[nic].clone(),
        sh,
        nic,
        nic_ref,
        rx,
        efd,
        hs,
        eps: HashMap::new(),
        draining: HashMap::new(),
        inflight: HashMap::new(),
        latest: HashMap::new(),
        next_wr: 1,
        next_id: 1,
        dirty: VecDeque::new(),
        dirty_set: HashSet::new(),
        cq_outstanding: 0,
        port_up: true,
        wrs: Vec::new(),
        post_buf: PostBuf::default(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || w.run())
        .map_err(|e| Error::io("spawn RDMA worker", &e))
}

/// (peer segment, remote NIC).
type EpKey = (String, String);

struct Endpoint {
    /// Changes with every connect, so late handshake results are recognised as stale.
    id: u64,
    /// The peer's generation (from the descriptor, then from the handshake reply).
    generation: u64,
    state: EpState,
    backlog: VecDeque<Slice>,
    /// Slices whose remote range no cached key covers, waiting for a keys refresh.
    parked: Vec<Slice>,
    last_used: Instant,
    /// Sequence number of the last keys request sent (the connect is 1).
    keys_sent: u64,
    /// Sequence number of the keys list in hand.
    keys_done: u64,
    keys_inflight: bool,
}

enum EpState {
    Connecting {
        qp: Qp,
        deadline: Instant,
    },
    Ready {
        qp: Qp,
        qp_id: u64,
        outstanding: usize,
        /// When the QP last made progress: a completion, or a post to an idle QP. A QP with
        /// WRs outstanding and no progress for the slice timeout is stuck.
        progress: Instant,
        /// Sorted by address; regions do not overlap.
        keys: Vec<RemoteKey>,
        remote_qpn: u32,
        token: String,
    },
}

/// Why a QP was taken out of service: decides what happens to the slices flushed from it.
#[derive(Clone)]
enum Fault {
    /// Not the path's fault (one slice's error, a restarted or forgotten peer, an evicted
    /// QP): the other slices go back to the same rail, without counting an attempt.
    Neutral,
    /// The path failed: the other slices fail over with this error.
    Path(Error),
}

/// A broken QP whose posted WRs have not all come back yet.
struct Draining {
    _qp: Qp,
    outstanding: usize,
    fault: Fault,
    since: Instant,
    warned: bool,
}

struct Inflight {
    /// `None` once released early (its region was unregistered and its MRs are gone).
    slice: Option<Slice>,
    key: EpKey,
    qp_id: u64,
    len: u64,
    rkey: u32,
}

enum Lookup {
    Post(u32),
    Refuse(Error),
    Park,
}

struct Worker {
    sh: Arc<Shared>,
    nic: usize,
    nic_ref: Arc<Nic>,
    rx: Receiver<Cmd>,
    efd: Arc<EventFd>,
    me: Mailbox,
    hs: handshake::Client,
    eps: HashMap<EpKey, Endpoint>,
    draining: HashMap<u64, Draining>,
    inflight: HashMap<u64, Inflight>,
    /// The newest descriptor seen per peer (new endpoints connect to its address).
    latest: HashMap<String, Arc<RemoteSegment>>,
    next_wr: u64,
    next_id: u64,
    dirty: VecDeque<EpKey>,
    dirty_set: HashSet<EpKey>,
    cq_outstanding: usize,
    cq_depth: usize,
    port_up: bool,
    wrs: Vec<Wr>,
    post_buf: PostBuf,
}

fn classify(st: WcStatus, nic: &str, vendor_err: u32) -> (Error, Fault) {
    use WcStatus as S;
    let slice_fault = |kind, msg: String| (Error::new(kind, msg), Fault::Neutral);
    match st {
        S::RemoteAccess | S::RemoteInvalidRequest | S::RemoteInvalidRdRequest => slice_fault(
            ErrorKind::RemoteAccess,
            format!("the peer's NIC refused the access ({st:?}) via {nic}"),
        ),
        S::LocalProtection | S::LocalAccess => slice_fault(
            ErrorKind::NotRegistered,
            format!("{nic} refused the local range ({st:?}): its region is no longer registered"),
        ),
        S::LocalLength | S::MemoryWindowBind => slice_fault(
            ErrorKind::Io,
            format!("RDMA completion error {st:?} on {nic}"),
        ),
        other => {
            let e = Error::new(
                ErrorKind::PeerUnreachable,
                format!("RDMA completion error {other:?} (vendor {vendor_err:#x}) on {nic}"),
            );
            (e.clone(), Fault::Path(e))
        }
    }
}

fn lookup(keys: &[RemoteKey], s: &Slice, keys_done: u64) -> Lookup {
    let len = s.len();
    let i = keys.partition_point(|k| k.addr <= s.remote_addr);
    let found = i
        .checked_sub(1)
        .map(|j| &keys[j])
        .filter(|k| k.covers(s.remote_addr, len));
    match found {
        Some(k) if s.op == Opcode::Write && !k.writable => Lookup::Refuse(
            Error::new(
                ErrorKind::RemoteAccess,
                format!(
                    "{:#x}+{len} is in a region {:?} registered read-only",
                    s.remote_addr,
                    s.peer()
                ),
            )
            .with_context("peer", s.peer()),
        ),
        Some(k) if s.refused_rkey == Some(k.rkey) => Lookup::Refuse(
            Error::new(
                ErrorKind::RemoteAccess,
                format!(
                    "the NIC of {:?} refused {:#x}+{len} with its current key",
                    s.peer(),
                    s.remote_addr
                ),
            )
            .with_context("peer", s.peer()),
        ),
        Some(k) => Lookup::Post(k.rkey),
        None if keys_done > s.keys_stamp => Lookup::Refuse(
            Error::new(
                ErrorKind::RemoteAccess,
                format!(
                    "{:#x}+{len} is not inside memory {:?} lets us access",
                    s.remote_addr,
                    s.peer()
                ),
            )
            .with_context("peer", s.peer()),
        ),
        None => Lookup::Park,
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "RDMA transport is shut down")
}

impl Worker {
    fn run(mut self) -> Vec<Slice> {
        let mut spins = 0u32;
        let mut last_tick = Instant::now();
        let mut wcs = Vec::with_capacity(64);
        let fds = [self.nic_ref.channel_fd(), self.efd.fd()];
        loop {
            let mut progressed = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                        return self.shutdown();
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
            if spins < self.sh.cfg.poll_spin {
                std::hint::spin_loop();
                continue;
            }
            if let Err(e) = self.nic_ref.arm_cq() {
                tracing::error!(error = %e, "cannot arm CQ; polling every millisecond");
            }
            if self.poll(&mut wcs) {
                continue;
            }
            let timeout = if self.inflight.is_empty() && self.eps.is_empty() {
                100
            } else {
                20
            };
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
            Cmd::Forget { peer, generation } => self.forget(&peer, generation),
            Cmd::Unregister { region } => self.unregister(&region),
            Cmd::Handshake { ep, seq, result } => {
                if seq == 0 {
                    self.connected(ep, result);
                } else {
                    self.keys_arrived(ep, seq, result);
                }
            }
            Cmd::Shutdown => {}
        }
    }

    fn mark_dirty(&mut self, key: &EpKey) {
        if !self.dirty_set.contains(key) {
            self.dirty_set.insert(key.clone());
            self.dirty.push_back(key.clone());
        }
    }

    fn count_failed(&self) {
        if let Some(c) = self.sh.cfg.stats.nic(self.nic) {
            c.failed_slices.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a slice on the endpoint (peer, `rnic`), creating and connecting it if needed.
    fn enqueue(&mut self, mut s: Slice, rnic: String) {
        if s.is_done() {
            return;
        }
        // A slice whose local region was unregistered (its MRs are gone) fails here, so no
        // lease of it waits in a queue.
        if self.sh.mrs.lkey(s.local.region(), self.nic).is_none() {
            s.complete(Err(Error::new(
                ErrorKind::NotRegistered,
                "the local region was unregistered while the transfer was queued",
            )));
            return;
        }
        let now = Instant::now();
        if now >= s.deadline {
            s.complete(Err(Error::new(
                ErrorKind::Timeout,
                "RDMA slice missed its deadline before posting",
            )
            .with_context("peer", s.peer())));
            return;
        }
        let peer = s.peer().to_string();
        let gen_now = s.remote.descriptor().generation;
        let newer = self
            .latest
            .get(&peer)
            .is_none_or(|d| d.descriptor().generation < gen_now);
        if newer {
            self.latest.insert(peer.clone(), s.remote.clone());
        }
        let key: EpKey = (peer, rnic);
        if self.eps.get(&key).is_some_and(|ep| gen_now > ep.generation) {
            tracing::debug!(peer = %key.0, rnic = %key.1, "peer restarted; replacing its endpoint");
            self.retire(&key, Fault::Neutral);
        }
        if !self.eps.contains_key(&key)
            && let Err(e) = self.open(&key)
        {
            self.count_failed();
            if e.is_temporary() {
                self.sh.rail_failed(self.nic, &key.0, &key.1);
            }
            self.sh.retry(s, e, self.nic, &key.1);
            return;
        }
        let ep = self.eps.get_mut(&key).expect("endpoint exists");
        ep.last_used = now;
        s.keys_stamp = ep.keys_sent;
        ep.backlog.push_back(s);
        if matches!(ep.state, EpState::Ready { .. }) {
            self.mark_dirty(&key);
        }
    }

    /// Queues a slice again on the same rail after its QP was replaced through no fault of
    /// its path: that counts as progress, so its deadline starts over.
    fn requeue(&mut self, mut s: Slice, rnic: String) {
        s.deadline = s.deadline.max(Instant::now() + self.sh.timeout);
        self.enqueue(s, rnic);
    }

    /// Creates the endpoint's QP and starts its handshake.
    fn open(&mut self, key: &EpKey) -> Result<()> {
        // The newest descriptor of the peer: a restarted peer is reached at its new address.
        let remote = self
            .latest
            .get(&key.0)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::SegmentNotFound, "no descriptor for peer"))?;
        let generation = remote.descriptor().generation;
        let addr = handshake_addr(&remote)?;
        self.evict_if_full();
        let qp = self.nic_ref.create_qp(self.sh.cfg.max_wr)?;
        let id = self.next_id;
        self.next_id += 1;
        let request = Request::Connect {
            version: wire::VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: self.sh.local_name.clone(),
            generation: self.sh.generation,
            to: key.0.clone(),
            local_nic: self.nic_ref.name.clone(),
            peer_nic: key.1.clone(),
            qp: self.sh.qp_info(self.nic, &qp),
        };
        let deadline = Instant::now() + self.sh.handshake_timeout;
        self.handshake(addr, request, deadline, id, 0);
        self.eps.insert(
            key.clone(),
            Endpoint {
                id,
                generation,
                state: EpState::Connecting { qp, deadline },
                backlog: VecDeque::new(),
                parked: Vec::new(),
                last_used: Instant::now(),
                keys_sent: 1,
                keys_done: 0,
                keys_inflight: false,
            },
        );
        Ok(())
    }

    fn handshake(&self, addr: String, request: Request, deadline: Instant, ep: u64, seq: u64) {
        let me = self.me.clone();
        self.hs.submit(Job {
            addr,
            request,
            deadline,
            done: Box::new(move |result| me.send(Cmd::Handshake { ep, seq, result })),
        });
    }

    fn find(&self, id: u64) -> Option<EpKey> {
        self.eps
            .iter()
            .find(|(_, e)| e.id == id)
            .map(|(k, _)| k.clone())
    }

    /// The connect handshake of endpoint `id` finished.
    fn connected(&mut self, id: u64, result: Result<Reply>) {
        let Some(key) = self.find(id) else {
            return; // retired meanwhile; its QP is gone
        };
        if !matches!(self.eps[&key].state, EpState::Connecting { .. }) {
            return;
        }
        let mut ep = self.eps.remove(&key).expect("found above");
        let EpState::Connecting { mut qp, .. } = ep.state else {
            unreachable!("checked above")
        };
        let outcome = match result {
            Ok(Reply::Ok {
                generation,
                qp: Some(info),
                token: Some(token),
                mut keys,
                ..
            }) => Shared::qp_peer(&info).and_then(|peer| {
                qp.connect(&self.nic_ref, &peer, self.sh.timing())?;
                keys.sort_by_key(|k| k.addr);
                Ok((generation, info.qpn, token, keys))
            }),
            Ok(Reply::Ok { .. }) => Err(Error::new(
                ErrorKind::Protocol,
                "RDMA handshake reply without a QP or token",
            )),
            Ok(Reply::Refused { reason, denied, .. }) => Err(Error::new(
                ErrorKind::PeerUnreachable,
                format!("peer {:?} refused the RDMA handshake: {reason}", key.0),
            )
            // Without the cluster secret no path to the peer will do better.
            .with_temporary(!denied)),
            Err(e) => Err(e),
        };
        match outcome {
            Ok((generation, remote_qpn, token, keys)) => {
                let qp_id = self.next_id;
                self.next_id += 1;
                ep.state = EpState::Ready {
                    qp,
                    qp_id,
                    outstanding: 0,
                    progress: Instant::now(),
                    keys,
                    remote_qpn,
                    token,
                };
                ep.generation = ep.generation.max(generation);
                ep.keys_done = 1;
                self.eps.insert(key.clone(), ep);
                if let Some(c) = self.sh.cfg.stats.nic(self.nic) {
                    c.endpoints_created.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(peer = %key.0, nic = %self.nic_ref.name, rnic = %key.1, "RDMA endpoint connected");
                self.mark_dirty(&key);
            }
            Err(e) => {
                drop(qp);
                self.fail_endpoint(&key, ep.backlog.into_iter().chain(ep.parked), e);
            }
        }
    }

    fn connect_failed(&mut self, key: &EpKey, e: Error) {
        if let Some(ep) = self.eps.remove(key) {
            self.fail_endpoint(key, ep.backlog.into_iter().chain(ep.parked), e);
        }
    }

    /// An endpoint could not be connected: its slices fail over.
    fn fail_endpoint(&mut self, key: &EpKey, slices: impl Iterator<Item = Slice>, e: Error) {
        tracing::debug!(peer = %key.0, rnic = %key.1, error = %e, "RDMA connect failed");
        if e.is_temporary() {
            self.sh.rail_failed(self.nic, &key.0, &key.1);
        }
        for s in slices {
            self.count_failed();
            self.sh
                .retry(s, e.clone().with_context("peer", &key.0), self.nic, &key.1);
        }
    }

    /// Asks the peer for its keys again (regions registered after we connected).
    fn request_keys(&mut self, key: &EpKey) {
        let Some(ep) = self.eps.get_mut(key) else {
            return;
        };
        let EpState::Ready {
            remote_qpn, token, ..
        } = &ep.state
        else {
            return;
        };
        let Some(addr) = self.latest.get(&key.0).and_then(|d| handshake_addr(d).ok()) else {
            return;
        };
        ep.keys_sent += 1;
        ep.keys_inflight = true;
        let request = Request::Keys {
            version: wire::VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: self.sh.local_name.clone(),
            generation: self.sh.generation,
            to: key.0.clone(),
            peer_nic: key.1.clone(),
            qpn: *remote_qpn,
            token: token.clone(),
        };
        let (id, seq) = (ep.id, ep.keys_sent);
        let deadline = Instant::now() + self.sh.handshake_timeout;
        self.handshake(addr, request, deadline, id, seq);
    }

    fn keys_arrived(&mut self, id: u64, seq: u64, result: Result<Reply>) {
        let Some(key) = self.find(id) else {
            return;
        };
        let ep = self.eps.get_mut(&key).expect("found above");
        let EpState::Ready { keys, .. } = &mut ep.state else {
            return;
        };
        ep.keys_inflight = false;
        match result {
            Ok(Reply::Ok {
                keys: mut fresh, ..
            }) => {
                fresh.sort_by_key(|k| k.addr);
                *keys = fresh;
                ep.keys_done = ep.keys_done.max(seq);
            }
            Ok(Reply::Refused { reason, .. }) => {
                // The peer no longer knows our QP (it evicted it, or restarted): replace it.
                tracing::debug!(peer = %key.0, %reason, "keys refused; reconnecting");
                self.retire(&key, Fault::Neutral);
                return;
            }
            Err(e) => {
                let parked = std::mem::take(&mut ep.parked);
                for s in parked {
                    self.sh.retry(s, e.clone(), self.nic, &key.1);
                }
                return;
            }
        }
        let parked = std::mem::take(&mut ep.parked);
        let EpState::Ready { keys, .. } = &ep.state else {
            unreachable!("checked above")
        };
        let mut ready = Vec::new();
        for mut s in parked {
            match lookup(keys, &s, ep.keys_done) {
                Lookup::Post(_) => ready.push(s),
                Lookup::Refuse(e) => s.complete(Err(e)),
                Lookup::Park => ep.parked.push(s),
            }
        }
        for s in ready.into_iter().rev() {
            ep.backlog.push_front(s);
        }
        let again = !ep.parked.is_empty();
        if !ep.backlog.is_empty() {
            self.mark_dirty(&key);
        }
        if again {
            self.request_keys(&key);
        }
    }

    fn evict_if_full(&mut self) {
        if self.eps.len() < self.sh.cfg.max_endpoints {
            return;
        }
        let victim = self
            .eps
            .iter()
            .filter(|(_, e)| {
                matches!(e.state, EpState::Ready { outstanding: 0, .. })
                    && e.backlog.is_empty()
                    && e.parked.is_empty()
                    && !e.keys_inflight
            })
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            tracing::debug!(peer = %k.0, rnic = %k.1, "evicting idle RDMA endpoint");
            self.retire(&k, Fault::Neutral);
        }
    }

    fn post_dirty(&mut self) {
        let n = self.dirty.len();
        for _ in 0..n {
            if self.cq_outstanding >= self.cq_depth {
                return;
            }
            let Some(key) = self.dirty.pop_front() else {
                return;
            };
            self.dirty_set.remove(&key);
            self.post_ep(&key);
        }
    }

    fn post_ep(&mut self, key: &EpKey) {
        let max = self.sh.cfg.max_wr as usize;
        let cq_room = self.cq_depth.saturating_sub(self.cq_outstanding);
        let now = Instant::now();
        let mut wrs = std::mem::take(&mut self.wrs);
        wrs.clear();
        let mut need_keys = false;
        let Some(ep) = self.eps.get_mut(key) else {
            return;
        };
        let EpState::Ready {
            qp_id,
            outstanding,
            keys,
            ..
        } = &mut ep.state
        else {
            return;
        };
        let qp_id = *qp_id;
        while *outstanding + wrs.len() < max && wrs.len() < cq_room {
            let Some(mut s) = ep.backlog.pop_front() else {
                break;
            };
            if s.is_done() {
                continue;
            }
            // A task addressed to an earlier incarnation of the peer: its memory is gone.
            let sgen = s.remote.descriptor().generation;
            if sgen != 0 && sgen < ep.generation {
                let e = Error::new(
                    ErrorKind::PeerUnreachable,
                    format!(
                        "{:?} restarted (generation {}, the request was for {sgen})",
                        s.peer(),
                        ep.generation
                    ),
                )
                .with_temporary(false)
                .with_context("peer", s.peer());
                s.complete(Err(e));
                continue;
            }
            let rkey = match lookup(keys, &s, ep.keys_done) {
                Lookup::Post(rkey) => rkey,
                Lookup::Refuse(e) => {
                    s.complete(Err(e));
                    continue;
                }
                Lookup::Park => {
                    need_keys = true;
                    ep.parked.push(s);
                    continue;
                }
            };
            let Some(lkey) = self.sh.mrs.lkey(s.local.region(), self.nic) else {
                s.complete(Err(Error::new(
                    ErrorKind::NotRegistered,
                    "the local region was unregistered while the transfer was queued",
                )));
                continue;
            };
            let wr_id = self.next_wr;
            self.next_wr += 1;
            let len = s.len();
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
                    slice: Some(s),
                    key: key.clone(),
                    qp_id,
                    len,
                    rkey,
                },
            );
        }
        let more = !ep.backlog.is_empty() && *outstanding + wrs.len() < max;
        let refresh = need_keys && !ep.keys_inflight;
        let result = if wrs.is_empty() {
            Ok(())
        } else {
            let EpState::Ready {
                qp,
                outstanding,
                progress,
                ..
            } = &mut ep.state
            else {
                unreachable!("matched above")
            };
            if *outstanding == 0 {
                *progress = now;
            }
            let r = qp.post(&wrs, &mut self.post_buf);
            let posted = match &r {
                Ok(()) => wrs.len(),
                Err(e) => e.posted,
            };
            *outstanding += posted;
            self.cq_outstanding += posted;
            r
        };
        if refresh {
            self.request_keys(key);
        }
        if let Err(pe) = result {
            // The first `posted` WRs are on the QP and come back (flushed) once it is broken;
            // only the others are retried now, so no WR ever runs twice at once.
            let rail = key.1.clone();
            for w in &wrs[pe.posted..] {
                if let Some(inf) = self.inflight.remove(&w.wr_id)
                    && let Some(s) = inf.slice
                {
                    self.count_failed();
                    self.sh.retry(s, pe.error.clone(), self.nic, &rail);
                }
            }
            self.sh.rail_failed(self.nic, &key.0, &key.1);
            self.retire(key, Fault::Path(pe.error));
        } else if more {
            // Stopped by the CQ's room, not the QP's: try again after completions.
            self.mark_dirty(key);
        }
        self.wrs = wrs;
    }

    fn poll(&mut self, wcs: &mut Vec<Wc>) -> bool {
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
            for wc in &batch {
                self.completion(*wc);
            }
            *wcs = batch;
            self.post_dirty();
        }
    }

    fn completion(&mut self, wc: Wc) {
        self.cq_outstanding = self.cq_outstanding.saturating_sub(1);
        let Some(inf) = self.inflight.remove(&wc.wr_id) else {
            return;
        };
        let (peer, rnic) = &inf.key;
        // Which QP it came from: the endpoint's current one, or a draining one.
        let mut current = false;
        if let Some(ep) = self.eps.get_mut(&inf.key)
            && let EpState::Ready {
                qp_id,
                outstanding,
                progress,
                ..
            } = &mut ep.state
            && *qp_id == inf.qp_id
        {
            *outstanding = outstanding.saturating_sub(1);
            *progress = Instant::now();
            current = true;
            if !ep.backlog.is_empty() {
                let k = inf.key.clone();
                self.mark_dirty(&k);
            }
        }
        let mut drained_fault = None;
        if !current && let Some(d) = self.draining.get_mut(&inf.qp_id) {
            d.outstanding = d.outstanding.saturating_sub(1);
            drained_fault = Some(d.fault.clone());
            if d.outstanding == 0 {
                self.draining.remove(&inf.qp_id);
            }
        }
        let Some(mut s) = inf.slice else {
            return; // released when its region was unregistered
        };
        let stats = self.sh.cfg.stats.nic(self.nic);
        match wc.status {
            WcStatus::Success => {
                if let Some(c) = stats {
                    c.bytes.fetch_add(inf.len, Ordering::Relaxed);
                    c.slices.fetch_add(1, Ordering::Relaxed);
                }
                s.complete(Ok(()));
                self.sh.rail_ok(self.nic, peer, rnic);
            }
            WcStatus::WrFlush => {
                // Innocent: flushed because its QP broke.
                let fault = if current {
                    // Nobody broke it: the QP failed on its own.
                    let e = Error::new(
                        ErrorKind::PeerUnreachable,
                        format!("RDMA QP on {} was flushed", self.nic_ref.name),
                    );
                    self.sh.rail_failed(self.nic, peer, rnic);
                    let key = inf.key.clone();
                    self.retire(&key, Fault::Path(e.clone()));
                    Fault::Path(e)
                } else {
                    drained_fault.unwrap_or(Fault::Neutral)
                };
                match fault {
                    Fault::Neutral => {
                        let rnic = rnic.clone();
                        self.requeue(s, rnic);
                    }
                    Fault::Path(e) => {
                        self.count_failed();
                        self.sh
                            .retry(s, e.with_context("peer", peer), self.nic, rnic);
                    }
                }
            }
            st => {
                self.count_failed();
                let (err, fault) = classify(st, &self.nic_ref.name, wc.vendor_err);
                let err = err
                    .with_context("peer", peer)
                    .with_context("nic", &self.nic_ref.name);
                tracing::debug!(error = %err, "RDMA slice failed");
                let key = inf.key.clone();
                if current {
                    if matches!(fault, Fault::Path(_)) {
                        self.sh.rail_failed(self.nic, &key.0, &key.1);
                    }
                    self.retire(&key, fault.clone());
                }
                let remote_refused = matches!(
                    st,
                    WcStatus::RemoteAccess
                        | WcStatus::RemoteInvalidRequest
                        | WcStatus::RemoteInvalidRdRequest
                );
                match fault {
                    // The peer's NIC refused the key we used. Our copy of its keys may be
                    // stale (the range was registered again, with a new key): the slice goes
                    // back once, to a fresh QP whose handshake brings fresh keys, and fails
                    // for good if they still name the refused key or none.
                    Fault::Neutral if remote_refused && current && s.refused_rkey.is_none() => {
                        s.refused_rkey = Some(inf.rkey);
                        self.requeue(s, key.1.clone());
                    }
                    // Otherwise the slice's own fault: it alone fails.
                    Fault::Neutral => s.complete(Err(err)),
                    Fault::Path(_) => self.sh.retry(s, err, self.nic, &key.1),
                }
            }
        }
    }

    /// Takes an endpoint out of service: its QP goes to ERROR (posted WRs come back flushed
    /// and are handled per `fault`), and its queued slices go back to the same rail
    /// (`Neutral`, on a new endpoint) or fail over (`Path`).
    fn retire(&mut self, key: &EpKey, fault: Fault) {
        let Some(ep) = self.eps.remove(key) else {
            return;
        };
        match ep.state {
            EpState::Connecting { qp, .. } => drop(qp),
            EpState::Ready {
                mut qp,
                qp_id,
                outstanding,
                ..
            } => {
                tracing::debug!(peer = %key.0, nic = %self.nic_ref.name, rnic = %key.1, outstanding, "retiring RDMA endpoint");
                qp.set_error();
                if outstanding > 0 {
                    self.draining.insert(
                        qp_id,
                        Draining {
                            _qp: qp,
                            outstanding,
                            fault: fault.clone(),
                            since: Instant::now(),
                            warned: false,
                        },
                    );
                }
            }
        }
        let queued: Vec<Slice> = ep.backlog.into_iter().chain(ep.parked).collect();
        match fault {
            Fault::Neutral => {
                for s in queued {
                    self.requeue(s, key.1.clone());
                }
            }
            Fault::Path(e) => {
                for s in queued {
                    self.sh.retry(s, e.clone(), self.nic, &key.1);
                }
            }
        }
    }

    fn forget(&mut self, peer: &str, generation: Option<u64>) {
        let keys: Vec<EpKey> = self
            .eps
            .iter()
            .filter(|(k, e)| k.0 == peer && generation.is_none_or(|g| g == e.generation))
            .map(|(k, _)| k.clone())
            .collect();
        if generation.is_none() {
            self.latest.remove(peer);
        }
        for k in keys {
            self.retire(&k, Fault::Neutral);
        }
    }

    /// The region at `base` was unregistered and its MRs are already deregistered, so no NIC
    /// can reach it any more: every slice using it fails now and releases its lease, even if
    /// its WR was posted (it will complete with an error, or was already done).
    fn unregister(&mut self, region: &Weak<Region>) {
        let gone = || {
            Error::new(
                ErrorKind::NotRegistered,
                "the local region was unregistered during the transfer",
            )
        };
        for ep in self.eps.values_mut() {
            let mut keep = VecDeque::with_capacity(ep.backlog.len());
            for mut s in ep.backlog.drain(..) {
                if s.is_in(region) {
                    s.complete(Err(gone()));
                } else {
                    keep.push_back(s);
                }
            }
            ep.backlog = keep;
            let mut keep = Vec::with_capacity(ep.parked.len());
            for mut s in ep.parked.drain(..) {
                if s.is_in(region) {
                    s.complete(Err(gone()));
                } else {
                    keep.push(s);
                }
            }
            ep.parked = keep;
        }
        for inf in self.inflight.values_mut() {
            if inf.slice.as_ref().is_some_and(|s| s.is_in(region))
                && let Some(mut s) = inf.slice.take()
            {
                s.complete(Err(gone()));
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        let up = self.nic_ref.port_active();
        if up != self.port_up {
            self.port_up = up;
            self.sh.nic_down[self.nic].store(!up, Ordering::Release);
            if up {
                tracing::warn!(nic = %self.nic_ref.name, "RDMA port is active again; probing its rails");
                self.sh.nic_up(self.nic);
            } else {
                tracing::warn!(nic = %self.nic_ref.name, "RDMA port went down; failing over its slices");
                let keys: Vec<EpKey> = self.eps.keys().cloned().collect();
                let e = Error::new(
                    ErrorKind::PeerUnreachable,
                    format!("RDMA port of {} is down", self.nic_ref.name),
                );
                for k in keys {
                    self.sh.rail_failed(self.nic, &k.0, &k.1);
                    self.retire(&k, Fault::Path(e.clone()));
                }
            }
        }
        // A slice past its deadline fails only if the QP it waits on makes no progress:
        // the engine timeout is how long a peer may make no progress (a deep queue behind a
        // working QP is not a dead peer).
        let timeout = self.sh.timeout;
        let alive = |ep: &Endpoint, qp: Option<u64>| {
            matches!(ep.state, EpState::Ready { qp_id, progress, .. }
                if qp.is_none_or(|q| q == qp_id) && now.duration_since(progress) < timeout)
        };
        for inf in self.inflight.values_mut() {
            if let Some(s) = inf.slice.as_mut()
                && !s.is_done()
                && now >= s.deadline
                && !self
                    .eps
                    .get(&inf.key)
                    .is_some_and(|ep| alive(ep, Some(inf.qp_id)))
            {
                // The WR may still be in the NIC: the lease stays until it completes or is
                // flushed, but the caller gets its answer now.
                let peer = inf.key.0.clone();
                s.complete(Err(Error::new(
                    ErrorKind::Timeout,
                    format!("RDMA slice to {peer:?} did not complete before the deadline"),
                )
                .with_context("peer", peer)));
            }
        }
        // A QP with work outstanding and no completion for the slice timeout is stuck.
        let st = self.sh.slice_timeout;
        let stuck: Vec<EpKey> = self
            .eps
            .iter()
            .filter(|(_, e)| {
                matches!(e.state, EpState::Ready { outstanding, progress, .. }
                    if outstanding > 0 && now.duration_since(progress) >= st)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stuck {
            tracing::warn!(peer = %k.0, nic = %self.nic_ref.name, rnic = %k.1, "RDMA QP made no progress; breaking the endpoint");
            self.sh.rail_failed(self.nic, &k.0, &k.1);
            let e = Error::new(
                ErrorKind::PeerUnreachable,
                format!("RDMA QP to {:?} completed nothing in {st:?}", k.0),
            );
            self.retire(&k, Fault::Path(e));
        }
        let mut late_connects = Vec::new();
        for (k, ep) in self.eps.iter_mut() {
            let alive = alive(ep, None);
            ep.backlog.retain_mut(|s| {
                if now >= s.deadline && !alive {
                    s.complete(Err(Error::new(
                        ErrorKind::Timeout,
                        "RDMA slice missed its deadline while queued",
                    )
                    .with_context("peer", s.peer())));
                    false
                } else {
                    !s.is_done()
                }
            });
            ep.parked.retain_mut(|s| {
                if now >= s.deadline && !alive {
                    s.complete(Err(Error::new(
                        ErrorKind::Timeout,
                        "RDMA slice missed its deadline waiting for the peer's keys",
                    )
                    .with_context("peer", s.peer())));
                    false
                } else {
                    !s.is_done()
                }
            });
            // The reactor reports every handshake by its deadline; this is a backstop.
            if let EpState::Connecting { deadline, .. } = ep.state
                && now >= deadline + Duration::from_secs(1)
            {
                late_connects.push(k.clone());
            }
        }
        for k in late_connects {
            let e = Error::new(ErrorKind::Timeout, "RDMA handshake got no answer");
            self.connect_failed(&k, e);
        }
        for d in self.draining.values_mut() {
            if !d.warned && now.duration_since(d.since) >= Duration::from_secs(10) {
                d.warned = true;
                tracing::warn!(nic = %self.nic_ref.name, outstanding = d.outstanding, "a broken RDMA QP has not flushed its work requests after 10 s");
            }
        }
    }

    /// Destroys every QP (so the NIC no longer touches any memory for them), then hands back
    /// every slice it held; the caller fails them once the MRs are deregistered too.
    fn shutdown(&mut self) -> Vec<Slice> {
        let mut out = Vec::new();
        for (_, ep) in self.eps.drain() {
            match ep.state {
                EpState::Connecting { qp, .. } => drop(qp),
                EpState::Ready { qp, .. } => drop(qp),
            }
            out.extend(ep.backlog);
            out.extend(ep.parked);
        }
        self.draining.clear();
        out.extend(self.inflight.drain().filter_map(|(_, inf)| inf.slice));
        while let Ok(cmd) = self.rx.try_recv() {
            if let Cmd::Post(batch) = cmd {
                out.extend(batch.into_iter().map(|(s, _)| s));
            }
        }
        for s in &mut out {
            s.complete(Err(closed()));
        }
        out
    }
}

fn handshake_addr(remote: &RemoteSegment) -> Result<String> {
    remote
        .descriptor()
        .extra
        .get(HANDSHAKE_KEY)
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "segment {:?} publishes no RDMA handshake address",
                    remote.name()
                ),
            )
        })
}
