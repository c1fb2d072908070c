//! Conductor: the KVCache-centric scheduler of Mooncake (FAST'25 Algorithm 1, with cache load
//! balancing and arXiv v1's early rejection) and a trace-driven discrete-event simulator that
//! replays Mooncake traces on a modelled cluster to reproduce the paper's scheduling results.
//!
//! # Modules
//!
//! - [`trace`]: the JSONL trace reader and `mooncake trace stats`.
//! - [`cost`]: the cost model (prefill, transfers, decode steps) with the fitted constants.
//! - [`conductor`]: [`Conductor`], the implementation of [`mooncake_core::Scheduler`].
//! - [`sim`]: the discrete-event simulator (disaggregated cluster and coupled vLLM baseline).
//! - [`experiments`]: the paper's experiments (Figs. 5, 9, 10, 15 and the overload table).
//! - `plot` (feature `plot`): PNG line and bar charts.
//!
//! The crate does no I/O except reading trace files and (in `plot`) writing PNGs; the
//! scheduler and simulator run on a virtual clock.

#![forbid(unsafe_code)]

pub mod conductor;
pub mod cost;
pub mod experiments;
pub mod lru;
#[cfg(feature = "plot")]
pub mod plot;
pub mod sim;
pub mod trace;

pub use conductor::{Admission, Conductor, ConductorConfig, Policy, ScheduleError};
pub use cost::CostModel;
pub use sim::{CoupledConfig, SimConfig, SimResult, Simulator, Summary, simulate};
pub use trace::{Trace, TraceError, TraceRequest, TraceStats, trace_stats};
