//! The Conductor: KVCache-centric prefill/decode selection (FAST'25 Algorithm 1) with cache
//! load balancing and admission control (SLO check, early rejection, early rejection based on
//! prediction).
//!
//! # Cost of a decision
//!
//! Prefix matching walks the request's block keys once against a global index (block key →
//! bitset of prefill instances holding it), so it costs one hash lookup per matched block,
//! independent of how many blocks each instance caches and of the number of instances (≤ 128).
//! Per-instance terms are then O(1) each.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use mooncake_core::scheduler::{
    ClusterEvent, Decision, InstanceId, Placement, Pool, PrefixFetch, Rejection, ScheduleRequest,
    Scheduler,
};
use serde::{Deserialize, Serialize};

use crate::cost::CostModel;
pub use crate::index::{CacheIndex, ExpectedBlocks};
use crate::lru::BlockMap;

/// Most prefill instances one Conductor tracks (the cache index keeps one bit per instance).
pub const MAX_PREFILL_INSTANCES: u32 = 128;

/// Errors of the Conductor's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A configuration value is out of range.
    #[error("invalid Conductor configuration: {0}")]
    Config(String),
    /// A policy or admission name is unknown.
    #[error("unknown {kind} `{name}` (expected one of: {expected})")]
    UnknownName {
        /// What was being parsed.
        kind: &'static str,
        /// The name given.
        name: String,
        /// The accepted names.
        expected: &'static str,
    },
}

/// How the prefill instance is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Uniformly at random (seeded).
    Random,
    /// In turn.
    RoundRobin,
    /// Shortest predicted queue time.
    LoadBalance,
    /// Local cache-aware: minimum queue + prefill time given each instance's own prefix match
    /// (Algorithm 1 without transfers). Prefers the highest local match among equally loaded
    /// instances, never piles onto one holder of a hot block.
    LocalCache,
    /// Longest local prefix only, ties rotating (the Conductor repo's example proxy). Collapses
    /// onto one instance when all requests share a first block; kept to show that.
    MaxPrefix,
    /// Algorithm 1: queue + prefill time with the option to fetch the best prefix from another
    /// instance (global cache), with hot-block replication by fetch-and-keep.
    Mooncake,
}

impl Policy {
    /// All policies, in CLI spelling order.
    pub const ALL: [Self; 6] = [
        Self::Random,
        Self::RoundRobin,
        Self::LoadBalance,
        Self::LocalCache,
        Self::MaxPrefix,
        Self::Mooncake,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
            Self::LoadBalance => "load-balance",
            Self::LocalCache => "local-cache",
            Self::MaxPrefix => "max-prefix",
            Self::Mooncake => "mooncake",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Policy {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ScheduleError::UnknownName {
                kind: "policy",
                name: s.to_owned(),
                expected: "random, round-robin, load-balance, local-cache, max-prefix, mooncake",
            })
    }
}

/// Admission control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// Accept everything.
    None,
    /// Algorithm 1 step 6: reject when the predicted TTFT or TBT misses its SLO.
    Slo,
    /// arXiv v1 baseline: admit on prefill load only; the decode node checks after prefill.
    Baseline,
    /// Early rejection: reject on arrival when the prefill or the current decode pool load
    /// exceeds the threshold.
    Early,
    /// Early rejection based on prediction: the decode load is predicted for the time the
    /// request would reach decode (system-level: requests whose prefill will be done by then,
    /// plus decoding requests weighted by the observed survival of decode durations).
    Predicted,
}

impl Admission {
    /// All modes.
    pub const ALL: [Self; 5] = [
        Self::None,
        Self::Slo,
        Self::Baseline,
        Self::Early,
        Self::Predicted,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Slo => "slo",
            Self::Baseline => "baseline",
            Self::Early => "early",
            Self::Predicted => "predicted",
        }
    }
}

impl fmt::Display for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for Admission {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ScheduleError::UnknownName {
                kind: "admission",
                name: s.to_owned(),
                expected: "none, slo, baseline, early, predicted",
            })
    }
}

/// Configuration of a [`Conductor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ConductorConfig {
    /// Prefill selection policy.
    pub policy: Policy,
    /// Admission control.
    pub admission: Admission,
    /// Prefill instances (1..=128).
    pub prefill_instances: u32,
    /// Decode instances (≥ 1).
    pub decode_instances: u32,
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// Cost model used for predictions.
    pub cost: CostModel,
    /// TTFT SLO, seconds.
    pub ttft_slo_s: f64,
    /// TBT SLO, seconds.
    pub tbt_slo_s: f64,
    /// Algorithm 1's `kvcache_balancing_threshold`: fetch when `best_len / local_len` exceeds it.
    /// `None` evaluates both options per instance and keeps the faster (our default).
    pub balancing_threshold: Option<f64>,
    /// Load (predicted latency / SLO, or KV / VRAM) above which early rejection refuses.
    pub load_threshold: f64,
    /// Uniform decode duration `t_d` prediction-based rejection assumes until the first decode
    /// has finished, seconds; from then on it uses the observed durations (their survival for
    /// the prediction, their mean for [`Conductor::decode_time_estimate`]).
    pub decode_time_s: f64,
    /// Seed of the random policy.
    pub seed: u64,
    /// Algorithm 1 step 8, the cache half: when set, an accepted request's blocks are booked
    /// at once as *expected* on the chosen prefill instance (so the next request with the same
    /// prefix goes there too), until KV events confirm or refute them (`BlocksStored` /
    /// `BlocksRemoved` for that instance), the request ends (`DecodeFinished` / `Dropped`),
    /// or this many seconds pass after its predicted TTFT. `None` (the default, and what the
    /// simulator uses) indexes blocks only when they are reported stored.
    pub expected_ttl_s: Option<f64>,
}

impl Default for ConductorConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Mooncake,
            admission: Admission::None,
            prefill_instances: 8,
            decode_instances: 8,
            block_tokens: 512,
            cost: CostModel::default(),
            ttft_slo_s: 30.0,
            tbt_slo_s: 0.1,
            balancing_threshold: None,
            load_threshold: 1.0,
            decode_time_s: 10.0,
            seed: 0x6d6f_6f6e_6361_6b65,
            expected_ttl_s: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Queued,
    Prefilling,
    AtDecode,
    Decoding,
}

#[derive(Debug, Clone)]
struct Booked {
    prefill: u32,
    decode: u32,
    predicted_prefill_s: f64,
    predicted_ready_s: f64,
    /// Mean context over the decode (prompt plus half the output): the step-time term.
    context_tokens: u64,
    /// HBM the decode node reserves (prompt plus output), as its local check counts it.
    kv_tokens: u64,
    stage: Stage,
    decode_start_s: f64,
    /// Blocks booked as expected on the prefill instance (a buffer of the Conductor's pool).
    expected: Option<Vec<u64>>,
    /// Stamp of the expected-block booking ([`ExpectedBlocks::add`]): which booking of this
    /// request id the deadline heap's entries refer to, and what its release passes back.
    generation: u64,
}

#[derive(Debug, Clone, Default)]
struct PrefillView {
    /// Request in prefill: (start, predicted duration).
    current: Option<(f64, f64)>,
    /// Predicted prefill seconds booked but not started.
    pending_s: f64,
    /// When this instance's NIC is free of the fetches the Conductor ordered from it.
    nic_free_s: f64,
}

impl PrefillView {
    fn queue_s(&self, now: f64) -> f64 {
        let cur = self.current.map_or(0.0, |(s, d)| (s + d - now).max(0.0));
        cur + self.pending_s.max(0.0)
    }
}

/// Requests, context tokens (step time) and reserved KV tokens (HBM) of a group of requests.
#[derive(Debug, Clone, Copy, Default)]
struct Group {
    n: u64,
    ctx: u64,
    kv: u64,
}

impl Group {
    fn add(&mut self, b: &Booked) {
        self.n += 1;
        self.ctx += b.context_tokens;
        self.kv += b.kv_tokens;
    }

    fn sub(&mut self, b: &Booked) {
        self.n -= 1;
        self.ctx -= b.context_tokens;
        self.kv -= b.kv_tokens;
    }
}

#[derive(Debug, Clone, Default)]
struct DecodeView {
    running: Group,
    /// Accepted, not yet decoding (in prefill or waiting at the decode node).
    incoming: Group,
    /// Of `incoming`, those whose prefill finished (their KV is at the decode node).
    arrived: Group,
}

