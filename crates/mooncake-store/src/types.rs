//! Types shared by the master, the storage nodes and the clients.
//!
//! Everything here derives `Serialize`/`Deserialize`: these values cross the RPC wire. Error codes
//! serialise as the reference's negative integers, so a reply can be handed to the Python API
//! unchanged.

#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};

/// The tenant namespace every key lives in. Keys of different tenants never collide.
pub type TenantId = String;

/// The tenant a client uses when it names none (the reference's `tenant_id="default"`).
pub const DEFAULT_TENANT: &str = "default";

macro_rules! store_error_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $name:literal;)*) => {
        /// The reference's error codes (`types.h`), as returned to the Python API (negative ints).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(into = "i32", try_from = "i32")]
        #[non_exhaustive]
        pub enum StoreErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl StoreErrorCode {
            /// Every code, in the order of the reference's table.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            /// The reference's negative integer.
            pub const fn code(self) -> i32 {
                match self {
                    $(Self::$variant => $code,)*
                }
            }

            /// The reference's upper-case name (`OBJECT_NOT_FOUND`).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The code for a reference integer, if it is one of ours.
            pub const fn from_code(code: i32) -> Option<Self> {
                match code {
                    $($code => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

store_error_codes! {
    /// An invariant of the master broke; a bug.
    InternalError = -1, "INTERNAL_ERROR";
    /// A buffer is too small for the data.
    BufferOverflow = -10, "BUFFER_OVERFLOW";
    /// No mounted segment has that id or name.
    SegmentNotFound = -101, "SEGMENT_NOT_FOUND";
    /// A segment with that name is already mounted by another client.
    SegmentAlreadyExists = -102, "SEGMENT_ALREADY_EXISTS";
    /// The client id is unknown (never registered, or expired).
    ClientNotFound = -103, "CLIENT_NOT_FOUND";
    /// The pool is full: no segment can hold the object, even after eviction.
    NoAvailableHandle = -200, "NO_AVAILABLE_HANDLE";
    /// The key is empty or otherwise unusable.
    InvalidKey = -400, "INVALID_KEY";
    /// Writing the value failed.
    WriteFail = -500, "WRITE_FAIL";
    /// An argument is out of its domain (also: the local staging buffer is too small).
    InvalidParams = -600, "INVALID_PARAMS";
    /// The caller is not allowed to do this (for example `put_end` by a client that is not the
    /// writer).
    IllegalClient = -601, "ILLEGAL_CLIENT";
    /// A replica descriptor is malformed.
    InvalidReplica = -702, "INVALID_REPLICA";
    /// The object is still being written.
    ReplicaIsNotReady = -703, "REPLICA_IS_NOT_READY";
    /// No object has that key.
    ObjectNotFound = -704, "OBJECT_NOT_FOUND";
    /// The key is already written (the client layer maps this to success for `put`).
    ObjectAlreadyExists = -705, "OBJECT_ALREADY_EXISTS";
    /// The object holds a read lease and cannot be removed.
    ObjectHasLease = -706, "OBJECT_HAS_LEASE";
    /// A read ran past its lease; its bytes may have been reclaimed.
    LeaseExpired = -707, "LEASE_EXPIRED";
    /// The object's replicas are busy (being written or moved).
    ObjectReplicaBusy = -714, "OBJECT_REPLICA_BUSY";
    /// A transfer engine operation failed.
    TransferFail = -800, "TRANSFER_FAIL";
    /// The RPC failed.
    RpcFail = -900, "RPC_FAIL";
    /// The RPC did not complete before its deadline.
    RpcTimeout = -901, "RPC_TIMEOUT";
    /// The operation is not possible in the current status (for example a draining segment).
    UnavailableInCurrentStatus = -1010, "UNAVAILABLE_IN_CURRENT_STATUS";
    /// The operation is not supported.
    NotSupported = -1012, "NOT_SUPPORTED";
}

impl From<StoreErrorCode> for i32 {
    fn from(code: StoreErrorCode) -> Self {
        code.code()
    }
}

impl TryFrom<i32> for StoreErrorCode {
    type Error = String;

    fn try_from(code: i32) -> Result<Self, Self::Error> {
        Self::from_code(code).ok_or_else(|| format!("unknown store error code {code}"))
    }
}

impl fmt::Display for StoreErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.code())
    }
}

/// An error of the store: one of the reference's codes and a message.
///
/// `Clone`, so one failure can reach every waiter of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{code}: {message}")]
pub struct StoreError {
    code: StoreErrorCode,
    message: String,
}

/// `Result` with [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// A new error with `code` and a human-readable message.
    pub fn new(code: StoreErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The reference's negative integer (what the Python API returns).
    pub fn code(&self) -> i32 {
        self.code.code()
    }

    /// The code as an enum.
    pub fn error_code(&self) -> StoreErrorCode {
        self.code
    }

    /// The message, without the code.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<StoreErrorCode> for StoreError {
    fn from(code: StoreErrorCode) -> Self {
        Self::new(code, code.name().to_ascii_lowercase().replace('_', " "))
    }
}

impl From<StoreError> for mooncake_core::Error {
    fn from(e: StoreError) -> Self {
        use StoreErrorCode as C;
        use mooncake_core::ErrorKind as K;
        let kind = match e.code {
            C::ObjectNotFound | C::ClientNotFound => K::NotFound,
            C::SegmentNotFound => K::SegmentNotFound,
            C::BufferOverflow
            | C::InvalidKey
            | C::InvalidParams
            | C::InvalidReplica
            | C::IllegalClient
            | C::SegmentAlreadyExists => K::InvalidArgument,
            C::NoAvailableHandle
            | C::ReplicaIsNotReady
            | C::ObjectAlreadyExists
            | C::ObjectHasLease
            | C::ObjectReplicaBusy
            | C::UnavailableInCurrentStatus => K::Busy,
            C::LeaseExpired | C::RpcTimeout => K::Timeout,
            C::TransferFail | C::RpcFail => K::PeerUnreachable,
            C::WriteFail => K::Io,
            C::NotSupported => K::Unsupported,
            C::InternalError => K::Metadata,
        };
        // Worth retrying later: the pool may drain, the writer may finish, the lease may end.
        let temporary = matches!(
            e.code,
            C::NoAvailableHandle
                | C::ReplicaIsNotReady
                | C::ObjectReplicaBusy
                | C::UnavailableInCurrentStatus
                | C::LeaseExpired
                | C::RpcTimeout
                | C::TransferFail
                | C::RpcFail
        );
        mooncake_core::Error::new(kind, e.message)
            .with_context("code", e.code)
            .with_temporary(temporary)
    }
}

/// What `put`/`upsert` does with the object's soft pin (the reference's `soft_pin_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SoftPinAction {
    /// Keep the pin state the key had (an upsert keeps the old deadline; a new key is unpinned).
    #[default]
    Preserve,
    /// Soft-pin the object for `soft_pin_ttl_ms` (or the master's default) from `put_end`.
    Enable,
    /// No soft pin.
    Disable,
}

/// How many replicas to write and where (the reference's `ReplicateConfig`).
///
/// `#[non_exhaustive]`: build it with `ReplicateConfig::default()` and set fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ReplicateConfig {
    /// Memory replicas wanted, on distinct segments; best effort (one suffices). Default 1.
    pub replica_num: u32,
    /// Segments (TE segment names) to try first, in order, when they fit.
    pub preferred_segments: Vec<String>,
    /// Deprecated single preferred segment; tried after `preferred_segments`.
    pub preferred_segment: Option<String>,
    /// Place the (first) replica on a segment of the writer's host when one fits.
    pub prefer_alloc_in_same_node: bool,
    /// Never evict the object; it leaves only by `remove` or with its segment.
    pub with_hard_pin: bool,
    /// Soft pin: evicted only when nothing else is evictable, for a fixed time from `put_end`.
    pub soft_pin_action: SoftPinAction,
    /// The soft pin's lifetime; `None` takes the master's `default_soft_pin_ttl_ms`.
    pub soft_pin_ttl_ms: Option<u64>,
    /// The key's group: keys of one group are evicted together (the Python API's `group_ids`
    /// carries one per key).
    pub group_id: Option<String>,
    /// One group per key of a batch put (the Python API's `group_ids`); when non-empty it
    /// overrides `group_id` key by key. Only the client reads it.
    pub group_ids: Vec<String>,
    /// The reference's `data_type` (KVCACHE, TENSOR, WEIGHT, …); stored, not interpreted.
    pub data_type: u8,
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        Self {
            replica_num: 1,
            preferred_segments: Vec::new(),
            preferred_segment: None,
            prefer_alloc_in_same_node: false,
            with_hard_pin: false,
            soft_pin_action: SoftPinAction::Preserve,
            soft_pin_ttl_ms: None,
            group_id: None,
            group_ids: Vec::new(),
            data_type: 0,
        }
    }
}

