//! `mooncake bench store` and `mooncake bench master`.
//!
//! `bench store` starts a master in this process (unless `--master`), one storage node per
//! replica (in this process by default; `--remote` runs each as `mooncake store-node` in
//! another process so the network path is measured; `--same-host` also runs it in another
//! process and attaches to its segment through shared memory), then puts every key and reads
//! every key back, verifying each value. `--baseline redis` runs the same SETs and GETs (same
//! value size, threads and batch, pipelined to the batch size) against a `redis-server` it
//! starts on a free loopback port, in the same run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mooncake::{LocalBuffer, MemorySegment};
use mooncake_store::rpc::{PutItem, Request, Response, RpcClient};
use mooncake_store::{
    MasterConfig, MasterServer, MountRequest, ReplicateConfig, ServerConfig, StoreClient,
    StoreConfig,
};
use serde::Serialize;

use crate::bench_transfer::parse_size;
use crate::store::build_engine;

/// What the run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Workload {
    /// Put every key, then get every key.
    PutGet,
    /// Put every key, then many `batch_is_exist` lookups shaped like vLLM's (a present
    /// prefix, then misses).
    ExistHeavy,
}

/// Which side(s) this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Put, then get.
    Both,
    /// Only put (another process reads).
    Prefill,
    /// Only get what a prefill process put.
    Decode,
}

/// The baseline to run in the same process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Baseline {
    /// `redis-server` on a free loopback port, driven with the redis crate's sync API.
    Redis,
}

