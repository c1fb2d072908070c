//! Registered memory: the [`MemorySegment`] trait, an owned [`LocalBuffer`], and the
//! [`BufferRegistry`] that checks every range a peer or a caller names.
//!
//! Every byte a transport touches is reached through a [`RegionLease`]: a checked range of a
//! registered region that keeps the region from being unregistered while the lease lives.

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use event_listener::{Event, Listener};

use crate::error::{Error, ErrorKind, Result};
use crate::location::Location;

/// What a remote peer may do with a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Access {
    /// Peers may read and write (Mooncake's default, `remote_accessible = true`).
    #[default]
    ReadWrite,
    /// Peers may only read.
    ReadOnly,
    /// Only the local process may use it (as a source or destination); peers get nothing.
    LocalOnly,
}

impl Access {
    /// Whether a peer may read from the region.
    pub fn remote_read(self) -> bool {
        matches!(self, Self::ReadWrite | Self::ReadOnly)
    }

    /// Whether a peer may write into the region.
    pub fn remote_write(self) -> bool {
        matches!(self, Self::ReadWrite)
    }
}

/// A contiguous region of memory that can be registered with a transfer engine.
///
/// # Safety
/// Implementors promise what transports rely on when they read and write the region with
/// raw memory operations (like DMA):
/// - `base()..base() + len()` is one allocation that is valid for reads and writes, and is
///   not freed or unmapped, for as long as the segment object is alive;
/// - `base()`, `len()`, `location()` and `access()` return the same values every time.
///
/// The engine keeps the object alive while it is registered and while any transfer uses it.
/// The owner must not rely on exclusive access while it is registered: peers write into it.
pub unsafe trait MemorySegment: Send + Sync + 'static {
    /// Address of the first byte.
    fn base(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// True when the length is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the memory lives.
    fn location(&self) -> Location {
        Location::Any
    }
    /// What peers may do with it.
    fn access(&self) -> Access {
        Access::ReadWrite
    }
}

/// Page-aligned, zeroed host memory owned by the engine's user.
pub struct LocalBuffer {
    ptr: NonNull<u8>,
    len: usize,
    location: Location,
    access: Access,
}

// SAFETY: the buffer is plain heap memory with no thread affinity; every access goes through
// raw pointers whose users document their own synchronisation.
unsafe impl Send for LocalBuffer {}
// SAFETY: as above; `&LocalBuffer` only exposes the address and raw copies.
unsafe impl Sync for LocalBuffer {}

const PAGE: usize = 4096;

impl LocalBuffer {
    /// Allocates `len` zeroed bytes aligned to 4 KiB.
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("buffer length must be non-zero"));
        }
        let layout = Layout::from_size_align(len, PAGE)
            .map_err(|e| Error::invalid(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("out of memory allocating {len} bytes"),
            )
        })?;
        Ok(Self {
            ptr,
            len,
            location: Location::Cpu(0),
            access: Access::ReadWrite,
        })
    }

    /// Sets the location tag.
    pub fn with_location(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// Sets what peers may do with the buffer.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::invalid("write_at past the end of the buffer"))?;
        let _ = end;
        // SAFETY: `offset + data.len() <= len` was checked; raw copy, no reference to the
        // buffer's bytes is created.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        offset
            .checked_add(out.len())
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::invalid("read_at past the end of the buffer"))?;
        // SAFETY: bounds checked above; raw copy out of the buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copies the whole buffer into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.read_at(0, &mut v).expect("whole buffer is in range");
        v
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::invalid("fill past the end of the buffer"))?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

impl Drop for LocalBuffer {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.len, PAGE).expect("layout was valid at allocation");
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: the allocation lives until `drop`, which runs only after the last `Arc` (the
// registry's included) is gone; the fields never change after construction.
unsafe impl MemorySegment for LocalBuffer {
    fn base(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        self.location.clone()
    }
    fn access(&self) -> Access {
        self.access
    }
}

impl std::fmt::Debug for LocalBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBuffer")
            .field("base", &format_args!("{:#x}", self.base()))
            .field("len", &self.len)
            .field("location", &self.location)
            .finish()
    }
}

