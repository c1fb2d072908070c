//! Placement: preferred segments, same host, then capacity-aware power-of-two choices with a
//! ramp for segments that joined empty; eviction only when nothing fits anywhere.
//!
//! # Power of two choices
//!
//! Two distinct eligible segments are sampled; the one with the higher
//! `free_bytes / (1 + inflight)` wins (free space, discounted by the allocations being written
//! there right now, a proxy for the node's current write load). Sampling two instead of taking
//! the global best keeps a segment that looks best from receiving every write.
//!
//! # Ramp-in
//!
//! A segment mounted empty has the most free space and would win every comparison it takes part
//! in: with p2c it is sampled in about `2/n` of the puts and wins them all, and with few segments
//! (or the reference's `free_ratio_first`) that is nearly every write (Mooncake #3688: a restarted
//! node receives all writes and times out). During its first `ramp_up_ms`, a sampled ramping
//! segment is *admitted* as a candidate only with probability
//!
//! ```text
//! share(t) = (t - mounted_at) / ramp_up_ms        (clamped to [0, 1])
//! ```
//!
//! and otherwise another segment is sampled. Its share of writes therefore grows linearly from 0
//! to the unramped p2c share (≈ 2/n while it is emptier than the rest, which still refills it
//! about twice as fast as a fair share) over `ramp_up_ms`: it warms up (connections, page
//! faults, NIC queues) under a load that grows with time instead of a step. The ramp is ignored
//! when every eligible segment is ramping (a fresh cluster, or a master restart where all
//! segments remount together), and it never causes an eviction: if no other segment can take
//! the object, the fallback scan uses a ramping segment before any eviction is tried.

use super::{Master, ReplicateConfig};

/// A replica placed by [`Master::place`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Placed {
    pub(super) seg: u32,
    pub(super) handle: u32,
    pub(super) offset: u64,
}

impl Master {
    /// Allocates up to `cfg.replica_num` replicas of `size` bytes on distinct segments; empty
    /// when not even one fits after eviction.
    pub(super) fn place(
        &mut self,
        writer: u64,
        cfg: &ReplicateConfig,
        size: u64,
        now_ms: u64,
    ) -> Vec<Placed> {
        if now_ms >= self.next_ramp_end_ms {
            self.refresh_eligible(now_ms);
        }
        let mut chosen = Vec::with_capacity(cfg.replica_num as usize);
        self.place_free(writer, cfg, size, now_ms, &mut chosen);
        if chosen.is_empty() {
            // The allocation failed: run the watermark pass if it is due, then evict for this
            // put on one segment. Only the first replica evicts; the others are best effort.
            if self.over_watermark() {
                self.watermark_pass(now_ms);
                self.place_free(writer, cfg, size, now_ms, &mut chosen);
            }
            if chosen.is_empty()
                && let Some(p) = self.place_evicting(writer, cfg, size, now_ms)
            {
                chosen.push(p);
                self.place_free(writer, cfg, size, now_ms, &mut chosen);
            }
        }
        chosen
    }

    /// Placement without eviction, filling `chosen` up to `replica_num`.
    fn place_free(
        &mut self,
        writer: u64,
        cfg: &ReplicateConfig,
        size: u64,
        now_ms: u64,
        chosen: &mut Vec<Placed>,
    ) {
        let want = cfg.replica_num as usize;
        for name in cfg.preferred() {
            if chosen.len() >= want {
                return;
            }
            let Some(&s) = self.seg_by_name.get(name) else {
                continue;
            };
            if self.seg(s).eligible()
                && !chosen.iter().any(|p| p.seg == s)
                && let Some(p) = self.try_alloc(s, size)
            {
                chosen.push(p);
            }
        }
        if chosen.len() >= want {
            return;
        }
        let pool = std::mem::take(&mut self.eligible);
        let ramp_active = self.eligible_ramping > 0 && self.eligible_ramping < pool.len();
        if cfg.prefer_alloc_in_same_node
            && chosen.is_empty()
            && let Some(host) = self.clients.get(&writer).map(|c| c.host.clone())
        {
            let local: Vec<u32> = pool
                .iter()
                .copied()
                .filter(|&s| *self.seg(s).host == *host)
                .collect();
            self.fill(&local, size, now_ms, chosen, 1, ramp_active);
        }
        self.fill(&pool, size, now_ms, chosen, want, ramp_active);
        self.eligible = pool;
    }

