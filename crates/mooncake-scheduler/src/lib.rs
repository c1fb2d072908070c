//! Conductor: the KVCache-centric scheduler of Mooncake (FAST'25 Algorithm 1, with cache
//! load balancing and arXiv v1's early rejection), as a sans-IO library an online service
//! embeds.
//!
//! # Modules
//!
//! - [`conductor`]: [`Conductor`], the implementation of [`mooncake_core::Scheduler`]:
//!   prefill policies, decode selection, admission, the global prefix index.
//! - [`cost`]: the cost model (prefill, transfers, decode steps) with its constants.
//! - [`index`]: the global prefix index (block hash → compact, interned instance sets) and
//!   the expected view booked at decision time.
//! - [`lru`]: the block hasher and an LRU set.
//!
//! The crate does no I/O and runs on the caller's clock. The trace reader, the
//! discrete-event simulator, the paper's experiments and the plots are `mooncake-sim`.

#![forbid(unsafe_code)]

pub mod conductor;
pub mod cost;
pub mod index;
pub mod lru;

pub use conductor::{Admission, Conductor, ConductorConfig, Policy, ScheduleError};
pub use cost::CostModel;
