//! The transport conformance suite must fail on broken transports: each test builds a
//! deliberately flawed in-process transport and checks that the case meant to catch the
//! flaw panics. A suite that passed these would be vacuous.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use mooncake_core::{
    BufferRegistry, EngineContext, Error, ErrorKind, Opcode, Requester, Result, SegmentDescriptor,
    TaskCompleter, TransferTask, Transport, TransportBuilder, TransportCapabilities,
};
use mooncake_testkit::TransportHarness;
use mooncake_testkit::transport::{
    random_batches, refusals_keep_guard_bytes, target_dropped_mid_transfer,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Copies without leasing the target range: no bounds or rights check on the target.
    SkipsTargetChecks,
    /// Reports success without moving a byte.
    DropsBytes,
    /// Never completes a task whose target is gone.
    HangsOnDeadPeer,
}

fn table() -> &'static Mutex<HashMap<String, Weak<BufferRegistry>>> {
    static T: OnceLock<Mutex<HashMap<String, Weak<BufferRegistry>>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

struct Broken {
    flaw: Flaw,
    parked: Mutex<Vec<TaskCompleter>>,
}

impl Transport for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn capabilities(&self) -> TransportCapabilities {
        TransportCapabilities::default()
    }
    fn publish(&self, _d: &mut SegmentDescriptor) {}
    fn submit(&self, tasks: Vec<TransferTask>) {
        for t in tasks {
            let target = table()
                .lock()
                .unwrap()
                .get(t.remote.name())
                .and_then(Weak::upgrade);
            let Some(target) = target else {
                if self.flaw == Flaw::HangsOnDeadPeer {
                    self.parked.lock().unwrap().push(t.completer);
                } else {
                    t.completer
                        .complete(Err(Error::new(ErrorKind::PeerUnreachable, "gone")));
                }
                continue;
            };
            let r = match self.flaw {
                Flaw::DropsBytes => Ok(()),
                Flaw::SkipsTargetChecks => {
                    let theirs = t.remote_addr as usize as *mut u8;
                    let (src, dst) = match t.opcode {
                        Opcode::Read => (theirs, t.local.as_ptr()),
                        Opcode::Write => (t.local.as_ptr(), theirs),
                    };
                    // SAFETY: deliberately unchecked (that is the flaw under test); the
                    // suite's target ranges that reach here lie in buffers it keeps alive.
                    unsafe { std::ptr::copy(src, dst, t.local.len() as usize) };
                    Ok(())
                }
                Flaw::HangsOnDeadPeer => copy_checked(&target, &t),
            };
            t.completer.complete(r);
        }
    }
    fn shutdown(&self) {
        self.parked.lock().unwrap().clear();
    }
}

fn copy_checked(target: &BufferRegistry, t: &TransferTask) -> Result<()> {
    let who = match t.opcode {
        Opcode::Read => Requester::RemoteRead,
        Opcode::Write => Requester::RemoteWrite,
    };
    let theirs = target.lease(t.remote_addr, t.local.len(), who)?;
    let (src, dst) = match t.opcode {
        Opcode::Read => (theirs.as_ptr(), t.local.as_ptr()),
        Opcode::Write => (t.local.as_ptr(), theirs.as_ptr()),
    };
    // SAFETY: both ranges are leased and `len` bytes long.
    unsafe { std::ptr::copy(src, dst, t.local.len() as usize) };
    Ok(())
}

struct BrokenBuilder(Flaw);

impl TransportBuilder for BrokenBuilder {
    fn build(self: Box<Self>, ctx: &EngineContext) -> Result<Arc<dyn Transport>> {
        table()
            .lock()
            .unwrap()
            .insert(ctx.local_name.clone(), Arc::downgrade(&ctx.registry));
        Ok(Arc::new(Broken {
            flaw: self.0,
            parked: Mutex::new(Vec::new()),
        }))
    }
}

struct Harness(Flaw);

impl TransportHarness for Harness {
    fn name(&self) -> &str {
        "broken"
    }
    fn builder(&self) -> Box<dyn TransportBuilder> {
        Box::new(BrokenBuilder(self.0))
    }
    fn cross_process(&self) -> bool {
        false
    }
}

fn must_fail(what: &str, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(f));
    assert!(
        r.is_err(),
        "the suite did not catch a transport that {what}"
    );
}

#[test]
fn catches_a_transport_without_target_checks() {
    must_fail("skips target checks", || {
        refusals_keep_guard_bytes(&Harness(Flaw::SkipsTargetChecks))
    });
}

#[test]
fn catches_a_transport_that_drops_bytes() {
    must_fail("drops bytes", || random_batches(&Harness(Flaw::DropsBytes)));
}

#[test]
fn catches_a_transport_that_hangs_on_a_dead_peer() {
    must_fail("hangs on a dead peer", || {
        target_dropped_mid_transfer(&Harness(Flaw::HangsOnDeadPeer))
    });
}
