//! `mooncake simulate …`: replay a trace on a simulated Mooncake cluster (or the coupled
//! vLLM-like baseline), or run one of the paper's experiments.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mooncake_scheduler::{Admission, Conductor, Policy};
use mooncake_sim::experiments::{
    Chart, ChartKind, Experiment, ExperimentOptions, ExperimentReport, Series, Workload,
    run_experiment, run_on_variants, variants_markdown,
};
use mooncake_sim::sim::{CoupledConfig, SimConfig, SimResult, Simulator};
use mooncake_sim::{Trace, plot};

use crate::trace::parse_tokens;

/// `mooncake simulate --trace FILE --policy P --prefill N --decode M …` or
/// `mooncake simulate --experiment E --trace FILE --out DIR`.
#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// The JSONL trace to replay.
    #[arg(long)]
    trace: PathBuf,
    /// Prefill policy: random, round-robin, load-balance, local-cache, max-prefix, mooncake,
    /// or vllm (coupled baseline).
    #[arg(long, default_value = "mooncake")]
    policy: String,
    /// Prefill instances.
    #[arg(long, default_value_t = 8)]
    prefill: u32,
    /// Decode instances.
    #[arg(long, default_value_t = 8)]
    decode: u32,
    /// Admission control: none, slo, baseline, early, predicted.
    #[arg(long, default_value = "none")]
    admission: Admission,
    /// TTFT SLO, seconds.
    #[arg(long, default_value_t = 30.0)]
    ttft_slo: f64,
    /// TBT SLO, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    tbt_slo: f64,
    /// Replay speed (arrival times are divided by it).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// DRAM cache per prefill instance, tokens.
    #[arg(long, default_value = "3e6", value_parser = parse_tokens)]
    cache_tokens: u64,
    /// Nominal NIC bandwidth per node, Gbit/s.
    #[arg(long, default_value_t = 800.0)]
    nic_gbps: f64,
    /// NIC efficiency (effective / nominal bandwidth; Fig. 12: 0.87 on 4×200 Gbps).
    #[arg(long, default_value_t = 0.87)]
    nic_efficiency: f64,
    /// Algorithm 1's kvcache_balancing_threshold (default: compare fetch and local per instance).
    #[arg(long)]
    balancing_threshold: Option<f64>,
    /// Do not keep fetched prefixes on the fetching instance (no hot-block replication).
    #[arg(long)]
    no_replicate: bool,
    /// Decode nodes refuse, after prefill, requests that do not fit or break the TBT SLO.
    #[arg(long)]
    decode_check: bool,
    /// Override every request's output length.
    #[arg(long)]
    force_output: Option<u32>,
    /// Override a cost-model constant, e.g. `--cost decode_c1=4e-3` (repeatable; names as in
    /// `mooncake_scheduler::CostModel`).
    #[arg(long, value_name = "NAME=VALUE")]
    cost: Vec<String>,
    /// vllm: number of coupled instances (default: prefill + decode).
    #[arg(long)]
    instances: Option<u32>,
    /// vllm: HBM prefix cache per instance, tokens (0: off).
    #[arg(long, default_value = "0", value_parser = parse_tokens)]
    prefix_cache_tokens: u64,
    /// vllm: chunked prefill with this many tokens per iteration.
    #[arg(long)]
    chunked_prefill: Option<u32>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Write per-request CSV, summary JSON and PNG plots (or experiment results) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the paper's experiments instead of a single replay: fig5, fig9, fig10, fig11,
    /// fig13, fig15, overload, comma-separated, or `all`.
    #[arg(long, value_delimiter = ',', value_parser = parse_experiment)]
    experiment: Vec<Vec<Experiment>>,
    /// Experiments: also run them on every standard variant of the trace (`mooncake trace
    /// transform --standard-variants`) and write variants.md / variants.json.
    #[arg(long)]
    variants: bool,
    /// Experiments: seed of the variants.
    #[arg(long, default_value_t = 1)]
    variant_seed: u64,
    /// Whose paper numbers to compare with (default: guessed from the trace file name).
    #[arg(long)]
    workload: Option<Workload>,
    /// Experiments: replay speed of fig5 (default: the speed at which the trace offers the
    /// conversation trace's prefill work at 1×).
    #[arg(long)]
    fig5_speed: Option<f64>,
    /// Experiments: prefill instances of fig5, fig11 and fig13 (of 16; default 8).
    #[arg(long)]
    fig5_prefill: Option<u32>,
    /// Experiments: replay speed of fig11, fig13 and fig15 (default 1).
    #[arg(long)]
    fig15_speed: Option<f64>,
    /// Experiments: replay speed of the overload experiment (default 2).
    #[arg(long)]
    overload_speed: Option<f64>,
    /// Experiments: prefill instances of the overload experiment (of 16; default 8).
    #[arg(long)]
    overload_prefill: Option<u32>,
    /// Experiments: NIC speeds of the fig13 sweep, Gbit/s (comma-separated).
    #[arg(long, value_delimiter = ',')]
    fig13_gbps: Vec<f64>,
}

