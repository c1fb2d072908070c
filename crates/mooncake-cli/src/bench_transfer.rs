//! `mooncake bench transfer`: Mooncake's `transfer_engine_bench`, with a raw-socket baseline
//! measured in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mooncake::{
    EmbeddedMetadataStore, LocalBuffer, MemorySegment, MetadataStore, Opcode, TransferEngine,
    TransferRequest,
};
use serde::Serialize;

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Op {
    /// Pull from the target.
    Read,
    /// Push to the target.
    Write,
}

/// Which side(s) this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Target and initiator in one process, over loopback, embedded metadata.
    Both,
    /// Register a buffer and serve it until killed (or for `--duration`).
    Target,
    /// Drive transfers against `--segment`.
    Initiator,
}

/// Arguments of `mooncake bench transfer`.
#[derive(Debug, Clone, Args)]
pub(crate) struct TransferArgs {
    /// Operation.
    #[arg(long, value_enum, default_value_t = Op::Write)]
    op: Op,
    /// Bytes per request (accepts K, M, G suffixes: 64K, 1M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    block_size: u64,
    /// Requests per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Initiator threads, each submitting its own batches.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to run (after a short warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Transport.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Which side(s) to run.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    role: Role,
    /// Metadata URL for separate target/initiator processes (empty: embedded).
    #[arg(long, default_value = "")]
    metadata: String,
    /// Segment name of the target (initiator role) or of this target (target role).
    #[arg(long, default_value = "bench-target")]
    segment: String,
    /// Host name or IP to publish (target role).
    #[arg(long, default_value = "127.0.0.1")]
    hostname: String,
    /// TCP connections per peer (and, with --baseline, the pump's connection count).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Also measure a baseline in the same run: for tcp a plain socket pump over `--conns`
    /// connections (and a ping-pong for batch 1); for rdma perftest's `ib_write_bw` /
    /// `ib_read_bw` on `--rdma-device`; for nvlink_intra with device memory the matching
    /// CUDA copy (pinned H2D/D2H, peer copy) in this process. Roles both and initiator.
    #[arg(long)]
    baseline: bool,
    /// RDMA device for the perftest baseline (default: the first of `MC_RDMA_NICS`, else the
    /// first device in /sys/class/infiniband).
    #[arg(long)]
    rdma_device: Option<String>,
    /// Skip the end-of-run byte verification.
    #[arg(long)]
    no_verify: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Sweep block sizes 4K…4M for read and write (role both, with the baseline), print a
    /// table and write `transfer_sweep.{jsonl,png,md}` into `--out`.
    #[arg(long)]
    sweep: bool,
    /// Output directory of `--sweep`.
    #[arg(long, default_value = "bench-out")]
    out: std::path::PathBuf,
    /// Cluster secret of the engines (role both): `env` (MC_CLUSTER_SECRET_FILE /
    /// MC_CLUSTER_SECRET), `off`, `on` (a random one for this run), or `both`: the run
    /// without and with one, alternated twice, with the ratios and the connection setup
    /// time (a fresh initiator's first 4 KiB write) of each.
    #[arg(long, value_enum, default_value_t = crate::metadata::AuthMode::Env)]
    auth: crate::metadata::AuthMode,
    /// Runs of `--auth both` (off and on alternated; the median of each side is compared).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// The engines' cluster secret for this run: `None` keeps the environment's.
    #[arg(skip)]
    secret: Option<Option<mooncake_core::ClusterSecret>>,
    /// Where the initiator's buffer lives: `cpu` or `cuda:N` (feature `cuda`).
    #[arg(long, default_value = "cpu")]
    location: String,
    /// Where the target's buffer lives: `cpu` or `cuda:N` (feature `cuda`).
    #[arg(long, default_value = "cpu")]
    target_location: String,
    /// Host buffers are page-locked (`cuMemHostAlloc`, feature `cuda`); always so with
    /// `--protocol nvlink_intra`.
    #[arg(long)]
    pinned: bool,
    /// Encrypt the TCP data path with TLS 1.3 (as `MC_TCP_TLS=1`); `--baseline` stays the
    /// unencrypted pump, so the ratio is the cost of encryption.
    #[arg(long)]
    tls: bool,
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 4096, 64K, 1M)"))?;
    n.checked_mul(mul)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is not a positive size"))
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    op: Op,
    protocol: String,
    block_size: u64,
    batch_size: usize,
    threads: usize,
    conns: usize,
    bytes: u64,
    seconds: f64,
    gb_per_s: f64,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    verified: bool,
    location: String,
    target_location: String,
    tls: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ratio: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn fill_random(buf: &BenchBuf, seed: u64) -> anyhow::Result<()> {
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < buf.len() {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = chunk.len().min(buf.len() - off);
        buf.write_at(off, &chunk[..n])?;
        off += n;
    }
    Ok(())
}

