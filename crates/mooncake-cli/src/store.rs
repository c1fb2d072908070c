//! `mooncake master` and `mooncake store-node`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use mooncake::TransferEngine;
use mooncake_store::{
    LocalNodeServer, MasterConfig, MasterServer, ServerConfig, StoreClient, StoreConfig,
};

/// Arguments of `mooncake master`: the reference `mooncake_master` flags, in `--flag=value`
/// or `--flag value` form. Unknown flags are warned about and ignored.
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub(crate) struct MasterArgs {
    /// Flags: --rpc_port (50051), --rpc_address (0.0.0.0), --metrics_port (9003; 0 = any
    /// free port), --default_kv_lease_ttl (ms, 10000), --eviction_ratio (0.05),
    /// --eviction_high_watermark_ratio (0.9), --client_live_ttl_sec (10),
    /// --put_start_discard_timeout_sec (30), --inflight_quarantine_ms (10000),
    /// --enable_http_metadata_server, --http_metadata_server_port (8080),
    /// --http_metadata_server_host (0.0.0.0), --default_kv_soft_pin_ttl (ms),
    /// --allow_evict_soft_pinned_objects, --ramp_up_ms (30000), --help.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    flags: Vec<String>,
}

/// The parsed master flags.
#[derive(Debug, Clone)]
pub(crate) struct MasterFlags {
    pub(crate) server: ServerConfig,
    pub(crate) warnings: Vec<String>,
}

const BOOL_FLAGS: &[&str] = &[
    "enable_http_metadata_server",
    "enable_metric_reporting",
    "allow_evict_soft_pinned_objects",
    "enable_ha",
    "enable_offload",
    "v",
    "help",
];

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses reference-style master flags.
pub(crate) fn parse_master_flags(args: &[String]) -> anyhow::Result<MasterFlags> {
    let mut cfg = ServerConfig::default();
    let mut m = MasterConfig::default();
    let mut warnings = Vec::new();
    let mut rpc_ip: IpAddr = [0, 0, 0, 0].into();
    let mut rpc_port = 50051u16;
    let mut metrics_port = Some(9003u16);
    let mut http_md = false;
    let mut http_host: IpAddr = [0, 0, 0, 0].into();
    let mut http_port = 8080u16;
    let mut i = 0;
    while i < args.len() {
        let tok = &args[i];
        i += 1;
        let Some(flag) = tok.strip_prefix("--").or_else(|| tok.strip_prefix('-')) else {
            warnings.push(format!("ignoring stray argument {tok:?}"));
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.to_string(), None),
        };
        let name = name.replace('-', "_");
        let mut value = |allow_bool: bool| -> Option<String> {
            if let Some(v) = &inline {
                return Some(v.clone());
            }
            match args.get(i) {
                Some(next) if allow_bool && parse_bool(next).is_none() => None,
                Some(next) if !next.starts_with("--") => {
                    i += 1;
                    Some(next.clone())
                }
                _ => None,
            }
        };
        if BOOL_FLAGS.contains(&name.as_str()) {
            let v = match value(true) {
                Some(v) => {
                    parse_bool(&v).with_context(|| format!("--{name}: {v:?} is not a boolean"))?
                }
                None => true,
            };
            match name.as_str() {
                "enable_http_metadata_server" => http_md = v,
                "allow_evict_soft_pinned_objects" => m.allow_evict_soft_pinned = v,
                "help" if v => bail!("{}", master_help()),
                "v" | "help" | "enable_metric_reporting" => {}
                other => warnings.push(format!("--{other} is not supported; ignored")),
            }
            continue;
        }
        let known = [
            "rpc_port",
            "port",
            "rpc_address",
            "metrics_port",
            "default_kv_lease_ttl",
            "eviction_ratio",
            "eviction_high_watermark_ratio",
            "client_live_ttl_sec",
            "put_start_discard_timeout_sec",
            "put_start_release_timeout_sec",
            "inflight_quarantine_ms",
            "http_metadata_server_port",
            "http_metadata_server_host",
            "default_kv_soft_pin_ttl",
            "ramp_up_ms",
            "rpc_thread_num",
            "max_threads",
            "config_path",
            "cluster_id",
            "memory_allocator",
            "allocation_strategy",
        ];
        if !known.contains(&name.as_str()) {
            let v = value(false);
            warnings.push(format!(
                "ignoring unknown flag --{name}{}",
                v.map(|v| format!("={v}")).unwrap_or_default()
            ));
            continue;
        }
        let Some(v) = value(false) else {
            bail!("--{name} needs a value");
        };
        let num = |v: &str| -> anyhow::Result<u64> {
            v.parse()
                .with_context(|| format!("--{name}: {v:?} is not a number"))
        };
        let float = |v: &str| -> anyhow::Result<f64> {
            v.parse()
                .with_context(|| format!("--{name}: {v:?} is not a number"))
        };
        match name.as_str() {
            "rpc_port" | "port" => rpc_port = num(&v)? as u16,
            "rpc_address" => rpc_ip = v.parse().with_context(|| format!("--rpc_address {v:?}"))?,
            "metrics_port" => metrics_port = Some(num(&v)? as u16),
            "default_kv_lease_ttl" => m.default_kv_lease_ttl_ms = num(&v)?,
            "eviction_ratio" => m.eviction_ratio = float(&v)?,
            "eviction_high_watermark_ratio" => m.eviction_high_watermark_ratio = float(&v)?,
            "client_live_ttl_sec" => m.client_live_ttl_ms = num(&v)? * 1000,
            "put_start_discard_timeout_sec" => m.put_start_discard_timeout_ms = num(&v)? * 1000,
            "inflight_quarantine_ms" => m.inflight_quarantine_ms = num(&v)?,
            "http_metadata_server_port" => http_port = num(&v)? as u16,
            "http_metadata_server_host" => {
                http_host = v
                    .parse()
                    .with_context(|| format!("--http_metadata_server_host {v:?}"))?
            }
            "default_kv_soft_pin_ttl" => m.default_soft_pin_ttl_ms = num(&v)?,
            "ramp_up_ms" => m.ramp_up_ms = num(&v)?,
            "put_start_release_timeout_sec" => warnings.push(
                "--put_start_release_timeout_sec is not used: a revoked put's space is \
                 quarantined for --inflight_quarantine_ms and the key is writable at once"
                    .into(),
            ),
            other => warnings.push(format!("--{other} has no effect here; ignored")),
        }
    }
    cfg.rpc_addr = SocketAddr::new(rpc_ip, rpc_port);
    cfg.admin_addr = metrics_port.map(|p| SocketAddr::new(rpc_ip, p));
    cfg.http_metadata_addr = http_md.then(|| SocketAddr::new(http_host, http_port));
    cfg.master = m;
    Ok(MasterFlags {
        server: cfg,
        warnings,
    })
}

