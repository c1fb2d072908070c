//! An O(1) LRU set of block hashes (slab-backed doubly linked list plus a hash map), and the
//! fast hasher used for block keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A multiply-rotate hasher for `u64` block keys (FxHash-style). Block keys are already hashes
/// or dense ids, so SipHash's DoS resistance buys nothing here and costs most of a lookup.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// A `HashMap` keyed by block hashes with [`BlockHasher`].
pub type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    key: u64,
    prev: u32,
    next: u32,
}

/// A set of block keys with least-recently-used eviction and a fixed capacity in blocks.
#[derive(Debug, Clone)]
pub struct LruSet {
    map: BlockMap<u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    capacity: usize,
}

impl LruSet {
    /// An empty set holding at most `capacity` blocks (0 holds nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: BlockMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `key` is held (does not change recency).
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// Marks `key` most recently used; returns whether it was held.
    pub fn touch(&mut self, key: u64) -> bool {
        match self.map.get(&key) {
            Some(&i) => {
                self.unlink(i);
                self.push_front(i);
                true
            }
            None => false,
        }
    }

    /// Inserts `key` as most recently used (or touches it), evicting least recently used keys
    /// beyond capacity; `evicted` is called with each evicted key. Returns whether `key` is held
    /// afterwards (false only with capacity 0).
    pub fn insert(&mut self, key: u64, mut evicted: impl FnMut(u64)) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if self.touch(key) {
            return true;
        }
        while self.map.len() >= self.capacity {
            let t = self.tail;
            let k = self.nodes[t as usize].key;
            self.unlink(t);
            self.map.remove(&k);
            self.free.push(t);
            evicted(k);
        }
        let node = Node {
            key,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.push_front(i);
        self.map.insert(key, i);
        true
    }

    /// Removes `key`; returns whether it was held.
    pub fn remove(&mut self, key: u64) -> bool {
        match self.map.remove(&key) {
            Some(i) => {
                self.unlink(i);
                self.free.push(i);
                true
            }
            None => false,
        }
    }

    /// Keys from most to least recently used.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let n = self.nodes[cur as usize];
            cur = n.next;
            Some(n.key)
        })
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = self.head;
        if self.head != NIL {
            self.nodes[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut l = LruSet::new(2);
        let mut ev = Vec::new();
        l.insert(1, |k| ev.push(k));
        l.insert(2, |k| ev.push(k));
        assert!(l.touch(1));
        l.insert(3, |k| ev.push(k));
        assert_eq!(ev, vec![2]);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![3, 1]);
        assert!(l.remove(1));
        assert!(!l.contains(1));
        l.insert(4, |k| ev.push(k));
        assert_eq!(l.len(), 2);
        assert_eq!(ev, vec![2]);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut l = LruSet::new(0);
        assert!(!l.insert(1, |_| panic!("nothing to evict")));
        assert!(l.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn matches_reference_model(cap in 0usize..8, ops in proptest::collection::vec((0u64..12, proptest::bool::ANY), 0..200)) {
            let mut l = LruSet::new(cap);
            let mut model: Vec<u64> = Vec::new(); // most recent first
            for (k, ins) in ops {
                if ins {
                    let mut ev = Vec::new();
                    l.insert(k, |e| ev.push(e));
                    let mut mev = Vec::new();
                    if cap > 0 {
                        if let Some(p) = model.iter().position(|&x| x == k) {
                            model.remove(p);
                        } else {
                            while model.len() >= cap {
                                mev.push(model.pop().unwrap());
                            }
                        }
                        model.insert(0, k);
                    }
                    proptest::prop_assert_eq!(ev, mev);
                } else {
                    let held = l.touch(k);
                    let p = model.iter().position(|&x| x == k);
                    proptest::prop_assert_eq!(held, p.is_some());
                    if let Some(p) = p {
                        model.remove(p);
                        model.insert(0, k);
                    }
                }
                proptest::prop_assert_eq!(l.iter().collect::<Vec<_>>(), model.clone());
            }
        }
    }
}
