//! Shared helpers of the store's integration tests: an in-process master with an HTTP
//! metadata server, engines with the TCP transport, and the self-exec trick for child
//! processes.

#![allow(dead_code, reason = "each test file uses a subset")]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_engine::TransferEngine;
use mooncake_store::{MasterConfig, MasterServer, ServerConfig, StoreClient, StoreConfig};
use mooncake_transport_tcp::TcpConfig;

/// A master on loopback with the in-process HTTP metadata server.
pub fn master(cfg: MasterConfig) -> MasterServer {
    MasterServer::start(
        ServerConfig::loopback()
            .with_master(cfg)
            .with_tick_interval(Duration::from_millis(20))
            .with_http_metadata_addr(Some(([127, 0, 0, 1], 0).into())),
    )
    .expect("master starts")
}

/// Master defaults for tests: no ramp, short TTLs so expiry tests finish quickly.
pub fn master_cfg() -> MasterConfig {
    MasterConfig::default()
        .with_ramp_up_ms(0)
        .with_client_live_ttl_ms(2_000)
}

/// An engine with the TCP transport, publishing to `metadata_url`.
pub fn engine(metadata_url: &str, tag: &str) -> TransferEngine {
    let md = mooncake_metadata::connect(metadata_url).expect("metadata");
    TransferEngine::builder(mooncake_testkit::unique(tag))
        .with_metadata(md)
        .with_transport(TcpConfig::new().with_conns_per_path(2))
        .with_timeout(Duration::from_secs(2))
        .build()
        .expect("engine")
}

/// A client of `server`; `segment` bytes of pool memory (0: requester only).
pub fn client(server: &MasterServer, segment: u64) -> StoreClient {
    client_with(
        server,
        StoreConfig::new(server.rpc_addr().to_string()).with_segment_size(segment),
    )
}

/// A client with a custom config (its master address is set here).
pub fn client_with(server: &MasterServer, mut cfg: StoreConfig) -> StoreClient {
    cfg.master_addr = server.rpc_addr().to_string();
    cfg.transfer_deadline = Duration::from_secs(4);
    let url = server.metadata_url().expect("metadata server");
    StoreClient::connect(cfg, engine(&url, "store")).expect("client connects")
}

/// A registered 4 KiB-aligned buffer of `len` bytes.
pub fn buffer(c: &StoreClient, len: usize) -> Arc<mooncake_core::LocalBuffer> {
    let b = Arc::new(mooncake_core::LocalBuffer::new(len).unwrap());
    c.register_buffer(b.clone()).unwrap();
    b
}

/// Value bytes that carry the key and a version in every 16-byte word, so a torn or foreign
/// value is detected by checking each word.
pub fn value(key: &str, version: u64, len: usize) -> Vec<u8> {
    let h = key_hash(key);
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        let mut w = [0u8; 16];
        w[..8].copy_from_slice(&h.to_le_bytes());
        w[8..16].copy_from_slice(&(version ^ ((i as u64) << 40)).to_le_bytes());
        let n = chunk.len();
        chunk.copy_from_slice(&w[..n]);
    }
    v
}

/// Checks that `bytes` is exactly some version of `key`'s value of that length; returns the
/// version.
pub fn check_value(key: &str, bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < 16 {
        return Err(format!("{key}: value of {} bytes", bytes.len()));
    }
    let version = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let want = value(key, version, bytes.len());
    match want.iter().zip(bytes).position(|(a, b)| a != b) {
        None => Ok(version),
        Some(i) => Err(format!(
            "{key}: byte {i} of {} differs (version {version}): torn or foreign value",
            bytes.len()
        )),
    }
}

fn key_hash(key: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Polls `f` until it is true or `timeout` passes (a hang bound, not a timing assertion).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A child process, killed when dropped (so a failing test leaves no orphan).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns this test binary again running only the test `child_main` with `role` and `args`
/// in the environment (the child test does nothing without them).
pub fn spawn_child(role: &str, args: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_main", "--exact", "--nocapture", "--test-threads=1"])
        .env("MC_STORE_CHILD", role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in args {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns the rest.
pub fn read_line_with(
    out: &mut std::io::BufReader<std::process::ChildStdout>,
    prefix: &str,
) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("child stdout");
        assert!(n > 0, "child exited before printing {prefix:?}");
        // libtest prints "test child_main ... " before the child's own output, on one line.
        if let Some(at) = line.find(prefix) {
            return line.trim_end()[at + prefix.len()..].to_string();
        }
    }
}
