//! [`Slice`]: one piece of a task, as it travels between the submitter and the NIC workers.

use std::sync::Arc;
use std::time::Instant;

use mooncake_core::{Opcode, RegionLease, RemoteSegment, Result, SliceCompleter};

/// One slice of a task. It owns the lease of its local range: whoever holds the slice keeps
/// the region from finishing unregistration, so a slice is dropped (or its lease released)
/// only once no NIC can touch the range any more.
pub(crate) struct Slice {
    /// Read or write.
    pub op: Opcode,
    /// The local range.
    pub local: RegionLease,
    /// The target segment, as the engine last saw its descriptor.
    pub remote: Arc<RemoteSegment>,
    /// Remote address.
    pub remote_addr: u64,
    /// Completes the slice; `None` once it was answered (the lease may still be held).
    pub completer: Option<SliceCompleter>,
    /// The task's deadline.
    pub deadline: Instant,
    /// Failed attempts so far (across rails).
    pub attempts: u32,
    /// `(local NIC, remote NIC)` pairs this slice failed on.
    pub failed_rails: Vec<(usize, String)>,
    /// Position in the submission order (spreads slices over NICs).
    pub seq: usize,
    /// The keys refresh sequence number of its endpoint when it was queued there: a key list
    /// fetched by a later request is fresh enough to refuse it.
    pub keys_stamp: u64,
    /// The rkey the peer's NIC refused for this slice, if it did: the slice is posted again
    /// only with another (fresh) key.
    pub refused_rkey: Option<u32>,
}

impl Slice {
    /// Answers the slice (once; later calls do nothing). The lease stays with the slice.
    pub fn complete(&mut self, r: Result<()>) {
        if let Some(c) = self.completer.take() {
            c.complete(r);
        }
    }

    /// True once the slice was answered.
    pub fn is_done(&self) -> bool {
        self.completer.is_none()
    }

    /// Bytes to move.
    pub fn len(&self) -> u64 {
        self.local.len()
    }

    /// True when the slice's lease is in `region` (that registration, not just its address).
    pub fn is_in(&self, region: &std::sync::Weak<mooncake_core::Region>) -> bool {
        std::ptr::eq(region.as_ptr(), Arc::as_ptr(self.local.region()))
    }

    /// The peer's segment name.
    pub fn peer(&self) -> &str {
        self.remote.name()
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slice")
            .field("op", &self.op)
            .field("local", &self.local)
            .field("peer", &self.peer())
            .field("remote_addr", &format_args!("{:#x}", self.remote_addr))
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}