fn base_config(a: &SimulateArgs) -> anyhow::Result<SimConfig> {
    let mut cfg = SimConfig::default();
    cfg.speed = a.speed;
    cfg.cache_tokens = a.cache_tokens;
    cfg.replicate = !a.no_replicate;
    cfg.decode_check = a.decode_check;
    cfg.force_output = a.force_output;
    let c = &mut cfg.conductor;
    c.prefill_instances = a.prefill;
    c.decode_instances = a.decode;
    c.admission = a.admission;
    c.ttft_slo_s = a.ttft_slo;
    c.tbt_slo_s = a.tbt_slo / 1000.0;
    c.balancing_threshold = a.balancing_threshold;
    c.cost = c.cost.clone().with_nic_gbps(a.nic_gbps, a.nic_efficiency);
    c.cost = override_cost(&c.cost, &a.cost)?;
    if a.policy == "vllm" {
        let mut v = CoupledConfig::default();
        v.instances = a.instances.unwrap_or(a.prefill + a.decode);
        v.prefix_cache_tokens = a.prefix_cache_tokens;
        v.chunk_tokens = a.chunked_prefill;
        cfg.coupled = Some(v);
    } else {
        c.policy = a.policy.parse::<Policy>()?;
    }
    if a.speed.is_nan() || a.speed <= 0.0 {
        bail!("--speed must be positive");
    }
    if !(a.nic_gbps > 0.0 && a.nic_efficiency > 0.0) {
        bail!("--nic-gbps and --nic-efficiency must be positive");
    }
    Ok(cfg)
}

/// Applies `NAME=VALUE` overrides to a cost model (through its serde form, so every field is
/// reachable and unknown names are refused).
fn override_cost(
    cost: &mooncake_scheduler::CostModel,
    overrides: &[String],
) -> anyhow::Result<mooncake_scheduler::CostModel> {
    let mut v = serde_json::to_value(cost)?;
    for o in overrides {
        let Some((k, val)) = o.split_once('=') else {
            bail!("--cost expects NAME=VALUE, got `{o}`");
        };
        let map = v.as_object_mut().context("cost model is an object")?;
        let Some(slot) = map.get_mut(k.trim()) else {
            bail!(
                "unknown cost constant `{k}` (expected one of: {})",
                map.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        *slot = serde_json::from_str(val.trim())
            .with_context(|| format!("--cost {k}: `{val}` is not a number"))?;
    }
    Ok(serde_json::from_value(v)?)
}

/// Runs `mooncake simulate`.
pub(crate) fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let trace = Trace::from_path(&a.trace)?;
    if !a.experiment.is_empty() {
        let list: Vec<Experiment> = a.experiment.iter().flatten().copied().collect();
        return experiments(&a, &list, &trace);
    }
    if a.variants {
        bail!("--variants needs --experiment");
    }
    let cfg = base_config(&a)?;
    let mut cfg = cfg;
    if a.out.is_some() && cfg.coupled.is_none() {
        cfg.load_sample_s = 1.0;
    }
    let conductor = Conductor::new(cfg.conductor.clone())?;
    let total = trace.requests.len() as u64;
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{elapsed} [{bar:40}] {pos}/{len} requests")
            .context("progress template")?,
    );
    let start = Instant::now();
    let mut shown = false;
    let result = Simulator::new(cfg.clone(), &trace, conductor).run(&mut |done, _| {
        if !shown && start.elapsed().as_secs_f64() > 1.0 {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let wall = start.elapsed();
    tracing::info!(?wall, events = result.events, "replay done");
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result.summary)?);
    } else {
        print_summary(&a, &result, wall.as_secs_f64());
    }
    if let Some(dir) = &a.out {
        write_outputs(dir, &cfg, &result)?;
    }
    Ok(())
}