/// Observed decode durations in log-spaced bins (10 per decade, 1 ms to 10⁵ s), for the
/// survival function the prediction-based admission uses.
#[derive(Debug, Clone)]
struct DurationHistogram {
    bins: [u32; Self::BINS],
    total: u32,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        Self {
            bins: [0; Self::BINS],
            total: 0,
        }
    }
}

impl DurationHistogram {
    const BINS: usize = 80;
    const MIN_S: f64 = 1e-3;

    /// Bin `k` holds durations in `[10^(k/10 − 3), 10^((k+1)/10 − 3))` s; the first and last
    /// take everything below and above. Found by a search over the edges, cheaper than a
    /// `log10`: a prediction-based decision looks up two bins per booked request.
    fn bin(x: f64) -> usize {
        static EDGES: LazyLock<[f64; DurationHistogram::BINS - 1]> = LazyLock::new(|| {
            std::array::from_fn(|k| 10f64.powf((k + 1) as f64 / 10.0) * DurationHistogram::MIN_S)
        });
        EDGES.partition_point(|&e| e <= x)
    }

    fn add(&mut self, x: f64) {
        self.bins[Self::bin(x)] += 1;
        self.total += 1;
    }

    /// Kaplan–Meier survival table of the finished durations and of `censored`, the ages of
    /// decodes still running (each lasts at least its age). Without the running ones the
    /// table would only know the decodes short enough to have finished: while long decodes
    /// are in flight it would predict them gone too early.
    fn survival_table(&self, censored: impl Iterator<Item = f64>) -> SurvivalTable {
        let mut at_least = [0u32; Self::BINS];
        for age in censored {
            at_least[Self::bin(age)] += 1;
        }
        let mut s = [1.0f64; Self::BINS + 1];
        // Observations in bin `k` or later: the ones at risk in bin `k` (a decode censored in
        // bin `k` counts as surviving it, the usual tie rule).
        let mut risk: u32 = self.total + at_least.iter().sum::<u32>();
        for k in 0..Self::BINS {
            let ended = self.bins[k];
            s[k + 1] = if ended == 0 {
                s[k]
            } else {
                s[k] * (1.0 - f64::from(ended) / f64::from(risk))
            };
            risk -= ended + at_least[k];
        }
        SurvivalTable { s }
    }
}

/// `s[k]`: estimated share of decodes lasting into bin `k` of [`DurationHistogram`] or later.
struct SurvivalTable {
    s: [f64; DurationHistogram::BINS + 1],
}

impl SurvivalTable {
    /// Estimated share of decodes lasting longer than `x` seconds (`x`'s bin counted whole).
    fn survival(&self, x: f64) -> f64 {
        self.s[DurationHistogram::bin(x)]
    }
}

/// Counters of the Conductor's decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConductorStats {
    /// Requests accepted.
    pub accepted: u64,
    /// Requests rejected.
    pub rejected: u64,
    /// Accepted requests that fetch a prefix from another instance.
    pub fetches: u64,
}

/// Small, fast, seedable generator (SplitMix64) for the random policy.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The Conductor: implements [`Scheduler`].
#[derive(Debug, Clone)]
pub struct Conductor {
    cfg: ConductorConfig,
    index: CacheIndex,
    prefill: Vec<PrefillView>,
    decode: Vec<DecodeView>,
    booked: BlockMap<Booked>,
    rng: SplitMix64,
    rr_next: u32,
    scratch: Vec<u32>,
    /// Per instance, the part of its prefix match the index holds (the rest is expected).
    scratch_indexed: Vec<u32>,
    decode_time_sum: f64,
    decode_time_n: u64,
    decode_time_hist: DurationHistogram,
    stats: ConductorStats,
    expected: ExpectedBlocks,
    /// (deadline as f64 bits, request, generation): when a booking's expectation lapses.
    /// Entries of bookings released otherwise stay until popped or compacted away.
    expected_deadlines: BinaryHeap<Reverse<(u64, u64, u64)>>,
    /// Entries of `expected_deadlines` whose booking's expectation was already released.
    expected_stale: usize,
    /// Emptied key buffers of released bookings, reused for the next ones.
    expected_pool: Vec<Vec<u64>>,
    /// Prefill instances a request may be placed on.
    candidates: u128,
    /// Instances that serve as prefix sources only (the store's pseudo-instance).
    sources: u128,
    decode_enabled: Vec<bool>,
    decode_vram: Vec<u64>,
}

/// What a candidate prefill instance would give.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    instance: u32,
    ttft: f64,
    prefill_s: f64,
    prefix_blocks: u32,
    fetch: Option<PrefixFetch>,
    fetch_s: f64,
}

