//! Raw socket I/O straight into and out of registered memory, with progress tracking and
//! timeouts. The only `unsafe` of the crate lives here.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// What to do when a socket call times out with nothing moved.
pub(crate) trait Stall {
    /// Called on every socket timeout tick; return an error to give up.
    fn on_stall(&mut self) -> io::Result<()>;
    /// Called whenever bytes moved.
    fn on_progress(&mut self, bytes: usize);
}

/// Gives up once nothing has moved for `limit`.
pub(crate) struct Deadline {
    last: Instant,
    limit: Duration,
}

impl Deadline {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            last: Instant::now(),
            limit,
        }
    }
}

impl Stall for Deadline {
    fn on_stall(&mut self) -> io::Result<()> {
        if self.last.elapsed() >= self.limit {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress for {:?}", self.limit),
            ))
        } else {
            Ok(())
        }
    }
    fn on_progress(&mut self, _bytes: usize) {
        self.last = Instant::now();
    }
}

fn is_stall(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Runs one socket call until it moves bytes: retries on `EINTR`, consults `stall` on each
/// timeout tick, reports progress, and turns end-of-stream into `UnexpectedEof`.
fn until_progress(stall: &mut dyn Stall, mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n > 0 {
            stall.on_progress(n as usize);
            return Ok(n as usize);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            ));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if is_stall(&e) {
            stall.on_stall()?;
            continue;
        }
        return Err(e);
    }
}

/// Receives exactly `len` bytes into `ptr`.
///
/// # Safety
/// `ptr..ptr + len` must be valid for writes for the whole call (a leased registered range
/// or a local buffer).
pub(crate) unsafe fn recv_exact(
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    stall: &mut dyn Stall,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: `ptr + done .. ptr + len` is inside the range the caller vouched for.
        done += until_progress(stall, || unsafe {
            libc::recv(fd, ptr.add(done).cast(), len - done, 0)
        })?;
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes into a safe buffer.
pub(crate) fn recv_into(fd: RawFd, buf: &mut [u8], stall: &mut dyn Stall) -> io::Result<()> {
    // SAFETY: `buf` is a live, exclusively borrowed slice of exactly this length.
    unsafe { recv_exact(fd, buf.as_mut_ptr(), buf.len(), stall) }
}

/// One `recv` of up to `buf.len()` bytes (at least one), waiting through timeouts.
pub(crate) fn recv_some(fd: RawFd, buf: &mut [u8], stall: &mut dyn Stall) -> io::Result<usize> {
    // SAFETY: `buf` is a live, exclusively borrowed slice.
    until_progress(stall, || unsafe {
        libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0)
    })
}

/// Sends `head` and then `len` bytes at `ptr`, as one gathered write where possible.
///
/// # Safety
/// `ptr..ptr + len` must be valid for reads for the whole call (`len` may be 0).
pub(crate) unsafe fn send_gather(
    fd: RawFd,
    head: &[u8],
    ptr: *const u8,
    len: usize,
    stall: &mut dyn Stall,
) -> io::Result<()> {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: ptr as *mut _,
            iov_len: len,
        },
    ];
    // SAFETY: the iovecs describe `head` and the caller's valid range.
    unsafe { send_iovecs(fd, &mut iov, stall) }
}

/// Sends a safe buffer.
pub(crate) fn send_all(fd: RawFd, buf: &[u8], stall: &mut dyn Stall) -> io::Result<()> {
    // SAFETY: no payload range is passed (length 0).
    unsafe { send_gather(fd, buf, std::ptr::null(), 0, stall) }
}

/// Sends every byte the iovecs describe, in order, with as few `sendmsg` calls as the
/// kernel allows. The iovecs are consumed (advanced) as bytes go out.
///
/// # Safety
/// Every iovec must describe memory valid for reads for the whole call.
pub(crate) unsafe fn send_iovecs(
    fd: RawFd,
    iov: &mut [libc::iovec],
    stall: &mut dyn Stall,
) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut first = 0;
    loop {
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
        if first == iov.len() {
            return Ok(());
        }
        let msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            msg_iov: iov[first..].as_mut_ptr(),
            msg_iovlen: (iov.len() - first).min(IOV_MAX),
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        // SAFETY: the iovecs are valid per the contract; MSG_NOSIGNAL turns a closed peer
        // into EPIPE instead of SIGPIPE.
        let mut n = until_progress(stall, || unsafe {
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        })?;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                v.iov_len = 0;
                first += 1;
            } else {
                // SAFETY: `n < iov_len`, so the advanced base stays inside the same range.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}
