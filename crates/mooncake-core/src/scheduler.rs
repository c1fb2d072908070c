//! The [`Scheduler`] trait of the Conductor: pick prefill and decode instances for a request,
//! or reject it early.
//!
//! The trait is sync and does no I/O; the simulator and an online service drive it with their
//! own clocks.

/// An inference instance (prefill or decode) known to the scheduler.
pub type InstanceId = u32;

/// A request as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScheduleRequest {
    /// Request id.
    pub id: u64,
    /// Prompt length in tokens.
    pub input_tokens: u32,
    /// Tokens to generate (known in traces, predicted online).
    pub output_tokens: u32,
    /// Hashes of the prompt's KV blocks, in order (prefix-chained).
    pub block_hashes: Vec<u64>,
}

/// Where a request will run.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The prefill instance.
    pub prefill: InstanceId,
    /// The decode instance.
    pub decode: InstanceId,
    /// Prompt tokens whose KV cache the prefill instance will reuse.
    pub reused_tokens: u64,
    /// Instance to fetch a longer prefix from, if that beats the local match.
    pub fetch_from: Option<InstanceId>,
    /// Predicted time to first token, in seconds.
    pub predicted_ttft_s: f64,
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
        pool: &'static str,
        /// Its load, as a fraction of the threshold's base.
        load: f64,
    },
}

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it here.
    Accept(Placement),
    /// Refuse it now.
    Reject(Rejection),
}

/// The Conductor's scheduling policy.
pub trait Scheduler: Send {
    /// Decides for `request` arriving at `now_s` (seconds on the driver's clock).
    fn schedule(&mut self, request: &ScheduleRequest, now_s: f64) -> Decision;
}