/// Arguments of `mooncake bench store`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreBenchArgs {
    /// A running master (`host:port`); default: start one in this process.
    #[arg(long)]
    master: Option<String>,
    /// Metadata URL of the engines (default: the embedded master's HTTP metadata server;
    /// with --master, P2PHANDSHAKE).
    #[arg(long)]
    metadata: Option<String>,
    /// Bytes per value (K, M suffixes).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    value_size: u64,
    /// Keys (default: about 256 MiB of values, 256..20000 keys).
    #[arg(long)]
    keys: Option<usize>,
    /// Keys per batch call (1: single-key calls).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Replicas per key (one storage node each).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Storage node(s) in another process; this client attaches to its segment through
    /// shared memory (memcpy path).
    #[arg(long, conflicts_with = "remote")]
    same_host: bool,
    /// Storage node(s) in another process, reached over the network path.
    #[arg(long)]
    remote: bool,
    /// Workload.
    #[arg(long, value_enum, default_value_t = Workload::PutGet)]
    workload: Workload,
    /// Role, for two processes against one `--master`.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    role: Role,
    /// Baseline measured in the same run.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Keys per `batch_is_exist` call (exist-heavy).
    #[arg(long, default_value_t = 1024)]
    exist_batch: usize,
    /// Lookup rounds over all keys (exist-heavy).
    #[arg(long, default_value_t = 20)]
    exist_rounds: usize,
    /// Get passes over all keys.
    #[arg(long, default_value_t = 1)]
    get_rounds: usize,
    /// Transport.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// TCP connections per peer.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Key prefix (prefill and decode must agree).
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Phase {
    ops: u64,
    bytes: u64,
    busy_s: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Phase {
    fn gbps(&self) -> f64 {
        if self.busy_s > 0.0 {
            self.bytes as f64 / self.busy_s / 1e9
        } else {
            0.0
        }
    }
    fn ops_per_sec(&self) -> f64 {
        if self.busy_s > 0.0 {
            self.ops as f64 / self.busy_s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct Report {
    workload: Option<Workload>,
    mode: String,
    value_size: u64,
    keys: usize,
    batch_size: usize,
    threads: usize,
    replicas: u32,
    put_gb_per_s: f64,
    get_gb_per_s: f64,
    put_ops_per_sec: f64,
    get_ops_per_sec: f64,
    put_p50_us: f64,
    put_p99_us: f64,
    get_p50_us: f64,
    get_p99_us: f64,
    verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exist_keys_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exist_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memcpy_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    get_vs_memcpy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_put_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_get_gb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_put_ops_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_get_ops_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_put_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_get_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_exist_keys_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    put_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    get_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exist_ratio: Option<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The value of key `i`: a shared random body with `(i, page)` stamped at the start of every
/// 4 KiB page, so every key's bytes differ and a torn or foreign page is detected.
struct Values {
    body: Vec<u8>,
}

const STAMP_EVERY: usize = 4096;

impl Values {
    fn new(len: usize) -> Self {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let body = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Self { body }
    }

    fn stamp(i: u64, page: usize) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&i.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        s[8..].copy_from_slice(&((page as u64) << 32 | (i & 0xffff_ffff)).to_le_bytes());
        s
    }

    fn write_into(&self, i: u64, out: &mut [u8]) {
        out.copy_from_slice(&self.body);
        for (p, chunk) in out.chunks_mut(STAMP_EVERY).enumerate() {
            let s = Self::stamp(i, p);
            let n = chunk.len().min(16);
            chunk[..n].copy_from_slice(&s[..n]);
        }
    }

    fn make(&self, i: u64) -> Vec<u8> {
        let mut v = vec![0; self.body.len()];
        self.write_into(i, &mut v);
        v
    }

    fn check(&self, i: u64, got: &[u8]) -> anyhow::Result<()> {
        ensure!(
            got.len() == self.body.len(),
            "key {i}: {} bytes read, {} expected",
            got.len(),
            self.body.len()
        );
        for (p, (g, b)) in got
            .chunks(STAMP_EVERY)
            .zip(self.body.chunks(STAMP_EVERY))
            .enumerate()
        {
            let s = Self::stamp(i, p);
            let n = g.len().min(16);
            if g[..n] != s[..n] || g[n..] != b[n..] {
                bail!("key {i}: page {p} holds foreign or torn bytes");
            }
        }
        Ok(())
    }
}

/// A child process killed when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_store_node(
    master: &str,
    metadata: &str,
    segment: u64,
    socket: &std::path::Path,
    args: &StoreBenchArgs,
) -> anyhow::Result<(ChildGuard, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "store-node",
            "--master",
            master,
            "--metadata",
            metadata,
            "--segment-size",
            &segment.to_string(),
            "--socket",
            &socket.display().to_string(),
            "--protocol",
            &args.protocol,
            "--conns",
            &args.conns.to_string(),
            "--populate",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot spawn `mooncake store-node`")?;
    let out = child.stdout.take().context("store-node stdout")?;
    let guard = ChildGuard(child);
    let mut lines = BufReader::new(out).lines();
    let ready = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("store-node ready") => break l,
            Some(Ok(_)) => continue,
            _ => bail!("the store-node exited before it was ready"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((guard, ready))
}

/// Fields drop in order: nodes before the master (and its metadata server).
struct Cluster {
    master_addr: String,
    metadata: String,
    _nodes: Vec<StoreClient>,
    _children: Vec<ChildGuard>,
    _server: Option<MasterServer>,
    socket: Option<std::path::PathBuf>,
}

fn start_cluster(args: &StoreBenchArgs, keys: usize) -> anyhow::Result<Cluster> {
    let seg = (keys as u64 * args.value_size).div_ceil(1 << 20) * (1 << 20) * 5 / 4 + (64 << 20);
    let (server, master_addr, metadata) = match &args.master {
        Some(m) => (
            None,
            m.clone(),
            args.metadata
                .clone()
                .unwrap_or_else(|| "P2PHANDSHAKE".into()),
        ),
        None => {
            let s = MasterServer::start(
                ServerConfig::loopback()
                    .with_master(MasterConfig::default().with_ramp_up_ms(0))
                    .with_http_metadata_addr(Some(SocketAddr::from(([127, 0, 0, 1], 0)))),
            )?;
            let addr = s.rpc_addr().to_string();
            let md = args
                .metadata
                .clone()
                .unwrap_or_else(|| s.metadata_url().expect("metadata server"));
            (Some(s), addr, md)
        }
    };
    let mut nodes = Vec::new();
    let mut children = Vec::new();
    let mut socket = None;
    if args.master.is_none() || args.role == Role::Both {
        let nodes_wanted = args.replicas.max(1) as usize;
        let out_of_process = args.remote || args.same_host;
        for n in 0..nodes_wanted {
            if out_of_process {
                let path = std::env::temp_dir()
                    .join(format!("mooncake-bench-{}-{n}.sock", std::process::id()));
                let (child, _) = spawn_store_node(&master_addr, &metadata, seg, &path, args)?;
                children.push(child);
                if n == 0 && args.same_host {
                    socket = Some(path);
                }
            } else {
                let engine = build_engine(
                    &metadata,
                    &args.protocol,
                    "127.0.0.1",
                    args.conns,
                    "bench-node",
                )?;
                let cfg = StoreConfig::new(master_addr.clone())
                    .with_segment_size(seg)
                    .with_local_buffer_size(0)
                    .with_populate(true);
                nodes.push(StoreClient::connect(cfg, engine)?);
            }
        }
    }
    Ok(Cluster {
        master_addr,
        metadata,
        _nodes: nodes,
        _children: children,
        _server: server,
        socket,
    })
}

fn key_name(prefix: &str, value_size: u64, i: usize) -> String {
    format!("{prefix}-{value_size}-{i}")
}

pub(crate) fn run(args: StoreBenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.batch_size > 0 && args.threads > 0 && args.value_size > 0,
        "--batch-size, --threads and --value-size must be positive"
    );
    ensure!(
        args.role == Role::Both || args.master.is_some(),
        "--role prefill|decode needs --master (two processes share one master)"
    );
    let keys = args
        .keys
        .unwrap_or_else(|| ((256u64 << 20) / args.value_size).clamp(256, 20_000) as usize);
    let keys = keys.div_ceil(args.threads * args.batch_size) * args.threads * args.batch_size;
    let cluster = start_cluster(&args, keys)?;
    let engine = build_engine(
        &cluster.metadata,
        &args.protocol,
        "127.0.0.1",
        args.conns,
        "bench-client",
    )?;
    let mut cfg = StoreConfig::new(cluster.master_addr.clone()).with_local_buffer_size(0);
    if let Some(s) = &cluster.socket {
        cfg = cfg.with_local_node(s.clone()).with_populate(true);
    }
    let client = StoreClient::connect(cfg, engine)?;
    let values = Arc::new(Values::new(args.value_size as usize));
    let mode = if args.same_host {
        "same-host"
    } else if args.remote {
        "remote"
    } else {
        "embedded"
    };
    let mut report = Report {
        workload: Some(args.workload),
        mode: mode.into(),
        value_size: args.value_size,
        keys,
        batch_size: args.batch_size,
        threads: args.threads,
        replicas: args.replicas,
        ..Default::default()
    };
    let rc = ReplicateConfig::default().with_replica_num(args.replicas);
    let ours = run_store(&args, &client, &values, keys, &rc)?;
    report.verified = true;
    fill(&mut report, &ours);
    if let Some(Baseline::Redis) = args.baseline {
        let base = run_redis(&args, &values, keys)?;
        report.baseline = Some("redis".into());
        report.baseline_put_gb_per_s = Some(base.put.gbps());
        report.baseline_get_gb_per_s = Some(base.get.gbps());
        report.baseline_put_ops_per_sec = Some(base.put.ops_per_sec());
        report.baseline_get_ops_per_sec = Some(base.get.ops_per_sec());
        report.baseline_put_p99_us = Some(base.put.p99_us);
        report.baseline_get_p99_us = Some(base.get.p99_us);
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        report.put_ratio = ratio(ours.put.ops_per_sec(), base.put.ops_per_sec());
        report.get_ratio = ratio(ours.get.ops_per_sec(), base.get.ops_per_sec());
        if let (Some(e), Some(b)) = (&ours.exist, &base.exist) {
            report.baseline_exist_keys_per_sec = Some(b.ops_per_sec());
            report.exist_ratio = ratio(e.ops_per_sec(), b.ops_per_sec());
        }
    }
    if args.same_host {
        let m = memcpy_gbps(args.value_size as usize);
        report.memcpy_gb_per_s = Some(m);
        report.get_vs_memcpy = Some(report.get_gb_per_s / m);
    }
    let _ = client.close();
    print_report(&args, &report)
}

fn fill(r: &mut Report, o: &Results) {
    r.put_gb_per_s = o.put.gbps();
    r.get_gb_per_s = o.get.gbps();
    r.put_ops_per_sec = o.put.ops_per_sec();
    r.get_ops_per_sec = o.get.ops_per_sec();
    r.put_p50_us = o.put.p50_us;
    r.put_p99_us = o.put.p99_us;
    r.get_p50_us = o.get.p50_us;
    r.get_p99_us = o.get.p99_us;
    if let Some(e) = &o.exist {
        r.exist_keys_per_sec = Some(e.ops_per_sec());
        r.exist_p99_us = Some(e.p99_us);
    }
}

#[derive(Debug, Default)]
struct Results {
    put: Phase,
    get: Phase,
    exist: Option<Phase>,
}

/// Per-thread timing of one phase: latencies of each call (µs) and the busy time.
#[derive(Default)]
struct ThreadTimes {
    lat: Vec<f64>,
    busy: f64,
    ops: u64,
    bytes: u64,
}

fn merge(ts: Vec<ThreadTimes>) -> Phase {
    let mut lat: Vec<f64> = ts.iter().flat_map(|t| t.lat.iter().copied()).collect();
    lat.sort_by(f64::total_cmp);
    Phase {
        ops: ts.iter().map(|t| t.ops).sum(),
        bytes: ts.iter().map(|t| t.bytes).sum(),
        busy_s: ts.iter().map(|t| t.busy).fold(0.0, f64::max),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {per_sec}")
            .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

/// Runs `body(thread)` on `threads` threads started together.
fn on_threads<T: Send>(
    threads: usize,
    body: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (b, f) = (&barrier, &body);
                s.spawn(move || {
                    b.wait();
                    f(t)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    })
}

fn run_store(
    args: &StoreBenchArgs,
    client: &StoreClient,
    values: &Values,
    keys: usize,
    rc: &ReplicateConfig,
) -> anyhow::Result<Results> {
    let v = args.value_size as usize;
    let b = args.batch_size;
    let per_thread = keys / args.threads;
    let bufs: Vec<(Arc<LocalBuffer>, Arc<LocalBuffer>)> = (0..args.threads)
        .map(|_| -> anyhow::Result<_> {
            let src = Arc::new(LocalBuffer::new(v * b)?);
            let dst = Arc::new(LocalBuffer::new(v * b)?);
            client.register_buffer(src.clone())?;
            client.register_buffer(dst.clone())?;
            Ok((src, dst))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut res = Results::default();
    let done = AtomicU64::new(0);

    if args.role != Role::Decode {
        let pb = progress(keys as u64, "put");
        let times = on_threads(args.threads, |t| {
            let (src, _) = &bufs[t];
            let mut tt = ThreadTimes::default();
            let mut scratch = vec![0u8; v];
            let addrs: Vec<u64> = (0..b).map(|j| src.base() + (j * v) as u64).collect();
            let sizes = vec![v as u64; b];
            for start in (t * per_thread..(t + 1) * per_thread).step_by(b) {
                let names: Vec<String> = (start..start + b)
                    .map(|i| key_name(&args.prefix, args.value_size, i))
                    .collect();
                for (j, i) in (start..start + b).enumerate() {
                    values.write_into(i as u64, &mut scratch);
                    src.write_at(j * v, &scratch)?;
                }
                let ks: Vec<&str> = names.iter().map(String::as_str).collect();
                let t0 = Instant::now();
                let r = if b == 1 {
                    vec![client.put_from(ks[0], addrs[0], v as u64, rc)]
                } else {
                    client.batch_put_from(&ks, &addrs, &sizes, rc)
                };
                let dt = t0.elapsed().as_secs_f64();
                for (k, r) in ks.iter().zip(r) {
                    r.with_context(|| format!("put {k}"))?;
                }
                tt.busy += dt;
                tt.lat.push(dt * 1e6);
                tt.ops += b as u64;
                tt.bytes += (b * v) as u64;
                pb.set_position(done.fetch_add(b as u64, Ordering::Relaxed) + b as u64);
            }
            Ok(tt)
        })?;
        pb.finish_and_clear();
        res.put = merge(times);
    }
    if args.role == Role::Prefill {
        return Ok(res);
    }
    match args.workload {
        Workload::PutGet => {
            done.store(0, Ordering::Relaxed);
            let pb = progress((keys * args.get_rounds) as u64, "get");
            let times = on_threads(args.threads, |t| {
                let (_, dst) = &bufs[t];
                let mut tt = ThreadTimes::default();
                let mut scratch = vec![0u8; v];
                let addrs: Vec<u64> = (0..b).map(|j| dst.base() + (j * v) as u64).collect();
                let sizes = vec![v as u64; b];
                for _ in 0..args.get_rounds {
                    for start in (t * per_thread..(t + 1) * per_thread).step_by(b) {
                        let names: Vec<String> = (start..start + b)
                            .map(|i| key_name(&args.prefix, args.value_size, i))
                            .collect();
                        let ks: Vec<&str> = names.iter().map(String::as_str).collect();
                        let t0 = Instant::now();
                        let r = if b == 1 {
                            vec![client.get_into(ks[0], addrs[0], v as u64)]
                        } else {
                            client.batch_get_into(&ks, &addrs, &sizes)
                        };
                        let dt = t0.elapsed().as_secs_f64();
                        for (j, (k, r)) in ks.iter().zip(r).enumerate() {
                            let n = r.with_context(|| format!("get {k}"))?;
                            ensure!(n == v as u64, "get {k}: {n} bytes");
                            dst.read_at(j * v, &mut scratch)?;
                            values.check((start + j) as u64, &scratch)?;
                        }
                        tt.busy += dt;
                        tt.lat.push(dt * 1e6);
                        tt.ops += b as u64;
                        tt.bytes += (b * v) as u64;
                        pb.set_position(done.fetch_add(b as u64, Ordering::Relaxed) + b as u64);
                    }
                }
                Ok(tt)
            })?;
            pb.finish_and_clear();
            res.get = merge(times);
        }
        Workload::ExistHeavy => {
            let names: Vec<String> = (0..keys)
                .map(|i| key_name(&args.prefix, args.value_size, i))
                .collect();
            let eb = args.exist_batch.max(1);
            let times = on_threads(args.threads, |t| {
                let mut tt = ThreadTimes::default();
                for round in 0..args.exist_rounds {
                    // A request's chunk keys: a present prefix (3/4), then misses.
                    let start = (round * 7919 + t * 104_729) % keys.max(1);
                    let hit = eb * 3 / 4;
                    let mut batch: Vec<String> = (0..hit)
                        .map(|j| names[(start + j) % keys].clone())
                        .collect();
                    batch.extend((hit..eb).map(|j| format!("miss-{round}-{t}-{j}")));
                    let ks: Vec<&str> = batch.iter().map(String::as_str).collect();
                    let t0 = Instant::now();
                    let r = client.batch_is_exist(&ks);
                    let dt = t0.elapsed().as_secs_f64();
                    for (j, r) in r.into_iter().enumerate() {
                        ensure!(
                            r? == (j < hit),
                            "batch_is_exist: wrong answer for {}",
                            ks[j]
                        );
                    }
                    tt.busy += dt;
                    tt.lat.push(dt * 1e6);
                    tt.ops += eb as u64;
                }
                Ok(tt)
            })?;
            res.exist = Some(merge(times));
        }
    }
    Ok(res)
}

struct RedisServer {
    child: ChildGuard,
    port: u16,
}

fn start_redis() -> anyhow::Result<RedisServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run redis-server (install redis-server for --baseline redis)")?;
    let child = ChildGuard(child);
    let url = format!("redis://127.0.0.1:{port}/");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = redis_conn(&url)
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            break;
        }
        ensure!(Instant::now() < end, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(RedisServer { child, port })
}

/// A sync redis connection with `TCP_NODELAY` (as redis-benchmark uses; without it large
/// values stall on Nagle's algorithm).
fn redis_conn(url: &str) -> anyhow::Result<redis::Connection> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?.get_connection()?)
}

fn run_redis(args: &StoreBenchArgs, values: &Values, keys: usize) -> anyhow::Result<Results> {
    let server = start_redis()?;
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let b = args.batch_size;
    let v = args.value_size as usize;
    let per_thread = keys / args.threads;
    let mut res = Results::default();
    let conns: Vec<_> = (0..args.threads)
        .map(|_| redis_conn(&url))
        .collect::<anyhow::Result<_>>()?;
    let conns: Vec<std::sync::Mutex<redis::Connection>> =
        conns.into_iter().map(std::sync::Mutex::new).collect();
    let pb = progress(keys as u64, "redis SET");
    let done = AtomicU64::new(0);
    let times = on_threads(args.threads, |t| {
        let mut c = conns[t].lock().expect("conn");
        let mut tt = ThreadTimes::default();
        for start in (t * per_thread..(t + 1) * per_thread).step_by(b) {
            let names: Vec<String> = (start..start + b)
                .map(|i| key_name(&args.prefix, args.value_size, i))
                .collect();
            let vals: Vec<Vec<u8>> = (start..start + b).map(|i| values.make(i as u64)).collect();
            let t0 = Instant::now();
            if b == 1 {
                redis::cmd("SET")
                    .arg(&names[0])
                    .arg(&vals[0][..])
                    .query::<()>(&mut *c)?;
            } else {
                let mut p = redis::pipe();
                for (k, val) in names.iter().zip(&vals) {
                    p.cmd("SET").arg(k).arg(&val[..]).ignore();
                }
                p.query::<()>(&mut *c)?;
            }
            let dt = t0.elapsed().as_secs_f64();
            tt.busy += dt;
            tt.lat.push(dt * 1e6);
            tt.ops += b as u64;
            tt.bytes += (b * v) as u64;
            pb.set_position(done.fetch_add(b as u64, Ordering::Relaxed) + b as u64);
        }
        Ok(tt)
    })?;
    pb.finish_and_clear();
    res.put = merge(times);
    match args.workload {
        Workload::PutGet => {
            done.store(0, Ordering::Relaxed);
            let pb = progress((keys * args.get_rounds) as u64, "redis GET");
            let times = on_threads(args.threads, |t| {
                let mut c = conns[t].lock().expect("conn");
                let mut tt = ThreadTimes::default();
                for _ in 0..args.get_rounds {
                    for start in (t * per_thread..(t + 1) * per_thread).step_by(b) {
                        let names: Vec<String> = (start..start + b)
                            .map(|i| key_name(&args.prefix, args.value_size, i))
                            .collect();
                        let t0 = Instant::now();
                        let got: Vec<Vec<u8>> = if b == 1 {
                            vec![redis::cmd("GET").arg(&names[0]).query(&mut *c)?]
                        } else {
                            let mut p = redis::pipe();
                            for k in &names {
                                p.cmd("GET").arg(k);
                            }
                            p.query(&mut *c)?
                        };
                        let dt = t0.elapsed().as_secs_f64();
                        for (j, g) in got.iter().enumerate() {
                            values.check((start + j) as u64, g)?;
                        }
                        tt.busy += dt;
                        tt.lat.push(dt * 1e6);
                        tt.ops += b as u64;
                        tt.bytes += (b * v) as u64;
                        pb.set_position(done.fetch_add(b as u64, Ordering::Relaxed) + b as u64);
                    }
                }
                Ok(tt)
            })?;
            pb.finish_and_clear();
            res.get = merge(times);
        }
        Workload::ExistHeavy => {
            let names: Vec<String> = (0..keys)
                .map(|i| key_name(&args.prefix, args.value_size, i))
                .collect();
            let eb = args.exist_batch.max(1);
            let times = on_threads(args.threads, |t| {
                let mut c = conns[t].lock().expect("conn");
                let mut tt = ThreadTimes::default();
                for round in 0..args.exist_rounds {
                    let start = (round * 7919 + t * 104_729) % keys.max(1);
                    let hit = eb * 3 / 4;
                    let mut batch: Vec<String> = (0..hit)
                        .map(|j| names[(start + j) % keys].clone())
                        .collect();
                    batch.extend((hit..eb).map(|j| format!("miss-{round}-{t}-{j}")));
                    let t0 = Instant::now();
                    let mut p = redis::pipe();
                    for k in &batch {
                        p.cmd("EXISTS").arg(k);
                    }
                    let got: Vec<i64> = p.query(&mut *c)?;
                    let dt = t0.elapsed().as_secs_f64();
                    for (j, g) in got.iter().enumerate() {
                        ensure!((*g == 1) == (j < hit), "redis EXISTS: wrong answer");
                    }
                    tt.busy += dt;
                    tt.lat.push(dt * 1e6);
                    tt.ops += eb as u64;
                }
                Ok(tt)
            })?;
            res.exist = Some(merge(times));
        }
    }
    drop(server.child);
    Ok(res)
}

/// A single-thread memcpy of `len`-byte values between two buffers of 64 MiB or more.
fn memcpy_gbps(len: usize) -> f64 {
    let n = ((64usize << 20) / len).max(2);
    let src: Vec<u8> = (0..len * n).map(|i| i as u8).collect();
    let mut dst = vec![0u8; len * n];
    dst.copy_from_slice(&src); // fault in
    let mut moved = 0u64;
    let t0 = Instant::now();
    for _ in 0..4 {
        for i in 0..n {
            dst[i * len..(i + 1) * len].copy_from_slice(&src[i * len..(i + 1) * len]);
            moved += len as u64;
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    moved as f64 / dt / 1e9
}

fn print_report(args: &StoreBenchArgs, r: &Report) -> anyhow::Result<()> {
    println!(
        "store {} value={} keys={} batch={} threads={} replicas={}",
        r.mode, r.value_size, r.keys, r.batch_size, r.threads, r.replicas
    );
    if args.role != Role::Decode {
        println!(
            "  put: {:.3} GB/s, {:.0} ops/s, call p50 {:.1} µs, p99 {:.1} µs",
            r.put_gb_per_s, r.put_ops_per_sec, r.put_p50_us, r.put_p99_us
        );
    }
    if args.role != Role::Prefill && args.workload == Workload::PutGet {
        println!(
            "  get: {:.3} GB/s, {:.0} ops/s, call p50 {:.1} µs, p99 {:.1} µs (every value verified)",
            r.get_gb_per_s, r.get_ops_per_sec, r.get_p50_us, r.get_p99_us
        );
    }
    if let Some(e) = r.exist_keys_per_sec {
        println!(
            "  batch_is_exist: {:.0} keys/s, call p99 {:.1} µs",
            e,
            r.exist_p99_us.unwrap_or(0.0)
        );
    }
    if let Some(b) = &r.baseline {
        println!(
            "  {b}: SET {:.3} GB/s {:.0} ops/s (p99 {:.1} µs), GET {:.3} GB/s {:.0} ops/s (p99 {:.1} µs)",
            r.baseline_put_gb_per_s.unwrap_or(0.0),
            r.baseline_put_ops_per_sec.unwrap_or(0.0),
            r.baseline_put_p99_us.unwrap_or(0.0),
            r.baseline_get_gb_per_s.unwrap_or(0.0),
            r.baseline_get_ops_per_sec.unwrap_or(0.0),
            r.baseline_get_p99_us.unwrap_or(0.0),
        );
        println!(
            "  ratio vs {b}: put {:.2}, get {:.2}{}",
            r.put_ratio.unwrap_or(0.0),
            r.get_ratio.unwrap_or(0.0),
            r.exist_ratio
                .map(|x| format!(", exists {x:.2}"))
                .unwrap_or_default()
        );
    }
    if let (Some(m), Some(x)) = (r.memcpy_gb_per_s, r.get_vs_memcpy) {
        println!("  single-thread memcpy {m:.3} GB/s → get/memcpy {x:.2}");
    }
    if args.json {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

/// Arguments of `mooncake bench master`.
#[derive(Debug, Clone, Args)]
pub(crate) struct MasterBenchArgs {
    /// A running master (`host:port`); default: start `mooncake master` as a child process
    /// (so its RSS can be read).
    #[arg(long)]
    master: Option<String>,
    /// Objects loaded into the pool before timing.
    #[arg(long, default_value_t = 1_000_000)]
    objects: u64,
    /// Timed single operations of each kind.
    #[arg(long, default_value_t = 20_000)]
    ops: usize,
    /// Keys per `batch_is_exist` call.
    #[arg(long, default_value_t = 1024)]
    exist_batch: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct MasterReport {
    objects: u64,
    load_objects_per_sec: f64,
    rss_bytes_per_object: Option<f64>,
    put_pair_p50_us: f64,
    put_pair_p99_us: f64,
    get_replicas_p50_us: f64,
    get_replicas_p99_us: f64,
    exist_keys_per_sec: f64,
    exist_p99_us: f64,
}

fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn bench_key(i: u64) -> String {
    format!("kv-{:016x}-{i:020}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub(crate) fn run_master_bench(args: MasterBenchArgs) -> anyhow::Result<()> {
    let mut child = None;
    let (addr, pid) = match &args.master {
        Some(m) => (m.clone(), None),
        None => {
            let mut c = Command::new(std::env::current_exe()?)
                .args([
                    "master",
                    "--rpc_address=127.0.0.1",
                    "--rpc_port=0",
                    "--metrics_port=0",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let out = c.stdout.take().context("master stdout")?;
            let pid = c.id();
            child = Some(ChildGuard(c));
            let mut lines = BufReader::new(out).lines();
            let addr = loop {
                match lines.next() {
                    Some(Ok(l)) => {
                        if let Some(a) = l.strip_prefix("master rpc ") {
                            break a.to_string();
                        }
                    }
                    _ => bail!("the master exited before listening"),
                }
            };
            std::thread::spawn(move || for _ in lines {});
            (addr, Some(pid))
        }
    };
    let sock: SocketAddr = addr.parse().context("--master must be ip:port")?;
    let mut rpc = RpcClient::connect(sock, Duration::from_secs(30))?;
    let client = match rpc.call(&Request::RegisterClient {
        host: "bench".into(),
        name: "bench-master".into(),
    })? {
        Response::Registered(i) => i.client,
        r => bail!("register: {r:?}"),
    };
    let obj = 4096u64;
    let size = ((args.objects + args.ops as u64 * 2 + 1024) * obj).next_power_of_two();
    match rpc.call(&Request::MountSegment {
        client,
        mount: MountRequest {
            name: "bench-fake-segment".into(),
            base: 1 << 44,
            size,
            host: "bench".into(),
            held: vec![],
        },
    })? {
        Response::Mounted(_) => {}
        r => bail!("mount: {r:?}"),
    }
    let rss0 = pid.and_then(rss_of);
    let rc = ReplicateConfig::default();
    let tenant = mooncake_store::DEFAULT_TENANT.to_string();
    let pb = progress(args.objects, "load");
    let t0 = Instant::now();
    let chunk = 2000u64;
    let mut i = 0;
    let mut since_hb = Instant::now();
    while i < args.objects {
        let n = chunk.min(args.objects - i);
        let items: Vec<PutItem> = (i..i + n)
            .map(|k| PutItem {
                key: bench_key(k),
                size: obj,
                group: None,
            })
            .collect();
        let keys: Vec<String> = items.iter().map(|it| it.key.clone()).collect();
        match rpc.call(&Request::BatchPutStart {
            client,
            tenant: tenant.clone(),
            items,
            config: rc.clone(),
            upsert: false,
        })? {
            Response::PutStarted(v) => {
                if let Some(e) = v.into_iter().find_map(Result::err) {
                    bail!("load: {e}");
                }
            }
            r => bail!("load: {r:?}"),
        }
        rpc.call(&Request::BatchPutFinish {
            client,
            tenant: tenant.clone(),
            end: keys,
            revoke: vec![],
            failed_segments: vec![],
        })?;
        i += n;
        if since_hb.elapsed() > Duration::from_millis(200) {
            rpc.call(&Request::Heartbeat { client })?;
            since_hb = Instant::now();
        }
        pb.set_position(i);
    }
    pb.finish_and_clear();
    let load_s = t0.elapsed().as_secs_f64();
    rpc.call(&Request::Heartbeat { client })?;
    let rss1 = pid.and_then(rss_of);
    let per_obj = match (rss0, rss1) {
        (Some(a), Some(b)) if args.objects > 0 => {
            Some(b.saturating_sub(a) as f64 / args.objects as f64)
        }
        _ => None,
    };

    let mut pair = Vec::with_capacity(args.ops);
    for k in 0..args.ops as u64 {
        let key = format!("pair-{k:016}");
        let t = Instant::now();
        rpc.call(&Request::BatchPutStart {
            client,
            tenant: tenant.clone(),
            items: vec![PutItem {
                key: key.clone(),
                size: obj,
                group: None,
            }],
            config: rc.clone(),
            upsert: false,
        })?;
        rpc.call(&Request::BatchPutFinish {
            client,
            tenant: tenant.clone(),
            end: vec![key],
            revoke: vec![],
            failed_segments: vec![],
        })?;
        pair.push(t.elapsed().as_secs_f64() * 1e6);
        if k % 1000 == 0 {
            rpc.call(&Request::Heartbeat { client })?;
        }
    }
    let mut get = Vec::with_capacity(args.ops);
    for k in 0..args.ops as u64 {
        let key = bench_key(k * 7919 % args.objects.max(1));
        let t = Instant::now();
        match rpc.call(&Request::BatchGetReplicas {
            tenant: tenant.clone(),
            keys: vec![key],
        })? {
            Response::Replicas(v) if v.len() == 1 && (args.objects == 0 || v[0].is_ok()) => {}
            r => bail!("get_replicas: {r:?}"),
        }
        get.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let eb = args.exist_batch.max(1);
    let mut ex = Vec::new();
    let mut exist_keys = 0u64;
    let te = Instant::now();
    let mut busy = 0.0;
    while te.elapsed() < Duration::from_secs(3) {
        let start = (exist_keys * 31) % args.objects.max(1);
        let keys: Vec<String> = (0..eb as u64)
            .map(|j| bench_key((start + j) % args.objects.max(1)))
            .collect();
        let t = Instant::now();
        rpc.call(&Request::BatchExists {
            tenant: tenant.clone(),
            keys,
        })?;
        let dt = t.elapsed().as_secs_f64();
        busy += dt;
        ex.push(dt * 1e6);
        exist_keys += eb as u64;
    }
    for v in [&mut pair, &mut get, &mut ex] {
        v.sort_by(f64::total_cmp);
    }
    let r = MasterReport {
        objects: args.objects,
        load_objects_per_sec: args.objects as f64 / load_s,
        rss_bytes_per_object: per_obj,
        put_pair_p50_us: percentile(&pair, 0.5),
        put_pair_p99_us: percentile(&pair, 0.99),
        get_replicas_p50_us: percentile(&get, 0.5),
        get_replicas_p99_us: percentile(&get, 0.99),
        exist_keys_per_sec: exist_keys as f64 / busy,
        exist_p99_us: percentile(&ex, 0.99),
    };
    println!(
        "master: {} objects loaded at {:.0}/s{}",
        r.objects,
        r.load_objects_per_sec,
        r.rss_bytes_per_object
            .map(|b| format!(", {b:.0} B RSS per object"))
            .unwrap_or_default()
    );
    println!(
        "  put_start+put_end pair: p50 {:.1} µs, p99 {:.1} µs",
        r.put_pair_p50_us, r.put_pair_p99_us
    );
    println!(
        "  get_replicas: p50 {:.1} µs, p99 {:.1} µs",
        r.get_replicas_p50_us, r.get_replicas_p99_us
    );
    println!(
        "  batch_is_exist ({eb} keys): {:.0} keys/s, call p99 {:.1} µs",
        r.exist_keys_per_sec, r.exist_p99_us
    );
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    drop(child);
    Ok(())
}
