//! The service's state: the [`Conductor`] plus the instance registry, the event bookkeeping and
//! the counters `/metrics` shows. Sync and free of I/O: the HTTP handlers, the ZMQ
//! subscribers and the store follower lock it, call one method and let go (a decision takes
//! microseconds).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mooncake_core::scheduler::{
    ClusterEvent, Decision, InstanceId, Pool, Rejection, ScheduleRequest, Scheduler,
};
use mooncake_scheduler::{Conductor, ConductorConfig, ScheduleError};
use serde::{Deserialize, Serialize};

use crate::events::{KvEvent, KvEventBatch};
use crate::hash::{BlockHasher, HashAlgo};

/// The name the store's pseudo-instance is registered under.
pub const STORE_INSTANCE: &str = "store";

/// What an instance does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Prefill only (`kv_producer`).
    Prefill,
    /// Decode only (`kv_consumer`).
    Decode,
    /// Both (`kv_both`): a slot in each pool.
    Both,
    /// A prefix source only (the store).
    Store,
}

impl Role {
    fn prefills(self) -> bool {
        matches!(self, Self::Prefill | Self::Both)
    }
    fn decodes(self) -> bool {
        matches!(self, Self::Decode | Self::Both)
    }
}

/// `POST /v1/instances`: an inference server joining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Unique name (vLLM's engine id is a good one).
    pub name: String,
    /// Prefill, decode or both.
    pub role: Role,
    /// Base URL of its OpenAI-compatible server (`http://host:port`), for the proxy and the
    /// health checks.
    #[serde(default)]
    pub url: Option<String>,
    /// Its KV event publisher (`--kv-events-config '{"endpoint": …}'`), e.g.
    /// `tcp://host:5557`.
    #[serde(default)]
    pub kv_events_endpoint: Option<String>,
    /// Its replay ROUTER (`replay_endpoint`), e.g. `tcp://host:5558`.
    #[serde(default)]
    pub kv_replay_endpoint: Option<String>,
    /// ZMQ topic to subscribe to (default: all).
    #[serde(default)]
    pub kv_topic: Option<String>,
    /// KV capacity of a decode instance, tokens (default: the cost model's).
    #[serde(default)]
    pub kv_capacity_tokens: Option<u64>,
}

/// One registered instance, as `GET /v1/instances` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    /// How it registered.
    #[serde(flatten)]
    pub reg: Registration,
    /// Its prefill slot in the Conductor.
    pub prefill_slot: Option<InstanceId>,
    /// Its decode slot.
    pub decode_slot: Option<InstanceId>,
    /// Whether requests may go there (health checks and failed requests clear it).
    pub healthy: bool,
    /// KV event batches applied.
    pub kv_batches: u64,
    /// Sequence gaps seen.
    pub kv_gaps: u64,
    /// Gaps recovered by replay.
    pub kv_replays: u64,
    /// Times its view was cleared and rebuilt from new events.
    pub kv_rebuilds: u64,
    /// Blocks indexed for it now.
    pub blocks: u64,
}

/// `POST /v1/schedule`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleInput {
    /// Block hashes of the prompt (chained, as the engines report them), or
    pub block_hashes: Option<Vec<u64>>,
    /// the prompt's token ids (hashed here as vLLM does).
    pub token_ids: Option<Vec<u32>>,
    /// Tokens per block for `token_ids` (default: the service's).
    pub block_size: Option<u32>,
    /// Prompt length (default: `token_ids`' length, or blocks × block size).
    pub input_tokens: Option<u32>,
    /// Expected output tokens (default 128).
    pub output_tokens: Option<u32>,
    /// TTFT SLO of this request, seconds (default: the service's).
    pub ttft_slo_s: Option<f64>,
    /// TBT SLO, seconds.
    pub tbt_slo_s: Option<f64>,
}

/// A chosen instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chosen {
    /// Its name.
    pub name: String,
    /// Its URL, if registered with one.
    pub url: Option<String>,
}

/// Where the prefill instance gets a longer prefix from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixSource {
    /// The holder (`"store"` for the Mooncake Store).
    pub source: String,
    /// The prefix is prompt blocks `[0, blocks)`.
    pub blocks: u32,
    /// Of which the prefill instance already holds the first `local_blocks`.
    pub local_blocks: u32,
}

