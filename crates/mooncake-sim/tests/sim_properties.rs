//! Property tests of the simulator and the trace reader: no request lost or duplicated, the
//! clock never goes backwards, rejected + completed = requests, per-request times are ordered,
//! and arbitrary input lines never panic the reader.

use std::path::Path;

use mooncake_scheduler::{Admission, Policy};
use mooncake_sim::sim::{CoupledConfig, SimConfig, simulate};
use mooncake_sim::{Trace, TraceRequest};
use proptest::prelude::*;

fn arb_trace() -> impl Strategy<Value = Trace> {
    // Up to 40 requests; prompts share prefixes drawn from a few "documents".
    prop::collection::vec(
        (0u64..4_000, 0u64..4, 1u32..40, 0u32..2_000, 0u32..60),
        1..40,
    )
    .prop_map(|reqs| {
        let mut t = 0;
        let requests = reqs
            .into_iter()
            .map(|(gap, doc, blocks, tail, out)| {
                t += gap;
                let input = (blocks - 1) * 512 + tail.clamp(1, 512);
                TraceRequest {
                    timestamp: t,
                    input_length: input,
                    output_length: out,
                    hash_ids: (0..u64::from(blocks)).map(|b| doc * 1_000 + b).collect(),
                }
            })
            .collect();
        Trace { requests }
    })
}

