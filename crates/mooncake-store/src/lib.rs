#![doc = include_str!("../README.md")]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod alloc;
pub mod client;
pub mod master;
pub mod node;
pub mod rpc;
pub mod server;
#[allow(
    unsafe_code,
    reason = "the one module with unsafe code: memfd, mmap, SCM_RIGHTS"
)]
pub mod sys;
pub mod types;

pub use alloc::{Allocation, OffsetAllocator};
pub use client::{BufferRange, GetSession, PutSession, StoreClient, StoreConfig};
pub use master::{
    ClientId, ClientStatus, GetReply, HeartbeatReply, HeldObject, JournalDrain, JournalEntry,
    Master, MasterConfig, MasterStats, MountRequest, ObjectInfo, ObjectState, SegmentId,
    SegmentStatus, TickReport,
};
pub use node::LocalNodeServer;
pub use server::{MasterServer, ServerConfig};
pub use types::{
    DEFAULT_TENANT, ReplicaDesc, ReplicaKind, ReplicateConfig, SoftPinAction, StoreError,
    StoreErrorCode, StoreResult, TenantId,
};
