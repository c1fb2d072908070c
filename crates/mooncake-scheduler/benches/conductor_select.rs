//! Scheduling-decision latency of the Conductor with 16 prefill instances holding 10^5 cached
//! blocks each (and a hot first block on all of them), as issues 5 and 15 ask: criterion's
//! mean, plus a direct p50/p99 over 200k individually timed decisions printed first, for the
//! simulator's setting (blocks indexed when reported) and the online service's (each accepted
//! request's blocks also booked as expected at decision time). The last lines give each p99
//! as a ratio to the load-balance policy's, measured in the same run (it looks up no prefix).

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use mooncake_core::scheduler::{ClusterEvent, Decision, ScheduleRequest, Scheduler};
use mooncake_scheduler::{Admission, Conductor, ConductorConfig, Policy};

const INSTANCES: u32 = 16;
const BLOCKS_PER_INSTANCE: u64 = 100_000;

/// A Conductor whose index holds 16 × 10^5 blocks: 2,000 conversations of 50 blocks per
/// instance, with every instance also holding the shared system-prompt block 0 and a few
/// conversations replicated on neighbours.
fn loaded(policy: Policy, admission: Admission, expected: bool) -> Conductor {
    let mut cfg = ConductorConfig::default();
    cfg.policy = policy;
    cfg.admission = admission;
    cfg.expected_ttl_s = expected.then_some(5.0);
    cfg.prefill_instances = INSTANCES;
    cfg.decode_instances = 16;
    let mut c = Conductor::new(cfg).expect("valid config");
    let per_conv = 50u64;
    for i in 0..u64::from(INSTANCES) {
        let mut keys = vec![0u64];
        for conv in 0..BLOCKS_PER_INSTANCE / per_conv {
            let base = 1 + (i * 1_000_000) + conv * per_conv;
            keys.extend(base..base + per_conv);
        }
        // Replicate the neighbour's first 100 conversations (hot prefixes).
        let n = (i + 1) % u64::from(INSTANCES);
        keys.extend(1 + n * 1_000_000..1 + n * 1_000_000 + 100 * per_conv);
        c.observe(
            ClusterEvent::BlocksStored {
                instance: i as u32,
                block_hashes: &keys,
            },
            0.0,
        );
    }
    c
}

/// Requests of 60 blocks: the shared block 0, then a 40-block cached conversation prefix on
/// some instance, then 19 new blocks.
fn requests(n: usize) -> Vec<ScheduleRequest> {
    (0..n as u64)
        .map(|k| {
            let inst = k % u64::from(INSTANCES);
            let conv = (k * 7919) % (BLOCKS_PER_INSTANCE / 50);
            let base = 1 + inst * 1_000_000 + conv * 50;
            let mut h = vec![0u64];
            h.extend(base..base + 40);
            h.extend((0..19).map(|j| 900_000_000 + k * 32 + j));
            ScheduleRequest {
                id: k,
                input_tokens: 60 * 512 - 100,
                output_tokens: 200,
                block_hashes: h,
            }
        })
        .collect()
}

/// One decision, then the driver drops the request so bookings stay bounded.
fn decide(c: &mut Conductor, r: &ScheduleRequest) -> bool {
    let d = c.schedule(r, 1.0);
    let ok = matches!(d, Decision::Accept(_));
    if ok {
        c.observe(ClusterEvent::Dropped { request: r.id }, 1.0);
    }
    black_box(d);
    ok
}

/// Prints and returns (p50, p99) in µs.
fn percentiles(policy: Policy, admission: Admission, expected: bool) -> (f64, f64) {
    let mut c = loaded(policy, admission, expected);
    let reqs = requests(4096);
    let mut samples = Vec::with_capacity(200_000);
    for k in 0..200_000 {
        let r = &reqs[k % reqs.len()];
        let t = Instant::now();
        decide(&mut c, r);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let p = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    let label = if expected { " +expected" } else { "" };
    println!(
        "decision {policy}/{admission}{label}: p50 {:.2} µs  p99 {:.2} µs  p99.9 {:.2} µs  max {:.1} µs  ({} blocks indexed)",
        p(0.5),
        p(0.99),
        p(0.999),
        *samples.last().unwrap_or(&0) as f64 / 1000.0,
        c.index().len()
    );
    (p(0.5), p(0.99))
}

fn bench(crit: &mut Criterion) {
    let cases = [
        (Policy::LoadBalance, Admission::None, false),
        (Policy::Mooncake, Admission::None, false),
        (Policy::Mooncake, Admission::Predicted, false),
        (Policy::Mooncake, Admission::Early, false),
        (Policy::Mooncake, Admission::Early, true),
        (Policy::LocalCache, Admission::None, false),
    ];
    let p99: Vec<f64> = cases
        .iter()
        .map(|&(p, a, e)| percentiles(p, a, e).1)
        .collect();
    for (&(p, a, e), v) in cases.iter().zip(&p99) {
        let label = if e { " +expected" } else { "" };
        println!(
            "p99 {p}/{a}{label} / p99 load-balance/none = {:.2}",
            v / p99[0]
        );
    }
    for (policy, admission, expected) in cases {
        let mut c = loaded(policy, admission, expected);
        let reqs = requests(4096);
        let mut k = 0usize;
        let label = if expected { "+expected" } else { "" };
        crit.bench_function(
            &format!("schedule/{policy}/{admission}{label}/16x1e5"),
            |b| {
                b.iter(|| {
                    k = (k + 1) % reqs.len();
                    decide(&mut c, &reqs[k])
                })
            },
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
