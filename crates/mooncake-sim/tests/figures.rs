//! The paper's figures, pinned: every check docs/simulation.md states for Figs. 5, 9, 10, 11,
//! 13, 15 and the overload table must hold on the synthetic trace, the qualitative ("shape")
//! checks also on seeded variants of it (another reuse mix, a shared system prompt, bursty
//! arrivals, longer outputs), and a few deliberately broken models show that the checks can
//! fail. The simulator crates build with `opt-level = 2` in the dev profile (root Cargo.toml),
//! so these run in seconds.

use mooncake_sim::experiments::{
    Check, Experiment, ExperimentOptions, ExperimentReport, conversation_matched_speed,
    conversation_mean_prefill_s, run_experiment,
};
use mooncake_sim::transform::{Variant, standard_variants, transform};
use mooncake_sim::{SimConfig, Trace};

fn synthetic() -> Trace {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/synthetic_trace.jsonl"
    );
    Trace::from_path(path).unwrap_or_else(|e| panic!("the synthetic trace is needed: {e}"))
}

fn variant(name: &str) -> Trace {
    let v: Variant = standard_variants(1)
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no variant {name}"));
    transform(&synthetic(), &v.spec).unwrap()
}

fn run(e: Experiment, t: &Trace, opts: &ExperimentOptions) -> ExperimentReport {
    run_experiment(e, t, opts).unwrap()
}

fn failed(r: &ExperimentReport, include_paper: bool) -> Vec<&Check> {
    r.checks
        .iter()
        .filter(|c| !c.passed && (include_paper || !c.paper))
        .collect()
}

/// Every check holds (paper-number checks too: this is the paper's trace).
fn assert_all(r: &ExperimentReport, min_checks: usize) {
    assert!(r.checks.len() >= min_checks, "{}", r.markdown);
    assert!(failed(r, true).is_empty(), "{}", r.markdown);
}

/// Every shape check holds (a variant: the paper's numbers are not its own).
fn assert_shape(r: &ExperimentReport, min_checks: usize) {
    let shape = r.checks.iter().filter(|c| !c.paper).count();
    assert!(shape >= min_checks, "{}", r.markdown);
    assert!(failed(r, false).is_empty(), "{}", r.markdown);
}

fn check<'a>(r: &'a ExperimentReport, starts: &str) -> &'a Check {
    r.checks
        .iter()
        .find(|c| c.name.starts_with(starts))
        .unwrap_or_else(|| panic!("no check `{starts}` in\n{}", r.markdown))
}

fn f64s(r: &ExperimentReport, key: &str) -> Vec<f64> {
    serde_json::from_value(r.json[key].clone()).unwrap()
}

#[test]
fn fig5_ordering_and_conversation_ratios() {
    let opts = ExperimentOptions::default();
    let t = synthetic();
    // The replay speed is derived, not tuned: the conversation trace's prefill work at 1×.
    let cost = &opts.base.conductor.cost;
    assert!((conversation_mean_prefill_s(cost) - 1.73).abs() < 0.005);
    let speed = conversation_matched_speed(&t, cost);
    assert!((0.6..0.8).contains(&speed), "{speed}");
    let r = run(Experiment::Fig5, &t, &opts);
    assert_all(&r, 1);
    // The synthetic trace's reuse (0.65) is not conversation-like: no ratio target.
    assert!(r.checks.iter().all(|c| !c.name.contains("ratios")));
    // On a conversation-like mix the paper's ratios (1.17 / 1.72 / 6.4) hold within ±30%.
    let conv = run(Experiment::Fig5, &variant("convlike"), &opts);
    assert_shape(&conv, 2);
    assert!(check(&conv, "Fig. 5 ratios").passed);
    let ratios = f64s(&conv, "ratio_to_global");
    assert!(ratios[3] > 4.5 && ratios[2] > 1.3, "{ratios:?}");
}

#[test]
fn fig9_hit_ratio_curve() {
    let r = run(
        Experiment::Fig9,
        &synthetic(),
        &ExperimentOptions::default(),
    );
    assert_all(&r, 4);
    // A trace with less reuse keeps the curve's shape but not the paper's numbers.
    let low = run(
        Experiment::Fig9,
        &variant("lowreuse"),
        &ExperimentOptions::default(),
    );
    assert_shape(&low, 3);
    assert!(
        !check(&low, "Fig. 9 curve within").passed,
        "{}",
        low.markdown
    );
}

#[test]
fn fig10_local_vs_global_cache() {
    let r = run(
        Experiment::Fig10,
        &synthetic(),
        &ExperimentOptions::default(),
    );
    assert_all(&r, 4);
    let s = run(
        Experiment::Fig10,
        &variant("sysprompt"),
        &ExperimentOptions::default(),
    );
    assert_shape(&s, 2);
}