/// Where engines of this run publish: one shared store, or (with `P2PHANDSHAKE`) a
/// handshake port per engine, whose `host:port` becomes the engine's name.
enum Metadata {
    Shared(Arc<dyn MetadataStore>),
    P2p,
}

impl Metadata {
    fn open(args: &TransferArgs, fresh_embedded: bool) -> anyhow::Result<Self> {
        let url = args.metadata.trim();
        Ok(if url.eq_ignore_ascii_case("P2PHANDSHAKE") {
            Self::P2p
        } else if url.is_empty() && fresh_embedded {
            Self::Shared(Arc::new(EmbeddedMetadataStore::new()))
        } else {
            Self::Shared(mooncake::open_metadata(url)?)
        })
    }

    /// An engine called `name` (ignored with P2P) with the run's transport.
    fn engine(&self, name: &str, args: &TransferArgs) -> anyhow::Result<TransferEngine> {
        let mut b = match self {
            Self::Shared(md) => TransferEngine::builder(name)
                .with_metadata(md.clone())
                .with_hostname(&args.hostname),
            Self::P2p => {
                let store = Arc::new(mooncake::metadata::P2pHandshakeStore::bind(
                    &args.hostname,
                    0,
                    match &args.secret {
                        Some(s) => {
                            mooncake::metadata::P2pConfig::default().with_cluster_secret(s.clone())
                        }
                        None => mooncake::metadata::P2pConfig::default(),
                    },
                )?);
                mooncake::p2p_engine_builder(&store)
            }
        };
        let tcp = || {
            let c = mooncake::tcp::TcpConfig::new().with_conns_per_path(args.conns);
            if args.tls { c.with_tls(true) } else { c }
        };
        match args.protocol.as_str() {
            "tcp" => b = b.with_transport(tcp()),
            // Same-host device memory over CUDA IPC; TCP for what IPC does not reach.
            "nvlink_intra" => {
                b = b
                    .with_boxed_transport(mooncake::transport_builder("nvlink_intra")?)
                    .with_transport(tcp())
            }
            other => b = b.with_boxed_transport(mooncake::transport_builder(other)?),
        }
        if let Some(secret) = &args.secret {
            b = b.with_cluster_secret(secret.clone());
        }
        Ok(b.build()?)
    }
}

pub(crate) fn run(args: TransferArgs) -> anyhow::Result<()> {
    // Device memory over any transport (TCP stages it through pinned chunks).
    #[cfg(feature = "cuda")]
    mooncake::cuda::install();
    args.location()?;
    args.target_location()?;
    if args.sweep {
        return sweep(&args);
    }
    ensure!(
        args.batch_size > 0 && args.threads > 0,
        "--batch-size and --threads must be positive"
    );
    ensure!(args.duration > 0.0, "--duration must be positive");
    let region = args
        .block_size
        .checked_mul(args.batch_size as u64)
        .and_then(|v| v.checked_mul(args.threads as u64))
        .filter(|&v| v <= 8 << 30)
        .context("threads × batch × block must be at most 8 GiB")?;
    let mut args = args;
    match args.auth {
        crate::metadata::AuthMode::Env => {}
        crate::metadata::AuthMode::Off => args.secret = Some(None),
        crate::metadata::AuthMode::On => {
            args.secret = Some(Some(crate::metadata::random_secret()?))
        }
        crate::metadata::AuthMode::Both => {
            ensure!(args.role == Role::Both, "--auth both needs --role both");
            return auth_both(&args, region);
        }
    }
    match args.role {
        Role::Target => run_target(&args, region),
        Role::Initiator => {
            let md = Metadata::open(&args, false)?;
            let init = md.engine(&format!("bench-initiator-{}", std::process::id()), &args)?;
            let mut report = drive(&args, &init, &args.segment, None)?;
            drop(init);
            if args.baseline {
                baseline(&args, &mut report)?;
            }
            print_report(&args, &report)
        }
        Role::Both => {
            let report = run_both(&args, region)?;
            print_report(&args, &report)
        }
    }
}

fn run_both(args: &TransferArgs, region: u64) -> anyhow::Result<Report> {
    let md = Metadata::open(args, true)?;
    let target = md.engine(&args.segment, args)?;
    let tbuf = BenchBuf::new(&args.target_location()?, region as usize, args.pinned())?;
    target.register(tbuf.segment())?;
    let init = md.engine("bench-initiator", args)?;
    let mut report = drive(args, &init, target.local_name(), Some(&tbuf))?;
    drop(init);
    drop(target);
    if args.baseline {
        baseline(args, &mut report)?;
    }
    Ok(report)
}

