//! Replays a Mooncake trace through the Conductor on a simulated 8P8D cluster and prints the
//! summary for each prefill policy.
//!
//! `cargo run --release -p mooncake-sim --example conductor_trace [TRACE]` (default: the
//! synthetic trace in traces/ at the repository root).

use mooncake_scheduler::Policy;
use mooncake_sim::{SimConfig, Trace, simulate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../traces/synthetic_trace.jsonl"
        )
        .to_owned()
    });
    let trace = Trace::from_path(&path)?;
    println!("{} requests from {path}", trace.requests.len());
    for policy in [
        Policy::Random,
        Policy::LoadBalance,
        Policy::LocalCache,
        Policy::Mooncake,
    ] {
        let mut cfg = SimConfig::default();
        cfg.conductor.policy = policy;
        let r = simulate(&cfg, &trace, &mut |_, _| {})?;
        let s = &r.summary;
        println!(
            "{policy:>13}: mean TTFT {:6.2} s  p90 {:6.2} s  TBT {:5.1} ms  hit {:.3}  prefill {:.2} s/req",
            s.mean_ttft_s, s.p90_ttft_s, s.mean_tbt_ms, s.token_hit_ratio, s.mean_prefill_gpu_s
        );
    }
    Ok(())
}
