//! Non-blocking frame I/O: a receive buffer that batches headers and small payloads, payload
//! reception straight into registered memory, and an output queue of frames sent with
//! gathered writes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use mooncake_core::RegionLease;
use mooncake_core::device::DeviceCopy;

use crate::staging::{StagedIn, StagedOut, recv_staged};
use crate::sys::{self, Chunk, Io};
use crate::tls::Tls;
use crate::wire::HEADER_LEN;

/// A connection's byte stream: its socket, through its TLS session when it has one.
#[derive(Clone, Copy)]
pub(crate) struct Link<'a> {
    /// The non-blocking socket.
    pub(crate) fd: RawFd,
    /// The TLS session over it, if any.
    pub(crate) tls: Option<&'a Tls>,
}

impl<'a> Link<'a> {
    /// A link with no TLS.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn plain(fd: RawFd) -> Self {
        Self { fd, tls: None }
    }

    /// One non-blocking receive into `buf`.
    pub(crate) fn recv(self, buf: &mut [u8]) -> io::Result<Io> {
        match self.tls {
            None => sys::recv(self.fd, buf),
            Some(t) => t.recv(self.fd, buf),
        }
    }

    /// One non-blocking receive of up to `len` bytes into `lease` at `offset`.
    pub(crate) fn recv_into_lease(
        self,
        lease: &RegionLease,
        offset: u64,
        len: usize,
    ) -> io::Result<Io> {
        match self.tls {
            None => sys::recv_into_lease(self.fd, lease, offset, len),
            Some(t) => t.recv_into_lease(self.fd, lease, offset, len),
        }
    }

    /// One non-blocking gathered send.
    pub(crate) fn send_chunks(self, chunks: &[Chunk<'_>]) -> io::Result<Io> {
        match self.tls {
            None => sys::send_chunks(self.fd, chunks),
            Some(t) => t.send_chunks(self.fd, chunks),
        }
    }

    /// Writes out what the TLS session still holds; true when nothing is left (always, with
    /// no TLS: plain sends leave nothing behind).
    pub(crate) fn flush(self) -> io::Result<bool> {
        match self.tls {
            None => Ok(true),
            Some(t) => t.flush(self.fd),
        }
    }
}

/// Payloads at least this long, once the buffered part is used, are received directly into
/// their destination instead of through the buffer.
pub(crate) const DIRECT_MIN: u64 = 16 * 1024;

/// Size of a connection's receive buffer. Small on purpose: it batches headers and small
/// frames (hundreds of acknowledgements per system call), while at most this many bytes of a
/// large payload (those that arrived with its header) are copied rather than received in
/// place.
pub(crate) const RECV_BUF: usize = 8 * 1024;

/// A receive buffer over one non-blocking socket.
pub(crate) struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not consumed yet.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// One non-blocking `recv` of whatever is available into the free space.
    pub(crate) fn fill(&mut self, link: Link<'_>) -> io::Result<Io> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let r = link.recv(&mut self.buf[self.end..])?;
        if let Io::Done(n) = r {
            self.end += n;
        }
        Ok(r)
    }

    /// The next header, if a whole one is buffered.
    pub(crate) fn take_header(&mut self) -> Option<[u8; HEADER_LEN]> {
        if self.buffered() < HEADER_LEN {
            return None;
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        self.start += HEADER_LEN;
        Some(h)
    }

    /// Up to `max` buffered bytes, consumed.
    pub(crate) fn take(&mut self, max: usize) -> &[u8] {
        let n = self.buffered().min(max);
        let s = &self.buf[self.start..self.start + n];
        self.start += n;
        s
    }
}

/// Progress of receiving a payload of `len` bytes into a lease.
pub(crate) struct Sink {
    /// Bytes received so far.
    pub(crate) got: u64,
    /// Bytes expected.
    pub(crate) len: u64,
}

