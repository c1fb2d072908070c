//! The store with GPU (VRAM) buffers: KV blocks in device memory are put and read back with
//! the zero-copy forms (single, batch, multi-buffer), values living in host DRAM segments.
//! Replicas in the writer's own segment go through a device copy into the shared mapping;
//! a second client (another engine) reads them over TCP, staged through pinned chunks.
//!
//! Needs a GPU: ignored elsewhere (run with `--ignored` on a GPU machine, docs/gpu.md);
//! `gpu_kv_blocks_on_fake_driver` runs it here against the fake driver of mooncake-cuda's
//! tests (device memory that faults on any CPU access).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use mooncake_core::MemorySegment;
use mooncake_cuda::CudaBuffer;
use mooncake_engine::TransferEngine;
use mooncake_store::{ReplicateConfig, StoreClient, StoreConfig};
use mooncake_testkit::pattern;
use mooncake_transport_tcp::TcpConfig;

const BLOCK: usize = 256 << 10;
const BLOCKS: usize = 32;

fn gpu_client(server: &mooncake_store::MasterServer, segment: u64) -> StoreClient {
    mooncake_cuda::install();
    let url = server.metadata_url().expect("metadata server");
    let md = mooncake_metadata::connect(&url).expect("metadata");
    let engine = TransferEngine::builder(mooncake_testkit::unique("gpu-store"))
        .with_metadata(md)
        .with_transport(TcpConfig::new().with_conns_per_path(2))
        .with_timeout(Duration::from_secs(2))
        .build()
        .expect("engine");
    let mut cfg = StoreConfig::new(server.rpc_addr().to_string()).with_segment_size(segment);
    cfg.transfer_deadline = Duration::from_secs(10);
    StoreClient::connect(cfg, engine).expect("client connects")
}

fn vram(c: &StoreClient, device: u32, len: usize) -> Arc<CudaBuffer> {
    let b = Arc::new(mooncake_cuda::alloc(device, len).expect("cuMemAlloc"));
    c.register_buffer(b.clone()).expect("register VRAM");
    b
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (docs/gpu.md)"]
fn gpu_kv_blocks() {
    let devices = mooncake_cuda::device_count().unwrap_or_else(|e| panic!("{e}"));
    let server = master(master_cfg());
    let writer = gpu_client(&server, 256 << 20);
    let reader = gpu_client(&server, 0);
    let kv = vram(&writer, 0, BLOCKS * BLOCK);
    let data = pattern(BLOCKS * BLOCK, 42);
    kv.write_at(0, &data).unwrap();
    let out_dev = devices.saturating_sub(1);
    let out_w = vram(&writer, 0, BLOCKS * BLOCK);
    let out_r = vram(&reader, out_dev, BLOCKS * BLOCK);
    let cfg = ReplicateConfig::default();

    // Single put/get: block 0.
    writer
        .put_from("kv-0", kv.base(), BLOCK as u64, &cfg)
        .unwrap();
    assert_eq!(
        writer.get_into("kv-0", out_w.base(), BLOCK as u64).unwrap(),
        BLOCK as u64
    );
    assert_eq!(
        reader.get_into("kv-0", out_r.base(), BLOCK as u64).unwrap(),
        BLOCK as u64
    );
    let mut got = vec![0; BLOCK];
    out_w.read_at(0, &mut got).unwrap();
    assert!(got == data[..BLOCK], "own-segment get_into of VRAM differs");
    out_r.read_at(0, &mut got).unwrap();
    assert!(got == data[..BLOCK], "remote get_into of VRAM differs");

    // Batch forms: blocks 1.. as one key each.
    let keys: Vec<String> = (1..BLOCKS).map(|i| format!("kv-{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let addrs: Vec<u64> = (1..BLOCKS)
        .map(|i| kv.base() + (i * BLOCK) as u64)
        .collect();
    let sizes = vec![BLOCK as u64; keys.len()];
    for r in writer.batch_put_from(&keys, &addrs, &sizes, &cfg) {
        r.unwrap();
    }
    let raddrs: Vec<u64> = (1..BLOCKS)
        .map(|i| out_r.base() + (i * BLOCK) as u64)
        .collect();
    for r in reader.batch_get_into(&keys, &raddrs, &sizes) {
        assert_eq!(r.unwrap(), BLOCK as u64);
    }
    let waddrs: Vec<u64> = (1..BLOCKS)
        .map(|i| out_w.base() + (i * BLOCK) as u64)
        .collect();
    for r in writer.batch_get_into(&keys, &waddrs, &sizes) {
        assert_eq!(r.unwrap(), BLOCK as u64);
    }
    assert!(
        out_r.to_vec().unwrap() == data,
        "remote batch_get_into differs"
    );
    assert!(
        out_w.to_vec().unwrap() == data,
        "own batch_get_into differs"
    );

    // Multi-buffer: one object per layer pair, scattered over two VRAM ranges.
    let half = BLOCK as u64 / 2;
    let bufs = vec![vec![
        (kv.base(), half),
        (kv.base() + 3 * BLOCK as u64, half),
    ]];
    for r in writer.batch_put_from_multi_buffers(&["kv-multi"], &bufs, &cfg) {
        r.unwrap();
    }
    let outs = vec![vec![
        (out_r.base() + 5 * BLOCK as u64, half),
        (out_r.base() + 9 * BLOCK as u64, half),
    ]];
    for r in reader.batch_get_into_multi_buffers(&["kv-multi"], &outs) {
        assert_eq!(r.unwrap(), 2 * half);
    }
    let all = out_r.to_vec().unwrap();
    let h = half as usize;
    assert!(all[5 * BLOCK..5 * BLOCK + h] == data[..h]);
    assert!(all[9 * BLOCK..9 * BLOCK + h] == data[3 * BLOCK..3 * BLOCK + h]);

    // VRAM stays registered and usable; unregistering waits for nothing stuck.
    writer.unregister_buffer(kv.base()).unwrap();
    reader.unregister_buffer(out_r.base()).unwrap();
}

/// Runs `gpu_kv_blocks` against the fake driver (see the module docs); skipped without `cc`.
#[test]
fn gpu_kv_blocks_on_fake_driver() {
    if std::env::var_os("MOONCAKE_FAKE_CUDA").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mooncake-store-fake-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mooncake-cuda/tests/fake/libcuda.c");
    let lib = dir.join("libcuda.so");
    match std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-lpthread")
        .status()
    {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("cannot build the fake driver ({other:?}); skipped");
            return;
        }
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "gpu_kv_blocks"])
        .env("LD_LIBRARY_PATH", &dir)
        .env("MOONCAKE_FAKE_CUDA", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("gpu_kv_blocks ... ok"),
        "gpu_kv_blocks failed on the fake driver:\n{text}"
    );
}
