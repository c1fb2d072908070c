//! The global prefix index of the Conductor: block hash → set of prefill instances holding it,
//! and the expected view booked at decision time (Algorithm 1 step 8).
//!
//! # Memory
//!
//! An online Conductor indexes every block of every instance (10⁷ and more), so the table is
//! kept compact: each entry is 12 bytes (the 64-bit block hash as two `u32` halves and a `u32`
//! id of its holder set) in a [`hashbrown::HashTable`], plus one control byte per bucket.
//! Holder sets (`u128` bitsets) are interned: a cluster has few distinct sets of holders
//! (mostly single instances, plus the sets hot blocks are replicated on), each stored once
//! with a reference count. 10⁷ blocks take ≈ 13 B × 2²⁴ buckets ≈ 218 MB; a plain
//! `HashMap<u64, u128>` took 33 B per bucket.

use std::collections::HashMap;

use hashbrown::HashTable;

use crate::lru::BlockMap;

/// One entry of the table: a block hash (split so the entry packs to 12 bytes) and the id of
/// its holder set.
#[derive(Debug, Clone, Copy)]
struct Slot {
    lo: u32,
    hi: u32,
    set: u32,
}

impl Slot {
    fn key(&self) -> u64 {
        u64::from(self.lo) | (u64::from(self.hi) << 32)
    }
}

/// Folded multiply: block keys may be dense ids (the traces number blocks 0, 1, 2 …), and the
/// table takes its bucket from the low bits and its tag from the high bits of the hash.
#[inline]
fn mix(k: u64) -> u64 {
    let x = u128::from(k ^ 0x243f_6a88_85a3_08d3) * 0x9e37_79b9_7f4a_7c15u128;
    (x as u64) ^ ((x >> 64) as u64)
}

/// Interned holder sets with reference counts. Id 0 is never handed out.
#[derive(Debug, Clone)]
struct SetTable {
    sets: Vec<u128>,
    refs: Vec<u32>,
    ids: HashMap<u128, u32, std::hash::BuildHasherDefault<crate::lru::BlockHasher>>,
    free: Vec<u32>,
    /// The last transition `(from, bit, add) → to`: consecutive blocks of one event usually
    /// make the same one.
    memo: Option<(u32, u128, bool, u32)>,
}

impl Default for SetTable {
    fn default() -> Self {
        Self {
            sets: vec![0],
            refs: vec![0],
            ids: HashMap::default(),
            free: Vec::new(),
            memo: None,
        }
    }
}

impl SetTable {
    fn get(&self, id: u32) -> u128 {
        self.sets[id as usize]
    }

    /// The id of `set` with one more reference.
    fn acquire(&mut self, set: u128) -> u32 {
        debug_assert_ne!(set, 0);
        if let Some(&id) = self.ids.get(&set) {
            self.refs[id as usize] += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.sets[id as usize] = set;
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.sets.push(set);
                self.refs.push(1);
                (self.sets.len() - 1) as u32
            }
        };
        self.ids.insert(set, id);
        id
    }

    fn release(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r == 0 {
            let set = self.sets[id as usize];
            self.ids.remove(&set);
            self.sets[id as usize] = 0;
            self.free.push(id);
            if self
                .memo
                .is_some_and(|(from, _, _, to)| from == id || to == id)
            {
                self.memo = None;
            }
        }
    }

    /// Moves one reference from set `from` to `from ± bit`; returns the new id (0: empty).
    fn transition(&mut self, from: u32, bit: u128, add: bool) -> u32 {
        let old = self.get(from);
        let new = if add { old | bit } else { old & !bit };
        if new == old {
            return from;
        }
        let to = match self.memo {
            Some((f, b, a, t)) if f == from && b == bit && a == add && t != 0 => {
                self.refs[t as usize] += 1;
                t
            }
            _ if new == 0 => 0,
            _ => self.acquire(new),
        };
        if to != 0 {
            self.memo = Some((from, bit, add, to));
        }
        self.release(from);
        to
    }
}