fn master_help() -> &'static str {
    "usage: mooncake master [--rpc_port=50051] [--rpc_address=0.0.0.0] [--metrics_port=9003] \
[--default_kv_lease_ttl=10000] [--eviction_ratio=0.05] [--eviction_high_watermark_ratio=0.9] \
[--client_live_ttl_sec=10] [--put_start_discard_timeout_sec=30] [--inflight_quarantine_ms=10000] \
[--enable_http_metadata_server] [--http_metadata_server_port=8080] [--ramp_up_ms=30000]"
}

pub(crate) fn run_master(args: MasterArgs) -> anyhow::Result<()> {
    let flags = parse_master_flags(&args.flags)?;
    for w in &flags.warnings {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    let secret = mooncake::ClusterSecret::from_env()?;
    if secret.is_none() {
        let open: Vec<String> = [
            Some(("RPC", flags.server.rpc_addr)),
            flags.server.admin_addr.map(|a| ("admin", a)),
            flags
                .server
                .http_metadata_addr
                .map(|a| ("HTTP metadata", a)),
        ]
        .into_iter()
        .flatten()
        .filter(|(_, a)| !a.ip().is_loopback())
        .map(|(what, a)| format!("{what} {a}"))
        .collect();
        if !open.is_empty() {
            let w = format!(
                "the master listens beyond loopback without a cluster secret ({}): anyone who \
                 can reach it can read and change the pool's metadata, and remove every object \
                 (set MC_CLUSTER_SECRET_FILE)",
                open.join(", ")
            );
            tracing::warn!("{w}");
            eprintln!("warning: {w}");
        }
    }
    let server = MasterServer::start(flags.server.clone().with_cluster_secret(secret))
        .with_context(|| format!("cannot start the master on {}", flags.server.rpc_addr))?;
    println!("master rpc {}", server.rpc_addr());
    if let Some(a) = server.admin_addr() {
        println!("master admin http://{a}");
    }
    if let Some(u) = server.metadata_url() {
        println!("master metadata {u}");
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    server.wait();
    Ok(())
}

/// Arguments of `mooncake store-node`.
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreNodeArgs {
    /// The master's RPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    master: String,
    /// Bytes of memory to contribute (K, M, G suffixes: 4GiB).
    #[arg(long, default_value = "4G", value_parser = crate::bench_transfer::parse_size)]
    segment_size: u64,
    /// Metadata URL of the transfer engines (`P2PHANDSHAKE`, `http://…/metadata`, …).
    #[arg(long, default_value = "P2PHANDSHAKE")]
    metadata: String,
    /// Transport.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Address peers use to reach this node's engine.
    #[arg(long, default_value = "127.0.0.1")]
    hostname: String,
    /// Unix socket for same-host clients (memfd hand-off).
    #[arg(long, default_value = "/tmp/mooncake-store-node.sock")]
    socket: std::path::PathBuf,
    /// TCP connections per peer.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Fault the segment's pages in at start.
    #[arg(long)]
    populate: bool,
    /// Tenant.
    #[arg(long, default_value = "default")]
    tenant: String,
}

/// Builds an engine for `metadata` and `protocol`.
pub(crate) fn build_engine(
    metadata: &str,
    protocol: &str,
    hostname: &str,
    conns: usize,
    tag: &str,
) -> anyhow::Result<TransferEngine> {
    let url = metadata.trim();
    let mut b = if url.eq_ignore_ascii_case("P2PHANDSHAKE") {
        let store = Arc::new(mooncake::metadata::P2pHandshakeStore::bind(
            hostname,
            0,
            mooncake::metadata::P2pConfig::default(),
        )?);
        mooncake::p2p_engine_builder(&store)
    } else {
        let name = format!(
            "{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        TransferEngine::builder(name)
            .with_metadata(mooncake::open_metadata(url)?)
            .with_hostname(hostname)
    };
    b = match protocol {
        "tcp" => b.with_transport(mooncake::tcp::TcpConfig::new().with_conns_per_path(conns)),
        other => b.with_boxed_transport(mooncake::transport_builder(other)?),
    };
    Ok(b.build()?)
}

pub(crate) fn run_store_node(args: StoreNodeArgs) -> anyhow::Result<()> {
    let engine = build_engine(
        &args.metadata,
        &args.protocol,
        &args.hostname,
        args.conns,
        "store-node",
    )?;
    let cfg = StoreConfig::new(args.master.clone())
        .with_segment_size(args.segment_size)
        .with_local_buffer_size(0)
        .with_tenant(args.tenant.clone())
        .with_populate(args.populate);
    let client = StoreClient::connect(cfg, engine)
        .with_context(|| format!("cannot join the master at {}", args.master))?;
    let local = LocalNodeServer::start(&client, &args.socket)?;
    println!(
        "store-node ready segment {} socket {}",
        client.get_hostname(),
        local.path().display()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> MasterFlags {
        parse_master_flags(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn reference_flags_in_both_forms() {
        let f = p(&[
            "--rpc_port=50052",
            "--metrics_port",
            "9100",
            "--default_kv_lease_ttl=5000",
            "--eviction_high_watermark_ratio",
            "0.8",
            "--client_live_ttl_sec=3",
            "--enable_http_metadata_server",
            "--http_metadata_server_port=8081",
            "--no_such_flag=1",
            "--other",
            "x",
        ]);
        assert_eq!(f.server.rpc_addr.port(), 50052);
        assert_eq!(f.server.admin_addr.unwrap().port(), 9100);
        assert_eq!(f.server.master.default_kv_lease_ttl_ms, 5000);
        assert_eq!(f.server.master.eviction_high_watermark_ratio, 0.8);
        assert_eq!(f.server.master.client_live_ttl_ms, 3000);
        assert_eq!(f.server.http_metadata_addr.unwrap().port(), 8081);
        assert_eq!(f.warnings.len(), 2, "{:?}", f.warnings);
        let f = p(&["--enable_http_metadata_server", "false", "--rpc_port", "1"]);
        assert!(f.server.http_metadata_addr.is_none());
        assert_eq!(f.server.rpc_addr.port(), 1);
        assert!(parse_master_flags(&["--rpc_port=x".to_string()]).is_err());
    }
}
