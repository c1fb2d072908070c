//! Scheduling-decision latency of the Conductor with 16 prefill instances holding 10^5 cached
//! blocks each (and a hot first block on all of them), as issues 5 and 15 ask.
//!
//! Printed first, p50/p99 over 200k individually timed decisions (`schedule` alone) of a
//! driven cluster whose clock moves: requests arrive at a fixed rate (70 % of the prefill
//! pool's capacity), and each accepted request's events follow at the times its placement
//! predicts: prefill start, prefill end (the engine's `BlocksStored` for its blocks, with
//! the oldest request blocks of that instance evicted beyond 10^4, then the handover to
//! decode), decode end. The cases run on the same trace in the same run: the load-balance
//! policy (the baseline of the ratios), Mooncake with early rejection, and the same with
//! expected blocks booked at decision time (the online service's setting), and that with
//! prediction-based rejection (a survival table over the decodes in flight per decision). The event
//! handling a request causes is timed apart (it is not on the decision path).
//!
//! Then the same decisions on a still clock, each accepted request dropped at once (so no
//! expectation ever lapses: the booking's structures must stay bounded by releases alone),
//! and criterion's means for that shape. The last line measures how often this machine
//! interrupts a spinning thread: a decision of `T` µs is hit with probability about
//! `T × rate`, which sets the floor of any p99 here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use mooncake_core::scheduler::{ClusterEvent, Decision, ScheduleRequest, Scheduler};
use mooncake_scheduler::{Admission, Conductor, ConductorConfig, Policy};

const INSTANCES: u32 = 16;
const BLOCKS_PER_INSTANCE: u64 = 100_000;
const PER_CONV: u64 = 50;
/// Request blocks (new to their instance) an instance keeps before evicting the oldest.
const RECENT_CAP: usize = 10_000;
const DECISIONS: usize = 200_000;

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
    for i in 0..u64::from(INSTANCES) {
        let mut keys = vec![0u64];
        for conv in 0..BLOCKS_PER_INSTANCE / PER_CONV {
            let base = 1 + (i * 1_000_000) + conv * PER_CONV;
            keys.extend(base..base + PER_CONV);
        }
        // Replicate the neighbour's first 100 conversations (hot prefixes).
        let n = (i + 1) % u64::from(INSTANCES);
        keys.extend(1 + n * 1_000_000..1 + n * 1_000_000 + 100 * PER_CONV);
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

/// Request `k` of 60 blocks: the shared block 0, then a 40-block cached conversation prefix
/// on some instance, then 19 blocks of its own.
fn request(k: u64) -> ScheduleRequest {
    let inst = k % u64::from(INSTANCES);
    let conv = (k * 7919) % (BLOCKS_PER_INSTANCE / PER_CONV);
    let base = 1 + inst * 1_000_000 + conv * PER_CONV;
    let mut h = Vec::with_capacity(60);
    h.push(0u64);
    h.extend(base..base + 40);
    h.extend((0..19).map(|j| 900_000_000 + k * 32 + j));
    ScheduleRequest {
        id: k,
        input_tokens: 60 * 512 - 100,
        output_tokens: 200,
        block_hashes: h,
    }
}

fn pct(samples: &mut [u64], q: f64) -> f64 {
    samples.sort_unstable();
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)] as f64 / 1000.0
}

#[derive(Debug)]
enum Ev {
    PrefillStart { req: u64, inst: u32 },
    PrefillEnd { req: u64, inst: u32, decode: u32 },
    DecodeEnd { req: u64, decode: u32 },
}

/// A cluster driven by a Conductor on a moving clock.
struct Driven {
    c: Conductor,
    /// (time bits, sequence) → event.
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    pending: std::collections::HashMap<u64, (Ev, Vec<u64>)>,
    seq: u64,
    busy_until: Vec<f64>,
    /// Per instance, the request blocks it stored that were new to it, oldest first.
    recent: Vec<VecDeque<Vec<u64>>>,
    recent_blocks: Vec<usize>,
    event_ns: u64,
    max_pending_expiry: usize,
}

