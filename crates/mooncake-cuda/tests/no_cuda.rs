//! On a host without a CUDA driver: a build with the CUDA crate starts, host memory moves as
//! usual, and "no CUDA" is reported only when device memory is used.

use std::sync::Arc;

use mooncake_core::{ErrorKind, LocalBuffer, MemorySegment};
use mooncake_cuda::{CudaIpcConfig, CudaMemory};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;

fn driver_present() -> bool {
    // A host with a driver (the GPU machine, or the fake driver's test child) runs the GPU
    // suite instead.
    let present = mooncake_cuda::available();
    if present {
        eprintln!("a CUDA driver is present: the no-CUDA checks do not apply");
    }
    present
}

fn no_cuda(e: &mooncake_core::Error) {
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("no CUDA"), "{e}");
}

#[test]
fn host_memory_works_and_device_memory_says_no_cuda() {
    if driver_present() {
        return;
    }
    mooncake_cuda::install();
    let md: Arc<dyn mooncake_core::MetadataStore> =
        Arc::new(mooncake_core::EmbeddedMetadataStore::new());
    let engine = |name: &str| {
        TransferEngine::builder(name)
            .with_metadata(md.clone())
            .with_cluster_secret(None)
            .with_transport(CudaIpcConfig::new())
            .with_transport(TcpConfig::new())
            .build()
            .expect("an engine with the CUDA transport starts without a driver")
    };
    let a = engine("nc-a");
    let b = engine("nc-b");
    // Host memory: registered as `*` (located: not device memory), moved over TCP.
    let src = Arc::new(LocalBuffer::new(1 << 20).unwrap());
    src.write_at(0, &[7; 1 << 20]).unwrap();
    // SAFETY: `src` outlives the registration (unregistered below).
    unsafe { a.register_memory(src.base(), src.len(), "*", true) }.unwrap();
    let dst = Arc::new(LocalBuffer::new(1 << 20).unwrap());
    b.register(dst.clone()).unwrap();
    a.transfer_sync_write("nc-b", src.base(), dst.base(), 1 << 20)
        .unwrap();
    assert_eq!(dst.to_vec(), vec![7; 1 << 20]);
    // The engine's own segment, host to host.
    let own = Arc::new(LocalBuffer::new(4096).unwrap());
    a.register(own.clone()).unwrap();
    a.transfer_sync_write("nc-a", src.base(), own.base(), 4096)
        .unwrap();
    assert_eq!(own.to_vec(), vec![7; 4096]);
    a.unregister_memory(src.base()).unwrap();

    // Device memory: every way in says "no CUDA".
    no_cuda(&mooncake_cuda::alloc(0, 1 << 20).unwrap_err());
    no_cuda(&mooncake_cuda::pinned(1 << 20).unwrap_err());
    no_cuda(&mooncake_cuda::device_count().unwrap_err());
    // SAFETY: fails before touching the address.
    no_cuda(&unsafe { CudaMemory::new(0x7f00_0000_0000, 4096) }.unwrap_err());
    let fake = LocalBuffer::new(4096).unwrap();
    // SAFETY: the registration fails; nothing touches the memory.
    let e = unsafe { a.register_memory(fake.base(), 4096, "cuda:0", true) }.unwrap_err();
    no_cuda(&e);
    assert!(!mooncake_cuda::available());
}
