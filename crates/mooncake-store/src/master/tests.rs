//! Unit tests and the state-machine proptest of the master.

use std::collections::{BTreeMap, HashMap as StdMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::types::DEFAULT_TENANT as T0;

const KB: u64 = 1024;

impl Master {
    /// Every structural invariant; O(everything). Used after each step of the proptest.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        let mut replica_owner: StdMap<(u32, u32), u32> = StdMap::new();
        let mut live = 0u64;
        let mut inflight_per_seg: StdMap<u32, u32> = StdMap::new();
        for (s, sl) in self.slots.iter().enumerate() {
            let s = s as u32;
            if sl.state() == ST_FREE {
                continue;
            }
            live += 1;
            if self.find(sl.tenant, &sl.key, sl.hash) != Some(s) {
                return Err(format!("slot {s} ({}) not indexed", sl.key));
            }
            if (sl.state() == ST_PROCESSING) != self.inflight.contains_key(&s) {
                return Err(format!("slot {s} state/inflight mismatch"));
            }
            let reps: Vec<Rep> = self.replicas(s).collect();
            if reps.is_empty() {
                return Err(format!("object {} has no replica", sl.key));
            }
            let mut segs = HashSet::new();
            for r in reps {
                if !segs.insert(r.seg) {
                    return Err(format!("object {} has two replicas on one segment", sl.key));
                }
                let Some(seg) = self.segments.get(r.seg as usize).and_then(|s| s.as_deref()) else {
                    return Err(format!(
                        "object {} has a replica on a dropped segment",
                        sl.key
                    ));
                };
                if seg.alloc.tag(r.handle) != Some(s) {
                    return Err(format!("replica of {} not tagged with its slot", sl.key));
                }
                if seg.alloc.size(r.handle).unwrap() < sl.size {
                    return Err(format!("replica of {} smaller than the object", sl.key));
                }
                if replica_owner.insert((r.seg, r.handle), s).is_some() {
                    return Err("two objects share an allocation".into());
                }
                if sl.state() == ST_PROCESSING {
                    *inflight_per_seg.entry(r.seg).or_default() += 1;
                }
            }
            if sl.flags & F_GROUP != 0 {
                let g = self.slot_group[&s];
                let group = self.groups[g as usize].as_ref().ok_or("dead group")?;
                if !group.members.contains(&s) {
                    return Err("group does not list its member".into());
                }
            } else if self.slot_group.contains_key(&s) {
                return Err("stale group entry".into());
            }
            if (sl.flags & F_SOFT != 0) != self.soft.contains_key(&s) {
                return Err("soft flag mismatch".into());
            }
        }
        if live != self.live_objects {
            return Err(format!("live {live} != counter {}", self.live_objects));
        }
        let indexed: usize = self.tenants.iter().map(|t| t.index.len()).sum();
        if indexed as u64 != live {
            return Err(format!("indexed {indexed} != live {live}"));
        }
        let deferred: HashSet<(u32, u32)> =
            self.deferred.iter().map(|d| (d.seg, d.handle)).collect();
        for (i, seg) in self.segments.iter().enumerate() {
            let Some(seg) = seg.as_deref() else { continue };
            let i = i as u32;
            seg.alloc.validate()?;
            for (h, _, _, tag) in seg.alloc.iter_used() {
                if tag == NO_TAG {
                    if !deferred.contains(&(i, h)) {
                        return Err("untagged allocation that is not deferred".into());
                    }
                } else if replica_owner.get(&(i, h)) != Some(&tag) {
                    return Err(format!(
                        "allocation {h} of segment {i} tagged {tag} orphaned"
                    ));
                }
            }
            let expect = inflight_per_seg.get(&i).copied().unwrap_or(0);
            if seg.inflight != expect {
                return Err(format!("segment {i} inflight {} != {expect}", seg.inflight));
            }
            if self.seg_by_name.get(&*seg.name) != Some(&i) {
                return Err("name map".into());
            }
        }
        for g in self.groups.iter().flatten() {
            for &m in &g.members {
                if self.slots[m as usize].state() == ST_FREE {
                    return Err("group lists a dead slot".into());
                }
            }
        }
        Ok(())
    }
}

fn cfg() -> MasterConfig {
    MasterConfig::default().with_ramp_up_ms(0)
}

fn client(m: &mut Master, host: &str) -> ClientId {
    m.register_client(host, 0)
}

fn mount(m: &mut Master, c: ClientId, name: &str, host: &str, size: u64, now: u64) -> SegmentId {
    m.mount_segment(
        c,
        MountRequest {
            name: name.into(),
            base: 0x1000_0000 * (1 + m.segments.len() as u64),
            size,
            host: host.into(),
            held: Vec::new(),
        },
        now,
    )
    .unwrap()
}

fn put_cfg(
    m: &mut Master,
    c: ClientId,
    key: &str,
    size: u64,
    rc: &ReplicateConfig,
    now: u64,
) -> StoreResult<Vec<ReplicaDesc>> {
    let d = m.put_start(c, T0, key, size, rc, now)?;
    m.put_end(c, T0, key, now)?;
    Ok(d)
}

fn put(m: &mut Master, c: ClientId, key: &str, size: u64, now: u64) -> Vec<ReplicaDesc> {
    put_cfg(m, c, key, size, &ReplicateConfig::default(), now).unwrap()
}

fn code<T: std::fmt::Debug>(r: StoreResult<T>) -> StoreErrorCode {
    r.unwrap_err().error_code()
}

/// One 8 KiB segment of 1 KiB slots, watermark pass off (so only put-time eviction runs).
fn small_pool(c: &mut MasterConfig) -> (Master, ClientId) {
    c.eviction_high_watermark_ratio = 1.0;
    let mut m = Master::new(c.clone());
    let s = client(&mut m, "h");
    mount(&mut m, s, "seg", "h", 8 * KB, 0);
    (m, s)
}

#[test]
fn two_phase_visibility() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    let d = m
        .put_start(c, T0, "k", 1000, &ReplicateConfig::default(), 1)
        .unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].len, 1000);
    assert_eq!(d[0].segment, "a");
    assert!(!m.exists(T0, "k"));
    assert_eq!(
        code(m.get_replicas(T0, "k", 2)),
        StoreErrorCode::ReplicaIsNotReady
    );
    assert_eq!(m.query_key(T0, "k").unwrap().state, ObjectState::Processing);
    m.put_end(c, T0, "k", 3).unwrap();
    assert!(m.exists(T0, "k"));
    let g = m.get_replicas(T0, "k", 4).unwrap();
    assert_eq!(g.replicas, d);
    assert_eq!(g.lease_ttl_ms, 10_000);
    m.put_end(c, T0, "k", 5).unwrap(); // idempotent retry
    m.check_invariants().unwrap();
}

#[test]
fn existing_key_is_refused_and_old_value_kept() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    let d = put(&mut m, c, "k", 100, 0);
    let e = m
        .put_start(c, T0, "k", 200, &ReplicateConfig::default(), 1)
        .unwrap_err();
    assert_eq!(e.code(), -705);
    let g = m.get_replicas(T0, "k", 2).unwrap();
    assert_eq!(g.replicas, d, "old value kept");
    assert_eq!(m.stats().objects, 1);
}

#[test]
fn concurrent_put_first_writer_wins() {
    let mut m = Master::new(cfg());
    let a = client(&mut m, "h");
    let b = client(&mut m, "h");
    mount(&mut m, a, "a", "h", 1 << 20, 0);
    let rc = ReplicateConfig::default();
    m.put_start(a, T0, "k", 100, &rc, 0).unwrap();
    assert_eq!(
        code(m.put_start(b, T0, "k", 100, &rc, 1)),
        StoreErrorCode::ObjectAlreadyExists
    );
    assert_eq!(
        code(m.put_end(b, T0, "k", 2)),
        StoreErrorCode::IllegalClient
    );
    assert_eq!(
        code(m.put_revoke(b, T0, "k", 2)),
        StoreErrorCode::IllegalClient
    );
    m.put_end(a, T0, "k", 3).unwrap();
    assert!(m.exists(T0, "k"));
    assert_eq!(
        code(m.put_revoke(a, T0, "k", 4)),
        StoreErrorCode::InvalidParams
    );
}