/// Memory owned by someone else (a Python tensor, a C allocation), named by address.
#[derive(Debug)]
pub struct ForeignMemory {
    base: u64,
    len: usize,
    location: Location,
    access: Access,
}

impl ForeignMemory {
    /// Describes `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base + len` must be valid for reads and writes until this object (and every
    /// registration made from it) is dropped; unregistering waits for in-flight transfers.
    pub unsafe fn new(base: u64, len: usize, location: Location, access: Access) -> Self {
        Self {
            base,
            len,
            location,
            access,
        }
    }
}

// SAFETY: `ForeignMemory::new`'s contract makes the caller vouch for the range for the
// object's lifetime; the fields never change after construction.
unsafe impl MemorySegment for ForeignMemory {
    fn base(&self) -> u64 {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        self.location.clone()
    }
    fn access(&self) -> Access {
        self.access
    }
}

/// Another segment under a different location tag: the engine wraps a segment registered
/// as `*` whose memory a device runtime located (for example on `cuda:0`).
pub struct Located {
    inner: Arc<dyn MemorySegment>,
    location: Location,
}

impl Located {
    /// `inner`, reported at `location`.
    pub fn new(inner: Arc<dyn MemorySegment>, location: Location) -> Self {
        Self { inner, location }
    }
}

impl std::fmt::Debug for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Located")
            .field("base", &format_args!("{:#x}", self.inner.base()))
            .field("len", &self.inner.len())
            .field("location", &self.location)
            .finish()
    }
}

// SAFETY: every promise is the inner segment's, which this object keeps alive; the location
// never changes after construction.
unsafe impl MemorySegment for Located {
    fn base(&self) -> u64 {
        self.inner.base()
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn location(&self) -> Location {
        self.location.clone()
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
}

/// One registered region inside a [`BufferRegistry`].
pub struct Region {
    memory: Arc<dyn MemorySegment>,
    base: u64,
    len: u64,
    location: Location,
    access: Access,
    inflight: AtomicUsize,
    drained: Event,
}

impl Region {
    /// Address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for a zero-length region (never registered).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Location tag.
    pub fn location(&self) -> &Location {
        &self.location
    }
    /// Remote access rights.
    pub fn access(&self) -> Access {
        self.access
    }
    /// The registered memory object.
    pub fn memory(&self) -> &Arc<dyn MemorySegment> {
        &self.memory
    }
    /// Number of leases held right now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Blocks until no lease of the region is left.
    ///
    /// It never gives up: a lease means a transport may still touch the memory, and callers
    /// free it once this returns. Transports drop their leases promptly once the region is
    /// removed and they were told (`Transport::on_unregister`); a warning is logged every
    /// 10 s while leases remain, so a stuck one can be found.
    pub fn wait_drained(&self) {
        let started = Instant::now();
        let mut next_warn = started + DRAIN_WARN_EVERY;
        while self.inflight.load(Ordering::Acquire) != 0 {
            let listener = self.drained.listen();
            if self.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            if listener.wait_deadline(next_warn).is_none()
                && self.inflight.load(Ordering::Acquire) != 0
            {
                tracing::warn!(
                    base = format_args!("{:#x}", self.base),
                    leases = self.inflight(),
                    waited = ?started.elapsed(),
                    "unregister is still waiting for transfers that use the region"
                );
                next_warn += DRAIN_WARN_EVERY;
            }
        }
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .field("location", &self.location)
            .field("access", &self.access)
            .finish()
    }
}

/// Who asks for a lease: the local process or a remote peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// The local engine uses the range as a source or destination.
    Local,
    /// A peer reads the range.
    RemoteRead,
    /// A peer writes the range.
    RemoteWrite,
}

/// A checked range `[addr, addr + len)` inside one registered region; while it lives the
/// region cannot finish unregistering.
pub struct RegionLease {
    region: Arc<Region>,
    addr: u64,
    len: u64,
}

impl RegionLease {
    /// First byte of the leased range.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length of the leased range.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True when the lease covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The region this lease is inside.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
    /// Raw pointer to the first byte of the range.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as usize as *mut u8
    }
    /// A sub-range of this lease, as a new lease of the same region.
    pub fn slice(&self, offset: u64, len: u64) -> Result<Self> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() || len == 0 {
            return Err(Error::invalid(format!(
                "slice {offset}+{len} outside a lease of {} bytes",
                self.len
            )));
        }
        self.region.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            region: self.region.clone(),
            addr: self.addr + offset,
            len,
        })
    }
}