/// A fresh initiator's first write of 4 KiB to `target` (connect, hello, and the proof of
/// the cluster secret when one is set): the wall time of each of `n`, sorted, in µs.
fn setup_times(
    md: &Metadata,
    args: &TransferArgs,
    target: &str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for i in 0..n {
        let init = md.engine(&format!("bench-setup-{i}"), args)?;
        let local = Arc::new(LocalBuffer::new(4096)?);
        init.register(local.clone())?;
        let handle = init.open_segment_blocking(target)?;
        let addr = init.segment(handle)?.descriptor().buffers[0].addr;
        let t = Instant::now();
        init.transfer_sync_write(target, local.base(), addr, 4096)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// `--auth both`: the run without and with a cluster secret, alternated (off, on, off, on, …:
/// `--rounds` runs), each with the setup time of fresh initiators; prints the ratios of the
/// medians on/off.
fn auth_both(args: &TransferArgs, region: u64) -> anyhow::Result<()> {
    let secret = crate::metadata::random_secret()?;
    let mut rows: Vec<(bool, Report, Vec<f64>)> = Vec::new();
    ensure!(args.rounds >= 2, "--rounds must be at least 2");
    let with = |on: bool| {
        let mut a = args.clone();
        a.secret = Some(on.then(|| secret.clone()));
        a
    };
    // Throughput and latency first, then (in separate rounds) the setup of 50 fresh
    // initiators each: their teardown would otherwise overlap the next round's transfers.
    // A pause between rounds lets the last round's engines finish stopping.
    for round in 0..args.rounds {
        let on = round % 2 == 1;
        let a = with(on);
        let md = Metadata::open(&a, true)?;
        let target = md.engine(&a.segment, &a)?;
        let tbuf = BenchBuf::new(&a.target_location()?, region.max(4096) as usize, a.pinned())?;
        target.register(tbuf.segment())?;
        let init = md.engine("bench-initiator", &a)?;
        let report = drive(&a, &init, target.local_name(), Some(&tbuf))?;
        drop(init);
        drop(target);
        std::thread::sleep(Duration::from_millis(300));
        eprintln!(
            "auth {}: {:.3} GB/s, batch p50 {:.1} µs, p99 {:.1} µs",
            if on { "on " } else { "off" },
            report.gb_per_s,
            report.p50_us,
            report.p99_us,
        );
        rows.push((on, report, Vec::new()));
    }
    for (round, row) in rows.iter_mut().enumerate() {
        let a = with(row.0);
        let md = Metadata::open(&a, true)?;
        let target = md.engine(&a.segment, &a)?;
        target.register(Arc::new(LocalBuffer::new(region.max(4096) as usize)?))?;
        row.2 = setup_times(&md, &a, target.local_name(), 50)?;
        drop(target);
        std::thread::sleep(Duration::from_millis(300));
        eprintln!(
            "auth {} setup round {round}: p50 {:.1} µs",
            if row.0 { "on " } else { "off" },
            percentile(&row.2, 0.5)
        );
    }
    let median = |on: bool, f: &dyn Fn(&Report, &[f64]) -> f64| {
        let mut v: Vec<f64> = rows
            .iter()
            .filter(|r| r.0 == on)
            .map(|r| f(&r.1, &r.2))
            .collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let gbs = |r: &Report, _: &[f64]| r.gb_per_s;
    let p50 = |r: &Report, _: &[f64]| r.p50_us;
    let p99 = |r: &Report, _: &[f64]| r.p99_us;
    let setup = |_: &Report, s: &[f64]| percentile(s, 0.5);
    let line = |what: &str, f: &dyn Fn(&Report, &[f64]) -> f64, unit: &str| {
        let (off, on) = (median(false, f), median(true, f));
        println!(
            "{what:<22} off {off:>10.3} {unit:<5} on {on:>10.3} {unit:<5} on/off {:.3}",
            on / off
        );
        on / off
    };
    println!(
        "{} {:?} block={} batch={} threads={} conns={}: cluster secret off vs on (median of {} runs each)",
        args.protocol,
        args.op,
        args.block_size,
        args.batch_size,
        args.threads,
        args.conns,
        args.rounds / 2
    );
    let r_gbs = line("throughput", &gbs, "GB/s");
    let r_p50 = line("batch latency p50", &p50, "µs");
    let r_p99 = line("batch latency p99", &p99, "µs");
    let r_setup = line("setup (first 4 KiB) p50", &setup, "µs");
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "protocol": args.protocol,
                "block_size": args.block_size,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "gb_per_s_ratio": r_gbs,
                "p50_ratio": r_p50,
                "p99_ratio": r_p99,
                "setup_p50_ratio": r_setup,
                "setup_p50_us_off": median(false, &setup),
                "setup_p50_us_on": median(true, &setup),
            })
        );
    }
    Ok(())
}

