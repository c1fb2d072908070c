//! `mooncake bench metadata` and `mooncake metadata-server`.
//!
//! The bench publishes one segment descriptor from a writer node and times lookups of it from
//! a reader node (a `get` plus JSON decode: what `open_segment` costs on a cache miss), and
//! lookups on a new connection (connect, authentication, request: what the first lookup of
//! a peer costs). It reports lookups/s and latency percentiles, next to a raw TCP round trip
//! over loopback measured in the same run, so numbers from different machines can be
//! compared as ratios. `--auth both` measures without and with a cluster secret in the same
//! run, interleaved, and reports on/off ratios.
//!
//! `mooncake metadata-server` binds 127.0.0.1 unless told otherwise, requires the token
//! derived from the cluster secret when one is configured, and warns (or, with --no-token,
//! refuses) when it would serve beyond loopback without one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use mooncake::metadata::{Backend, loopback_pair_with};
use mooncake_core::{BufferDesc, ClusterSecret, MetadataKeys, MetadataStore, SegmentDescriptor};

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

/// Credentials of a `mooncake bench metadata` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AuthMode {
    /// Whatever the environment configures (MC_CLUSTER_SECRET_FILE, MC_CLUSTER_SECRET).
    Env,
    /// No cluster secret.
    Off,
    /// A cluster secret (--secret-file's, or a random one): the HTTP server requires its
    /// token and P2P peers authenticate each other with it.
    On,
    /// Off and on in the same run, interleaved, with on/off ratios.
    Both,
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
    /// Cluster secret of the run (http and p2p).
    #[arg(long, value_enum, default_value_t = AuthMode::Env)]
    auth: AuthMode,
    /// The cluster secret for --auth on|both (default: a random one for this run).
    #[arg(long)]
    secret_file: Option<String>,
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
    /// Address to bind (loopback by default: give an interface address, or 0.0.0.0, to serve
    /// other hosts — with a token).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Address and port to bind (`HOST:PORT`); overrides --host and --port.
    #[arg(long)]
    bind: Option<String>,
    /// Require this bearer token (read from the file, trimmed) instead of the one derived
    /// from the cluster secret (MC_CLUSTER_SECRET_FILE / MC_CLUSTER_SECRET); clients then
    /// need MC_METADATA_TOKEN.
    #[arg(long)]
    token_file: Option<String>,
    /// Serve without a token even if a cluster secret is configured (loopback only, unless
    /// --allow-unauthenticated-remote is given too).
    #[arg(long)]
    no_token: bool,
    /// Allow --no-token on an address beyond loopback (anyone who reaches the port can then
    /// read and overwrite every segment descriptor).
    #[arg(long)]
    allow_unauthenticated_remote: bool,
    /// Largest accepted request body in bytes; larger PUTs get 413.
    #[arg(long, default_value_t = mooncake::metadata::HTTP_DEFAULT_MAX_BODY)]
    max_body: usize,
    /// Most open connections (beyond it: the longest-idle one is closed, or 503).
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Most keys stored (beyond it: 507).
    #[arg(long, default_value_t = 1 << 20)]
    max_keys: usize,
    /// Most bytes stored, keys and values (beyond it: 507).
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: usize,
    /// Deadline in seconds for a whole request (head and body) from its first byte.
    #[arg(long, default_value_t = 30)]
    request_timeout_secs: u64,
}

