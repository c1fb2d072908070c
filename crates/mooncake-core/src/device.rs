//! Device memory (GPU VRAM) hooks: what a device runtime lends to transports that do not
//! link it themselves.
//!
//! The CUDA crate (`mooncake-cuda`) installs a process-wide [`DeviceCopier`]; transports ask
//! for it with [`device_copier`]. The TCP transport stages device memory through pinned host
//! chunks with it; the engine resolves `*` locations with [`locate`]; the RDMA transport asks
//! it for dma-buf descriptors and PCI addresses (GPUDirect). Nothing here touches device
//! memory itself: without an installed copier, transports refuse device memory.
//!
//! Copies complete through a [`DeviceCopy`]: the runtime's own threads complete it (when the
//! copy has finished on the device) and run its callbacks, which must be short (complete a
//! task, wake an I/O loop).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use event_listener::{Event, Listener};

use crate::error::{Error, ErrorKind, Result};
use crate::location::Location;
use crate::segment::{MemorySegment, RegionLease};

/// A dma-buf exported for a device range (GPUDirect RDMA registers it with the NIC).
#[derive(Debug)]
pub struct DmaBuf {
    /// The dma-buf file descriptor.
    pub fd: OwnedFd,
    /// Offset of the requested address inside the dma-buf.
    pub offset: u64,
    /// Bytes the dma-buf covers from `offset`.
    pub len: u64,
}

/// Moves bytes in and out of device memory for transports that cannot do it themselves.
///
/// # Behavior
/// - [`copy`](Self::copy) never blocks on the device: it enqueues the copy on a stream the
///   runtime owns and returns at once; the returned [`DeviceCopy`] completes (from the
///   runtime's thread) once the bytes are at the destination. The runtime holds both leases
///   until then, so neither range can be unregistered (and freed) under the copy.
/// - Device memory is only ever touched by the device's copy engines, never by the CPU.
/// - Every method reports a missing driver (`ErrorKind::Unsupported`, "no CUDA …") only
///   when it is called: installing a copier on a host without a GPU is harmless.
pub trait DeviceCopier: Send + Sync + 'static {
    /// The runtime's name (`cuda`).
    fn name(&self) -> &'static str;

    /// Where `[addr, addr + len)` lives, if it is device memory this runtime knows
    /// (`Ok(None)`: not device memory, or no driver is present).
    fn locate(&self, addr: u64, len: u64) -> Result<Option<Location>>;

    /// Page-locked host memory of `len` bytes, for staging (location `cpu:*`).
    fn alloc_pinned(&self, len: usize) -> Result<Arc<dyn MemorySegment>>;

    /// Starts copying `src` into `dst` (equal lengths; either may be device memory).
    fn copy(&self, dst: RegionLease, src: RegionLease) -> Result<DeviceCopy>;

    /// A dma-buf for the device range `[addr, addr + len)` (GPUDirect RDMA).
    fn dmabuf(&self, addr: u64, len: u64) -> Result<DmaBuf> {
        let _ = (addr, len);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{} cannot export dma-bufs", self.name()),
        ))
    }

    /// The PCI address (`0000:1b:00.0`) of the device at `location`, for NIC affinity.
    fn pci_bus_id(&self, location: &Location) -> Result<String> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{} knows no PCI address of {location}", self.name()),
        ))
    }
}

static COPIER: RwLock<Option<Arc<dyn DeviceCopier>>> = RwLock::new(None);

/// Installs the process-wide device copier (replacing any earlier one).
///
/// Engines read transports' capabilities when they are built: install the copier before
/// building an engine whose transports should move device memory.
pub fn install_device_copier(copier: Arc<dyn DeviceCopier>) {
    *COPIER.write().unwrap_or_else(|p| p.into_inner()) = Some(copier);
}

/// The installed device copier, if any.
pub fn device_copier() -> Option<Arc<dyn DeviceCopier>> {
    COPIER.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The location of `[addr, addr + len)` if the installed copier knows it as device memory.
pub fn locate(addr: u64, len: u64) -> Result<Option<Location>> {
    match device_copier() {
        Some(c) => c.locate(addr, len),
        None => Ok(None),
    }
}

type Callback = Box<dyn FnOnce(&Result<()>) + Send>;

enum CopyState {
    Pending(Vec<Callback>),
    Done(Result<()>),
}

struct CopyShared {
    state: Mutex<CopyState>,
    done: Event,
}

/// The completion of a device copy; cloning shares it.
#[derive(Clone)]
pub struct DeviceCopy {
    shared: Arc<CopyShared>,
}

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCopy")
            .field("done", &self.is_done())
            .finish()
    }
}

