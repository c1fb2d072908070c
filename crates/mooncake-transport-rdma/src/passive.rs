//! The passive side of the handshake: QPs created for peers that connect to us, and the
//! rules that keep a flood of `Connect` requests from evicting QPs in use.
//!
//! Every passive QP is an [`Entry`] of a bounded [`Table`]. One-sided RDMA leaves no trace on
//! the target's CPU, so activity is read from the QP itself: the responder's expected PSN
//! ([`Activity::rq_psn`]) advances with every request the peer sends, and the table samples it.
//! An entry is *pending* until its PSN was first seen to move, *active* while it moved within
//! [`Limits::idle_after`], *idle* after that. Room for a new QP is made by, in order:
//!
//! 1. replacing the entry of the same endpoint (same source address, peer, generation and
//!    NICs: the peer reconnects after its QP broke);
//! 2. evicting the source address's oldest pending entry when it has
//!    [`Limits::max_pending_per_ip`] of them (one host cannot churn anyone else's QPs);
//! 3. when the table is full, evicting the oldest pending entry past its grace period, else
//!    the least recently used idle one — never an active one; with none, the request is
//!    refused as busy.
//!
//! `Keys` requests are honoured only for an existing entry: the caller names the QP (NIC and
//! QP number), is the peer (name and generation) that set it up, and presents the token the
//! `Connect` reply gave it.
//!
//! Every request first passes the [`Gate`] (version, challenge, addressee and, with a cluster
//! secret, the proof that covers the caller's name and generation); only then does anything
//! change. Without a secret names and generations are the caller's word, so no rule above
//! trusts them: a QP is replaced only by a request from the same endpoint (same source
//! address, name, generation and NICs), and the other evictions go by a QP's age and use,
//! never by name or generation, so a spoofed `from` with a newer generation removes nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mooncake_core::ClusterSecret;

use crate::handshake::Serve;
use crate::shared::Shared;
use crate::sys::Qp;
use crate::wire::{self, Reply, Request};

/// Reads a QP's activity counter.
pub(crate) trait Activity {
    /// The responder's next expected PSN, if it can be read.
    fn rq_psn(&self) -> Option<u32>;
}

impl Activity for Qp {
    fn rq_psn(&self) -> Option<u32> {
        Qp::rq_psn(self)
    }
}

/// Bounds of the passive table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Passive QPs kept in all.
    pub max: usize,
    /// Pending (never used) QPs kept per source address.
    pub max_pending_per_ip: usize,
    /// A pending QP younger than this is not evicted to make room for another peer.
    pub pending_grace: Duration,
    /// A QP unused for this long may be evicted when room is needed.
    pub idle_after: Duration,
}

/// One passive QP.
pub(crate) struct Entry<Q> {
    pub from: String,
    pub generation: u64,
    pub from_nic: String,
    pub nic: usize,
    pub src: IpAddr,
    pub qpn: u32,
    pub token: String,
    pub created: Instant,
    /// Last sampled expected PSN.
    pub psn: u32,
    /// When the PSN was last seen to move (`None`: pending).
    pub used: Option<Instant>,
    pub qp: Q,
}

/// The bounded set of passive QPs.
pub(crate) struct Table<Q> {
    entries: Vec<Entry<Q>>,
    limits: Limits,
    last_sample: Option<Instant>,
    evicted: u64,
}