/// Runs `mooncake metadata-server` until the process is stopped.
pub(crate) fn run_server(args: MetadataServerArgs) -> anyhow::Result<()> {
    use mooncake::metadata::auth;
    use mooncake::metadata::http::{HttpMetadataServer, HttpServerConfig};
    let bind = args
        .bind
        .clone()
        .unwrap_or_else(|| format!("{}:{}", args.host, args.port));
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&bind)
        .with_context(|| format!("--bind {bind}: not an address"))?
        .collect();
    let loopback_only = !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback());
    let (token, source) = if args.no_token {
        (None, "none (--no-token)")
    } else if let Some(f) = &args.token_file {
        (Some(auth::token_from_file(f)?), "--token-file")
    } else {
        match auth::metadata_token_from_env()? {
            Some(t) if std::env::var("MC_METADATA_TOKEN").is_ok_and(|v| !v.trim().is_empty()) => {
                (Some(t), "MC_METADATA_TOKEN")
            }
            Some(t) => (Some(t), "the cluster secret"),
            None => (None, "none"),
        }
    };
    if token.is_none() && !loopback_only {
        if args.no_token && !args.allow_unauthenticated_remote {
            anyhow::bail!(
                "refusing to serve {bind} without a token: anyone who reaches it could read and overwrite \
                 every segment descriptor. Set MC_CLUSTER_SECRET_FILE (or --token-file), bind a loopback \
                 address, or pass --allow-unauthenticated-remote"
            );
        }
        eprintln!(
            "WARNING: the metadata server listens on {bind}, beyond loopback, WITHOUT a token: anyone who \
             can reach it can read and overwrite every segment descriptor and hijack segments. Set \
             MC_CLUSTER_SECRET_FILE (the token is derived from it) or --token-file."
        );
    }
    let cfg = HttpServerConfig::default()
        .with_max_body(args.max_body)
        .with_max_connections(args.max_connections)
        .with_store_limits(args.max_keys, args.max_bytes)
        .with_request_timeout(Duration::from_secs(args.request_timeout_secs.max(1)))
        .with_token(token);
    let server = HttpMetadataServer::bind(bind.as_str(), cfg)?;
    eprintln!(
        "mooncake metadata server listening on {} (point metadata_server at {}); token: {source}",
        server.local_addr(),
        server.url()
    );
    server.wait();
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    backend: String,
    auth: String,
    target: String,
    lookups: usize,
    descriptor_bytes: usize,
    lookups_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// A lookup on a new connection (connect, authentication if any, request).
    setup_samples: usize,
    setup_p50_us: f64,
    setup_p99_us: f64,
    baseline_tcp_rtt_p50_us: f64,
    baseline_tcp_rtt_p99_us: f64,
    p99_over_baseline_p99: f64,
}

#[derive(Debug, serde::Serialize)]
struct Ratios {
    lookup_p50: f64,
    lookup_p99: f64,
    lookup_mean: f64,
    lookups_per_sec: f64,
    setup_p50: f64,
    setup_p99: f64,
}

