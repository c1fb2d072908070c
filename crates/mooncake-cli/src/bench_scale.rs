//! `mooncake bench scale`: one engine talking to many peers (in other processes), every
//! peer moving verified bytes, and what each peer costs this process in threads, file
//! descriptors and memory.
//!
//! - fan-in: this process runs one target; `--procs` child processes run `--peers`
//!   initiator engines between them, each writing its block into the target and reading it
//!   back.
//! - fan-out: children run the target engines; this process runs one initiator that writes
//!   to and reads back from every one of them.
//!
//! Children are this binary (`mooncake bench scale --child …`); all processes find each
//! other through an HTTP metadata server in one more child process (`mooncake
//! metadata-server`), so only the transfer engine is measured here. Measurements are taken
//! while every connection is open and idle.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use mooncake::tcp::TcpConfig;
use mooncake::{LocalBuffer, MemorySegment, MetadataStore, TransferEngine};
use serde::Serialize;

use crate::bench_transfer::parse_size;

/// Which direction to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// One target, many initiators.
    FanIn,
    /// One initiator, many targets.
    FanOut,
    /// Both, one after the other.
    Both,
}

/// What a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ChildRole {
    /// Initiator engines writing to and reading from `--target`.
    Initiators,
    /// Target engines serving one block each.
    Targets,
}

/// Arguments of `mooncake bench scale`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ScaleArgs {
    /// Peers (engines in the child processes).
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Child processes the peers are spread over.
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Which direction(s).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Bytes each peer moves (each way).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    block: u64,
    /// Print one JSON object per mode as the last lines.
    #[arg(long)]
    json: bool,
    #[arg(long, hide = true)]
    child: Option<ChildRole>,
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
    #[arg(long, hide = true, default_value = "")]
    metadata: String,
    #[arg(long, hide = true, default_value = "")]
    target: String,
}

/// What one mode measured.
#[derive(Debug, Clone, Serialize)]
struct Report {
    mode: &'static str,
    peers: usize,
    procs: usize,
    block: u64,
    /// Every peer's bytes were written, read back and compared.
    verified: bool,
    threads_before: usize,
    threads: usize,
    fds_before: usize,
    fds: usize,
    rss_before_kib: u64,
    rss_kib: u64,
    rss_per_peer_kib: f64,
    fds_per_peer: f64,
    seconds: f64,
    cpus: usize,
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The pattern of peer `i`'s block.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tcp(peers: usize) -> TcpConfig {
    TcpConfig::new()
        .with_max_connections(peers * 2 + 64)
        .with_max_server_connections(peers * 2 + 64)
        .with_idle_timeout(Duration::from_secs(600))
}

fn engine(name: &str, md: &Arc<dyn MetadataStore>, peers: usize) -> anyhow::Result<TransferEngine> {
    Ok(TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(10))
        .with_transport(tcp(peers))
        .build()?)
}