#[test]
fn put_revoke_frees_and_key_is_writable() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    m.put_start(c, T0, "k", 4096, &ReplicateConfig::default(), 0)
        .unwrap();
    assert_eq!(m.stats().used_bytes, 4096);
    m.put_revoke(c, T0, "k", 1).unwrap();
    assert!(m.query_key(T0, "k").is_none());
    put(&mut m, c, "k", 10, 2);
    // The revoked range is quarantined (a failed transfer may still land), then freed.
    assert_eq!(m.stats().used_bytes, 4096 + 64);
    m.tick(1 + m.config().inflight_quarantine_ms);
    assert_eq!(m.stats().used_bytes, 64);
}

/// Space of a dead writer's in-flight put is not handed to anyone until the quarantine ends,
/// though the key is writable again at once.
#[test]
fn dead_writer_space_is_quarantined() {
    let mut c = cfg();
    c.eviction_high_watermark_ratio = 1.0;
    c.client_live_ttl_ms = 1 << 40;
    let q = c.inflight_quarantine_ms;
    let mut m = Master::new(c);
    let store = client(&mut m, "s");
    let w = client(&mut m, "w");
    let other = client(&mut m, "o");
    mount(&mut m, store, "s", "s", 8 * KB, 0);
    let rc = ReplicateConfig::default();
    let dead = m.put_start(w, T0, "k", 4 * KB, &rc, 0).unwrap();
    m.put_start(w, T0, "k2", 4 * KB, &rc, 0).unwrap();
    assert_eq!(m.client_disconnected(w, 1), 2);
    // The key is writable again, but not into the dead writer's range: the pool is "full".
    assert_eq!(
        code(m.put_start(other, T0, "k", 4 * KB, &rc, 2)),
        StoreErrorCode::NoAvailableHandle
    );
    m.tick(1 + q - 1);
    assert_eq!(
        code(m.put_start(other, T0, "k", 4 * KB, &rc, q)),
        StoreErrorCode::NoAvailableHandle
    );
    m.heartbeat(store, 1 + q).unwrap();
    m.heartbeat(other, 1 + q).unwrap();
    m.tick(1 + q);
    let d = m.put_start(other, T0, "k", 4 * KB, &rc, 1 + q).unwrap();
    assert!(d[0].epoch > dead[0].epoch);
    m.put_end(other, T0, "k", 2 + q).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn writer_disconnect_makes_key_writable_at_once() {
    let mut m = Master::new(cfg());
    let store = client(&mut m, "s");
    let w = client(&mut m, "w");
    let other = client(&mut m, "w2");
    mount(&mut m, store, "s", "s", 1 << 20, 0);
    let ws = mount(&mut m, w, "w", "w", 1 << 20, 0);
    let rc = ReplicateConfig::default().with_preferred_segments(vec!["w".into()]);
    put_cfg(&mut m, w, "done", 100, &rc, 0).unwrap();
    m.put_start(w, T0, "k", 100, &rc, 1).unwrap();
    assert_eq!(m.client_disconnected(w, 2), 1);
    assert!(
        m.query_key(T0, "k").is_none(),
        "in-flight put revoked at once"
    );
    // Key writable again immediately, and the writer's segment takes no new allocation.
    for i in 0..20 {
        let d = put_cfg(&mut m, other, &format!("k{i}"), 100, &rc, 3).unwrap();
        assert_eq!(d[0].segment, "s", "suspect segment gets no allocation");
    }
    put(&mut m, other, "k", 100, 3);
    // Its objects stay readable until TTL.
    assert_eq!(
        m.get_replicas(T0, "done", 4).unwrap().replicas[0].segment,
        "w"
    );
    let st = m.segments(4);
    assert!(st.iter().find(|s| s.id == ws).unwrap().suspect);
    // The writer comes back: the segment is placed on again.
    m.heartbeat(w, 5).unwrap();
    assert!(!m.segments(5).iter().find(|s| s.id == ws).unwrap().suspect);
    m.check_invariants().unwrap();
}

#[test]
fn silent_writer_revoked_after_discard_timeout() {
    let mut m = Master::new(cfg());
    let w = client(&mut m, "h");
    let b = client(&mut m, "h");
    mount(&mut m, w, "a", "h", 1 << 20, 0);
    let rc = ReplicateConfig::default();
    m.put_start(w, T0, "k", 100, &rc, 0).unwrap();
    m.put_start(w, T0, "k2", 100, &rc, 0).unwrap();
    let mut now = 0;
    while now < 29_000 {
        now += 1000;
        m.heartbeat(w, now).unwrap();
        m.heartbeat(b, now).unwrap();
        assert_eq!(m.tick(now).revoked_puts, 0);
    }
    assert!(m.query_key(T0, "k").is_some());
    assert_eq!(
        code(m.put_start(b, T0, "k", 100, &rc, 29_999)),
        StoreErrorCode::ObjectAlreadyExists
    );
    // A put_start after the timeout preempts without waiting for tick...
    m.put_start(b, T0, "k", 100, &rc, 30_000).unwrap();
    assert_eq!(
        m.query_key(T0, "k").unwrap().writer,
        Some(b),
        "stale put preempted"
    );
    // ...and tick revokes the other.
    m.heartbeat(w, 30_000).unwrap();
    assert_eq!(m.tick(30_000).revoked_puts, 1);
    assert!(m.query_key(T0, "k2").is_none());
    assert_eq!(
        code(m.put_end(w, T0, "k2", 30_001)),
        StoreErrorCode::ObjectNotFound
    );
    m.check_invariants().unwrap();
}

#[test]
fn client_ttl_expiry_drops_segments_replicas_and_objects() {
    let mut m = Master::new(cfg());
    let s1 = client(&mut m, "h1");
    let s2 = client(&mut m, "h2");
    mount(&mut m, s1, "a", "h1", 1 << 20, 0);
    mount(&mut m, s2, "b", "h2", 1 << 20, 0);
    let only_a = ReplicateConfig::default().with_preferred_segments(vec!["a".into()]);
    let both = ReplicateConfig::default().with_replica_num(2);
    put_cfg(&mut m, s2, "on_a", 100, &only_a, 0).unwrap();
    put_cfg(&mut m, s2, "on_both", 100, &both, 0).unwrap();
    m.put_start(s1, T0, "inflight", 100, &only_a, 0).unwrap();
    // s1 goes silent; s2 keeps beating.
    for now in (1000..=10_000).step_by(1000) {
        m.heartbeat(s2, now).unwrap();
        let r = m.tick(now);
        if now < 10_000 {
            assert!(r.expired_clients.is_empty());
        } else {
            assert_eq!(r.expired_clients, vec![s1]);
            assert_eq!(r.dropped_segments.len(), 1);
            assert_eq!(r.revoked_puts, 1);
            assert_eq!(r.lost_objects, 1);
        }
    }
    assert_eq!(
        code(m.get_replicas(T0, "on_a", 10_001)),
        StoreErrorCode::ObjectNotFound
    );
    let g = m.get_replicas(T0, "on_both", 10_001).unwrap();
    assert_eq!(g.replicas.len(), 1);
    assert_eq!(g.replicas[0].segment, "b");
    assert!(m.query_key(T0, "inflight").is_none());
    assert_eq!(
        m.heartbeat(s1, 10_002).unwrap().status,
        ClientStatus::NeedRemount
    );
    assert_eq!(
        code(m.put_start(s1, T0, "x", 1, &only_a, 10_002)),
        StoreErrorCode::ClientNotFound
    );
    // The name can be mounted again by a new registration.
    let s1b = m.register_client("h1", 10_003);
    mount(&mut m, s1b, "a", "h1", 1 << 20, 10_003);
    m.check_invariants().unwrap();
}

#[test]
fn lease_blocks_remove_and_expires() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    put(&mut m, c, "k", 100, 0);
    assert_eq!(m.get_replicas(T0, "k", 1000).unwrap().lease_ttl_ms, 10_000);
    // Extension is max(old, now + ttl).
    assert_eq!(m.get_replicas(T0, "k", 500).unwrap().lease_ttl_ms, 10_500);
    assert_eq!(m.remove(T0, "k", false, 5000).unwrap_err().code(), -706);
    assert_eq!(m.remove_all(T0, false, 5000), 0);
    assert!(m.exists(T0, "k"));
    m.remove(T0, "k", false, 11_000).unwrap();
    assert!(!m.exists(T0, "k"));
    assert_eq!(
        code(m.remove(T0, "k", false, 11_000)),
        StoreErrorCode::ObjectNotFound
    );
}

