//! Checks on the published synthetic trace (traces/ at the repository root).

use mooncake_sim::experiments::{Experiment, ExperimentOptions, run_experiment};
use mooncake_sim::trace::{TRACE_BLOCK_TOKENS, hit_ratio};
use mooncake_sim::{SimConfig, Trace, simulate, trace_stats};

fn synthetic() -> Trace {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/synthetic_trace.jsonl"
    );
    Trace::from_path(path).unwrap_or_else(|e| panic!("the synthetic trace is needed: {e}"))
}

#[test]
fn infinite_cache_hit_ratio_is_0_651() {
    let t = synthetic();
    let s = trace_stats(&t, &[3_000_000, 50_000_000]);
    assert_eq!(s.requests, 3993);
    assert!(
        (s.infinite_hit_ratio - 0.651).abs() <= 0.005,
        "{}",
        s.infinite_hit_ratio
    );
    // Design notes §4: LRU at 3M tokens ≈ 0.315, saturated by 50M.
    assert!((s.lru_hit_ratio[&3_000_000] - 0.315).abs() <= 0.005);
    assert!((s.lru_hit_ratio[&50_000_000] - s.infinite_hit_ratio).abs() <= 0.001);
    assert_eq!(s.unique_blocks, 43_924);
    assert!((s.mean_input - 15_325.0).abs() < 1.0);
}

#[test]
fn fig9_curve_within_tolerance() {
    let r = run_experiment(
        Experiment::Fig9,
        &synthetic(),
        &ExperimentOptions::default(),
    )
    .unwrap();
    assert!(r.checks.iter().all(|c| c.passed), "{}", r.markdown);
    // Monotone in capacity.
    let ours: Vec<f64> = serde_json::from_value(r.json["ours"].clone()).unwrap();
    assert!(ours.windows(2).all(|w| w[0] <= w[1] + 1e-12), "{ours:?}");
    assert!((hit_ratio(&synthetic(), Some(1 << 40), TRACE_BLOCK_TOKENS) - ours[6]).abs() < 1e-3);
}

#[test]
fn mooncake_replay_of_synthetic_trace() {
    // 8P8D at 1×: every request served, global-cache hits near the trace's maximum, and no
    // instance collapse (every prefill instance takes a fair share).
    let t = synthetic();
    let r = simulate(&SimConfig::default(), &t, &mut |_, _| {}).unwrap();
    assert_eq!(r.summary.completed, t.requests.len());
    assert!(r.summary.token_hit_ratio > 0.6, "{:?}", r.summary);
    let mut per = [0usize; 8];
    for x in &r.records {
        per[x.prefill.unwrap() as usize] += 1;
    }
    let max = *per.iter().max().unwrap() as f64;
    assert!(max < 0.25 * t.requests.len() as f64, "{per:?}");
}
