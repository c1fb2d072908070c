//! Per-NIC counters of an [`crate::RdmaTransport`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one NIC.
#[derive(Debug, Default)]
pub(crate) struct NicCounters {
    pub name: String,
    pub bytes: AtomicU64,
    pub slices: AtomicU64,
    pub failed_slices: AtomicU64,
    pub endpoints_created: AtomicU64,
}

/// Counters shared between an [`crate::RdmaConfig`] and the transport it built.
#[derive(Debug, Default)]
pub struct RdmaStats {
    nics: OnceLock<Vec<NicCounters>>,
    retries: AtomicU64,
    handshakes_refused: AtomicU64,
    passive_evictions: AtomicU64,
}

/// A snapshot of one NIC's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicStats {
    /// Device name.
    pub name: String,
    /// Bytes moved by slices that completed on this NIC.
    pub bytes: u64,
    /// Slices that completed on this NIC.
    pub slices: u64,
    /// Slices that failed on this NIC (and were retried elsewhere or failed).
    pub failed_slices: u64,
    /// QPs this NIC connected (handshakes it started).
    pub endpoints_created: u64,
}

impl RdmaStats {
    pub(crate) fn init(&self, names: &[String]) {
        let _ = self.nics.set(
            names
                .iter()
                .map(|n| NicCounters {
                    name: n.clone(),
                    ..Default::default()
                })
                .collect(),
        );
    }

    pub(crate) fn nic(&self, i: usize) -> Option<&NicCounters> {
        self.nics.get().and_then(|v| v.get(i))
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Per-NIC counters (empty before the transport started).
    pub fn nics(&self) -> Vec<NicStats> {
        self.nics
            .get()
            .map(|v| {
                v.iter()
                    .map(|c| NicStats {
                        name: c.name.clone(),
                        bytes: c.bytes.load(Ordering::Relaxed),
                        slices: c.slices.load(Ordering::Relaxed),
                        failed_slices: c.failed_slices.load(Ordering::Relaxed),
                        endpoints_created: c.endpoints_created.load(Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn handshake_refused(&self) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn passive_evicted(&self) {
        self.passive_evictions.fetch_add(1, Ordering::Relaxed);
    }

    /// Handshake requests this transport's listener refused.
    pub fn handshakes_refused(&self) -> u64 {
        self.handshakes_refused.load(Ordering::Relaxed)
    }

    /// Passive (peer-initiated) QPs evicted to make room for others.
    pub fn passive_evictions(&self) -> u64 {
        self.passive_evictions.load(Ordering::Relaxed)
    }

    /// Slices re-dispatched to another path after a failure.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}