#[test]
fn force_remove_of_leased_object_defers_the_range() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 4 * KB, 0);
    let d = put(&mut m, c, "k", 4 * KB, 0);
    m.get_replicas(T0, "k", 0).unwrap();
    m.remove(T0, "k", true, 1).unwrap();
    assert!(!m.exists(T0, "k"));
    // The bytes a reader may still be reading are not handed out before its lease ends.
    assert_eq!(
        code(m.put_start(c, T0, "n", 4 * KB, &ReplicateConfig::default(), 2)),
        StoreErrorCode::NoAvailableHandle
    );
    assert_eq!(m.stats().deferred_frees, 1);
    m.heartbeat(c, 10_000).unwrap();
    assert_eq!(m.tick(10_000).deferred_freed, 1);
    let d2 = put(&mut m, c, "n", 4 * KB, 10_001);
    assert_eq!(d2[0].addr, d[0].addr);
    assert_ne!(d2[0].epoch, d[0].epoch, "recycled range, fresh epoch");
    m.check_invariants().unwrap();
}

#[test]
fn remove_processing_and_remove_all() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    m.put_start(c, T0, "p", 100, &ReplicateConfig::default(), 0)
        .unwrap();
    assert_eq!(
        code(m.remove(T0, "p", false, 1)),
        StoreErrorCode::ReplicaIsNotReady
    );
    for i in 0..5 {
        put(&mut m, c, &format!("k{i}"), 100, 0);
    }
    m.get_replicas(T0, "k0", 0).unwrap();
    assert_eq!(
        m.remove_all(T0, false, 1),
        4,
        "leased and in-flight skipped"
    );
    assert!(m.exists(T0, "k0"));
    assert!(m.query_key(T0, "p").is_some());
    assert_eq!(m.remove_all(T0, true, 1), 2);
    assert_eq!(m.stats().objects, 0);
    assert_eq!(
        code(m.put_end(c, T0, "p", 2)),
        StoreErrorCode::ObjectNotFound
    );
    m.check_invariants().unwrap();
}

#[test]
fn tenants_are_separate_namespaces() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    let rc = ReplicateConfig::default();
    m.put_start(c, "t1", "k", 100, &rc, 0).unwrap();
    m.put_end(c, "t1", "k", 0).unwrap();
    assert!(!m.exists("t2", "k"));
    assert!(!m.exists(T0, "k"));
    m.put_start(c, "t2", "k", 200, &rc, 0).unwrap();
    m.put_end(c, "t2", "k", 0).unwrap();
    assert_eq!(m.get_replicas("t1", "k", 1).unwrap().replicas[0].len, 100);
    assert_eq!(m.get_replicas("t2", "k", 1).unwrap().replicas[0].len, 200);
    assert_eq!(m.remove_all("t1", true, 2), 1);
    assert!(m.exists("t2", "k"));
    assert!(!m.exists("t1", "k"));
}

#[test]
fn exists_grants_no_lease_and_no_recency() {
    let (mut m, c) = small_pool(&mut cfg());
    for i in 0..8 {
        put(&mut m, c, &format!("k{i}"), KB, 0);
    }
    for i in 0..8 {
        if i != 5 {
            m.get_replicas(T0, &format!("k{i}"), 0).unwrap();
        }
    }
    let now = 20_000; // every lease is over
    for _ in 0..100 {
        assert!(m.exists(T0, "k5"));
    }
    assert_eq!(m.query_key(T0, "k5").unwrap().lease_until_ms, 0, "no lease");
    m.remove(T0, "k5", false, now).unwrap(); // not leased: removable
    put(&mut m, c, "k5", KB, now);
    for _ in 0..100 {
        assert!(m.exists(T0, "k5"));
    }
    put(&mut m, c, "new", KB, now);
    assert!(!m.exists(T0, "k5"), "probed-only key is the victim");
    for i in (0..8).filter(|&i| i != 5) {
        assert!(m.exists(T0, &format!("k{i}")), "read key k{i} survives");
    }
    m.check_invariants().unwrap();
}

#[test]
fn put_evicts_but_never_leased_or_inflight() {
    let mut c = cfg();
    c.default_kv_lease_ttl_ms = 1000;
    let (mut m, s) = small_pool(&mut c);
    let rc = ReplicateConfig::default();
    // 4 leased, 2 in flight, 2 plain.
    for i in 0..8 {
        let key = format!("k{i}");
        if i < 2 {
            m.put_start(s, T0, &key, KB, &rc, 0).unwrap();
        } else {
            put(&mut m, s, &key, KB, 0);
        }
        if (2..6).contains(&i) {
            m.get_replicas(T0, &key, 0).unwrap();
        }
    }
    // Two puts fit by evicting the two plain objects.
    put(&mut m, s, "n0", KB, 1);
    put(&mut m, s, "n1", KB, 1);
    assert!(!m.exists(T0, "k6") && !m.exists(T0, "k7"));
    // A third would need a leased or in-flight object: refused, nothing lost.
    put(&mut m, s, "n2", KB, 1); // evicts n0 or n1 (plain, unread)
    let before: Vec<bool> = (0..6)
        .map(|i| m.query_key(T0, &format!("k{i}")).is_some())
        .collect();
    assert!(before.iter().all(|&b| b));
    // Lease everything else: now nothing is evictable.
    for k in ["n0", "n1", "n2"] {
        if m.exists(T0, k) {
            m.get_replicas(T0, k, 1).unwrap();
        }
    }
    assert_eq!(
        m.put_start(s, T0, "x", KB, &rc, 2).unwrap_err().code(),
        -200
    );
    for i in 0..6 {
        assert!(m.query_key(T0, &format!("k{i}")).is_some());
    }
    // Leases end: the put succeeds.
    put(&mut m, s, "x", KB, 1001);
    m.check_invariants().unwrap();
}

/// Oracle: could evicting (non-leased, COMPLETE, unpinned, whole-group) objects make a run of
/// `need` contiguous bytes on some eligible segment?
fn eviction_could_fit(m: &Master, size: u64, now: u64) -> bool {
    let soft = m.cfg.allow_evict_soft_pinned;
    let evictable = |s: u32| match m.slot_group.get(&s) {
        None => m.object_evictable(s, now, soft),
        Some(&g) => m.groups[g as usize]
            .as_ref()
            .unwrap()
            .members
            .iter()
            .all(|&x| m.object_evictable(x, now, soft)),
    };
    let need = size.div_ceil(m.cfg.alloc_align) * m.cfg.alloc_align;
    m.eligible.iter().any(|&s| {
        let a = &m.seg(s).alloc;
        let mut h = a.first();
        let mut run = 0;
        loop {
            let v = a.node(h).unwrap();
            let ok = !v.used || (v.tag != NO_TAG && evictable(v.tag));
            run = if ok { run + v.size } else { 0 };
            if run >= need {
                return true;
            }
            match a.next(h) {
                Some(n) => h = n,
                None => return false,
            }
        }
    })
}

