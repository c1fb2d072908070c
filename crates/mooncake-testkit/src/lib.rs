#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod attack;
mod checks;
pub mod device;
pub mod loopback;
pub mod metadata;
pub mod rt;
pub mod transport;

pub use loopback::{LOOPBACK_SCHEME, LoopbackConfig, LoopbackTransport};
pub use rt::{Rt, on_all_runtimes, run};
pub use transport::TransportHarness;

use std::sync::atomic::{AtomicU64, Ordering};

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A unique token (tag, process id, counter, time), for cluster ids and segment names.
pub fn unique(tag: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000);
    format!("{tag}-{}-{n}-{t}", std::process::id())
}

/// Deterministic pseudo-random bytes (xorshift64 seeded from `seed`).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