/// An accepted request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    /// The service's id for it (lifecycle reports name it).
    pub request_id: u64,
    /// Prefill instance.
    pub prefill: Chosen,
    /// Decode instance.
    pub decode: Chosen,
    /// Prompt tokens whose KV is reused (local plus fetched).
    pub reused_tokens: u64,
    /// Blocks of the prompt already on the prefill instance (cached or expected).
    pub local_prefix_blocks: u32,
    /// The fetch Algorithm 1 orders, if any.
    pub prefix_fetch: Option<PrefixSource>,
    /// Predicted TTFT, seconds.
    pub predicted_ttft_s: f64,
    /// Predicted TBT, seconds.
    pub predicted_tbt_s: f64,
    /// Full blocks of the prompt.
    pub blocks: u32,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RejectReason {
    /// Predicted TTFT over the SLO.
    TtftSlo {
        /// The prediction, seconds.
        predicted_s: f64,
        /// The SLO.
        slo_s: f64,
    },
    /// Predicted TBT over the SLO.
    TbtSlo {
        /// The prediction, seconds.
        predicted_s: f64,
        /// The SLO.
        slo_s: f64,
    },
    /// A pool over its load threshold (early rejection).
    Overloaded {
        /// `prefill` or `decode`.
        pool: String,
        /// Predicted latency over the SLO (∞: no instance available).
        load: f64,
    },
    /// No healthy instance in a pool.
    NoInstance {
        /// `prefill` or `decode`.
        pool: String,
    },
    /// The request is malformed.
    BadRequest {
        /// What is wrong.
        message: String,
    },
}

impl RejectReason {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TtftSlo { .. } => "ttft_slo",
            Self::TbtSlo { .. } => "tbt_slo",
            Self::Overloaded { .. } => "overloaded",
            Self::NoInstance { .. } => "no_instance",
            Self::BadRequest { .. } => "bad_request",
        }
    }

    /// The HTTP status: 429 for load and SLO refusals, 503 without instances, 400 for bad
    /// input.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoInstance { .. } => 503,
            Self::BadRequest { .. } => 400,
            _ => 429,
        }
    }
}

/// A request's progress, as reported by a router (`POST /v1/requests/{id}/events`) or the
/// proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Prefill began.
    PrefillStarted,
    /// Prefill done, KV on its way to decode.
    PrefillFinished,
    /// Joined a decode batch.
    DecodeStarted,
    /// Last token produced.
    Finished,
    /// Abandoned (failed, cancelled, rejected by the decode node).
    Dropped,
}

/// Configuration of the service's state.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// The Conductor's configuration (policy, admission, SLOs, cost model; its instance counts
    /// are ignored: instances register).
    pub conductor: ConductorConfig,
    /// Tokens per KV block of the engines (vLLM `--block-size`).
    pub block_size: u32,
    /// The engines' `--prefix-caching-hash-algo`.
    pub hash_algo: HashAlgo,
    /// The engines' `NONE_HASH` seed.
    pub hash_seed: String,
    /// Output tokens assumed when a request does not say.
    pub default_output_tokens: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        let mut conductor = ConductorConfig::default();
        conductor.expected_ttl_s = Some(5.0);
        Self {
            conductor,
            block_size: 16,
            hash_algo: HashAlgo::Sha256,
            hash_seed: crate::hash::DEFAULT_NONE_HASH_SEED.into(),
            default_output_tokens: 128,
        }
    }
}

/// Decision-latency histogram bounds, microseconds.
const LATENCY_BOUNDS_US: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0];

#[derive(Debug, Clone, Default)]
struct Counters {
    accepted: u64,
    rejected: BTreeMap<&'static str, u64>,
    fetches: u64,
    fetches_from_store: u64,
    reused_tokens: u64,
    prompt_tokens: u64,
    latency_buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    latency_sum_us: f64,
    store_events: u64,
    store_resyncs: u64,
    lifecycle: u64,
    proxy: BTreeMap<&'static str, u64>,
}

/// The service's state (see the module docs).
#[derive(Debug)]
pub struct ConductorState {
    conductor: Conductor,
    cfg: StateConfig,
    hasher: BlockHasher,
    instances: BTreeMap<String, InstanceInfo>,
    prefill_slots: Vec<Option<String>>,
    decode_slots: Vec<Option<String>>,
    next_request: u64,
    counters: Counters,
}

/// Registration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken by an instance of another shape.
    #[error("instance `{0}` is already registered with another role")]
    Conflict(String),
    /// No such instance.
    #[error("no instance `{0}`")]
    Unknown(String),
    /// The Conductor refused (too many prefill instances).
    #[error(transparent)]
    Conductor(#[from] ScheduleError),
}

impl ConductorState {
    /// An empty registry over a fresh Conductor.
    pub fn new(cfg: StateConfig) -> Result<Self, ScheduleError> {
        let mut c = cfg.conductor.clone();
        c.prefill_instances = 1;
        c.decode_instances = 1;
        c.block_tokens = cfg.block_size.max(1);
        let mut conductor = Conductor::new(c)?;
        conductor.set_prefill_enabled(0, false);
        conductor.set_decode_enabled(0, false);
        Ok(Self {
            conductor,
            hasher: BlockHasher::new(cfg.hash_algo, &cfg.hash_seed),
            cfg,
            instances: BTreeMap::new(),
            prefill_slots: vec![None],
            decode_slots: vec![None],
            next_request: 1,
            counters: Counters::default(),
        })
    }

