//! Eviction: a CLOCK per segment in address order, from the allocator's cursor.
//!
//! # Who may be evicted
//!
//! A COMPLETE object whose read lease has ended and that is not hard-pinned; a soft-pinned one
//! (pin not yet expired) only in the last pass, and only if `allow_evict_soft_pinned`. An object
//! read since the hand last passed it (reference bit) gets a second chance: the hand clears the
//! bit and moves on. A group is one unit: evictable only if every member is, spared if any
//! member was read, and evicted all at once (Mooncake #2127: half a prefix is useless).
//!
//! # Two uses
//!
//! - **For a put** ([`Master::alloc_evicting`]): walk from the cursor looking for the first run
//!   of physically adjacent nodes, each free or evictable, that together reach the size needed;
//!   evict exactly the objects of that run and allocate at its start. Nothing is evicted unless
//!   the run is complete, so a segment where everything is leased loses nothing, and the
//!   evicted bytes are about the size asked for. At most two rotations (so every reference bit
//!   is cleared once), then again with soft pins allowed.
//! - **Watermark pass** ([`Master::watermark_pass`], from `tick` and after a failed
//!   allocation): when pool usage exceeds `eviction_high_watermark_ratio`, free
//!   `max(eviction_ratio, usage - watermark + eviction_ratio)` of the pool (the reference's
//!   step): each segment sweeps down to the target ratio, fullest first, then any segment
//!   sweeps until the pool target is met; soft-pinned objects only if that was not enough.
//!
//! # Negative cache
//!
//! When everything is leased, pinned or in flight, a walk finds nothing after visiting every
//! node. So that a storm of puts (or a 10 ms tick) against such a pool does not cost O(objects)
//! each, a futile walk is remembered per segment and pass together with the segment's
//! `evict_version` (bumped when a range is freed or an object there completes), the global
//! `group_version` (group membership or a member's completion) and the earliest time one of
//! the blockers it met unblocks (lease end, soft pin deadline). Until one of those changes the
//! walk is skipped; the watermark pass keeps the same kind of record.

use hashbrown::HashMap;

use super::placement::Placed;
use super::{F_GROUP, F_HARD, F_REF, F_SOFT, Futile, Master, ST_COMPLETE, ST_FREE};
use crate::alloc::NO_TAG;

/// What the hand does with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Evict it.
    Evict,
    /// Referenced since the hand last passed: bit cleared, evictable next time round.
    Spared,
    /// Not evictable before this time (`u64::MAX`: not before some state change).
    Blocked(u64),
}

/// `(group, rotation)` → verdict, so a large group is judged once per rotation of a walk.
type GroupCache = HashMap<(u32, u32), Verdict>;

impl Master {
    pub(super) fn over_watermark(&self) -> bool {
        let (used, cap) = self.pool_usage();
        cap > 0 && used as f64 > self.cfg.eviction_high_watermark_ratio * cap as f64
    }

    /// Evictable by state, lease and pins (not looking at the reference bit or the group).
    pub(super) fn object_evictable(&self, s: u32, now_ms: u64, allow_soft: bool) -> bool {
        self.blocked_until(s, now_ms, allow_soft).is_none()
    }

    /// `None` if `s` is evictable by state, lease and pins; otherwise until when it is not
    /// (`u64::MAX`: until a state change, which bumps a version).
    fn blocked_until(&self, s: u32, now_ms: u64, allow_soft: bool) -> Option<u64> {
        let sl = &self.slots[s as usize];
        if sl.state() != ST_COMPLETE || sl.flags & F_HARD != 0 {
            return Some(u64::MAX);
        }
        let mut until = 0;
        if sl.lease_until > now_ms {
            until = sl.lease_until;
        }
        if !allow_soft
            && sl.flags & F_SOFT != 0
            && let Some(&deadline) = self.soft.get(&s)
            && deadline > now_ms
        {
            until = until.max(deadline);
        }
        (until > 0).then_some(until)
    }

    /// The hand is at object `s`: may it be evicted in this pass? Clears reference bits (second
    /// chance).
    fn victim_check(
        &mut self,
        s: u32,
        now_ms: u64,
        allow_soft: bool,
        rotation: u32,
        cache: &mut GroupCache,
    ) -> Verdict {
        if self.slots[s as usize].flags & F_GROUP == 0 {
            if let Some(until) = self.blocked_until(s, now_ms, allow_soft) {
                return Verdict::Blocked(until);
            }
            let sl = &mut self.slots[s as usize];
            if sl.flags & F_REF != 0 {
                sl.flags &= !F_REF;
                return Verdict::Spared;
            }
            return Verdict::Evict;
        }
        let g = self.slot_group[&s];
        if let Some(&verdict) = cache.get(&(g, rotation)) {
            return verdict;
        }
        let group = self.groups[g as usize].as_ref().expect("live group");
        let mut blocked: Option<u64> = None;
        let mut referenced = false;
        for &m in &group.members {
            if let Some(t) = self.blocked_until(m, now_ms, allow_soft) {
                blocked = Some(blocked.map_or(t, |b| b.max(t)));
            }
            referenced |= self.slots[m as usize].flags & F_REF != 0;
        }
        let verdict = match blocked {
            Some(until) => Verdict::Blocked(until),
            None if referenced => {
                for i in 0..group.members.len() {
                    let m = self.groups[g as usize]
                        .as_ref()
                        .expect("live group")
                        .members[i];
                    self.slots[m as usize].flags &= !F_REF;
                }
                Verdict::Spared
            }
            None => Verdict::Evict,
        };
        cache.insert((g, rotation), verdict);
        verdict
    }