pub(crate) fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let _ = mooncake::tcp::raise_fd_limit();
    if let Some(role) = args.child {
        return child(&args, role);
    }
    ensure!(
        args.peers > 0 && args.procs > 0,
        "--peers and --procs must be positive"
    );
    let server = MetadataServer::spawn()?;
    let url = server.url.clone();
    let md = mooncake::open_metadata(&url)?;
    let modes: &[Mode] = match args.mode {
        Mode::Both => &[Mode::FanIn, Mode::FanOut],
        m => std::slice::from_ref(match m {
            Mode::FanIn => &Mode::FanIn,
            _ => &Mode::FanOut,
        }),
    };
    let mut reports = Vec::new();
    for &m in modes {
        let r = match m {
            Mode::FanIn => fan_in(&args, &url, &md)?,
            _ => fan_out(&args, &url, &md)?,
        };
        println!(
            "{:>7}: {} peers over {} processes, {} B each way, verified: {} | threads {} -> {} | fds {} -> {} ({:.2}/peer) | RSS {} -> {} KiB ({:.1} KiB/peer) | {:.1} s",
            r.mode,
            r.peers,
            r.procs,
            r.block,
            r.verified,
            r.threads_before,
            r.threads,
            r.fds_before,
            r.fds,
            r.fds_per_peer,
            r.rss_before_kib,
            r.rss_kib,
            r.rss_per_peer_kib,
            r.seconds
        );
        reports.push(r);
    }
    if args.json {
        for r in &reports {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    drop(server);
    Ok(())
}

/// `mooncake metadata-server` in a child process, on a free loopback port.
struct MetadataServer {
    child: Child,
    url: String,
}

impl MetadataServer {
    fn spawn() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(std::env::current_exe().context("own executable")?)
            .args([
                "metadata-server",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn the metadata server")?;
        let url = format!("http://127.0.0.1:{port}/metadata");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "the metadata server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, url })
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Children(Vec<Child>);

impl Children {
    fn spawn(args: &ScaleArgs, role: ChildRole, url: &str, target: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("own executable")?;
        let per = args.peers.div_ceil(args.procs);
        let mut v = Vec::new();
        for p in 0..args.procs {
            let first = p * per;
            let count = per.min(args.peers.saturating_sub(first));
            if count == 0 {
                break;
            }
            let role = match role {
                ChildRole::Initiators => "initiators",
                ChildRole::Targets => "targets",
            };
            let child = Command::new(&exe)
                .args(["bench", "scale", "--child", role])
                .args(["--first", &first.to_string(), "--count", &count.to_string()])
                .args(["--peers", &args.peers.to_string()])
                .args(["--block", &args.block.to_string()])
                .args(["--metadata", url, "--target", target])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("spawn a child")?;
            v.push(child);
        }
        Ok(Self(v))
    }

    /// Waits for every child to print `READY` (or fails with what it printed).
    fn ready(&mut self) -> anyhow::Result<()> {
        for c in &mut self.0 {
            let out = c.stdout.take().context("child stdout")?;
            let mut lines = BufReader::new(out).lines();
            loop {
                match lines.next() {
                    Some(Ok(l)) if l == "READY" => break,
                    Some(Ok(l)) if l.starts_with("ERROR") => bail!("a child failed: {l}"),
                    Some(Ok(_)) => continue,
                    _ => bail!("a child exited before it was ready"),
                }
            }
        }
        Ok(())
    }

    /// Tells every child to exit (closes their stdin) and waits.
    fn finish(mut self) -> anyhow::Result<()> {
        for c in &mut self.0 {
            drop(c.stdin.take());
        }
        for c in &mut self.0 {
            let st = c.wait()?;
            ensure!(st.success(), "a child exited with {st}");
        }
        self.0.clear();
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn fan_in(args: &ScaleArgs, url: &str, md: &Arc<dyn MetadataStore>) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let name = format!("scale-in-target-{}", std::process::id());
    let target = engine(&name, md, args.peers)?;
    let buf = Arc::new(LocalBuffer::new(args.peers * args.block as usize)?);
    buf.fill(0, buf.len(), 0)?;
    target.register(buf.clone())?;
    let before = (
        status_field("Threads:") as usize,
        fds(),
        status_field("VmRSS:"),
    );
    let mut kids = Children::spawn(args, ChildRole::Initiators, url, &name)?;
    kids.ready()?;
    let after = (
        status_field("Threads:") as usize,
        fds(),
        status_field("VmRSS:"),
    );
    // Every initiator wrote its block into its slot.
    let got = buf.to_vec();
    let b = args.block as usize;
    for i in 0..args.peers {
        ensure!(
            got[i * b..(i + 1) * b] == pattern(i, b)[..],
            "peer {i}'s block did not arrive"
        );
    }
    kids.finish()?;
    Ok(report("fan-in", args, before, after, t0))
}

fn fan_out(args: &ScaleArgs, url: &str, md: &Arc<dyn MetadataStore>) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let prefix = format!("scale-out-{}", std::process::id());
    let init = engine(&format!("{prefix}-init"), md, args.peers)?;
    let b = args.block as usize;
    let out = Arc::new(LocalBuffer::new(b)?);
    let back = Arc::new(LocalBuffer::new(b)?);
    init.register(out.clone())?;
    init.register(back.clone())?;
    let mut kids = Children::spawn(args, ChildRole::Targets, url, &prefix)?;
    kids.ready()?;
    let before = (
        status_field("Threads:") as usize,
        fds(),
        status_field("VmRSS:"),
    );
    for i in 0..args.peers {
        let name = format!("{prefix}-{i}");
        let h = init.open_segment_blocking(&name)?;
        let remote = init.segment(h)?.descriptor().buffers[0].addr;
        out.write_at(0, &pattern(i, b))?;
        init.transfer_sync_write(&name, out.base(), remote, b as u64)
            .with_context(|| format!("write to {name}"))?;
        init.transfer_sync_read(&name, back.base(), remote, b as u64)
            .with_context(|| format!("read from {name}"))?;
        ensure!(
            back.to_vec() == pattern(i, b),
            "peer {i}'s block came back wrong"
        );
    }
    let after = (
        status_field("Threads:") as usize,
        fds(),
        status_field("VmRSS:"),
    );
    kids.finish()?;
    Ok(report("fan-out", args, before, after, t0))
}

fn report(
    mode: &'static str,
    args: &ScaleArgs,
    before: (usize, usize, u64),
    after: (usize, usize, u64),
    t0: Instant,
) -> Report {
    let peers = args.peers as f64;
    Report {
        mode,
        peers: args.peers,
        procs: args.procs,
        block: args.block,
        verified: true,
        threads_before: before.0,
        threads: after.0,
        fds_before: before.1,
        fds: after.1,
        rss_before_kib: before.2,
        rss_kib: after.2,
        rss_per_peer_kib: after.2.saturating_sub(before.2) as f64 / peers,
        fds_per_peer: after.1.saturating_sub(before.1) as f64 / peers,
        seconds: t0.elapsed().as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// A child: `count` engines, numbered from `first`, sharing one metadata store.
fn child(args: &ScaleArgs, role: ChildRole) -> anyhow::Result<()> {
    let r = child_body(args, role);
    if let Err(e) = &r {
        println!("ERROR {e:#}");
    }
    r
}

fn child_body(args: &ScaleArgs, role: ChildRole) -> anyhow::Result<()> {
    let md = mooncake::open_metadata(&args.metadata)?;
    let b = args.block as usize;
    let mut keep = Vec::new();
    match role {
        ChildRole::Initiators => {
            for i in args.first..args.first + args.count {
                let e = engine(&format!("{}-i{i}", args.target), &md, args.peers)?;
                let out = Arc::new(LocalBuffer::new(b)?);
                let back = Arc::new(LocalBuffer::new(b)?);
                e.register(out.clone())?;
                e.register(back.clone())?;
                out.write_at(0, &pattern(i, b))?;
                let h = e.open_segment_blocking(&args.target)?;
                let base = e.segment(h)?.descriptor().buffers[0].addr + (i * b) as u64;
                e.transfer_sync_write(&args.target, out.base(), base, b as u64)?;
                e.transfer_sync_read(&args.target, back.base(), base, b as u64)?;
                ensure!(
                    back.to_vec() == pattern(i, b),
                    "peer {i} read back other bytes"
                );
                keep.push((e, out, back));
            }
        }
        ChildRole::Targets => {
            for i in args.first..args.first + args.count {
                let e = engine(&format!("{}-{i}", args.target), &md, args.peers)?;
                let buf = Arc::new(LocalBuffer::new(b)?);
                e.register(buf.clone())?;
                keep.push((e, buf.clone(), buf));
            }
        }
    }
    println!("READY");
    std::io::stdout().flush()?;
    // Hold every engine (and its connections) until the parent closes our stdin.
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
    drop(keep);
    Ok(())
}