    /// The Conductor (read-only).
    pub fn conductor(&self) -> &Conductor {
        &self.conductor
    }

    /// The configuration.
    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// Registers (or re-registers, keeping its slots and cache view) an instance.
    pub fn register(&mut self, reg: Registration) -> Result<&InstanceInfo, RegistryError> {
        if let Some(old) = self.instances.get_mut(&reg.name) {
            if old.reg.role != reg.role {
                return Err(RegistryError::Conflict(reg.name));
            }
            old.reg = reg.clone();
            old.healthy = true;
            if let Some(s) = old.prefill_slot {
                self.conductor.set_prefill_enabled(s, true);
            }
            if let Some(s) = old.decode_slot {
                self.conductor.set_decode_enabled(s, true);
                if let Some(t) = reg.kv_capacity_tokens {
                    self.conductor.set_decode_capacity(s, t);
                }
            }
            return Ok(&self.instances[&reg.name]);
        }
        let prefill_slot = if reg.role.prefills() || reg.role == Role::Store {
            let slot = match self.prefill_slots.iter().position(Option::is_none) {
                Some(s) => s as InstanceId,
                None => {
                    let s = self.conductor.add_prefill_instance()?;
                    self.prefill_slots.push(None);
                    s
                }
            };
            self.conductor.clear_instance_blocks(slot);
            self.conductor.reset_prefill_view(slot);
            if reg.role == Role::Store {
                self.conductor.set_source_only(slot);
            } else {
                self.conductor.set_prefill_enabled(slot, true);
            }
            self.prefill_slots[slot as usize] = Some(reg.name.clone());
            Some(slot)
        } else {
            None
        };
        let decode_slot = if reg.role.decodes() {
            let slot = match self.decode_slots.iter().position(Option::is_none) {
                Some(s) => s as InstanceId,
                None => {
                    self.decode_slots.push(None);
                    self.conductor.add_decode_instance()
                }
            };
            self.conductor.reset_decode_view(slot);
            self.conductor.set_decode_enabled(slot, true);
            if let Some(t) = reg.kv_capacity_tokens {
                self.conductor.set_decode_capacity(slot, t);
            }
            self.decode_slots[slot as usize] = Some(reg.name.clone());
            Some(slot)
        } else {
            None
        };
        let name = reg.name.clone();
        self.instances.insert(
            name.clone(),
            InstanceInfo {
                reg,
                prefill_slot,
                decode_slot,
                healthy: true,
                kv_batches: 0,
                kv_gaps: 0,
                kv_replays: 0,
                kv_rebuilds: 0,
                blocks: 0,
            },
        );
        Ok(&self.instances[&name])
    }

    /// Removes an instance: no new requests, its cache view forgotten, its slots free for the
    /// next registration.
    pub fn deregister(&mut self, name: &str) -> Result<InstanceInfo, RegistryError> {
        let info = self
            .instances
            .remove(name)
            .ok_or_else(|| RegistryError::Unknown(name.into()))?;
        if let Some(s) = info.prefill_slot {
            self.conductor.set_prefill_enabled(s, false);
            self.conductor.clear_instance_blocks(s);
            self.prefill_slots[s as usize] = None;
        }
        if let Some(s) = info.decode_slot {
            self.conductor.set_decode_enabled(s, false);
            self.decode_slots[s as usize] = None;
        }
        Ok(info)
    }