    /// Evicts object `s`, or its whole group. Returns (objects, bytes).
    fn evict_victim(&mut self, s: u32, now_ms: u64) -> (u64, u64) {
        if self.slots[s as usize].state() == ST_FREE {
            return (0, 0); // went with a group member evicted earlier
        }
        if self.slots[s as usize].flags & F_GROUP == 0 {
            return (1, self.evict_one(s, now_ms));
        }
        let g = self.slot_group[&s];
        let group = self.groups[g as usize].take().expect("live group");
        self.group_version += 1;
        self.tenants[group.tenant as usize]
            .groups
            .remove(&*group.name);
        self.free_groups.push(g);
        let mut bytes = 0;
        for &m in &group.members {
            self.slot_group.remove(&m);
            self.slots[m as usize].flags &= !F_GROUP;
        }
        for &m in &group.members {
            bytes += self.evict_one(m, now_ms);
        }
        (group.members.len() as u64, bytes)
    }

    fn evict_one(&mut self, s: u32, now_ms: u64) -> u64 {
        debug_assert!(
            self.object_evictable(s, now_ms, self.cfg.allow_evict_soft_pinned),
            "evicting a leased, in-flight or pinned object"
        );
        let bytes = self.slots[s as usize].size * self.replicas(s).count() as u64;
        self.delete_object(s, now_ms, 0);
        self.counters.evicted_objects += 1;
        self.counters.evicted_bytes += bytes;
        bytes
    }

    /// Makes room for `size` bytes on segment `s` by evicting the first run of adjacent
    /// evictable objects (and free ranges) large enough, then allocates there.
    pub(super) fn alloc_evicting(&mut self, s: u32, size: u64, now_ms: u64) -> Option<Placed> {
        let align = self.cfg.alloc_align;
        let need = size.div_ceil(align).max(1) * align;
        let passes: &[bool] = if self.cfg.allow_evict_soft_pinned {
            &[false, true]
        } else {
            &[false]
        };
        for &allow_soft in passes {
            let Some(start) = self.evict_window(s, need, now_ms, allow_soft) else {
                continue;
            };
            let alloc = &mut self.seg_mut(s).alloc;
            let a = alloc
                .allocate_in(start, size)
                .or_else(|| alloc.allocate(size));
            if let Some(a) = a {
                let next = alloc.next(a.handle).unwrap_or(alloc.first());
                alloc.set_cursor(next);
                return Some(Placed {
                    seg: s,
                    handle: a.handle,
                    offset: a.offset,
                });
            }
        }
        None
    }

    /// Finds the first run of adjacent nodes from the cursor, each free or evictable, of at
    /// least `need` bytes, evicts its objects, and returns the run's first node (now the start
    /// of one free range). `None` (and nothing evicted) after two rotations without one; that
    /// outcome is remembered until something on the segment (or a group) changes or the first
    /// blocking lease or soft pin ends.
    fn evict_window(&mut self, s: u32, need: u64, now_ms: u64, allow_soft: bool) -> Option<u32> {
        let pass = allow_soft as usize;
        let versions = (self.seg(s).evict_version, self.group_version);
        if let Some(f) = self.seg(s).futile[pass]
            && (f.seg_version, f.group_version) == versions
            && now_ms < f.until_ms
            && need >= f.need
        {
            return None;
        }
        let (mut h, first, limit) = {
            let a = &self.seg(s).alloc;
            (
                a.cursor(),
                a.first(),
                4 * (a.live_allocations() as usize + 1) + 2,
            )
        };
        let mut cache = GroupCache::new();
        let mut rotation = 0;
        let mut run: Option<(u32, u64)> = None;
        let mut victims = Vec::new();
        let mut found = false;
        let mut unblock = u64::MAX;
        for _ in 0..limit {
            #[cfg(test)]
            {
                self.walk_steps += 1;
            }
            let view = self.seg(s).alloc.node(h).expect("walk stays on live nodes");
            let verdict = if !view.used {
                Verdict::Evict
            } else if view.tag == NO_TAG {
                Verdict::Blocked(u64::MAX) // deferred range: freed later with a bump
            } else {
                self.victim_check(view.tag, now_ms, allow_soft, rotation, &mut cache)
            };
            match verdict {
                Verdict::Evict => {
                    let r = run.get_or_insert((h, 0));
                    r.1 += view.size;
                    if view.used {
                        victims.push(view.tag);
                    }
                    if r.1 >= need {
                        found = true;
                        break;
                    }
                }
                Verdict::Spared | Verdict::Blocked(_) => {
                    if let Verdict::Blocked(t) = verdict {
                        unblock = unblock.min(t);
                    }
                    run = None;
                    victims.clear();
                }
            }
            match self.seg(s).alloc.next(h) {
                Some(n) => h = n,
                None => {
                    h = first;
                    rotation += 1;
                    run = None;
                    victims.clear();
                }
            }
        }
        if !found {
            self.seg_mut(s).futile[pass] = Some(Futile {
                seg_version: versions.0,
                group_version: versions.1,
                until_ms: unblock,
                need,
            });
            return None;
        }
        for v in victims {
            self.evict_victim(v, now_ms);
        }
        run.map(|(start, _)| start)
    }

