//! Deterministic (seeded) variants of a request trace, to check that the simulator's
//! qualitative results hold on workloads it was not built on: re-timed arrivals (rate scaled,
//! Poisson, bursty ticks, on/off bursts), longer outputs, longer contexts, shared system
//! prompts, and a different reuse mix.
//!
//! Every transform keeps the trace's prefix semantics: two requests share block id `k` at
//! position `i` only if their first `i + 1` blocks are the same tokens. New ids are allocated
//! above the largest id of the input, in trace order, so the same input and [`TransformSpec`]
//! always give the same output.
//!
//! The steps run in this order: reuse mix, context scaling, system prompts, outputs,
//! arrival process, rate scaling, truncation.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::trace::{TRACE_BLOCK_TOKENS, Trace, TraceRequest};
use mooncake_scheduler::conductor::SplitMix64;

/// How arrival times are regenerated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arrivals {
    /// Keep the trace's timestamps.
    Keep,
    /// Redraw them as a Poisson process with the trace's mean rate (request order kept).
    Poisson,
    /// Quantise to ticks of this many milliseconds: every request of a tick arrives at its
    /// start (the conversation trace arrives in ≈ 3 s ticks of ≈ 10 requests, design notes §4).
    Ticks {
        /// Tick length, milliseconds.
        period_ms: u64,
    },
    /// Modulate the rate: the first quarter of every period runs at `peak` × the mean rate,
    /// the rest at the rate that keeps the mean (`peak` in (1, 4)).
    OnOff {
        /// Period, seconds.
        period_s: f64,
        /// Rate multiplier of the burst quarter.
        peak: f64,
    },
}

impl fmt::Display for Arrivals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Keep => f.write_str("keep"),
            Self::Poisson => f.write_str("poisson"),
            Self::Ticks { period_ms } => write!(f, "ticks:{period_ms}"),
            Self::OnOff { period_s, peak } => write!(f, "onoff:{period_s}:{peak}"),
        }
    }
}

impl FromStr for Arrivals {
    type Err = String;
    /// `keep`, `poisson`, `ticks:MS` or `onoff:PERIOD_S:PEAK`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| -> Result<f64, String> {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("`{p}` is not a positive number"))
        };
        match parts.as_slice() {
            ["keep"] => Ok(Self::Keep),
            ["poisson"] => Ok(Self::Poisson),
            ["ticks", ms] => Ok(Self::Ticks {
                period_ms: num(ms)?.round().max(1.0) as u64,
            }),
            ["onoff", period, peak] => {
                let peak = num(peak)?;
                if !(peak > 1.0 && peak < 4.0) {
                    return Err(format!("on/off peak must be in (1, 4), got {peak}"));
                }
                Ok(Self::OnOff {
                    period_s: num(period)?,
                    peak,
                })
            }
            _ => Err(format!(
                "unknown arrival process `{s}` (expected keep, poisson, ticks:MS or onoff:PERIOD_S:PEAK)"
            )),
        }
    }
}

/// What to change. The default changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TransformSpec {
    /// Seed of every random choice.
    pub seed: u64,
    /// Share of requests (each independently) whose blocks are all replaced by fresh ids: they
    /// neither reuse nor provide cached prefixes (lowers the trace's reuse).
    pub unique_share: f64,
    /// Multiplies every prompt length; block `j` of the new prompt keeps the identity of the
    /// original prefix it ends in, so the reuse structure scales with the prompt.
    pub context_scale: f64,
    /// Tokens of a system prompt prepended to the chosen requests (rounded up to whole
    /// 512-token blocks; 0: none).
    pub system_prompt_tokens: u32,
    /// Share of sessions (requests grouped by their first block) that get a system prompt.
    pub system_prompt_share: f64,
    /// Number of distinct system prompts (each session gets one, chosen by a seeded hash).
    pub system_prompts: u32,
    /// Multiplies every output length (rounded, at least 1).
    pub output_scale: f64,
    /// Caps output lengths after scaling.
    pub output_cap: Option<u32>,
    /// How arrival times are regenerated.
    pub arrivals: Arrivals,
    /// Multiplies the arrival rate (timestamps are divided by it).
    pub rate_scale: f64,
    /// Keeps only the first this many requests (after re-timing).
    pub max_requests: Option<usize>,
}

