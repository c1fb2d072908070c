//! The CUDA driver edge, and all of the crate's `unsafe` code.
//!
//! libcuda is loaded at run time (cudarc's `dynamic-loading`): nothing here is called before
//! [`init`] has checked that the library loads, because cudarc panics when a symbol's library
//! is missing. Every other entry point needs a [`Context`], which only [`primary_context`]
//! (after `init`) makes, so the check cannot be skipped.
//!
//! Everything is exposed through safe functions and types: device memory is only named
//! through objects that keep it valid ([`CudaBuffer`], [`CudaMemory`], [`IpcMapping`], a
//! [`RegionLease`]), and an in-flight copy ([`InFlight`]) holds both of its ends until the
//! device has finished with them (dropping it early waits for the device).

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::sys as cu;
use mooncake_core::{Access, Error, ErrorKind, Location, MemorySegment, RegionLease, Result};

/// The error every entry point reports when no driver is present.
pub(crate) fn no_cuda(why: &str) -> Error {
    Error::new(ErrorKind::Unsupported, format!("no CUDA: {why}"))
}

/// Whether libcuda can be loaded (no CUDA call is made).
pub(crate) fn present() -> bool {
    // SAFETY: tries to dlopen the driver library under its usual names and closes it again;
    // no symbol of it is called.
    unsafe { cu::is_culib_present() }
}

fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(cuda_error(r, what))
    }
}

