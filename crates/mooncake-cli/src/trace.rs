//! `mooncake trace …`: statistics of Mooncake JSONL request traces, and seeded variants of a
//! trace (`mooncake trace transform`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mooncake_sim::trace::{Trace, TraceStats, trace_stats};
use mooncake_sim::transform::{Arrivals, TransformSpec, standard_variants, transform, write_jsonl};

/// `mooncake trace …`.
#[derive(Debug, Subcommand)]
pub(crate) enum TraceCommand {
    /// Requests, time span, lengths, unique blocks and prefix-cache hit ratios of a trace.
    Stats(StatsArgs),
    /// Writes a seeded variant of a trace: re-timed, longer outputs or contexts, system
    /// prompts, less reuse (or every standard variant with `--standard-variants DIR`).
    Transform(TransformArgs),
}

/// `mooncake trace transform IN --out OUT [options]`.
#[derive(Debug, Args)]
pub(crate) struct TransformArgs {
    /// The JSONL trace to transform.
    file: PathBuf,
    /// Output JSONL file (`-`: standard output).
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// Write every standard variant (docs/simulation.md) as DIR/NAME.jsonl instead.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    standard_variants: Option<PathBuf>,
    /// Start from this standard variant's settings (poisson, ticks, onoff, rate1.25,
    /// output2.3, output14, context1.5, sysprompt, lowreuse, convlike); other options override
    /// them.
    #[arg(long)]
    variant: Option<String>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Arrival process: keep, poisson, ticks:MS, onoff:PERIOD_S:PEAK.
    #[arg(long)]
    arrivals: Option<Arrivals>,
    /// Multiply the arrival rate.
    #[arg(long)]
    rate_scale: Option<f64>,
    /// Multiply output lengths.
    #[arg(long)]
    output_scale: Option<f64>,
    /// Cap output lengths (after scaling).
    #[arg(long)]
    output_cap: Option<u32>,
    /// Multiply prompt lengths (the reuse structure scales with them).
    #[arg(long)]
    context_scale: Option<f64>,
    /// Prepend a system prompt of this many tokens (rounded up to 512-token blocks).
    #[arg(long)]
    system_prompt_tokens: Option<u32>,
    /// Share of sessions that get a system prompt.
    #[arg(long)]
    system_prompt_share: Option<f64>,
    /// Number of distinct system prompts.
    #[arg(long)]
    system_prompts: Option<u32>,
    /// Share of requests made unique (no reuse).
    #[arg(long)]
    unique_share: Option<f64>,
    /// Keep only the first N requests.
    #[arg(long)]
    max_requests: Option<usize>,
}

/// `mooncake trace stats FILE [--cache-tokens 3e6,5e7] [--json]`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// The JSONL trace.
    file: PathBuf,
    /// LRU capacities to evaluate, in tokens (comma-separated; `3e6` notation accepted).
    #[arg(long, value_delimiter = ',', value_parser = parse_tokens)]
    cache_tokens: Vec<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Parses a token count such as `3000000`, `3e6` or `5E7`.
pub(crate) fn parse_tokens(s: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of tokens"))?;
    if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 1e15) {
        return Err(format!("`{s}` is not a whole number of tokens"));
    }
    Ok(v as u64)
}

/// Runs `mooncake trace …`.
pub(crate) fn run(cmd: TraceCommand) -> anyhow::Result<()> {
    match cmd {
        TraceCommand::Stats(a) => stats(a),
        TraceCommand::Transform(a) => transform_cmd(a),
    }
}