#[test]
fn put_never_fails_when_eviction_could_satisfy_it() {
    let mut c = cfg().with_lease_ttl_ms(50);
    c.eviction_high_watermark_ratio = 1.0;
    let mut m = Master::new(c);
    let s = client(&mut m, "h");
    mount(&mut m, s, "a", "h", 32 * KB, 0);
    mount(&mut m, s, "b", "h", 24 * KB, 0);
    let rc = ReplicateConfig::default();
    let mut rng = Rng(7);
    let mut inflight: Vec<String> = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for i in 0..3000u64 {
        let now = i;
        let size = 64 + rng.below(6 * KB as usize) as u64;
        let key = format!("k{i}");
        let could = eviction_could_fit(&m, size, now)
            || m.eligible
                .iter()
                .any(|&s| m.seg(s).alloc.largest_free_extent() >= size);
        let leased_before: Vec<String> = m
            .tenants
            .iter()
            .flat_map(|t| t.index.iter())
            .filter(|&&s| m.slots[s as usize].lease_until > now)
            .map(|&s| m.slots[s as usize].key.to_string())
            .collect();
        let inflight_before = inflight.clone();
        match m.put_start(s, T0, &key, size, &rc, now) {
            Ok(_) => {
                ok += 1;
                if rng.below(10) == 0 {
                    inflight.push(key.clone());
                } else {
                    m.put_end(s, T0, &key, now).unwrap();
                    if rng.below(3) == 0 {
                        m.get_replicas(T0, &key, now).unwrap();
                    }
                }
            }
            Err(e) => {
                assert_eq!(e.code(), -200);
                assert!(
                    !could,
                    "put of {size} refused although eviction could fit it"
                );
                refused += 1;
            }
        }
        for k in leased_before {
            assert!(m.query_key(T0, &k).is_some(), "leased {k} evicted");
        }
        for k in inflight_before {
            assert!(m.query_key(T0, &k).is_some(), "in-flight {k} evicted");
        }
        if inflight.len() > 3 {
            let k = inflight.remove(0);
            m.put_end(s, T0, &k, now).unwrap();
        }
    }
    assert!(ok > 2000 && refused > 0, "ok {ok} refused {refused}");
    assert!(m.stats().evicted_objects > 1000);
    m.check_invariants().unwrap();
}

#[test]
fn futile_eviction_walks_are_remembered() {
    // No quarantine: the revoke below must free its range at once.
    let mut c = cfg().with_lease_ttl_ms(1000).with_inflight_quarantine_ms(0);
    c.eviction_high_watermark_ratio = 0.5;
    let mut m = Master::new(c);
    let s = client(&mut m, "h");
    mount(&mut m, s, "a", "h", 2000 * KB, 0);
    mount(&mut m, s, "b", "h", 2000 * KB, 0);
    let rc = ReplicateConfig::default();
    m.put_start(s, T0, "p", KB, &rc, 0).unwrap(); // in flight: blocks until revoked
    let mut n = 1;
    while m.put_start(s, T0, &format!("k{n}"), KB, &rc, 0).is_ok() {
        m.put_end(s, T0, &format!("k{n}"), 0).unwrap();
        m.get_replicas(T0, &format!("k{n}"), 0).unwrap();
        n += 1;
    }
    assert_eq!(n, 4000, "everything fits, everything leased or in flight");
    m.walk_steps = 0;
    for i in 0..1000 {
        assert_eq!(
            m.put_start(s, T0, &format!("x{i}"), KB, &rc, 1)
                .unwrap_err()
                .code(),
            -200
        );
        m.tick(1);
    }
    // One full walk per segment and pass (2 rotations of ~2000 nodes), then cached: without
    // the cache this is about 1000 × 4 walks.
    assert!(m.walk_steps < 40_000, "{} steps", m.walk_steps);
    // Freeing a range invalidates the cache of that segment.
    m.put_revoke(s, T0, "p", 1).unwrap();
    put(&mut m, s, "x", KB, 2);
    m.get_replicas(T0, "x", 2).unwrap();
    assert_eq!(
        code(m.put_start(s, T0, "y", KB, &rc, 999)),
        StoreErrorCode::NoAvailableHandle
    );
    // Time invalidates it: the leases end.
    put(&mut m, s, "y", KB, 1000);
    m.check_invariants().unwrap();
}

#[test]
fn hard_pin_never_evicted() {
    let mut c = cfg();
    c.default_kv_lease_ttl_ms = 1;
    let (mut m, s) = small_pool(&mut c);
    let pin = ReplicateConfig::default().with_hard_pin(true);
    for i in 0..4 {
        put_cfg(&mut m, s, &format!("pin{i}"), KB, &pin, 0).unwrap();
    }
    for i in 0..200 {
        put(&mut m, s, &format!("k{i}"), KB, 10);
    }
    for i in 0..4 {
        assert!(m.exists(T0, &format!("pin{i}")));
    }
    // 5 KiB would need a pinned range: refused, and nothing evicted in vain.
    let evicted = m.stats().evicted_objects;
    let big = m.put_start(s, T0, "big", 5 * KB, &ReplicateConfig::default(), 10);
    assert_eq!(code(big), StoreErrorCode::NoAvailableHandle);
    assert_eq!(m.stats().objects, 8);
    assert_eq!(m.stats().evicted_objects, evicted);
    // Only remove takes them out.
    m.remove(T0, "pin0", false, 10).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn soft_pin_evicted_only_after_everything_else() {
    let (mut m, s) = small_pool(&mut cfg());
    let soft = ReplicateConfig::default().with_soft_pin(Some(60_000));
    for i in 0..4 {
        put_cfg(&mut m, s, &format!("soft{i}"), KB, &soft, 0).unwrap();
        put(&mut m, s, &format!("k{i}"), KB, 0);
    }
    // Read the plain ones too, so recency alone would favour evicting the soft ones.
    for i in 0..4 {
        m.get_replicas(T0, &format!("k{i}"), 0).unwrap();
    }
    let now = 20_000;
    for i in 0..4 {
        put(&mut m, s, &format!("n{i}"), KB, now);
        for j in 0..4 {
            assert!(
                m.exists(T0, &format!("soft{j}")),
                "soft pin kept while others evictable"
            );
        }
    }
    // Everything evictable now is soft-pinned (n* are leased by reads).
    for i in 0..4 {
        m.get_replicas(T0, &format!("n{i}"), now).unwrap();
    }
    put(&mut m, s, "last", KB, now);
    assert_eq!(
        (0..4).filter(|j| m.exists(T0, &format!("soft{j}"))).count(),
        3,
        "second pass takes one soft-pinned object"
    );
    // Not allowed: refused instead.
    let mut c = cfg().with_soft_pin(30 * 60_000, false);
    let (mut m, s) = small_pool(&mut c);
    for i in 0..8 {
        put_cfg(&mut m, s, &format!("soft{i}"), KB, &soft, 0).unwrap();
    }
    assert_eq!(
        code(m.put_start(s, T0, "x", KB, &ReplicateConfig::default(), 1)),
        StoreErrorCode::NoAvailableHandle
    );
    // Past its deadline a soft pin is no pin.
    put(&mut m, s, "x", KB, 60_001);
    m.check_invariants().unwrap();
}

#[test]
fn groups_are_evicted_together() {
    let (mut m, s) = small_pool(&mut cfg());
    let g = ReplicateConfig::default().with_group("req-1");
    for i in 0..4 {
        put_cfg(&mut m, s, &format!("g{i}"), KB, &g, 0).unwrap();
    }
    for i in 0..4 {
        put(&mut m, s, &format!("k{i}"), KB, 0);
        m.get_replicas(T0, &format!("k{i}"), 0).unwrap(); // referenced: spared once
    }
    assert_eq!(
        m.query_key(T0, "g2").unwrap().group.as_deref(),
        Some("req-1")
    );
    // A leased member protects the whole group.
    m.get_replicas(T0, "g3", 15_000).unwrap();
    put(&mut m, s, "n0", KB, 20_000);
    assert_eq!((0..4).filter(|i| m.exists(T0, &format!("g{i}"))).count(), 4);
    assert!(!m.exists(T0, "k0"), "k0 was the victim");
    // Lease over, everything else leased: the group is the victim, and it goes as a whole.
    let now = 30_000;
    for k in ["k1", "k2", "k3", "n0"] {
        m.get_replicas(T0, k, now).unwrap();
    }
    put(&mut m, s, "n1", KB, now);
    assert_eq!((0..4).filter(|i| m.exists(T0, &format!("g{i}"))).count(), 0);
    assert_eq!(m.stats().objects, 5, "k1..k3, n0, n1");
    m.check_invariants().unwrap();
}

#[test]
fn replicas_on_distinct_segments_best_effort() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    for i in 0..4 {
        mount(&mut m, c, &format!("s{i}"), "h", 1 << 20, 0);
    }
    for i in 0..50 {
        let rc = ReplicateConfig::default().with_replica_num(3);
        let d = put_cfg(&mut m, c, &format!("k{i}"), 1000, &rc, 0).unwrap();
        let segs: HashSet<_> = d.iter().map(|d| d.segment.clone()).collect();
        assert_eq!(segs.len(), 3);
        assert!(d.iter().all(|x| x.epoch == d[0].epoch));
    }
    let rc = ReplicateConfig::default().with_replica_num(6);
    assert_eq!(put_cfg(&mut m, c, "many", 1000, &rc, 0).unwrap().len(), 4);
    m.check_invariants().unwrap();
}

