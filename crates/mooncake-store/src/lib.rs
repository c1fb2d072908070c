//! Mooncake Store: the distributed KV-cache pool, starting with its sans-IO heart.
//!
//! # Modules
//!
//! - [`types`]: what crosses the RPC wire: [`StoreError`] with the reference's codes,
//!   [`ReplicateConfig`], [`ReplicaDesc`].
//! - [`alloc`]: [`OffsetAllocator`], the O(1) bin allocator of one mounted segment.
//! - [`master`]: [`Master`], the master's state machine (clients, segments, two-phase puts,
//!   leases, placement, eviction, re-adoption after a restart).
//!
//! Nothing here does I/O, starts a thread or reads a clock: time is passed in as `now_ms`. The
//! RPC server, the storage node and the client library drive it.

#![forbid(unsafe_code)]

pub mod alloc;
pub mod master;
pub mod types;

pub use alloc::{Allocation, OffsetAllocator};
pub use master::{
    ClientId, ClientStatus, GetReply, HeartbeatReply, HeldObject, JournalDrain, JournalEntry,
    Master, MasterConfig, MasterStats, MountRequest, ObjectInfo, ObjectState, SegmentId,
    SegmentStatus, TickReport,
};
pub use types::{
    DEFAULT_TENANT, ReplicaDesc, ReplicaKind, ReplicateConfig, SoftPinAction, StoreError,
    StoreErrorCode, StoreResult, TenantId,
};
