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
use mooncake_cuda::CudaIpcConfig;
use mooncake_testkit::device::{DeviceHarness, TestMemory};
use mooncake_testkit::device_suite;
use mooncake_transport_tcp::TcpConfig;

mod common;

use common::{alloc, locations, sub};

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
