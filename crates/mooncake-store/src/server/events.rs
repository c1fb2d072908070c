//! The master's KV-event stream: which keys became readable (put ended), and which went away
//! (removed, evicted, lost with their segment), with sequence numbers, for a KVCache-aware
//! scheduler (the Conductor) to count store-resident blocks as cache hits.
//!
//! Served on the admin port as a long poll: `GET /kv_events?since=N&timeout_ms=T` returns the
//! events with `seq ≥ N` (waiting up to `T` ms, at most 30 s, for the first one):
//!
//! ```json
//! {"next": 42, "events": [{"seq": 40, "kind": "stored", "tenant": "default", "keys": ["…"]},
//!                         {"seq": 41, "kind": "removed", "tenant": "default", "keys": ["…"]}]}
//! ```
//!
//! Poll again with `since = next`. When `N` is older than the ring of recent events (or from
//! another master: `next` restarts at 0 with each master), the reply is a re-listing instead:
//! `{"next": 42, "resync": true, "keys": {"tenant": ["…", …]}}`, every key the master holds now;
//! replace the view with it.
//!
//! # How removals are seen
//!
//! Puts and removes pass through the server, so they are recorded as they happen. Evictions
//! and objects lost with a segment happen inside the master's state machine, which only
//! counts them; when those counters move (checked after each tick and each put), the server
//! re-checks the keys it announced and records those that are gone. That costs one lookup per
//! announced key, only when something was evicted or lost.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::master::Master;

/// Events kept for late pollers.
const RING: usize = 65_536;
/// Longest wait of one poll.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);

/// What happened to some keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvEventKind {
    /// Readable now (a put ended).
    Stored,
    /// Gone (removed, evicted, or lost with its segment).
    Removed,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvEvent {
    /// Its sequence number.
    pub seq: u64,
    /// What happened.
    pub kind: KvEventKind,
    /// The keys' tenant.
    pub tenant: String,
    /// The keys.
    pub keys: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    ring: VecDeque<KvEvent>,
    /// Keys announced stored and not yet removed, per tenant.
    live: HashMap<String, HashSet<String>>,
    /// The master's eviction counter when the live set was last checked.
    seen_losses: u64,
}

/// The event log (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct KvEventLog {
    inner: Mutex<Inner>,
    cv: Condvar,
}

/// A poll's answer.
#[derive(Debug, Serialize)]
pub(crate) struct Poll {
    next: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<KvEvent>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<BTreeMap<String, Vec<String>>>,
}

impl KvEventLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(inner: &mut Inner, kind: KvEventKind, tenant: &str, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let live = inner.live.entry(tenant.to_owned()).or_default();
        for k in &keys {
            match kind {
                KvEventKind::Stored => live.insert(k.clone()),
                KvEventKind::Removed => live.remove(k),
            };
        }
        let seq = inner.next;
        inner.next += 1;
        if inner.ring.len() >= RING {
            inner.ring.pop_front();
        }
        inner.ring.push_back(KvEvent {
            seq,
            kind,
            tenant: tenant.to_owned(),
            keys,
        });
    }

    /// Records keys whose put ended (`stored`) or that were removed.
    pub(crate) fn record(&self, kind: KvEventKind, tenant: &str, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        Self::push(&mut self.lock(), kind, tenant, keys);
        self.cv.notify_all();
    }

    /// Re-checks announced keys against the master when its eviction counter moved, or
    /// always with `force` (a `remove_all`, a dropped or unmounted segment). Called with the
    /// master locked.
    pub(crate) fn reconcile(&self, m: &Master, force: bool) {
        let losses = m.stats().evicted_objects;
        let mut inner = self.lock();
        if !force && losses == inner.seen_losses {
            return;
        }
        inner.seen_losses = losses;
        let mut gone: Vec<(String, Vec<String>)> = Vec::new();
        for (tenant, keys) in &inner.live {
            let g: Vec<String> = keys
                .iter()
                .filter(|k| !m.exists(tenant, k))
                .cloned()
                .collect();
            if !g.is_empty() {
                gone.push((tenant.clone(), g));
            }
        }
        let any = !gone.is_empty();
        for (tenant, keys) in gone {
            Self::push(&mut inner, KvEventKind::Removed, &tenant, keys);
        }
        drop(inner);
        if any {
            self.cv.notify_all();
        }
    }

    /// Events from `since`, waiting up to `wait` for one; a re-listing when `since` is older
    /// than the ring or newer than the log.
    pub(crate) fn poll(
        &self,
        since: u64,
        wait: Duration,
        max: usize,
        stopping: impl Fn() -> bool,
    ) -> Poll {
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let mut inner = self.lock();
        loop {
            let first = inner.ring.front().map_or(inner.next, |e| e.seq);
            if since < first || since > inner.next {
                let keys = inner
                    .live
                    .iter()
                    .filter(|(_, k)| !k.is_empty())
                    .map(|(t, k)| {
                        let mut v: Vec<String> = k.iter().cloned().collect();
                        v.sort_unstable();
                        (t.clone(), v)
                    })
                    .collect();
                return Poll {
                    next: inner.next,
                    events: None,
                    resync: true,
                    keys: Some(keys),
                };
            }
            if since < inner.next {
                let skip = (since - first) as usize;
                let events: Vec<KvEvent> = inner
                    .ring
                    .iter()
                    .skip(skip)
                    .take(max.max(1))
                    .cloned()
                    .collect();
                let next = events.last().map_or(since, |e| e.seq + 1);
                return Poll {
                    next,
                    events: Some(events),
                    resync: false,
                    keys: None,
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stopping() {
                return Poll {
                    next: inner.next,
                    events: Some(Vec::new()),
                    resync: false,
                    keys: None,
                };
            }
            inner = self
                .cv
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wakes every waiting poll (shutdown).
    pub(crate) fn wake_all(&self) {
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_in_order_and_relists_past_the_ring() {
        let log = KvEventLog::default();
        log.record(KvEventKind::Stored, "t", vec!["a".into(), "b".into()]);
        log.record(KvEventKind::Removed, "t", vec!["a".into()]);
        let p = log.poll(0, Duration::ZERO, 100, || false);
        assert_eq!(p.next, 2);
        let ev = p.events.unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[1].seq, ev[1].kind), (1, KvEventKind::Removed));
        let p = log.poll(1, Duration::ZERO, 100, || false);
        assert_eq!(p.events.unwrap().len(), 1);
        // Nothing new: an empty answer after the wait.
        let p = log.poll(2, Duration::from_millis(1), 100, || false);
        assert_eq!((p.next, p.events.unwrap().len()), (2, 0));
        // A cursor from another master (past the end) gets the whole content.
        let p = log.poll(99, Duration::ZERO, 100, || false);
        assert!(p.resync);
        assert_eq!(p.keys.unwrap()["t"], vec!["b".to_string()]);
        assert_eq!(p.next, 2);
    }
}