/// Block sizes of `--sweep`.
const SWEEP_BLOCKS: [u64; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

fn sweep(args: &TransferArgs) -> anyhow::Result<()> {
    use mooncake_sim::experiments::{Chart, ChartKind, Series};
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut reports = Vec::new();
    let mut table = String::from(
        "| op | block | batch | conns | GB/s | pump GB/s | ratio |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for op in [Op::Write, Op::Read] {
        for block in SWEEP_BLOCKS {
            let mut a = args.clone();
            a.op = op;
            a.block_size = block;
            a.baseline = true;
            a.role = Role::Both;
            let region = block * a.batch_size as u64 * a.threads as u64;
            let r = run_both(&a, region)?;
            let line = format!(
                "| {:?} | {} | {} | {} | {:.3} | {:.3} | {:.2} |",
                op,
                human(block),
                r.batch_size,
                r.conns,
                r.gb_per_s,
                r.baseline_gb_per_s.unwrap_or(0.0),
                r.ratio.unwrap_or(0.0)
            );
            eprintln!("{line}");
            table.push_str(&line);
            table.push('\n');
            reports.push(r);
        }
    }
    let jsonl: String = reports
        .iter()
        .map(|r| serde_json::to_string(r).expect("report serialises") + "\n")
        .collect();
    std::fs::write(args.out.join("transfer_sweep.jsonl"), jsonl)?;
    std::fs::write(args.out.join("transfer_sweep.md"), &table)?;
    let series = |op: Op, base: bool| Series {
        name: format!(
            "{} {:?}",
            if base { "socket pump" } else { "mooncake-rs" },
            op
        )
        .to_lowercase(),
        points: reports
            .iter()
            .filter(|r| r.op == op)
            .map(|r| {
                (
                    r.block_size as f64 / 1024.0,
                    if base {
                        r.baseline_gb_per_s.unwrap_or(0.0)
                    } else {
                        r.gb_per_s
                    },
                )
            })
            .collect(),
        reference: base,
    };
    let chart = Chart {
        title: format!(
            "TCP loopback, batch {}, {} thread(s), {} conns",
            args.batch_size, args.threads, args.conns
        ),
        x_label: "block size (KiB)".into(),
        y_label: "GB/s".into(),
        kind: ChartKind::Line { log_x: true },
        series: vec![
            series(Op::Write, false),
            series(Op::Write, true),
            series(Op::Read, false),
            series(Op::Read, true),
        ],
    };
    let png = args.out.join("transfer_sweep.png");
    mooncake_sim::plot::render(&chart, &png)?;
    print!("{table}");
    println!("wrote {}", png.display());
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

fn run_target(args: &TransferArgs, region: u64) -> anyhow::Result<()> {
    let md = Metadata::open(args, false)?;
    let target = md.engine(&args.segment, args)?;
    let buf = BenchBuf::new(&args.target_location()?, region as usize, args.pinned())?;
    fill_random(&buf, 0x5eed)?;
    target.register(buf.segment())?;
    // The initiator passes this name as --segment (with P2PHANDSHAKE it is host:port).
    println!("segment {}", target.local_name());
    eprintln!(
        "target {:?} serving {region} bytes; Ctrl-C to stop",
        target.local_name()
    );
    std::thread::sleep(Duration::from_secs_f64(args.duration.max(1.0) * 1000.0));
    Ok(())
}

/// Writes (`write`) or checks the stamp of pass `pass` at the start of every 4 KiB page of
/// `range` in `buf`.
fn stamp_pages(
    buf: &LocalBuffer,
    range: std::ops::Range<u64>,
    pass: u64,
    write: bool,
) -> anyhow::Result<()> {
    for page in range.step_by(4096) {
        let want = (pass.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ page).to_le_bytes();
        let n = want.len().min((buf.len() as u64 - page) as usize);
        if write {
            buf.write_at(page as usize, &want[..n])?;
        } else {
            let mut got = [0u8; 8];
            buf.read_at(page as usize, &mut got[..n])?;
            ensure!(
                got[..n] == want[..n],
                "verification failed in pass {pass}: the page at offset {page} holds stale bytes"
            );
        }
    }
    Ok(())
}

/// Runs the initiator threads against `segment`; `target_buf` (role both) lets the run
/// verify every pass (a new stamp in every page) and every byte at the end.
fn drive(
    args: &TransferArgs,
    init: &TransferEngine,
    segment: &str,
    target_buf: Option<&BenchBuf>,
) -> anyhow::Result<Report> {
    let handle = init.open_segment_blocking(segment)?;
    let remote = init.segment(handle)?;
    let rbuf = remote
        .descriptor()
        .buffers
        .first()
        .context("the target published no buffer")?
        .clone();
    let region = args.block_size * args.batch_size as u64 * args.threads as u64;
    ensure!(
        rbuf.length >= region,
        "the target's buffer has {} bytes; this run needs {region}",
        rbuf.length
    );
    let local = BenchBuf::new(&args.location()?, region as usize, args.pinned())?;
    init.register(local.segment())?;
    let target_location = rbuf.name.clone();

    let verify = !args.no_verify && target_buf.is_some();
    if let Some(t) = target_buf {
        match args.op {
            Op::Write => fill_random(&local, 0xabcdef)?,
            Op::Read => fill_random(t, 0x123456)?,
        }
    }

    let opcode = match args.op {
        Op::Read => Opcode::Read,
        Op::Write => Opcode::Write,
    };
    let per_thread = args.block_size * args.batch_size as u64;
    let requests = |t: usize| -> Vec<TransferRequest> {
        (0..args.batch_size)
            .map(|i| {
                let off = t as u64 * per_thread + i as u64 * args.block_size;
                TransferRequest {
                    opcode,
                    source: local.base() + off,
                    target_id: handle,
                    target_offset: rbuf.addr + off,
                    length: args.block_size,
                }
            })
            .collect()
    };

    // Warm-up: every thread's batch once (connects, faults pages in).
    for t in 0..args.threads {
        init.submit_batch(&requests(t))?
            .wait_blocking(None)
            .context("warm-up batch failed")?;
    }

    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(args.threads + 1));
    let duration = Duration::from_secs_f64(args.duration);
    let (results, seconds): (Vec<anyhow::Result<Vec<f64>>>, f64) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.threads)
            .map(|t| {
                let reqs = requests(t);
                let (bytes, stop, barrier) = (bytes.clone(), stop.clone(), barrier.clone());
                let (local, target) = (&local, target_buf);
                s.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let mut lat = Vec::new();
                    // Every pass writes a new stamp into each 4 KiB page of the source and
                    // checks it at the destination once the batch completed, so a stale or
                    // dropped slice is caught in the pass it happens.
                    // Device buffers are checked at the end only (the CPU cannot stamp them).
                    let stamp =
                        target.is_some_and(|t| t.host().is_some()) && local.host().is_some();
                    let (src, dst) = match (verify && stamp, opcode) {
                        (true, Opcode::Write) => (local.host(), target.and_then(BenchBuf::host)),
                        (true, Opcode::Read) => (target.and_then(BenchBuf::host), local.host()),
                        _ => (None, None),
                    };
                    let range = t as u64 * per_thread..(t as u64 + 1) * per_thread;
                    barrier.wait();
                    let mut pass = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        pass += 1;
                        if let Some(src) = src {
                            stamp_pages(src, range.clone(), pass, true)?;
                        }
                        let t0 = Instant::now();
                        init.submit_batch(&reqs)?.wait_blocking(None)?;
                        lat.push(t0.elapsed().as_secs_f64() * 1e6);
                        if let Some(dst) = dst {
                            stamp_pages(dst, range.clone(), pass, false)?;
                        }
                        bytes.fetch_add(per_thread, Ordering::Relaxed);
                    }
                    Ok(lat)
                })
            })
            .collect();
        let pb = ProgressBar::new(duration.as_millis() as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} [{bar:30}] {msg}")
                .expect("valid template"),
        );
        barrier.wait();
        let start = Instant::now();
        while start.elapsed() < duration && !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            let secs = start.elapsed().as_secs_f64();
            pb.set_position(start.elapsed().as_millis() as u64);
            pb.set_message(format!(
                "{:.2} GB/s",
                bytes.load(Ordering::Relaxed) as f64 / secs / 1e9
            ));
        }
        stop.store(true, Ordering::Relaxed);
        pb.finish_and_clear();
        let results = workers
            .into_iter()
            .map(|w| w.join().expect("bench thread panicked"))
            .collect();
        (results, start.elapsed().as_secs_f64())
    });
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    let total = bytes.load(Ordering::Relaxed);
    lat.sort_by(f64::total_cmp);

    let mut verified = false;
    if verify {
        let t = target_buf.expect("verify implies a target buffer");
        let (want, got) = match args.op {
            Op::Write => (local.to_vec()?, t.to_vec()?),
            Op::Read => (t.to_vec()?, local.to_vec()?),
        };
        if let Some(i) = want[..region as usize]
            .iter()
            .zip(&got[..region as usize])
            .position(|(a, b)| a != b)
        {
            bail!("verification failed: first differing byte at offset {i} of {region}");
        }
        verified = true;
    }
    init.unregister_memory(local.base())?;
    let _ = init.close_segment(handle);
    Ok(Report {
        op: args.op,
        protocol: args.protocol.clone(),
        block_size: args.block_size,
        batch_size: args.batch_size,
        threads: args.threads,
        conns: args.conns,
        bytes: total,
        seconds,
        gb_per_s: total as f64 / seconds / 1e9,
        ops_per_sec: (total / args.block_size) as f64 / seconds,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        verified,
        location: args.location.clone(),
        target_location,
        tls: args.protocol == "tcp" && (args.tls || mooncake::tcp::TcpConfig::new().tls),
        baseline_kind: None,
        baseline_gb_per_s: None,
        ratio: None,
        baseline_p50_us: None,
        baseline_p99_us: None,
        p50_ratio: None,
    })
}

