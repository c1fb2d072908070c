//! GPUDirect RDMA: the device-memory conformance suite (mooncake-testkit's `device_suite!`)
//! over the RDMA transport alone, with `cuda:N` regions registered with the NICs from
//! dma-bufs (`MC_RDMA_REQUIRE_GPUDIRECT` semantics: a NIC refusing one fails the
//! registration, so nothing falls back to another path).
//!
//! Needs a host with CUDA GPUs and an RDMA NIC that imports dma-bufs: the cases are ignored
//! elsewhere; run them there with `MOONCAKE_TEST_RDMA=1 <binary> --ignored` (docs/gpu.md).
//! Without RDMA devices or without CUDA they fail, they do not pass.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{Location, MemorySegment, TransportBuilder};
use mooncake_testkit::device::{DeviceHarness, TestMemory};
use mooncake_testkit::device_suite;
use mooncake_transport_rdma::{RdmaConfig, device_names, rdma_tests_enabled};

mod common;

struct GpuDirect;

impl DeviceHarness for GpuDirect {
    fn name(&self) -> &str {
        "rdma (GPUDirect)"
    }
    fn builders(&self) -> Vec<Box<dyn TransportBuilder>> {
        vec![Box::new(
            RdmaConfig::from_env()
                .expect("MC_* settings")
                .with_require_gpudirect(true),
        )]
    }
    fn setup(&self) {
        mooncake_cuda::install();
    }
    fn locations(&self) -> Vec<Location> {
        common::locations()
    }
    fn alloc(&self, location: &Location, len: usize) -> Arc<dyn TestMemory> {
        common::alloc(location, len)
    }
    fn sub(&self, mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment> {
        common::sub(mem, offset, len)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
    fn one_sided(&self) -> bool {
        // One-sided READ/WRITE: the target's CPU takes no part, a frozen target still serves.
        true
    }
}

fn gpudirect() -> Option<GpuDirect> {
    assert!(
        rdma_tests_enabled(),
        "GPUDirect RDMA cases need MOONCAKE_TEST_RDMA=1 (and a GPU and an RDMA NIC)"
    );
    assert!(
        !device_names().is_empty(),
        "MOONCAKE_TEST_RDMA=1 but this host has no RDMA devices"
    );
    Some(GpuDirect)
}

device_suite!(
    rdma_gpudirect,
    gpudirect,
    #[ignore = "needs CUDA GPUs and an RDMA NIC on one host: MOONCAKE_TEST_RDMA=1 --ignored (docs/gpu.md)"]
);
