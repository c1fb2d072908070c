//! Device memory over TCP: a payload whose registered range is device memory (GPU VRAM)
//! moves through pinned host chunks, never through the CPU's view of device memory.
//!
//! - Sending ([`StagedOut`]): up to [`DEPTH`] chunks are copied device→host ahead of the
//!   socket; a chunk is handed to the socket once its copy finished and is reused once the
//!   socket took it, so copies overlap sends (double buffering).
//! - Receiving ([`StagedIn`]): bytes land in a pinned chunk; a full chunk is copied
//!   host→device while the next one fills, with at most [`DEPTH`] copies in flight. The
//!   payload counts as received (a write is acknowledged, a read completes) only once every
//!   copy has finished on the device.
//!
//! The copies are made by the process-wide [`DeviceCopier`] (installed by the CUDA crate);
//! a finished copy wakes the connection's I/O loop through the [`Waker`] it was given. The
//! transport declares `device_memory` only when a copier is installed; a target without one
//! refuses device ranges. Pinned chunks come from a process-wide pool and go back to it only
//! after every copy into or out of them has finished.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use mooncake_core::device::{DeviceCopier, DeviceCopy, device_copier};
use mooncake_core::{BufferRegistry, Error, ErrorKind, RegionLease, Requester};

use crate::io::{Body, Link, Progress, RecvBuf, Sink};
use crate::sys::{self, Io};

/// Bytes per pinned chunk.
pub(crate) const CHUNK: u64 = 2 << 20;
/// Device copies in flight per payload (two: one chunk on the wire, one being copied).
pub(crate) const DEPTH: usize = 2;
/// Chunks per pinned allocation.
const CHUNKS_PER_SLAB: u64 = 8;

/// Wakes the I/O loop of the connection a payload belongs to.
pub(crate) type Waker = Arc<dyn Fn() + Send + Sync>;

/// True when `lease` is device memory (it must not be read or written by the CPU).
pub(crate) fn is_device(lease: &RegionLease) -> bool {
    !lease.region().location().is_host()
}

fn copier() -> Result<Arc<dyn DeviceCopier>, Error> {
    device_copier().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "device memory over tcp needs a device runtime (no CUDA copier is installed)",
        )
    })
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// The body of a frame carrying `lease`: staged when it is device memory.
pub(crate) fn body(lease: RegionLease, wake: impl FnOnce() -> Waker) -> Result<Body, Error> {
    if is_device(&lease) {
        Ok(Body::Staged(StagedOut::new(lease, wake())?))
    } else {
        Ok(Body::Leased(lease))
    }
}

/// A receiver for a payload landing in `lease`, if it is device memory.
pub(crate) fn receiver(
    lease: &RegionLease,
    wake: impl FnOnce() -> Waker,
) -> Result<Option<StagedIn>, Error> {
    if is_device(lease) {
        Ok(Some(StagedIn::new(lease.slice(0, lease.len())?, wake())?))
    } else {
        Ok(None)
    }
}

/// The process-wide pool of pinned chunks.
struct Pool {
    registry: BufferRegistry,
    free: Mutex<Vec<RegionLease>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        registry: BufferRegistry::new(),
        free: Mutex::new(Vec::new()),
    })
}

impl Pool {
    fn take(&'static self, copier: &dyn DeviceCopier) -> Result<Chunk, Error> {
        if let Some(l) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(Chunk { lease: Some(l) });
        }
        let slab = copier.alloc_pinned((CHUNK * CHUNKS_PER_SLAB) as usize)?;
        let region = self.registry.register(slab)?;
        let mut chunks = (0..CHUNKS_PER_SLAB)
            .map(|i| {
                self.registry
                    .lease(region.base() + i * CHUNK, CHUNK, Requester::Local)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mine = chunks.pop().expect("a slab has chunks");
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(chunks);
        Ok(Chunk { lease: Some(mine) })
    }
}

/// A pinned chunk; back to the pool when dropped.
struct Chunk {
    lease: Option<RegionLease>,
}

impl Chunk {
    fn lease(&self) -> &RegionLease {
        self.lease
            .as_ref()
            .expect("a chunk holds its lease until dropped")
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            pool()
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(l);
        }
    }
}