impl Driven {
    fn new(c: Conductor) -> Self {
        Self {
            c,
            queue: BinaryHeap::new(),
            pending: std::collections::HashMap::new(),
            seq: 0,
            busy_until: vec![0.0; INSTANCES as usize],
            recent: vec![VecDeque::new(); INSTANCES as usize],
            recent_blocks: vec![0; INSTANCES as usize],
            event_ns: 0,
            max_pending_expiry: 0,
        }
    }

    fn push(&mut self, t: f64, ev: Ev, blocks: Vec<u64>) {
        self.seq += 1;
        self.queue.push(Reverse((t.to_bits(), self.seq)));
        self.pending.insert(self.seq, (ev, blocks));
    }

    fn observe(&mut self, e: ClusterEvent<'_>, t: f64) {
        let s = Instant::now();
        self.c.observe(e, t);
        self.event_ns += s.elapsed().as_nanos() as u64;
    }

    /// Delivers every event due by `now`.
    fn advance(&mut self, now: f64) {
        while let Some(&Reverse((bits, seq))) = self.queue.peek() {
            let t = f64::from_bits(bits);
            if t > now {
                break;
            }
            self.queue.pop();
            let (ev, blocks) = self.pending.remove(&seq).expect("queued event");
            match ev {
                Ev::PrefillStart { req, inst } => self.observe(
                    ClusterEvent::PrefillStarted {
                        request: req,
                        instance: inst,
                    },
                    t,
                ),
                Ev::PrefillEnd { req, inst, decode } => {
                    // The engine reports the blocks it now holds (vLLM's BlockStored) and
                    // evicts its oldest request blocks beyond its capacity (BlockRemoved).
                    let bit = 1u128 << inst;
                    let new: Vec<u64> = blocks
                        .iter()
                        .copied()
                        .filter(|&k| self.c.index().holders(k) & bit == 0)
                        .collect();
                    self.observe(
                        ClusterEvent::BlocksStored {
                            instance: inst,
                            block_hashes: &blocks,
                        },
                        t,
                    );
                    let i = inst as usize;
                    self.recent_blocks[i] += new.len();
                    self.recent[i].push_back(new);
                    while self.recent_blocks[i] > RECENT_CAP {
                        let old = self.recent[i].pop_front().expect("non-empty");
                        self.recent_blocks[i] -= old.len();
                        self.observe(
                            ClusterEvent::BlocksRemoved {
                                instance: inst,
                                block_hashes: &old,
                            },
                            t,
                        );
                    }
                    self.observe(
                        ClusterEvent::PrefillFinished {
                            request: req,
                            instance: inst,
                        },
                        t,
                    );
                    self.observe(
                        ClusterEvent::DecodeStarted {
                            request: req,
                            instance: decode,
                        },
                        t,
                    );
                }
                Ev::DecodeEnd { req, decode } => self.observe(
                    ClusterEvent::DecodeFinished {
                        request: req,
                        instance: decode,
                    },
                    t,
                ),
            }
        }
    }

    /// Schedules `r` at `now` (timed) and queues its lifecycle; returns the decision's ns.
    fn decide(&mut self, r: ScheduleRequest, now: f64) -> (u64, bool) {
        let s = Instant::now();
        let d = self.c.schedule(&r, now);
        let ns = s.elapsed().as_nanos() as u64;
        let Decision::Accept(p) = black_box(d) else {
            return (ns, false);
        };
        let i = p.prefill as usize;
        let start = now.max(self.busy_until[i]);
        let end = (now + p.predicted_ttft_s).max(start + 1e-3);
        self.busy_until[i] = end;
        self.push(
            start,
            Ev::PrefillStart {
                req: r.id,
                inst: p.prefill,
            },
            Vec::new(),
        );
        self.push(
            end,
            Ev::PrefillEnd {
                req: r.id,
                inst: p.prefill,
                decode: p.decode,
            },
            r.block_hashes,
        );
        self.push(
            end + f64::from(r.output_tokens) * p.predicted_tbt_s,
            Ev::DecodeEnd {
                req: r.id,
                decode: p.decode,
            },
            Vec::new(),
        );
        self.max_pending_expiry = self.max_pending_expiry.max(self.c.expected_pending());
        (ns, true)
    }
}

