//! Raw addresses from Python: what can be checked about them, and host allocations.
//!
//! Python hands the engine integers (`tensor.data_ptr()`, `arr.ctypes.data`, a `ctypes`
//! buffer's address). Nothing proves such an integer names memory the caller owns; the
//! contract (documented on every call that takes one) is that the range stays valid until it
//! is unregistered. What we check before trusting one:
//! - the range is non-empty and does not wrap around;
//! - host memory is mapped in this process from start to end (`/proc/self/maps`), so a
//!   mistyped address gives an error instead of a crash in a transport thread later;
//! - a pointer into CUDA memory is recognised when the CUDA driver is already loaded (it is
//!   whenever the caller has CUDA tensors), so it is never read or written as host memory.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_void};
use std::sync::{Mutex, OnceLock};

use mooncake::{Requester, TransferEngine};

/// Why a range was refused.
pub(crate) fn check_range(addr: u64, len: u64) -> Result<(), String> {
    if addr == 0 {
        return Err("address 0".into());
    }
    if len == 0 {
        return Err(format!("zero length at {addr:#x}"));
    }
    if addr.checked_add(len).is_none() {
        return Err(format!("{addr:#x} + {len} wraps around"));
    }
    Ok(())
}

/// True when every byte of `[addr, addr + len)` lies in a mapping of this process.
pub(crate) fn is_mapped(addr: u64, len: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        // No procfs: nothing to check against.
        return true;
    };
    let end = addr.saturating_add(len);
    let mut cursor = addr;
    let mut ranges: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let r = l.split_whitespace().next()?;
            let (a, b) = r.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    ranges.sort_unstable();
    for (a, b) in ranges {
        if a <= cursor && cursor < b {
            cursor = b;
            if cursor >= end {
                return true;
            }
        }
    }
    false
}

type CuPointerGetAttribute = unsafe extern "C" fn(*mut c_void, u32, u64) -> i32;

/// `cuPointerGetAttribute` of an already loaded CUDA driver, looked up once.
fn cuda_get_attribute() -> Option<CuPointerGetAttribute> {
    static SYM: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *SYM.get_or_init(|| {
        let lib = c"libcuda.so.1";
        // SAFETY: `dlopen` with RTLD_NOLOAD only returns a handle to a library already loaded
        // in this process (it never runs a library's initialisers); the name is a valid C
        // string.
        let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return None;
        }
        let name: &CStr = c"cuPointerGetAttribute";
        // SAFETY: `handle` is a live handle (never closed: the driver stays loaded for the
        // process's life) and `name` a valid C string.
        let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!sym.is_null()).then_some(sym as usize)
    });
    // SAFETY: the symbol is the CUDA driver API's `CUresult cuPointerGetAttribute(void *data,
    // CUpointer_attribute attribute, CUdeviceptr ptr)`, whose C signature this type matches
    // (`CUdeviceptr` is a 64-bit integer on 64-bit hosts, enums are 32-bit).
    addr.map(|a| unsafe { std::mem::transmute::<usize, CuPointerGetAttribute>(a) })
}

/// True when the CUDA driver is loaded in this process.
pub(crate) fn cuda_driver_loaded() -> bool {
    cuda_get_attribute().is_some()
}

/// The device ordinal if `addr` points into CUDA device memory; `None` for host memory or
/// when no CUDA driver is loaded (then no device pointer can exist in this process).
pub(crate) fn cuda_device_of(addr: u64) -> Option<u32> {
    const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: u32 = 2;
    const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: u32 = 9;
    const CU_MEMORYTYPE_DEVICE: u32 = 2;
    let f = cuda_get_attribute()?;
    let mut memtype: u32 = 0;
    // SAFETY: `f` is `cuPointerGetAttribute`; the out-pointer is a live u32, the size the
    // MEMORY_TYPE attribute writes. Any address is a valid query (unknown ones give an error).
    let rc = unsafe {
        f(
            (&mut memtype as *mut u32).cast(),
            CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        )
    };
    if rc != 0 || memtype != CU_MEMORYTYPE_DEVICE {
        return None;
    }
    let mut ordinal: i32 = 0;
    // SAFETY: as above; DEVICE_ORDINAL writes an int.
    let rc = unsafe {
        f(
            (&mut ordinal as *mut i32).cast(),
            CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )
    };
    Some(if rc == 0 { ordinal.max(0) as u32 } else { 0 })
}

