//! The messages: one [`Request`] enum, one [`Response`] enum.
//!
//! Data operations exist only in batch form: a single-key call is a batch of one, so every
//! batch is one RPC and one acquisition of the master's lock. Per-key outcomes are
//! [`StoreResult`]s carrying the reference's negative codes.

use serde::{Deserialize, Serialize};

use crate::master::{
    ClientId, ClientStatus, GetReply, JournalDrain, MasterStats, MountRequest, ObjectInfo,
    SegmentId, SegmentStatus,
};
use crate::types::{ReplicaDesc, ReplicateConfig, StoreError, StoreResult};

/// One key of a batch put.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutItem {
    /// Key.
    pub key: String,
    /// Object size in bytes.
    pub size: u64,
    /// Group of this key (overrides the batch config's `group_id`; the Python API's
    /// `group_ids` has one per key).
    pub group: Option<String>,
}

/// What the master tells a client when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The client's id for this master incarnation.
    pub client: ClientId,
    /// Read lease granted by gets.
    pub lease_ttl_ms: u64,
    /// A client silent this long is expired.
    pub client_live_ttl_ms: u64,
    /// Identifies this master incarnation (changes on restart).
    pub master_epoch: u64,
}

/// A request to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Liveness of the master itself (`health_check`).
    Ping,
    /// Starts the challenge-response of the cluster secret on this connection: the client's
    /// nonce. A master with a secret answers nothing else until the client proved it.
    Auth {
        /// The client's nonce.
        nonce: [u8; 16],
    },
    /// The client's proof of the cluster secret, over both nonces.
    Prove {
        /// HMAC-SHA256 proof.
        proof: Vec<u8>,
    },
    /// Starts a session; the connection it arrives on becomes the client's session
    /// connection (its close means the client died).
    RegisterClient {
        /// Host of the client (same-node placement).
        host: String,
        /// A name for logs.
        name: String,
    },
    /// Heartbeat on the session connection; the reply carries the journal of the client's
    /// segments.
    Heartbeat {
        /// Client.
        client: ClientId,
    },
    /// Mounts a segment of the client.
    MountSegment {
        /// Owner.
        client: ClientId,
        /// The segment.
        mount: MountRequest,
    },
    /// Unmounts a segment of the client.
    UnmountSegment {
        /// Owner.
        client: ClientId,
        /// The segment.
        segment: SegmentId,
    },
    /// `put_start` (or `upsert_start`) of many keys.
    BatchPutStart {
        /// Writer.
        client: ClientId,
        /// Namespace.
        tenant: String,
        /// Keys and sizes.
        items: Vec<PutItem>,
        /// Replication and pins.
        config: ReplicateConfig,
        /// Insert-or-update instead of write-once.
        upsert: bool,
    },
    /// Ends or revokes the puts of a batch, and reports segments whose transfers failed.
    BatchPutFinish {
        /// Writer.
        client: ClientId,
        /// Namespace.
        tenant: String,
        /// Keys whose every replica was written: published.
        end: Vec<String>,
        /// Keys to revoke.
        revoke: Vec<String>,
        /// Segments that failed transfers (leave placement at once).
        failed_segments: Vec<String>,
    },
    /// Replicas of many keys, under a read lease.
    BatchGetReplicas {
        /// Namespace.
        tenant: String,
        /// Keys.
        keys: Vec<String>,
    },
    /// Existence of many keys (no lease).
    BatchExists {
        /// Namespace.
        tenant: String,
        /// Keys.
        keys: Vec<String>,
    },
    /// Everything about many keys (no lease).
    BatchQuery {
        /// Namespace.
        tenant: String,
        /// Keys.
        keys: Vec<String>,
    },
    /// Removes many keys.
    BatchRemove {
        /// Namespace.
        tenant: String,
        /// Keys.
        keys: Vec<String>,
        /// Remove even leased or in-flight objects.
        force: bool,
    },
    /// Removes every key of the tenant.
    RemoveAll {
        /// Namespace.
        tenant: String,
        /// Remove even leased or in-flight objects.
        force: bool,
    },
    /// Segments whose transfers failed.
    ReportFailure {
        /// Segment names.
        segments: Vec<String>,
    },
    /// Every mounted segment.
    Segments,
    /// Totals and counters.
    Stats,
}

impl Request {
    /// A short name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Auth { .. } => "auth",
            Self::Prove { .. } => "prove",
            Self::RegisterClient { .. } => "register_client",
            Self::Heartbeat { .. } => "heartbeat",
            Self::MountSegment { .. } => "mount_segment",
            Self::UnmountSegment { .. } => "unmount_segment",
            Self::BatchPutStart { .. } => "batch_put_start",
            Self::BatchPutFinish { .. } => "batch_put_finish",
            Self::BatchGetReplicas { .. } => "batch_get_replicas",
            Self::BatchExists { .. } => "batch_exists",
            Self::BatchQuery { .. } => "batch_query",
            Self::BatchRemove { .. } => "batch_remove",
            Self::RemoveAll { .. } => "remove_all",
            Self::ReportFailure { .. } => "report_failure",
            Self::Segments => "segments",
            Self::Stats => "stats",
        }
    }

    /// Every name [`name`](Self::name) returns, for metrics.
    pub const NAMES: &'static [&'static str] = &[
        "ping",
        "auth",
        "prove",
        "register_client",
        "heartbeat",
        "mount_segment",
        "unmount_segment",
        "batch_put_start",
        "batch_put_finish",
        "batch_get_replicas",
        "batch_exists",
        "batch_query",
        "batch_remove",
        "remove_all",
        "report_failure",
        "segments",
        "stats",
    ];
}

/// A response from the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The whole request failed (malformed, unknown client, …).
    Error(StoreError),
    /// Reply to `Ping` (and to an accepted `Prove`).
    Pong,
    /// Reply to `Auth`: the master's nonce and its proof of the cluster secret.
    Challenge {
        /// The master's nonce.
        nonce: [u8; 16],
        /// HMAC-SHA256 proof.
        proof: Vec<u8>,
    },
    /// Reply to `RegisterClient`.
    Registered(SessionInfo),
    /// Reply to `Heartbeat`.
    Heartbeat {
        /// Whether to re-register and remount.
        status: ClientStatus,
        /// Journal records of the client's segments since the last heartbeat.
        journal: Vec<(SegmentId, JournalDrain)>,
    },
    /// Reply to `MountSegment`.
    Mounted(SegmentId),
    /// A request without a result succeeded.
    Done,
    /// Per key: where to write each replica.
    PutStarted(Vec<StoreResult<Vec<ReplicaDesc>>>),
    /// Per key of `end`, then per key of `revoke`.
    PutFinished {
        /// Outcome of each `end` key.
        end: Vec<StoreResult<()>>,
        /// Outcome of each `revoke` key.
        revoke: Vec<StoreResult<()>>,
    },
    /// Per key: replicas and lease.
    Replicas(Vec<StoreResult<GetReply>>),
    /// Per key: COMPLETE or not.
    Exists(Vec<bool>),
    /// Per key: what the master knows.
    Query(Vec<Option<ObjectInfo>>),
    /// Per key: removed or why not.
    Removed(Vec<StoreResult<()>>),
    /// Keys removed by `RemoveAll`.
    RemovedAll(u64),
    /// Every mounted segment.
    Segments(Vec<SegmentStatus>),
    /// Totals and counters.
    Stats(MasterStats),
}

impl Response {
    /// The error of an `Error` response.
    pub fn into_error(self) -> Option<StoreError> {
        match self {
            Self::Error(e) => Some(e),
            _ => None,
        }
    }
}