fn arb_config() -> impl Strategy<Value = SimConfig> {
    (
        0usize..6,
        0usize..5,
        1u32..5,
        1u32..4,
        any::<bool>(),
        0u8..4,
        prop::sample::select(vec![0.5f64, 1.0, 4.0, 20.0]),
        prop::sample::select(vec![0u64, 4_096, 3_000_000]),
    )
        .prop_map(|(pol, adm, np, nd, check, coupled, speed, cache)| {
            let mut c = SimConfig::default();
            c.conductor.policy = Policy::ALL[pol];
            c.conductor.admission = Admission::ALL[adm];
            c.conductor.prefill_instances = np;
            c.conductor.decode_instances = nd;
            c.conductor.ttft_slo_s = 5.0;
            c.conductor.cost.vram_tokens = 60_000;
            c.decode_check = check;
            c.speed = speed;
            c.cache_tokens = cache;
            c.load_sample_s = if check { 0.5 } else { 0.0 };
            if coupled > 0 {
                let mut v = CoupledConfig::default();
                v.instances = np;
                v.prefix_cache_tokens = cache;
                v.chunk_tokens = (coupled == 2).then_some(1024);
                c.coupled = Some(v);
            }
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn no_request_lost_and_time_moves_forward(trace in arb_trace(), cfg in arb_config()) {
        let mut last_progress = 0;
        let r = simulate(&cfg, &trace, &mut |done, total| {
            assert!(done >= last_progress && done <= total);
            last_progress = done;
        })
        .unwrap();
        let n = trace.requests.len();
        prop_assert_eq!(last_progress, n);
        prop_assert!(r.clock_monotonic);
        prop_assert_eq!(r.records.len(), n);
        for (i, x) in r.records.iter().enumerate() {
            prop_assert_eq!(x.id, i as u64);
            // Exactly one outcome per request.
            prop_assert!(x.completed() != x.rejected.is_some(), "{:?}", x);
            prop_assert!(x.reused_tokens <= u64::from(x.input_tokens));
            prop_assert!(x.fetched_tokens <= x.reused_tokens);
            if let Some(s) = x.prefill_start_s {
                prop_assert!(s >= x.arrival_s - 1e-9);
                let e = x.prefill_end_s.unwrap();
                prop_assert!(e >= s);
                if let Some(t) = x.ttft_s {
                    prop_assert!(x.arrival_s + t >= e - 1e-9);
                }
            }
            if let Some(end) = x.end_s {
                prop_assert!(end + 1e-9 >= x.arrival_s + x.ttft_s.unwrap());
                prop_assert!(end <= r.makespan_s + 1e-9);
            }
        }
        let s = &r.summary;
        prop_assert_eq!(s.requests, n);
        prop_assert_eq!(s.completed + s.rejected, n);
        prop_assert!((0.0..=1.0).contains(&s.token_hit_ratio));
        prop_assert!(s.ttft_slo_attainment <= 1.0 && s.tbt_slo_attainment <= 1.0);
        prop_assert!(r.effective_attainment <= s.ttft_slo_attainment + 1e-12);
        if cfg.conductor.admission == Admission::None && !cfg.decode_check {
            prop_assert_eq!(s.rejected, 0);
        }
        let mut t = f64::NEG_INFINITY;
        for p in &r.load_series {
            prop_assert!(p.t_s >= t);
            t = p.t_s;
        }
    }

    #[test]
    fn reader_never_panics(lines in prop::collection::vec(".{0,80}", 0..5)) {
        let text = lines.join("\n");
        let _ = Trace::from_reader(text.as_bytes(), Path::new("fuzz.jsonl"));
    }

    #[test]
    fn reader_reports_the_bad_line(good in 0usize..6, junk in "[a-z{}\\[\\]:,0-9 ]{1,30}") {
        let ok = r#"{"timestamp": 1, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}"#;
        let mut text = vec![ok.to_owned(); good];
        text.push(format!("{{{junk}"));
        let err = Trace::from_reader(text.join("\n").as_bytes(), Path::new("t.jsonl")).unwrap_err();
        let expected = format!("t.jsonl:{}: ", good + 1);
        prop_assert!(err.to_string().starts_with(&expected), "{}", err);
    }
}

fn arb_spec() -> impl Strategy<Value = mooncake_sim::transform::TransformSpec> {
    use mooncake_sim::transform::{Arrivals, TransformSpec};
    (
        any::<u64>(),
        prop::sample::select(vec![0.0f64, 0.3, 1.0]),
        prop::sample::select(vec![0.5f64, 1.0, 1.5, 3.0]),
        prop::sample::select(vec![0u32, 100, 1024]),
        1u32..4,
        prop::sample::select(vec![0.5f64, 1.0, 2.3]),
        0usize..4,
        prop::sample::select(vec![0.5f64, 1.0, 2.0]),
    )
        .prop_map(|(seed, unique, ctx, sys, prompts, out, arr, rate)| {
            let mut s = TransformSpec::default();
            s.seed = seed;
            s.unique_share = unique;
            s.context_scale = ctx;
            s.system_prompt_tokens = sys;
            s.system_prompt_share = 0.7;
            s.system_prompts = prompts;
            s.output_scale = out;
            s.output_cap = Some(500);
            s.arrivals = [
                Arrivals::Keep,
                Arrivals::Poisson,
                Arrivals::Ticks { period_ms: 700 },
                Arrivals::OnOff {
                    period_s: 3.0,
                    peak: 2.5,
                },
            ][arr];
            s.rate_scale = rate;
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Every variant is a valid trace (the reader accepts it back), deterministic, and keeps
    /// prefix semantics: two requests sharing a block id at position i share every earlier one.
    #[test]
    fn transforms_keep_traces_valid(trace in arb_trace(), spec in arb_spec()) {
        use mooncake_sim::transform::{transform, write_jsonl};
        let t = transform(&trace, &spec).unwrap();
        prop_assert_eq!(&t, &transform(&trace, &spec).unwrap());
        prop_assert_eq!(t.requests.len(), trace.requests.len());
        let mut buf = Vec::new();
        write_jsonl(&t, &mut buf).unwrap();
        let back = Trace::from_reader(buf.as_slice(), Path::new("v.jsonl")).unwrap();
        prop_assert_eq!(&back, &t);
        let mut seen: std::collections::HashMap<(usize, u64), Vec<u64>> = Default::default();
        for r in &t.requests {
            for (i, &h) in r.hash_ids.iter().enumerate() {
                let prefix = r.hash_ids[..i].to_vec();
                let e = seen.entry((i, h)).or_insert_with(|| prefix.clone());
                prop_assert_eq!(&*e, &prefix, "block {} at {} has two prefixes", h, i);
            }
        }
    }
}