/// Where payload bytes go.
pub(crate) enum Dest<'a> {
    /// Into the lease, at the sink's position.
    Lease(&'a RegionLease),
    /// Into a small owned buffer (control payloads).
    Vec(&'a mut Vec<u8>),
    /// Dropped (the payload of a refused request).
    Discard,
    /// Into device memory, through pinned chunks (see `staging`).
    Staged(&'a mut StagedIn),
}

/// How far [`recv_payload`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The payload is complete.
    Done,
    /// The socket has nothing more now: wait for the next readable edge.
    Blocked,
    /// The byte budget of this turn is used up: continue on the next turn.
    Budget,
}

/// Receives as much of the payload as is available, without blocking.
///
/// `moved` counts the bytes taken from the socket or the buffer; `budget` bounds them for
/// this call. A closed peer is an `UnexpectedEof` error.
pub(crate) fn recv_payload(
    link: Link<'_>,
    rb: &mut RecvBuf,
    sink: &mut Sink,
    mut dest: Dest<'_>,
    budget: u64,
    moved: &mut u64,
) -> io::Result<Progress> {
    if let Dest::Staged(s) = dest {
        return recv_staged(link, rb, sink, s, budget, moved);
    }
    let start = *moved;
    while sink.got < sink.len {
        if *moved - start >= budget {
            return Ok(Progress::Budget);
        }
        let left = sink.len - sink.got;
        if rb.buffered() > 0 {
            let chunk = rb.take(left.min(usize::MAX as u64) as usize);
            let n = chunk.len() as u64;
            match &mut dest {
                Dest::Lease(l) => sys::copy_into_lease(l, sink.got, chunk),
                Dest::Vec(v) => v.extend_from_slice(chunk),
                Dest::Discard | Dest::Staged(_) => {}
            }
            sink.got += n;
            *moved += n;
            continue;
        }
        let r = match &dest {
            Dest::Lease(l) if left >= DIRECT_MIN => {
                let want = left.min(budget.max(DIRECT_MIN)) as usize;
                link.recv_into_lease(l, sink.got, want)?
            }
            _ => rb.fill(link)?,
        };
        match r {
            Io::Done(n) => {
                if matches!(dest, Dest::Lease(_)) && left >= DIRECT_MIN {
                    sink.got += n as u64;
                    *moved += n as u64;
                }
            }
            Io::WouldBlock => return Ok(Progress::Blocked),
            Io::Eof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection",
                ));
            }
        }
    }
    Ok(Progress::Done)
}

/// The body of an outgoing frame.
pub(crate) enum Body {
    /// Header only.
    None,
    /// A small owned payload (hello, error message).
    Owned(Vec<u8>),
    /// Registered bytes (a write's payload, a read's data), kept registered until sent.
    Leased(RegionLease),
    /// Registered device memory, sent through pinned chunks (see `staging`).
    Staged(StagedOut),
}

impl Body {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Self::None => 0,
            Self::Owned(v) => v.len() as u64,
            Self::Leased(l) => l.len(),
            Self::Staged(s) => s.len(),
        }
    }

    /// The lease, if the body is registered memory.
    pub(crate) fn lease(&self) -> Option<&RegionLease> {
        match self {
            Self::Leased(l) => Some(l),
            Self::Staged(s) => Some(s.lease()),
            _ => None,
        }
    }
}

/// A frame on its way out.
pub(crate) struct OutFrame {
    pub(crate) head: [u8; HEADER_LEN],
    pub(crate) body: Body,
    /// Bytes of `head` + `body` already written.
    pub(crate) written: u64,
    /// Not sent before this device copy finished (a write's acknowledgement waits for the
    /// payload's last copy into device memory).
    pub(crate) gate: Option<DeviceCopy>,
}

impl OutFrame {
    pub(crate) fn new(head: [u8; HEADER_LEN], body: Body) -> Self {
        Self {
            head,
            body,
            written: 0,
            gate: None,
        }
    }

    /// Holds the frame back until `gate` finished (a failed gate fails the connection).
    pub(crate) fn gated(mut self, gate: DeviceCopy) -> Self {
        self.gate = Some(gate);
        self
    }

    pub(crate) fn total(&self) -> u64 {
        HEADER_LEN as u64 + self.body.len()
    }

    /// True once some but not all of it is written: it cannot be withdrawn any more.
    pub(crate) fn started(&self) -> bool {
        self.written > 0
    }
}

/// Outcome of [`send_frames`].
pub(crate) struct Sent {
    /// Bytes written.
    pub(crate) bytes: u64,
    /// The socket is full: wait for the next writable edge.
    pub(crate) would_block: bool,
    /// The next bytes wait for a device copy, which wakes the connection when it finishes.
    pub(crate) waiting: bool,
}