impl Drop for RegionLease {
    fn drop(&mut self) {
        if self.region.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.region.drained.notify(usize::MAX);
        }
    }
}

impl std::fmt::Debug for RegionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegionLease({:#x}+{})", self.addr, self.len)
    }
}

/// The set of regions registered with one engine: O(log n) range checks, no overlaps.
#[derive(Default)]
pub struct BufferRegistry {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
    generation: AtomicUsize,
}

impl std::fmt::Debug for BufferRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferRegistry")
            .field("regions", &self.len())
            .finish()
    }
}

/// While waiting for leases to drain, a warning is logged this often.
const DRAIN_WARN_EVERY: Duration = Duration::from_secs(10);

impl BufferRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `memory`. Zero-length, wrapping and overlapping regions are refused.
    pub fn register(&self, memory: Arc<dyn MemorySegment>) -> Result<Arc<Region>> {
        let base = memory.base();
        let len = memory.len() as u64;
        if len == 0 {
            return Err(Error::invalid("cannot register a zero-length region"));
        }
        if base == 0 {
            return Err(Error::invalid("cannot register memory at address 0"));
        }
        let end = base
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("region {base:#x}+{len} wraps around")))?;
        let region = Arc::new(Region {
            location: memory.location(),
            access: memory.access(),
            memory,
            base,
            len,
            inflight: AtomicUsize::new(0),
            drained: Event::new(),
        });
        let mut map = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, prev)) = map.range(..end).next_back()
            && prev.base + prev.len > base
        {
            return Err(Error::invalid(format!(
                "region {base:#x}+{len} overlaps registered region {:#x}+{}",
                prev.base, prev.len
            )));
        }
        map.insert(base, region.clone());
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(region)
    }

    /// Removes the region that starts at `base`: from now on no lease can name it. Leases
    /// taken before stay valid; [`Region::wait_drained`] waits for them.
    pub fn remove(&self, base: u64) -> Result<Arc<Region>> {
        let region = {
            let mut map = self.regions.write().unwrap_or_else(|e| e.into_inner());
            map.remove(&base).ok_or_else(|| {
                Error::new(
                    ErrorKind::NotRegistered,
                    format!("no region registered at {base:#x}"),
                )
            })?
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(region)
    }

    /// [`remove`](Self::remove) the region at `base`, then wait until no lease of it is left.
    pub fn unregister(&self, base: u64) -> Result<Arc<Region>> {
        let region = self.remove(base)?;
        region.wait_drained();
        Ok(region)
    }

    /// Checks `[addr, addr + len)` against the registered regions and leases it.
    ///
    /// The range must be non-empty, must not wrap, must lie inside one region, and the region
    /// must allow what `who` wants to do.
    pub fn lease(&self, addr: u64, len: u64, who: Requester) -> Result<RegionLease> {
        if len == 0 {
            return Err(Error::invalid("zero-length range"));
        }
        let end = addr.checked_add(len).ok_or_else(|| {
            Error::new(
                ErrorKind::RemoteAccess,
                format!("range {addr:#x}+{len} wraps around"),
            )
        })?;
        let map = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let region = map
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| end <= r.base + r.len)
            .ok_or_else(|| {
                let kind = if who == Requester::Local {
                    ErrorKind::NotRegistered
                } else {
                    ErrorKind::RemoteAccess
                };
                Error::new(
                    kind,
                    format!("range {addr:#x}+{len} is not inside registered memory"),
                )
            })?;
        let allowed = match who {
            Requester::Local => true,
            Requester::RemoteRead => region.access.remote_read(),
            Requester::RemoteWrite => region.access.remote_write(),
        };
        if !allowed {
            return Err(Error::new(
                ErrorKind::RemoteAccess,
                format!("region {:#x} does not permit {who:?}", region.base),
            ));
        }
        region.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(RegionLease {
            region: region.clone(),
            addr,
            len,
        })
    }

    /// All registered regions, in address order.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of registered regions.
    pub fn len(&self) -> usize {
        self.regions.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A counter bumped on every register and unregister.
    pub fn generation(&self) -> usize {
        self.generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fake(base: u64, len: usize) -> Arc<dyn MemorySegment> {
        // SAFETY: never dereferenced in these tests; only ranges are checked.
        Arc::new(unsafe { ForeignMemory::new(base, len, Location::Any, Access::ReadWrite) })
    }

    #[test]
    fn overlap_and_zero_are_refused() {
        let r = BufferRegistry::new();
        r.register(fake(0x1000, 0x1000)).unwrap();
        assert!(r.register(fake(0x1800, 0x1000)).is_err());
        assert!(r.register(fake(0x800, 0x1000)).is_err());
        assert!(r.register(fake(0x3000, 0)).is_err());
        assert!(r.register(fake(u64::MAX - 10, 100)).is_err());
        r.register(fake(0x2000, 0x1000)).unwrap();
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn lease_checks_ranges_and_rights() {
        let r = BufferRegistry::new();
        r.register(fake(0x1000, 0x1000)).unwrap();
        // SAFETY: never dereferenced.
        let ro = unsafe { ForeignMemory::new(0x4000, 0x100, Location::Any, Access::ReadOnly) };
        r.register(Arc::new(ro)).unwrap();
        assert!(r.lease(0x1000, 0x1000, Requester::RemoteWrite).is_ok());
        assert_eq!(
            r.lease(0x1000, 0x1001, Requester::RemoteRead)
                .unwrap_err()
                .kind(),
            ErrorKind::RemoteAccess
        );
        assert_eq!(
            r.lease(0x900, 0x10, Requester::Local).unwrap_err().kind(),
            ErrorKind::NotRegistered
        );
        assert!(r.lease(0x1000, 0, Requester::Local).is_err());
        assert!(r.lease(u64::MAX - 1, 4, Requester::RemoteRead).is_err());
        assert!(r.lease(0x4000, 0x10, Requester::RemoteRead).is_ok());
        assert!(r.lease(0x4000, 0x10, Requester::RemoteWrite).is_err());
    }

    #[test]
    fn unregister_waits_for_leases() {
        let r = Arc::new(BufferRegistry::new());
        r.register(fake(0x1000, 0x1000)).unwrap();
        let lease = r.lease(0x1000, 16, Requester::Local).unwrap();
        let r2 = r.clone();
        let t = std::thread::spawn(move || r2.unregister(0x1000).map(|_| ()));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(lease);
        t.join().unwrap().unwrap();
        assert!(r.lease(0x1000, 16, Requester::Local).is_err());
    }

    proptest! {
        #[test]
        fn lease_matches_a_linear_scan(
            regions in proptest::collection::vec((0u64..64, 1u64..8), 1..16),
            probes in proptest::collection::vec((0u64..80 * 4096, 0u64..3 * 4096), 1..64),
        ) {
            let r = BufferRegistry::new();
            let mut accepted: Vec<(u64, u64)> = Vec::new();
            for (page, pages) in regions {
                let (base, len) = (4096 + page * 4096, pages * 4096);
                if r.register(fake(base, len as usize)).is_ok() {
                    accepted.push((base, len));
                }
            }
            for w in accepted.iter().flat_map(|a| accepted.iter().map(move |b| (a, b))) {
                let ((a, al), (b, bl)) = w;
                if a != b { prop_assert!(a + al <= *b || b + bl <= *a, "overlap accepted"); }
            }
            for (addr, len) in probes {
                let expect = len > 0 && accepted.iter().any(|&(b, l)| addr >= b && addr + len <= b + l);
                prop_assert_eq!(r.lease(addr, len, Requester::RemoteRead).is_ok(), expect);
            }
        }
    }
}
