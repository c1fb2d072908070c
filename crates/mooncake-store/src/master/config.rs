//! [`MasterConfig`]: the master's timers, watermarks and placement knobs.

use serde::{Deserialize, Serialize};

/// Configuration of a [`Master`](super::Master). Every time is in milliseconds of the caller's
/// clock (the `now_ms` passed to each call).
///
/// `#[non_exhaustive]`: start from `MasterConfig::default()` and use the `with_*` setters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MasterConfig {
    /// Read lease granted by `get_replicas`: `max(old, now + ttl)`. Default 10 s.
    pub default_kv_lease_ttl_ms: u64,
    /// Pool usage above which eviction runs. Default 0.9.
    pub eviction_high_watermark_ratio: f64,
    /// Minimum fraction of the pool one eviction pass frees. Default 0.05.
    pub eviction_ratio: f64,
    /// A client silent this long is expired with its segments. Default 10 s.
    pub client_live_ttl_ms: u64,
    /// A put whose writer is alive but has not finished after this long is revoked. Default 30 s.
    pub put_start_discard_timeout_ms: u64,
    /// Ranges of an in-flight put that is revoked (its writer disconnected or expired, it timed
    /// out, it was preempted, force-removed or revoked) are quarantined this long before
    /// another writer may get them: the dead or slow writer's data-plane writes may still land
    /// until its transfer engine's whole-request deadline. The key itself is writable again at
    /// once, with fresh space. Default 10 s (2× the engine's default 5 s timeout).
    pub inflight_quarantine_ms: u64,
    /// Soft pin lifetime when the config names none. Default 30 min.
    pub default_soft_pin_ttl_ms: u64,
    /// Whether soft-pinned objects may be evicted when nothing else is evictable. Default true.
    pub allow_evict_soft_pinned: bool,
    /// A segment mounted empty is ramped into placement over this time. Default 30 s.
    pub ramp_up_ms: u64,
    /// A segment reported failing leaves placement until a heartbeat of its owner at least this
    /// long after the report. Default 5 s.
    pub failure_exclusion_ms: u64,
    /// Allocation alignment (power of two) in bytes. Default 64.
    pub alloc_align: u64,
    /// Journal records kept per segment before the journal is dropped and the owner is sent a
    /// full resync on its next drain. Default 262 144 (16 bytes each).
    pub journal_max_entries: usize,
    /// Largest `replica_num` accepted. Default 16.
    pub max_replicas: u32,
    /// Seed of the placement RNG and of the key hash.
    pub seed: u64,
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            default_kv_lease_ttl_ms: 10_000,
            eviction_high_watermark_ratio: 0.9,
            eviction_ratio: 0.05,
            client_live_ttl_ms: 10_000,
            put_start_discard_timeout_ms: 30_000,
            inflight_quarantine_ms: 10_000,
            default_soft_pin_ttl_ms: 30 * 60 * 1000,
            allow_evict_soft_pinned: true,
            ramp_up_ms: 30_000,
            failure_exclusion_ms: 5_000,
            alloc_align: crate::alloc::DEFAULT_ALIGN,
            journal_max_entries: 262_144,
            max_replicas: 16,
            seed: 0x6d6f_6f6e_6361_6b65,
        }
    }
}

impl MasterConfig {
    /// Sets `default_kv_lease_ttl_ms`.
    pub fn with_lease_ttl_ms(mut self, ms: u64) -> Self {
        self.default_kv_lease_ttl_ms = ms;
        self
    }

    /// Sets the eviction high watermark and the per-pass ratio.
    pub fn with_eviction(mut self, high_watermark_ratio: f64, ratio: f64) -> Self {
        self.eviction_high_watermark_ratio = high_watermark_ratio;
        self.eviction_ratio = ratio;
        self
    }

    /// Sets `client_live_ttl_ms`.
    pub fn with_client_live_ttl_ms(mut self, ms: u64) -> Self {
        self.client_live_ttl_ms = ms;
        self
    }

    /// Sets `put_start_discard_timeout_ms`.
    pub fn with_put_start_discard_timeout_ms(mut self, ms: u64) -> Self {
        self.put_start_discard_timeout_ms = ms;
        self
    }

    /// Sets `inflight_quarantine_ms`.
    pub fn with_inflight_quarantine_ms(mut self, ms: u64) -> Self {
        self.inflight_quarantine_ms = ms;
        self
    }

    /// Sets the soft pin default lifetime and whether soft pins may be evicted at all.
    pub fn with_soft_pin(mut self, default_ttl_ms: u64, allow_evict: bool) -> Self {
        self.default_soft_pin_ttl_ms = default_ttl_ms;
        self.allow_evict_soft_pinned = allow_evict;
        self
    }

    /// Sets `ramp_up_ms` (0 disables the ramp).
    pub fn with_ramp_up_ms(mut self, ms: u64) -> Self {
        self.ramp_up_ms = ms;
        self
    }

    /// Sets `failure_exclusion_ms`.
    pub fn with_failure_exclusion_ms(mut self, ms: u64) -> Self {
        self.failure_exclusion_ms = ms;
        self
    }

    /// Sets `alloc_align`.
    pub fn with_alloc_align(mut self, align: u64) -> Self {
        self.alloc_align = align;
        self
    }

    /// Sets `journal_max_entries`.
    pub fn with_journal_max_entries(mut self, n: usize) -> Self {
        self.journal_max_entries = n;
        self
    }

    /// Sets `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}
