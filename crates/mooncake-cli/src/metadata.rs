//! `mooncake bench metadata` and `mooncake metadata-server`.
//!
//! The bench publishes one segment descriptor from a writer node and times lookups of it from
//! a reader node (a `get` plus JSON decode: what `open_segment` costs on a cache miss). It
//! reports lookups/s and latency percentiles, next to a raw TCP round trip over loopback
//! measured in the same run, so numbers from different machines can be compared as ratios.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use mooncake::metadata::{Backend, loopback_pair};
use mooncake_core::{BufferDesc, MetadataKeys, SegmentDescriptor};

/// Backends `mooncake bench metadata` can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchBackend {
    /// In-process store.
    Embedded,
    /// HTTP metadata server (in-process on loopback unless --url is given).
    Http,
    /// Peer handshake between two loopback ports.
    P2p,
    /// etcd (needs --url etcd://host:port).
    Etcd,
    /// redis (needs --url redis://host:port).
    Redis,
}

impl BenchBackend {
    fn backend(self) -> Backend {
        match self {
            Self::Embedded => Backend::Embedded,
            Self::Http => Backend::Http,
            Self::P2p => Backend::P2pHandshake,
            Self::Etcd => Backend::Etcd,
            Self::Redis => Backend::Redis,
        }
    }
}

/// Arguments of `mooncake bench metadata`.
#[derive(Debug, Args)]
pub(crate) struct MetadataBenchArgs {
    /// The backend to measure.
    #[arg(long, value_enum)]
    backend: BenchBackend,
    /// Server URL (etcd and redis: required; http: defaults to an in-process server).
    #[arg(long)]
    url: Option<String>,
    /// Lookups to time (after 10% warm-up).
    #[arg(long, default_value_t = 20_000)]
    lookups: usize,
    /// Buffers in the published descriptor.
    #[arg(long, default_value_t = 16)]
    buffers: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `mooncake metadata-server`.
#[derive(Debug, Args)]
pub(crate) struct MetadataServerArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Largest accepted request body in bytes; larger PUTs get 413.
    #[arg(long, default_value_t = mooncake::metadata::HTTP_DEFAULT_MAX_BODY)]
    max_body: usize,
}

/// Runs `mooncake metadata-server` until the process is stopped.
pub(crate) fn run_server(args: MetadataServerArgs) -> anyhow::Result<()> {
    mooncake::metadata::serve_http(&format!("{}:{}", args.host, args.port), args.max_body)?;
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct Report {
    backend: String,
    target: String,
    lookups: usize,
    descriptor_bytes: usize,
    lookups_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    baseline_tcp_rtt_p50_us: f64,
    baseline_tcp_rtt_p99_us: f64,
    p99_over_baseline_p99: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// One-byte ping-pong over loopback TCP: the floor any networked backend pays per lookup.
fn tcp_baseline(rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read(&mut b)? == 1 {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(rounds);
    let mut b = [7u8; 1];
    for _ in 0..rounds {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        lat.push(t.elapsed());
    }
    drop(c);
    let _ = echo.join();
    lat.sort_unstable();
    Ok(lat)
}

/// Runs `mooncake bench metadata`.
pub(crate) fn run_bench(args: MetadataBenchArgs) -> anyhow::Result<()> {
    let backend = args.backend.backend();
    let pair = loopback_pair(backend, args.url.as_deref())
        .with_context(|| format!("setting up {:?}", args.backend))?;
    let keys = MetadataKeys::new(Some(&format!("bench{}", std::process::id())));
    let key = keys.segment(&pair.segment);
    let desc = SegmentDescriptor {
        name: pair.segment.clone(),
        protocol: "tcp".into(),
        generation: 1,
        buffers: (0..args.buffers)
            .map(|i| BufferDesc {
                name: "cpu:0".into(),
                addr: 0x1000_0000 + i as u64 * 65536,
                length: 65536,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let json = desc.to_json();
    mooncake_core::block_on(pair.writer.put(&key, json.clone()))
        .context("publishing the descriptor")?;
    let lookup = || -> anyhow::Result<()> {
        let bytes = mooncake_core::block_on(pair.reader.get(&key))?
            .context("the published descriptor is missing")?;
        let d = SegmentDescriptor::from_json(&bytes, &key)?;
        anyhow::ensure!(
            d.buffers.len() == args.buffers,
            "read back a different descriptor"
        );
        Ok(())
    };
    for _ in 0..args.lookups / 10 {
        lookup()?;
    }
    let mut lat = Vec::with_capacity(args.lookups);
    let start = Instant::now();
    for _ in 0..args.lookups {
        let t = Instant::now();
        lookup()?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    let _ = mooncake_core::block_on(pair.writer.delete(&key));
    lat.sort_unstable();
    let base = tcp_baseline(args.lookups.clamp(1000, 20_000))?;
    let p99 = percentile(&lat, 0.99);
    let base_p99 = percentile(&base, 0.99);
    let report = Report {
        backend: format!("{:?}", args.backend).to_lowercase(),
        target: pair.target.clone(),
        lookups: args.lookups,
        descriptor_bytes: json.len(),
        lookups_per_sec: args.lookups as f64 / total.as_secs_f64(),
        p50_us: percentile(&lat, 0.5),
        p99_us: p99,
        max_us: percentile(&lat, 1.0),
        baseline_tcp_rtt_p50_us: percentile(&base, 0.5),
        baseline_tcp_rtt_p99_us: base_p99,
        p99_over_baseline_p99: if base_p99 > 0.0 { p99 / base_p99 } else { 0.0 },
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:<9} {:>10.0} lookups/s  p50 {:>8.1} µs  p99 {:>8.1} µs  ({} B descriptor, {} lookups, {})",
            report.backend,
            report.lookups_per_sec,
            report.p50_us,
            report.p99_us,
            report.descriptor_bytes,
            report.lookups,
            report.target
        );
        println!(
            "baseline  raw loopback TCP round trip p50 {:.1} µs, p99 {:.1} µs  → p99 is {:.1}× the raw round trip",
            report.baseline_tcp_rtt_p50_us,
            report.baseline_tcp_rtt_p99_us,
            report.p99_over_baseline_p99
        );
    }
    Ok(())
}