#[test]
fn preferred_segments_then_same_host() {
    let mut m = Master::new(cfg());
    let c1 = client(&mut m, "h1");
    let c2 = client(&mut m, "h2");
    mount(&mut m, c1, "s1", "h1", 1 << 20, 0);
    mount(&mut m, c1, "s2", "h1", 4 * KB, 0);
    mount(&mut m, c2, "s3", "h2", 1 << 20, 0);
    mount(&mut m, c2, "s4", "h2", 1 << 20, 0);
    let mut rc = ReplicateConfig::default().with_preferred_segments(vec!["s2".into(), "s3".into()]);
    rc.preferred_segment = Some("s1".into());
    assert_eq!(rc.preferred().collect::<Vec<_>>(), ["s2", "s3", "s1"]);
    let d = put_cfg(&mut m, c1, "a", 4 * KB, &rc, 0).unwrap();
    assert_eq!(d[0].segment, "s2");
    let d = put_cfg(&mut m, c1, "b", 4 * KB, &rc, 0).unwrap();
    assert_eq!(d[0].segment, "s3", "s2 full: next preferred");
    let rc2 = rc.clone().with_replica_num(3);
    let d = put_cfg(&mut m, c1, "c", 100, &rc2, 0).unwrap();
    assert_eq!(
        d.iter().map(|d| d.segment.as_str()).collect::<Vec<_>>(),
        ["s3", "s1", "s4"]
    );
    let local = ReplicateConfig::default().with_same_node(true);
    for i in 0..30 {
        let d = put_cfg(&mut m, c2, &format!("l{i}"), 100, &local, 0).unwrap();
        assert!(d[0].segment == "s3" || d[0].segment == "s4");
        let d = put_cfg(&mut m, c1, &format!("m{i}"), 100, &local, 0).unwrap();
        assert_eq!(d[0].segment, "s1", "s2 on h1 is full");
    }
}

fn ramp_share_of_new_segment(ramp_up_ms: u64) -> f64 {
    let mut m = Master::new(MasterConfig::default().with_ramp_up_ms(ramp_up_ms));
    let c = client(&mut m, "h");
    for i in 0..4 {
        mount(&mut m, c, &format!("old{i}"), "h", 4 << 20, 0);
    }
    let mut now = 100_000;
    m.heartbeat(c, now).unwrap();
    for i in 0..4000 {
        put(&mut m, c, &format!("fill{i}"), 2 * KB, now);
    }
    mount(&mut m, c, "new", "h", 4 << 20, now);
    let mut on_new = 0;
    let n = 1000;
    for i in 0..n {
        now += 3; // 3 s: the first tenth of a 30 s ramp
        let d = put(&mut m, c, &format!("k{i}"), 2 * KB, now);
        on_new += (d[0].segment == "new") as u32;
    }
    on_new as f64 / n as f64
}

#[test]
fn new_empty_segment_is_ramped_in() {
    let unramped = ramp_share_of_new_segment(0);
    let ramped = ramp_share_of_new_segment(30_000);
    // Unramped p2c picks the emptiest of two samples: the new segment wins whenever sampled,
    // about 1 - (4/5 · 3/4) = 40 % of the writes. Ramped, over the first tenth of the ramp
    // its admission probability averages 5 %, so about 2 %.
    assert!(unramped > 0.3, "unramped share {unramped}");
    assert!(ramped < 0.06, "ramped share {ramped}");
    // After the ramp it takes its full share again.
    let mut m = Master::new(MasterConfig::default());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    for i in 0..100 {
        put(&mut m, c, &format!("a{i}"), 1000, 0);
    }
    mount(&mut m, c, "b", "h", 1 << 20, 100_000);
    let st = m.segments(115_000);
    assert!((st[1].ramp - 0.5).abs() < 1e-9 && st[0].ramp == 1.0);
    let on_b = (0..100)
        .filter(|i| put(&mut m, c, &format!("x{i}"), 100, 130_000)[0].segment == "b")
        .count();
    assert!(on_b > 50, "after ramp: {on_b}");
}

#[test]
fn ramp_never_forces_eviction() {
    let mut m = Master::new(MasterConfig::default());
    let c = client(&mut m, "h");
    mount(&mut m, c, "old", "h", 8 * KB, 0);
    m.heartbeat(c, 50_000).unwrap();
    mount(&mut m, c, "new", "h", 8 * KB, 50_000);
    for i in 0..8 {
        put(&mut m, c, &format!("o{i}"), KB, 50_000);
    }
    // The old segment is full (and below the watermark there is nothing to evict for), the
    // new one still ramping: the put goes to the new segment, nothing is evicted.
    let d = put(&mut m, c, "x", KB, 50_001);
    assert_eq!(m.stats().evicted_objects, 0);
    assert_eq!(d[0].segment, "new");
}

#[test]
fn report_failure_excludes_segment_at_once() {
    let mut m = Master::new(cfg().with_failure_exclusion_ms(5000));
    let a = client(&mut m, "ha");
    let b = client(&mut m, "hb");
    mount(&mut m, a, "sa", "ha", 1 << 20, 0);
    mount(&mut m, b, "sb", "hb", 1 << 20, 0);
    put(&mut m, b, "before", 100, 0);
    m.report_failure("sa", 10).unwrap();
    assert_eq!(
        code(m.report_failure("nope", 10)),
        StoreErrorCode::SegmentNotFound
    );
    for i in 0..50 {
        assert_eq!(put(&mut m, b, &format!("k{i}"), 100, 11)[0].segment, "sb");
    }
    let pref = ReplicateConfig::default().with_preferred_segments(vec!["sa".into()]);
    assert_eq!(
        put_cfg(&mut m, b, "p", 100, &pref, 11).unwrap()[0].segment,
        "sb"
    );
    m.heartbeat(a, 4000).unwrap();
    assert!(m.segments(4000)[0].excluded, "too early");
    m.heartbeat(a, 5010).unwrap();
    assert!(!m.segments(5010)[0].excluded);
    assert_eq!(
        put_cfg(&mut m, b, "p2", 100, &pref, 5011).unwrap()[0].segment,
        "sa"
    );
}