/// Global index of prefill caches: block key → bitset of instances holding it (bit `i` for
/// instance `i`, so at most 128 instances).
#[derive(Debug, Clone, Default)]
pub struct CacheIndex {
    table: HashTable<Slot>,
    sets: SetTable,
}

impl CacheIndex {
    /// Records that `instance` holds `keys`.
    pub fn store(&mut self, instance: u32, keys: &[u64]) {
        let bit = 1u128 << instance;
        for &k in keys {
            let h = mix(k);
            match self.table.find_mut(h, |s| s.key() == k) {
                Some(slot) => slot.set = self.sets.transition(slot.set, bit, true),
                None => {
                    let set = self.sets.acquire(bit);
                    self.table.insert_unique(
                        h,
                        Slot {
                            lo: k as u32,
                            hi: (k >> 32) as u32,
                            set,
                        },
                        |s| mix(s.key()),
                    );
                }
            }
        }
    }

    /// Records that `instance` no longer holds `keys`.
    pub fn remove(&mut self, instance: u32, keys: &[u64]) {
        let bit = 1u128 << instance;
        for &k in keys {
            if let Ok(mut entry) = self.table.find_entry(mix(k), |s| s.key() == k) {
                let to = self.sets.transition(entry.get().set, bit, false);
                if to == 0 {
                    entry.remove();
                } else {
                    entry.get_mut().set = to;
                }
            }
        }
    }

    /// Forgets every block `instance` holds (its engine restarted or cleared its cache, or it
    /// left the cluster). Walks the whole table: O(blocks indexed).
    pub fn clear_instance(&mut self, instance: u32) {
        let bit = 1u128 << instance;
        let sets = &mut self.sets;
        self.table.retain(|slot| {
            slot.set = sets.transition(slot.set, bit, false);
            slot.set != 0
        });
    }

    /// Instances holding `key`, as a bitset.
    #[inline]
    pub fn holders(&self, key: u64) -> u128 {
        self.table
            .find(mix(key), |s| s.key() == key)
            .map_or(0, |s| self.sets.get(s.set))
    }

    /// Distinct keys indexed.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key is indexed.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Blocks `instance` holds. O(blocks indexed).
    pub fn count_instance(&self, instance: u32) -> usize {
        let bit = 1u128 << instance;
        self.table
            .iter()
            .filter(|s| self.sets.get(s.set) & bit != 0)
            .count()
    }

    /// Distinct holder sets in use (for memory reports).
    pub fn distinct_sets(&self) -> usize {
        self.sets.ids.len()
    }

    /// Heap bytes of the table and the interned sets (the allocation sizes, not RSS).
    pub fn heap_bytes(&self) -> usize {
        self.table.allocation_size()
            + self.sets.sets.capacity() * 16
            + self.sets.refs.capacity() * 4
            + self.sets.ids.capacity() * 24
    }

    /// Writes each instance's prefix match length (in blocks) into `out[..instances]` and
    /// returns the longest and the bitset of instances reaching it. One lookup per block until
    /// no instance matches any more.
    pub fn match_prefix(&self, keys: &[u64], instances: u32, out: &mut Vec<u32>) -> (u32, u128) {
        self.match_prefix_masked(keys, instances, u128::MAX, out, |_| 0)
    }

    /// [`match_prefix`](Self::match_prefix) over the instances in `mask` only (the others
    /// get 0), with `extra(key)` added to each key's holders (the expected view; called only
    /// for keys some instance still matching lacks in the index).
    pub fn match_prefix_masked(
        &self,
        keys: &[u64],
        instances: u32,
        mask: u128,
        out: &mut Vec<u32>,
        extra: impl Fn(u64) -> u128,
    ) -> (u32, u128) {
        self.match_inner::<false>(keys, instances, mask, out, &mut Vec::new(), extra)
    }

    /// [`match_prefix_masked`](Self::match_prefix_masked) that also writes into
    /// `in_index[..instances]` each instance's prefix length counting the index alone (without
    /// `extra`), as far as the walk went: for an instance still matching when the walk stopped,
    /// its whole match if the index held all of it.
    pub fn match_prefix_split(
        &self,
        keys: &[u64],
        instances: u32,
        mask: u128,
        out: &mut Vec<u32>,
        in_index: &mut Vec<u32>,
        extra: impl Fn(u64) -> u128,
    ) -> (u32, u128) {
        self.match_inner::<true>(keys, instances, mask, out, in_index, extra)
    }