impl Default for TransformSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            unique_share: 0.0,
            context_scale: 1.0,
            system_prompt_tokens: 0,
            system_prompt_share: 1.0,
            system_prompts: 1,
            output_scale: 1.0,
            output_cap: None,
            arrivals: Arrivals::Keep,
            rate_scale: 1.0,
            max_requests: None,
        }
    }
}

impl TransformSpec {
    /// Checks the values' ranges.
    pub fn validate(&self) -> Result<(), String> {
        let pos = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be positive, got {v}"))
            }
        };
        let share = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be in [0, 1], got {v}"))
            }
        };
        pos("context scale", self.context_scale)?;
        pos("output scale", self.output_scale)?;
        pos("rate scale", self.rate_scale)?;
        share("unique share", self.unique_share)?;
        share("system prompt share", self.system_prompt_share)?;
        if self.system_prompts == 0 {
            return Err("system prompts must be ≥ 1".into());
        }
        Ok(())
    }
}

/// Allocates fresh block ids above the input's, interning (tag, parent-id) pairs so that equal
/// prefixes map to equal ids.
struct Ids {
    next: u64,
    interned: HashMap<(u64, u64), u64>,
}

impl Ids {
    fn new(trace: &Trace) -> Self {
        let max = trace
            .requests
            .iter()
            .flat_map(|r| r.hash_ids.iter().copied())
            .max()
            .map_or(0, |m| m + 1);
        Self {
            next: max,
            interned: HashMap::new(),
        }
    }