/// Applies journal drains to a node's view: offset → object.
fn apply(view: &mut BTreeMap<u64, HeldObject>, drain: JournalDrain) {
    match drain {
        JournalDrain::Entries(es) => {
            for e in es {
                match e {
                    JournalEntry::Committed(h) => {
                        view.insert(h.offset, h);
                    }
                    JournalEntry::Freed { offset } => {
                        view.remove(&offset);
                    }
                }
            }
        }
        JournalDrain::Resync(all) => {
            view.clear();
            for h in all {
                view.insert(h.offset, h);
            }
        }
    }
}

#[test]
fn master_restart_readoption() {
    let mut m = Master::new(cfg());
    let na = client(&mut m, "ha");
    let nb = client(&mut m, "hb");
    let sa = mount(&mut m, na, "a", "ha", 1 << 20, 0);
    let sb = mount(&mut m, nb, "b", "hb", 1 << 20, 0);
    let (mut view_a, mut view_b) = (BTreeMap::new(), BTreeMap::new());
    let two = ReplicateConfig::default().with_replica_num(2);
    let mut expect = StdMap::new();
    for i in 0..20 {
        let rc = match i % 4 {
            0 => two.clone(),
            1 => ReplicateConfig::default().with_group("g"),
            2 => ReplicateConfig::default().with_hard_pin(true),
            _ => ReplicateConfig::default().with_soft_pin(Some(1_000_000)),
        };
        let d = put_cfg(&mut m, nb, &format!("k{i}"), 1000 + i, &rc, 0).unwrap();
        expect.insert(format!("k{i}"), d);
        if i == 10 {
            apply(&mut view_a, m.drain_journal(sa).unwrap());
            apply(&mut view_b, m.drain_journal(sb).unwrap());
        }
    }
    m.remove(T0, "k3", false, 1).unwrap();
    expect.remove("k3");
    // An upsert in flight when the master dies must not be re-reported as complete.
    m.upsert_start(nb, T0, "k5", 1005, &ReplicateConfig::default(), 1)
        .unwrap();
    expect.remove("k5");
    apply(&mut view_a, m.drain_journal(sa).unwrap());
    apply(&mut view_b, m.drain_journal(sb).unwrap());

    // New master; nodes register and remount with what they hold.
    let mut m2 = Master::new(cfg());
    let na2 = m2.register_client("ha", 0);
    let nb2 = m2.register_client("hb", 0);
    let req = |name: &str, base: u64, view: &BTreeMap<u64, HeldObject>| MountRequest {
        name: name.into(),
        base,
        size: 1 << 20,
        host: "h".into(),
        held: view.values().cloned().collect(),
    };
    // Overlapping held ranges are refused.
    let mut bad = req("a", 0x1000_0000, &view_a);
    let mut dup = bad.held[0].clone();
    dup.offset += 64;
    dup.key = "dup".into();
    bad.held.push(dup);
    assert_eq!(
        code(m2.mount_segment(na2, bad, 0)),
        StoreErrorCode::InvalidParams
    );
    assert!(m2.segments(0).is_empty());
    m2.mount_segment(na2, req("a", 0x1000_0000, &view_a), 0)
        .unwrap();
    m2.mount_segment(nb2, req("b", 0x2000_0000, &view_b), 0)
        .unwrap();
    for (k, d) in &expect {
        let g = m2.get_replicas(T0, k, 1).unwrap();
        let mut got: Vec<(String, u64, u64)> = g
            .replicas
            .iter()
            .map(|r| (r.segment.clone(), r.addr, r.len))
            .collect();
        let mut want: Vec<(String, u64, u64)> = d
            .iter()
            .map(|r| (r.segment.clone(), r.addr, r.len))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{k}");
    }
    assert!(!m2.exists(T0, "k3") && !m2.exists(T0, "k5"));
    let q = m2.query_key(T0, "k1").unwrap();
    assert_eq!(q.group.as_deref(), Some("g"));
    assert!(m2.query_key(T0, "k2").unwrap().hard_pin);
    assert_eq!(
        m2.query_key(T0, "k7").unwrap().soft_pin_deadline_ms,
        Some(1_000_000)
    );
    // New allocations never overlap the re-adopted ranges.
    for i in 0..200 {
        put(&mut m2, na2, &format!("new{i}"), 3000, 2);
    }
    m2.check_invariants().unwrap();
    // The restarted segments are not ramped (they are not empty).
    assert!(m2.segments(2).iter().all(|s| s.ramp == 1.0));
}

#[test]
fn journal_is_bounded_and_resyncs() {
    let mut m = Master::new(cfg().with_journal_max_entries(4));
    let c = client(&mut m, "h");
    let s = mount(&mut m, c, "a", "h", 1 << 20, 0);
    for i in 0..10 {
        put(&mut m, c, &format!("k{i}"), 100, 0);
    }
    let JournalDrain::Resync(all) = m.drain_journal(s).unwrap() else {
        panic!("expected a resync");
    };
    assert_eq!(all.len(), 10);
    put(&mut m, c, "k10", 100, 0);
    m.remove(T0, "k0", false, 0).unwrap();
    let JournalDrain::Entries(es) = m.drain_journal(s).unwrap() else {
        panic!("expected entries");
    };
    assert_eq!(es.len(), 2);
    assert!(matches!(&es[0], JournalEntry::Committed(h) if h.key == "k10"));
    assert!(matches!(es[1], JournalEntry::Freed { offset: 0 }));
    assert_eq!(
        code(m.drain_journal(SegmentId(99))),
        StoreErrorCode::SegmentNotFound
    );
}

#[test]
fn upsert_in_place_and_reallocating() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    let other = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    let rc = ReplicateConfig::default().with_soft_pin(Some(100_000));
    let d0 = m.upsert_start(c, T0, "k", 1000, &rc, 0).unwrap();
    m.put_end(c, T0, "k", 0).unwrap();
    // Same size, not leased: same buffer, new epoch, invisible while writing.
    let preserve = ReplicateConfig::default();
    let d1 = m.upsert_start(c, T0, "k", 1000, &preserve, 10).unwrap();
    assert_eq!(d1[0].addr, d0[0].addr);
    assert!(d1[0].epoch > d0[0].epoch);
    assert!(!m.exists(T0, "k"));
    assert_eq!(
        code(m.upsert_start(other, T0, "k", 1000, &preserve, 11)),
        StoreErrorCode::ObjectReplicaBusy
    );
    m.put_end(c, T0, "k", 20).unwrap();
    let q = m.query_key(T0, "k").unwrap();
    assert_eq!(
        q.soft_pin_deadline_ms,
        Some(100_000 + 10),
        "preserved pin, clock kept"
    );
    // Different size: a new range.
    let d2 = m.upsert_start(c, T0, "k", 5000, &preserve, 30).unwrap();
    m.put_end(c, T0, "k", 30).unwrap();
    assert_eq!(m.get_replicas(T0, "k", 31).unwrap().replicas, d2);
    // Leased: the old range stays with its reader, the new value goes elsewhere.
    let d3 = m.upsert_start(c, T0, "k", 5000, &preserve, 40).unwrap();
    assert_ne!(d3[0].addr, d2[0].addr);
    assert_eq!(m.stats().deferred_frees, 1);
    m.put_revoke(c, T0, "k", 41).unwrap();
    assert!(
        m.query_key(T0, "k").is_none(),
        "a revoked upsert deletes the key"
    );
    m.check_invariants().unwrap();
}

#[test]
fn epochs_are_fresh_per_allocation() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 64, 0);
    let mut seen = HashSet::new();
    let mut addr = None;
    for i in 0..10 {
        let d = put(&mut m, c, "k", 64, i);
        assert!(seen.insert(d[0].epoch));
        assert!(addr.is_none_or(|a| a == d[0].addr), "same range recycled");
        addr = Some(d[0].addr);
        m.remove(T0, "k", false, i).unwrap();
    }
}