    fn match_inner<const SPLIT: bool>(
        &self,
        keys: &[u64],
        instances: u32,
        mask: u128,
        out: &mut Vec<u32>,
        in_index: &mut Vec<u32>,
        extra: impl Fn(u64) -> u128,
    ) -> (u32, u128) {
        out.clear();
        out.resize(instances as usize, 0);
        let mut alive = all_bits(instances) & mask;
        let mut set = alive;
        while set != 0 {
            out[set.trailing_zeros() as usize] = keys.len() as u32;
            set &= set - 1;
        }
        // Instances whose match so far is all in the index.
        let mut indexed = alive;
        if SPLIT {
            in_index.clear();
            in_index.extend_from_slice(out);
        }
        // The table is far larger than the caches, so each lookup is a memory access: a batch
        // of lookups that depend on nothing else runs them in parallel, and the walk then
        // consumes the batch (at most `BATCH - 1` lookups past the end of the match).
        const BATCH: usize = 8;
        let mut batch = [0u128; BATCH];
        for (c, chunk) in keys.chunks(BATCH).enumerate() {
            for (slot, &k) in batch.iter_mut().zip(chunk) {
                *slot = self.holders(k);
            }
            for (j, &k) in chunk.iter().enumerate() {
                let i = c * BATCH + j;
                let held = batch[j] & alive;
                // The expected view can only add instances the index does not already give.
                let h = if held == alive {
                    held
                } else {
                    (held | extra(k)) & alive
                };
                if SPLIT {
                    let mut lost = indexed & !held;
                    indexed &= held;
                    while lost != 0 {
                        in_index[lost.trailing_zeros() as usize] = i as u32;
                        lost &= lost - 1;
                    }
                }
                let mut dropped = alive & !h;
                while dropped != 0 {
                    let b = dropped.trailing_zeros();
                    out[b as usize] = i as u32;
                    dropped &= dropped - 1;
                }
                if h == 0 {
                    return (i as u32, alive);
                }
                alive = h;
            }
        }
        (keys.len() as u32, alive)
    }
}

/// Blocks the Conductor expects on an instance because it just sent a request there
/// (Algorithm 1 step 8: "Conductor immediately updates p's cache view"), until KV events
/// confirm them or the request's expectation lapses.
///
/// One map entry per block: its instance bitset and, in the common case of a single
/// expecting instance, that instance's count of requests inline; only blocks expected on
/// several instances keep per-instance counts in a side map.
///
/// Every booking gets a stamp from a counter ([`ExpectedBlocks::add`] returns it), and every
/// (block, instance) expectation remembers the stamp of the booking that started it. When
/// an event settles an expectation, the bookings counted in it are done with that block;
/// a later release of one of them carries a stamp older than the entry a newer booking
/// started since, and leaves that entry alone.
#[derive(Debug, Clone, Default)]
pub struct ExpectedBlocks {
    blocks: BlockMap<Expected>,
    /// Requests expecting (block, instance) and the stamp that started the expectation, for
    /// blocks expected on two or more instances.
    multi: HashMap<(u64, u32), Count, std::hash::BuildHasherDefault<crate::lru::BlockHasher>>,
    /// Stamp of the last booking.
    stamp: u64,
}

#[derive(Debug, Clone, Copy)]
struct Expected {
    bits: u128,
    /// Stamp of the booking that started the expectation on its one instance (unused while
    /// `bits` has several).
    since: u64,
    /// Requests expecting the block on its one instance (unused while `bits` has several).
    n: u32,
}

/// Requests expecting a (block, instance) and the stamp of the first of them.
#[derive(Debug, Clone, Copy)]
struct Count {
    n: u32,
    since: u64,
}

impl Expected {
    fn single(&self) -> bool {
        self.bits.is_power_of_two()
    }
}