/// A plain TCP pump over `--conns` connections moving `--block-size` writes in the
/// direction of the data (client→server for write, server→client for read), then a
/// ping-pong of one request and one block, as a bare socket would do it.
fn baseline(args: &TransferArgs, report: &mut Report) -> anyhow::Result<()> {
    if args.protocol == "rdma" {
        let gbps = perftest_baseline(args)?;
        report.baseline_kind = Some("perftest".into());
        report.baseline_gb_per_s = Some(gbps);
        report.ratio = Some(report.gb_per_s / gbps);
        return Ok(());
    }
    let device = |l: &str| l.parse::<mooncake::Location>().is_ok_and(|l| !l.is_host());
    if args.protocol != "tcp" && (device(&report.location) || device(&report.target_location)) {
        return cuda_baseline(args, report);
    }
    report.baseline_kind = Some(format!("socket pump ({} conns)", args.conns));
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let block = args.block_size as usize;
    let duration = Duration::from_secs_f64(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let conns = args.conns;
    // Each side cycles through a ring of at most 32 MiB (at least one block): large enough to
    // leave the cache, small enough to be faulted in before the clock starts.
    let ring = (args.batch_size * block).min(32 << 20).max(block) / block * block;
    let data_from_client = args.op == Op::Write;

    let gbps = std::thread::scope(|s| -> anyhow::Result<f64> {
        let server = s.spawn(|| -> anyhow::Result<()> {
            let mut hs = Vec::new();
            for _ in 0..conns {
                let (c, _) = listener.accept()?;
                c.set_nodelay(true)?;
                let (stop, moved) = (stop.clone(), moved.clone());
                hs.push(std::thread::spawn(move || {
                    pump_side(c, !data_from_client, block, ring, &stop, &moved)
                }));
            }
            for h in hs {
                let _ = h.join();
            }
            Ok(())
        });
        let mut clients = Vec::new();
        for _ in 0..conns {
            let c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let (stop, moved) = (stop.clone(), moved.clone());
            clients
                .push(s.spawn(move || pump_side(c, data_from_client, block, ring, &stop, &moved)));
        }
        // Warm up until every byte of every receiver's ring was written once (pages faulted
        // in), or 5 s at most.
        let warm = Instant::now();
        while moved.load(Ordering::Relaxed) < (conns * ring) as u64
            && warm.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let m0 = moved.load(Ordering::Relaxed);
        let t0 = Instant::now();
        std::thread::sleep(duration);
        let bytes = moved.load(Ordering::Relaxed) - m0;
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.join();
        }
        server.join().expect("pump server panicked")?;
        Ok(bytes as f64 / secs / 1e9)
    })?;
    ensure!(gbps > 0.0, "the socket pump moved no bytes");
    report.baseline_gb_per_s = Some(gbps);
    report.ratio = Some(report.gb_per_s / gbps);

    if args.batch_size != 1 {
        return Ok(());
    }
    // Ping-pong: the same bytes a batch-of-one transfer moves, request then reply.
    let (req_len, resp_len) = match args.op {
        Op::Write => (32 + block, 32),
        Op::Read => (32, 32 + block),
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let pp_time = duration.min(Duration::from_secs(3));
    let lat = std::thread::scope(|s| -> anyhow::Result<Vec<f64>> {
        s.spawn(|| -> anyhow::Result<()> {
            let (mut c, _) = listener.accept()?;
            c.set_nodelay(true)?;
            let mut req = vec![0u8; req_len];
            let resp = vec![1u8; resp_len];
            while c.read_exact(&mut req).is_ok() {
                c.write_all(&resp)?;
            }
            Ok(())
        });
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        let req = vec![2u8; req_len];
        let mut resp = vec![0u8; resp_len];
        let mut lat = Vec::new();
        let t0 = Instant::now();
        let mut i = 0u64;
        while t0.elapsed() < pp_time {
            let t = Instant::now();
            c.write_all(&req)?;
            c.read_exact(&mut resp)?;
            if i >= 100 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            i += 1;
        }
        drop(c);
        Ok(lat)
    })?;
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    let p50 = percentile(&lat, 0.5);
    report.baseline_p50_us = Some(p50);
    report.baseline_p99_us = Some(percentile(&lat, 0.99));
    report.p50_ratio = Some(report.p50_us / p50);
    Ok(())
}

/// The RDMA device perftest should use.
fn rdma_device(args: &TransferArgs) -> anyhow::Result<String> {
    if let Some(d) = &args.rdma_device {
        return Ok(d.clone());
    }
    let from_env = std::env::var("MC_RDMA_NICS")
        .ok()
        .and_then(|v| v.split(',').next().map(str::to_string));
    if let Some(d) = from_env.filter(|d| !d.is_empty()) {
        return Ok(d);
    }
    let mut devs: Vec<String> = std::fs::read_dir("/sys/class/infiniband")
        .context("no RDMA devices (/sys/class/infiniband is missing)")?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    devs.sort();
    devs.into_iter().next().context("no RDMA devices")
}

/// The GID index of an IPv4-mapped (RoCE v2) GID on port 1 of `dev`, else 0.
fn roce_gid_index(dev: &str) -> u32 {
    let dir = format!("/sys/class/infiniband/{dev}/ports/1/gids");
    let mut found: Vec<u32> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|g| g.starts_with("0000:0000:0000:0000:0000:ffff"))
        })
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    found.sort();
    found.first().copied().unwrap_or(0)
}