/// Returns `chunk` to the pool once `copy` (which reads or writes it) has finished.
fn release_after(chunk: Chunk, copy: &DeviceCopy) {
    if copy.is_done() {
        drop(chunk);
    } else {
        copy.on_done(move |_| drop(chunk));
    }
}

/// One chunk of an outgoing payload.
struct OutChunk {
    chunk: Option<Chunk>,
    /// Payload offset of its first byte.
    start: u64,
    len: u64,
    copy: DeviceCopy,
}

impl Drop for OutChunk {
    fn drop(&mut self) {
        if let Some(c) = self.chunk.take() {
            release_after(c, &self.copy);
        }
    }
}

/// An outgoing payload read from device memory (see the module docs).
pub(crate) struct StagedOut {
    src: RegionLease,
    copier: Arc<dyn DeviceCopier>,
    wake: Waker,
    /// Bytes the socket took.
    sent: u64,
    /// Bytes whose device→host copy was started.
    issued: u64,
    chunks: VecDeque<OutChunk>,
}

impl StagedOut {
    fn new(src: RegionLease, wake: Waker) -> Result<Self, Error> {
        Ok(Self {
            src,
            copier: copier()?,
            wake,
            sent: 0,
            issued: 0,
            chunks: VecDeque::new(),
        })
    }

    /// The device range (for revocation checks).
    pub(crate) fn lease(&self) -> &RegionLease {
        &self.src
    }

    pub(crate) fn len(&self) -> u64 {
        self.src.len()
    }

    /// Starts device→host copies until [`DEPTH`] chunks are ahead of the socket.
    fn pump(&mut self) -> Result<(), Error> {
        while self.chunks.len() < DEPTH && self.issued < self.src.len() {
            let n = CHUNK.min(self.src.len() - self.issued);
            let chunk = pool().take(&*self.copier)?;
            let copy = self
                .copier
                .copy(chunk.lease().slice(0, n)?, self.src.slice(self.issued, n)?)?;
            let wake = self.wake.clone();
            copy.on_done(move |_| wake());
            self.chunks.push_back(OutChunk {
                chunk: Some(chunk),
                start: self.issued,
                len: n,
                copy,
            });
            self.issued += n;
        }
        Ok(())
    }

    /// The bytes that can go to the socket now: part of a pinned chunk whose copy finished
    /// (`None`: wait for a copy, which wakes the loop).
    pub(crate) fn ready(&mut self) -> io::Result<Option<(&RegionLease, u64, u64)>> {
        self.pump().map_err(to_io)?;
        let Some(front) = self.chunks.front() else {
            return Ok(None);
        };
        match front.copy.result() {
            None => Ok(None),
            Some(Err(e)) => Err(to_io(e)),
            Some(Ok(())) => {
                let off = self.sent - front.start;
                let lease = front.chunk.as_ref().expect("held until dropped").lease();
                Ok(Some((lease, off, front.len - off)))
            }
        }
    }

    /// The socket took the payload up to `sent` bytes: chunks fully sent go back.
    pub(crate) fn set_sent(&mut self, sent: u64) {
        self.sent = sent;
        while self
            .chunks
            .front()
            .is_some_and(|c| c.start + c.len <= self.sent)
        {
            self.chunks.pop_front();
        }
    }
}

/// An incoming payload landing in device memory (see the module docs).
pub(crate) struct StagedIn {
    dst: RegionLease,
    copier: Arc<dyn DeviceCopier>,
    wake: Waker,
    /// The chunk being filled: (chunk, payload offset of its first byte, bytes in it).
    cur: Option<(Chunk, u64, u64)>,
    /// Bytes received into chunks.
    got: u64,
    /// Host→device copies started and maybe not finished.
    copies: VecDeque<DeviceCopy>,
    error: Option<Error>,
}

impl StagedIn {
    fn new(dst: RegionLease, wake: Waker) -> Result<Self, Error> {
        Ok(Self {
            dst,
            copier: copier()?,
            wake,
            cur: None,
            got: 0,
            copies: VecDeque::new(),
            error: None,
        })
    }

