//! The [`Transport`] trait: how the engine hands checked transfer tasks to TCP, RDMA or
//! NVMe-oF, and how those report completion.

use std::sync::Arc;
use std::time::Duration;

use crate::completion::TaskCompleter;
use crate::descriptor::{BufferDesc, RemoteSegment, SegmentDescriptor};
use crate::error::Result;
use crate::segment::{BufferRegistry, Region, RegionLease};

/// Direction of a one-sided transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Pull remote bytes into local memory.
    Read = 0,
    /// Push local bytes into remote memory.
    Write = 1,
}

/// A segment opened by the engine's `open_segment` (an index into its segment cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentHandle(pub u64);

impl SegmentHandle {
    /// The engine's own segment (Mooncake's `LOCAL_SEGMENT_ID`).
    pub const LOCAL: Self = Self(0);
}

/// One request of a batch, in Mooncake's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRequest {
    /// Read or write.
    pub opcode: Opcode,
    /// Local address (inside registered memory).
    pub source: u64,
    /// The opened target segment.
    pub target_id: SegmentHandle,
    /// Remote address inside the target's registered memory.
    pub target_offset: u64,
    /// Bytes to move.
    pub length: u64,
}

/// A checked task handed to a transport: the local range is leased, the remote range was
/// checked against the descriptor (the target checks it again).
#[derive(Debug)]
pub struct TransferTask {
    /// Read or write.
    pub opcode: Opcode,
    /// The local range, leased for the task's lifetime.
    pub local: RegionLease,
    /// The target segment.
    pub remote: Arc<RemoteSegment>,
    /// Remote address.
    pub remote_addr: u64,
    /// Completes the task.
    pub completer: TaskCompleter,
}

/// What a transport can do; the engine reads it when it routes each request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TransportCapabilities {
    /// Moves bytes of device memory (a local or remote region whose [`crate::Location`] is
    /// not host memory, e.g. `cuda:0`). The engine never hands such a request to a transport
    /// without it, and never copies device memory with the CPU.
    pub device_memory: bool,
}

impl TransportCapabilities {
    /// Sets [`device_memory`](Self::device_memory).
    pub fn with_device_memory(mut self, yes: bool) -> Self {
        self.device_memory = yes;
        self
    }
}

/// What an engine tells a transport when building it.
#[derive(Debug, Clone)]
pub struct EngineContext {
    /// The local segment name.
    pub local_name: String,
    /// The host name or address peers should use.
    pub hostname: String,
    /// The engine's registered memory; the transport checks every inbound range against it.
    pub registry: Arc<BufferRegistry>,
    /// This engine instance's generation (changes on every restart).
    pub generation: u64,
    /// How long a peer may make no progress before its tasks fail.
    pub timeout: Duration,
    /// The cluster secret peers must prove they hold (None: no authentication).
    pub secret: Option<crate::auth::ClusterSecret>,
}

/// A data transport.
///
/// # Behavior
/// - `submit` takes ownership of the tasks and must not block on the network; it completes
///   every task exactly once, from the transport's own threads or inline.
/// - A completed write means the bytes were applied at the destination; a completed read
///   means they are in local memory.
/// - A peer that dies or stops making progress fails its tasks within the configured
///   timeout; other peers are unaffected.
/// - Failures that another path might not have are [`crate::Error::is_temporary`].
pub trait Transport: Send + Sync + 'static {
    /// The protocol name, as published in descriptors (`tcp`, `rdma`, `nvmeof`).
    fn name(&self) -> &'static str;
    /// What this transport can do.
    fn capabilities(&self) -> TransportCapabilities;
    /// Adds this transport's fields (ports, devices, keys) to the local descriptor.
    fn publish(&self, descriptor: &mut SegmentDescriptor);
    /// Whether this transport can reach `remote` (it published what this transport needs).
    fn can_reach(&self, remote: &RemoteSegment) -> bool {
        remote.descriptor().speaks(self.name())
    }
    /// Whether this transport can move bytes between the local `region` and `buffer` of
    /// `remote` (the engine asks per request, after [`can_reach`](Self::can_reach)). The
    /// default is `can_reach`; a transport that handles only some pairs (CUDA IPC reaches
    /// only device buffers of same-host peers) narrows it.
    fn can_move(&self, region: &Region, remote: &RemoteSegment, buffer: &BufferDesc) -> bool {
        let _ = (region, buffer);
        self.can_reach(remote)
    }
    /// Moves the tasks; see the trait's behaviour notes.
    fn submit(&self, tasks: Vec<TransferTask>);
    /// Called after `region` was registered (RDMA registers it with its NICs here).
    fn on_register(&self, _region: &Arc<Region>) -> Result<()> {
        Ok(())
    }
    /// Called when `region` is being unregistered: it has left the registry (no new lease
    /// can name it) and the engine waits for its leases to drain next.
    ///
    /// The transport must revoke every access it can still make to the region — deregister
    /// NIC mappings, abort I/O in progress into or out of it — fail the tasks that use it,
    /// and drop its leases promptly: the engine does not return from unregistering (and the
    /// caller does not free the memory) until they are gone.
    fn on_unregister(&self, _region: &Arc<Region>) {}
    /// Drops cached connections and state of a peer that vanished or was closed.
    ///
    /// With `Some(generation)`, only state of that generation of the peer is dropped (a
    /// newer incarnation the transport already reached is kept). Transports must also notice
    /// a newer generation in a task's descriptor by themselves and replace stale state.
    fn forget_peer(&self, _segment: &str, _generation: Option<u64>) {}
    /// Stops threads and closes connections; in-flight tasks fail.
    ///
    /// When it returns the transport no longer reads or writes registered memory (local or
    /// on behalf of a peer), and peers can no longer reach it. The engine calls it when its
    /// last clone is dropped.
    fn shutdown(&self) {}
}

/// Builds a transport for an engine (the engine supplies its context).
pub trait TransportBuilder: Send {
    /// Creates the transport and starts its threads.
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>>;
}

impl<F> TransportBuilder for F
where
    F: FnOnce(&EngineContext) -> Result<Arc<dyn Transport>> + Send,
{
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        (*self)(ctx)
    }
}