/// Seconds of an uncached-queue prefill of a bench request (its predicted TTFT on an idle
/// cluster), for the arrival rate.
fn idle_ttft() -> f64 {
    let mut c = loaded(Policy::Mooncake, Admission::None, false);
    match c.schedule(&request(0), 0.0) {
        Decision::Accept(p) => p.predicted_ttft_s,
        Decision::Reject(r) => panic!("idle cluster rejected: {r:?}"),
    }
}

/// A driven case: its cluster, its decision times (ns) and accepted count.
struct Case {
    label: String,
    d: Driven,
    samples: Vec<u64>,
    accepted: usize,
}

/// Runs every case on the same trace, interleaved in chunks of `CHUNK` decisions (so the
/// machine's load falls on all cases alike), and prints their figures; returns (p50, p99) µs.
fn driven(cases: &[(Policy, Admission, bool)], rate: f64) -> Vec<(f64, f64)> {
    const CHUNK: usize = 1000;
    let mut runs: Vec<Case> = cases
        .iter()
        .map(|&(p, a, e)| Case {
            label: format!("{p}/{a}{}", if e { " +expected" } else { "" }),
            d: Driven::new(loaded(p, a, e)),
            samples: Vec::with_capacity(DECISIONS),
            accepted: 0,
        })
        .collect();
    for chunk in 0..DECISIONS / CHUNK {
        for run in &mut runs {
            for k in (chunk * CHUNK) as u64..((chunk + 1) * CHUNK) as u64 {
                let now = k as f64 / rate;
                run.d.advance(now);
                let (ns, ok) = run.d.decide(request(k), now);
                run.samples.push(ns);
                run.accepted += usize::from(ok);
            }
        }
    }
    runs.iter_mut()
        .map(|run| {
            let (p50, p99, p999) = (
                pct(&mut run.samples, 0.5),
                pct(&mut run.samples, 0.99),
                pct(&mut run.samples, 0.999),
            );
            let d = &run.d;
            println!(
                "driven {}: decision p50 {p50:.2} µs  p99 {p99:.2} µs  p99.9 {p999:.2} µs; \
                 events {:.2} µs per request; accepted {:.1} %; {} blocks indexed, {} expected, \
                 in flight {}, expiry heap ≤ {}",
                run.label,
                d.event_ns as f64 / 1000.0 / DECISIONS as f64,
                100.0 * run.accepted as f64 / DECISIONS as f64,
                d.c.index().len(),
                d.c.expected().len(),
                d.c.in_flight(),
                d.max_pending_expiry,
            );
            (p50, p99)
        })
        .collect()
}

/// One decision on a still clock, then the driver drops the request.
fn decide_and_drop(c: &mut Conductor, r: &ScheduleRequest) -> bool {
    let d = c.schedule(r, 1.0);
    let ok = matches!(d, Decision::Accept(_));
    if ok {
        c.observe(ClusterEvent::Dropped { request: r.id }, 1.0);
    }
    black_box(d);
    ok
}