fn cuda_error(r: cu::CUresult, what: &str) -> Error {
    let mut p: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorName only writes a pointer to a static, NUL-terminated string (or
    // fails and leaves `p` null); the driver was loaded before any call that can fail.
    let name =
        if unsafe { cu::cuGetErrorName(r, &mut p) } == cu::CUresult::CUDA_SUCCESS && !p.is_null() {
            // SAFETY: non-null and NUL-terminated, owned by the driver for the process lifetime.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        };
    let kind = match r {
        cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::Io,
        cu::CUresult::CUDA_ERROR_INVALID_VALUE => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {name}")).with_context("cuda", r as i32)
}

/// Loads the driver and initialises it; returns the number of devices.
pub(crate) fn init() -> Result<u32> {
    if !present() {
        return Err(no_cuda(
            "libcuda could not be loaded (is the NVIDIA driver installed?)",
        ));
    }
    // SAFETY: the library loads (checked above); cuInit takes no pointers.
    check(unsafe { cu::cuInit(0) }, "cuInit")?;
    let mut n: c_int = 0;
    // SAFETY: writes one int.
    check(unsafe { cu::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n.max(0) as u32)
}

fn device(ordinal: u32) -> Result<cu::CUdevice> {
    let mut d: cu::CUdevice = 0;
    // SAFETY: writes one device handle; callers passed `init` (only `Context`s reach here or
    // `init` was called by the caller).
    let r = unsafe { cu::cuDeviceGet(&mut d, ordinal as c_int) };
    check(r, "cuDeviceGet")?;
    Ok(d)
}

/// A device's primary context (retained for the life of the process).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    raw: cu::CUcontext,
    pub(crate) ordinal: u32,
}

// SAFETY: a CUDA context handle is an opaque pointer the driver lets any thread use (it
// synchronises internally); we never dereference it.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// The context is current on this thread until this is dropped (push/pop, so a caller's own
/// current context, torch's say, is restored).
pub(crate) struct Current {
    _not_send: PhantomData<*const ()>,
}

impl Context {
    pub(crate) fn enter(&self) -> Result<Current> {
        // SAFETY: `raw` is a retained primary context.
        let r = unsafe { cu::cuCtxPushCurrent_v2(self.raw) };
        check(r, "cuCtxPushCurrent")?;
        Ok(Current {
            _not_send: PhantomData,
        })
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut c: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context this guard pushed on this thread (the guard is !Send).
        let _ = unsafe { cu::cuCtxPopCurrent_v2(&mut c) };
    }
}

/// Retains device `ordinal`'s primary context. Call [`init`] first.
pub(crate) fn primary_context(ordinal: u32) -> Result<Context> {
    let d = device(ordinal)?;
    let mut raw: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one context handle for a valid device.
    let r = unsafe { cu::cuDevicePrimaryCtxRetain(&mut raw, d) };
    check(r, "cuDevicePrimaryCtxRetain")?;
    Ok(Context { raw, ordinal })
}

/// Whether device `a` can map device `b`'s memory (NVLink or PCIe peer-to-peer).
pub(crate) fn can_access_peer(a: &Context, b: &Context) -> Result<bool> {
    let mut can: c_int = 0;
    // SAFETY: writes one int; both devices exist (they have contexts).
    let r = unsafe { cu::cuDeviceCanAccessPeer(&mut can, device(a.ordinal)?, device(b.ordinal)?) };
    check(r, "cuDeviceCanAccessPeer")?;
    Ok(can != 0)
}

/// Lets `from`'s context access `to`'s memory (idempotent).
pub(crate) fn enable_peer_access(from: &Context, to: &Context) -> Result<()> {
    let _c = from.enter()?;
    // SAFETY: both are retained contexts; `from` is current.
    let r = unsafe { cu::cuCtxEnablePeerAccess(to.raw, 0) };
    if r == cu::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
        return Ok(());
    }
    check(r, "cuCtxEnablePeerAccess")
}

/// The PCI address of device `ordinal` (`0000:1b:00.0`). Call [`init`] first.
pub(crate) fn pci_bus_id(ordinal: u32) -> Result<String> {
    let mut buf = [0 as c_char; 64];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
    let r =
        unsafe { cu::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as c_int, device(ordinal)?) };
    check(r, "cuDeviceGetPCIBusId")?;
    // SAFETY: NUL-terminated within `buf` (the driver guarantees it for len ≥ 13).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .to_ascii_lowercase())
}

/// Device `ordinal`'s UUID (stable across processes, unlike ordinals). Call [`init`] first.
pub(crate) fn uuid(ordinal: u32) -> Result<[u8; 16]> {
    // SAFETY: CUuuid is plain bytes; zeroed is a valid value.
    let mut u: cu::CUuuid = unsafe { std::mem::zeroed() };
    // SAFETY: writes one CUuuid.
    let r = unsafe { cu::cuDeviceGetUuid_v2(&mut u, device(ordinal)?) };
    check(r, "cuDeviceGetUuid")?;
    Ok(u.bytes.map(|b| b as u8))
}

/// An engine-owned, non-blocking stream.
#[derive(Debug)]
pub(crate) struct Stream {
    raw: cu::CUstream,
    ctx: Context,
}

// SAFETY: stream handles may be used from any thread; the driver orders work on them.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Context) -> Result<Self> {
        let _c = ctx.enter()?;
        let mut raw: cu::CUstream = std::ptr::null_mut();
        // SAFETY: writes one stream handle in the current context.
        let r = unsafe {
            cu::cuStreamCreate(
                &mut raw,
                cu::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
            )
        };
        check(r, "cuStreamCreate")?;
        Ok(Self { raw, ctx: *ctx })
    }
}

/// A completion event (no timing) of one device's context.
#[derive(Debug)]
pub(crate) struct Event {
    raw: cu::CUevent,
    ctx: Context,
}

// SAFETY: event handles may be recorded and queried from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn new(ctx: &Context) -> Result<Self> {
        let _c = ctx.enter()?;
        let mut raw: cu::CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle in the current context.
        let r = unsafe {
            cu::cuEventCreate(
                &mut raw,
                cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint,
            )
        };
        check(r, "cuEventCreate")?;
        Ok(Self { raw, ctx: *ctx })
    }

    /// True once the work recorded before it has finished.
    fn query(&self) -> Result<bool> {
        let _c = self.ctx.enter()?;
        // SAFETY: a live event of this context.
        match unsafe { cu::cuEventQuery(self.raw) } {
            cu::CUresult::CUDA_SUCCESS => Ok(true),
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(cuda_error(r, "cuEventQuery")),
        }
    }

    fn synchronize(&self) -> Result<()> {
        let _c = self.ctx.enter()?;
        // SAFETY: a live event of this context.
        let r = unsafe { cu::cuEventSynchronize(self.raw) };
        check(r, "cuEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(_c) = self.ctx.enter() {
            // SAFETY: destroyed once; work recorded on it has finished or keeps running
            // without it (the driver allows destroying a pending event).
            let _ = unsafe { cu::cuEventDestroy_v2(self.raw) };
        }
    }
}

