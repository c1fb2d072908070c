//! Rail health: which `(local NIC, peer, remote NIC)` paths failed recently.
//!
//! A rail that fails is *paused* (avoided) for a while, doubling up to 8× on repeated
//! failure. When the pause ends one *probe* slice may use it; its success makes the rail
//! healthy again, its failure pauses it again. A probe whose outcome never arrives (its slice
//! timed out, was unregistered, or the transport shut down) expires after `probe_ttl`, and
//! another probe may go out: a rail is never stuck in probing.
//!
//! Pure logic on an injected clock; the shared state holds one [`Rails`] behind a lock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A rail: local NIC index, peer segment name, remote NIC name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RailKey {
    pub nic: usize,
    pub peer: String,
    pub rnic: String,
}

impl RailKey {
    pub fn new(nic: usize, peer: &str, rnic: &str) -> Self {
        Self {
            nic,
            peer: peer.to_string(),
            rnic: rnic.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Paused {
        until: Instant,
        backoff: Duration,
    },
    /// The pause ended; `out` is when the current probe went out, if one is out.
    Probing {
        out: Option<Instant>,
        backoff: Duration,
    },
}

/// What [`Rails::claim`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The rail is healthy.
    Healthy,
    /// The rail is unhealthy and this slice is its probe.
    Probe,
    /// The rail is paused, or its probe is out.
    Denied,
}

/// Health of every rail that failed recently (healthy rails have no entry).
#[derive(Debug)]
pub(crate) struct Rails {
    map: HashMap<RailKey, State>,
    pause: Duration,
    probe_ttl: Duration,
}

impl Rails {
    /// `pause` is the first pause after a failure; a probe without an outcome for
    /// `probe_ttl` is considered lost.
    pub fn new(pause: Duration, probe_ttl: Duration) -> Self {
        Self {
            map: HashMap::new(),
            pause,
            probe_ttl,
        }
    }

    /// True when every rail is healthy.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// May a slice use `key` now?
    pub fn claim(&mut self, key: &RailKey, now: Instant) -> Claim {
        let Some(st) = self.map.get_mut(key) else {
            return Claim::Healthy;
        };
        match *st {
            State::Paused { until, backoff } => {
                if now < until {
                    return Claim::Denied;
                }
                *st = State::Probing {
                    out: Some(now),
                    backoff,
                };
                tracing::info!(rail = ?key, "probing paused RDMA rail");
                Claim::Probe
            }
            State::Probing { out, backoff } => {
                if out.is_some_and(|t| now.duration_since(t) < self.probe_ttl) {
                    return Claim::Denied;
                }
                if out.is_some() {
                    tracing::debug!(rail = ?key, "RDMA rail probe got no answer; probing again");
                }
                *st = State::Probing {
                    out: Some(now),
                    backoff,
                };
                Claim::Probe
            }
        }
    }

    /// A slice succeeded on `key`; returns true if the rail was unhealthy.
    pub fn ok(&mut self, key: &RailKey) -> bool {
        let was = self.map.remove(key).is_some();
        if was {
            tracing::info!(rail = ?key, "RDMA rail healthy again");
        }
        was
    }

    /// `key` failed: pause it (doubling the pause after a failed probe, up to 8×).
    pub fn failed(&mut self, key: &RailKey, now: Instant) {
        let base = self.pause;
        let backoff = match self.map.get(key) {
            Some(State::Probing { backoff, .. }) => (*backoff * 2).min(base * 8),
            Some(State::Paused { backoff, .. }) => *backoff,
            None => base,
        };
        self.map.insert(
            key.clone(),
            State::Paused {
                until: now + backoff,
                backoff,
            },
        );
        tracing::warn!(rail = ?key, ?backoff, "pausing RDMA rail");
    }

    /// Local NIC `nic` came back: its paused rails may be probed at once.
    pub fn nic_up(&mut self, nic: usize) {
        for (k, v) in self.map.iter_mut() {
            if k.nic == nic
                && let State::Paused { backoff, .. } = *v
            {
                *v = State::Probing { out: None, backoff };
            }
        }
    }

    /// Drops what is known about `peer`'s rails.
    pub fn forget_peer(&mut self, peer: &str) {
        self.map.retain(|k, _| k.peer != peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RailKey {
        RailKey::new(0, "peer", "mlx5_0")
    }

    #[test]
    fn failure_pauses_then_one_probe_decides() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Rails::new(s, Duration::from_secs(5));
        assert_eq!(r.claim(&key(), t0), Claim::Healthy);
        r.failed(&key(), t0);
        assert_eq!(r.claim(&key(), t0 + s / 2), Claim::Denied);
        assert_eq!(r.claim(&key(), t0 + s), Claim::Probe);
        assert_eq!(
            r.claim(&key(), t0 + s),
            Claim::Denied,
            "one probe at a time"
        );
        // The probe fails: paused twice as long.
        r.failed(&key(), t0 + s);
        assert_eq!(r.claim(&key(), t0 + s * 2), Claim::Denied);
        assert_eq!(r.claim(&key(), t0 + s * 3), Claim::Probe);
        assert!(r.ok(&key()));
        assert_eq!(r.claim(&key(), t0 + s * 3), Claim::Healthy);
        assert!(r.is_empty());
    }

    #[test]
    fn a_lost_probe_expires() {
        // A probe whose slice never reports (it timed out, its region was unregistered)
        // must not keep the rail in probing forever.
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut r = Rails::new(Duration::from_secs(1), ttl);
        r.failed(&key(), t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.claim(&key(), t1), Claim::Probe);
        assert_eq!(r.claim(&key(), t1 + ttl / 2), Claim::Denied);
        assert_eq!(r.claim(&key(), t1 + ttl), Claim::Probe);
    }

    #[test]
    fn nic_up_allows_an_immediate_probe_and_peers_are_separate() {
        let t0 = Instant::now();
        let mut r = Rails::new(Duration::from_secs(30), Duration::from_secs(5));
        r.failed(&key(), t0);
        let other = RailKey::new(0, "other", "mlx5_0");
        assert_eq!(
            r.claim(&other, t0),
            Claim::Healthy,
            "another peer's rail is unaffected"
        );
        r.nic_up(0);
        assert_eq!(r.claim(&key(), t0), Claim::Probe);
        r.forget_peer("peer");
        assert!(r.is_empty());
    }
}