    /// Where the next bytes go: (chunk, offset in it, room), or `None` until a copy frees a
    /// chunk (the copy wakes the loop).
    fn space(&mut self) -> Result<Option<(&RegionLease, u64, u64)>, Error> {
        if self.cur.is_none() {
            while self.copies.front().is_some_and(|c| c.is_done()) {
                let c = self.copies.pop_front().expect("checked");
                if let Some(Err(e)) = c.result() {
                    self.error.get_or_insert(e);
                }
            }
            if self.copies.len() >= DEPTH {
                return Ok(None);
            }
            self.cur = Some((pool().take(&*self.copier)?, self.got, 0));
        }
        let (chunk, start, filled) = self.cur.as_ref().expect("set above");
        let room = CHUNK.min(self.dst.len() - start) - filled;
        Ok(Some((chunk.lease(), *filled, room)))
    }

    /// `n` more bytes are in the current chunk; a full chunk is copied to the device.
    fn received(&mut self, n: u64) -> Result<(), Error> {
        self.got += n;
        let Some((_, start, filled)) = self.cur.as_mut() else {
            return Ok(());
        };
        *filled += n;
        let (start, filled) = (*start, *filled);
        if filled < CHUNK.min(self.dst.len() - start) {
            return Ok(());
        }
        let (chunk, _, _) = self.cur.take().expect("checked");
        let copy = self.copier.copy(
            self.dst.slice(start, filled)?,
            chunk.lease().slice(0, filled)?,
        )?;
        let wake = self.wake.clone();
        copy.on_done(move |_| wake());
        release_after(chunk, &copy);
        self.copies.push_back(copy);
        Ok(())
    }

    /// Once every byte arrived: runs `then` with the result when the last copy finished
    /// (at once if they all have), from whichever thread finishes it.
    pub(crate) fn finish(self, then: impl FnOnce(Result<(), Error>) + Send + 'static) {
        let error = self.error.clone().or_else(|| {
            (self.got != self.dst.len())
                .then(|| Error::new(ErrorKind::Protocol, "payload cut short"))
        });
        let pending: Vec<DeviceCopy> = self.copies.iter().cloned().collect();
        drop(self);
        let join = Arc::new(Mutex::new(Join {
            left: pending.len(),
            error,
            then: Some(then),
        }));
        if pending.is_empty() {
            arrive(&join, None);
        }
        for c in pending {
            let j = join.clone();
            c.on_done(move |r| arrive(&j, Some(r)));
        }
    }

    /// A completion for the whole payload (see [`finish`](Self::finish)).
    pub(crate) fn into_copy(self) -> DeviceCopy {
        let (copy, done) = DeviceCopy::pending();
        self.finish(move |r| done.complete(r));
        copy
    }
}

/// Waits for the copies of a [`StagedIn`] (see [`StagedIn::finish`]).
struct Join<F> {
    left: usize,
    error: Option<Error>,
    then: Option<F>,
}

fn arrive<F: FnOnce(Result<(), Error>)>(join: &Mutex<Join<F>>, r: Option<&Result<(), Error>>) {
    let mut j = join.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = r {
        if let Err(e) = r {
            j.error.get_or_insert_with(|| e.clone());
        }
        j.left -= 1;
    }
    if j.left == 0
        && let Some(f) = j.then.take()
    {
        let error = j.error.take();
        drop(j);
        f(error.map_or(Ok(()), Err));
    }
}

/// Receives as much of a payload bound for device memory as is available (the counterpart
/// of `io::recv_payload` for a [`StagedIn`]).
pub(crate) fn recv_staged(
    link: Link<'_>,
    rb: &mut RecvBuf,
    sink: &mut Sink,
    s: &mut StagedIn,
    budget: u64,
    moved: &mut u64,
) -> io::Result<Progress> {
    let start = *moved;
    while sink.got < sink.len {
        if *moved - start >= budget {
            return Ok(Progress::Budget);
        }
        let n = {
            let Some((chunk, off, room)) = s.space().map_err(to_io)? else {
                return Ok(Progress::Blocked);
            };
            let want = room.min(sink.len - sink.got);
            if rb.buffered() > 0 {
                let bytes = rb.take(want as usize);
                sys::copy_into_lease(chunk, off, bytes);
                bytes.len() as u64
            } else {
                match link.recv_into_lease(chunk, off, want as usize)? {
                    Io::Done(n) => n as u64,
                    Io::WouldBlock => return Ok(Progress::Blocked),
                    Io::Eof => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed the connection",
                        ));
                    }
                }
            }
        };
        sink.got += n;
        *moved += n;
        s.received(n).map_err(to_io)?;
    }
    Ok(Progress::Done)
}