/// (p50, p99) in µs of decide-and-drop on a still clock, per case, the cases interleaved in
/// chunks as in [`driven`].
fn still(cases: &[(Policy, Admission, bool)]) -> Vec<(f64, f64)> {
    const CHUNK: usize = 1000;
    let reqs: Vec<ScheduleRequest> = (0..4096).map(request).collect();
    let mut runs: Vec<(Conductor, Vec<u64>, usize)> = cases
        .iter()
        .map(|&(p, a, e)| (loaded(p, a, e), Vec::with_capacity(DECISIONS), 0))
        .collect();
    for chunk in 0..DECISIONS / CHUNK {
        for (c, samples, max_pending) in &mut runs {
            for k in chunk * CHUNK..(chunk + 1) * CHUNK {
                let r = &reqs[k % reqs.len()];
                let t = Instant::now();
                decide_and_drop(c, r);
                samples.push(t.elapsed().as_nanos() as u64);
                *max_pending = (*max_pending).max(c.expected_pending());
            }
        }
    }
    cases
        .iter()
        .zip(&mut runs)
        .map(|(&(policy, admission, expected), (_, samples, max_pending))| {
            let (p50, p99) = (pct(samples, 0.5), pct(samples, 0.99));
            let label = if expected { " +expected" } else { "" };
            println!(
                "still clock {policy}/{admission}{label} (decide + drop): p50 {p50:.2} µs  p99 {p99:.2} µs; expiry heap ≤ {max_pending}"
            );
            (p50, p99)
        })
        .collect()
}

/// Interruptions of a spinning thread (gaps over 5 µs between two clock reads) per ms, and
/// their median length in µs, over `secs`.
fn interruptions(secs: f64) -> (f64, f64) {
    let start = Instant::now();
    let mut last = start;
    let mut gaps = Vec::new();
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let t = Instant::now();
        let g = (t - last).as_nanos() as u64;
        if g > 5_000 {
            gaps.push(g);
        }
        last = t;
    }
    let n = gaps.len() as f64 / (secs * 1000.0);
    let med = if gaps.is_empty() {
        0.0
    } else {
        pct(&mut gaps, 0.5)
    };
    (n, med)
}

fn bench(crit: &mut Criterion) {
    let ttft = idle_ttft();
    let rate = 0.7 * f64::from(INSTANCES) / ttft;
    println!("arrivals: {rate:.1}/s (0.7 × 16 instances / idle TTFT {ttft:.3} s)");
    let cases = [
        (Policy::LoadBalance, Admission::None, false),
        (Policy::Mooncake, Admission::Early, false),
        (Policy::Mooncake, Admission::Early, true),
        (Policy::Mooncake, Admission::Predicted, true),
    ];
    let res = driven(&cases, rate);
    for (&(p, a, e), (p50, p99)) in cases.iter().zip(&res) {
        let label = if e { " +expected" } else { "" };
        println!(
            "driven {p}/{a}{label} / load-balance/none: p50 {:.2}×  p99 {:.2}×",
            p50 / res[0].0,
            p99 / res[0].1
        );
    }
    let (b50, b99) = res[1];
    let (e50, e99) = res[2];
    println!(
        "driven booking cost: mooncake/early +expected / mooncake/early: p50 {:.2}×  p99 {:.2}×",
        e50 / b50,
        e99 / b99
    );
    let still_cases = [
        (Policy::LoadBalance, Admission::None, false),
        (Policy::Mooncake, Admission::Early, false),
        (Policy::Mooncake, Admission::Early, true),
    ];
    let s = still(&still_cases);
    println!(
        "still clock / load-balance/none: mooncake/early p50 {:.2}× p99 {:.2}×, +expected p50 {:.2}× p99 {:.2}×",
        s[1].0 / s[0].0,
        s[1].1 / s[0].1,
        s[2].0 / s[0].0,
        s[2].1 / s[0].1
    );
    let (n, med) = interruptions(1.0);
    println!(
        "machine: {n:.2} interruptions/ms of median {med:.1} µs (a {:.1} µs decision is hit with probability ≈ {:.2} %)",
        res[2].0,
        res[2].0 * n / 10.0
    );
    for (policy, admission, expected) in still_cases {
        let mut c = loaded(policy, admission, expected);
        let reqs: Vec<ScheduleRequest> = (0..4096).map(request).collect();
        let mut k = 0usize;
        let label = if expected { "+expected" } else { "" };
        crit.bench_function(
            &format!("schedule/{policy}/{admission}{label}/16x1e5"),
            |b| {
                b.iter(|| {
                    k = (k + 1) % reqs.len();
                    decide_and_drop(&mut c, &reqs[k])
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