/// Completes a [`DeviceCopy`]: exactly once; dropping it first fails the copy.
pub struct CopyCompleter {
    shared: Option<Arc<CopyShared>>,
}

impl std::fmt::Debug for CopyCompleter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyCompleter")
    }
}

impl DeviceCopy {
    /// A pending copy and its completer.
    pub fn pending() -> (Self, CopyCompleter) {
        let shared = Arc::new(CopyShared {
            state: Mutex::new(CopyState::Pending(Vec::new())),
            done: Event::new(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            CopyCompleter {
                shared: Some(shared),
            },
        )
    }

    /// A copy that already finished with `result`.
    pub fn ready(result: Result<()>) -> Self {
        Self {
            shared: Arc::new(CopyShared {
                state: Mutex::new(CopyState::Done(result)),
                done: Event::new(),
            }),
        }
    }

    /// True once the copy finished (well or not).
    pub fn is_done(&self) -> bool {
        matches!(
            *self.shared.state.lock().unwrap_or_else(|p| p.into_inner()),
            CopyState::Done(_)
        )
    }

    /// The result, once finished.
    pub fn result(&self) -> Option<Result<()>> {
        match &*self.shared.state.lock().unwrap_or_else(|p| p.into_inner()) {
            CopyState::Done(r) => Some(r.clone()),
            CopyState::Pending(_) => None,
        }
    }

    /// Runs `f` with the result once the copy finished: now, on this thread, if it already
    /// has; else on the thread that completes it. `f` must be short and must not block.
    pub fn on_done(&self, f: impl FnOnce(&Result<()>) + Send + 'static) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *st {
            CopyState::Pending(cbs) => cbs.push(Box::new(f)),
            CopyState::Done(r) => {
                let r = r.clone();
                drop(st);
                f(&r);
            }
        }
    }

    /// Blocks until the copy finished or `deadline` passed ([`ErrorKind::Timeout`]).
    pub fn wait(&self, deadline: Option<Instant>) -> Result<()> {
        loop {
            if let Some(r) = self.result() {
                return r;
            }
            let l = self.shared.done.listen();
            if let Some(r) = self.result() {
                return r;
            }
            match deadline {
                None => l.wait(),
                Some(d) => {
                    if l.wait_deadline(d).is_none() && !self.is_done() {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            "the device copy did not finish before the deadline",
                        ));
                    }
                }
            }
        }
    }
}

impl CopyCompleter {
    /// Finishes the copy with `result` and runs its callbacks on this thread.
    pub fn complete(mut self, result: Result<()>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<()>) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let cbs = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *st, CopyState::Done(result.clone())) {
                CopyState::Pending(cbs) => cbs,
                CopyState::Done(prev) => {
                    *st = CopyState::Done(prev);
                    Vec::new()
                }
            }
        };
        shared.done.notify(usize::MAX);
        for cb in cbs {
            cb(&result);
        }
    }
}

impl Drop for CopyCompleter {
    fn drop(&mut self) {
        if self.shared.is_some() {
            self.finish(Err(Error::new(
                ErrorKind::Closed,
                "the device runtime dropped a copy unfinished",
            )));
        }
    }
}

/// Waits for every copy in `copies` and returns the first error (after all finished).
pub fn wait_all(copies: &[DeviceCopy], deadline: Option<Instant>) -> Result<()> {
    let mut first = Ok(());
    for c in copies {
        let r = c.wait(deadline);
        if first.is_ok() {
            first = r;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn callbacks_run_once_on_completion_or_at_once() {
        let (copy, done) = DeviceCopy::pending();
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        copy.on_done(move |r| {
            assert!(r.is_ok());
            m.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!copy.is_done());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            done.complete(Ok(()));
        });
        copy.wait(None).unwrap();
        t.join().unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let m = n.clone();
        copy.on_done(move |_| {
            m.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn dropped_completer_fails_and_deadline_times_out() {
        let (copy, done) = DeviceCopy::pending();
        let e = copy
            .wait(Some(Instant::now() + Duration::from_millis(5)))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        drop(done);
        assert_eq!(copy.wait(None).unwrap_err().kind(), ErrorKind::Closed);
        assert!(wait_all(&[DeviceCopy::ready(Ok(())), copy], None).is_err());
    }

    #[test]
    fn no_copier_locates_nothing() {
        if device_copier().is_none() {
            assert_eq!(locate(0x1000, 16).unwrap(), None);
        }
    }
}