fn spec_of(a: &TransformArgs) -> anyhow::Result<TransformSpec> {
    let mut spec = match &a.variant {
        Some(name) => match standard_variants(a.seed)
            .into_iter()
            .find(|v| v.name == name)
        {
            Some(v) => v.spec,
            None => bail!(
                "unknown variant `{name}` (expected one of: {})",
                standard_variants(0)
                    .iter()
                    .map(|v| v.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => TransformSpec::default(),
    };
    spec.seed = a.seed;
    if let Some(v) = a.arrivals {
        spec.arrivals = v;
    }
    if let Some(v) = a.rate_scale {
        spec.rate_scale = v;
    }
    if let Some(v) = a.output_scale {
        spec.output_scale = v;
    }
    if a.output_cap.is_some() {
        spec.output_cap = a.output_cap;
    }
    if let Some(v) = a.context_scale {
        spec.context_scale = v;
    }
    if let Some(v) = a.system_prompt_tokens {
        spec.system_prompt_tokens = v;
    }
    if let Some(v) = a.system_prompt_share {
        spec.system_prompt_share = v;
    }
    if let Some(v) = a.system_prompts {
        spec.system_prompts = v;
    }
    if let Some(v) = a.unique_share {
        spec.unique_share = v;
    }
    if a.max_requests.is_some() {
        spec.max_requests = a.max_requests;
    }
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

fn write_trace(t: &Trace, path: &std::path::Path) -> anyhow::Result<()> {
    if path.as_os_str() == "-" {
        let stdout = std::io::stdout();
        write_jsonl(t, std::io::BufWriter::new(stdout.lock())).context("writing the trace")?;
        return Ok(());
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write_jsonl(t, std::io::BufWriter::new(f))
        .with_context(|| format!("writing {}", path.display()))
}

fn transform_cmd(a: TransformArgs) -> anyhow::Result<()> {
    let trace = Trace::from_path(&a.file)?;
    if let Some(dir) = &a.standard_variants {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for v in standard_variants(a.seed) {
            let t = transform(&trace, &v.spec).map_err(anyhow::Error::msg)?;
            let path = dir.join(format!("{}.jsonl", v.name));
            write_trace(&t, &path)?;
            eprintln!(
                "{}: {} ({} requests)",
                path.display(),
                v.description,
                t.requests.len()
            );
        }
        return Ok(());
    }
    let spec = spec_of(&a)?;
    let t = transform(&trace, &spec).map_err(anyhow::Error::msg)?;
    write_trace(&t, &a.out)
}

/// The `--json` form: exactly the keys issue 5 lists.
fn stats_json(s: &TraceStats) -> serde_json::Value {
    let lru: serde_json::Map<String, serde_json::Value> = s
        .lru_hit_ratio
        .iter()
        .map(|(c, r)| (c.to_string(), serde_json::json!(r)))
        .collect();
    serde_json::json!({
        "requests": s.requests,
        "span_s": s.span_s,
        "mean_input": s.mean_input,
        "mean_output": s.mean_output,
        "unique_blocks": s.unique_blocks,
        "infinite_hit_ratio": s.infinite_hit_ratio,
        "lru_hit_ratio": lru,
    })
}

fn stats(a: StatsArgs) -> anyhow::Result<()> {
    let trace = Trace::from_path(&a.file)?;
    let s = trace_stats(&trace, &a.cache_tokens);
    if a.json {
        let v = stats_json(&s);
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("encoding JSON")?
        );
        return Ok(());
    }
    println!("trace            {}", a.file.display());
    println!("requests         {}", s.requests);
    println!(
        "time span        {:.1} s ({:.2} req/s)",
        s.span_s, s.arrival_rate
    );
    println!(
        "input tokens     mean {:.0}  p50 {:.0}  p99 {:.0}",
        s.mean_input, s.p50_input, s.p99_input
    );
    println!(
        "output tokens    mean {:.1}  p50 {:.0}  p99 {:.0}",
        s.mean_output, s.p50_output, s.p99_output
    );
    println!(
        "unique blocks    {} ({:.1}M tokens)",
        s.unique_blocks,
        s.unique_blocks as f64 * 512.0 / 1e6
    );
    println!("hit ratio ∞      {:.3}", s.infinite_hit_ratio);
    for (c, r) in &s.lru_hit_ratio {
        println!("hit ratio LRU {:>10} tokens  {:.3}", c, r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts() {
        assert_eq!(parse_tokens("3e6"), Ok(3_000_000));
        assert_eq!(parse_tokens("50000000"), Ok(50_000_000));
        assert!(parse_tokens("1.5").is_err());
        assert!(parse_tokens("-1").is_err());
        assert!(parse_tokens("x").is_err());
    }

    #[test]
    fn transform_options_start_from_a_variant_and_override_it() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: TransformArgs,
        }
        let a = Cli::parse_from(["t", "in.jsonl", "--variant", "convlike", "--seed", "9"]).a;
        let s = spec_of(&a).unwrap();
        assert_eq!(s.seed, 9);
        assert_eq!(s.arrivals, Arrivals::Ticks { period_ms: 3000 });
        assert!((s.output_scale - 2.3).abs() < 1e-12);
        let a = Cli::parse_from([
            "t",
            "in.jsonl",
            "--variant",
            "convlike",
            "--output-scale",
            "1.5",
            "--arrivals",
            "poisson",
        ])
        .a;
        let s = spec_of(&a).unwrap();
        assert_eq!((s.output_scale, s.arrivals), (1.5, Arrivals::Poisson));
        let a = Cli::parse_from(["t", "in.jsonl", "--variant", "nope"]).a;
        assert!(
            spec_of(&a)
                .unwrap_err()
                .to_string()
                .contains("unknown variant")
        );
        let a = Cli::parse_from(["t", "in.jsonl", "--unique-share", "2"]).a;
        assert!(spec_of(&a).is_err());
    }

    #[test]
    fn json_keys_are_the_issues() {
        let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 2, \"hash_ids\": [1, 2]}\n\
                    {\"timestamp\": 2000, \"input_length\": 600, \"output_length\": 4, \"hash_ids\": [1, 3]}\n";
        let t = Trace::from_reader(text.as_bytes(), std::path::Path::new("t")).unwrap();
        let v = stats_json(&trace_stats(&t, &[512, 3_000_000]));
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "infinite_hit_ratio",
                "lru_hit_ratio",
                "mean_input",
                "mean_output",
                "requests",
                "span_s",
                "unique_blocks"
            ]
        );
        assert_eq!(v["requests"], 2);
        assert_eq!(v["span_s"], 2.0);
        assert_eq!(v["unique_blocks"], 3);
        // Second request: block 1 (512 tokens) hits, block 3 misses: 512 / 1200.
        let r = 512.0 / 1200.0;
        assert!((v["infinite_hit_ratio"].as_f64().unwrap() - r).abs() < 1e-12);
        assert!((v["lru_hit_ratio"]["3000000"].as_f64().unwrap() - r).abs() < 1e-12);
        // A one-block LRU: block 2 evicts block 1 before the second request.
        assert_eq!(v["lru_hit_ratio"]["512"].as_f64().unwrap(), 0.0);
    }
}