/// Runs `ib_write_bw` / `ib_read_bw` (server and client on this host, same device, same
/// message size) and returns their average bandwidth in GB/s.
fn perftest_baseline(args: &TransferArgs) -> anyhow::Result<f64> {
    use std::process::{Command, Stdio};
    let dev = rdma_device(args)?;
    let tool = match args.op {
        Op::Write => "ib_write_bw",
        Op::Read => "ib_read_bw",
    };
    let size = args.block_size.to_string();
    // Iteration mode, about 256 MiB per run: perftest's duration mode under-reports large
    // messages on soft-RoCE.
    let iters = ((256u64 << 20) / args.block_size)
        .clamp(100, 100_000)
        .to_string();
    let gid = roce_gid_index(&dev).to_string();
    let common = [
        "-d",
        dev.as_str(),
        "-x",
        gid.as_str(),
        "-s",
        size.as_str(),
        "-n",
        iters.as_str(),
        "-F",
        "--report_gbits",
    ];
    let mut server = Command::new(tool)
        .args(common)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool} (install perftest)"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let out = Command::new(tool).args(common).arg("127.0.0.1").output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out.with_context(|| format!("cannot run {tool}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Result line: "#bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]".
    let gbits = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[0] == size)
                .then(|| f[3].parse::<f64>().ok())
                .flatten()
        })
        .next_back()
        .with_context(|| {
            format!(
                "{tool} printed no result:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(gbits / 8.0)
}

fn pump_side(
    mut c: TcpStream,
    sender: bool,
    block: usize,
    ring: usize,
    stop: &AtomicBool,
    moved: &AtomicU64,
) {
    let mut buf = vec![0x5au8; ring];
    let mut off = 0;
    c.set_read_timeout(Some(Duration::from_millis(200))).ok();
    while !stop.load(Ordering::Relaxed) {
        let r = if sender {
            c.write(&buf[off..off + block])
        } else {
            c.read(&mut buf[off..off + block])
        };
        match r {
            Ok(0) => break,
            Ok(n) => {
                if !sender {
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                off = (off + block) % (ring - ring % block).max(block);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Both);
}

impl TransferArgs {
    fn location(&self) -> anyhow::Result<mooncake::Location> {
        parse_location(&self.location)
    }

    fn target_location(&self) -> anyhow::Result<mooncake::Location> {
        parse_location(&self.target_location)
    }

    /// Host buffers are page-locked: asked for, or the CUDA IPC transport is measured.
    fn pinned(&self) -> bool {
        self.pinned || self.protocol == "nvlink_intra"
    }
}

fn parse_location(s: &str) -> anyhow::Result<mooncake::Location> {
    let l: mooncake::Location = match s.trim() {
        "cpu" => mooncake::Location::Cpu(0),
        other => other.parse()?,
    };
    match l {
        mooncake::Location::Cpu(_) | mooncake::Location::Any => Ok(l),
        mooncake::Location::Cuda(_) if cfg!(feature = "cuda") => Ok(l),
        mooncake::Location::Cuda(_) => {
            bail!("location {s}: this build has no CUDA support (rebuild with --features cuda)")
        }
        mooncake::Location::Other(_) => bail!("location {s}: only cpu and cuda:N are supported"),
    }
}

/// A buffer of the benchmark: host memory (page-locked with `--pinned`) or device memory.
enum BenchBuf {
    Host(Arc<LocalBuffer>),
    #[cfg(feature = "cuda")]
    Pinned(Arc<mooncake::cuda::PinnedBuffer>),
    #[cfg(feature = "cuda")]
    Device(Arc<mooncake::cuda::CudaBuffer>),
}

impl BenchBuf {
    fn new(location: &mooncake::Location, len: usize, pinned: bool) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            if let mooncake::Location::Cuda(n) = location {
                return Ok(Self::Device(Arc::new(mooncake::cuda::alloc(*n, len)?)));
            }
            if pinned {
                return Ok(Self::Pinned(Arc::new(mooncake::cuda::pinned(len)?)));
            }
        }
        let _ = (location, pinned);
        Ok(Self::Host(Arc::new(LocalBuffer::new(len)?)))
    }

    fn segment(&self) -> Arc<dyn MemorySegment> {
        match self {
            Self::Host(b) => b.clone(),
            #[cfg(feature = "cuda")]
            Self::Pinned(b) => b.clone(),
            #[cfg(feature = "cuda")]
            Self::Device(b) => b.clone(),
        }
    }

    fn base(&self) -> u64 {
        self.segment().base()
    }

    fn len(&self) -> usize {
        self.segment().len()
    }

    /// The buffer, when the CPU may touch it (per-pass stamps).
    fn host(&self) -> Option<&LocalBuffer> {
        match self {
            Self::Host(b) => Some(b),
            #[cfg(feature = "cuda")]
            _ => None,
        }
    }

    fn write_at(&self, off: usize, data: &[u8]) -> anyhow::Result<()> {
        match self {
            Self::Host(b) => b.write_at(off, data)?,
            #[cfg(feature = "cuda")]
            Self::Pinned(b) => b.write_at(off, data)?,
            #[cfg(feature = "cuda")]
            Self::Device(b) => b.write_at(off, data)?,
        }
        Ok(())
    }

    fn to_vec(&self) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Self::Host(b) => b.to_vec(),
            #[cfg(feature = "cuda")]
            Self::Pinned(b) => b.to_vec(),
            #[cfg(feature = "cuda")]
            Self::Device(b) => b.to_vec()?,
        })
    }
}

