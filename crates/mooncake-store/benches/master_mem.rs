//! Memory and speed of the master's metadata at scale.
//!
//! Inserts N objects (default 10 M; `-- <N>` or `MC_BENCH_OBJECTS`) with 40-byte keys and one
//! replica each over 8 segments through `put_start` + `put_end`, then reports:
//!
//! - RSS per object (VmRSS delta from /proc/self/status) and the peak (VmHWM);
//! - bulk put_start+put_end pairs per second;
//! - single-op latency (p50/p99) of put_start+put_end pairs and of `get_replicas`, timed one by
//!   one with `Instant` (its own overhead is printed too), and `exists` throughput.
//!
//! Run: `cargo bench -p mooncake-store --bench master_mem` (harness = false).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use mooncake_store::{DEFAULT_TENANT, Master, MasterConfig, MountRequest, ReplicateConfig};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// SplitMix64, for key choice.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A 40-byte key: `kv-<16 hex>-<20 digits>`.
fn key(buf: &mut String, i: u64) {
    buf.clear();
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    write!(buf, "kv-{h:016x}-{i:020}").unwrap();
    debug_assert_eq!(buf.len(), 40);
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.replace('_', "").parse().ok())
        .or_else(|| std::env::var("MC_BENCH_OBJECTS").ok()?.parse().ok())
        .unwrap_or(10_000_000);
    let segments = 8u64;
    let obj = 4096u64;
    let seg_size = (n * obj / segments + (1 << 30)) * 5 / 4;
    let rc = ReplicateConfig::default();
    let t0 = DEFAULT_TENANT;

    let rss0 = status_kb("VmRSS:");
    let mut m = Master::new(MasterConfig::default());
    let c = m.register_client("bench-host", 0);
    for s in 0..segments {
        m.mount_segment(
            c,
            MountRequest {
                name: format!("node-{s}"),
                base: (s + 1) << 44,
                size: seg_size,
                host: format!("host-{s}"),
                held: Vec::new(),
            },
            0,
        )
        .unwrap();
    }
    let mut k = String::with_capacity(64);
    let start = Instant::now();
    for i in 0..n {
        key(&mut k, i);
        m.put_start(c, t0, &k, obj, &rc, 1).unwrap();
        m.put_end(c, t0, &k, 1).unwrap();
    }
    let bulk = start.elapsed();
    let rss1 = status_kb("VmRSS:");
    let hwm = status_kb("VmHWM:");
    let st = m.stats();
    assert_eq!(st.objects, n);
    println!("objects                 {n} (40-byte keys, 1 replica, {segments} segments)");
    println!(
        "RSS                     {:.1} MiB total, {:.1} B/object (VmRSS delta), peak VmHWM {:.1} MiB",
        rss1 as f64 / 1024.0,
        (rss1 - rss0) as f64 * 1024.0 / n as f64,
        hwm as f64 / 1024.0
    );
    println!(
        "bulk put_start+put_end  {:.2} M pairs/s ({:.0} ns/pair, {:.2} s)",
        n as f64 / bulk.as_secs_f64() / 1e6,
        bulk.as_nanos() as f64 / n as f64,
        bulk.as_secs_f64()
    );

    // Timer overhead.
    let mut lat = Vec::with_capacity(1_000_000);
    for _ in 0..100_000 {
        let t = Instant::now();
        lat.push(t.elapsed());
    }
    println!("Instant overhead        p50 {:?}", pct(&mut lat, 0.5));

    // Single-op latency on the full master.
    let extra = (n / 50).clamp(10_000, 200_000);
    lat.clear();
    for i in n..n + extra {
        key(&mut k, i);
        let t = Instant::now();
        m.put_start(c, t0, &k, obj, &rc, 2).unwrap();
        m.put_end(c, t0, &k, 2).unwrap();
        lat.push(t.elapsed());
    }
    println!(
        "put_start+put_end       p50 {:?}  p99 {:?}  ({extra} pairs)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    let gets = 1_000_000u64.min(n);
    let mut rng = Rng(42);
    lat.clear();
    let start = Instant::now();
    for _ in 0..gets {
        key(&mut k, rng.next() % n);
        let t = Instant::now();
        let r = m.get_replicas(t0, &k, 3).unwrap();
        lat.push(t.elapsed());
        std::hint::black_box(r);
    }
    let wall = start.elapsed();
    println!(
        "get_replicas            p50 {:?}  p99 {:?}  ({gets} random keys, {:.2} M/s incl. timing)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        gets as f64 / wall.as_secs_f64() / 1e6
    );

    let start = Instant::now();
    let mut hits = 0u64;
    for _ in 0..gets {
        key(&mut k, rng.next() % n);
        hits += m.exists(t0, &k) as u64;
    }
    let wall = start.elapsed();
    assert_eq!(hits, gets);
    println!(
        "exists                  {:.2} M/s ({gets} random keys)",
        gets as f64 / wall.as_secs_f64() / 1e6
    );

    let t = Instant::now();
    let r = m.tick(4);
    println!("tick (no eviction due)  {:?} {r:?}", t.elapsed());
}