/// A device range at a known device: `(address, length)` of an object that keeps it valid.
trait DeviceRange {
    fn dev_ptr(&self) -> u64;
    fn dev_len(&self) -> usize;
    fn dev_ctx(&self) -> Result<Context>;
}

fn write_sync(r: &dyn DeviceRange, offset: usize, data: &[u8]) -> Result<()> {
    offset
        .checked_add(data.len())
        .filter(|&e| e <= r.dev_len())
        .ok_or_else(|| Error::invalid("write past the end of the device buffer"))?;
    if data.is_empty() {
        return Ok(());
    }
    let _c = r.dev_ctx()?.enter()?;
    // SAFETY: the range is inside device memory the object keeps valid (bounds checked
    // above); `data` is a live slice; the copy is synchronous.
    let r = unsafe {
        cu::cuMemcpyHtoD_v2(
            r.dev_ptr() + offset as u64,
            data.as_ptr().cast(),
            data.len(),
        )
    };
    check(r, "cuMemcpyHtoD")
}

fn read_sync(r: &dyn DeviceRange, offset: usize, out: &mut [u8]) -> Result<()> {
    offset
        .checked_add(out.len())
        .filter(|&e| e <= r.dev_len())
        .ok_or_else(|| Error::invalid("read past the end of the device buffer"))?;
    if out.is_empty() {
        return Ok(());
    }
    let _c = r.dev_ctx()?.enter()?;
    // SAFETY: as in `write_sync`, into a live, exclusively borrowed slice.
    let r = unsafe {
        cu::cuMemcpyDtoH_v2(
            out.as_mut_ptr().cast(),
            r.dev_ptr() + offset as u64,
            out.len(),
        )
    };
    check(r, "cuMemcpyDtoH")
}

/// Device memory allocated with `cuMemAlloc` (freed on drop): a registrable `cuda:N`
/// segment, with synchronous host copies for filling and checking it.
pub struct CudaBuffer {
    ptr: u64,
    len: usize,
    ctx: Context,
    access: Access,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("device", &self.ctx.ordinal)
            .finish()
    }
}

impl CudaBuffer {
    pub(crate) fn alloc(ctx: &Context, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("device buffer length must be non-zero"));
        }
        let _c = ctx.enter()?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the allocation is owned by the new object.
        let r = unsafe { cu::cuMemAlloc_v2(&mut ptr, len) };
        check(r, &format!("cuMemAlloc({len})"))?;
        Ok(Self {
            ptr,
            len,
            ctx: *ctx,
            access: Access::ReadWrite,
        })
    }

    /// Sets what peers may do with the buffer.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The device ordinal.
    pub fn device(&self) -> u32 {
        self.ctx.ordinal
    }

    /// Copies `data` into the buffer at `offset` (synchronous, through the driver).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        write_sync(self, offset, data)
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer (synchronous).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        read_sync(self, offset, out)
    }

    /// The whole buffer, copied to the host.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0; self.len];
        self.read_at(0, &mut v)?;
        Ok(v)
    }
}

impl DeviceRange for CudaBuffer {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
    fn dev_ctx(&self) -> Result<Context> {
        Ok(self.ctx)
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let Ok(_c) = self.ctx.enter() {
            // SAFETY: allocated in `alloc`, freed once; the engine holds the segment (and so
            // this object) alive while any transfer can touch it.
            let _ = unsafe { cu::cuMemFree_v2(self.ptr) };
        }
    }
}

// SAFETY: the allocation lives until `drop`, which runs after the last `Arc` (the
// registry's and every in-flight copy's included) is gone; the fields never change.
unsafe impl MemorySegment for CudaBuffer {
    fn base(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        Location::Cuda(self.ctx.ordinal)
    }
    fn access(&self) -> Access {
        self.access
    }
}

