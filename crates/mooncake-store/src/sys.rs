//! The store's only unsafe code: shared memory (memfd + mmap), file descriptor passing over
//! Unix sockets (`SCM_RIGHTS`), and raw copies between leased ranges and shared mappings.
//!
//! Everything else in the crate is `#![forbid(unsafe_code)]`. Every unsafe block here says
//! why it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use mooncake_core::{Access, Location, MemorySegment, RegionLease};

/// A shared, `MAP_SHARED` mapping of a memfd: a storage node's segment, or the same segment
/// mapped by a client on the same host.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: usize,
    len: usize,
}

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl SharedMemory {
    /// Creates a memfd of `len` bytes named `name` and maps it read-write. With `populate`, the
    /// pages are faulted in now (slower start, no page faults on first use).
    pub fn create(name: &str, len: usize, populate: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "segment size must be positive",
            ));
        }
        let cname = std::ffi::CString::new(name.replace('\0', "_"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(last_err("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(last_err("ftruncate of the segment memfd"));
        }
        Self::map(fd, len, populate)
    }

    /// Maps `len` bytes of a memfd received from a storage node (`populate`: map every page
    /// now, so the first copies do not take page faults).
    pub fn map_fd(fd: OwnedFd, len: usize, populate: bool) -> io::Result<Self> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is a valid out pointer for one `stat`; the descriptor is ours.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(last_err("fstat of a received segment descriptor"));
        }
        // SAFETY: fstat succeeded and initialised `st`.
        let size = unsafe { st.assume_init() }.st_size as u64;
        if size < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the received segment has {size} bytes, {len} announced"),
            ));
        }
        Self::map(fd, len, populate)
    }

    fn map(fd: OwnedFd, len: usize, populate: bool) -> io::Result<Self> {
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new mapping chosen by the kernel (addr NULL) of a descriptor we own; it
        // aliases no Rust object. It is unmapped in `Drop` only.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_err("mmap of the segment"));
        }
        Ok(Self {
            fd,
            ptr: p as usize,
            len,
        })
    }

    /// Address of the first byte in this process.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn size(&self) -> usize {
        self.len
    }

    /// The memfd (to pass to a same-host client).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} outside a shared segment of {} bytes",
                    self.len
                ),
            )),
        }
    }

    /// Copies `src` (a leased local range) into the mapping at `offset`.
    pub fn copy_in(&self, offset: u64, src: &RegionLease) -> io::Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: `src` is leased from a registered region (valid for `src.len()` bytes while
        // the lease lives); the destination was bounds-checked against our live mapping. Raw
        // copies only: no reference to either range is formed, so concurrent access by other
        // processes to the shared pages is not a Rust aliasing violation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr() as *const u8,
                (self.ptr + offset as usize) as *mut u8,
                src.len() as usize,
            )
        };
        Ok(())
    }

    /// Copies `dst.len()` bytes of the mapping at `offset` into `dst` (a leased local range).
    pub fn copy_out(&self, offset: u64, dst: &RegionLease) -> io::Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: as in `copy_in`, with the roles swapped.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.ptr + offset as usize) as *const u8,
                dst.as_ptr(),
                dst.len() as usize,
            )
        };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        // SAFETY: bounds checked; raw copy from a Rust slice into our mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.ptr + offset as usize) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }

    /// Copies `out.len()` bytes of the mapping at `offset` into `out`.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.check(offset, out.len() as u64)?;
        // SAFETY: bounds checked; raw copy from our mapping into a Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.ptr + offset as usize) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `map` with this address and length and is
        // unmapped once. The engine holds an `Arc` of a registered segment until every
        // transfer using it ended, so nothing uses the range any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

// SAFETY: `ptr..ptr+len` is one live MAP_SHARED mapping until `Drop`, which runs after the
// last `Arc` (the engine's registration included) is gone; none of the fields ever change.
unsafe impl MemorySegment for SharedMemory {
    fn base(&self) -> u64 {
        self.ptr as u64
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        Location::Cpu(0)
    }
    fn access(&self) -> Access {
        Access::ReadWrite
    }
}

/// Copies `len` bytes between two leased local ranges (used to stage copying-API values).
pub fn copy_leases(src: &RegionLease, dst: &RegionLease) -> io::Result<()> {
    if src.len() != dst.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "copy between ranges of different lengths",
        ));
    }
    // SAFETY: both ranges are leased from registered regions and valid for `len` bytes while
    // the leases live; `copy` tolerates overlap.
    unsafe { std::ptr::copy(src.as_ptr() as *const u8, dst.as_ptr(), src.len() as usize) };
    Ok(())
}

/// The user id of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes getsockopt expects for
    // SO_PEERCRED; the descriptor belongs to `stream` for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_err("getsockopt(SO_PEERCRED)"));
    }
    Ok(cred.uid)
}

/// This process's effective user id.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `data` and one descriptor over a Unix stream socket (`SCM_RIGHTS`).
pub fn send_with_fd(stream: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SCM_RIGHTS needs at least one data byte",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at a control buffer of `space` bytes, enough for one header with
    // one descriptor (CMSG_SPACE); CMSG_FIRSTHDR therefore returns a valid header pointer.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
    }
    let mut sent = 0;
    while sent == 0 {
        // SAFETY: `msg` and the buffers it points to live across the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent = n as usize;
    }
    if sent < data.len() {
        use std::io::Write;
        (&*stream).write_all(&data[sent..])?;
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and at most one descriptor (`SCM_RIGHTS`). Returns the
/// bytes read and the descriptor, if one came with them.
pub fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8) + 8];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cbuf.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the declared sizes.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fd = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer; the CMSG macros
    // walk it within that length. Every SCM_RIGHTS descriptor received is ours to own (and is
    // closed if it is not the first).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, fd))
}

/// Resident set size of this process in bytes (from `/proc/self/statm`), or 0.
pub fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_is_shared_between_mappings() {
        let a = SharedMemory::create("t", 1 << 16, false).unwrap();
        a.write_bytes(100, b"hello").unwrap();
        // SAFETY: test-only dup of a descriptor we own.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(a.fd())) };
        let b = SharedMemory::map_fd(dup, 1 << 16, false).unwrap();
        let mut out = [0u8; 5];
        b.read_bytes(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.read_bytes((1 << 16) - 2, &mut out).is_err());
    }

    #[test]
    fn fd_passing_over_a_unix_socket() {
        let (x, y) = UnixStream::pair().unwrap();
        let a = SharedMemory::create("t", 4096, false).unwrap();
        a.write_bytes(0, b"xyz").unwrap();
        send_with_fd(&x, b"info", a.fd()).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv_with_fd(&y, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"info");
        let b = SharedMemory::map_fd(fd.unwrap(), 4096, true).unwrap();
        let mut out = [0u8; 3];
        b.read_bytes(0, &mut out).unwrap();
        assert_eq!(&out, b"xyz");
    }
}
