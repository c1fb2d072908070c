//! The process-wide CUDA state: the driver loaded on first use, one retained primary context
//! per device touched (peer access enabled between them), engine-owned streams and event
//! pools, and the thread that polls copy events and completes their [`DeviceCopy`]s.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use mooncake_core::device::{CopyCompleter, DeviceCopy};
use mooncake_core::{Error, ErrorKind, Result};
use tracing::{debug, warn};

use crate::sys::{self, Context, CopyEnd, Event, InFlight, PointerInfo, Stream};

/// Copy streams per device: independent copies run on different copy engines.
const STREAMS_PER_DEVICE: usize = 8;

/// While copies are pending the poller spins (yielding) this long after the last
/// completion before it starts sleeping between sweeps.
const SPIN: Duration = Duration::from_millis(2);
/// Sleep between sweeps once spinning stopped paying off.
const NAP: Duration = Duration::from_micros(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One device: its primary context, copy streams and spare events.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) ctx: Context,
    streams: Vec<Stream>,
    next: AtomicUsize,
    events: Mutex<Vec<Event>>,
}

impl Device {
    pub(crate) fn first_stream(&self) -> &Stream {
        &self.streams[0]
    }

    fn stream(&self) -> &Stream {
        &self.streams[self.next.fetch_add(1, Ordering::Relaxed) % self.streams.len()]
    }

    fn event(&self) -> Result<Event> {
        match lock(&self.events).pop() {
            Some(e) => Ok(e),
            None => Event::new(&self.ctx),
        }
    }
}

/// The loaded driver.
pub(crate) struct Cuda {
    count: u32,
    devices: Vec<OnceLock<Arc<Device>>>,
    /// Serialises device set-up (peer access is enabled pairwise as devices appear).
    setup: Mutex<()>,
    poller: Arc<PollShared>,
    uuids: OnceLock<Vec<Option<[u8; 16]>>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("devices", &self.count)
            .finish()
    }
}