/// Device memory allocated by someone else (torch's caching allocator, cupy, …), named by
/// its device pointer: registrable as a `cuda:N` segment.
pub struct CudaMemory {
    ptr: u64,
    len: usize,
    ordinal: u32,
    access: Access,
    _owner: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for CudaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMemory")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("device", &self.ordinal)
            .finish()
    }
}

impl CudaMemory {
    /// Describes `len` bytes of device memory at `ptr`, on the device the driver reports
    /// for it. Fails with "no CUDA" without a driver, and when the range is not inside one
    /// device allocation.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay allocated until this object (and every registration made
    /// from it) is dropped; unregistering waits for in-flight transfers.
    pub unsafe fn new(ptr: u64, len: usize) -> Result<Self> {
        let info = crate::driver::cuda()?.pointer(ptr)?.ok_or_else(|| {
            Error::invalid(format!(
                "{ptr:#x} is not device memory the CUDA driver knows"
            ))
        })?;
        if len == 0 || ptr + len as u64 > info.alloc_base + info.alloc_len {
            return Err(Error::invalid(format!(
                "{ptr:#x}+{len} is empty or runs past its device allocation ({:#x}+{})",
                info.alloc_base, info.alloc_len
            )));
        }
        Ok(Self {
            ptr,
            len,
            ordinal: info.ordinal,
            access: Access::ReadWrite,
            _owner: None,
        })
    }

    /// Keeps `owner` (the object that owns the allocation, say a tensor handle) alive as
    /// long as this segment.
    pub fn with_owner(mut self, owner: Arc<dyn std::any::Any + Send + Sync>) -> Self {
        self._owner = Some(owner);
        self
    }

    /// Sets what peers may do with the memory.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The device ordinal the driver reported.
    pub fn device(&self) -> u32 {
        self.ordinal
    }

    /// Copies `data` into the memory at `offset` (synchronous).
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        write_sync(self, offset, data)
    }

    /// Copies `out.len()` bytes at `offset` out of the memory (synchronous).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        read_sync(self, offset, out)
    }
}

impl DeviceRange for CudaMemory {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
    fn dev_ctx(&self) -> Result<Context> {
        Ok(crate::driver::cuda()?.device(self.ordinal)?.ctx)
    }
}

// SAFETY: `CudaMemory::new`'s contract makes the caller vouch for the range for the object's
// lifetime; the fields never change after construction.
unsafe impl MemorySegment for CudaMemory {
    fn base(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        Location::Cuda(self.ordinal)
    }
    fn access(&self) -> Access {
        self.access
    }
}

/// Page-locked host memory from `cuMemHostAlloc` (portable: pinned for every context):
/// staging chunks, and host buffers that copy at full PCIe speed.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Context,
    location: Location,
}

