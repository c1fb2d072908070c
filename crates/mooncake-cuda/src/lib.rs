#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod copier;
mod driver;
mod ipc;
mod sys;
mod transport;

pub use copier::{CudaCopier, alloc, copy_bandwidth, pinned};
pub use driver::{available, device_count};
pub use sys::{CudaBuffer, CudaMemory, PinnedBuffer};
pub use transport::{CUDA_IPC_SCHEME, CudaIpcConfig, CudaIpcTransport};

/// Installs [`CudaCopier`] as the process-wide device copier (idempotent, loads no driver):
/// from then on the engine locates `*` memory on GPUs and transports that stage device
/// memory (TCP) declare `device_memory`. Call it before building engines.
pub fn install() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        mooncake_core::device::install_device_copier(std::sync::Arc::new(CudaCopier));
    });
}
