//! The device-memory conformance suite (mooncake-testkit's `device_suite!`) on CUDA: through
//! the same-host CUDA IPC transport (with TCP behind it for what IPC cannot reach) and
//! through TCP alone (device memory staged through pinned host chunks).
//!
//! The cases need GPUs and are ignored elsewhere: run them on a GPU machine with
//! `--ignored` (docs/gpu.md). On a host without a GPU they fail ("no CUDA"), they do not
//! pass. `suite_on_fake_driver` runs the same cases here against a fake libcuda
//! (`tests/fake/libcuda.c`, built with `cc`): device memory it hands out faults on any CPU
//! access, so the suite also checks that no path copies device memory with the CPU.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{Location, MemorySegment, TransportBuilder};
use mooncake_cuda::{CudaBuffer, CudaIpcConfig, CudaMemory};
use mooncake_testkit::device::{DeviceHarness, TestMemory};
use mooncake_testkit::device_suite;
use mooncake_transport_tcp::TcpConfig;

/// Device memory for the suite.
struct Dev(CudaBuffer);

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

fn locations() -> Vec<Location> {
    let n = mooncake_cuda::device_count().unwrap_or_else(|e| panic!("{e}"));
    std::iter::once(Location::Cpu(0))
        .chain((0..n.min(2)).map(Location::Cuda))
        .collect()
}

fn alloc(location: &Location, len: usize) -> Arc<dyn TestMemory> {
    match location {
        Location::Cuda(n) => Arc::new(Dev(mooncake_cuda::alloc(*n, len).expect("cuMemAlloc"))),
        _ => Arc::new(mooncake_core::LocalBuffer::new(len).expect("host buffer")),
    }
}

fn sub(mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment> {
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

fn tcp() -> TcpConfig {
    // Small slices: payloads cross several pinned chunks and several frames.
    TcpConfig::new()
        .with_stripe_min(256 << 10)
        .with_max_slice(3 << 20)
        .with_conns_per_path(2)
}

/// CUDA IPC for same-host device memory, TCP behind it.
struct Ipc;

impl DeviceHarness for Ipc {
    fn name(&self) -> &str {
        "nvlink_intra+tcp"
    }
    fn builders(&self) -> Vec<Box<dyn TransportBuilder>> {
        vec![Box::new(CudaIpcConfig::new()), Box::new(tcp())]
    }
    fn setup(&self) {
        mooncake_cuda::install();
    }
    fn locations(&self) -> Vec<Location> {
        locations()
    }
    fn alloc(&self, location: &Location, len: usize) -> Arc<dyn TestMemory> {
        alloc(location, len)
    }
    fn sub(&self, mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment> {
        sub(mem, offset, len)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn one_sided(&self) -> bool {
        true
    }
}

/// TCP alone: device memory staged through pinned chunks on both sides.
struct TcpStaged;

impl DeviceHarness for TcpStaged {
    fn name(&self) -> &str {
        "tcp (staged)"
    }
    fn builders(&self) -> Vec<Box<dyn TransportBuilder>> {
        vec![Box::new(tcp())]
    }
    fn setup(&self) {
        mooncake_cuda::install();
    }
    fn locations(&self) -> Vec<Location> {
        locations()
    }
    fn alloc(&self, location: &Location, len: usize) -> Arc<dyn TestMemory> {
        alloc(location, len)
    }
    fn sub(&self, mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment> {
        sub(mem, offset, len)
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
}

device_suite!(
    cuda_ipc,
    || Some(Ipc),
    #[ignore = "needs CUDA GPUs: run with --ignored on a GPU machine (docs/gpu.md)"]
);
device_suite!(
    tcp_staged,
    || Some(TcpStaged),
    #[ignore = "needs CUDA GPUs: run with --ignored on a GPU machine (docs/gpu.md)"]
);

/// Builds the fake driver and runs every ignored case of this binary against it, in a
/// child process whose library path finds it first. Skipped (with a message) without `cc`
/// or where a real driver is present (the GPU machine runs the real thing).
#[test]
fn suite_on_fake_driver() {
    if std::env::var_os("MOONCAKE_FAKE_CUDA").is_some() {
        return; // the child itself
    }
    let dir = std::env::temp_dir().join(format!("mooncake-fake-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake/libcuda.c");
    let lib = dir.join("libcuda.so");
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .status();
    match built {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("suite_on_fake_driver: cannot build the fake driver ({other:?}); skipped");
            return;
        }
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--test-threads=2"])
        .env("LD_LIBRARY_PATH", &dir)
        .env("MOONCAKE_FAKE_CUDA", "1")
        .env("FAKE_CUDA_DEVICES", "2")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the suite failed on the fake driver:\n{text}"
    );
    for suite in ["cuda_ipc", "tcp_staged"] {
        for case in [
            "device_round_trips",
            "device_refusals",
            "device_peer_exits_mid_copy",
        ] {
            assert!(
                text.contains(&format!("{suite}::{case} ... ok")),
                "{suite}::{case} did not pass on the fake driver:\n{text}"
            );
        }
    }
}
