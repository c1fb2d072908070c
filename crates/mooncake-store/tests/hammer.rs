//! Many clients (threads here, and another process) put, get, upsert, remove and evict the
//! same keys in a small pool: no get ever returns torn or foreign bytes.

mod common;

use std::time::Duration;

use common::*;
use mooncake_store::{ReplicateConfig, StoreClient, StoreConfig};

const KEYS: usize = 24;
const OPS: usize = 400;

fn hammer(c: &StoreClient, seed: u64) -> (u64, u64) {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut reads, mut hits) = (0u64, 0u64);
    for n in 0..OPS {
        let k = format!("h{}", rnd() % KEYS as u64);
        // Sizes vary per key and version so ranges get reused across keys.
        let len = (8 << 10) + (rnd() % 4) as usize * (24 << 10);
        let version = seed << 32 | n as u64;
        let rc = ReplicateConfig::default();
        let r = match rnd() % 10 {
            0..=2 => c.put(&k, &value(&k, version, len), &rc),
            3 => c.upsert(&k, &value(&k, version, len), &rc),
            4 => c.remove(&k, rnd() % 2 == 0),
            _ => {
                reads += 1;
                match c.get(&k) {
                    Ok(v) => {
                        hits += 1;
                        check_value(&k, &v).unwrap_or_else(|e| panic!("{e}"));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = r {
            // Allowed outcomes of racing with others; anything else is a bug.
            assert!(
                matches!(e.code(), -704 | -703 | -706 | -714 | -200 | -707),
                "{k}: unexpected error {e}"
            );
        }
    }
    (reads, hits)
}

#[test]
fn child_main() {
    if std::env::var("MC_STORE_CHILD").as_deref() != Ok("hammer") {
        return;
    }
    let mut cfg = StoreConfig::new(std::env::var("MC_MASTER").unwrap());
    cfg.transfer_deadline = Duration::from_secs(4);
    let md = std::env::var("MC_METADATA").unwrap();
    let c = StoreClient::connect(cfg, engine(&md, "hammer-child")).unwrap();
    let (reads, hits) = hammer(&c, 99);
    println!("done {reads} {hits}");
}

#[test]
fn no_torn_or_foreign_bytes_under_contention() {
    // 1 MiB for 24 keys of up to 80 KiB, two replicas' worth of churn: puts evict.
    let m = master(master_cfg());
    let _a = client(&m, 1 << 20);
    let _b = client(&m, 1 << 20);
    let md = m.metadata_url().unwrap();
    let mut child = ChildGuard(spawn_child(
        "hammer",
        &[("MC_MASTER", m.rpc_addr().to_string()), ("MC_METADATA", md)],
    ));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let c = client(&m, 0);
            std::thread::spawn(move || hammer(&c, t + 1))
        })
        .collect();
    let mut hits = 0;
    for t in threads {
        hits += t.join().unwrap().1;
    }
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let done = read_line_with(&mut out, "done ");
    assert!(child.0.wait().unwrap().success(), "the hammer child failed");
    let child_hits: u64 = done.split(' ').nth(1).unwrap().parse().unwrap();
    // Not vacuous: reads did return values, and the pool did evict.
    assert!(
        hits + child_hits > 50,
        "only {hits} + {child_hits} reads hit"
    );
    let evicted = m.with_master(|mm| mm.stats().evicted_objects);
    assert!(evicted > 0, "the pool never evicted");
}