impl<Q: Activity> Table<Q> {
    pub fn new(limits: Limits) -> Self {
        Self {
            entries: Vec::new(),
            limits,
            last_sample: None,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries evicted so far (replacements of the same endpoint not counted).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Reads every QP's PSN and notes which moved.
    pub fn sample(&mut self, now: Instant) {
        self.last_sample = Some(now);
        for e in &mut self.entries {
            if let Some(p) = e.qp.rq_psn()
                && p != e.psn
            {
                e.psn = p;
                e.used = Some(now);
            }
        }
    }

    fn is_active(&self, e: &Entry<Q>, now: Instant) -> bool {
        e.used
            .is_some_and(|t| now.duration_since(t) < self.limits.idle_after)
    }

    /// Makes room for a QP of endpoint (`src`, `from`, `generation`, `from_nic`, `nic`).
    /// Fails (the caller refuses as busy) when only active or young pending QPs are left.
    pub fn make_room(
        &mut self,
        src: IpAddr,
        from: &str,
        generation: u64,
        from_nic: &str,
        nic: usize,
        now: Instant,
    ) -> Result<(), String> {
        // 1. The same endpoint reconnecting replaces its old QP.
        if let Some(i) = self.entries.iter().position(|e| {
            e.src == src
                && e.from == from
                && e.generation == generation
                && e.from_nic == from_nic
                && e.nic == nic
        }) {
            self.entries.remove(i);
        }
        // 2. One source address keeps a bounded number of pending QPs.
        let pending_here: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].src == src && self.entries[i].used.is_none())
            .collect();
        if pending_here.len() >= self.limits.max_pending_per_ip.max(1)
            && let Some(&oldest) = pending_here
                .iter()
                .min_by_key(|&&i| self.entries[i].created)
        {
            self.evict(oldest, "too many pending QPs from one address");
        }
        // 3. A full table evicts a stale pending QP, else the least recently used idle one.
        if self.entries.len() >= self.limits.max.max(1) {
            if self
                .last_sample
                .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100))
            {
                self.sample(now);
            }
            let grace = self.limits.pending_grace;
            let stale_pending = (0..self.entries.len())
                .filter(|&i| {
                    let e = &self.entries[i];
                    e.used.is_none() && now.duration_since(e.created) >= grace
                })
                .min_by_key(|&i| self.entries[i].created);
            let victim = stale_pending.or_else(|| {
                (0..self.entries.len())
                    .filter(|&i| {
                        let e = &self.entries[i];
                        e.used.is_some() && !self.is_active(e, now)
                    })
                    .min_by_key(|&i| self.entries[i].used)
            });
            match victim {
                Some(i) => self.evict(i, "passive QP table is full"),
                None => {
                    return Err(format!(
                        "all {} passive QPs are in use or just created",
                        self.entries.len()
                    ));
                }
            }
        }
        Ok(())
    }

    fn evict(&mut self, i: usize, why: &str) {
        let e = self.entries.remove(i);
        self.evicted += 1;
        tracing::info!(from = %e.from, src = %e.src, qpn = e.qpn, why, "evicting passive RDMA QP");
    }

    pub fn insert(&mut self, e: Entry<Q>) {
        self.entries.push(e);
    }

    /// Whether `qpn` on `nic` is a passive QP of `from` (that generation) whose token is
    /// `token`; a match counts as use.
    pub fn authorize_keys(
        &mut self,
        nic: usize,
        qpn: u32,
        token: &str,
        from: &str,
        generation: u64,
        now: Instant,
    ) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.nic == nic && e.qpn == qpn && e.from == from && e.generation == generation)
        {
            Some(e) if wire::same_secret(&e.token, token) => {
                e.used = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Drops the QPs of `from` (of one generation, or all).
    pub fn forget(&mut self, from: &str, generation: Option<u64>) {
        self.entries
            .retain(|e| !(e.from == from && generation.is_none_or(|g| g == e.generation)));
    }

    /// Drops every QP.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// The checks every request passes before any state changes, and the proof on replies.
pub(crate) struct Gate {
    /// The cluster secret requests must prove (none: every peer that answers the challenge).
    pub secret: Option<ClusterSecret>,
    /// Our segment name: requests must be addressed to it.
    pub name: String,
}

/// Why a request was refused.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub reason: String,
    /// The caller did not prove the cluster secret.
    pub denied: bool,
}

impl Gate {
    /// Checks protocol version, the echoed challenge, the segment the request is for and,
    /// with a secret, the request's proof (which covers the caller's name and generation).
    pub fn check(&self, req: &Request, nonce: &str) -> Result<(), Refusal> {
        let refuse = |reason: String, denied| Err(Refusal { reason, denied });
        if req.version() != wire::VERSION {
            return refuse(
                format!(
                    "handshake version {} (we speak {})",
                    req.version(),
                    wire::VERSION
                ),
                false,
            );
        }
        if !wire::same_secret(req.nonce(), nonce) {
            return refuse(
                "the request does not answer this connection's challenge".into(),
                false,
            );
        }
        if let Some(secret) = &self.secret
            && !req.verify(secret)
        {
            return refuse("the request does not prove the cluster secret".into(), true);
        }
        if req.to() != self.name {
            return refuse(
                format!(
                    "the request is for segment {:?}; this is {:?}",
                    req.to(),
                    self.name
                ),
                false,
            );
        }
        Ok(())
    }

    /// Adds our proof to an accepting reply to `req` (with a secret).
    pub fn seal(&self, req: &Request, mut reply: Reply) -> Reply {
        if let Some(secret) = &self.secret {
            reply.seal(secret, req, &self.name);
        }
        reply
    }
}

/// The [`Serve`] implementation of the transport.
pub(crate) struct Passive {
    sh: Arc<Shared>,
    gate: Gate,
    table: Mutex<Table<Qp>>,
}

impl Passive {
    pub fn new(sh: Arc<Shared>, limits: Limits) -> Self {
        Self {
            gate: Gate {
                secret: sh.secret.clone(),
                name: sh.local_name.clone(),
            },
            sh,
            table: Mutex::new(Table::new(limits)),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table<Qp>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the QPs of `from` (of one generation, or all).
    pub fn forget(&self, from: &str, generation: Option<u64>) {
        self.table().forget(from, generation);
    }

    /// Destroys every passive QP (shutdown).
    pub fn clear(&self) {
        self.table().clear();
    }

    fn refuse(&self, reason: String, busy: bool, denied: bool) -> Reply {
        tracing::warn!(%reason, "refusing RDMA handshake");
        self.sh.cfg.stats.handshake_refused();
        Reply::Refused {
            reason,
            busy,
            denied,
        }
    }

    /// Answers a request that passed the [`Gate`].
    fn answer(&self, req: &Request, peer: SocketAddr) -> Reply {
        let sh = &self.sh;
        match req {
            Request::Keys {
                peer_nic,
                qpn,
                token,
                from,
                generation,
                ..
            } => {
                let Some(i) = sh.nic_index(peer_nic) else {
                    return self.refuse(format!("no NIC {peer_nic:?} here"), false, false);
                };
                if !self
                    .table()
                    .authorize_keys(i, *qpn, token, from, *generation, Instant::now())
                {
                    return self.refuse(
                        format!("{from:?} ({peer}) holds no QP {qpn} on {peer_nic} here"),
                        false,
                        false,
                    );
                }
                Reply::Ok {
                    generation: sh.generation,
                    qp: None,
                    token: None,
                    keys: sh.mrs.keys_for(i),
                    auth: None,
                }
            }
            Request::Connect {
                from,
                generation,
                local_nic,
                peer_nic,
                qp,
                ..
            } => {
                let Some(i) = sh.nic_index(peer_nic) else {
                    return self.refuse(format!("no NIC {peer_nic:?} here"), false, false);
                };
                if sh.nic_down[i].load(Ordering::Acquire) {
                    return self.refuse(format!("NIC {peer_nic} is down"), false, false);
                }
                let remote = match Shared::qp_peer(qp) {
                    Ok(p) => p,
                    Err(e) => return self.refuse(e.to_string(), false, false),
                };
                let now = Instant::now();
                let mut table = self.table();
                let before = table.evicted();
                let room = table.make_room(peer.ip(), from, *generation, local_nic, i, now);
                for _ in before..table.evicted() {
                    sh.cfg.stats.passive_evicted();
                }
                if let Err(reason) = room {
                    drop(table);
                    return self.refuse(reason, true, false);
                }
                let nic = &sh.nics[i];
                let mut mine = match nic.create_qp(sh.cfg.max_wr) {
                    Ok(q) => q,
                    Err(e) => return self.refuse(e.to_string(), true, false),
                };
                if let Err(e) = mine.connect(nic, &remote, sh.timing()) {
                    return self.refuse(e.to_string(), false, false);
                }
                let info = sh.qp_info(i, &mine);
                let token = wire::hex(&crate::sys::random_bytes::<16>());
                table.insert(Entry {
                    from: from.clone(),
                    generation: *generation,
                    from_nic: local_nic.clone(),
                    nic: i,
                    src: peer.ip(),
                    qpn: mine.qpn,
                    token: token.clone(),
                    created: now,
                    psn: qp.psn,
                    used: None,
                    qp: mine,
                });
                drop(table);
                tracing::debug!(%from, %peer, qpn = info.qpn, "accepted RDMA connection");
                Reply::Ok {
                    generation: sh.generation,
                    qp: Some(info),
                    token: Some(token),
                    keys: sh.mrs.keys_for(i),
                    auth: None,
                }
            }
        }
    }
}

impl Serve for Passive {
    fn serve(&self, req: Request, peer: SocketAddr, nonce: &str) -> Reply {
        // Nothing changes before the request passed the gate.
        if let Err(r) = self.gate.check(&req, nonce) {
            return self.refuse(r.reason, false, r.denied);
        }
        let reply = self.answer(&req, peer);
        self.gate.seal(&req, reply)
    }

    fn tick(&self, now: Instant) {
        let mut t = self.table();
        // Sampling costs one verbs call per QP: only when room may soon be needed.
        if t.len() * 2 >= t.limits.max {
            t.sample(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A QP whose PSN the test moves.
    struct Fake(Cell<u32>);

    impl Activity for Fake {
        fn rq_psn(&self) -> Option<u32> {
            Some(self.0.get())
        }
    }

    fn limits() -> Limits {
        Limits {
            max: 8,
            max_pending_per_ip: 4,
            pending_grace: Duration::from_secs(2),
            idle_after: Duration::from_secs(10),
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn add(t: &mut Table<Fake>, src: IpAddr, from: &str, qpn: u32, now: Instant) -> bool {
        add_gen(t, src, from, 1, qpn, now)
    }

    fn add_gen(
        t: &mut Table<Fake>,
        src: IpAddr,
        from: &str,
        generation: u64,
        qpn: u32,
        now: Instant,
    ) -> bool {
        if t.make_room(src, from, generation, "nic", 0, now).is_err() {
            return false;
        }
        t.insert(Entry {
            from: from.into(),
            generation,
            from_nic: "nic".into(),
            nic: 0,
            src,
            qpn,
            token: format!("t{qpn}"),
            created: now,
            psn: 100,
            used: None,
            qp: Fake(Cell::new(100)),
        });
        true
    }

    fn used(t: &mut Table<Fake>, qpn: u32) {
        let e = t.entries.iter().find(|e| e.qpn == qpn).unwrap();
        e.qp.0.set(e.qp.0.get() + 1);
    }

    fn has(t: &Table<Fake>, qpn: u32) -> bool {
        t.entries.iter().any(|e| e.qpn == qpn)
    }

    #[test]
    fn a_connect_flood_never_evicts_active_qps() {
        let t0 = Instant::now();
        let mut t = Table::new(limits());
        // Three legitimate peers connect and use their QPs.
        for q in 1..=3 {
            assert!(add(&mut t, ip(1), &format!("legit{q}"), q, t0));
            used(&mut t, q);
        }
        t.sample(t0 + Duration::from_millis(10));
        // A flood from several addresses, over time, spoofing the legitimate names with
        // ever new generations.
        let mut refused = 0;
        for k in 0..200u32 {
            let now = t0 + Duration::from_millis(20 + 50 * k as u64);
            if k % 10 == 0 {
                for q in 1..=3 {
                    used(&mut t, q);
                }
                t.sample(now);
            }
            let (src, name) = (ip(2 + (k % 5) as u8), format!("legit{}", 1 + k % 3));
            if !add_gen(&mut t, src, &name, 2 + k as u64, 1000 + k, now) {
                refused += 1;
            }
            assert!(t.len() <= 8);
            for q in 1..=3 {
                assert!(has(&t, q), "flood request {k} evicted active QP {q}");
            }
        }
        assert!(refused > 0, "a full table of young QPs refuses");
        assert!(t.evicted() > 0, "stale pending QPs made room");
    }

    #[test]
    fn one_address_only_churns_its_own_pending_qps() {
        let t0 = Instant::now();
        let mut t = Table::new(limits());
        assert!(add(&mut t, ip(1), "other", 1, t0));
        for k in 0..50 {
            assert!(add(&mut t, ip(9), &format!("x{k}"), 100 + k, t0));
        }
        assert!(has(&t, 1), "another address's fresh QP survived");
        let from_9 = t.entries.iter().filter(|e| e.src == ip(9)).count();
        assert_eq!(from_9, 4);
    }

    #[test]
    fn idle_qps_make_room_and_reconnects_replace() {
        let t0 = Instant::now();
        let mut t = Table::new(limits());
        for q in 0..8 {
            assert!(add(&mut t, ip(1 + q as u8), &format!("p{q}"), q, t0));
            used(&mut t, q);
        }
        t.sample(t0 + Duration::from_secs(1));
        // All active: a new peer is refused.
        assert!(!add(&mut t, ip(50), "new", 50, t0 + Duration::from_secs(2)));
        // Later only QP 3 is still used: the least recently used idle one goes.
        let later = t0 + Duration::from_secs(30);
        used(&mut t, 3);
        t.sample(later);
        assert!(add(
            &mut t,
            ip(50),
            "new",
            50,
            later + Duration::from_secs(1)
        ));
        assert!(has(&t, 3) && has(&t, 50) && t.len() == 8);
        // The same endpoint reconnecting replaces its QP instead of growing the table.
        assert!(add(
            &mut t,
            ip(50),
            "new",
            51,
            later + Duration::from_secs(1)
        ));
        assert!(!has(&t, 50) && has(&t, 51));
    }

    #[test]
    fn keys_need_the_qp_and_its_token() {
        let t0 = Instant::now();
        let mut t = Table::new(limits());
        assert!(add(&mut t, ip(1), "p", 7, t0));
        assert!(!t.authorize_keys(0, 7, "wrong", "p", 1, t0));
        assert!(!t.authorize_keys(0, 8, "t7", "p", 1, t0));
        assert!(!t.authorize_keys(1, 7, "t7", "p", 1, t0));
        // The token alone is not enough: the QP's owner (name and generation) asks.
        assert!(!t.authorize_keys(0, 7, "t7", "mallory", 1, t0));
        assert!(!t.authorize_keys(0, 7, "t7", "p", 2, t0));
        assert!(t.authorize_keys(0, 7, "t7", "p", 1, t0));
        t.forget("p", Some(2));
        assert!(has(&t, 7), "another generation is kept");
        t.forget("p", Some(1));
        assert!(!has(&t, 7));
    }

    #[test]
    fn a_spoofed_newer_generation_evicts_nothing() {
        let t0 = Instant::now();
        let mut t = Table::new(limits());
        // The victim's QP, just created and not used yet (the most fragile state).
        assert!(add_gen(&mut t, ip(1), "victim", 5, 1, t0));
        // Someone claims to be a newer incarnation of the victim: from another address, and
        // from the victim's own address with the same NICs.
        for g in 6..9 {
            assert!(add_gen(&mut t, ip(2), "victim", g, 10 + g as u32, t0));
            assert!(add_gen(&mut t, ip(1), "victim", g, 20 + g as u32, t0));
            assert!(
                has(&t, 1),
                "a spoofed generation {g} evicted the victim's QP"
            );
        }
        assert_eq!(t.evicted(), 0);
    }

    /// A stand-in for [`Passive`] without a NIC: the same gate, and a counter for the state a
    /// request that passed it would change.
    struct Gated {
        gate: Gate,
        changed: std::sync::atomic::AtomicUsize,
    }

    impl Serve for Gated {
        fn serve(&self, req: Request, _peer: SocketAddr, nonce: &str) -> Reply {
            if let Err(r) = self.gate.check(&req, nonce) {
                return Reply::Refused {
                    reason: r.reason,
                    busy: false,
                    denied: r.denied,
                };
            }
            self.changed.fetch_add(1, Ordering::SeqCst);
            let reply = Reply::Ok {
                generation: 3,
                qp: None,
                token: Some("t".into()),
                keys: Vec::new(),
                auth: None,
            };
            self.gate.seal(&req, reply)
        }
    }

    fn secret(b: u8) -> ClusterSecret {
        ClusterSecret::from_bytes(&[b; 24]).unwrap()
    }

    struct Server {
        _reactor: crate::handshake::Reactor,
        addr: String,
        gated: Arc<Gated>,
    }

    fn server(secret: Option<ClusterSecret>) -> Server {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let gated = Arc::new(Gated {
            gate: Gate {
                secret: secret.clone(),
                name: "target".into(),
            },
            changed: Default::default(),
        });
        let limits = crate::handshake::Limits {
            frame_deadline: Duration::from_secs(10),
            max_conns: 8,
        };
        let (r, _c) = crate::handshake::Reactor::start(l, gated.clone(), limits, secret).unwrap();
        Server {
            _reactor: r,
            addr,
            gated,
        }
    }

    /// Runs one handshake as a client holding `secret`, to the segment `to`.
    fn call(
        addr: &str,
        secret: Option<ClusterSecret>,
        from: &str,
        to: &str,
    ) -> mooncake_core::Result<Reply> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let quiet = Arc::new(Gated {
            gate: Gate {
                secret: None,
                name: String::new(),
            },
            changed: Default::default(),
        });
        let limits = crate::handshake::Limits {
            frame_deadline: Duration::from_secs(10),
            max_conns: 1,
        };
        let (_r, client) = crate::handshake::Reactor::start(l, quiet, limits, secret).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        client.submit(crate::handshake::Job {
            addr: addr.to_string(),
            request: Request::Keys {
                version: wire::VERSION,
                nonce: String::new(),
                cnonce: String::new(),
                auth: None,
                from: from.into(),
                generation: 2,
                to: to.into(),
                peer_nic: "nic".into(),
                qpn: 1,
                token: "t".into(),
            },
            deadline: Instant::now() + Duration::from_secs(20),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv_timeout(Duration::from_secs(30)).unwrap()
    }

    fn denied(r: &Reply) -> bool {
        matches!(r, Reply::Refused { denied: true, .. })
    }

    #[test]
    fn with_a_secret_only_its_holders_get_past_the_gate() {
        let s = server(Some(secret(1)));
        // The same secret: accepted, and the reply proves the secret back (checked by the
        // client, which fails the job otherwise).
        let r = call(&s.addr, Some(secret(1)), "a", "target").unwrap();
        assert!(matches!(r, Reply::Ok { auth: Some(_), .. }), "{r:?}");
        assert_eq!(s.gated.changed.load(Ordering::SeqCst), 1);
        // No secret, or another one: denied before anything changes.
        let r = call(&s.addr, None, "a", "target").unwrap();
        assert!(denied(&r), "{r:?}");
        let r = call(&s.addr, Some(secret(2)), "a", "target").unwrap();
        assert!(denied(&r), "{r:?}");
        // A request meant for another segment.
        let r = call(&s.addr, Some(secret(1)), "a", "other").unwrap();
        assert!(matches!(r, Reply::Refused { .. }), "{r:?}");
        assert_eq!(s.gated.changed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_client_with_a_secret_refuses_a_server_that_cannot_prove_it() {
        // A server without the secret (or an impostor) accepts, but cannot prove it.
        let open = server(None);
        let e = call(&open.addr, Some(secret(1)), "a", "target").unwrap_err();
        assert_eq!(e.kind(), mooncake_core::ErrorKind::PeerUnreachable, "{e}");
        assert!(!e.is_temporary());
        assert!(e.message().contains("cluster secret"), "{e}");
        // Without secrets on either side everything works as before.
        let r = call(&open.addr, None, "a", "target").unwrap();
        assert!(matches!(r, Reply::Ok { auth: None, .. }), "{r:?}");
        // Another secret on the server: its reply proof does not verify either.
        let other = server(Some(secret(2)));
        let r = call(&other.addr, Some(secret(1)), "a", "target").unwrap();
        assert!(denied(&r), "{r:?}");
    }

    #[test]
    fn a_request_altered_after_its_proof_is_denied() {
        let g = Gate {
            secret: Some(secret(1)),
            name: "target".into(),
        };
        let mut req = Request::Connect {
            version: wire::VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: "victim".into(),
            generation: 5,
            to: "target".into(),
            local_nic: "n".into(),
            peer_nic: "n".into(),
            qp: wire::QpInfo {
                qpn: 1,
                psn: 1,
                gid: wire::gid_to_hex(&[0; 16]),
                lid: 0,
                mtu: 1024,
            },
        };
        req.answer("n1", "c1", Some(&secret(1)));
        assert!(g.check(&req, "n1").is_ok());
        // Replayed on another connection (another challenge).
        assert!(g.check(&req, "n2").is_err());
        // The victim's proof with a newer generation claimed.
        if let Request::Connect { generation, .. } = &mut req {
            *generation = 6;
        }
        let r = g.check(&req, "n1").unwrap_err();
        assert!(r.denied, "{r:?}");
    }
}