#[test]
fn mount_rules() {
    let mut m = Master::new(cfg());
    let a = client(&mut m, "h");
    let b = client(&mut m, "h");
    let s = mount(&mut m, a, "seg", "h", 1 << 20, 0);
    let req = |size| MountRequest {
        name: "seg".into(),
        base: 0x1000_0000,
        size,
        host: "h".into(),
        held: vec![],
    };
    assert_eq!(
        m.mount_segment(a, req(1 << 20), 0).unwrap(),
        s,
        "idempotent"
    );
    assert_eq!(
        code(m.mount_segment(a, req(1 << 21), 0)),
        StoreErrorCode::SegmentAlreadyExists
    );
    assert_eq!(
        code(m.mount_segment(b, req(1 << 20), 0)),
        StoreErrorCode::SegmentAlreadyExists
    );
    assert_eq!(
        code(m.mount_segment(ClientId(99), req(1 << 20), 0)),
        StoreErrorCode::ClientNotFound
    );
    assert_eq!(
        code(m.unmount_segment(b, s, 0)),
        StoreErrorCode::IllegalClient
    );
    put(&mut m, a, "k", 10, 0);
    // Owner disconnected: another client may take the name over (the node restarted).
    m.client_disconnected(a, 1);
    let s2 = m.mount_segment(b, req(1 << 20), 1).unwrap();
    assert_ne!(s2, s);
    assert!(!m.exists(T0, "k"));
    m.unmount_segment(b, s2, 2).unwrap();
    assert_eq!(
        code(m.unmount_segment(b, s2, 2)),
        StoreErrorCode::SegmentNotFound
    );
    m.check_invariants().unwrap();
}

#[test]
fn watermark_pass_in_tick() {
    let mut m = Master::new(cfg().with_eviction(0.9, 0.05));
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 100 * KB, 0);
    let soft = ReplicateConfig::default().with_soft_pin(None);
    for i in 0..95 {
        let rc = if i % 10 == 0 {
            soft.clone()
        } else {
            ReplicateConfig::default()
        };
        put_cfg(&mut m, c, &format!("k{i}"), KB, &rc, 0).unwrap();
    }
    m.get_replicas(T0, "k1", 0).unwrap();
    let r = m.tick(1);
    // 95 % → target 85 %: ten objects go, none soft-pinned, not the leased one.
    assert_eq!(r.evicted_objects, 10);
    assert_eq!(m.stats().used_bytes, 85 * KB);
    assert!(m.exists(T0, "k1"));
    assert!((0..95).step_by(10).all(|i| m.exists(T0, &format!("k{i}"))));
    assert_eq!(m.tick(2).evicted_objects, 0, "below the watermark");
    m.check_invariants().unwrap();
}

#[test]
fn stats_and_introspection() {
    let mut m = Master::new(cfg());
    let c = client(&mut m, "h");
    mount(&mut m, c, "a", "h", 1 << 20, 0);
    put(&mut m, c, "k", 100, 0);
    m.put_start(c, T0, "p", 100, &ReplicateConfig::default(), 0)
        .unwrap();
    m.get_replicas(T0, "k", 0).unwrap();
    let st = m.stats();
    assert_eq!(
        (st.objects, st.inflight_puts, st.clients, st.segments),
        (2, 1, 1, 1)
    );
    assert_eq!(st.used_bytes, 256);
    assert_eq!(st.lease_grants, 1);
    let seg = &m.segments(0)[0];
    assert_eq!((seg.allocations, seg.inflight, seg.used), (2, 1, 256));
    assert_eq!(m.query_key(T0, "p").unwrap().writer, Some(c));
    assert_eq!(m.query_key(T0, "k").unwrap().lease_until_ms, 10_000);
}

#[test]
fn master_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Master>();
    check::<StoreError>();
}

#[test]
fn error_codes_and_conversions() {
    use crate::types::StoreErrorCode as C;
    let table = [
        (C::InternalError, -1),
        (C::BufferOverflow, -10),
        (C::SegmentNotFound, -101),
        (C::SegmentAlreadyExists, -102),
        (C::ClientNotFound, -103),
        (C::NoAvailableHandle, -200),
        (C::InvalidKey, -400),
        (C::WriteFail, -500),
        (C::InvalidParams, -600),
        (C::IllegalClient, -601),
        (C::InvalidReplica, -702),
        (C::ReplicaIsNotReady, -703),
        (C::ObjectNotFound, -704),
        (C::ObjectAlreadyExists, -705),
        (C::ObjectHasLease, -706),
        (C::LeaseExpired, -707),
        (C::ObjectReplicaBusy, -714),
        (C::TransferFail, -800),
        (C::RpcFail, -900),
        (C::RpcTimeout, -901),
        (C::UnavailableInCurrentStatus, -1010),
        (C::NotSupported, -1012),
    ];
    assert_eq!(C::ALL.len(), table.len());
    for (c, n) in table {
        assert_eq!(c.code(), n);
        assert_eq!(C::from_code(n), Some(c));
    }
    let e = StoreError::new(C::ObjectHasLease, "k is leased");
    assert_eq!(e.to_string(), "OBJECT_HAS_LEASE(-706): k is leased");
    assert_eq!(e.code(), -706);
    let core: mooncake_core::Error = e.into();
    assert_eq!(core.kind(), mooncake_core::ErrorKind::Busy);
    assert_eq!(
        core.to_string(),
        "busy: k is leased (code=OBJECT_HAS_LEASE(-706))"
    );
    let core: mooncake_core::Error = StoreError::from(C::NoAvailableHandle).into();
    assert!(core.is_temporary());
}

// ---------------------------------------------------------------------------------------------
// State-machine proptest.

#[derive(Debug, Clone)]
enum Op {
    Register,
    Mount {
        c: usize,
        kb: u64,
    },
    Unmount {
        c: usize,
        i: usize,
    },
    PutStart {
        c: usize,
        t: bool,
        k: u8,
        size: u64,
        n: u32,
        group: Option<u8>,
        hard: bool,
        soft: bool,
        end: bool,
    },
    PutEnd {
        c: usize,
        t: bool,
        k: u8,
    },
    PutRevoke {
        c: usize,
        t: bool,
        k: u8,
    },
    Upsert {
        c: usize,
        t: bool,
        k: u8,
        size: u64,
    },
    Get {
        t: bool,
        k: u8,
    },
    Exists {
        t: bool,
        k: u8,
    },
    Remove {
        t: bool,
        k: u8,
        force: bool,
    },
    RemoveAll {
        t: bool,
        force: bool,
    },
    Disconnect {
        c: usize,
    },
    Heartbeat {
        c: usize,
    },
    ReportFailure {
        i: usize,
    },
    Advance {
        ms: u64,
    },
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0usize..4;
    let k = 0u8..12;
    prop_oneof![
        1 => Just(Op::Register),
        2 => (c.clone(), 4u64..24).prop_map(|(c, kb)| Op::Mount { c, kb }),
        1 => (c.clone(), any::<usize>()).prop_map(|(c, i)| Op::Unmount { c, i }),
        12 => (c.clone(), any::<bool>(), k.clone(), 1u64..6000, 1u32..4, proptest::option::weighted(0.2, 0u8..3), proptest::bool::weighted(0.1), proptest::bool::weighted(0.2), proptest::bool::weighted(0.7))
            .prop_map(|(c, t, k, size, n, group, hard, soft, end)| Op::PutStart { c, t, k, size, n, group, hard, soft, end }),
        10 => (c.clone(), any::<bool>(), k.clone()).prop_map(|(c, t, k)| Op::PutEnd { c, t, k }),
        1 => (c.clone(), any::<bool>(), k.clone()).prop_map(|(c, t, k)| Op::PutRevoke { c, t, k }),
        2 => (c.clone(), any::<bool>(), k.clone(), 1u64..6000).prop_map(|(c, t, k, size)| Op::Upsert { c, t, k, size }),
        8 => (any::<bool>(), k.clone()).prop_map(|(t, k)| Op::Get { t, k }),
        2 => (any::<bool>(), k.clone()).prop_map(|(t, k)| Op::Exists { t, k }),
        2 => (any::<bool>(), k.clone(), proptest::bool::weighted(0.3)).prop_map(|(t, k, force)| Op::Remove { t, k, force }),
        1 => (any::<bool>(), proptest::bool::weighted(0.3)).prop_map(|(t, force)| Op::RemoveAll { t, force }),
        1 => c.clone().prop_map(|c| Op::Disconnect { c }),
        5 => c.clone().prop_map(|c| Op::Heartbeat { c }),
        1 => any::<usize>().prop_map(|i| Op::ReportFailure { i }),
        4 => (1u64..4000).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::Tick),
    ]
}