fn print_summary(a: &SimulateArgs, r: &SimResult, wall_s: f64) {
    let s = &r.summary;
    println!(
        "policy {}  {}  admission {}  speed {}×  (replayed in {:.2} s, {} events)",
        a.policy,
        if a.policy == "vllm" {
            format!("{} instances", a.instances.unwrap_or(a.prefill + a.decode))
        } else {
            format!("{}P{}D", a.prefill, a.decode)
        },
        a.admission,
        a.speed,
        wall_s,
        r.events
    );
    println!(
        "requests {}  completed {}  rejected {}",
        s.requests, s.completed, s.rejected
    );
    println!(
        "TTFT mean {:.2} s  p90 {:.2} s  SLO ({} s) met {:.1}%",
        s.mean_ttft_s,
        s.p90_ttft_s,
        a.ttft_slo,
        s.ttft_slo_attainment * 100.0
    );
    println!(
        "TBT mean {:.1} ms  SLO ({} ms) met {:.1}%   both SLOs {:.1}%",
        s.mean_tbt_ms,
        a.tbt_slo,
        s.tbt_slo_attainment * 100.0,
        r.effective_attainment * 100.0
    );
    println!(
        "token hit ratio {:.3}  prefill GPU {:.2} s/request  wasted prefill {:.1} s",
        s.token_hit_ratio, s.mean_prefill_gpu_s, s.wasted_prefill_s
    );
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

fn write_outputs(dir: &Path, cfg: &SimConfig, r: &SimResult) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from(
        "id,arrival_s,input_tokens,output_tokens,prefill,decode,rejected,prefill_start_s,\
         prefill_end_s,prefill_gpu_s,reused_tokens,fetched_tokens,kv_transfer_s,ttft_s,tbt_s,\
         end_s\n",
    );
    for x in &r.records {
        let _ = writeln!(
            csv,
            "{},{:.6},{},{},{},{},{},{},{},{:.6},{},{},{},{},{},{}",
            x.id,
            x.arrival_s,
            x.input_tokens,
            x.output_tokens,
            x.prefill.map_or(String::new(), |v| v.to_string()),
            x.decode.map_or(String::new(), |v| v.to_string()),
            match x.rejected {
                None => "",
                Some(mooncake_sim::sim::RejectStage::Arrival) => "arrival",
                Some(mooncake_sim::sim::RejectStage::Decode) => "decode",
            },
            opt(x.prefill_start_s),
            opt(x.prefill_end_s),
            x.prefill_gpu_s,
            x.reused_tokens,
            x.fetched_tokens,
            opt(x.kv_transfer_s),
            opt(x.ttft_s),
            opt(x.tbt_s),
            opt(x.end_s),
        );
    }
    write(&dir.join("requests.csv"), csv.as_bytes())?;
    write(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&r.summary)?.as_bytes(),
    )?;
    // TTFT CDF.
    let mut ttft: Vec<f64> = r.records.iter().filter_map(|x| x.ttft_s).collect();
    ttft.sort_by(f64::total_cmp);
    let n = ttft.len().max(1) as f64;
    let step = (ttft.len() / 400).max(1);
    let cdf: Vec<(f64, f64)> = ttft
        .iter()
        .enumerate()
        .step_by(step)
        .map(|(i, &t)| (t, (i + 1) as f64 / n))
        .collect();
    render(
        &Chart {
            title: "TTFT CDF".into(),
            x_label: "TTFT (s)".into(),
            y_label: "share of completed requests".into(),
            kind: ChartKind::Line { log_x: false },
            series: vec![Series {
                name: "TTFT".into(),
                points: cdf,
                reference: false,
            }],
        },
        &dir.join("ttft_cdf.png"),
    )?;
    // Effective request capacity vs TBT threshold (Figs. 1, 6, 7).
    let ttft_slo = cfg.conductor.ttft_slo_s;
    let cap: Vec<(f64, f64)> = (0..=100)
        .map(|k| {
            let x = k as f64 * 0.01;
            (x * 1000.0, r.capacity_at(ttft_slo, x) * 100.0)
        })
        .collect();
    render(
        &Chart {
            title: "Effective requests vs TBT threshold".into(),
            x_label: "TBT threshold (ms)".into(),
            y_label: "requests within TTFT SLO and threshold (%)".into(),
            kind: ChartKind::Line { log_x: false },
            series: vec![Series {
                name: "effective".into(),
                points: cap,
                reference: false,
            }],
        },
        &dir.join("tbt_capacity.png"),
    )?;
    if !r.load_series.is_empty() {
        let pick = |f: fn(&mooncake_sim::sim::LoadSample) -> f64| {
            r.load_series.iter().map(|s| (s.t_s, f(s))).collect()
        };
        render(
            &Chart {
                title: "Pool load over time".into(),
                x_label: "time (s)".into(),
                y_label: "load".into(),
                kind: ChartKind::Line { log_x: false },
                series: vec![
                    Series {
                        name: "prefill".into(),
                        points: pick(|s| s.prefill_load),
                        reference: false,
                    },
                    Series {
                        name: "decode".into(),
                        points: pick(|s| s.decode_load),
                        reference: false,
                    },
                ],
            },
            &dir.join("load.png"),
        )?;
    }
    eprintln!("wrote {}", dir.display());
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn render(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    plot::render(chart, path).with_context(|| format!("plotting {}", path.display()))
}

