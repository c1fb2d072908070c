//! What the device suites of this crate's test binaries share: CUDA memory for
//! mooncake-testkit's `DeviceHarness` (allocations, sub-ranges, host buffers).

use std::sync::Arc;

use mooncake_core::{Location, MemorySegment};
use mooncake_cuda::{CudaBuffer, CudaMemory};
use mooncake_testkit::device::TestMemory;

/// Device memory for the suite.
pub struct Dev(CudaBuffer);

// SAFETY: forwards to the `CudaBuffer`, whose promises hold.
unsafe impl MemorySegment for Dev {
    fn base(&self) -> u64 {
        self.0.base()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn location(&self) -> Location {
        self.0.location()
    }
}

impl TestMemory for Dev {
    fn write(&self, offset: usize, data: &[u8]) {
        self.0.write_at(offset, data).expect("device write");
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.0.read_at(offset, &mut v).expect("device read");
        v
    }
}

pub fn locations() -> Vec<Location> {
    let n = mooncake_cuda::device_count().unwrap_or_else(|e| panic!("{e}"));
    std::iter::once(Location::Cpu(0))
        .chain((0..n.min(2)).map(Location::Cuda))
        .collect()
}

pub fn alloc(location: &Location, len: usize) -> Arc<dyn TestMemory> {
    match location {
        Location::Cuda(n) => Arc::new(Dev(mooncake_cuda::alloc(*n, len).expect("cuMemAlloc"))),
        _ => Arc::new(mooncake_core::LocalBuffer::new(len).expect("host buffer")),
    }
}

pub fn sub(mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment> {
    if mem.location().is_host() {
        // SAFETY: inside `mem`, which the returned object keeps alive.
        return Arc::new(KeepAlive(
            unsafe {
                mooncake_core::ForeignMemory::new(
                    mem.base() + offset as u64,
                    len,
                    mem.location(),
                    mooncake_core::Access::ReadWrite,
                )
            },
            mem.clone(),
        ));
    }
    // SAFETY: inside `mem`'s allocation, which the owner handle keeps alive.
    let m = unsafe { CudaMemory::new(mem.base() + offset as u64, len) }.expect("sub-range");
    Arc::new(m.with_owner(Arc::new(Owner(mem.clone()))))
}

struct Owner(#[allow(dead_code)] Arc<dyn TestMemory>);

struct KeepAlive(
    mooncake_core::ForeignMemory,
    #[allow(dead_code)] Arc<dyn TestMemory>,
);

// SAFETY: forwards to the `ForeignMemory`, whose range the second field keeps alive.
unsafe impl MemorySegment for KeepAlive {
    fn base(&self) -> u64 {
        self.0.base()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn location(&self) -> Location {
        self.0.location()
    }
}