#[derive(Debug, serde::Serialize)]
struct BothReport {
    off: Report,
    on: Report,
    /// on / off, same run.
    on_over_off: Ratios,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn mean_us(v: &[Duration]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64 * 1e6
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

/// A timed lookup of a key on a new connection.
type FreshLookup = Box<dyn Fn(&str) -> anyhow::Result<Duration>>;

/// What a backend's setup yields: writer, reader, segment, target, fresh lookups, guard.
type Setup = (
    Arc<dyn MetadataStore>,
    Arc<dyn MetadataStore>,
    String,
    String,
    Option<FreshLookup>,
    Box<dyn std::any::Any>,
);

/// A writer and a reader of one backend under one credential setting, with the descriptor
/// published.
struct Bench {
    reader: Arc<dyn MetadataStore>,
    writer: Arc<dyn MetadataStore>,
    key: String,
    buffers: usize,
    target: String,
    descriptor_bytes: usize,
    /// One lookup on a new connection, timed (http and p2p).
    fresh: Option<Box<dyn Fn() -> anyhow::Result<Duration>>>,
    _guard: Box<dyn std::any::Any>,
}

impl Bench {
    fn new(
        args: &MetadataBenchArgs,
        secret: Option<Option<ClusterSecret>>,
    ) -> anyhow::Result<Self> {
        let backend = args.backend.backend();
        let keys = MetadataKeys::new(Some(&format!("bench{}", std::process::id())));
        let (writer, reader, segment, target, fresh, guard): Setup = match backend {
            Backend::P2pHandshake => {
                use mooncake::metadata::{P2pConfig, P2pHandshakeStore};
                let cfg = match &secret {
                    Some(s) => P2pConfig::default().with_cluster_secret(s.clone()),
                    None => P2pConfig::default(),
                };
                let w = Arc::new(P2pHandshakeStore::bind("127.0.0.1", 0, cfg.clone())?);
                let r = Arc::new(P2pHandshakeStore::bind("127.0.0.1", 0, cfg)?);
                let segment = w.local_name().to_string();
                let r2 = r.clone();
                let fresh = move |key: &str| -> anyhow::Result<Duration> {
                    r2.close_idle_connections();
                    let t = Instant::now();
                    mooncake_core::block_on(r2.get(key))?.context("missing descriptor")?;
                    Ok(t.elapsed())
                };
                (
                    w as Arc<dyn MetadataStore>,
                    r as Arc<dyn MetadataStore>,
                    segment.clone(),
                    segment,
                    Some(Box::new(fresh) as FreshLookup),
                    Box::new(()) as Box<dyn std::any::Any>,
                )
            }
            _ => {
                let pair = loopback_pair_with(backend, args.url.as_deref(), secret.clone())
                    .with_context(|| format!("setting up {:?}", args.backend))?;
                let fresh: Option<FreshLookup> = if backend == Backend::Http {
                    use mooncake::metadata::{HttpConfig, HttpMetadataStore};
                    let token = match &secret {
                        Some(s) => s.as_ref().map(mooncake::metadata::auth::metadata_token),
                        None => mooncake::metadata::auth::metadata_token_from_env()?,
                    };
                    let url = pair.target.clone();
                    Some(Box::new(move |key: &str| {
                        let c = HttpMetadataStore::new(
                            &url,
                            HttpConfig::default()
                                .with_ttl(None)
                                .with_token(token.clone()),
                        )?;
                        let t = Instant::now();
                        mooncake_core::block_on(c.get(key))?.context("missing descriptor")?;
                        Ok(t.elapsed())
                    }))
                } else {
                    None
                };
                (
                    pair.writer.clone(),
                    pair.reader.clone(),
                    pair.segment.clone(),
                    pair.target.clone(),
                    fresh,
                    Box::new(pair) as Box<dyn std::any::Any>,
                )
            }
        };
        let key = keys.segment(&segment);
        let desc = SegmentDescriptor {
            name: segment.clone(),
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
        mooncake_core::block_on(writer.put(&key, json.clone()))
            .context("publishing the descriptor")?;
        let k = key.clone();
        Ok(Self {
            reader,
            writer,
            key,
            buffers: args.buffers,
            target,
            descriptor_bytes: json.len(),
            fresh: fresh
                .map(|f| Box::new(move || f(&k)) as Box<dyn Fn() -> anyhow::Result<Duration>>),
            _guard: guard,
        })
    }

    fn lookup(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let bytes = mooncake_core::block_on(self.reader.get(&self.key))?
            .context("the published descriptor is missing")?;
        let d = SegmentDescriptor::from_json(&bytes, &self.key)?;
        anyhow::ensure!(
            d.buffers.len() == self.buffers,
            "read back a different descriptor"
        );
        Ok(t.elapsed())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = mooncake_core::block_on(self.writer.delete(&self.key));
    }
}

/// Timings of one bench: steady-state lookups, fresh-connection lookups, total lookup time.
#[derive(Default)]
struct Samples {
    lookups: Vec<Duration>,
    setup: Vec<Duration>,
    total: Duration,
}

impl Samples {
    fn run(&mut self, b: &Bench, lookups: usize, setups: usize) -> anyhow::Result<()> {
        let t = Instant::now();
        for _ in 0..lookups {
            self.lookups.push(b.lookup()?);
        }
        self.total += t.elapsed();
        if let Some(f) = &b.fresh {
            for _ in 0..setups {
                self.setup.push(f()?);
            }
        }
        Ok(())
    }

    fn report(
        mut self,
        args: &MetadataBenchArgs,
        b: &Bench,
        auth: &str,
        base: &[Duration],
    ) -> Report {
        self.lookups.sort_unstable();
        self.setup.sort_unstable();
        let p99 = percentile(&self.lookups, 0.99);
        let base_p99 = percentile(base, 0.99);
        Report {
            backend: format!("{:?}", args.backend).to_lowercase(),
            auth: auth.to_string(),
            target: b.target.clone(),
            lookups: self.lookups.len(),
            descriptor_bytes: b.descriptor_bytes,
            lookups_per_sec: self.lookups.len() as f64 / self.total.as_secs_f64().max(1e-9),
            p50_us: percentile(&self.lookups, 0.5),
            p99_us: p99,
            max_us: percentile(&self.lookups, 1.0),
            setup_samples: self.setup.len(),
            setup_p50_us: percentile(&self.setup, 0.5),
            setup_p99_us: percentile(&self.setup, 0.99),
            baseline_tcp_rtt_p50_us: percentile(base, 0.5),
            baseline_tcp_rtt_p99_us: base_p99,
            p99_over_baseline_p99: if base_p99 > 0.0 { p99 / base_p99 } else { 0.0 },
        }
    }
}

/// A random cluster secret (32 random bytes, hex) for one benchmark run.
pub(crate) fn random_secret() -> anyhow::Result<ClusterSecret> {
    let hex: String = [mooncake_core::auth::nonce(), mooncake_core::auth::nonce()]
        .concat()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(ClusterSecret::from_bytes(hex.as_bytes())?)
}

fn print_report(r: &Report) {
    println!(
        "{:<9} {:<4} {:>10.0} lookups/s  p50 {:>8.1} µs  p99 {:>8.1} µs  ({} B descriptor, {} lookups, {})",
        r.backend,
        r.auth,
        r.lookups_per_sec,
        r.p50_us,
        r.p99_us,
        r.descriptor_bytes,
        r.lookups,
        r.target
    );
    if r.setup_samples > 0 {
        println!(
            "{:<9} {:<4} new connection + lookup: p50 {:>8.1} µs  p99 {:>8.1} µs  ({} samples)",
            "", r.auth, r.setup_p50_us, r.setup_p99_us, r.setup_samples
        );
    }
}

/// Runs `mooncake bench metadata`.
pub(crate) fn run_bench(args: MetadataBenchArgs) -> anyhow::Result<()> {
    let secret = match (&args.secret_file, args.auth) {
        (_, AuthMode::Env | AuthMode::Off) => None,
        (Some(f), _) => Some(ClusterSecret::from_file(f)?),
        (None, _) => Some(random_secret()?),
    };
    let setups = (args.lookups / 20).clamp(10, 1000);
    let base = tcp_baseline(args.lookups.clamp(1000, 20_000))?;
    if args.auth != AuthMode::Both {
        let (choice, label) = match args.auth {
            AuthMode::Env => (None, "env"),
            AuthMode::Off => (Some(None), "off"),
            _ => (Some(secret.clone()), "on"),
        };
        let b = Bench::new(&args, choice)?;
        for _ in 0..args.lookups / 10 {
            b.lookup()?;
        }
        let mut s = Samples::default();
        s.run(&b, args.lookups, setups)?;
        let r = s.report(&args, &b, label, &base);
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            print_report(&r);
            println!(
                "baseline  raw loopback TCP round trip p50 {:.1} µs, p99 {:.1} µs  → p99 is {:.1}× the raw round trip",
                r.baseline_tcp_rtt_p50_us, r.baseline_tcp_rtt_p99_us, r.p99_over_baseline_p99
            );
        }
        return Ok(());
    }
    // Off and on in the same run, interleaved in blocks so drift hits both alike.
    let off = Bench::new(&args, Some(None))?;
    let on = Bench::new(&args, Some(secret))?;
    for _ in 0..args.lookups / 10 {
        off.lookup()?;
        on.lookup()?;
    }
    let (mut so, mut sn) = (Samples::default(), Samples::default());
    let rounds = 10;
    for i in 0..rounds {
        let (n, k) = (args.lookups / rounds, setups / rounds);
        if i % 2 == 0 {
            so.run(&off, n, k)?;
            sn.run(&on, n, k)?;
        } else {
            sn.run(&on, n, k)?;
            so.run(&off, n, k)?;
        }
    }
    let (mo, mn) = (mean_us(&so.lookups), mean_us(&sn.lookups));
    let ro = so.report(&args, &off, "off", &base);
    let rn = sn.report(&args, &on, "on", &base);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let both = BothReport {
        on_over_off: Ratios {
            lookup_p50: ratio(rn.p50_us, ro.p50_us),
            lookup_p99: ratio(rn.p99_us, ro.p99_us),
            lookup_mean: ratio(mn, mo),
            lookups_per_sec: ratio(rn.lookups_per_sec, ro.lookups_per_sec),
            setup_p50: ratio(rn.setup_p50_us, ro.setup_p50_us),
            setup_p99: ratio(rn.setup_p99_us, ro.setup_p99_us),
        },
        off: ro,
        on: rn,
    };
    if args.json {
        println!("{}", serde_json::to_string(&both)?);
    } else {
        print_report(&both.off);
        print_report(&both.on);
        let r = &both.on_over_off;
        println!(
            "on/off (same run): lookup p50 {:.3}×, p99 {:.3}×, mean {:.3}×, lookups/s {:.3}×; new connection + lookup p50 {:.3}×, p99 {:.3}×",
            r.lookup_p50, r.lookup_p99, r.lookup_mean, r.lookups_per_sec, r.setup_p50, r.setup_p99
        );
        println!(
            "baseline  raw loopback TCP round trip p50 {:.1} µs, p99 {:.1} µs",
            both.off.baseline_tcp_rtt_p50_us, both.off.baseline_tcp_rtt_p99_us
        );
    }
    Ok(())
}