impl ExpectedBlocks {
    /// Instances expected to hold `key`.
    #[inline]
    pub fn get(&self, key: u64) -> u128 {
        self.blocks.get(&key).map_or(0, |e| e.bits)
    }

    /// Whether nothing is expected.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Distinct blocks expected somewhere.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// One more request expects `keys` on `instance`; returns the booking's stamp, which
    /// its [`ExpectedBlocks::release`] passes back (stamps grow with every call).
    pub fn add(&mut self, instance: u32, keys: &[u64]) -> u64 {
        self.stamp += 1;
        let stamp = self.stamp;
        let bit = 1u128 << instance;
        for &k in keys {
            let e = self.blocks.entry(k).or_insert(Expected {
                bits: 0,
                since: stamp,
                n: 0,
            });
            if e.bits == 0 {
                *e = Expected {
                    bits: bit,
                    since: stamp,
                    n: 1,
                };
            } else if e.bits == bit {
                e.n += 1;
            } else {
                if e.single() {
                    // A second instance: spill the first one's count to the side map.
                    let first = Count {
                        n: e.n,
                        since: e.since,
                    };
                    self.multi.insert((k, e.bits.trailing_zeros()), first);
                    e.n = 0;
                }
                e.bits |= bit;
                self.multi
                    .entry((k, instance))
                    .or_insert(Count { n: 0, since: stamp })
                    .n += 1;
            }
        }
        stamp
    }

    /// The request booked with `stamp` no longer expects `keys` on `instance` (blocks whose
    /// expectation an event settled after that booking are not its to release).
    pub fn release(&mut self, instance: u32, keys: &[u64], stamp: u64) {
        self.drop_expectations(instance, keys, Some(stamp));
    }

    /// Events confirmed (or refuted) `keys` on `instance`: the expectation is settled for
    /// every request.
    pub fn settle(&mut self, instance: u32, keys: &[u64]) {
        if self.blocks.is_empty() {
            return;
        }
        self.drop_expectations(instance, keys, None);
    }

    /// Drops one request's expectation (`Some(stamp)`) or all of them (`None`).
    fn drop_expectations(&mut self, instance: u32, keys: &[u64], stamp: Option<u64>) {
        let bit = 1u128 << instance;
        for &k in keys {
            let Some(e) = self.blocks.get_mut(&k) else {
                continue;
            };
            if e.bits & bit == 0 {
                continue;
            }
            if e.single() {
                match stamp {
                    // Booked before the expectation restarted: settled already.
                    Some(s) if s < e.since => continue,
                    Some(_) => e.n -= 1,
                    None => e.n = 0,
                }
                if e.n == 0 {
                    self.blocks.remove(&k);
                }
                continue;
            }
            let gone = match (self.multi.get_mut(&(k, instance)), stamp) {
                (Some(c), Some(s)) if s < c.since => false,
                (Some(c), Some(_)) if c.n > 1 => {
                    c.n -= 1;
                    false
                }
                _ => true,
            };
            if gone {
                self.multi.remove(&(k, instance));
                e.bits &= !bit;
                Self::collapse(&mut self.multi, k, e);
            }
        }
    }

    /// Back to the inline count when one instance is left.
    fn collapse(
        multi: &mut HashMap<(u64, u32), Count, impl std::hash::BuildHasher>,
        k: u64,
        e: &mut Expected,
    ) {
        if e.single() {
            let c = multi
                .remove(&(k, e.bits.trailing_zeros()))
                .unwrap_or(Count { n: 1, since: 0 });
            e.n = c.n;
            e.since = c.since;
        }
    }

    /// Drops every expectation on `instance`.
    pub fn clear_instance(&mut self, instance: u32) {
        let bit = 1u128 << instance;
        let multi = &mut self.multi;
        self.blocks.retain(|&k, e| {
            if e.bits & bit == 0 {
                return true;
            }
            if e.single() {
                return false;
            }
            multi.remove(&(k, instance));
            e.bits &= !bit;
            Self::collapse(multi, k, e);
            true
        });
    }
}

