//! `mooncake conductor`: the online Conductor (scheduler service, KV event subscriber, P/D
//! routing proxy). See `docs/conductor.md`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use mooncake_conductor::hash::HashAlgo;
use mooncake_conductor::{Registration, Role, ServiceConfig, StateConfig, Tokenize};
use mooncake_scheduler::{Admission, Policy};

/// `mooncake conductor --listen ADDR --prefill name=p0,url=…,kv=tcp://… --decode …`.
#[derive(Debug, Args)]
pub(crate) struct ConductorArgs {
    /// HTTP address of the API and the proxy.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// A prefill instance: `name=N,url=http://h:p[,kv=tcp://h:5557][,replay=tcp://h:5558]`
    /// (repeatable; more can register at `POST /v1/instances`).
    #[arg(long)]
    prefill: Vec<String>,
    /// A decode instance (same form, plus `capacity=TOKENS`).
    #[arg(long)]
    decode: Vec<String>,
    /// An instance serving both (vLLM `kv_both`).
    #[arg(long)]
    both: Vec<String>,
    /// Prefill policy: random, round-robin, load-balance, local-cache, max-prefix, mooncake.
    #[arg(long, default_value = "mooncake")]
    policy: Policy,
    /// Admission: none, slo, baseline, early, predicted.
    #[arg(long, default_value = "early")]
    admission: Admission,
    /// TTFT SLO, seconds.
    #[arg(long, default_value_t = 30.0)]
    ttft_slo: f64,
    /// TBT SLO, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    tbt_slo: f64,
    /// Load (predicted latency / SLO) above which early rejection refuses.
    #[arg(long, default_value_t = 1.0)]
    load_threshold: f64,
    /// Tokens per KV block of the engines (vLLM `--block-size`).
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// The engines' `--prefix-caching-hash-algo`: sha256 or sha256_cbor.
    #[arg(long, default_value = "sha256")]
    hash_algo: HashAlgo,
    /// The engines' NONE_HASH seed (their PYTHONHASHSEED, if set).
    #[arg(long, default_value = mooncake_conductor::hash::DEFAULT_NONE_HASH_SEED)]
    hash_seed: String,
    /// Seconds after its predicted TTFT that a request's blocks stay expected on its prefill
    /// instance without a KV event confirming them.
    #[arg(long, default_value_t = 5.0)]
    expected_ttl: f64,
    /// Do not book expected blocks at decision time (index only what events report).
    #[arg(long)]
    no_expected: bool,
    /// Output tokens assumed when a request has no `max_tokens`.
    #[arg(long, default_value_t = 128)]
    default_output_tokens: u32,
    /// Follow this store master's KV events (its admin URL, `http://host:9003`); the token
    /// comes from MC_CLUSTER_SECRET(_FILE) when the cluster has a secret.
    #[arg(long)]
    store_admin: Option<String>,
    /// Only this tenant's store keys.
    #[arg(long)]
    store_tenant: Option<String>,
    /// Seconds between health checks of the instances (0: off).
    #[arg(long, default_value_t = 2.0)]
    health_interval: f64,
    /// Seconds a prefill answer, or a decode's first bytes, may take.
    #[arg(long, default_value_t = 60.0)]
    hop_timeout: f64,
    /// Attempts per proxied request.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// How the proxy gets token ids: remote (the instances' /tokenize) or bytes.
    #[arg(long, default_value = "remote")]
    tokenizer: Tokenize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub(crate) fn run(a: ConductorArgs) -> anyhow::Result<()> {
    let mut state = StateConfig::default();
    let c = &mut state.conductor;
    c.policy = a.policy;
    c.admission = a.admission;
    c.ttft_slo_s = a.ttft_slo;
    c.tbt_slo_s = a.tbt_slo / 1e3;
    c.load_threshold = a.load_threshold;
    c.expected_ttl_s = (!a.no_expected).then_some(a.expected_ttl);
    state.block_size = a.block_size;
    state.hash_algo = a.hash_algo;
    state.hash_seed = a.hash_seed;
    state.default_output_tokens = a.default_output_tokens;
    let token = match &a.store_admin {
        Some(_) => mooncake::ClusterSecret::from_env()?.map(|s| s.token("store-admin")),
        None => None,
    };
    let mut cfg = ServiceConfig::default()
        .with_state(state)
        .with_store(a.store_admin, token)
        .with_health_interval(
            (a.health_interval > 0.0).then(|| Duration::from_secs_f64(a.health_interval)),
        )
        .with_hop_timeout(Duration::from_secs_f64(a.hop_timeout))
        .with_tokenize(a.tokenizer);
    cfg.store_tenant = a.store_tenant;
    cfg.max_attempts = a.max_attempts;
    let mut regs = Vec::new();
    for (role, specs) in [
        (Role::Prefill, &a.prefill),
        (Role::Decode, &a.decode),
        (Role::Both, &a.both),
    ] {
        for s in specs {
            regs.push(Registration::from_spec(role, s).map_err(|e| anyhow::anyhow!(e))?);
        }
    }
    mooncake_conductor::run_blocking(cfg, a.listen, regs, a.threads)
}