impl Conductor {
    /// A Conductor for an empty cluster.
    pub fn new(cfg: ConductorConfig) -> Result<Self, ScheduleError> {
        if cfg.prefill_instances == 0 || cfg.prefill_instances > MAX_PREFILL_INSTANCES {
            return Err(ScheduleError::Config(format!(
                "prefill_instances must be in 1..={MAX_PREFILL_INSTANCES}, got {}",
                cfg.prefill_instances
            )));
        }
        if cfg.decode_instances == 0 {
            return Err(ScheduleError::Config("decode_instances must be ≥ 1".into()));
        }
        if cfg.block_tokens == 0 {
            return Err(ScheduleError::Config("block_tokens must be ≥ 1".into()));
        }
        if cfg.expected_ttl_s.is_some_and(|t| t.is_nan() || t < 0.0) {
            return Err(ScheduleError::Config("expected_ttl_s must be ≥ 0".into()));
        }
        if !(cfg.ttft_slo_s > 0.0 && cfg.tbt_slo_s > 0.0 && cfg.load_threshold > 0.0) {
            return Err(ScheduleError::Config(
                "SLOs and load threshold must be positive".into(),
            ));
        }
        Ok(Self {
            index: CacheIndex::default(),
            prefill: vec![PrefillView::default(); cfg.prefill_instances as usize],
            decode: vec![DecodeView::default(); cfg.decode_instances as usize],
            booked: BlockMap::default(),
            rng: SplitMix64::new(cfg.seed),
            rr_next: 0,
            scratch: Vec::new(),
            scratch_indexed: Vec::new(),
            decode_time_sum: 0.0,
            decode_time_n: 0,
            decode_time_hist: DurationHistogram::default(),
            stats: ConductorStats::default(),
            expected: ExpectedBlocks::default(),
            expected_deadlines: BinaryHeap::new(),
            expected_stale: 0,
            expected_pool: Vec::new(),
            candidates: crate::index::all_bits(cfg.prefill_instances),
            sources: 0,
            decode_enabled: vec![true; cfg.decode_instances as usize],
            decode_vram: vec![cfg.cost.vram_tokens; cfg.decode_instances as usize],
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ConductorConfig {
        &self.cfg
    }

    /// Decision counters.
    pub fn stats(&self) -> ConductorStats {
        self.stats
    }

    /// The global cache index (for inspection and replica statistics).
    pub fn index(&self) -> &CacheIndex {
        &self.index
    }

    /// Predicted queue time of prefill instance `i` at `now_s`.
    pub fn prefill_queue_s(&self, i: InstanceId, now_s: f64) -> f64 {
        self.prefill[i as usize].queue_s(now_s)
    }

    /// Prefill instance slots (enabled or not, source-only included).
    pub fn prefill_instances(&self) -> u32 {
        self.cfg.prefill_instances
    }

    /// Decode instance slots (enabled or not).
    pub fn decode_instances(&self) -> u32 {
        self.cfg.decode_instances
    }

    /// Adds a prefill instance slot (enabled, empty cache, idle) and returns its id.
    pub fn add_prefill_instance(&mut self) -> Result<InstanceId, ScheduleError> {
        let i = self.cfg.prefill_instances;
        if i >= MAX_PREFILL_INSTANCES {
            return Err(ScheduleError::Config(format!(
                "at most {MAX_PREFILL_INSTANCES} prefill instances"
            )));
        }
        self.cfg.prefill_instances += 1;
        self.prefill.push(PrefillView::default());
        self.candidates |= 1u128 << i;
        Ok(i)
    }

    /// Adds a decode instance slot (enabled, idle, the cost model's HBM) and returns its id.
    pub fn add_decode_instance(&mut self) -> InstanceId {
        let d = self.cfg.decode_instances;
        self.cfg.decode_instances += 1;
        self.decode.push(DecodeView::default());
        self.decode_enabled.push(true);
        self.decode_vram.push(self.cfg.cost.vram_tokens);
        d
    }

    /// Whether prefill instance `i` may be chosen for new requests. A disabled instance keeps
    /// its bookings (they are released as usual) and is no fetch source either.
    pub fn set_prefill_enabled(&mut self, i: InstanceId, enabled: bool) {
        if i >= self.cfg.prefill_instances {
            return;
        }
        let bit = 1u128 << i;
        self.sources &= !bit;
        if enabled {
            self.candidates |= bit;
        } else {
            self.candidates &= !bit;
        }
    }

    /// Makes instance `i` a prefix source only (e.g. the store's pseudo-instance): its blocks
    /// can be fetched (Algorithm 1's fetch branch) but no request is placed on it.
    pub fn set_source_only(&mut self, i: InstanceId) {
        if i < self.cfg.prefill_instances {
            let bit = 1u128 << i;
            self.candidates &= !bit;
            self.sources |= bit;
        }
    }

    /// Whether prefill instance `i` may be chosen.
    pub fn prefill_enabled(&self, i: InstanceId) -> bool {
        i < self.cfg.prefill_instances && self.candidates & (1u128 << i) != 0
    }

    /// Whether decode instance `d` may be chosen for new requests.
    pub fn set_decode_enabled(&mut self, d: InstanceId, enabled: bool) {
        if let Some(e) = self.decode_enabled.get_mut(d as usize) {
            *e = enabled;
        }
    }

    /// Whether decode instance `d` may be chosen.
    pub fn decode_enabled(&self, d: InstanceId) -> bool {
        self.decode_enabled
            .get(d as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Sets the KV capacity (tokens of HBM) of decode instance `d` (default: the cost model's
    /// `vram_tokens`).
    pub fn set_decode_capacity(&mut self, d: InstanceId, tokens: u64) {
        if let Some(v) = self.decode_vram.get_mut(d as usize) {
            *v = tokens;
        }
    }

    /// Forgets every block prefill instance `i` holds or is expected to hold (its engine
    /// cleared its cache, restarted, or left). O(blocks indexed).
    pub fn clear_instance_blocks(&mut self, i: InstanceId) {
        if i < self.cfg.prefill_instances {
            self.index.clear_instance(i);
            self.expected.clear_instance(i);
        }
    }

    /// Resets prefill instance `i`'s queue and NIC views (its slot is reused for a new
    /// instance).
    pub fn reset_prefill_view(&mut self, i: InstanceId) {
        if let Some(v) = self.prefill.get_mut(i as usize) {
            *v = PrefillView::default();
        }
    }

    /// Resets decode instance `d`'s load view and capacity (its slot is reused).
    pub fn reset_decode_view(&mut self, d: InstanceId) {
        if let Some(v) = self.decode.get_mut(d as usize) {
            *v = DecodeView::default();
            self.decode_vram[d as usize] = self.cfg.cost.vram_tokens;
        }
    }

    /// Sets the TTFT and TBT SLOs (seconds) later decisions are admitted against.
    pub fn set_slo(&mut self, ttft_s: f64, tbt_s: f64) {
        if ttft_s > 0.0 {
            self.cfg.ttft_slo_s = ttft_s;
        }
        if tbt_s > 0.0 {
            self.cfg.tbt_slo_s = tbt_s;
        }
    }

    /// The blocks booked as expected and not yet settled.
    pub fn expected(&self) -> &ExpectedBlocks {
        &self.expected
    }

    /// Accepted requests not yet finished or dropped.
    pub fn in_flight(&self) -> usize {
        self.booked.len()
    }

    /// Requests (and their predicted KV tokens) booked on decode instance `d`: decoding, and
    /// on their way.
    pub fn decode_load(&self, d: InstanceId) -> (u64, u64) {
        self.decode.get(d as usize).map_or((0, 0), |v| {
            (v.running.n + v.incoming.n, v.running.kv + v.incoming.kv)
        })
    }

    /// Entries waiting in the expiry heap (live bookings with expected blocks, plus released
    /// ones not yet compacted away: at most twice the live ones plus a constant).
    pub fn expected_pending(&self) -> usize {
        self.expected_deadlines.len()
    }

    fn expire_expected(&mut self, now: f64) {
        while let Some(&Reverse((deadline, req, generation))) = self.expected_deadlines.peek() {
            if f64::from_bits(deadline) > now {
                break;
            }
            self.expected_deadlines.pop();
            match self.booked.get_mut(&req) {
                Some(b) if b.generation == generation && b.expected.is_some() => {
                    let keys = b.expected.take().unwrap_or_default();
                    self.expected.release(b.prefill, &keys, generation);
                    Self::recycle(&mut self.expected_pool, keys);
                }
                _ => self.expected_stale -= 1,
            }
        }
    }

    /// Returns a booking's key buffer to the pool.
    fn recycle(pool: &mut Vec<Vec<u64>>, mut keys: Vec<u64>) {
        const POOL: usize = 1024;
        if pool.len() < POOL {
            keys.clear();
            pool.push(keys);
        }
    }

    /// One more expiry entry's booking was released before its deadline; drops such entries
    /// once they are half of the heap, so the heap stays within twice the live bookings
    /// whatever the clock does (each compaction is paid for by as many releases).
    fn expected_released_early(&mut self) {
        self.expected_stale += 1;
        if self.expected_stale > 64 && self.expected_stale * 2 > self.expected_deadlines.len() {
            let booked = &self.booked;
            self.expected_deadlines
                .retain(|&Reverse((_, req, generation))| {
                    booked
                        .get(&req)
                        .is_some_and(|b| b.generation == generation && b.expected.is_some())
                });
            self.expected_stale = 0;
        }
    }

    /// Current uniform decode-duration estimate `t_d`, seconds.
    pub fn decode_time_estimate(&self) -> f64 {
        if self.decode_time_n == 0 {
            self.cfg.decode_time_s
        } else {
            self.decode_time_sum / self.decode_time_n as f64
        }
    }

    fn prefix_tokens(&self, req: &ScheduleRequest, blocks: u32) -> u64 {
        // The last prompt token is always computed (its logits give the first output token).
        (u64::from(blocks) * u64::from(self.cfg.block_tokens))
            .min(u64::from(req.input_tokens).saturating_sub(1))
    }

    fn candidate(
        &self,
        req: &ScheduleRequest,
        i: u32,
        prefix_blocks: u32,
        fetch: Option<PrefixFetch>,
        fetch_s: f64,
        now: f64,
    ) -> Candidate {
        let n = u64::from(req.input_tokens);
        let p = self.prefix_tokens(req, prefix_blocks);
        let cost = &self.cfg.cost;
        let prefill_s = cost.prefill_exec_time(n, p);
        let queue = self.prefill[i as usize].queue_s(now);
        // The decode node loads the KV into HBM before the request joins (and delivers its
        // first token); a one-token request ends when its KV arrives.
        let join_load = if req.output_tokens > 1 {
            cost.prefix_load_time(n)
        } else {
            0.0
        };
        let ttft = queue.max(fetch_s) + prefill_s + cost.kv_stream_tail(n, prefill_s) + join_load;
        Candidate {
            instance: i,
            ttft,
            prefill_s,
            prefix_blocks,
            fetch,
            fetch_s,
        }
    }

    fn pick_prefill(&mut self, req: &ScheduleRequest, now: f64) -> Candidate {
        let np = self.cfg.prefill_instances;
        let mut lens = std::mem::take(&mut self.scratch);
        let holders = self.candidates | self.sources;
        let (best_len, best_set) = if self.expected.is_empty() {
            self.index
                .match_prefix_masked(&req.block_hashes, np, holders, &mut lens, |_| 0)
        } else {
            let ex = &self.expected;
            self.index.match_prefix_split(
                &req.block_hashes,
                np,
                holders,
                &mut lens,
                &mut self.scratch_indexed,
                |k| ex.get(k),
            )
        };
        let start = self.rr_next % np;
        let chosen = match self.cfg.policy {
            Policy::Random => {
                let n = self.candidates.count_ones();
                let mut k = self.rng.below(u64::from(n)) as u32;
                let mut set = self.candidates;
                while k > 0 {
                    set &= set - 1;
                    k -= 1;
                }
                let i = set.trailing_zeros();
                self.candidate(req, i, lens[i as usize], None, 0.0, now)
            }
            Policy::RoundRobin => {
                let i = (0..np)
                    .map(|k| (start + k) % np)
                    .find(|&i| self.candidates & (1u128 << i) != 0)
                    .unwrap_or(start);
                self.rr_next = i.wrapping_add(1);
                self.candidate(req, i, lens[i as usize], None, 0.0, now)
            }
            Policy::LoadBalance => {
                let i = self.argmin(start, |s, i| s.prefill[i as usize].queue_s(now));
                self.rr_next = self.rr_next.wrapping_add(1);
                self.candidate(req, i, lens[i as usize], None, 0.0, now)
            }
            Policy::MaxPrefix => {
                let i = self.argmin(start, |_, i| -f64::from(lens[i as usize]));
                self.rr_next = self.rr_next.wrapping_add(1);
                self.candidate(req, i, lens[i as usize], None, 0.0, now)
            }
            Policy::LocalCache => {
                let mut best: Option<Candidate> = None;
                for k in 0..np {
                    let i = (start + k) % np;
                    if self.candidates & (1u128 << i) == 0 {
                        continue;
                    }
                    let c = self.candidate(req, i, lens[i as usize], None, 0.0, now);
                    if best.is_none_or(|b| c.ttft < b.ttft) {
                        best = Some(c);
                    }
                }
                self.rr_next = self.rr_next.wrapping_add(1);
                best.expect("at least one prefill instance")
            }
            Policy::Mooncake => {
                // The fetch source: among holders of the best prefix, the least busy NIC.
                let mut source = None;
                let mut set = best_set;
                while set != 0 {
                    let b = set.trailing_zeros();
                    set &= set - 1;
                    let free = self.prefill[b as usize].nic_free_s;
                    if source.is_none_or(|(_, f)| free < f) {
                        source = Some((b, free));
                    }
                }
                let mut best: Option<Candidate> = None;
                for k in 0..np {
                    let i = (start + k) % np;
                    if self.candidates & (1u128 << i) == 0 {
                        continue;
                    }
                    let local = lens[i as usize];
                    let local_c = self.candidate(req, i, local, None, 0.0, now);
                    let mut c = local_c;
                    if let Some((src, src_free)) = source
                        && best_len > local
                    {
                        let first = self.prefix_tokens(req, local);
                        let tokens = self.prefix_tokens(req, best_len).saturating_sub(first);
                        let fetch_s =
                            (src_free - now).max(0.0) + self.cfg.cost.transfer_time(tokens);
                        let fetch = PrefixFetch {
                            source: src,
                            blocks: best_len,
                            local_blocks: local,
                        };
                        let fetch_c = self.candidate(req, i, best_len, Some(fetch), fetch_s, now);
                        let take_fetch = match self.cfg.balancing_threshold {
                            Some(th) => local == 0 || f64::from(best_len) / f64::from(local) > th,
                            None => fetch_c.ttft < local_c.ttft,
                        };
                        if take_fetch {
                            c = fetch_c;
                        }
                    }
                    if best.is_none_or(|b| c.ttft < b.ttft) {
                        best = Some(c);
                    }
                }
                self.rr_next = self.rr_next.wrapping_add(1);
                best.expect("at least one prefill instance")
            }
        };
        self.scratch = lens;
        chosen
    }

    /// Index in `0..prefill_instances` minimising `f`, scanning from `start` (ties keep the
    /// first seen, so rotating `start` spreads ties).
    fn argmin(&self, start: u32, f: impl Fn(&Self, u32) -> f64) -> u32 {
        let np = self.cfg.prefill_instances;
        let mut best = (start, f64::INFINITY);
        for k in 0..np {
            let i = (start + k) % np;
            if self.candidates & (1u128 << i) == 0 {
                continue;
            }
            let v = f(self, i);
            if v < best.1 {
                best = (i, v);
            }
        }
        best.0
    }

    fn context_tokens(req: &ScheduleRequest) -> u64 {
        u64::from(req.input_tokens) + u64::from(req.output_tokens) / 2
    }

    /// Picks the decode instance with the lowest predicted step time whose HBM fits the
    /// request, or the least-filled one if none fits. Returns (instance, predicted TBT).
    fn pick_decode(&self, req: &ScheduleRequest) -> (u32, f64) {
        let cost = &self.cfg.cost;
        let need = u64::from(req.input_tokens) + u64::from(req.output_tokens);
        let ctx = Self::context_tokens(req);
        let mut best_fit: Option<(u32, f64)> = None;
        let mut least: Option<(u32, u64, f64)> = None;
        let nd = self.cfg.decode_instances;
        let start = self.rr_next % nd;
        for k in 0..nd {
            let d = (start + k) % nd;
            if !self.decode_enabled[d as usize] {
                continue;
            }
            let vram = self.decode_vram[d as usize];
            let v = &self.decode[d as usize];
            let kv = v.running.kv + v.incoming.kv;
            let step = cost.decode_step(
                v.running.n + v.incoming.n + 1,
                v.running.ctx + v.incoming.ctx + ctx,
            );
            if kv + need <= vram && best_fit.is_none_or(|(_, s)| step < s) {
                best_fit = Some((d, step));
            }
            if least.is_none_or(|(_, l, _)| kv < l) {
                least = Some((d, kv, step));
            }
        }
        best_fit.unwrap_or_else(|| {
            let (d, _, s) = least.expect("at least one decode instance");
            (d, s)
        })
    }

    /// Load of decode instance `d` if the request (`ctx` context tokens, `need` KV tokens)
    /// joined it now: requests decoding plus those whose KV already reached the node, the
    /// same requests and HBM reservations the node's local check counts.
    fn decode_load_now(&self, d: u32, ctx: u64, need: u64) -> f64 {
        let v = &self.decode[d as usize];
        let cost = &self.cfg.cost;
        let step = cost.decode_step(
            v.running.n + v.arrived.n + 1,
            v.running.ctx + v.arrived.ctx + ctx,
        );
        (step / self.cfg.tbt_slo_s)
            .max((v.running.kv + v.arrived.kv + need) as f64 / self.decode_vram[d as usize] as f64)
    }

    /// Load of decode instance `d` predicted at time `t`, when the request would join it
    /// (system-level prediction of arXiv v1 §6: no per-request output length): every request
    /// booked on `d` weighted by the chance it is decoding at `t`. A decoding request counts
    /// with the chance its decode lasts until `t`; one whose KV is at the node with that of a
    /// decode starting now; one in prefill only if its prefill is predicted to end by `t`, with
    /// that of a decode starting then. The paper assumes a uniform decode time `t_d` and drops
    /// every request older than it; with long-tailed outputs the requests in flight at any
    /// moment are mostly the long ones, so once decodes have been observed the chance is taken
    /// from their durations: `S(age at t) / S(age now)`, `S` the Kaplan–Meier survival of the
    /// finished decodes with the running ones as censored observations.
    fn decode_load_at(&self, d: u32, now: f64, t: f64, ctx: u64, need: u64) -> f64 {
        let td = self.decode_time_estimate();
        let hist = &self.decode_time_hist;
        let table = (hist.total > 0).then(|| {
            hist.survival_table(
                self.booked
                    .values()
                    .filter(|b| b.stage == Stage::Decoding)
                    .map(|b| now - b.decode_start_s),
            )
        });
        // Chance that a decode started at `start` still runs at `t`, given it runs at `from`.
        let still = |start: f64, from: f64| {
            let Some(hist) = &table else {
                return f64::from(u8::from(t - start < td));
            };
            let s_from = hist.survival((from - start).max(0.0));
            if s_from <= 0.0 {
                1.0
            } else {
                (hist.survival((t - start).max(0.0)) / s_from).min(1.0)
            }
        };
        let (mut batch, mut tokens, mut kv) = (1.0f64, ctx as f64, need as f64);
        for b in self.booked.values() {
            if b.decode != d {
                continue;
            }
            let present = match b.stage {
                Stage::Decoding => still(b.decode_start_s, now),
                // Its KV is at the node: its decode starts now at the earliest.
                Stage::AtDecode => still(now, now),
                // Its decode starts when its prefill is predicted to end; before then it is
                // not at the node, and by `t` its decode may already be over.
                Stage::Queued | Stage::Prefilling if b.predicted_ready_s > t => 0.0,
                Stage::Queued | Stage::Prefilling => {
                    still(b.predicted_ready_s, b.predicted_ready_s)
                }
            };
            batch += present;
            tokens += present * b.context_tokens as f64;
            kv += present * b.kv_tokens as f64;
        }
        let cost = &self.cfg.cost;
        let step = cost.decode_c0 + cost.decode_c1 * batch + cost.decode_c2 * tokens;
        (step / self.cfg.tbt_slo_s).max(kv / self.decode_vram[d as usize] as f64)
    }

    fn admit(
        &self,
        req: &ScheduleRequest,
        c: &Candidate,
        d: u32,
        tbt: f64,
        now: f64,
    ) -> Option<Rejection> {
        let prefill_load = c.ttft / self.cfg.ttft_slo_s;
        let th = self.cfg.load_threshold;
        match self.cfg.admission {
            Admission::None => None,
            Admission::Slo => {
                if c.ttft > self.cfg.ttft_slo_s {
                    Some(Rejection::TtftSlo {
                        predicted_s: c.ttft,
                    })
                } else if tbt > self.cfg.tbt_slo_s {
                    Some(Rejection::TbtSlo { predicted_s: tbt })
                } else {
                    None
                }
            }
            Admission::Baseline => (prefill_load > th).then_some(Rejection::Overloaded {
                pool: Pool::Prefill,
                load: prefill_load,
            }),
            Admission::Early | Admission::Predicted => {
                if prefill_load > th {
                    return Some(Rejection::Overloaded {
                        pool: Pool::Prefill,
                        load: prefill_load,
                    });
                }
                let ctx = Self::context_tokens(req);
                let need = u64::from(req.input_tokens) + u64::from(req.output_tokens);
                let decode_load = if self.cfg.admission == Admission::Early {
                    self.decode_load_now(d, ctx, need)
                } else {
                    // The request reaches decode after its predicted TTFT.
                    self.decode_load_at(d, now, now + c.ttft, ctx, need)
                };
                (decode_load > th).then_some(Rejection::Overloaded {
                    pool: Pool::Decode,
                    load: decode_load,
                })
            }
        }
    }
}

impl Scheduler for Conductor {
    fn schedule(&mut self, req: &ScheduleRequest, now_s: f64) -> Decision {
        self.expire_expected(now_s);
        let none = if self.candidates == 0 {
            Some(Pool::Prefill)
        } else if !self.decode_enabled.contains(&true) {
            Some(Pool::Decode)
        } else {
            None
        };
        if let Some(pool) = none {
            self.stats.rejected += 1;
            return Decision::Reject(Rejection::Overloaded {
                pool,
                load: f64::INFINITY,
            });
        }
        let c = self.pick_prefill(req, now_s);
        // The chosen instance's prefix the index holds (`pick_prefill` matched against the
        // expected view only when it was not empty).
        let indexed_prefix = if self.expected.is_empty() {
            self.scratch[c.instance as usize]
        } else {
            self.scratch_indexed[c.instance as usize]
        } as usize;
        let (d, tbt) = self.pick_decode(req);
        if let Some(r) = self.admit(req, &c, d, tbt, now_s) {
            self.stats.rejected += 1;
            tracing::trace!(request = req.id, ?r, "rejected");
            return Decision::Reject(r);
        }
        self.stats.accepted += 1;
        // Book: prefill queue, fetch NIC, decode load.
        let pv = &mut self.prefill[c.instance as usize];
        pv.pending_s += c.prefill_s;
        if let Some(f) = c.fetch {
            self.stats.fetches += 1;
            let src = &mut self.prefill[f.source as usize];
            src.nic_free_s = now_s + c.fetch_s;
        }
        let mut booked = Booked {
            prefill: c.instance,
            decode: d,
            predicted_prefill_s: c.prefill_s,
            predicted_ready_s: now_s + c.ttft,
            context_tokens: Self::context_tokens(req),
            kv_tokens: u64::from(req.input_tokens) + u64::from(req.output_tokens),
            stage: Stage::Queued,
            decode_start_s: 0.0,
            expected: None,
            generation: 0,
        };
        if let Some(old) = self.booked.remove(&req.id) {
            // A driver reusing an id in flight: release the old booking first.
            self.release(req.id, old, false, now_s);
        }
        if let Some(ttl) = self.cfg.expected_ttl_s {
            // The blocks the instance will hold once the request's prefill ran, less the
            // leading ones the index already has it hold: an expectation of a held block
            // changes no match while it is held, and the event that removes it from the index
            // (`BlocksRemoved`, a clear) settles such an expectation in the same step.
            let keys = &req.block_hashes;
            let held = indexed_prefix.min(keys.len());
            if held < keys.len() {
                let mut buf = self.expected_pool.pop().unwrap_or_default();
                buf.extend_from_slice(&keys[held..]);
                booked.generation = self.expected.add(c.instance, &buf);
                booked.expected = Some(buf);
                let deadline = (now_s + c.ttft + ttl).max(0.0);
                self.expected_deadlines.push(Reverse((
                    deadline.to_bits(),
                    req.id,
                    booked.generation,
                )));
            }
        }
        self.decode[d as usize].incoming.add(&booked);
        self.booked.insert(req.id, booked);
        tracing::trace!(
            request = req.id,
            prefill = c.instance,
            decode = d,
            ttft = c.ttft,
            prefix_blocks = c.prefix_blocks,
            fetch = c.fetch.is_some(),
            "placed"
        );
        Decision::Accept(Placement {
            prefill: c.instance,
            decode: d,
            reused_tokens: self.prefix_tokens(req, c.prefix_blocks),
            fetch: c.fetch,
            predicted_ttft_s: c.ttft,
            predicted_tbt_s: tbt,
        })
    }

    fn observe(&mut self, event: ClusterEvent<'_>, now_s: f64) {
        match event {
            ClusterEvent::BlocksStored {
                instance,
                block_hashes,
            } => {
                if instance < self.cfg.prefill_instances {
                    self.index.store(instance, block_hashes);
                    self.expected.settle(instance, block_hashes);
                }
            }
            ClusterEvent::BlocksRemoved {
                instance,
                block_hashes,
            } => {
                if instance < self.cfg.prefill_instances {
                    self.index.remove(instance, block_hashes);
                    self.expected.settle(instance, block_hashes);
                }
            }
            ClusterEvent::PrefillStarted { request, .. } => {
                if let Some(b) = self.booked.get_mut(&request)
                    && b.stage == Stage::Queued
                {
                    b.stage = Stage::Prefilling;
                    let pv = &mut self.prefill[b.prefill as usize];
                    pv.pending_s -= b.predicted_prefill_s;
                    pv.current = Some((now_s, b.predicted_prefill_s));
                }
            }
            ClusterEvent::PrefillFinished { request, .. } => {
                if let Some(b) = self.booked.get_mut(&request)
                    && b.stage == Stage::Prefilling
                {
                    b.stage = Stage::AtDecode;
                    self.prefill[b.prefill as usize].current = None;
                    self.decode[b.decode as usize].arrived.add(b);
                }
            }
            ClusterEvent::DecodeStarted { request, .. } => {
                if let Some(b) = self.booked.get_mut(&request)
                    && b.stage == Stage::AtDecode
                {
                    b.stage = Stage::Decoding;
                    b.decode_start_s = now_s;
                    let dv = &mut self.decode[b.decode as usize];
                    dv.arrived.sub(b);
                    dv.incoming.sub(b);
                    dv.running.add(b);
                }
            }
            ClusterEvent::DecodeFinished { request, .. } | ClusterEvent::Dropped { request } => {
                if let Some(b) = self.booked.remove(&request) {
                    let finished = matches!(event, ClusterEvent::DecodeFinished { .. });
                    self.release(request, b, finished, now_s);
                }
            }
        }
    }
}

impl Conductor {
    /// Releases what `b` booked (queue, decode load, expected blocks).
    fn release(&mut self, _request: u64, mut b: Booked, finished: bool, now_s: f64) {
        if let Some(keys) = b.expected.take() {
            self.expected.release(b.prefill, &keys, b.generation);
            Self::recycle(&mut self.expected_pool, keys);
            self.expected_released_early();
        }
        let pv = &mut self.prefill[b.prefill as usize];
        let dv = &mut self.decode[b.decode as usize];
        match b.stage {
            Stage::Queued => {
                pv.pending_s -= b.predicted_prefill_s;
                dv.incoming.sub(&b);
            }
            Stage::Prefilling => {
                pv.current = None;
                dv.incoming.sub(&b);
            }
            Stage::AtDecode => {
                dv.arrived.sub(&b);
                dv.incoming.sub(&b);
            }
            Stage::Decoding => {
                dv.running.sub(&b);
                if finished {
                    self.decode_time_sum += now_s - b.decode_start_s;
                    self.decode_time_n += 1;
                    self.decode_time_hist.add(now_s - b.decode_start_s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(policy: Policy, np: u32, nd: u32) -> ConductorConfig {
        ConductorConfig {
            policy,
            prefill_instances: np,
            decode_instances: nd,
            ..ConductorConfig::default()
        }
    }

    fn req(id: u64, blocks: std::ops::Range<u64>) -> ScheduleRequest {
        let hashes: Vec<u64> = blocks.collect();
        ScheduleRequest {
            id,
            input_tokens: hashes.len() as u32 * 512,
            output_tokens: 10,
            block_hashes: hashes,
        }
    }

    fn accept(d: Decision) -> Placement {
        match d {
            Decision::Accept(p) => p,
            Decision::Reject(r) => panic!("rejected: {r:?}"),
        }
    }

    #[test]
    fn parses_names() {
        for p in Policy::ALL {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
        }
        for a in Admission::ALL {
            assert_eq!(a.to_string().parse::<Admission>().unwrap(), a);
        }
        let e = "nope".parse::<Policy>().unwrap_err();
        assert!(e.to_string().contains("unknown policy `nope`"), "{e}");
    }

    #[test]
    fn rejects_bad_config() {
        assert!(Conductor::new(cfg(Policy::Random, 0, 1)).is_err());
        assert!(Conductor::new(cfg(Policy::Random, 129, 1)).is_err());
        assert!(Conductor::new(cfg(Policy::Random, 1, 0)).is_err());
        assert!(Conductor::new(cfg(Policy::Random, 128, 1)).is_ok());
    }

    #[test]
    fn index_matches_prefixes_per_instance() {
        let mut ix = CacheIndex::default();
        ix.store(0, &[1, 2, 3]);
        ix.store(1, &[1, 2]);
        ix.store(2, &[2, 3]); // no first block: no prefix
        let mut out = Vec::new();
        let (best, set) = ix.match_prefix(&[1, 2, 3, 4], 4, &mut out);
        assert_eq!(out, vec![3, 2, 0, 0]);
        assert_eq!((best, set), (3, 0b1));
        ix.remove(0, &[2]);
        let (best, set) = ix.match_prefix(&[1, 2, 3, 4], 4, &mut out);
        assert_eq!(out, vec![1, 2, 0, 0]);
        assert_eq!((best, set), (2, 0b10));
        // Everyone holds everything: full length for all.
        let mut ix = CacheIndex::default();
        for i in 0..3 {
            ix.store(i, &[7, 8]);
        }
        let (best, set) = ix.match_prefix(&[7, 8], 3, &mut out);
        assert_eq!((best, set, out.clone()), (2, 0b111, vec![2, 2, 2]));
        ix.remove(0, &[7, 8]);
        ix.remove(1, &[7, 8]);
        ix.remove(2, &[7, 8]);
        assert!(ix.is_empty());
    }

    #[test]
    fn round_robin_cycles() {
        let mut c = Conductor::new(cfg(Policy::RoundRobin, 3, 1)).unwrap();
        let got: Vec<u32> = (0..6)
            .map(|i| accept(c.schedule(&req(i, 0..2), 0.0)).prefill)
            .collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_is_seeded_and_covers_instances() {
        let run = || {
            let mut c = Conductor::new(cfg(Policy::Random, 4, 1)).unwrap();
            (0..200)
                .map(|i| accept(c.schedule(&req(i, 0..1), 0.0)).prefill)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        for i in 0..4 {
            assert!(a.contains(&i));
        }
    }

    #[test]
    fn load_balance_picks_shortest_queue() {
        let mut c = Conductor::new(cfg(Policy::LoadBalance, 2, 1)).unwrap();
        // A long request books a long queue on instance 0.
        let long = ScheduleRequest {
            id: 1,
            input_tokens: 64_000,
            output_tokens: 1,
            block_hashes: (0..125).collect(),
        };
        assert_eq!(accept(c.schedule(&long, 0.0)).prefill, 0);
        assert!(c.prefill_queue_s(0, 0.0) > 8.0);
        // The next three short ones all avoid it.
        for i in 2..5 {
            assert_eq!(accept(c.schedule(&req(i, 1000..1002), 0.0)).prefill, 1);
        }
        // Queued work drains in the estimate only once the instance reports it started.
        assert!(c.prefill_queue_s(0, 1000.0) > 8.0);
        c.observe(
            ClusterEvent::PrefillStarted {
                request: 1,
                instance: 0,
            },
            0.0,
        );
        assert!(c.prefill_queue_s(0, 5.0) > 3.0);
        assert_eq!(c.prefill_queue_s(0, 1000.0), 0.0);
    }

    #[test]
    fn local_cache_prefers_holder_but_spreads_hot_prefix() {
        let mut c = Conductor::new(cfg(Policy::LocalCache, 4, 1)).unwrap();
        // Instance 2 holds a 16-block prefix.
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 2,
                block_hashes: &(0..16).collect::<Vec<_>>(),
            },
            0.0,
        );
        let p = accept(c.schedule(&req(1, 0..20), 0.0));
        assert_eq!(p.prefill, 2);
        assert_eq!(p.reused_tokens, 16 * 512);
        assert_eq!(p.fetch, None);
        // Many requests sharing only the first block must not all land on instance 2.
        let mut c = Conductor::new(cfg(Policy::LocalCache, 4, 1)).unwrap();
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 2,
                block_hashes: &[0],
            },
            0.0,
        );
        let mut counts = [0u32; 4];
        for i in 0..40 {
            let mut r = req(i, 0..1);
            r.block_hashes.extend(1000 * (i + 1)..1000 * (i + 1) + 15);
            r.input_tokens = 16 * 512;
            counts[accept(c.schedule(&r, 0.0)).prefill as usize] += 1;
        }
        assert!(counts.iter().all(|&n| n >= 5), "{counts:?}");
    }

    #[test]
    fn max_prefix_collapses_on_shared_first_block() {
        let mut c = Conductor::new(cfg(Policy::MaxPrefix, 4, 1)).unwrap();
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 3,
                block_hashes: &[0],
            },
            0.0,
        );
        for i in 0..20 {
            let mut r = req(i, 0..1);
            r.block_hashes.push(100 + i);
            r.input_tokens = 1024;
            assert_eq!(accept(c.schedule(&r, 0.0)).prefill, 3);
        }
    }

    #[test]
    fn mooncake_fetch_beats_recompute_when_holder_is_busy() {
        let mut c = Conductor::new(cfg(Policy::Mooncake, 2, 1)).unwrap();
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 0,
                block_hashes: &(0..60).collect::<Vec<_>>(),
            },
            0.0,
        );
        // Book 20 s of work on instance 0 only (it holds a prefix of each).
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 0,
                block_hashes: &(10_000..10_200).collect::<Vec<_>>(),
            },
            0.0,
        );
        let hog = ScheduleRequest {
            id: 50,
            input_tokens: 200 * 512,
            output_tokens: 1,
            block_hashes: (10_000..10_200).collect(),
        };
        // Fully cached except the last token: cheap on 0. Make it expensive instead: extend.
        let mut hog2 = hog.clone();
        hog2.block_hashes.extend(20_000..20_100);
        hog2.input_tokens = 300 * 512;
        let h = accept(c.schedule(&hog2, 0.0));
        assert_eq!(h.prefill, 0);
        assert!(c.prefill_queue_s(0, 0.0) > 5.0);
        let p = accept(c.schedule(&req(1, 0..64), 0.0));
        assert_eq!(p.prefill, 1);
        let f = p.fetch.expect("fetches the prefix from the busy holder");
        assert_eq!((f.source, f.blocks, f.local_blocks), (0, 60, 0));
        assert_eq!(p.reused_tokens, 60 * 512);
        // Local-cache would have recomputed on instance 1 instead (no transfer option).
        let mut l = Conductor::new(cfg(Policy::LocalCache, 2, 1)).unwrap();
        l.observe(
            ClusterEvent::BlocksStored {
                instance: 0,
                block_hashes: &(0..60).collect::<Vec<_>>(),
            },
            0.0,
        );
        l.observe(
            ClusterEvent::BlocksStored {
                instance: 0,
                block_hashes: &(10_000..10_200).collect::<Vec<_>>(),
            },
            0.0,
        );
        accept(l.schedule(&hog2, 0.0));
        let q = accept(l.schedule(&req(1, 0..64), 0.0));
        assert_eq!((q.prefill, q.fetch, q.reused_tokens), (1, None, 0));
        // With Algorithm 1's ratio threshold the fetch branch is taken whenever the ratio
        // exceeds it, even for an idle holder.
        let mut t = Conductor::new(ConductorConfig {
            balancing_threshold: Some(1.5),
            ..cfg(Policy::Mooncake, 2, 1)
        })
        .unwrap();
        t.observe(
            ClusterEvent::BlocksStored {
                instance: 0,
                block_hashes: &(0..60).collect::<Vec<_>>(),
            },
            0.0,
        );
        t.observe(
            ClusterEvent::BlocksStored {
                instance: 1,
                block_hashes: &(0..10).collect::<Vec<_>>(),
            },
            0.0,
        );
        let r = accept(t.schedule(&req(2, 0..64), 0.0));
        assert_eq!(r.reused_tokens, 60 * 512);
        if r.prefill == 1 {
            assert_eq!(r.fetch.map(|f| (f.source, f.local_blocks)), Some((0, 10)));
        }
    }

    #[test]
    fn decode_selection_balances_load() {
        let mut c = Conductor::new(cfg(Policy::RoundRobin, 1, 3)).unwrap();
        let ds: Vec<u32> = (0..6)
            .map(|i| accept(c.schedule(&req(i, 0..4), 0.0)).decode)
            .collect();
        let mut counts = [0; 3];
        for d in ds {
            counts[d as usize] += 1;
        }
        assert_eq!(counts, [2, 2, 2]);
    }

    #[test]
    fn slo_admission_rejects_predicted_misses() {
        let mut c = Conductor::new(ConductorConfig {
            admission: Admission::Slo,
            ttft_slo_s: 1.5,
            ..cfg(Policy::LoadBalance, 1, 1)
        })
        .unwrap();
        // 8k tokens ≈ 1 s: accepted; the second would wait ≈ 1 s more plus 1 s: rejected.
        let r = |id| ScheduleRequest {
            id,
            input_tokens: 8192,
            output_tokens: 10,
            block_hashes: (id * 100..id * 100 + 16).collect(),
        };
        let p = accept(c.schedule(&r(1), 0.0));
        assert!(
            (p.predicted_ttft_s - 0.97).abs() < 0.1,
            "{}",
            p.predicted_ttft_s
        );
        match c.schedule(&r(2), 0.0) {
            Decision::Reject(Rejection::TtftSlo { predicted_s }) => assert!(predicted_s > 1.8),
            d => panic!("{d:?}"),
        }
        // TBT SLO below the bare decode step: always rejected on TBT.
        let mut c = Conductor::new(ConductorConfig {
            admission: Admission::Slo,
            tbt_slo_s: 0.02,
            ..cfg(Policy::LoadBalance, 1, 1)
        })
        .unwrap();
        assert!(matches!(
            c.schedule(&r(1), 0.0),
            Decision::Reject(Rejection::TbtSlo { .. })
        ));
        assert_eq!(c.stats().rejected, 1);
    }

    /// Puts `n` requests into decoding on decode instance 0, started at `t`.
    fn fill_decode(c: &mut Conductor, n: u64, t: f64) {
        decode_from(c, 10_000..10_000 + n, t);
    }

    #[test]
    fn early_rejects_on_current_decode_load_predicted_looks_ahead() {
        // 20 requests decoding: 26 ms + 4 ms × 20 = 106 ms fits the 108 ms SLO; one more does
        // not.
        let mut early = Conductor::new(small_batch_cfg(Admission::Early, 0.108)).unwrap();
        let mut pred = Conductor::new(small_batch_cfg(Admission::Predicted, 0.108)).unwrap();
        fill_decode(&mut early, 20, 0.0);
        fill_decode(&mut pred, 20, 0.0);
        // At t = 0.1 the batch is still full now, but by the time a 4-block request reaches
        // decode (≈ 0.25 s later) the uniform 0.5 s decode time is over.
        let r = req(1, 500..508);
        match early.schedule(&r, 0.45) {
            Decision::Reject(Rejection::Overloaded { pool, load }) => {
                assert_eq!(pool, Pool::Decode);
                assert!(load > 1.0);
            }
            d => panic!("{d:?}"),
        }
        accept(pred.schedule(&r, 0.45));
        // Predicted still rejects when the batch will still be running then.
        let mut pred2 = Conductor::new(ConductorConfig {
            decode_time_s: 100.0,
            ..small_batch_cfg(Admission::Predicted, 0.108)
        })
        .unwrap();
        fill_decode(&mut pred2, 20, 0.0);
        assert!(matches!(
            pred2.schedule(&r, 0.45),
            Decision::Reject(Rejection::Overloaded {
                pool: Pool::Decode,
                ..
            })
        ));
    }

    /// Moves requests `ids` (2 blocks each) through prefill into decode on instance 0 at `t`.
    fn decode_from(c: &mut Conductor, ids: std::ops::Range<u64>, t: f64) {
        for id in ids {
            let p = accept(c.schedule(&req(id, 0..2), t));
            assert_eq!(p.decode, 0);
            for e in [
                ClusterEvent::PrefillStarted {
                    request: id,
                    instance: p.prefill,
                },
                ClusterEvent::PrefillFinished {
                    request: id,
                    instance: p.prefill,
                },
                ClusterEvent::DecodeStarted {
                    request: id,
                    instance: 0,
                },
            ] {
                c.observe(e, t);
            }
        }
    }

    /// 4 ms per sequence (an artificial cost, to keep the batches small) and one decode node.
    fn small_batch_cfg(admission: Admission, tbt_slo_s: f64) -> ConductorConfig {
        ConductorConfig {
            admission,
            tbt_slo_s,
            decode_time_s: 0.5,
            cost: CostModel {
                decode_c1: 4e-3,
                ..CostModel::default()
            },
            ..cfg(Policy::LoadBalance, 4, 1)
        }
    }

    #[test]
    fn duration_bins_are_tenths_of_a_decade_from_a_millisecond() {
        for i in 0..4000 {
            // Between the edges (an 800th of a decade off the nearest), 1 µs to 10⁴ s.
            let x = 10f64.powf((f64::from(i) + 0.5) / 400.0 - 6.0);
            let want = ((x / 1e-3).log10() * 10.0).floor().clamp(0.0, 79.0) as usize;
            assert_eq!(DurationHistogram::bin(x), want, "{x}");
        }
        assert_eq!(DurationHistogram::bin(0.0), 0);
        assert_eq!(DurationHistogram::bin(1.0), 30);
        assert_eq!(DurationHistogram::bin(f64::INFINITY), 79);
    }

    #[test]
    fn prediction_drops_a_queued_request_whose_decode_would_be_over() {
        // 20 short requests queued for prefill, ready within ≈ 0.6 s, then decoding for the
        // uniform t_d. 26 ms + 4 ms × 21 = 110 ms would break the 108 ms SLO.
        let queued = |td: f64| {
            let mut c = Conductor::new(ConductorConfig {
                decode_time_s: td,
                ..small_batch_cfg(Admission::Predicted, 0.108)
            })
            .unwrap();
            for id in 0..20 {
                assert_eq!(accept(c.schedule(&req(id, 0..2), 0.0)).decode, 0);
            }
            c
        };
        // A 32-block request reaches decode ≈ 2.6 s from now: with t_d = 0.5 s every queued
        // request's decode is over by then, so it joins an empty batch.
        let big = req(100, 1000..1032);
        assert_eq!(accept(queued(0.5).schedule(&big, 0.0)).decode, 0);
        // With t_d = 100 s they all still decode then.
        assert!(matches!(
            queued(100.0).schedule(&big, 0.0),
            Decision::Reject(Rejection::Overloaded {
                pool: Pool::Decode,
                ..
            })
        ));
    }

    #[test]
    fn prediction_counts_running_decodes_as_censored_durations() {
        // History: 20 decodes that lasted 1 s. At t = 30 s, 10 decodes have run for 29 s and
        // 10 for 0.95 s. Counting only finished decodes, every young one would be gone
        // after 1 s; the long ones still running say decodes last longer: the Kaplan–Meier
        // estimate keeps a third of the young ones (10 of the 30 decodes at risk at 1 s).
        let mut c = Conductor::new(small_batch_cfg(Admission::Predicted, 0.108)).unwrap();
        // HBM of 32,000 tokens; each short request reserves 1,034.
        c.set_decode_capacity(0, 32_000);
        decode_from(&mut c, 0..20, 0.0);
        for id in 0..20 {
            c.observe(
                ClusterEvent::DecodeFinished {
                    request: id,
                    instance: 0,
                },
                1.0,
            );
        }
        decode_from(&mut c, 100..110, 1.0);
        decode_from(&mut c, 200..210, 29.05);
        // A 40-block request (20,490 tokens) reaches decode ≈ 2.6 s later: 20,490 + 10 ×
        // 1,034 + 10 / 3 × 1,034 = 34,277 tokens > 32,000 (without the running ones in the
        // estimate: 30,830).
        match c.schedule(&req(300, 1000..1040), 30.0) {
            Decision::Reject(Rejection::Overloaded {
                pool: Pool::Decode,
                load,
            }) => assert!((1.05..1.09).contains(&load), "{load}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn disabled_instances_get_nothing_and_sources_only_serve_fetches() {
        let mut c = Conductor::new(cfg(Policy::Mooncake, 3, 2)).unwrap();
        c.set_prefill_enabled(0, false);
        c.set_decode_enabled(1, false);
        // Instance 2 is a prefix source only (the store): it holds the prefix.
        c.set_source_only(2);
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 2,
                block_hashes: &(0..60).collect::<Vec<_>>(),
            },
            0.0,
        );
        for i in 0..6 {
            let p = accept(c.schedule(&req(i, 0..64), 0.0));
            assert_eq!((p.prefill, p.decode), (1, 0));
            let f = p.fetch.expect("fetched from the source");
            assert_eq!((f.source, f.blocks), (2, 60));
            c.observe(ClusterEvent::Dropped { request: i }, 0.0);
        }
        // Everything off: an infinite-load rejection, not a panic.
        c.set_prefill_enabled(1, false);
        assert!(matches!(
            c.schedule(&req(9, 0..4), 0.0),
            Decision::Reject(Rejection::Overloaded {
                pool: Pool::Prefill,
                load
            }) if load.is_infinite()
        ));
        // Slots can be added later.
        let i = c.add_prefill_instance().unwrap();
        let d = c.add_decode_instance();
        assert_eq!((i, d), (3, 2));
        let p = accept(c.schedule(&req(10, 0..4), 0.0));
        assert_eq!(p.prefill, 3);
        c.clear_instance_blocks(2);
        assert!(c.index().is_empty());
    }

    #[test]
    fn expected_blocks_are_booked_at_decision_time() {
        let mut c = Conductor::new(ConductorConfig {
            expected_ttl_s: Some(1.0),
            ..cfg(Policy::Mooncake, 4, 1)
        })
        .unwrap();
        let p = accept(c.schedule(&req(1, 0..40), 0.0));
        let holder = p.prefill;
        // Its prefill ran, no event yet: the same prefix still goes there (cache hit).
        for e in [
            ClusterEvent::PrefillStarted {
                request: 1,
                instance: holder,
            },
            ClusterEvent::PrefillFinished {
                request: 1,
                instance: holder,
            },
        ] {
            c.observe(e, 0.0);
        }
        let q = accept(c.schedule(&req(2, 0..40), 1.0));
        assert_eq!(q.prefill, holder);
        assert_eq!(q.reused_tokens, 40 * 512 - 1);
        c.observe(ClusterEvent::Dropped { request: 2 }, 1.0);
        // The event confirms it: indexed, no longer merely expected.
        c.observe(
            ClusterEvent::BlocksStored {
                instance: holder,
                block_hashes: &(0..40).collect::<Vec<_>>(),
            },
            1.0,
        );
        assert!(c.expected().is_empty());
        assert_eq!(c.index().len(), 40);
        // Without an event, an expectation lapses ttl after the predicted TTFT.
        let r = accept(c.schedule(&req(3, 500..520), 2.0));
        assert_eq!(c.expected().get(500), 1 << r.prefill);
        let _ = c.schedule(&req(4, 900..901), 2.0 + r.predicted_ttft_s + 1.5);
        assert_eq!(c.expected().get(500), 0);
        // The simulator's default: nothing booked.
        let mut plain = Conductor::new(cfg(Policy::Mooncake, 4, 1)).unwrap();
        accept(plain.schedule(&req(1, 0..40), 0.0));
        assert!(plain.expected().is_empty());
    }

    #[test]
    fn expected_bookings_stay_bounded_on_a_still_clock() {
        let mut c = Conductor::new(ConductorConfig {
            expected_ttl_s: Some(5.0),
            ..cfg(Policy::Mooncake, 4, 1)
        })
        .unwrap();
        c.observe(
            ClusterEvent::BlocksStored {
                instance: 2,
                block_hashes: &(0..10).collect::<Vec<_>>(),
            },
            0.0,
        );
        // The clock never moves, so no expectation lapses: only releases bound the heap.
        for k in 0..10_000u64 {
            let p = accept(c.schedule(&req(k % 7, 0..20), 1.0));
            // Only the blocks the index does not have on the chosen instance are booked.
            assert_eq!(c.expected().get(3) & (1 << 2), 0);
            assert_ne!(c.expected().get(15) & (1 << p.prefill), 0);
            if k % 3 != 0 {
                c.observe(ClusterEvent::Dropped { request: k % 7 }, 1.0);
            }
            assert!(c.expected_pending() <= 2 * c.in_flight() + 65);
        }
        // Requests reusing ids in flight released their earlier bookings.
        assert!(c.in_flight() <= 7);
        for id in 0..7 {
            c.observe(ClusterEvent::Dropped { request: id }, 1.0);
        }
        assert!(c.expected().is_empty());
        // A stale entry of a reused id does not expire the id's newer booking.
        let _ = accept(c.schedule(&req(1, 100..110), 2.0));
        c.observe(ClusterEvent::Dropped { request: 1 }, 2.0);
        let late = accept(c.schedule(&req(1, 200..210), 100.0));
        let _ = c.schedule(&req(2, 900..901), 100.0 + late.predicted_ttft_s + 1.0);
        assert_eq!(c.expected().get(200), 1 << late.prefill);
    }

    #[test]
    fn settled_then_rebooked_block_outlives_the_earlier_release() {
        let mut c = Conductor::new(ConductorConfig {
            expected_ttl_s: Some(60.0),
            ..cfg(Policy::Mooncake, 1, 1)
        })
        .unwrap();
        // Request 1 books blocks 0..8 on the only prefill instance.
        let a = accept(c.schedule(&req(1, 0..8), 0.0));
        assert_eq!(c.expected().get(3), 1 << a.prefill);
        // An event settles the expectation of block 3 (evicted right after its store).
        c.observe(
            ClusterEvent::BlocksRemoved {
                instance: a.prefill,
                block_hashes: &[3],
            },
            0.1,
        );
        assert_eq!(c.expected().get(3), 0);
        // Request 2 books block 3 there again.
        let b = accept(c.schedule(&req(2, 3..4), 0.2));
        assert_eq!(b.prefill, a.prefill);
        assert_eq!(c.expected().get(3), 1 << b.prefill);
        // Request 1 ends: its booking of block 3 was settled already, so the newer
        // request's expectation stays until that request ends or lapses.
        c.observe(ClusterEvent::Dropped { request: 1 }, 0.3);
        assert_eq!(c.expected().get(3), 1 << b.prefill);
        assert_eq!(c.expected().get(4), 0);
        c.observe(ClusterEvent::Dropped { request: 2 }, 0.4);
        assert!(c.expected().is_empty());
    }

    #[test]
    fn bookings_are_released() {
        let mut c = Conductor::new(cfg(Policy::LoadBalance, 1, 1)).unwrap();
        let p = accept(c.schedule(&req(1, 0..16), 0.0));
        assert!(c.prefill_queue_s(0, 0.0) > 0.5);
        c.observe(ClusterEvent::Dropped { request: 1 }, 0.0);
        assert!(c.prefill_queue_s(0, 0.0).abs() < 1e-9);
        assert_eq!(p.prefill, 0);
        // A full lifecycle updates t_d from observed decode time.
        let _ = accept(c.schedule(&req(2, 0..16), 0.0));
        for (e, t) in [
            (
                ClusterEvent::PrefillStarted {
                    request: 2,
                    instance: 0,
                },
                0.0,
            ),
            (
                ClusterEvent::PrefillFinished {
                    request: 2,
                    instance: 0,
                },
                1.0,
            ),
            (
                ClusterEvent::DecodeStarted {
                    request: 2,
                    instance: 0,
                },
                1.0,
            ),
            (
                ClusterEvent::DecodeFinished {
                    request: 2,
                    instance: 0,
                },
                4.0,
            ),
        ] {
            c.observe(e, t);
        }
        assert!((c.decode_time_estimate() - 3.0).abs() < 1e-12);
        assert!(c.prefill_queue_s(0, 1.0).abs() < 1e-9);
    }
}