impl ReplicateConfig {
    /// The preferred segments in order: `preferred_segments`, then the deprecated
    /// `preferred_segment` unless already listed.
    pub fn preferred(&self) -> impl Iterator<Item = &str> {
        let extra = self
            .preferred_segment
            .as_deref()
            .filter(|s| !self.preferred_segments.iter().any(|p| p == s));
        self.preferred_segments
            .iter()
            .map(String::as_str)
            .chain(extra)
    }

    /// Sets `replica_num`.
    pub fn with_replica_num(mut self, n: u32) -> Self {
        self.replica_num = n;
        self
    }

    /// Sets `preferred_segments`.
    pub fn with_preferred_segments(mut self, segments: Vec<String>) -> Self {
        self.preferred_segments = segments;
        self
    }

    /// Sets `prefer_alloc_in_same_node`.
    pub fn with_same_node(mut self, yes: bool) -> Self {
        self.prefer_alloc_in_same_node = yes;
        self
    }

    /// Sets `with_hard_pin`.
    pub fn with_hard_pin(mut self, yes: bool) -> Self {
        self.with_hard_pin = yes;
        self
    }

    /// Enables the soft pin, with `ttl_ms` or the master's default.
    pub fn with_soft_pin(mut self, ttl_ms: Option<u64>) -> Self {
        self.soft_pin_action = SoftPinAction::Enable;
        self.soft_pin_ttl_ms = ttl_ms;
        self
    }

    /// Sets `group_id`.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group_id = Some(group.into());
        self
    }
}

/// Where a replica's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReplicaKind {
    /// In a storage node's memory segment, read and written with the transfer engine.
    Memory,
    /// On a storage node's local disk. Reserved: nothing allocates it yet.
    LocalDisk,
}

/// One replica as the master hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDesc {
    /// The transfer engine segment name of the storage node.
    pub segment: String,
    /// Absolute remote address: segment base + offset.
    pub addr: u64,
    /// Length of the object in bytes.
    pub len: u64,
    /// Memory or local disk.
    pub kind: ReplicaKind,
    /// A number never handed out for any other allocation, so a later layer can tell a
    /// recycled range from the one it was granted.
    pub epoch: u64,
}