/// The driver, loaded and initialised on first call. Without a driver (or a GPU) every call
/// fails with "no CUDA"; nothing is attempted before this is called.
pub(crate) fn cuda() -> Result<&'static Cuda> {
    static CUDA: OnceLock<std::result::Result<Cuda, Error>> = OnceLock::new();
    CUDA.get_or_init(|| {
        let count = sys::init()?;
        if count == 0 {
            return Err(sys::no_cuda("the driver reports no GPU"));
        }
        let poller = Arc::new(PollShared {
            queue: Mutex::new(Vec::new()),
            cv: Condvar::new(),
        });
        let p = poller.clone();
        std::thread::Builder::new()
            .name("mooncake-cuda-poll".into())
            .spawn(move || poll_loop(&p))
            .map_err(|e| Error::io("start the CUDA completion thread", &e))?;
        Ok(Cuda {
            count,
            devices: (0..count).map(|_| OnceLock::new()).collect(),
            setup: Mutex::new(()),
            poller,
            uuids: OnceLock::new(),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Whether a driver with at least one GPU is present (loads it).
pub fn available() -> bool {
    cuda().is_ok()
}

/// Number of GPUs, or the "no CUDA" error.
pub fn device_count() -> Result<u32> {
    Ok(cuda()?.count)
}

impl Cuda {
    /// Device `ordinal`, set up on first use (context retained, streams created, peer access
    /// enabled with the devices set up before it).
    pub(crate) fn device(&self, ordinal: u32) -> Result<Arc<Device>> {
        let slot = self.devices.get(ordinal as usize).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("cuda:{ordinal} does not exist ({} GPUs)", self.count),
            )
        })?;
        if let Some(d) = slot.get() {
            return Ok(d.clone());
        }
        let _g = lock(&self.setup);
        if let Some(d) = slot.get() {
            return Ok(d.clone());
        }
        let ctx = sys::primary_context(ordinal)?;
        let streams = (0..STREAMS_PER_DEVICE)
            .map(|_| Stream::new(&ctx))
            .collect::<Result<Vec<_>>>()?;
        for other in self.devices.iter().filter_map(|d| d.get()) {
            for (a, b) in [(&ctx, &other.ctx), (&other.ctx, &ctx)] {
                match sys::can_access_peer(a, b) {
                    Ok(true) => {
                        if let Err(e) = sys::enable_peer_access(a, b) {
                            warn!(
                                "cannot enable peer access cuda:{} -> cuda:{}: {e}",
                                a.ordinal, b.ordinal
                            );
                        }
                    }
                    Ok(false) => debug!("cuda:{} cannot map cuda:{}", a.ordinal, b.ordinal),
                    Err(e) => warn!("cuDeviceCanAccessPeer: {e}"),
                }
            }
        }
        let d = Arc::new(Device {
            ctx,
            streams,
            next: AtomicUsize::new(0),
            events: Mutex::new(Vec::new()),
        });
        let _ = slot.set(d.clone());
        Ok(d)
    }

    /// The UUID of device `ordinal`.
    pub(crate) fn uuid(&self, ordinal: u32) -> Option<[u8; 16]> {
        self.uuids().get(ordinal as usize).copied().flatten()
    }

    /// The local ordinal of the device with `uuid`, if this process sees it.
    pub(crate) fn ordinal_of(&self, uuid: &[u8; 16]) -> Option<u32> {
        self.uuids()
            .iter()
            .position(|u| u.as_ref() == Some(uuid))
            .map(|i| i as u32)
    }

    fn uuids(&self) -> &[Option<[u8; 16]>] {
        self.uuids
            .get_or_init(|| (0..self.count).map(|i| sys::uuid(i).ok()).collect())
    }

    /// What the driver says about `ptr` (device and allocation), `None` for host memory.
    pub(crate) fn pointer(&self, ptr: u64) -> Result<Option<PointerInfo>> {
        let Some(ordinal) = sys::pointer_device(&self.device(0)?.ctx, ptr)? else {
            return Ok(None);
        };
        let (alloc_base, alloc_len) = sys::allocation(&self.device(ordinal)?.ctx, ptr)?;
        Ok(Some(PointerInfo {
            ordinal,
            alloc_base,
            alloc_len,
        }))
    }

    /// Enqueues `src` → `dst` on one of `device`'s streams; the returned copy completes from
    /// the poller thread once the device finished it.
    pub(crate) fn copy(&self, device: &Arc<Device>, dst: CopyEnd, src: CopyEnd) -> DeviceCopy {
        let event = match device.event() {
            Ok(e) => e,
            Err(e) => return DeviceCopy::ready(Err(e)),
        };
        match sys::copy_async(device.stream(), event, dst, src) {
            Ok(flight) => {
                let (copy, done) = DeviceCopy::pending();
                lock(&self.poller.queue).push(Job {
                    flight,
                    device: device.clone(),
                    done,
                });
                self.poller.cv.notify_one();
                copy
            }
            Err((e, event)) => {
                lock(&device.events).push(event);
                DeviceCopy::ready(Err(e))
            }
        }
    }
}

struct Job {
    flight: InFlight,
    device: Arc<Device>,
    done: CopyCompleter,
}

struct PollShared {
    queue: Mutex<Vec<Job>>,
    cv: Condvar,
}

/// Polls the events of pending copies; completes each copy once its event fired, after its
/// ends (leases, mappings) were released.
fn poll_loop(shared: &PollShared) {
    let mut pending: Vec<Job> = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        {
            let mut q = lock(&shared.queue);
            while pending.is_empty() && q.is_empty() {
                q = shared.cv.wait(q).unwrap_or_else(|p| p.into_inner());
                last_progress = Instant::now();
            }
            pending.append(&mut q);
        }
        let mut i = 0;
        let mut progressed = false;
        while i < pending.len() {
            match pending[i].flight.is_done() {
                Ok(false) => i += 1,
                Ok(true) | Err(_) => {
                    let job = pending.swap_remove(i);
                    let (r, event) = job.flight.finish();
                    if let Some(e) = event
                        && r.is_ok()
                    {
                        lock(&job.device.events).push(e);
                    }
                    job.done.complete(r);
                    progressed = true;
                }
            }
        }
        if progressed {
            last_progress = Instant::now();
        } else if !pending.is_empty() {
            if last_progress.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(NAP);
            }
        }
    }
}