#[test]
fn fig11_replicas_of_hot_keys() {
    let opts = ExperimentOptions::default();
    let r = run(Experiment::Fig11, &synthetic(), &opts);
    assert_all(&r, 2);
    assert!(check(&r, "Fig. 11 no shared prompt").passed);
    // A shared system prompt: its blocks end up on (almost) every prefill instance.
    let s = run(Experiment::Fig11, &variant("sysprompt"), &opts);
    assert_shape(&s, 2);
    assert!(check(&s, "Fig. 11 shared prompt").passed);
    let c = run(Experiment::Fig11, &variant("convlike"), &opts);
    assert_shape(&c, 2);
}

#[test]
fn fig13_bandwidth_knee() {
    let r = run(
        Experiment::Fig13,
        &synthetic(),
        &ExperimentOptions::default(),
    );
    assert_all(&r, 4);
    let ttft = f64s(&r, "mean_ttft_s");
    // Above the knee the TTFT is within 40% of the fastest NIC's, as the paper's 1.6 vs 1.25 s.
    let gbps = f64s(&r, "gbps");
    let at = |g: f64| ttft[gbps.iter().position(|&x| x == g).unwrap()];
    assert!(
        at(160.0) <= 1.3 * at(400.0) && at(40.0) > 2.0 * at(400.0),
        "{ttft:?}"
    );
}

#[test]
fn fig15_pd_ratio() {
    let opts = ExperimentOptions::default();
    let r = run(Experiment::Fig15, &synthetic(), &opts);
    assert_all(&r, 5);
    // Longer outputs (the conversation trace's 343 tokens) must not break the plateau: with
    // the decode cost derived from Table 1 and Fig. 14 the decode pool keeps up.
    let o = run(Experiment::Fig15, &variant("output2.3"), &opts);
    assert_shape(&o, 4);
    let eff = f64s(&o, "effective_pct");
    assert!(eff[3] >= 99.0 && eff[4] >= 99.0, "8P8D / 9P7D {eff:?}");
    // Reasoning-length outputs load the decode side: the shape holds and the prefill-rich end
    // (11P5D) falls too, a peak in the middle as in the paper.
    let o = run(Experiment::Fig15, &variant("output14"), &opts);
    assert_shape(&o, 4);
    let eff = f64s(&o, "effective_pct");
    let best = eff.iter().copied().fold(0.0, f64::max);
    assert!(eff[6] < best - 5.0, "11P5D {eff:?}");
}

#[test]
fn overload_admission() {
    let opts = ExperimentOptions::default();
    let r = run(Experiment::Overload, &synthetic(), &opts);
    assert_all(&r, 3);
    // A decode-bound cluster (15P1D, long outputs): early rejection and prediction move
    // rejections before the prefill and cut the wasted prefill by more than a quarter.
    let mut d = opts.clone();
    d.overload_prefill = 15;
    let r = run(Experiment::Overload, &variant("convlike"), &d);
    assert_shape(&r, 3);
    let wasted = f64s(&r, "wasted_prefill_s");
    assert!(
        wasted[2] < 0.75 * wasted[1] && wasted[3] < 0.75 * wasted[1],
        "{wasted:?}"
    );
    // There the prediction (queued requests' decodes may end before `t`; running decodes
    // counted as censored durations) rejects fewer than early rejection, as in the paper.
    let rejected = f64s(&r, "rejected");
    assert!(rejected[3] < rejected[2], "{rejected:?}");
    // Reasoning-length outputs make the paper's own split (8P8D at 2×) decode-bound: early
    // rejection rejects fewer than the baseline and moves the rejections before the prefill.
    // (Prediction rejects more than early rejection there: docs/simulation.md, "Still off".)
    let r = run(Experiment::Overload, &variant("output14"), &opts);
    for c in ["overload admission pays", "overload rejecting on arrival"] {
        assert!(check(&r, c).passed, "{}", r.markdown);
    }
    let rejected = f64s(&r, "rejected");
    assert!(rejected[2] < rejected[1], "{rejected:?}");
    let wasted = f64s(&r, "wasted_prefill_s");
    assert!(wasted[2] < 0.5 * wasted[1], "{wasted:?}");
}

#[test]
fn the_checks_can_fail() {
    // The decode cost fitted to Fig. 15b before (c1 = 4 ms per sequence), on a trace with the
    // conversation trace's output lengths, loses the plateau: what the reviewer of issue 15
    // saw on another request mix.
    let mut opts = ExperimentOptions::default();
    let mut base = SimConfig::default();
    base.conductor.cost.decode_c1 = 4e-3;
    opts.base = base;
    let r = run(Experiment::Fig15, &variant("output2.3"), &opts);
    assert!(!check(&r, "Fig. 15 a plateau").passed, "{}", r.markdown);
    // Fig. 5 at the old, underived speed on a conversation-like mix: the ratios shrink out of
    // the paper's band (the reviewer's 3.2× and 1.41×).
    let mut opts = ExperimentOptions::default();
    opts.fig5_speed = Some(0.6);
    let r = run(Experiment::Fig5, &variant("convlike"), &opts);
    assert!(!check(&r, "Fig. 5 ratios").passed, "{}", r.markdown);
}