    /// Sweeps segment `s` from its cursor, evicting objects one by one until `target` bytes of
    /// this segment are free or two rotations passed. Returns the bytes freed here and the
    /// earliest time a blocked object unblocks.
    fn sweep(&mut self, s: u32, target: u64, now_ms: u64, allow_soft: bool) -> (u64, u64) {
        let (mut h, first, limit, used0) = {
            let a = &self.seg(s).alloc;
            (
                a.cursor(),
                a.first(),
                4 * (a.live_allocations() as usize + 1) + 2,
                a.used_bytes(),
            )
        };
        let mut cache = GroupCache::new();
        let mut rotation = 0;
        let mut unblock = u64::MAX;
        for _ in 0..limit {
            if used0 - self.seg(s).alloc.used_bytes() >= target {
                break;
            }
            #[cfg(test)]
            {
                self.walk_steps += 1;
            }
            let view = self
                .seg(s)
                .alloc
                .node(h)
                .expect("sweep stays on live nodes");
            if view.used {
                let verdict = if view.tag == NO_TAG {
                    Verdict::Blocked(u64::MAX)
                } else {
                    self.victim_check(view.tag, now_ms, allow_soft, rotation, &mut cache)
                };
                match verdict {
                    Verdict::Evict => {
                        self.seg_mut(s).alloc.set_cursor(h);
                        self.evict_victim(view.tag, now_ms);
                        // The cursor followed the range into whatever node absorbed it.
                        h = self.seg(s).alloc.cursor();
                    }
                    Verdict::Blocked(t) => unblock = unblock.min(t),
                    Verdict::Spared => {}
                }
            }
            match self.seg(s).alloc.next(h) {
                Some(n) => h = n,
                None => {
                    h = first;
                    rotation += 1;
                }
            }
        }
        self.seg_mut(s).alloc.set_cursor(h);
        (used0 - self.seg(s).alloc.used_bytes(), unblock)
    }

    /// The watermark pass. Returns (objects, bytes) evicted.
    pub(super) fn watermark_pass(&mut self, now_ms: u64) -> (u64, u64) {
        let (used, cap) = self.pool_usage();
        if cap == 0 {
            return (0, 0);
        }
        let hw = self.cfg.eviction_high_watermark_ratio;
        let usage = used as f64 / cap as f64;
        if usage <= hw {
            return (0, 0);
        }
        if let Some((v, gv, until)) = self.watermark_futile
            && v == self.evict_version
            && gv == self.group_version
            && now_ms < until
        {
            return (0, 0);
        }
        let (objects0, bytes0) = (self.counters.evicted_objects, self.counters.evicted_bytes);
        let frac = self
            .cfg
            .eviction_ratio
            .max(usage - hw + self.cfg.eviction_ratio)
            .min(1.0);
        let target_ratio = (usage - frac).max(0.0);
        // Rounded, so float noise in the ratios does not cost one more object.
        let target_used = (target_ratio * cap as f64).round() as u64;
        let mut order: Vec<(u32, f64)> = self
            .segments
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_deref()?;
                Some((
                    i as u32,
                    s.alloc.used_bytes() as f64 / s.alloc.capacity() as f64,
                ))
            })
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let passes: &[bool] = if self.cfg.allow_evict_soft_pinned {
            &[false, true]
        } else {
            &[false]
        };
        let mut unblock = u64::MAX;
        for &allow_soft in passes {
            for &(s, _) in &order {
                let a = &self.seg(s).alloc;
                let seg_target = (target_ratio * a.capacity() as f64).round() as u64;
                if a.used_bytes() > seg_target {
                    let excess = a.used_bytes() - seg_target;
                    self.sweep(s, excess, now_ms, allow_soft);
                }
            }
            // Whatever is still missing comes from any segment; the blockers seen here (every
            // sweep of this loop runs its full two rotations unless the target is met) bound
            // when another pass could do better.
            unblock = u64::MAX;
            for &(s, _) in &order {
                let pool_used = self.pool_usage().0;
                if pool_used <= target_used {
                    break;
                }
                let (_, t) = self.sweep(s, pool_used - target_used, now_ms, allow_soft);
                unblock = unblock.min(t);
            }
            if self.pool_usage().0 <= target_used {
                break;
            }
        }
        self.watermark_futile = (self.pool_usage().0 > target_used).then_some((
            self.evict_version,
            self.group_version,
            unblock,
        ));
        (
            self.counters.evicted_objects - objects0,
            self.counters.evicted_bytes - bytes0,
        )
    }
}
