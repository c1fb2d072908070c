//! [`CudaCopier`]: the [`DeviceCopier`] other transports (TCP staging, RDMA dma-buf) and the
//! engine (`*` locations) use, installed process-wide by [`install`](crate::install).

use std::sync::Arc;

use mooncake_core::device::{DeviceCopier, DeviceCopy, DmaBuf};
use mooncake_core::{Error, ErrorKind, Location, MemorySegment, RegionLease, Result};

use crate::driver::cuda;
use crate::sys::{self, CopyEnd, PinnedBuffer};

/// CUDA as a [`DeviceCopier`]: copies on engine-owned streams, completed by the CUDA poller
/// thread. It loads the driver on first use, not when installed.
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaCopier;

/// The device of a leased range: its region's `cuda:N`, if any.
fn device_of(lease: &RegionLease) -> Option<u32> {
    match lease.region().location() {
        Location::Cuda(n) => Some(*n),
        _ => None,
    }
}

impl DeviceCopier for CudaCopier {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn locate(&self, addr: u64, len: u64) -> Result<Option<Location>> {
        if !sys::present() {
            return Ok(None);
        }
        let Ok(cuda) = cuda() else {
            return Ok(None);
        };
        let Some(info) = cuda.pointer(addr)? else {
            return Ok(None);
        };
        if addr + len > info.alloc_base + info.alloc_len {
            return Err(Error::invalid(format!(
                "{addr:#x}+{len} runs past its device allocation ({:#x}+{})",
                info.alloc_base, info.alloc_len
            )));
        }
        Ok(Some(Location::Cuda(info.ordinal)))
    }

    fn alloc_pinned(&self, len: usize) -> Result<Arc<dyn MemorySegment>> {
        Ok(Arc::new(pinned(len)?))
    }

    fn copy(&self, dst: RegionLease, src: RegionLease) -> Result<DeviceCopy> {
        let cuda = cuda()?;
        let ordinal = device_of(&src).or_else(|| device_of(&dst)).unwrap_or(0);
        let device = cuda.device(ordinal)?;
        Ok(cuda.copy(&device, CopyEnd::Lease(dst), CopyEnd::Lease(src)))
    }

    fn dmabuf(&self, addr: u64, len: u64) -> Result<DmaBuf> {
        let cuda = cuda()?;
        let info = cuda.pointer(addr)?.ok_or_else(|| {
            Error::invalid(format!("{addr:#x} is not device memory (no dma-buf)"))
        })?;
        let (start, span) = dmabuf_span(addr, len, info.alloc_base, info.alloc_len, page_size())?;
        let device = cuda.device(info.ordinal)?;
        let fd = sys::dmabuf_fd(&device.ctx, start, span)?;
        Ok(DmaBuf {
            fd,
            offset: addr - start,
            len: span - (addr - start),
        })
    }

    fn pci_bus_id(&self, location: &Location) -> Result<String> {
        let Location::Cuda(n) = location else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{location} is not a CUDA device"),
            ));
        };
        cuda()?;
        sys::pci_bus_id(*n)
    }
}

fn page_size() -> u64 {
    // Host pages: cuMemGetHandleForAddressRange wants both ends aligned to them.
    4096
}

/// The page-aligned span `[start, start + span)` around `[addr, addr + len)` that a dma-buf
/// export covers, clipped to the allocation.
pub(crate) fn dmabuf_span(
    addr: u64,
    len: u64,
    alloc_base: u64,
    alloc_len: u64,
    page: u64,
) -> Result<(u64, u64)> {
    let end = addr
        .checked_add(len)
        .filter(|&e| len > 0 && addr >= alloc_base && e <= alloc_base + alloc_len)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{addr:#x}+{len} is not inside its allocation {alloc_base:#x}+{alloc_len}"
            ))
        })?;
    let start = (addr / page * page).max(alloc_base);
    let stop = end
        .div_ceil(page)
        .saturating_mul(page)
        .min(alloc_base + alloc_len);
    Ok((start, stop - start))
}

/// The plain CUDA copy a transfer of `src` into `dst` compares with (the benchmarks'
/// baseline): `cuMemcpyAsync` of `block`-byte pieces on one stream of the source's device
/// (else the destination's), a whole pass per stream synchronisation, repeated for
/// `duration` after one warm-up pass. Returns bytes per second.
pub fn copy_bandwidth(
    dst: &dyn MemorySegment,
    src: &dyn MemorySegment,
    block: usize,
    duration: std::time::Duration,
) -> Result<f64> {
    let cuda = cuda()?;
    let dev = |l: Location| match l {
        Location::Cuda(n) => Some(n),
        _ => None,
    };
    let ordinal = dev(src.location()).or(dev(dst.location())).unwrap_or(0);
    let device = cuda.device(ordinal)?;
    sys::copy_pass(device.first_stream(), dst, src, block)?;
    let t0 = std::time::Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < duration {
        sys::copy_pass(device.first_stream(), dst, src, block)?;
        bytes += src.len() as u64;
    }
    Ok(bytes as f64 / t0.elapsed().as_secs_f64())
}

/// Page-locked host memory (`cuMemHostAlloc`), pinned for every device.
pub fn pinned(len: usize) -> Result<PinnedBuffer> {
    let cuda = cuda()?;
    PinnedBuffer::alloc(&cuda.device(0)?.ctx, len)
}

/// Device memory on `cuda:device` (`cuMemAlloc`).
pub fn alloc(device: u32, len: usize) -> Result<crate::CudaBuffer> {
    crate::CudaBuffer::alloc(&cuda()?.device(device)?.ctx, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmabuf_spans_are_page_aligned_and_clipped() {
        let base = 0x7000_0000_0000;
        assert_eq!(
            dmabuf_span(base + 10, 100, base, 1 << 20, 4096).unwrap(),
            (base, 4096)
        );
        assert_eq!(
            dmabuf_span(base + 4096, 8192, base, 1 << 20, 4096).unwrap(),
            (base + 4096, 8192)
        );
        // The end is clipped to an allocation that is not page-sized.
        assert_eq!(
            dmabuf_span(base + 5000, 100, base, 6000, 4096).unwrap(),
            (base + 4096, 6000 - 4096)
        );
        assert!(dmabuf_span(base - 1, 10, base, 4096, 4096).is_err());
        assert!(dmabuf_span(base, 4097, base, 4096, 4096).is_err());
        assert!(dmabuf_span(base, 0, base, 4096, 4096).is_err());
    }
}
