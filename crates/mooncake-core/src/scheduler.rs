//! The [`Scheduler`] trait of the Conductor: pick prefill and decode instances for a request,
//! or reject it early.
//!
//! The trait is sync and does no I/O; the simulator and an online service drive it with their
//! own clocks. The driver reports what actually happens in the cluster (KV blocks stored or
//! evicted, prefill and decode progress) through [`Scheduler::observe`], so the scheduler's view
//! of caches and queues follows the real cluster rather than only its own predictions.
//!
//! Prefill and decode instances are numbered separately: `Placement::prefill` indexes the
//! prefill pool and `Placement::decode` the decode pool, both from 0.

/// An inference instance (prefill or decode) known to the scheduler, as an index into its pool.
pub type InstanceId = u32;

/// A request as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScheduleRequest {
    /// Request id, unique among requests in flight.
    pub id: u64,
    /// Prompt length in tokens.
    pub input_tokens: u32,
    /// Tokens to generate (known in traces, predicted online).
    pub output_tokens: u32,
    /// Hashes of the prompt's KV blocks, in order (prefix-chained: equal hashes at position `i`
    /// mean equal prompts up to the end of block `i`).
    pub block_hashes: Vec<u64>,
}

/// A prefix fetch ordered by the scheduler: the prefill instance pulls these blocks from another
/// prefill instance's DRAM cache before it starts the prefill (Algorithm 1, step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixFetch {
    /// The prefill instance that holds the longer prefix.
    pub source: InstanceId,
    /// Prompt blocks `[0, blocks)` make up the prefix; the destination already holds the first
    /// `local_blocks` of them.
    pub blocks: u32,
    /// Blocks of the prefix already cached on the destination.
    pub local_blocks: u32,
}

/// Where a request will run.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The prefill instance (index into the prefill pool).
    pub prefill: InstanceId,
    /// The decode instance (index into the decode pool).
    pub decode: InstanceId,
    /// Prompt tokens whose KV cache the prefill instance will reuse (local plus fetched).
    pub reused_tokens: u64,
    /// The longer prefix to fetch from another instance, if that beats the local match.
    pub fetch: Option<PrefixFetch>,
    /// Predicted time to first token, in seconds.
    pub predicted_ttft_s: f64,
    /// Predicted time between tokens on the chosen decode instance, in seconds.
    pub predicted_tbt_s: f64,
}

/// Which pool an overload rejection is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The prefill pool.
    Prefill,
    /// The decode pool.
    Decode,
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Predicted TTFT misses the SLO.
    TtftSlo {
        /// The prediction, seconds.
        predicted_s: f64,
    },
    /// Predicted TBT misses the SLO.
    TbtSlo {
        /// The prediction, seconds.
        predicted_s: f64,
    },
    /// The prefill or decode pool is over its load threshold.
    Overloaded {
        /// Which pool.
        pool: Pool,
        /// Its load: predicted latency divided by the SLO.
        load: f64,
    },
}

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it here.
    Accept(Placement),
    /// Refuse it now (HTTP 429 online).
    Reject(Rejection),
}

/// What happened in the cluster, as reported by the driver.
///
/// Every accepted request is reported `PrefillStarted`, `PrefillFinished`, then either
/// `DecodeStarted` … `DecodeFinished` or `Dropped`; the scheduler releases what it booked for a
/// request on `DecodeFinished` or `Dropped`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClusterEvent<'a> {
    /// A prefill instance now caches these blocks (KV event "stored").
    BlocksStored {
        /// The prefill instance.
        instance: InstanceId,
        /// Block hashes.
        block_hashes: &'a [u64],
    },
    /// A prefill instance evicted these blocks (KV event "removed").
    BlocksRemoved {
        /// The prefill instance.
        instance: InstanceId,
        /// Block hashes.
        block_hashes: &'a [u64],
    },
    /// A request started its prefill.
    PrefillStarted {
        /// Request id.
        request: u64,
        /// Prefill instance.
        instance: InstanceId,
    },
    /// A request finished its prefill.
    PrefillFinished {
        /// Request id.
        request: u64,
        /// Prefill instance.
        instance: InstanceId,
    },
    /// A request joined a decode batch.
    DecodeStarted {
        /// Request id.
        request: u64,
        /// Decode instance.
        instance: InstanceId,
    },
    /// A request produced its last token.
    DecodeFinished {
        /// Request id.
        request: u64,
        /// Decode instance.
        instance: InstanceId,
    },
    /// An accepted request was dropped before finishing (e.g. the decode node's local check
    /// refused it after its prefill).
    Dropped {
        /// Request id.
        request: u64,
    },
}

/// The Conductor's scheduling policy.
///
/// # Behavior
///
/// - `schedule` books the chosen placement at once (queue time, expected decode load), so two
///   calls in a row see each other's effect.
/// - `observe` must be fed events in time order; `now_s` never decreases across calls of both
///   methods.
pub trait Scheduler: Send {
    /// Decides for `request` arriving at `now_s` (seconds on the driver's clock).
    fn schedule(&mut self, request: &ScheduleRequest, now_s: f64) -> Decision;

    /// Updates the scheduler's view of the cluster with an event that happened at `now_s`.
    fn observe(&mut self, event: ClusterEvent<'_>, now_s: f64);
}
