//! Memory of the online Conductor at 10⁷ indexed blocks, filled through the event path:
//! vLLM-format msgpack batches (32-byte digests, 512 blocks each, as `tiny-vllm` and vLLM
//! publish them) decoded and applied to the registry of 16 prefill instances, then the RSS
//! of the process and the decision latency at that size. The baseline, measured in the same
//! run by a child process doing the same decoding, keeps the blocks in a plain
//! `HashMap<u64, u128>` (block hash → holder bitset, the index before interned sets).
//!
//! `cargo bench -p mooncake-conductor --bench index_rss` (`-- 1000000` for fewer blocks).

use std::time::Instant;

use mooncake_scheduler::lru::BlockMap;

use mooncake_conductor::events::{HashEncoding, OutEvent, decode_batch, encode_batch};
use mooncake_conductor::service::rss_bytes;
use mooncake_conductor::state::{ConductorState, Registration, Role, ScheduleInput, StateConfig};

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const INSTANCES: u32 = 16;
const PER_BATCH: usize = 512;

/// A batch of `n` random 32-byte digests as a `BlockStored` event, msgpack-encoded; the first
/// 64 hashes are kept in `first`.
fn payload(x: &mut u64, n: usize, first: &mut Vec<u64>) -> Vec<u8> {
    let hashes: Vec<[u8; 32]> = (0..n)
        .map(|_| {
            let mut d = [0u8; 32];
            for c in d.chunks_mut(8) {
                c.copy_from_slice(&splitmix(x).to_be_bytes());
            }
            d
        })
        .collect();
    if first.len() < 64 {
        first.extend(
            hashes
                .iter()
                .map(|d| mooncake_conductor::hash::digest_to_u64(d)),
        );
    }
    encode_batch(
        0.0,
        &[OutEvent::Stored {
            hashes,
            parent: None,
            token_ids: Vec::new(),
            block_size: 16,
        }],
        HashEncoding::Bytes,
        0,
    )
}

/// The baseline (in a child process): the same batches decoded into a plain map.
fn baseline(total: u64) {
    let rss0 = rss_bytes();
    let mut map: BlockMap<u128> = BlockMap::default();
    let (mut x, mut done, mut batch_no, mut first) = (1u64, 0u64, 0u64, Vec::new());
    while done < total {
        let n = PER_BATCH.min((total - done) as usize);
        let b = decode_batch(&payload(&mut x, n, &mut first)).expect("decodes");
        let bit = 1u128 << (batch_no % u64::from(INSTANCES));
        for e in &b.events {
            if let mooncake_conductor::events::KvEvent::BlockStored { block_hashes, .. } = e {
                for &h in block_hashes {
                    *map.entry(h).or_insert(0) |= bit;
                }
            }
        }
        batch_no += 1;
        done += n as u64;
    }
    let rss1 = rss_bytes();
    println!(
        "baseline_blocks={} baseline_rss_bytes={}",
        map.len(),
        rss1.saturating_sub(rss0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let total: u64 = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    if args.iter().any(|a| a == "baseline") {
        baseline(total);
        return;
    }
    let instances = INSTANCES;
    let mut s = ConductorState::new(StateConfig::default()).expect("config");
    for i in 0..instances {
        s.register(Registration {
            name: format!("p{i}"),
            role: Role::Prefill,
            url: None,
            kv_events_endpoint: None,
            kv_replay_endpoint: None,
            kv_topic: None,
            kv_capacity_tokens: None,
        })
        .expect("register");
    }
    s.register(Registration {
        name: "d0".into(),
        role: Role::Decode,
        url: None,
        kv_events_endpoint: None,
        kv_replay_endpoint: None,
        kv_topic: None,
        kv_capacity_tokens: None,
    })
    .expect("register");
    let names: Vec<String> = (0..instances).map(|i| format!("p{i}")).collect();
    let rss0 = rss_bytes();
    let started = Instant::now();
    let (mut x, mut done, mut batch_no, mut first_hashes) = (1u64, 0u64, 0u64, Vec::new());
    while done < total {
        let n = PER_BATCH.min((total - done) as usize);
        let b = decode_batch(&payload(&mut x, n, &mut first_hashes)).expect("decodes");
        s.apply_kv_batch(&names[(batch_no % u64::from(instances)) as usize], &b, 0.0);
        batch_no += 1;
        done += n as u64;
    }
    let fill_s = started.elapsed().as_secs_f64();
    let rss1 = rss_bytes();
    let ix = s.conductor().index();
    println!(
        "indexed {} blocks on {instances} instances in {fill_s:.1} s ({:.2} M blocks/s through decode + apply)",
        ix.len(),
        total as f64 / fill_s / 1e6
    );
    println!(
        "RSS {:.1} MiB -> {:.1} MiB: {:.1} MiB for the index ({:.1} B/block); index heap {:.1} MiB; {} distinct holder sets",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0,
        (rss1 - rss0.min(rss1)) as f64 / 1048576.0,
        (rss1 - rss0.min(rss1)) as f64 / ix.len().max(1) as f64,
        ix.heap_bytes() as f64 / 1048576.0,
        ix.distinct_sets(),
    );
    let indexed = ix.len();
    // Decisions at that size: 60-block prompts whose first 40 blocks are cached somewhere.
    let mut lat = Vec::new();
    for k in 0..20_000u64 {
        let mut h: Vec<u64> = first_hashes[..40].to_vec();
        h.extend((0..20).map(|j| 1u64 << 63 | (k * 32 + j)));
        let input = ScheduleInput {
            block_hashes: Some(h),
            output_tokens: Some(200),
            ..Default::default()
        };
        let t = Instant::now();
        let r = s.schedule(&input, 1.0);
        lat.push(t.elapsed().as_nanos() as u64);
        if let Ok(a) = r {
            s.lifecycle(
                a.request_id,
                mooncake_conductor::state::Lifecycle::Dropped,
                1.0,
            );
        }
    }
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1e3;
    println!(
        "service decision (registry + Conductor, expected view on) at {} blocks: p50 {:.2} µs, p99 {:.2} µs",
        indexed,
        p(0.5),
        p(0.99)
    );
    let index_rss = rss1.saturating_sub(rss0);
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["baseline", &total.to_string()])
        .output()
        .expect("baseline child");
    let text = String::from_utf8_lossy(&out.stdout);
    let base = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("baseline_rss_bytes=")?.parse::<u64>().ok());
    match base {
        Some(b) => println!(
            "baseline HashMap<u64, u128>: {:.1} MiB ({:.1} B/block); index / baseline = {:.2}",
            b as f64 / 1048576.0,
            b as f64 / indexed.max(1) as f64,
            index_rss as f64 / b.max(1) as f64
        ),
        None => println!("baseline failed: {text}"),
    }
}