// SAFETY: plain host memory with no thread affinity; all access goes through raw copies.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above; `&PinnedBuffer` only exposes the address and raw copies.
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("ptr", &format_args!("{:p}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl PinnedBuffer {
    pub(crate) fn alloc(ctx: &Context, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid("pinned buffer length must be non-zero"));
        }
        let _c = ctx.enter()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer; the allocation is owned by the new object.
        let r = unsafe { cu::cuMemHostAlloc(&mut p, len, cu::CU_MEMHOSTALLOC_PORTABLE) };
        check(r, &format!("cuMemHostAlloc({len})"))?;
        Ok(Self {
            ptr: p.cast(),
            len,
            ctx: *ctx,
            location: Location::Cpu(0),
        })
    }

    /// Sets the location tag (default `cpu:0`).
    pub fn with_location(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// Copies `data` in at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        offset
            .checked_add(data.len())
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::invalid("write past the end of the pinned buffer"))?;
        // SAFETY: in bounds of our live allocation; raw copy, no reference to the bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        offset
            .checked_add(out.len())
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::invalid("read past the end of the pinned buffer"))?;
        // SAFETY: in bounds of our live allocation; raw copy into a safe slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// The whole buffer, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.read_at(0, &mut v).expect("whole buffer is in range");
        v
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let Ok(_c) = self.ctx.enter() {
            // SAFETY: allocated in `alloc`, freed once, after every user (the segment's last
            // `Arc`) is gone.
            let _ = unsafe { cu::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

// SAFETY: the allocation lives until `drop`; the fields never change after construction.
unsafe impl MemorySegment for PinnedBuffer {
    fn base(&self) -> u64 {
        self.ptr as u64
    }
    fn len(&self) -> usize {
        self.len
    }
    fn location(&self) -> Location {
        self.location.clone()
    }
}

/// What the driver says about a device pointer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PointerInfo {
    pub(crate) ordinal: u32,
    /// The allocation that holds the pointer.
    pub(crate) alloc_base: u64,
    pub(crate) alloc_len: u64,
}

/// The device of `ptr`, or `None` for host or unknown memory (any context will do).
pub(crate) fn pointer_device(ctx: &Context, ptr: u64) -> Result<Option<u32>> {
    let _c = ctx.enter()?;
    let mut mem_type: c_uint = 0;
    // SAFETY: the attribute is a CUmemorytype (a 32-bit enum) written into `mem_type`.
    let r = unsafe {
        cu::cuPointerGetAttribute(
            (&raw mut mem_type).cast(),
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    };
    if r == cu::CUresult::CUDA_ERROR_INVALID_VALUE {
        return Ok(None);
    }
    check(r, "cuPointerGetAttribute(MEMORY_TYPE)")?;
    if mem_type != cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as c_uint {
        return Ok(None);
    }
    let mut ordinal: c_int = 0;
    // SAFETY: the attribute is an int written into `ordinal`.
    let r = unsafe {
        cu::cuPointerGetAttribute(
            (&raw mut ordinal).cast(),
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    check(r, "cuPointerGetAttribute(DEVICE_ORDINAL)")?;
    Ok(Some(ordinal.max(0) as u32))
}

/// The allocation holding device pointer `ptr`, asked in `owner`, the context of the device
/// that holds it (the driver does not find it from another device's context unless peer
/// access happens to be enabled).
pub(crate) fn allocation(owner: &Context, ptr: u64) -> Result<(u64, u64)> {
    let _c = owner.enter()?;
    address_range(ptr)
}

/// The allocation holding device pointer `ptr` (a context must be current).
fn address_range(ptr: u64) -> Result<(u64, u64)> {
    let mut base: cu::CUdeviceptr = 0;
    let mut size: usize = 0;
    // SAFETY: writes one pointer and one size.
    let r = unsafe { cu::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
    check(r, "cuMemGetAddressRange")?;
    Ok((base, size as u64))
}

/// Pins the host range of `lease` for every context; `Ok(false)` if it already was.
pub(crate) fn host_register(ctx: &Context, lease: &RegionLease) -> Result<bool> {
    let _c = ctx.enter()?;
    // SAFETY: the lease keeps the host range registered (valid) while we pin it; pinning
    // does not change its contents.
    let r = unsafe {
        cu::cuMemHostRegister_v2(
            lease.as_ptr().cast(),
            lease.len() as usize,
            cu::CU_MEMHOSTREGISTER_PORTABLE,
        )
    };
    if r == cu::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
        return Ok(false);
    }
    check(r, "cuMemHostRegister").map(|()| true)
}

/// Unpins a range pinned by [`host_register`].
pub(crate) fn host_unregister(ctx: &Context, base: u64) {
    if let Ok(_c) = ctx.enter() {
        // SAFETY: unpins what we pinned at `base` (the driver checks the address).
        let _ = unsafe { cu::cuMemHostUnregister(base as *mut c_void) };
    }
}

/// A CUDA IPC handle of a device allocation (64 opaque bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct IpcHandle(pub(crate) [u8; 64]);

impl std::fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcHandle({:02x?}…)", &self.0[..8])
    }
}

/// The IPC handle of the allocation holding `ptr`.
pub(crate) fn ipc_handle(ctx: &Context, ptr: u64) -> Result<IpcHandle> {
    let _c = ctx.enter()?;
    // SAFETY: CUipcMemHandle is 64 plain bytes; zeroed is valid.
    let mut h: cu::CUipcMemHandle = unsafe { std::mem::zeroed() };
    // SAFETY: writes one handle for a device pointer.
    let r = unsafe { cu::cuIpcGetMemHandle(&mut h, ptr) };
    check(r, "cuIpcGetMemHandle")?;
    Ok(IpcHandle(h.reserved.map(|b| b as u8)))
}

/// Another process's device allocation, mapped into this process (closed on drop).
#[derive(Debug)]
pub(crate) struct IpcMapping {
    base: u64,
    len: u64,
    ctx: Context,
}

impl IpcMapping {
    /// Bytes mapped (the whole allocation, as the driver reports it).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// Opens `handle` in `ctx` (peer access enabled on demand).
pub(crate) fn ipc_open(ctx: &Context, handle: &IpcHandle) -> Result<IpcMapping> {
    let _c = ctx.enter()?;
    // SAFETY: as in `ipc_handle`.
    let mut h: cu::CUipcMemHandle = unsafe { std::mem::zeroed() };
    h.reserved = handle.0.map(|b| b as c_char);
    let mut base: cu::CUdeviceptr = 0;
    // SAFETY: writes one device pointer; the mapping is owned by the returned object.
    let r = unsafe {
        cu::cuIpcOpenMemHandle_v2(
            &mut base,
            h,
            cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as c_uint,
        )
    };
    check(r, "cuIpcOpenMemHandle")?;
    // Owned from here: dropped (closed) if the size cannot be read.
    let mut mapping = IpcMapping {
        base,
        len: 0,
        ctx: *ctx,
    };
    mapping.len = address_range(base)?.1;
    Ok(mapping)
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if let Ok(_c) = self.ctx.enter() {
            // SAFETY: opened in `ipc_open`, closed once, after every copy that used it (they
            // hold an `Arc` of the mapping) has finished.
            let _ = unsafe { cu::cuIpcCloseMemHandle(self.base) };
        }
    }
}

/// One end of a device copy: a leased range, or a range of an IPC mapping.
#[derive(Debug)]
pub(crate) enum CopyEnd {
    /// Registered memory (host or device), kept registered by the lease.
    Lease(RegionLease),
    /// `len` bytes at `offset` of a mapping, kept open by the `Arc`.
    Mapped {
        map: Arc<IpcMapping>,
        offset: u64,
        len: u64,
    },
}

impl CopyEnd {
    /// `len` bytes at `offset` of `map`; refused outside the mapped allocation.
    pub(crate) fn mapped(map: Arc<IpcMapping>, offset: u64, len: u64) -> Result<Self> {
        if offset.checked_add(len).is_none_or(|e| e > map.len) || len == 0 {
            return Err(Error::new(
                ErrorKind::RemoteAccess,
                format!(
                    "range +{offset:#x}+{len} is outside the peer's device allocation of {} bytes",
                    map.len
                ),
            ));
        }
        Ok(Self::Mapped { map, offset, len })
    }

    fn addr(&self) -> u64 {
        match self {
            Self::Lease(l) => l.addr(),
            Self::Mapped { map, offset, .. } => map.base + offset,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Self::Lease(l) => l.len(),
            Self::Mapped { len, .. } => *len,
        }
    }
}

/// A copy enqueued on a stream; holds both ends until the device has finished with them.
#[derive(Debug)]
pub(crate) struct InFlight {
    event: Option<Event>,
    ends: Option<(CopyEnd, CopyEnd)>,
}

/// Enqueues `src` → `dst` (equal lengths) on `stream` and records `event` after it.
///
/// On failure the event comes back with the error.
pub(crate) fn copy_async(
    stream: &Stream,
    event: Event,
    dst: CopyEnd,
    src: CopyEnd,
) -> std::result::Result<InFlight, (Error, Event)> {
    if dst.len() != src.len() || dst.len() == 0 {
        let e = Error::invalid(format!(
            "device copy of {} bytes into {} bytes",
            src.len(),
            dst.len()
        ));
        return Err((e, event));
    }
    let c = match stream.ctx.enter() {
        Ok(c) => c,
        Err(e) => return Err((e, event)),
    };
    // SAFETY: both ranges are valid for the copy's whole duration: leases keep registered
    // memory registered (and so allocated), mappings stay open while the `Arc` lives, and the
    // returned `InFlight` owns both until the event says the device is done (its drop waits).
    // With unified addressing the driver infers the direction from the pointers.
    let r = unsafe { cu::cuMemcpyAsync(dst.addr(), src.addr(), dst.len() as usize, stream.raw) };
    if let Err(e) = check(r, "cuMemcpyAsync") {
        return Err((e, event));
    }
    // SAFETY: a live event and stream of the same (current) context.
    let r = unsafe { cu::cuEventRecord(event.raw, stream.raw) };
    if let Err(e) = check(r, "cuEventRecord") {
        // The copy is queued but cannot be tracked: wait for the stream before the ends go.
        // SAFETY: a live stream of the current context.
        let _ = unsafe { cu::cuStreamSynchronize(stream.raw) };
        return Err((e, event));
    }
    drop(c);
    Ok(InFlight {
        event: Some(event),
        ends: Some((dst, src)),
    })
}

impl InFlight {
    /// True once the device finished the copy.
    pub(crate) fn is_done(&self) -> Result<bool> {
        match &self.event {
            Some(e) => e.query(),
            None => Ok(true),
        }
    }

    /// Releases both ends (after the copy finished: it waits for the device otherwise) and
    /// returns the event for reuse.
    pub(crate) fn finish(mut self) -> (Result<()>, Option<Event>) {
        let r = self.wait();
        self.ends = None;
        (r, self.event.take())
    }

    fn wait(&self) -> Result<()> {
        match &self.event {
            Some(e) if !e.query()? => e.synchronize(),
            _ => Ok(()),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.ends.is_some() {
            // Never release the ends of a copy the device may still run.
            if let Some(e) = &self.event {
                let _ = e.synchronize();
            }
        }
    }
}

/// Copies all of `src` into `dst` (equal lengths) in pieces of `block` bytes on `stream`,
/// and waits for the stream: one pass of the copy baseline of the benchmarks.
pub(crate) fn copy_pass(
    stream: &Stream,
    dst: &dyn MemorySegment,
    src: &dyn MemorySegment,
    block: usize,
) -> Result<()> {
    if dst.len() != src.len() || block == 0 {
        return Err(Error::invalid("copy pass: lengths differ or block is zero"));
    }
    let _c = stream.ctx.enter()?;
    let mut off = 0;
    while off < src.len() {
        let n = block.min(src.len() - off);
        // SAFETY: both segments are borrowed for the whole call (the `MemorySegment`
        // contract keeps their ranges allocated) and the stream is synchronised before it
        // returns; `off + n` is inside both.
        let r = unsafe {
            cu::cuMemcpyAsync(
                dst.base() + off as u64,
                src.base() + off as u64,
                n,
                stream.raw,
            )
        };
        if let Err(e) = check(r, "cuMemcpyAsync") {
            // SAFETY: a live stream of the current context.
            let _ = unsafe { cu::cuStreamSynchronize(stream.raw) };
            return Err(e);
        }
        off += n;
    }
    // SAFETY: a live stream of the current context.
    let r = unsafe { cu::cuStreamSynchronize(stream.raw) };
    check(r, "cuStreamSynchronize")
}

/// A dma-buf fd for the page-aligned device range `[ptr, ptr + len)` (GPUDirect RDMA).
pub(crate) fn dmabuf_fd(ctx: &Context, ptr: u64, len: u64) -> Result<OwnedFd> {
    let _c = ctx.enter()?;
    let mut fd: c_int = -1;
    // SAFETY: the driver writes one int (the new descriptor, owned by us afterwards).
    let r = unsafe {
        cu::cuMemGetHandleForAddressRange(
            (&raw mut fd).cast(),
            ptr,
            len as usize,
            cu::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    };
    check(r, "cuMemGetHandleForAddressRange(DMA_BUF_FD)")?;
    if fd < 0 {
        return Err(Error::new(
            ErrorKind::Io,
            "the driver returned no dma-buf fd",
        ));
    }
    // SAFETY: a fresh descriptor the driver handed to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A descriptor that becomes readable when process `pid` exits (`pidfd_open`).
pub(crate) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call; the returned descriptor is checked, then owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as c_int) })
}

/// True when the process behind `pidfd` has exited.
pub(crate) fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}
