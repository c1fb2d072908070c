//! The operating-system edge of the TCP transport, and all of the crate's `unsafe` code:
//! epoll, an eventfd for wake-ups, non-blocking `recv` into registered memory and gathered
//! non-blocking `sendmsg` of frames whose payloads live in registered memory.
//!
//! Everything here is exposed through safe functions: registered memory is only ever named
//! through a [`RegionLease`], which keeps its range registered (and so valid) while it lives.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use mooncake_core::RegionLease;

/// What a ready file descriptor can do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    /// The token it was registered with.
    pub(crate) token: u64,
    /// Readable, or the peer hung up, or an error is pending: reading will tell.
    pub(crate) readable: bool,
    /// Writable (or an error is pending).
    pub(crate) writable: bool,
}

/// An epoll instance, edge-triggered.
pub(crate) struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the returned descriptor is checked and then owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        let mut events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
        if write {
            events |= libc::EPOLLOUT;
        }
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; epoll takes no
        // reference to it afterwards.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Watches `fd` for reads (and writes, with `write`), edge-triggered, under `token`.
    pub(crate) fn add(&self, fd: RawFd, token: u64, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, write)
    }

    /// Stops watching `fd`.
    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, false)
    }

    /// Waits up to `timeout` (None: forever) and appends ready events to `out`.
    pub(crate) fn wait(&self, out: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        const MAX: usize = 256;
        let mut raw = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `raw` has room for MAX events and outlives the call.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), raw.as_mut_ptr(), MAX as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for ev in &raw[..n as usize] {
            let bits = ev.events as i32;
            out.push(Event {
                token: ev.u64,
                readable: bits
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                    != 0,
                writable: bits & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) != 0,
            });
        }
        Ok(())
    }
}

/// An eventfd: other threads wake an epoll loop with it.
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the returned descriptor is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the descriptor readable (wakes a loop waiting on it).
    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) is already a
        // pending wake-up, so the result is not needed.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the counter.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    }
}

/// Outcome of one non-blocking socket call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Io {
    /// Moved this many bytes (> 0).
    Done(usize),
    /// Nothing to do now: wait for the next edge.
    WouldBlock,
    /// The peer closed its end.
    Eof,
}

fn classify(n: isize) -> io::Result<Io> {
    if n > 0 {
        return Ok(Io::Done(n as usize));
    }
    if n == 0 {
        return Ok(Io::Eof);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(Io::WouldBlock),
        io::ErrorKind::Interrupted => Ok(Io::Done(0)),
        _ => Err(e),
    }
}

/// One non-blocking `recv` into a safe buffer.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Io> {
    // SAFETY: `buf` is a live, exclusively borrowed slice of exactly this length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    classify(n)
}

/// One non-blocking `recv` of up to `len` bytes into `lease` at `offset`.
///
/// Panics if `offset + len` exceeds the lease: callers track their position in the lease.
pub(crate) fn recv_into_lease(
    fd: RawFd,
    lease: &RegionLease,
    offset: u64,
    len: usize,
) -> io::Result<Io> {
    assert!(offset + len as u64 <= lease.len(), "receive past the lease");
    // SAFETY: the lease keeps `[addr, addr + len())` registered, and registered memory is
    // valid for writes (the `MemorySegment` contract); `offset + len` is inside the lease.
    let n = unsafe {
        libc::recv(
            fd,
            lease.as_ptr().add(offset as usize).cast(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
    classify(n)
}

/// Copies `src` into `lease` at `offset`. Panics if it does not fit.
pub(crate) fn copy_into_lease(lease: &RegionLease, offset: u64, src: &[u8]) {
    assert!(
        offset + src.len() as u64 <= lease.len(),
        "copy past the lease"
    );
    // SAFETY: in bounds (checked above) of a leased, registered range valid for writes;
    // `src` is a safe slice, which cannot alias registered memory handed to a transport.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), lease.as_ptr().add(offset as usize), src.len())
    };
}

/// Copies `dst.len()` bytes of `lease` at `offset` into `dst`. Panics if they run past it.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub(crate) fn copy_from_lease(lease: &RegionLease, offset: u64, dst: &mut [u8]) {
    assert!(
        offset + dst.len() as u64 <= lease.len(),
        "copy past the lease"
    );
    // SAFETY: in bounds (checked above) of a leased, registered range valid for reads;
    // `dst` is a safe exclusive slice, which cannot alias registered memory.
    unsafe {
        std::ptr::copy_nonoverlapping(
            lease.as_ptr().add(offset as usize),
            dst.as_mut_ptr(),
            dst.len(),
        )
    };
}

/// One piece of a gathered send: a safe byte slice, or part of a leased range.
pub(crate) enum Chunk<'a> {
    /// Bytes the caller owns (headers, messages).
    Bytes(&'a [u8]),
    /// `len` bytes of `lease` starting at `offset`.
    Leased {
        /// The range (kept registered while borrowed).
        lease: &'a RegionLease,
        /// Start inside the lease.
        offset: u64,
        /// Bytes to send.
        len: u64,
    },
}

/// One non-blocking gathered `sendmsg` of `chunks` (at most 1024 are sent per call).
pub(crate) fn send_chunks(fd: RawFd, chunks: &[Chunk<'_>]) -> io::Result<Io> {
    const IOV_MAX: usize = 1024;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(chunks.len().min(IOV_MAX));
    for c in chunks.iter().take(IOV_MAX) {
        let (ptr, len) = match c {
            Chunk::Bytes(b) => (b.as_ptr(), b.len()),
            Chunk::Leased { lease, offset, len } => {
                assert!(offset + len <= lease.len(), "send past the lease");
                // SAFETY: `offset` is inside the lease (checked above), so the pointer stays
                // within the leased range.
                (
                    unsafe { lease.as_ptr().add(*offset as usize) }.cast_const(),
                    *len as usize,
                )
            }
        };
        if len > 0 {
            iov.push(libc::iovec {
                iov_base: ptr as *mut _,
                iov_len: len,
            });
        }
    }
    if iov.is_empty() {
        return Ok(Io::Done(0));
    }
    let msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: iov.as_mut_ptr(),
        msg_iovlen: iov.len(),
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    // SAFETY: every iovec points into a borrowed slice or a borrowed lease (both outlive the
    // call) and is in bounds; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    classify(n)
}

/// Aborts a connection: `SO_LINGER` 0 then `shutdown`, so the peer sees a reset and any
/// bytes it has not read yet are discarded rather than delivered late.
pub(crate) fn abort(sock: &socket2::Socket) {
    let _ = sock.set_linger(Some(Duration::ZERO));
    let _ = sock.shutdown(std::net::Shutdown::Both);
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
///
/// A process that talks to many peers needs a descriptor per connection; the default soft
/// limit (often 1,024) is far below what the kernel allows.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit with cur ≤ max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}