/// `fig5`, …, or `all`.
fn parse_experiment(s: &str) -> Result<Vec<Experiment>, String> {
    if s == "all" {
        return Ok(Experiment::ALL.to_vec());
    }
    s.parse::<Experiment>()
        .map(|e| vec![e])
        .map_err(|e| e.to_string())
}

fn experiment_options(a: &SimulateArgs) -> anyhow::Result<ExperimentOptions> {
    let mut opts = ExperimentOptions::default();
    opts.workload = a.workload.unwrap_or_else(|| {
        Workload::from_file_name(&a.trace.file_name().unwrap_or_default().to_string_lossy())
    });
    opts.base = base_config(a)?;
    if a.fig5_speed.is_some() {
        opts.fig5_speed = a.fig5_speed;
    }
    if let Some(v) = a.fig5_prefill {
        opts.fig5_prefill = v;
    }
    if let Some(v) = a.fig15_speed {
        opts.fig15_speed = v;
    }
    if let Some(v) = a.overload_speed {
        opts.overload_speed = v;
    }
    if let Some(v) = a.overload_prefill {
        opts.overload_prefill = v;
    }
    if !a.fig13_gbps.is_empty() {
        opts.fig13_gbps = a.fig13_gbps.clone();
    }
    Ok(opts)
}

/// Writes NAME.md, NAME.json and NAME[-k].png of a report into `dir`.
fn write_report(dir: &Path, report: &ExperimentReport) -> anyhow::Result<()> {
    let e = report.experiment;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(
        &dir.join(format!("{}.md", e.name())),
        report.markdown.as_bytes(),
    )?;
    write(
        &dir.join(format!("{}.json", e.name())),
        serde_json::to_string_pretty(&report.json)?.as_bytes(),
    )?;
    for (k, chart) in report.charts.iter().enumerate() {
        let name = if k == 0 {
            format!("{}.png", e.name())
        } else {
            format!("{}-{}.png", e.name(), k + 1)
        };
        render(chart, &dir.join(name))?;
    }
    Ok(())
}

fn experiments(a: &SimulateArgs, list: &[Experiment], trace: &Trace) -> anyhow::Result<()> {
    let Some(dir) = &a.out else {
        bail!("--experiment needs --out DIR");
    };
    let opts = experiment_options(a)?;
    let start = Instant::now();
    if a.variants {
        let name = a
            .trace
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let results = run_on_variants(trace, &name, &opts, list, a.variant_seed, &mut |n| {
            eprintln!("running on {n} ({:.0} s)", start.elapsed().as_secs_f64());
        })?;
        for t in &results {
            for r in &t.reports {
                write_report(&dir.join(&t.name), r)?;
            }
        }
        let md = variants_markdown(&results);
        write(&dir.join("variants.md"), md.as_bytes())?;
        write(
            &dir.join("variants.json"),
            serde_json::to_string_pretty(&results)?.as_bytes(),
        )?;
        print!("{md}");
        return Ok(());
    }
    for &e in list {
        let t0 = Instant::now();
        let report = run_experiment(e, trace, &opts)?;
        tracing::info!(elapsed = ?t0.elapsed(), experiment = e.name(), "experiment done");
        write_report(dir, &report)?;
        print!("{}", report.markdown);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_overrides_by_name() {
        let c = mooncake_scheduler::CostModel::default();
        let o =
            override_cost(&c, &["decode_c1=4e-3".into(), " vram_tokens = 1000".into()]).unwrap();
        assert_eq!(o.decode_c1, 4e-3);
        assert_eq!(o.vram_tokens, 1000);
        assert_eq!(o.decode_c0, c.decode_c0);
        assert!(override_cost(&c, &["nope=1".into()]).is_err());
        assert!(override_cost(&c, &["decode_c1".into()]).is_err());
        assert!(override_cost(&c, &["decode_c1=x".into()]).is_err());
    }

    #[test]
    fn experiment_lists() {
        assert_eq!(parse_experiment("all").unwrap(), Experiment::ALL.to_vec());
        assert_eq!(parse_experiment("fig13").unwrap(), vec![Experiment::Fig13]);
        assert!(parse_experiment("fig12").is_err());
    }
}