    fn fresh(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn intern(&mut self, key: (u64, u64)) -> u64 {
        if let Some(&id) = self.interned.get(&key) {
            return id;
        }
        let id = self.fresh();
        self.interned.insert(key, id);
        id
    }
}

/// A seeded hash of `x` into `[0, 1)`.
fn unit_hash(seed: u64, x: u64) -> f64 {
    let mut g = SplitMix64::new(seed ^ x.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (g.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Applies `spec` to `trace`. The result is sorted by arrival like any parsed trace.
pub fn transform(trace: &Trace, spec: &TransformSpec) -> Result<Trace, String> {
    spec.validate()?;
    let block = TRACE_BLOCK_TOKENS;
    let mut ids = Ids::new(trace);
    let mut rng = SplitMix64::new(spec.seed);
    let mut out: Vec<TraceRequest> = trace.requests.clone();

    // 1. Reuse mix: some requests become unique.
    if spec.unique_share > 0.0 {
        for r in &mut out {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if u < spec.unique_share {
                for h in &mut r.hash_ids {
                    *h = ids.fresh();
                }
            }
        }
    }

    // 2. Context scaling: new block j is identified by the original block its last token
    //    falls in and by j.
    if (spec.context_scale - 1.0).abs() > 1e-12 {
        const TAG: u64 = 1 << 62;
        for r in &mut out {
            let n = u64::from(r.input_length);
            let new_n =
                ((n as f64 * spec.context_scale).round() as u64).clamp(1, u64::from(u32::MAX));
            let blocks = new_n.div_ceil(u64::from(block)) as usize;
            let orig = std::mem::take(&mut r.hash_ids);
            if !orig.is_empty() {
                r.hash_ids = (0..blocks)
                    .map(|j| {
                        let last = ((j as u64 + 1) * u64::from(block)).min(new_n) - 1;
                        let orig_token = (last as f64 / spec.context_scale) as u64;
                        let b = ((orig_token / u64::from(block)) as usize).min(orig.len() - 1);
                        ids.intern((TAG | j as u64, orig[b]))
                    })
                    .collect();
            }
            r.input_length = new_n as u32;
        }
    }

    // 3. System prompts, chosen per session (first block) so that a conversation's turns agree.
    if spec.system_prompt_tokens > 0 {
        let sys_blocks = spec.system_prompt_tokens.div_ceil(block);
        let sys_tokens = sys_blocks * block;
        let prompts: Vec<Vec<u64>> = (0..spec.system_prompts)
            .map(|_| (0..sys_blocks).map(|_| ids.fresh()).collect())
            .collect();
        for r in &mut out {
            let session = r.hash_ids.first().copied().unwrap_or(u64::MAX);
            if unit_hash(spec.seed, session) >= spec.system_prompt_share {
                continue;
            }
            let m = ((unit_hash(spec.seed ^ 0x5eed, session) * f64::from(spec.system_prompts))
                as usize)
                .min(prompts.len() - 1);
            let tag = (m as u64 + 1) << 48;
            let rest: Vec<u64> = r.hash_ids.iter().map(|&h| ids.intern((tag, h))).collect();
            let mut hashes = prompts[m].clone();
            hashes.extend(rest);
            r.hash_ids = hashes;
            r.input_length = r.input_length.saturating_add(sys_tokens);
        }
    }

    // 4. Outputs.
    if (spec.output_scale - 1.0).abs() > 1e-12 || spec.output_cap.is_some() {
        for r in &mut out {
            let o = (f64::from(r.output_length) * spec.output_scale)
                .round()
                .clamp(1.0, f64::from(u32::MAX)) as u32;
            r.output_length = spec.output_cap.map_or(o, |c| o.min(c.max(1)));
        }
    }

    // 5. Arrival process.
    let t0 = out.first().map_or(0, |r| r.timestamp);
    let span_ms = out.last().map_or(0, |r| r.timestamp) - t0;
    match spec.arrivals {
        Arrivals::Keep => {}
        Arrivals::Poisson => {
            let n = out.len().max(1) as f64;
            let mean_gap = span_ms as f64 / (n - 1.0).max(1.0);
            let mut t = 0.0f64;
            for (k, r) in out.iter_mut().enumerate() {
                if k > 0 {
                    let u = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    t += -mean_gap * u.ln();
                }
                r.timestamp = t0 + t.round() as u64;
            }
        }
        Arrivals::Ticks { period_ms } => {
            for r in &mut out {
                r.timestamp = t0 + (r.timestamp - t0) / period_ms * period_ms;
            }
        }
        Arrivals::OnOff { period_s, peak } => {
            let p = period_s * 1000.0;
            let off = (1.0 - peak / 4.0) / 0.75;
            for r in &mut out {
                let t = (r.timestamp - t0) as f64;
                let k = (t / p).floor();
                let u = t - k * p;
                let on_work = peak * p / 4.0;
                let warped = if u < on_work {
                    u / peak
                } else {
                    p / 4.0 + (u - on_work) / off
                };
                r.timestamp = t0 + (k * p + warped).round() as u64;
            }
        }
    }

    // 6. Rate.
    if (spec.rate_scale - 1.0).abs() > 1e-12 {
        for r in &mut out {
            r.timestamp = t0 + ((r.timestamp - t0) as f64 / spec.rate_scale).round() as u64;
        }
    }
    out.sort_by_key(|r| r.timestamp);

    // 7. Truncation.
    if let Some(m) = spec.max_requests {
        out.truncate(m);
    }
    Ok(Trace { requests: out })
}

/// Writes a trace as JSONL (the format [`Trace::from_path`] reads).
pub fn write_jsonl(trace: &Trace, mut w: impl std::io::Write) -> std::io::Result<()> {
    for r in &trace.requests {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// One named variant of [`standard_variants`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    /// Short name (`poisson`, `bursty`, …).
    pub name: &'static str,
    /// What it changes, in words.
    pub description: &'static str,
    /// The transform.
    pub spec: TransformSpec,
}

/// The variants docs/simulation.md reports on (seeded with `seed`): each changes one property
/// of the workload the paper's statements should not depend on.
pub fn standard_variants(seed: u64) -> Vec<Variant> {
    let base = TransformSpec {
        seed,
        ..TransformSpec::default()
    };
    vec![
        Variant {
            name: "poisson",
            description: "arrivals redrawn as a Poisson process (same mean rate)",
            spec: TransformSpec {
                arrivals: Arrivals::Poisson,
                ..base.clone()
            },
        },
        Variant {
            name: "ticks",
            description: "arrivals in 3 s ticks, as the conversation trace (bursts of ≈12)",
            spec: TransformSpec {
                arrivals: Arrivals::Ticks { period_ms: 3000 },
                ..base.clone()
            },
        },
        Variant {
            name: "onoff",
            description: "rate ×2 for 30 s of every 120 s, ×2/3 for the rest (same mean)",
            spec: TransformSpec {
                arrivals: Arrivals::OnOff {
                    period_s: 120.0,
                    peak: 2.0,
                },
                ..base.clone()
            },
        },
        Variant {
            name: "rate1.25",
            description: "arrival rate ×1.25",
            spec: TransformSpec {
                rate_scale: 1.25,
                ..base.clone()
            },
        },
        Variant {
            name: "output2.3",
            description: "outputs ×2.3 (mean 343, the conversation trace's), capped at 2,000",
            spec: TransformSpec {
                output_scale: 2.3,
                output_cap: Some(2000),
                ..base.clone()
            },
        },
        Variant {
            name: "output14",
            description: "outputs ×14 (mean 2,088, reasoning-model lengths), capped at 32,768: \
                          the decode side binds at 8P8D",
            spec: TransformSpec {
                output_scale: 14.0,
                output_cap: Some(32_768),
                ..base.clone()
            },
        },
        Variant {
            name: "context1.5",
            description: "prompts ×1.5 (reuse structure kept), arrival rate ×0.6",
            spec: TransformSpec {
                context_scale: 1.5,
                rate_scale: 0.6,
                ..base.clone()
            },
        },
        Variant {
            name: "sysprompt",
            description: "a 2,048-token system prompt (one of 4) on 90% of sessions",
            spec: TransformSpec {
                system_prompt_tokens: 2048,
                system_prompt_share: 0.9,
                system_prompts: 4,
                ..base.clone()
            },
        },
        Variant {
            name: "lowreuse",
            description: "40% of requests made unique (less reuse)",
            spec: TransformSpec {
                unique_share: 0.4,
                ..base.clone()
            },
        },
        Variant {
            name: "convlike",
            description: "conversation-like mix (Table 2, design notes §4): 3 s ticks, 3.4 req/s, \
                          prompts ×0.8, outputs ×2.3, one shared 512-token system prompt, 35% \
                          of requests unique",
            spec: TransformSpec {
                unique_share: 0.35,
                context_scale: 0.8,
                system_prompt_tokens: 512,
                system_prompt_share: 1.0,
                system_prompts: 1,
                output_scale: 2.3,
                output_cap: Some(2000),
                arrivals: Arrivals::Ticks { period_ms: 3000 },
                rate_scale: 3.40 / 3.91,
                ..base
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TRACE_BLOCK_TOKENS, hit_ratio};

    fn trace() -> Trace {
        let r = |t, n, o, h: &[u64]| TraceRequest {
            timestamp: t,
            input_length: n,
            output_length: o,
            hash_ids: h.to_vec(),
        };
        Trace {
            requests: vec![
                r(0, 1024, 10, &[1, 2]),
                r(1000, 1300, 20, &[1, 2, 3]),
                r(2500, 600, 5, &[7, 8]),
                r(4000, 1536, 3, &[1, 2, 9]),
            ],
        }
    }

    fn valid(t: &Trace) {
        for r in &t.requests {
            let max = u64::from(r.input_length).div_ceil(u64::from(TRACE_BLOCK_TOKENS));
            assert!(r.hash_ids.len() as u64 <= max.max(1), "{r:?}");
        }
        assert!(
            t.requests
                .windows(2)
                .all(|w| w[0].timestamp <= w[1].timestamp)
        );
    }

    #[test]
    fn identity_and_determinism() {
        let t = trace();
        assert_eq!(transform(&t, &TransformSpec::default()).unwrap(), t);
        for v in standard_variants(7) {
            let a = transform(&t, &v.spec).unwrap();
            assert_eq!(a, transform(&t, &v.spec).unwrap(), "{}", v.name);
            assert_eq!(a.requests.len(), 4);
            valid(&a);
        }
    }

    #[test]
    fn context_scale_keeps_the_reuse_structure() {
        let t = trace();
        let s = transform(
            &t,
            &TransformSpec {
                context_scale: 2.0,
                ..TransformSpec::default()
            },
        )
        .unwrap();
        valid(&s);
        assert_eq!(s.requests[0].input_length, 2048);
        assert_eq!(s.requests[1].hash_ids.len(), 6);
        // Requests 0, 1 and 3 share their first two original blocks: four new ones.
        assert_eq!(s.requests[0].hash_ids[..4], s.requests[1].hash_ids[..4]);
        assert_eq!(s.requests[0].hash_ids[..4], s.requests[3].hash_ids[..4]);
        assert_ne!(s.requests[1].hash_ids[4], s.requests[3].hash_ids[4]);
        // Hit ratio of a scaled trace equals the original's when blocks align.
        let h0 = hit_ratio(&t, None, 512);
        let h1 = hit_ratio(&s, None, 512);
        assert!((h0 - h1).abs() < 0.05, "{h0} vs {h1}");
    }

    #[test]
    fn system_prompt_is_shared_and_sessions_agree() {
        let t = trace();
        let s = transform(
            &t,
            &TransformSpec {
                system_prompt_tokens: 1000,
                ..TransformSpec::default()
            },
        )
        .unwrap();
        valid(&s);
        for (a, b) in t.requests.iter().zip(&s.requests) {
            assert_eq!(b.input_length, a.input_length + 1024);
            assert_eq!(b.hash_ids.len(), a.hash_ids.len() + 2);
        }
        let first: Vec<u64> = s.requests.iter().map(|r| r.hash_ids[0]).collect();
        assert!(first.iter().all(|&f| f == first[0]));
        // Shared tails stay shared, distinct tails distinct.
        assert_eq!(s.requests[0].hash_ids[..4], s.requests[1].hash_ids[..4]);
        assert_ne!(s.requests[0].hash_ids[2], s.requests[2].hash_ids[2]);
        assert!(hit_ratio(&s, None, 512) > hit_ratio(&t, None, 512));
    }

    #[test]
    fn unique_share_removes_reuse() {
        let t = trace();
        let s = transform(
            &t,
            &TransformSpec {
                unique_share: 1.0,
                ..TransformSpec::default()
            },
        )
        .unwrap();
        assert_eq!(hit_ratio(&s, None, 512), 0.0);
    }

    #[test]
    fn arrivals_and_rates() {
        let t = trace();
        let fast = transform(
            &t,
            &TransformSpec {
                rate_scale: 2.0,
                ..TransformSpec::default()
            },
        )
        .unwrap();
        assert_eq!(fast.requests[3].timestamp, 2000);
        let ticks = transform(
            &t,
            &TransformSpec {
                arrivals: Arrivals::Ticks { period_ms: 3000 },
                ..TransformSpec::default()
            },
        )
        .unwrap();
        let ts: Vec<u64> = ticks.requests.iter().map(|r| r.timestamp).collect();
        assert_eq!(ts, vec![0, 0, 0, 3000]);
        let onoff = transform(
            &t,
            &TransformSpec {
                arrivals: Arrivals::OnOff {
                    period_s: 4.0,
                    peak: 2.0,
                },
                ..TransformSpec::default()
            },
        )
        .unwrap();
        // Original 1000 ms → on quarter covers 2000 ms of original time at 2×: 500 ms.
        assert_eq!(onoff.requests[1].timestamp, 500);
        // Original 2500 → 1000 + (500 / (2/3)) = 1750.
        assert_eq!(onoff.requests[2].timestamp, 1750);
        assert_eq!(onoff.requests[3].timestamp, 4000);
        let out = transform(
            &t,
            &TransformSpec {
                output_scale: 2.5,
                output_cap: Some(30),
                ..TransformSpec::default()
            },
        )
        .unwrap();
        let o: Vec<u32> = out.requests.iter().map(|r| r.output_length).collect();
        assert_eq!(o, vec![25, 30, 13, 8]);
        assert!("onoff:60:5".parse::<Arrivals>().is_err());
        assert_eq!(
            "ticks:3000".parse::<Arrivals>().unwrap(),
            Arrivals::Ticks { period_ms: 3000 }
        );
        let mut buf = Vec::new();
        write_jsonl(&t, &mut buf).unwrap();
        let back = Trace::from_reader(buf.as_slice(), std::path::Path::new("x")).unwrap();
        assert_eq!(back, t);
    }
}