/// The CUDA copy a transfer between these locations compares with, in this process, in
/// the direction of the data: pinned H2D or D2H `cuMemcpy`, a peer copy between two GPUs,
/// or a copy within one; same block size, a whole batch per stream synchronisation.
#[cfg(feature = "cuda")]
fn cuda_baseline(args: &TransferArgs, report: &mut Report) -> anyhow::Result<()> {
    let (from, to) = match args.op {
        Op::Write => (&report.location, &report.target_location),
        Op::Read => (&report.target_location, &report.location),
    };
    let (from, to) = (parse_location(from)?, parse_location(to)?);
    let len = (args.block_size * args.batch_size as u64).min(4 << 30) as usize;
    let src = BenchBuf::new(&from, len, true)?;
    let dst = BenchBuf::new(&to, len, true)?;
    fill_random(&src, 7)?;
    let kind = match (&from, &to) {
        (mooncake::Location::Cuda(a), mooncake::Location::Cuda(b)) if a != b => {
            format!("cuda peer copy {from} -> {to}")
        }
        (mooncake::Location::Cuda(_), mooncake::Location::Cuda(_)) => {
            format!("cuda device copy on {from}")
        }
        (mooncake::Location::Cuda(_), _) => format!("cuda pinned D2H {from} -> {to}"),
        (_, mooncake::Location::Cuda(_)) => format!("cuda pinned H2D {from} -> {to}"),
        _ => format!("cuda pinned host copy {from} -> {to}"),
    };
    let bps = mooncake::cuda::copy_bandwidth(
        &*dst.segment(),
        &*src.segment(),
        args.block_size as usize,
        Duration::from_secs_f64(args.duration),
    )?;
    ensure!(
        dst.to_vec()? == src.to_vec()?,
        "the baseline copy did not copy"
    );
    let gbps = bps / 1e9;
    report.baseline_kind = Some(kind);
    report.baseline_gb_per_s = Some(gbps);
    report.ratio = Some(report.gb_per_s / gbps);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_baseline(_: &TransferArgs, _: &mut Report) -> anyhow::Result<()> {
    bail!("the CUDA baseline needs a build with --features cuda")
}

fn print_report(args: &TransferArgs, r: &Report) -> anyhow::Result<()> {
    println!(
        "{}{} {} {} -> {} block={} batch={} threads={} conns={}: {:.3} GB/s, {:.0} ops/s, batch p50 {:.1} µs, p99 {:.1} µs{}",
        r.protocol,
        if r.tls { "+tls" } else { "" },
        match r.op {
            Op::Read => "read",
            Op::Write => "write",
        },
        r.location,
        r.target_location,
        r.block_size,
        r.batch_size,
        r.threads,
        r.conns,
        r.gb_per_s,
        r.ops_per_sec,
        r.p50_us,
        r.p99_us,
        if r.verified {
            ", all bytes verified"
        } else {
            ""
        }
    );
    if let (Some(b), Some(ratio)) = (r.baseline_gb_per_s, r.ratio) {
        println!(
            "baseline {}: {b:.3} GB/s → ratio {ratio:.2}",
            r.baseline_kind.as_deref().unwrap_or("")
        );
    }
    if let (Some(b), Some(ratio)) = (r.baseline_p50_us, r.p50_ratio) {
        println!("baseline ping-pong p50 {b:.1} µs → p50 ratio {ratio:.2}");
    }
    if args.json {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }
}