    /// Registered instances.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceInfo> {
        self.instances.values()
    }

    /// One instance.
    pub fn instance(&self, name: &str) -> Option<&InstanceInfo> {
        self.instances.get(name)
    }

    /// Marks an instance up or down (health checks, failed proxied requests). Down instances
    /// get no new requests but keep their cache view.
    pub fn set_healthy(&mut self, name: &str, healthy: bool) {
        let Some(i) = self.instances.get_mut(name) else {
            return;
        };
        i.healthy = healthy;
        if let Some(s) = i.prefill_slot
            && i.reg.role != Role::Store
        {
            self.conductor.set_prefill_enabled(s, healthy);
        }
        if let Some(s) = i.decode_slot {
            self.conductor.set_decode_enabled(s, healthy);
        }
    }

    fn prefill_name(&self, slot: InstanceId) -> &str {
        self.prefill_slots[slot as usize].as_deref().unwrap_or("?")
    }

    fn chosen(&self, name: &str) -> Chosen {
        Chosen {
            name: name.to_owned(),
            url: self.instances.get(name).and_then(|i| i.reg.url.clone()),
        }
    }

    /// Block hashes of a schedule input.
    pub fn block_hashes(&self, input: &ScheduleInput) -> Result<(Vec<u64>, u32), RejectReason> {
        let bs = input.block_size.unwrap_or(self.cfg.block_size);
        if let Some(h) = &input.block_hashes {
            let n = input
                .input_tokens
                .unwrap_or((h.len() as u32).saturating_mul(bs).max(1));
            return Ok((h.clone(), n));
        }
        if let Some(t) = &input.token_ids {
            if bs == 0 {
                return Err(RejectReason::BadRequest {
                    message: "block_size must be ≥ 1".into(),
                });
            }
            let n = input.input_tokens.unwrap_or(t.len() as u32);
            return Ok((self.hasher.block_hashes(t, bs as usize), n));
        }
        match input.input_tokens {
            Some(n) => Ok((Vec::new(), n)),
            None => Err(RejectReason::BadRequest {
                message: "give block_hashes, token_ids or input_tokens".into(),
            }),
        }
    }

    /// Decides for a request at `now_s`, booking the queue and the expected blocks on the
    /// chosen prefill instance at once. `elapsed_us` is filled by the caller's timing.
    pub fn schedule(
        &mut self,
        input: &ScheduleInput,
        now_s: f64,
    ) -> Result<Accepted, (u64, RejectReason)> {
        let id = self.next_request;
        self.next_request += 1;
        let (hashes, input_tokens) = match self.block_hashes(input) {
            Ok(x) => x,
            Err(r) => return Err(self.rejected(id, r)),
        };
        let req = ScheduleRequest {
            id,
            input_tokens: input_tokens.max(1),
            output_tokens: input
                .output_tokens
                .unwrap_or(self.cfg.default_output_tokens)
                .max(1),
            block_hashes: hashes,
        };
        let slo = (self.cfg.conductor.ttft_slo_s, self.cfg.conductor.tbt_slo_s);
        let custom = input.ttft_slo_s.is_some() || input.tbt_slo_s.is_some();
        if custom {
            self.conductor.set_slo(
                input.ttft_slo_s.unwrap_or(slo.0),
                input.tbt_slo_s.unwrap_or(slo.1),
            );
        }
        let started = std::time::Instant::now();
        let d = self.conductor.schedule(&req, now_s);
        let us = started.elapsed().as_secs_f64() * 1e6;
        let (ttft_slo, tbt_slo) = (
            self.conductor.config().ttft_slo_s,
            self.conductor.config().tbt_slo_s,
        );
        if custom {
            self.conductor.set_slo(slo.0, slo.1);
        }
        let b = LATENCY_BOUNDS_US
            .iter()
            .position(|&x| us <= x)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.counters.latency_buckets[b] += 1;
        self.counters.latency_sum_us += us;
        match d {
            Decision::Accept(p) => {
                self.counters.accepted += 1;
                self.counters.prompt_tokens += u64::from(req.input_tokens);
                self.counters.reused_tokens += p.reused_tokens;
                let prefill = self.prefill_name(p.prefill).to_owned();
                let decode = self.decode_slots[p.decode as usize]
                    .clone()
                    .unwrap_or_default();
                let prefix_fetch = p.fetch.map(|f| {
                    let source = self.prefill_name(f.source).to_owned();
                    self.counters.fetches += 1;
                    if source == STORE_INSTANCE {
                        self.counters.fetches_from_store += 1;
                    }
                    PrefixSource {
                        source,
                        blocks: f.blocks,
                        local_blocks: f.local_blocks,
                    }
                });
                let bs = u64::from(self.cfg.block_size.max(1));
                let local_prefix_blocks = match &prefix_fetch {
                    Some(f) => f.local_blocks,
                    None => (p.reused_tokens.div_ceil(bs)) as u32,
                };
                Ok(Accepted {
                    request_id: id,
                    prefill: self.chosen(&prefill),
                    decode: self.chosen(&decode),
                    reused_tokens: p.reused_tokens,
                    local_prefix_blocks,
                    prefix_fetch,
                    predicted_ttft_s: p.predicted_ttft_s,
                    predicted_tbt_s: p.predicted_tbt_s,
                    blocks: req.block_hashes.len() as u32,
                })
            }
            Decision::Reject(r) => {
                let reason = match r {
                    Rejection::TtftSlo { predicted_s } => RejectReason::TtftSlo {
                        predicted_s,
                        slo_s: ttft_slo,
                    },
                    Rejection::TbtSlo { predicted_s } => RejectReason::TbtSlo {
                        predicted_s,
                        slo_s: tbt_slo,
                    },
                    Rejection::Overloaded { pool, load } if load.is_infinite() => {
                        RejectReason::NoInstance {
                            pool: pool_name(pool).into(),
                        }
                    }
                    Rejection::Overloaded { pool, load } => RejectReason::Overloaded {
                        pool: pool_name(pool).into(),
                        load,
                    },
                };
                Err(self.rejected(id, reason))
            }
        }
    }

    fn rejected(&mut self, id: u64, r: RejectReason) -> (u64, RejectReason) {
        *self.counters.rejected.entry(r.label()).or_insert(0) += 1;
        (id, r)
    }

    /// A request's progress (from a router or the proxy).
    pub fn lifecycle(&mut self, request: u64, ev: Lifecycle, now_s: f64) {
        self.counters.lifecycle += 1;
        // The Conductor ignores instance ids in these events (the booking knows them).
        let e = match ev {
            Lifecycle::PrefillStarted => ClusterEvent::PrefillStarted {
                request,
                instance: 0,
            },
            Lifecycle::PrefillFinished => ClusterEvent::PrefillFinished {
                request,
                instance: 0,
            },
            Lifecycle::DecodeStarted => ClusterEvent::DecodeStarted {
                request,
                instance: 0,
            },
            Lifecycle::Finished => ClusterEvent::DecodeFinished {
                request,
                instance: 0,
            },
            Lifecycle::Dropped => ClusterEvent::Dropped { request },
        };
        self.conductor.observe(e, now_s);
    }

    /// Applies one KV event batch of instance `name` (in order; the subscriber checked its
    /// sequence number).
    pub fn apply_kv_batch(&mut self, name: &str, batch: &KvEventBatch, now_s: f64) {
        let Some(info) = self.instances.get_mut(name) else {
            return;
        };
        info.kv_batches += 1;
        let Some(slot) = info.prefill_slot else {
            return; // a decode-only instance's cache is no prefix source
        };
        for e in &batch.events {
            match e {
                KvEvent::BlockStored { block_hashes, .. } => {
                    info.blocks += block_hashes.len() as u64;
                    self.conductor.observe(
                        ClusterEvent::BlocksStored {
                            instance: slot,
                            block_hashes,
                        },
                        now_s,
                    );
                }
                KvEvent::BlockRemoved { block_hashes, .. } => {
                    info.blocks = info.blocks.saturating_sub(block_hashes.len() as u64);
                    self.conductor.observe(
                        ClusterEvent::BlocksRemoved {
                            instance: slot,
                            block_hashes,
                        },
                        now_s,
                    );
                }
                KvEvent::AllBlocksCleared => {
                    info.blocks = 0;
                    self.conductor.clear_instance_blocks(slot);
                }
            }
        }
    }

    /// Records a sequence gap on `name`'s stream; `recovered`: replay filled it, else its view
    /// is cleared (it rebuilds from the events that follow).
    pub fn kv_gap(&mut self, name: &str, recovered: bool) {
        let Some(info) = self.instances.get_mut(name) else {
            return;
        };
        info.kv_gaps += 1;
        if recovered {
            info.kv_replays += 1;
        } else {
            self.clear_view(name);
        }
    }

    /// Forgets everything indexed for `name` (its publisher restarted, or a gap could not be
    /// replayed).
    pub fn clear_view(&mut self, name: &str) {
        let Some(info) = self.instances.get_mut(name) else {
            return;
        };
        info.kv_rebuilds += 1;
        info.blocks = 0;
        if let Some(s) = info.prefill_slot {
            self.conductor.clear_instance_blocks(s);
        }
    }

    /// Ensures the store's pseudo-instance exists.
    pub fn ensure_store(&mut self) -> Result<(), RegistryError> {
        if !self.instances.contains_key(STORE_INSTANCE) {
            self.register(Registration {
                name: STORE_INSTANCE.into(),
                role: Role::Store,
                url: None,
                kv_events_endpoint: None,
                kv_replay_endpoint: None,
                kv_topic: None,
                kv_capacity_tokens: None,
            })?;
        }
        Ok(())
    }

    /// Store events: `stored` keys now in the store, `removed` ones gone (evicted or
    /// removed). `resync`: `stored` is the store's whole content (after a gap).
    pub fn apply_store(&mut self, stored: &[u64], removed: &[u64], resync: bool, now_s: f64) {
        if self.ensure_store().is_err() {
            return;
        }
        if resync {
            self.counters.store_resyncs += 1;
            self.clear_view(STORE_INSTANCE);
        }
        let info = self
            .instances
            .get_mut(STORE_INSTANCE)
            .expect("just ensured");
        let slot = info.prefill_slot.expect("the store has a slot");
        info.kv_batches += 1;
        info.blocks = (info.blocks + stored.len() as u64).saturating_sub(removed.len() as u64);
        self.counters.store_events += (stored.len() + removed.len()) as u64;
        if !stored.is_empty() {
            self.conductor.observe(
                ClusterEvent::BlocksStored {
                    instance: slot,
                    block_hashes: stored,
                },
                now_s,
            );
        }
        if !removed.is_empty() {
            self.conductor.observe(
                ClusterEvent::BlocksRemoved {
                    instance: slot,
                    block_hashes: removed,
                },
                now_s,
            );
        }
    }

    /// Counts a proxy outcome (`prefill_retry`, `decode_retry`, `completed`, …).
    pub fn count_proxy(&mut self, what: &'static str) {
        *self.counters.proxy.entry(what).or_insert(0) += 1;
    }

    /// Prometheus text of the counters and gauges.
    pub fn metrics(&self, rss_bytes: u64) -> String {
        let c = &self.counters;
        let mut o = String::new();
        let mut g = |name: &str, help: &str, kind: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            "mooncake_conductor_accepted_total",
            "Requests accepted.",
            "counter",
            c.accepted as f64,
        );
        g(
            "mooncake_conductor_prefix_fetches_total",
            "Accepted requests ordered to fetch a prefix from another holder.",
            "counter",
            c.fetches as f64,
        );
        g(
            "mooncake_conductor_store_fetches_total",
            "Prefix fetches from the store.",
            "counter",
            c.fetches_from_store as f64,
        );
        g(
            "mooncake_conductor_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            "counter",
            c.prompt_tokens as f64,
        );
        g(
            "mooncake_conductor_reused_tokens_total",
            "Prompt tokens predicted reused (cache hits, local or fetched).",
            "counter",
            c.reused_tokens as f64,
        );
        g(
            "mooncake_conductor_indexed_blocks",
            "Distinct blocks in the prefix index.",
            "gauge",
            self.conductor.index().len() as f64,
        );
        g(
            "mooncake_conductor_index_heap_bytes",
            "Heap bytes of the prefix index.",
            "gauge",
            self.conductor.index().heap_bytes() as f64,
        );
        g(
            "mooncake_conductor_expected_blocks",
            "Blocks booked as expected at decision time, not yet confirmed by events.",
            "gauge",
            self.conductor.expected().len() as f64,
        );
        g(
            "mooncake_conductor_in_flight",
            "Accepted requests not yet finished.",
            "gauge",
            self.conductor.in_flight() as f64,
        );
        g(
            "mooncake_conductor_instances",
            "Registered instances.",
            "gauge",
            self.instances.len() as f64,
        );
        g(
            "mooncake_conductor_store_events_total",
            "Store keys applied (stored plus removed).",
            "counter",
            c.store_events as f64,
        );
        g(
            "mooncake_conductor_store_resyncs_total",
            "Store views rebuilt from a full listing.",
            "counter",
            c.store_resyncs as f64,
        );
        g(
            "mooncake_conductor_lifecycle_events_total",
            "Request progress reports applied.",
            "counter",
            c.lifecycle as f64,
        );
        g(
            "mooncake_conductor_rss_bytes",
            "Resident set size.",
            "gauge",
            rss_bytes as f64,
        );
        let _ = writeln!(
            o,
            "# HELP mooncake_conductor_rejected_total Requests refused, by reason.\n# TYPE mooncake_conductor_rejected_total counter"
        );
        for r in [
            "ttft_slo",
            "tbt_slo",
            "overloaded",
            "no_instance",
            "bad_request",
        ] {
            let v = c.rejected.get(r).copied().unwrap_or(0);
            let _ = writeln!(o, "mooncake_conductor_rejected_total{{reason=\"{r}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP mooncake_conductor_decision_seconds Time of one scheduling decision.\n# TYPE mooncake_conductor_decision_seconds histogram"
        );
        let mut cum = 0;
        for (i, b) in LATENCY_BOUNDS_US.iter().enumerate() {
            cum += c.latency_buckets[i];
            let _ = writeln!(
                o,
                "mooncake_conductor_decision_seconds_bucket{{le=\"{}\"}} {cum}",
                b / 1e6
            );
        }
        cum += c.latency_buckets[LATENCY_BOUNDS_US.len()];
        let _ = writeln!(
            o,
            "mooncake_conductor_decision_seconds_bucket{{le=\"+Inf\"}} {cum}\nmooncake_conductor_decision_seconds_sum {}\nmooncake_conductor_decision_seconds_count {cum}",
            c.latency_sum_us / 1e6
        );
        let _ = writeln!(
            o,
            "# HELP mooncake_conductor_proxy_total Proxy outcomes.\n# TYPE mooncake_conductor_proxy_total counter"
        );
        for (k, v) in &c.proxy {
            let _ = writeln!(o, "mooncake_conductor_proxy_total{{outcome=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP mooncake_conductor_instance_blocks Blocks indexed per instance.\n# TYPE mooncake_conductor_instance_blocks gauge"
        );
        for i in self.instances.values() {
            let _ = writeln!(
                o,
                "mooncake_conductor_instance_blocks{{instance=\"{}\"}} {}",
                i.reg.name, i.blocks
            );
        }
        for (metric, help, f) in [
            (
                "mooncake_conductor_kv_batches_total",
                "KV event batches applied.",
                (|i: &InstanceInfo| i.kv_batches) as fn(&InstanceInfo) -> u64,
            ),
            (
                "mooncake_conductor_kv_gaps_total",
                "KV event sequence gaps.",
                |i: &InstanceInfo| i.kv_gaps,
            ),
            (
                "mooncake_conductor_kv_replays_total",
                "Gaps recovered by replay.",
                |i: &InstanceInfo| i.kv_replays,
            ),
            (
                "mooncake_conductor_kv_rebuilds_total",
                "Instance views cleared and rebuilt.",
                |i: &InstanceInfo| i.kv_rebuilds,
            ),
            (
                "mooncake_conductor_instance_healthy",
                "1 when the instance takes requests.",
                |i: &InstanceInfo| u64::from(i.healthy),
            ),
        ] {
            let _ = writeln!(o, "# HELP {metric} {help}");
            for i in self.instances.values() {
                let _ = writeln!(o, "{metric}{{instance=\"{}\"}} {}", i.reg.name, f(i));
            }
        }
        o
    }
}

