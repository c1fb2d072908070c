//! `mooncake`: the mooncake-rs command-line tool.

use clap::{Parser, Subcommand};

mod bench_kv;
mod bench_scale;
mod bench_store;
mod bench_transfer;
mod conductor;
mod metadata;
mod simulate;
mod store;
mod trace;

/// mooncake-rs: KVCache-centric disaggregated infrastructure for LLM serving.
#[derive(Debug, Parser)]
#[command(name = "mooncake", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Top-level commands. Each lives in its own module with an `Args` type and a `run` function.
#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Mooncake's HTTP metadata server (`GET/PUT/DELETE /metadata?key=K`).
    MetadataServer(metadata::MetadataServerArgs),
    /// Request traces (Mooncake JSONL).
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Trace-driven simulation of the Conductor and the paper's experiments.
    Simulate(Box<simulate::SimulateArgs>),
    /// The online Conductor: scheduling API, KV event subscriber and P/D routing proxy.
    Conductor(Box<conductor::ConductorArgs>),
    /// The Mooncake Store master (accepts the reference `mooncake_master` flags).
    Master(store::MasterArgs),
    /// A standalone storage node: contributes memory to the pool and shares it with
    /// same-host clients over a Unix socket.
    StoreNode(store::StoreNodeArgs),
    /// Prints a bearer token derived from the cluster secret (MC_CLUSTER_SECRET_FILE /
    /// MC_CLUSTER_SECRET): `store-admin` for the master's admin port, `metadata` for the HTTP
    /// metadata server.
    Token {
        /// What the token is for.
        #[arg(value_parser = ["store-admin", "metadata"])]
        purpose: String,
    },
}

/// `mooncake bench …`.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Transfer Engine throughput and latency (Mooncake's `transfer_engine_bench`).
    Transfer(bench_transfer::TransferArgs),
    /// Metadata lookups per second and latency of a backend.
    Metadata(metadata::MetadataBenchArgs),
    /// Mooncake Store put/get throughput and latency, with a same-run redis baseline.
    Store(Box<bench_store::StoreBenchArgs>),
    /// Mooncake Store master: metadata operations alone, and memory per object.
    Master(bench_store::MasterBenchArgs),
    /// One engine and many peers in other processes: threads, descriptors and memory per peer.
    Scale(bench_scale::ScaleArgs),
    /// A 1 GiB KV cache (32 layers, shuffled 16-token blocks) from a prefill to a decode process.
    Kv(bench_kv::KvArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Peers cost a descriptor per connection: use the hard limit, not the (often 1,024)
    // soft one.
    if let Err(e) = mooncake::tcp::raise_fd_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(b) => match b {
            BenchCommand::Transfer(a) => bench_transfer::run(a),
            BenchCommand::Metadata(a) => metadata::run_bench(a),
            BenchCommand::Store(a) => bench_store::run(*a),
            BenchCommand::Master(a) => bench_store::run_master_bench(a),
            BenchCommand::Scale(a) => bench_scale::run(a),
            BenchCommand::Kv(a) => bench_kv::run(a),
        },
        Command::Master(a) => store::run_master(a),
        Command::StoreNode(a) => store::run_store_node(a),
        Command::MetadataServer(a) => metadata::run_server(a),
        Command::Trace(t) => trace::run(t),
        Command::Simulate(a) => simulate::run(*a),
        Command::Token { purpose } => {
            let secret = mooncake_core::ClusterSecret::from_env()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no cluster secret: set MC_CLUSTER_SECRET_FILE or MC_CLUSTER_SECRET"
                )
            })?;
            println!("{}", secret.token(&purpose));
            Ok(())
        }
        Command::Conductor(a) => conductor::run(*a),
    }
}
