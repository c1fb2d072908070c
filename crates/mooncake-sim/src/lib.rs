//! The trace-driven simulator of the Conductor: Mooncake's JSONL trace reader and
//! statistics, a discrete-event simulator of a disaggregated cluster (and a coupled
//! vLLM-like baseline), the FAST'25 paper's experiments, and PNG plots.
//!
//! # Modules
//!
//! - [`trace`]: the JSONL trace reader and `mooncake trace stats`.
//! - [`sim`]: the discrete-event simulator, driving a [`mooncake_scheduler::Conductor`].
//! - [`net`]: the flow-level network (max-min fair sharing of every node's NIC ports).
//! - [`experiments`]: the paper's experiments (Figs. 5, 9, 10, 11, 13, 15 and the overload
//!   table).
//! - [`transform`]: seeded trace variants (re-timed, longer outputs and contexts, system
//!   prompts, another reuse mix) to check that the results generalize.
//! - `plot` (feature `plot`, on by default): PNG line and bar charts.
//!
//! The online scheduler (policies, admission, prefix index, cost model) is
//! `mooncake-scheduler`, which depends on neither this crate nor plotters.

#![forbid(unsafe_code)]

pub mod experiments;
pub mod net;
#[cfg(feature = "plot")]
pub mod plot;
pub mod sim;
pub mod trace;
pub mod transform;

pub use sim::{CoupledConfig, SimConfig, SimResult, Simulator, Summary, simulate};
pub use trace::{Trace, TraceError, TraceRequest, TraceStats, trace_stats};