fn pool_name(p: Pool) -> &'static str {
    match p {
        Pool::Prefill => "prefill",
        Pool::Decode => "decode",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_scheduler::{Admission, Policy};

    fn reg(name: &str, role: Role) -> Registration {
        Registration {
            name: name.into(),
            role,
            url: Some(format!("http://{name}")),
            kv_events_endpoint: None,
            kv_replay_endpoint: None,
            kv_topic: None,
            kv_capacity_tokens: None,
        }
    }

    fn stored(hashes: Vec<u64>) -> KvEventBatch {
        KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockStored {
                block_hashes: hashes,
                parent_block_hash: None,
                token_ids: vec![],
                block_size: 16,
                medium: None,
            }],
            data_parallel_rank: None,
        }
    }

    fn by_hashes(h: Vec<u64>) -> ScheduleInput {
        ScheduleInput {
            block_hashes: Some(h),
            ..Default::default()
        }
    }

    #[test]
    fn registry_slots_and_events() {
        let mut s = ConductorState::new(StateConfig::default()).unwrap();
        assert!(matches!(
            s.schedule(&by_hashes(vec![1]), 0.0),
            Err((_, RejectReason::NoInstance { .. }))
        ));
        for n in ["p0", "p1"] {
            s.register(reg(n, Role::Prefill)).unwrap();
        }
        s.register(reg("d0", Role::Decode)).unwrap();
        s.apply_kv_batch("p1", &stored((100..140).collect()), 0.0);
        let a = s.schedule(&by_hashes((100..150).collect()), 0.0).unwrap();
        assert_eq!(a.prefill.name, "p1");
        assert_eq!(a.decode.url.as_deref(), Some("http://d0"));
        assert_eq!(a.local_prefix_blocks, 40);
        // Deregistering forgets the view; the slot is reused.
        s.deregister("p1").unwrap();
        s.register(reg("p2", Role::Prefill)).unwrap();
        assert_eq!(s.instance("p2").unwrap().prefill_slot, Some(1));
        assert_eq!(s.conductor().index().len(), 0);
        assert!(s.metrics(0).contains("mooncake_conductor_accepted_total 1"));
    }

    #[test]
    fn expected_view_routes_a_repeat_before_events() {
        let mut s = ConductorState::new(StateConfig::default()).unwrap();
        for n in ["p0", "p1", "p2", "p3"] {
            s.register(reg(n, Role::Prefill)).unwrap();
        }
        s.register(reg("d0", Role::Decode)).unwrap();
        let h: Vec<u64> = (7..27).collect();
        let first = s.schedule(&by_hashes(h.clone()), 0.0).unwrap();
        // Its prefill ran (the queue is free again) but no KV event has arrived yet.
        s.lifecycle(first.request_id, Lifecycle::PrefillStarted, 0.0);
        s.lifecycle(first.request_id, Lifecycle::PrefillFinished, 0.1);
        let again = s.schedule(&by_hashes(h.clone()), 0.1).unwrap();
        assert_eq!(first.prefill, again.prefill);
        assert_eq!(again.local_prefix_blocks, 20);
        // A refuting event (the engine evicted them) settles the expectation.
        let slot = s
            .instance(&first.prefill.name)
            .unwrap()
            .prefill_slot
            .unwrap();
        assert!(s.conductor().expected().get(7) & (1 << slot) != 0);
        s.apply_kv_batch(
            &first.prefill.name,
            &KvEventBatch {
                ts: 0.0,
                events: vec![KvEvent::BlockRemoved {
                    block_hashes: h,
                    medium: None,
                }],
                data_parallel_rank: None,
            },
            0.0,
        );
        assert!(s.conductor().expected().is_empty());
    }

    #[test]
    fn kv_events_store_remove_and_clear() {
        let mut cfg = StateConfig::default();
        cfg.conductor.expected_ttl_s = None;
        let mut s = ConductorState::new(cfg).unwrap();
        for n in ["p0", "p1"] {
            s.register(reg(n, Role::Prefill)).unwrap();
        }
        s.register(reg("d0", Role::Decode)).unwrap();
        s.apply_kv_batch("p0", &stored((0..30).collect()), 0.0);
        s.apply_kv_batch("p1", &stored((0..10).collect()), 0.0);
        let local = |s: &mut ConductorState| {
            let a = s.schedule(&by_hashes((0..30).collect()), 0.0).unwrap();
            s.lifecycle(a.request_id, Lifecycle::Dropped, 0.0);
            (a.prefill.name, a.local_prefix_blocks)
        };
        assert_eq!(local(&mut s), ("p0".into(), 30));
        // p0 evicts the middle of the prefix: its match stops there, p1 still has ten.
        let removed = KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockRemoved {
                block_hashes: (5..30).collect(),
                medium: None,
            }],
            data_parallel_rank: None,
        };
        s.apply_kv_batch("p0", &removed, 0.0);
        assert_eq!(s.instance("p0").unwrap().blocks, 5);
        assert_eq!(local(&mut s), ("p1".into(), 10));
        // p1 drops its whole cache: nothing of it is left in the index.
        let cleared = KvEventBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared],
            data_parallel_rank: None,
        };
        s.apply_kv_batch("p1", &cleared, 0.0);
        assert_eq!(s.instance("p1").unwrap().blocks, 0);
        assert_eq!(s.conductor().index().count_instance(1), 0);
        assert_eq!(s.conductor().index().len(), 5);
        assert_eq!(local(&mut s), ("p0".into(), 5));
        // A decode-only instance's events count as batches but index nothing.
        s.apply_kv_batch("d0", &stored((100..110).collect()), 0.0);
        assert_eq!(s.conductor().index().holders(100), 0);
    }

    #[test]
    fn store_blocks_are_a_prefix_source() {
        let mut s = ConductorState::new(StateConfig::default()).unwrap();
        s.register(reg("p0", Role::Prefill)).unwrap();
        s.register(reg("d0", Role::Decode)).unwrap();
        s.apply_store(&(0..64).collect::<Vec<_>>(), &[], false, 0.0);
        let a = s.schedule(&by_hashes((0..64).collect()), 0.0).unwrap();
        assert_eq!(a.prefill.name, "p0");
        let f = a.prefix_fetch.expect("fetches from the store");
        assert_eq!(
            (f.source.as_str(), f.blocks, f.local_blocks),
            ("store", 64, 0)
        );
        assert!(
            s.metrics(0)
                .contains("mooncake_conductor_store_fetches_total 1")
        );
        // A resync with nothing in it empties the store's view.
        s.apply_store(&[], &[], true, 0.0);
        assert_eq!(s.instance(STORE_INSTANCE).unwrap().blocks, 0);
    }

    #[test]
    fn overload_rejects_with_reason() {
        let mut cfg = StateConfig::default();
        cfg.conductor.admission = Admission::Early;
        cfg.conductor.policy = Policy::LoadBalance;
        cfg.conductor.ttft_slo_s = 2.0;
        let mut s = ConductorState::new(cfg).unwrap();
        s.register(reg("p0", Role::Prefill)).unwrap();
        s.register(reg("d0", Role::Decode)).unwrap();
        let big = ScheduleInput {
            input_tokens: Some(8192),
            ..Default::default()
        };
        // Each accepted prompt books its prefill: the queue grows until the SLO is missed.
        let mut accepted = 0;
        let r = loop {
            match s.schedule(&big, 0.0) {
                Ok(_) => accepted += 1,
                Err((_, r)) => break r,
            }
            assert!(accepted < 10);
        };
        assert!(accepted >= 1);
        match r {
            RejectReason::Overloaded { pool, load } => {
                assert_eq!(pool, "prefill");
                assert!(load > 1.0);
            }
            r => panic!("{r:?}"),
        }
        assert!(
            s.metrics(0)
                .contains("mooncake_conductor_rejected_total{reason=\"overloaded\"} 1")
        );
    }
}