    fn fill(
        &mut self,
        pool: &[u32],
        size: u64,
        now_ms: u64,
        chosen: &mut Vec<Placed>,
        want: usize,
        ramp_active: bool,
    ) {
        while chosen.len() < want {
            let placed = self
                .p2c(pool, chosen, size, now_ms, ramp_active)
                .and_then(|s| self.try_alloc(s, size))
                .or_else(|| self.scan_alloc(pool, chosen, size));
            match placed {
                Some(p) => chosen.push(p),
                None => break,
            }
        }
    }

    /// Power of two choices among `pool` minus `chosen`, with the ramp applied.
    fn p2c(
        &mut self,
        pool: &[u32],
        chosen: &[Placed],
        size: u64,
        now_ms: u64,
        ramp_active: bool,
    ) -> Option<u32> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let ramp_ms = self.cfg.ramp_up_ms;
        let mut best: Option<(u32, f64)> = None;
        let mut found = 0;
        for _ in 0..8 {
            let s = pool[self.rng.below(n)];
            if best.is_some_and(|(b, _)| b == s) || chosen.iter().any(|p| p.seg == s) {
                continue;
            }
            let seg = self.segments[s as usize]
                .as_deref()
                .expect("eligible segment");
            let free = seg.alloc.free_bytes();
            if free < size {
                continue;
            }
            if ramp_active && seg.ramp_end_ms > now_ms {
                let share = seg.ramp_share(now_ms, ramp_ms);
                if self.rng.unit() >= share {
                    continue;
                }
            }
            let score = free as f64 / (1.0 + seg.inflight as f64);
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((s, score));
            }
            found += 1;
            if found == 2 {
                break;
            }
        }
        best.map(|(s, _)| s)
    }

    /// Every segment of `pool` from a random start, first fit; no ramp, no eviction.
    fn scan_alloc(&mut self, pool: &[u32], chosen: &[Placed], size: u64) -> Option<Placed> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let start = self.rng.below(n);
        for i in 0..n {
            let s = pool[(start + i) % n];
            if chosen.iter().any(|p| p.seg == s) || self.seg(s).alloc.free_bytes() < size {
                continue;
            }
            if let Some(p) = self.try_alloc(s, size) {
                return Some(p);
            }
        }
        None
    }

    pub(super) fn try_alloc(&mut self, s: u32, size: u64) -> Option<Placed> {
        let a = self.seg_mut(s).alloc.allocate(size)?;
        Some(Placed {
            seg: s,
            handle: a.handle,
            offset: a.offset,
        })
    }

    /// Evicts on one segment to fit the first replica: preferred segments first, then the
    /// writer's host (if asked), then every eligible segment from a random start.
    fn place_evicting(
        &mut self,
        writer: u64,
        cfg: &ReplicateConfig,
        size: u64,
        now_ms: u64,
    ) -> Option<Placed> {
        let mut seen = vec![false; self.segments.len()];
        let mut order = Vec::with_capacity(self.eligible.len());
        let mut push = |s: u32, order: &mut Vec<u32>| {
            if !seen[s as usize] {
                seen[s as usize] = true;
                order.push(s);
            }
        };
        for name in cfg.preferred() {
            if let Some(&s) = self.seg_by_name.get(name)
                && self.seg(s).eligible()
            {
                push(s, &mut order);
            }
        }
        if cfg.prefer_alloc_in_same_node
            && let Some(c) = self.clients.get(&writer)
        {
            for &s in &self.eligible {
                if *self.seg(s).host == *c.host {
                    push(s, &mut order);
                }
            }
        }
        let n = self.eligible.len();
        if n > 0 {
            let start = self.rng.below(n);
            for i in 0..n {
                push(self.eligible[(start + i) % n], &mut order);
            }
        }
        for s in order {
            if self.seg(s).alloc.capacity() < size {
                continue;
            }
            if let Some(p) = self.alloc_evicting(s, size, now_ms) {
                return Some(p);
            }
        }
        None
    }
}