/// Writes queued frames with gathered non-blocking writes until the queue is empty, the
/// socket is full, or `budget` bytes were written. Fully written frames are removed.
pub(crate) fn send_frames(
    link: Link<'_>,
    q: &mut VecDeque<OutFrame>,
    budget: u64,
) -> io::Result<Sent> {
    const FRAMES_PER_CALL: usize = 64;
    let mut sent = Sent {
        bytes: 0,
        would_block: false,
        waiting: false,
    };
    while !q.is_empty() && sent.bytes < budget {
        let mut chunks = Vec::with_capacity(2 * FRAMES_PER_CALL);
        for f in q.iter_mut().take(FRAMES_PER_CALL) {
            let OutFrame {
                head,
                body,
                written,
                gate,
            } = f;
            let hl = HEADER_LEN as u64;
            match gate.as_ref().and_then(DeviceCopy::result) {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                None if gate.is_some() => break,
                None => {}
            }
            let body_done = written.saturating_sub(hl);
            if let Body::Staged(s) = body {
                // A staged body goes out as far as its device copies have finished; a frame
                // whose first bytes are not ready does not start (its header waits too).
                let total = s.len();
                let Some((lease, offset, len)) = s.ready()? else {
                    break;
                };
                if *written < hl {
                    chunks.push(Chunk::Bytes(&head[*written as usize..]));
                }
                chunks.push(Chunk::Leased { lease, offset, len });
                if body_done + len < total {
                    // The rest of this body is still being copied: nothing after it.
                    break;
                }
                continue;
            }
            if *written < hl {
                chunks.push(Chunk::Bytes(&head[*written as usize..]));
            }
            match body {
                Body::None => {}
                Body::Owned(v) => chunks.push(Chunk::Bytes(&v[body_done as usize..])),
                Body::Leased(l) => chunks.push(Chunk::Leased {
                    lease: l,
                    offset: body_done,
                    len: l.len() - body_done,
                }),
                Body::Staged(_) => unreachable!("handled above"),
            }
        }
        if chunks.is_empty() {
            sent.waiting = true;
            return Ok(sent);
        }
        let n = match link.send_chunks(&chunks)? {
            Io::Done(n) => n as u64,
            Io::WouldBlock => {
                sent.would_block = true;
                return Ok(sent);
            }
            Io::Eof => return Err(io::Error::from(io::ErrorKind::WriteZero)),
        };
        drop(chunks);
        sent.bytes += n;
        let mut left = n;
        while left > 0 {
            let f = q
                .front_mut()
                .expect("bytes written belong to queued frames");
            let rest = f.total() - f.written;
            if left >= rest {
                left -= rest;
                q.pop_front();
            } else {
                f.written += left;
                left = 0;
                if let Body::Staged(s) = &mut f.body {
                    s.set_sent(f.written.saturating_sub(HEADER_LEN as u64));
                }
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_core::{BufferRegistry, LocalBuffer, Requester};
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Headers and payloads of any sizes, written in arbitrary chunks, come out exactly
        /// as they went in, whether they pass through the buffer or go straight to memory.
        #[test]
        fn frames_survive_buffering(sizes in proptest::collection::vec(0usize..70_000, 1..12), chunk in 1usize..100_000) {
            let (mut a, b) = UnixStream::pair().unwrap();
            b.set_nonblocking(true).unwrap();
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
            let reg = BufferRegistry::new();
            let mem = Arc::new(LocalBuffer::new(70_000).unwrap());
            reg.register(mem.clone()).unwrap();
            use mooncake_core::MemorySegment;
            let mut rb = RecvBuf::new(4096);
            let fd = b.as_raw_fd();
            let wait = || std::thread::sleep(std::time::Duration::from_micros(200));
            for (head, body) in &frames {
                let h = loop {
                    if let Some(h) = rb.take_header() { break h; }
                    if rb.fill(Link::plain(fd)).unwrap() == Io::WouldBlock { wait(); }
                };
                prop_assert_eq!(&h, head);
                if body.is_empty() { continue; }
                let lease = reg.lease(mem.base(), body.len() as u64, Requester::Local).unwrap();
                let mut sink = Sink { got: 0, len: body.len() as u64 };
                let mut moved = 0;
                while recv_payload(Link::plain(fd), &mut rb, &mut sink, Dest::Lease(&lease), u64::MAX, &mut moved).unwrap() != Progress::Done {
                    wait();
                }
                prop_assert_eq!(&mem.to_vec()[..body.len()], &body[..]);
            }
            writer.join().unwrap();
        }

        /// Frames queued with any bodies arrive in order, whole, however the socket splits
        /// the writes.
        #[test]
        fn queued_frames_arrive_whole(sizes in proptest::collection::vec(0usize..50_000, 1..20)) {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let mut q = VecDeque::new();
            let mut expect = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let head = [i as u8; HEADER_LEN];
                let body: Vec<u8> = (0..n).map(|j| (i + j) as u8).collect();
                expect.extend_from_slice(&head);
                expect.extend_from_slice(&body);
                q.push_back(OutFrame::new(head, if n == 0 { Body::None } else { Body::Owned(body) }));
            }
            let total = expect.len();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; total];
                std::io::Read::read_exact(&mut b, &mut got).unwrap();
                got
            });
            while !q.is_empty() {
                let s = send_frames(Link::plain(a.as_raw_fd()), &mut q, 1 << 16).unwrap();
                if s.would_block { std::thread::sleep(std::time::Duration::from_micros(100)); }
            }
            prop_assert_eq!(reader.join().unwrap(), expect);
        }
    }
}
