//! [`LoopbackTransport`]: the simplest correct [`Transport`], and the reference the
//! conformance suite is checked against.
//!
//! Engines of one process find each other in a process-wide table keyed by segment name; a
//! transfer leases the range on both sides (so the target's registry checks bounds and
//! rights exactly as a network target would) and copies the bytes on the submitting thread.
//! Engines in other processes are unreachable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use mooncake_core::{
    BufferRegistry, EngineContext, Error, ErrorKind, Opcode, Requester, Result, SegmentDescriptor,
    TransferTask, Transport, TransportBuilder, TransportCapabilities,
};

/// The protocol name published in descriptors.
pub const LOOPBACK_SCHEME: &str = "loopback";

/// A running loopback endpoint: the registry of an engine and the generation it serves.
struct Endpoint {
    registry: Weak<BufferRegistry>,
    generation: u64,
}

fn endpoints() -> MutexGuard<'static, HashMap<String, Endpoint>> {
    static TABLE: OnceLock<Mutex<HashMap<String, Endpoint>>> = OnceLock::new();
    TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Builds a [`LoopbackTransport`] for an engine: `builder.with_transport(LoopbackConfig)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopbackConfig;

impl TransportBuilder for LoopbackConfig {
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(LoopbackTransport::start(ctx)))
    }
}

/// In-process copies between engines of one process.
///
/// # Behavior
/// - A task whose target segment is not running in this process, or runs under another
///   generation than the descriptor names, fails with [`ErrorKind::PeerUnreachable`].
/// - The target range is leased from the target's registry as a remote read or write, so a
///   range outside its registered memory, or one its access rights forbid, fails with
///   [`ErrorKind::RemoteAccess`] and touches nothing.
/// - Every task completes on the submitting thread before `submit` returns.
pub struct LoopbackTransport {
    name: String,
    generation: u64,
    closed: AtomicBool,
}

impl std::fmt::Debug for LoopbackTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackTransport")
            .field("segment", &self.name)
            .field("generation", &self.generation)
            .finish()
    }
}

impl LoopbackTransport {
    /// Publishes the engine's registry in the process-wide table (replacing an older
    /// generation of the same segment).
    pub fn start(ctx: &EngineContext) -> Self {
        endpoints().insert(
            ctx.local_name.clone(),
            Endpoint {
                registry: Arc::downgrade(&ctx.registry),
                generation: ctx.generation,
            },
        );
        Self {
            name: ctx.local_name.clone(),
            generation: ctx.generation,
            closed: AtomicBool::new(false),
        }
    }

    fn target(&self, segment: &str, generation: u64) -> Result<Arc<BufferRegistry>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                "the loopback transport is shut down",
            ));
        }
        let table = endpoints();
        table
            .get(segment)
            .filter(|e| e.generation == generation)
            .and_then(|e| e.registry.upgrade())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::PeerUnreachable,
                    format!("segment {segment:?} (generation {generation}) is not running in this process"),
                )
                .with_context("peer", segment)
            })
    }

    fn run(&self, task: &TransferTask) -> Result<()> {
        let remote = self.target(task.remote.name(), task.remote.descriptor().generation)?;
        let who = match task.opcode {
            Opcode::Read => Requester::RemoteRead,
            Opcode::Write => Requester::RemoteWrite,
        };
        let theirs = remote.lease(task.remote_addr, task.local.len(), who)?;
        let (src, dst) = match task.opcode {
            Opcode::Read => (theirs.as_ptr(), task.local.as_ptr()),
            Opcode::Write => (task.local.as_ptr(), theirs.as_ptr()),
        };
        // SAFETY: both ranges are leased from registered regions and are `len` bytes long;
        // the leases keep both regions registered (and their memory alive) during the copy;
        // `copy` allows the two ranges to overlap (two engines may register the same bytes).
        unsafe { std::ptr::copy(src, dst, task.local.len() as usize) };
        Ok(())
    }
}

impl Transport for LoopbackTransport {
    fn name(&self) -> &'static str {
        LOOPBACK_SCHEME
    }

    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default()
    }

    fn publish(&self, _descriptor: &mut SegmentDescriptor) {}

    fn submit(&self, tasks: Vec<TransferTask>) {
        for task in tasks {
            let r = self.run(&task);
            task.completer.complete(r);
        }
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let mut table = endpoints();
        if table
            .get(&self.name)
            .is_some_and(|e| e.generation == self.generation)
        {
            table.remove(&self.name);
        }
    }
}

impl Drop for LoopbackTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