/// The location to register `[addr, addr+len)` under: `location` unless it is `*` (or
/// empty), in which case CUDA memory is recognised and everything else is `cpu:0`. Host
/// ranges must be mapped.
pub(crate) fn resolve_location(addr: u64, len: u64, location: &str) -> Result<String, String> {
    check_range(addr, len)?;
    let loc = location.trim();
    let device = cuda_device_of(addr);
    let resolved = match (loc, device) {
        ("" | "*", Some(d)) => format!("cuda:{d}"),
        ("" | "*", None) => "cpu:0".to_string(),
        (l, Some(d)) if l.starts_with("cpu") => {
            return Err(format!(
                "{addr:#x} is CUDA memory of device {d}, registered as {l}"
            ));
        }
        (l, _) => l.to_string(),
    };
    if !resolved.starts_with("cuda") && !is_mapped(addr, len) {
        return Err(format!(
            "[{addr:#x}, {:#x}) is not mapped in this process",
            addr + len
        ));
    }
    Ok(resolved)
}

/// Copies `len` registered bytes at `addr` out (the range must lie in host memory registered
/// with `engine`, which keeps it valid while leased).
pub(crate) fn read_registered(
    engine: &TransferEngine,
    addr: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let lease = engine
        .registry()
        .lease(addr, len, Requester::Local)
        .map_err(|e| e.to_string())?;
    if !lease.region().location().is_host() {
        return Err(format!("{addr:#x} is device memory"));
    }
    let mut out = vec![0u8; len as usize];
    // SAFETY: the lease proves `[addr, addr+len)` is inside a registered host region, which the
    // registration contract keeps valid until it is unregistered, and unregistering waits for
    // leases to drain. `out` is a fresh Vec of `len` bytes and cannot overlap it.
    unsafe { std::ptr::copy_nonoverlapping(lease.as_ptr(), out.as_mut_ptr(), len as usize) };
    Ok(out)
}

/// Copies `data` into registered host memory at `addr`.
pub(crate) fn write_registered(
    engine: &TransferEngine,
    addr: u64,
    data: &[u8],
) -> Result<(), String> {
    if data.is_empty() {
        return Ok(());
    }
    let lease = engine
        .registry()
        .lease(addr, data.len() as u64, Requester::Local)
        .map_err(|e| e.to_string())?;
    if !lease.region().location().is_host() {
        return Err(format!("{addr:#x} is device memory"));
    }
    // SAFETY: as in `read_registered`: the lease proves the destination range is registered
    // host memory of at least `data.len()` bytes; `data` is a Rust slice that cannot alias it
    // mutably.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), lease.as_ptr(), data.len()) };
    Ok(())
}

/// Page-aligned anonymous host allocations handed to Python as integers
/// (`MooncakeHostMemAllocator.alloc`); freed by address.
#[derive(Default)]
pub(crate) struct HostAllocations {
    live: Mutex<BTreeMap<u64, usize>>,
}

impl HostAllocations {
    /// Maps `len` bytes (zeroed); 0 on failure.
    pub(crate) fn alloc(&self, len: usize) -> u64 {
        if len == 0 {
            return 0;
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
        // existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return 0;
        }
        let addr = p as u64;
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, len);
        addr
    }

    /// Unmaps an allocation made by `alloc`; false if `addr` is not one.
    pub(crate) fn free(&self, addr: u64) -> bool {
        let Some(len) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
        else {
            return false;
        };
        // SAFETY: `[addr, addr+len)` is exactly a mapping `alloc` made and nobody else unmaps
        // (it was just removed from the table, so this runs once).
        unsafe { libc::munmap(addr as *mut c_void, len) };
        true
    }
}