fn tenant(t: bool) -> &'static str {
    if t { "t1" } else { T0 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn prop_master_state_machine(ops in prop::collection::vec(op(), 1..150)) {
        let mut m = Master::new(
            MasterConfig::default()
                .with_lease_ttl_ms(3000)
                .with_client_live_ttl_ms(8000)
                .with_put_start_discard_timeout_ms(6000)
                .with_ramp_up_ms(5000)
                .with_failure_exclusion_ms(2000)
                .with_eviction(0.8, 0.1)
                .with_journal_max_entries(16),
        );
        let mut now = 0u64;
        let mut clients: Vec<ClientId> = vec![m.register_client("h0", 0), m.register_client("h1", 0)];
        let mut mounted: Vec<(ClientId, SegmentId)> = Vec::new();
        let mut next_seg = 0;
        // Keys with a lease we granted, and until when.
        let mut leases: StdMap<(bool, u8), u64> = StdMap::new();
        for op in ops {
            let cl = |c: usize| clients[c % clients.len()];
            let key = |k: u8| format!("key-{k}");
            let mut may_remove_leased = false;
            match op {
                Op::Register => {
                    if clients.len() < 4 {
                        clients.push(m.register_client(&format!("h{}", clients.len()), now));
                    }
                }
                Op::Mount { c, kb } => {
                    let c = cl(c);
                    next_seg += 1;
                    let r = m.mount_segment(c, MountRequest {
                        name: format!("seg{next_seg}"),
                        base: next_seg << 32,
                        size: kb * KB,
                        host: format!("h{}", c.0 % 2),
                        held: vec![],
                    }, now);
                    if let Ok(id) = r { mounted.push((c, id)); }
                }
                Op::Unmount { c, i } => {
                    if !mounted.is_empty() {
                        let (owner, id) = mounted[i % mounted.len()];
                        let c = cl(c);
                        if m.unmount_segment(c, id, now).is_ok() {
                            prop_assert_eq!(owner, c);
                            may_remove_leased = true;
                        }
                    }
                }
                Op::PutStart { c, t, k, size, n, group, hard, soft, end } => {
                    let mut rc = ReplicateConfig::default().with_replica_num(n).with_hard_pin(hard);
                    if soft { rc = rc.with_soft_pin(Some(5000)); }
                    if let Some(g) = group { rc = rc.with_group(format!("g{g}")); }
                    let before = m.query_key(tenant(t), &key(k));
                    let could = eviction_could_fit(&m, size, now);
                    match m.put_start(cl(c), tenant(t), &key(k), size, &rc, now) {
                        Ok(d) => {
                            prop_assert!(!d.is_empty() && d.len() <= n as usize);
                            let segs: HashSet<_> = d.iter().map(|d| &d.segment).collect();
                            prop_assert_eq!(segs.len(), d.len());
                            if let Some(b) = before {
                                prop_assert_eq!(b.state, ObjectState::Processing, "complete key overwritten");
                            }
                            if end {
                                m.check_invariants().map_err(TestCaseError::fail)?;
                                m.put_end(cl(c), tenant(t), &key(k), now).unwrap();
                            }
                        }
                        Err(e) => {
                            if e.error_code() == StoreErrorCode::ObjectAlreadyExists {
                                prop_assert!(before.is_some());
                            }
                            if e.error_code() == StoreErrorCode::NoAvailableHandle {
                                prop_assert!(!could, "put of {} refused although eviction could fit it", size);
                            }
                        }
                    }
                }
                Op::PutEnd { c, t, k } => {
                    let before = m.query_key(tenant(t), &key(k));
                    let r = m.put_end(cl(c), tenant(t), &key(k), now);
                    if let (Ok(()), Some(b)) = (&r, &before)
                        && b.state == ObjectState::Processing
                    {
                        prop_assert_eq!(b.writer, Some(cl(c)), "put_end by a non-writer");
                    }
                }
                Op::PutRevoke { c, t, k } => { let _ = m.put_revoke(cl(c), tenant(t), &key(k), now); }
                Op::Upsert { c, t, k, size } => {
                    if m.upsert_start(cl(c), tenant(t), &key(k), size, &ReplicateConfig::default(), now).is_ok() {
                        leases.remove(&(t, k));
                    } else if m.query_key(tenant(t), &key(k)).is_none() {
                        leases.remove(&(t, k)); // the old value was replaced and the new one did not fit
                    }
                }
                Op::Get { t, k } => {
                    if let Ok(g) = m.get_replicas(tenant(t), &key(k), now) {
                        prop_assert!(!g.replicas.is_empty());
                        leases.insert((t, k), now + g.lease_ttl_ms);
                    }
                }
                Op::Exists { t, k } => {
                    let before = m.query_key(tenant(t), &key(k)).map(|q| q.lease_until_ms);
                    let e = m.exists(tenant(t), &key(k));
                    prop_assert_eq!(m.query_key(tenant(t), &key(k)).map(|q| q.lease_until_ms), before);
                    prop_assert_eq!(e, m.query_key(tenant(t), &key(k)).is_some_and(|q| q.state == ObjectState::Complete));
                }
                Op::Remove { t, k, force } => {
                    let r = m.remove(tenant(t), &key(k), force, now);
                    if !force && leases.get(&(t, k)).is_some_and(|&u| u > now) {
                        prop_assert_eq!(r.unwrap_err().code(), -706);
                    }
                    if force { leases.remove(&(t, k)); }
                }
                Op::RemoveAll { t, force } => {
                    m.remove_all(tenant(t), force, now);
                    may_remove_leased |= force;
                }
                Op::Disconnect { c } => { m.client_disconnected(cl(c), now); }
                Op::Heartbeat { c } => {
                    if m.heartbeat(cl(c), now).unwrap().status == ClientStatus::NeedRemount {
                        // Expired: its segments are gone.
                        let c = cl(c);
                        mounted.retain(|&(o, _)| o != c);
                    }
                }
                Op::ReportFailure { i } => {
                    if !mounted.is_empty() {
                        let name = m.segments(now).get(i % mounted.len()).map(|s| s.name.clone());
                        if let Some(name) = name { m.report_failure(&name, now).unwrap(); }
                    }
                }
                Op::Advance { ms } => now += ms,
                Op::Tick => {
                    let r = m.tick(now);
                    may_remove_leased |= !r.dropped_segments.is_empty();
                    for c in &r.expired_clients {
                        mounted.retain(|&(o, _)| o != *c);
                    }
                }
            }
            if let Err(e) = m.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
            if may_remove_leased {
                leases.clear();
            }
            leases.retain(|_, &mut u| u > now);
            for &(t, k) in leases.keys() {
                prop_assert!(m.exists(tenant(t), &key(k)), "leased key-{} vanished", k);
            }
        }
    }
}