/// Bitset of instances `0..n`.
pub(crate) fn all_bits(n: u32) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_interned_and_released() {
        let mut ix = CacheIndex::default();
        ix.store(0, &[1, 2, 3]);
        ix.store(1, &[2, 3]);
        assert_eq!(ix.holders(1), 0b01);
        assert_eq!(ix.holders(2), 0b11);
        assert_eq!(ix.distinct_sets(), 2);
        ix.remove(0, &[1, 2, 3]);
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.distinct_sets(), 1);
        ix.store(5, &[u64::MAX, 0]);
        assert_eq!(ix.holders(u64::MAX), 1 << 5);
        ix.clear_instance(1);
        assert_eq!((ix.holders(2), ix.holders(3)), (0, 0));
        assert_eq!(ix.len(), 2);
        ix.clear_instance(5);
        assert!(ix.is_empty());
        assert_eq!(ix.distinct_sets(), 0);
    }

    #[test]
    fn expected_blocks_count_requests() {
        let mut e = ExpectedBlocks::default();
        let first = e.add(2, &[10, 11]);
        let _second = e.add(2, &[10]);
        let third = e.add(3, &[10]);
        assert_eq!(e.get(10), 0b1100);
        e.release(2, &[10, 11], first);
        assert_eq!((e.get(10), e.get(11)), (0b1100, 0));
        e.settle(2, &[10]);
        assert_eq!(e.get(10), 0b1000);
        e.clear_instance(3);
        assert!(e.is_empty());
        e.release(3, &[10], third);
        assert!(e.is_empty());
    }

    #[test]
    fn a_settled_booking_does_not_release_a_newer_one() {
        // The stamp fits in the entry's padding: no larger than a bitset and a count.
        assert_eq!(
            std::mem::size_of::<Expected>(),
            std::mem::size_of::<(u128, u32)>()
        );
        let mut e = ExpectedBlocks::default();
        // Inline count (one instance).
        let old = e.add(2, &[10, 11]);
        e.settle(2, &[10]);
        let new = e.add(2, &[10]);
        e.release(2, &[10, 11], old);
        assert_eq!((e.get(10), e.get(11)), (0b100, 0));
        e.release(2, &[10], new);
        assert!(e.is_empty());
        // Side-map count (several instances).
        let other = e.add(3, &[10]);
        let old = e.add(2, &[10]);
        e.settle(2, &[10]);
        let new = e.add(2, &[10]);
        e.release(2, &[10], old);
        assert_eq!(e.get(10), 0b1100);
        e.release(3, &[10], other);
        assert_eq!(e.get(10), 0b100);
        e.release(2, &[10], new);
        assert!(e.is_empty());
    }

    proptest::proptest! {
        /// The expected view answers like a plain list of live bookings, each holding the
        /// (block, instance) expectations no event settled yet.
        #[test]
        fn expected_matches_reference_model(ops in proptest::collection::vec((0u8..4, 0u32..4, proptest::collection::vec(0u64..12, 0..6)), 0..150)) {
            let mut e = ExpectedBlocks::default();
            // (stamp, instance, blocks still expected) per unreleased booking.
            let mut model: Vec<(u64, u32, Vec<u64>, Vec<u64>)> = Vec::new();
            for (op, inst, keys) in ops {
                match op {
                    0 => {
                        let stamp = e.add(inst, &keys);
                        model.push((stamp, inst, keys.clone(), keys));
                    }
                    1 => {
                        // Release one booking (picked by the generated keys' length).
                        if !model.is_empty() {
                            let (stamp, i, booked, _) = model.remove(keys.len() % model.len());
                            e.release(i, &booked, stamp);
                        }
                    }
                    2 => {
                        e.settle(inst, &keys);
                        for (_, i, _, live) in &mut model {
                            if *i == inst {
                                live.retain(|k| !keys.contains(k));
                            }
                        }
                    }
                    _ => {
                        e.clear_instance(inst);
                        for (_, i, _, live) in &mut model {
                            if *i == inst {
                                live.clear();
                            }
                        }
                    }
                }
                let mut distinct = std::collections::HashSet::new();
                for k in 0..12 {
                    let want = model
                        .iter()
                        .filter(|(_, _, _, live)| live.contains(&k))
                        .fold(0u128, |b, (_, i, _, _)| b | 1 << i);
                    if want != 0 {
                        distinct.insert(k);
                    }
                    proptest::prop_assert_eq!(e.get(k), want);
                }
                proptest::prop_assert_eq!(e.len(), distinct.len());
            }
        }

        /// The compact index answers like a plain map of bitsets.
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec((0u8..4, 0u32..6, proptest::collection::vec(0u64..40, 0..8)), 0..120)) {
            let mut ix = CacheIndex::default();
            let mut model: std::collections::HashMap<u64, u128> = Default::default();
            for (op, inst, keys) in ops {
                let bit = 1u128 << inst;
                match op {
                    0 | 1 => {
                        ix.store(inst, &keys);
                        for k in &keys { *model.entry(*k).or_insert(0) |= bit; }
                    }
                    2 => {
                        ix.remove(inst, &keys);
                        for k in &keys {
                            if let Some(b) = model.get_mut(k) { *b &= !bit; }
                        }
                    }
                    _ => {
                        ix.clear_instance(inst);
                        for b in model.values_mut() { *b &= !bit; }
                    }
                }
                model.retain(|_, b| *b != 0);
                proptest::prop_assert_eq!(ix.len(), model.len());
                for k in 0..40 {
                    proptest::prop_assert_eq!(ix.holders(k), model.get(&k).copied().unwrap_or(0));
                }
                let distinct: std::collections::HashSet<u128> = model.values().copied().collect();
                proptest::prop_assert_eq!(ix.distinct_sets(), distinct.len());
            }
        }

        /// The batched prefix walk gives each instance's match (index plus expected view) and
        /// its index-only part as a key-by-key walk of a plain map does.
        #[test]
        fn prefix_match_matches_reference(
            stored in proptest::collection::vec((0u32..5, proptest::collection::vec(0u64..30, 0..30)), 0..12),
            expected in proptest::collection::vec((0u32..5, proptest::collection::vec(0u64..30, 0..10)), 0..6),
            keys in proptest::collection::vec(0u64..30, 0..40),
            mask in 0u128..32,
        ) {
            let mut ix = CacheIndex::default();
            let mut ex: std::collections::HashMap<u64, u128> = Default::default();
            for (inst, ks) in &stored {
                ix.store(*inst, ks);
            }
            for (inst, ks) in &expected {
                for k in ks { *ex.entry(*k).or_insert(0) |= 1 << inst; }
            }
            let extra = |k: u64| ex.get(&k).copied().unwrap_or(0);
            let (mut out, mut in_index, mut plain) = (Vec::new(), Vec::new(), Vec::new());
            let (best, set) = ix.match_prefix_split(&keys, 5, mask, &mut out, &mut in_index, extra);
            let (pbest, pset) = ix.match_prefix_masked(&keys, 5, mask, &mut plain, extra);
            proptest::prop_assert_eq!((best, set, &out), (pbest, pset, &plain));
            let mut want_best = 0;
            for i in 0..5u32 {
                let bit = 1u128 << i;
                let run = |with_ex: bool| keys
                    .iter()
                    .take_while(|&&k| (ix.holders(k) | if with_ex { extra(k) } else { 0 }) & bit != 0)
                    .count() as u32;
                let m = if mask & bit != 0 { run(true) } else { 0 };
                proptest::prop_assert_eq!(out[i as usize], m);
                want_best = want_best.max(m);
                // The index-only part, as far as the walk went (it stops at the longest match).
                let idx = if mask & bit != 0 { run(false) } else { 0 };
                proptest::prop_assert_eq!(in_index[i as usize], idx.min(m));
            }
            proptest::prop_assert_eq!(best, want_best);
            let want_set = (0..5u32).filter(|&i| out[i as usize] == best && mask & (1 << i) != 0).fold(0u128, |b, i| b | 1 << i);
            proptest::prop_assert_eq!(set, want_set);
        }
    }
}
