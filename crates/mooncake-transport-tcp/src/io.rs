//! Buffered frame I/O: many small frames per system call, large payloads straight between
//! the socket and registered memory.
//!
//! [`RecvBuf`] reads whatever the socket has (often several frames) into a buffer, hands
//! out headers and small payloads from it, and receives large payloads directly into their
//! destination. [`OutQueue`] collects outgoing frames (headers, error messages, and payloads
//! held by leases) and sends them with one gathered write.

use std::io;
use std::os::fd::RawFd;

use mooncake_core::RegionLease;

use crate::sys::{self, Stall};
use crate::wire::HEADER_LEN;

/// Payloads at least this long, once the buffered part is used, are received directly into
/// their destination instead of through the buffer.
const DIRECT_MIN: usize = 16 * 1024;

/// Size of a connection's receive buffer. Small on purpose: it batches headers and small
/// frames (hundreds of acknowledgements per system call), while at most this many bytes of a
/// large payload (those that arrived with its header) are copied rather than received in
/// place.
pub(crate) const RECV_BUF: usize = 8 * 1024;

/// A receive buffer over one socket.
pub(crate) struct RecvBuf {
    fd: RawFd,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn new(fd: RawFd, capacity: usize) -> Self {
        Self {
            fd,
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not consumed yet.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when a whole header is already buffered (no system call needed for it).
    pub(crate) fn has_header(&self) -> bool {
        self.buffered() >= HEADER_LEN
    }

    /// One `recv` of whatever is available into the free space.
    fn fill(&mut self, stall: &mut dyn Stall) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = sys::recv_some(self.fd, &mut self.buf[self.end..], stall)?;
        self.end += n;
        Ok(())
    }

    /// The next header.
    pub(crate) fn header(&mut self, stall: &mut dyn Stall) -> io::Result<[u8; HEADER_LEN]> {
        while self.buffered() < HEADER_LEN {
            self.fill(stall)?;
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        self.start += HEADER_LEN;
        Ok(h)
    }

    /// Receives exactly `len` payload bytes into `dst`.
    ///
    /// # Safety
    /// `dst..dst + len` must be valid for writes for the whole call.
    pub(crate) unsafe fn payload(
        &mut self,
        dst: *mut u8,
        len: usize,
        stall: &mut dyn Stall,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            if self.buffered() == 0 {
                if len - done >= DIRECT_MIN {
                    // SAFETY: `dst + done .. dst + len` is inside the caller's valid range.
                    return unsafe { sys::recv_exact(self.fd, dst.add(done), len - done, stall) };
                }
                self.fill(stall)?;
            }
            let n = self.buffered().min(len - done);
            // SAFETY: `n` bytes from the buffer into the caller's range at `done`, which has
            // at least `len - done >= n` bytes left; the buffer and the range don't overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(self.buf[self.start..].as_ptr(), dst.add(done), n)
            };
            self.start += n;
            done += n;
        }
        Ok(())
    }

    /// Receives `len` bytes into a new vector (control payloads, which are small).
    pub(crate) fn bytes(&mut self, len: usize, stall: &mut dyn Stall) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        // SAFETY: `v` is a live buffer of exactly `len` bytes.
        unsafe { self.payload(v.as_mut_ptr(), len, stall)? };
        Ok(v)
    }

    /// Reads and drops `len` bytes (the payload of a refused write).
    pub(crate) fn discard(&mut self, mut len: u64, stall: &mut dyn Stall) -> io::Result<()> {
        while len > 0 {
            if self.buffered() == 0 {
                self.fill(stall)?;
            }
            let n = (self.buffered() as u64).min(len) as usize;
            self.start += n;
            len -= n as u64;
        }
        Ok(())
    }
}

enum Body {
    None,
    Owned(Vec<u8>),
    Leased(RegionLease),
}

/// Frames waiting to be sent together.
pub(crate) struct OutQueue {
    heads: Vec<[u8; HEADER_LEN]>,
    bodies: Vec<Body>,
    bytes: usize,
}

impl OutQueue {
    pub(crate) fn new() -> Self {
        Self {
            heads: Vec::new(),
            bodies: Vec::new(),
            bytes: 0,
        }
    }

    /// Bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames queued.
    pub(crate) fn len(&self) -> usize {
        self.heads.len()
    }

    /// Queues a header alone.
    pub(crate) fn push(&mut self, head: [u8; HEADER_LEN]) {
        self.push_body(head, Body::None);
    }

    /// Queues a header and a small owned payload.
    pub(crate) fn push_owned(&mut self, head: [u8; HEADER_LEN], body: Vec<u8>) {
        self.push_body(head, Body::Owned(body));
    }

    /// Queues a header and the leased bytes (kept registered until sent).
    pub(crate) fn push_leased(&mut self, head: [u8; HEADER_LEN], body: RegionLease) {
        self.push_body(head, Body::Leased(body));
    }

    fn push_body(&mut self, head: [u8; HEADER_LEN], body: Body) {
        self.bytes += HEADER_LEN
            + match &body {
                Body::None => 0,
                Body::Owned(v) => v.len(),
                Body::Leased(l) => l.len() as usize,
            };
        self.heads.push(head);
        self.bodies.push(body);
    }

    /// Sends everything queued with gathered writes, then empties the queue.
    pub(crate) fn flush(&mut self, fd: RawFd, stall: &mut dyn Stall) -> io::Result<()> {
        if self.heads.is_empty() {
            return Ok(());
        }
        let mut iov = Vec::with_capacity(self.heads.len() * 2);
        for (h, b) in self.heads.iter().zip(&self.bodies) {
            iov.push(libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: HEADER_LEN,
            });
            let (ptr, len) = match b {
                Body::None => continue,
                Body::Owned(v) => (v.as_ptr(), v.len()),
                Body::Leased(l) => (l.as_ptr() as *const u8, l.len() as usize),
            };
            if len > 0 {
                iov.push(libc::iovec {
                    iov_base: ptr as *mut _,
                    iov_len: len,
                });
            }
        }
        // SAFETY: every iovec points into `self.heads`, an owned body, or a leased range,
        // all of which live until the queue is cleared below.
        let r = unsafe { sys::send_iovecs(fd, &mut iov, stall) };
        self.heads.clear();
        self.bodies.clear();
        self.bytes = 0;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Deadline;
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Headers and payloads of any sizes, written in arbitrary chunks, come out of the
        /// buffer exactly as they went in, whether they pass through it or go direct.
        #[test]
        fn frames_survive_buffering(sizes in proptest::collection::vec(0usize..70_000, 1..12), chunk in 1usize..100_000) {
            let (mut a, b) = UnixStream::pair().unwrap();
            b.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut wire = Vec::new();
            let mut frames = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let head = [i as u8; HEADER_LEN];
                let body: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                wire.extend_from_slice(&head);
                wire.extend_from_slice(&body);
                frames.push((head, body));
            }
            let writer = std::thread::spawn(move || {
                for c in wire.chunks(chunk) {
                    a.write_all(c).unwrap();
                }
            });
            let mut rb = RecvBuf::new(b.as_raw_fd(), 4096);
            let mut stall = Deadline::new(Duration::from_secs(5));
            for (head, body) in &frames {
                prop_assert_eq!(&rb.header(&mut stall).unwrap(), head);
                let mut got = vec![0u8; body.len()];
                // SAFETY: `got` is a live buffer of exactly this length.
                unsafe { rb.payload(got.as_mut_ptr(), got.len(), &mut stall).unwrap() };
                prop_assert_eq!(&got, body);
            }
            writer.join().unwrap();
        }
    }
}
