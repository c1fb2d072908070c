//! Discrete-event simulator of a Mooncake cluster (disaggregated prefill and decode pools driven
//! by any [`Scheduler`]) and of a coupled vLLM-like baseline, on a virtual clock.
//!
//! # Model
//!
//! - **Prefill instance**: FIFO queue, one request at a time, per-instance LRU DRAM cache of
//!   512-token blocks. A request starts when the instance is free and its ordered prefix fetch
//!   (if any) has arrived. Execution time is [`CostModel::prefill_exec_time`] of the prompt and
//!   the reused prefix (local match at start, or the fetched prefix). The request's blocks are
//!   stored in the cache when the prefill ends.
//! - **Network** ([`crate::net`]): every node has a send and a receive port at the effective
//!   NIC bandwidth, shared max-min fairly by the transfers in flight. Prefix fetches (source →
//!   prefill node) start at decision time; the prefill→decode KV stream starts with the
//!   prefill and overlaps it layer by layer, so the KV is at the decode node when the stream
//!   has finished and the last layer, computed at the end of the prefill, has been sent.
//! - **Decode instance**: iteration-level continuous batching. A request whose KV has reached
//!   the node's DRAM takes HBM for its prompt plus output once that fits (FIFO), is loaded
//!   DRAM → HBM at the host-to-device bandwidth (one load at a time, overlapped with decoding:
//!   FAST'25 Fig. 4), and joins at the next iteration boundary. Step time is
//!   [`CostModel::decode_step`] (plus [`CostModel::join_stall`], 0 by default).
//! - **Coupled baseline** (vLLM-like): one pool of instances, each running prefill and decode
//!   with v0.5-style scheduling (a prefill iteration stalls running decodes) or chunked prefill;
//!   optional HBM prefix cache.
//!
//! The first token of a request is the one its prefill computes; TTFT ends when the decode
//! instance delivers it, as the request joins its batch (after the KV stream and the load into
//! HBM), or, coupled, when the prefill iteration ends. TBT of a request is the mean of its
//! longest ⌈10%⌉ inter-token intervals, all of them decode iterations.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use mooncake_core::scheduler::{ClusterEvent, Decision, PrefixFetch, ScheduleRequest, Scheduler};
use serde::{Deserialize, Serialize};

use crate::net::{FlowId, Network};
use crate::trace::{Trace, percentile};
use mooncake_scheduler::ConductorConfig;
use mooncake_scheduler::CostModel;
use mooncake_scheduler::lru::{BlockMap, LruSet};

/// The coupled (vLLM-like) baseline's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CoupledConfig {
    /// Instances, each doing prefill and decode.
    pub instances: u32,
    /// HBM prefix cache capacity per instance, tokens (0: no prefix caching).
    pub prefix_cache_tokens: u64,
    /// Chunked prefill with this many tokens per iteration (decodes included); `None` runs
    /// whole prefills ahead of decodes (vLLM v0.5 default).
    pub chunk_tokens: Option<u32>,
    /// Token budget of one unchunked prefill iteration (several prompts may batch).
    pub prefill_batch_tokens: u32,
}

impl Default for CoupledConfig {
    fn default() -> Self {
        Self {
            instances: 16,
            prefix_cache_tokens: 0,
            chunk_tokens: None,
            prefill_batch_tokens: 131_072,
        }
    }
}

/// Simulation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SimConfig {
    /// The Conductor's settings (policy, admission, pool sizes, cost model, SLOs); the cost
    /// model and SLOs are also the simulator's.
    pub conductor: ConductorConfig,
    /// Run the coupled baseline instead of the disaggregated cluster.
    pub coupled: Option<CoupledConfig>,
    /// Replay speed: arrival times are divided by it.
    pub speed: f64,
    /// DRAM cache per prefill instance, tokens.
    pub cache_tokens: u64,
    /// Keep fetched prefix blocks in the destination's cache (hot-block replication).
    pub replicate: bool,
    /// Decode nodes refuse, after prefill, a request whose KV does not fit or that would push
    /// their TBT over the SLO (arXiv v1's local check; that prefill is wasted).
    pub decode_check: bool,
    /// Replace every request's output length (Fig. 10 forces 1).
    pub force_output: Option<u32>,
    /// Sampling period of the pool-load time series, seconds (0: none).
    pub load_sample_s: f64,
    /// Block keys whose replica counts (prefill instances caching them) are sampled (Fig. 11).
    pub replica_keys: Vec<u64>,
    /// Sampling period of the replica counts, seconds (0: none).
    pub replica_sample_s: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            conductor: ConductorConfig::default(),
            coupled: None,
            speed: 1.0,
            cache_tokens: 3_000_000,
            replicate: true,
            decode_check: false,
            force_output: None,
            load_sample_s: 0.0,
            replica_keys: Vec::new(),
            replica_sample_s: 0.0,
        }
    }
}

/// Where a request was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectStage {
    /// By the Conductor, on arrival.
    Arrival,
    /// By the decode node, after its prefill (wasted prefill).
    Decode,
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Index in the trace.
    pub id: u64,
    /// Arrival, seconds.
    pub arrival_s: f64,
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Output tokens (after `force_output`).
    pub output_tokens: u32,
    /// Prefill instance (coupled: the instance).
    pub prefill: Option<u32>,
    /// Decode instance (coupled: the instance).
    pub decode: Option<u32>,
    /// Where it was rejected, if it was.
    pub rejected: Option<RejectStage>,
    /// Prefill start, seconds.
    pub prefill_start_s: Option<f64>,
    /// Prefill end, seconds.
    pub prefill_end_s: Option<f64>,
    /// GPU seconds of prefill compute.
    pub prefill_gpu_s: f64,
    /// Prompt tokens whose KV was reused (local plus fetched).
    pub reused_tokens: u64,
    /// Of those, tokens fetched from another instance.
    pub fetched_tokens: u64,
    /// Duration of the prefill→decode KV transfer (from the prefill's start to the last byte),
    /// seconds.
    pub kv_transfer_s: Option<f64>,
    /// Time to first token, seconds.
    pub ttft_s: Option<f64>,
    /// Mean of the longest 10% inter-token intervals, seconds (`None` with ≤ 1 output token).
    pub tbt_s: Option<f64>,
    /// Completion, seconds.
    pub end_s: Option<f64>,
}

impl RequestRecord {
    /// Whether the request finished.
    pub fn completed(&self) -> bool {
        self.end_s.is_some()
    }

    /// Whether it finished within both SLOs.
    pub fn effective(&self, ttft_slo_s: f64, tbt_slo_s: f64) -> bool {
        self.completed()
            && self.ttft_s.is_some_and(|t| t <= ttft_slo_s)
            && self.tbt_s.is_none_or(|t| t <= tbt_slo_s)
    }
}

/// The summary of `mooncake simulate --json` (keys as listed in issue 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests in the trace.
    pub requests: usize,
    /// Requests that produced all their tokens.
    pub completed: usize,
    /// Requests rejected (on arrival or by a decode node).
    pub rejected: usize,
    /// Mean TTFT of completed requests, seconds.
    pub mean_ttft_s: f64,
    /// 90th percentile TTFT of completed requests, seconds.
    pub p90_ttft_s: f64,
    /// Mean TBT of completed requests with more than one output token, milliseconds.
    pub mean_tbt_ms: f64,
    /// Share of all requests completed with TTFT within the SLO.
    pub ttft_slo_attainment: f64,
    /// Share of all requests completed with TBT within the SLO.
    pub tbt_slo_attainment: f64,
    /// Reused prompt tokens / prompt tokens, over prefilled requests.
    pub token_hit_ratio: f64,
    /// Mean GPU seconds of prefill per prefilled request.
    pub mean_prefill_gpu_s: f64,
    /// Prefill GPU seconds spent on requests rejected after prefill.
    pub wasted_prefill_s: f64,
}

/// One sample of the pool loads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// Time, seconds.
    pub t_s: f64,
    /// Mean over prefill instances of queued prefill seconds / TTFT SLO.
    pub prefill_load: f64,
    /// Mean over decode instances of max(step time / TBT SLO, KV / HBM).
    pub decode_load: f64,
}

/// Replica counts of the sampled keys at one moment (Fig. 11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSample {
    /// Time, seconds.
    pub t_s: f64,
    /// For each of [`SimConfig::replica_keys`], the prefill instances caching it.
    pub replicas: Vec<u8>,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// Per-request records, in trace order.
    pub records: Vec<RequestRecord>,
    /// Aggregates.
    pub summary: Summary,
    /// Share of requests meeting both SLOs.
    pub effective_attainment: f64,
    /// Pool loads over time (when sampling was on).
    pub load_series: Vec<LoadSample>,
    /// Replica counts over time (when sampling was on).
    pub replica_series: Vec<ReplicaSample>,
    /// Events processed.
    pub events: u64,
    /// Whether the virtual clock never went backwards (an internal invariant, checked by tests).
    pub clock_monotonic: bool,
    /// Virtual time of the last event, seconds.
    pub makespan_s: f64,
}

impl SimResult {
    /// Share of requests that completed with TBT ≤ `x_s` (and TTFT within `ttft_slo_s`): the
    /// effective-request-capacity curve of Figs. 1, 6, 7.
    pub fn capacity_at(&self, ttft_slo_s: f64, x_s: f64) -> f64 {
        let n = self.records.len().max(1) as f64;
        self.records
            .iter()
            .filter(|r| r.effective(ttft_slo_s, x_s))
            .count() as f64
            / n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Arrival(usize),
    PrefillDone(u32),
    /// The network's next transfer completion, valid if the version still matches.
    Net(u64),
    /// A prefix fetch's last byte reached the prefill node.
    FetchArrived(usize),
    /// The request's KV is in the decode node's DRAM.
    KvArrived(usize),
    /// The request's KV is in the decode node's HBM.
    Loaded(usize),
    DecodeStep(u32),
    CoupledStep(u32),
    Sample,
    ReplicaSample,
}

#[derive(Debug, Clone, Copy)]
enum FlowKind {
    Fetch(usize),
    Stream(usize),
}

#[derive(Debug, Clone, Copy)]
struct Timed {
    t: f64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    // Reversed: BinaryHeap is a max-heap, we pop the earliest (then the first pushed).
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Clone)]
struct Running {
    req: usize,
    remaining: u32,
    last_token_s: f64,
    context: u64,
    intervals: Vec<f32>,
}

#[derive(Debug)]
struct PrefillNode {
    queue: VecDeque<usize>,
    busy: bool,
    current: Option<usize>,
    cache: LruSet,
    queued_s: f64,
}

#[derive(Debug, Default)]
struct DecodeNode {
    running: Vec<Running>,
    /// KV in DRAM, waiting for HBM.
    waiting: VecDeque<usize>,
    /// KV in HBM, joining at the next iteration.
    ready: Vec<usize>,
    /// HBM taken (running, ready and loading requests), tokens.
    kv_tokens: u64,
    waiting_tokens: u64,
    stepping: bool,
    /// When the host-to-device link is free of the loads ordered so far.
    h2d_free: f64,
}

#[derive(Debug)]
struct CoupledNode {
    waiting: VecDeque<usize>,
    running: Vec<Running>,
    /// Chunked prefill in progress: (request, tokens computed so far, reused prefix).
    chunking: Option<(usize, u64, u64)>,
    kv_tokens: u64,
    cache: LruSet,
    busy: bool,
    /// Requests prefilled in the current unchunked iteration.
    in_prefill: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
struct ReqState {
    fetch: Option<PrefixFetch>,
    booked_s: f64,
    /// A prefix fetch is still in flight.
    fetch_pending: bool,
    stream_start_s: f64,
    stream_end_s: Option<f64>,
    prefill_end_s: Option<f64>,
}

/// Mean of the longest ⌈10%⌉ intervals (`None` when there are none).
pub fn tbt_of(intervals: &mut [f32]) -> Option<f64> {
    if intervals.is_empty() {
        return None;
    }
    let k = intervals.len().div_ceil(10);
    let idx = intervals.len() - k;
    intervals.select_nth_unstable_by(idx, f32::total_cmp);
    let top = &intervals[idx..];
    Some(top.iter().map(|&x| f64::from(x)).sum::<f64>() / k as f64)
}

/// A discrete-event simulation of one trace replay.
pub struct Simulator<'t, S: Scheduler> {
    cfg: SimConfig,
    cost: CostModel,
    trace: &'t Trace,
    scheduler: S,
    heap: BinaryHeap<Timed>,
    seq: u64,
    now: f64,
    monotonic: bool,
    events: u64,
    records: Vec<RequestRecord>,
    reqs: Vec<ReqState>,
    hashes: Vec<Vec<u64>>,
    prefill: Vec<PrefillNode>,
    decode: Vec<DecodeNode>,
    coupled: Vec<CoupledNode>,
    net: Network,
    net_version: u64,
    flows: BlockMap<FlowKind>,
    block: u32,
    arrived: usize,
    done: usize,
    rr: u32,
    load_series: Vec<LoadSample>,
    replica_series: Vec<ReplicaSample>,
    scratch: Vec<u64>,
}

impl<'t, S: Scheduler> Simulator<'t, S> {
    /// A simulator replaying `trace` with `scheduler` (ignored by the coupled baseline).
    pub fn new(cfg: SimConfig, trace: &'t Trace, scheduler: S) -> Self {
        let cost = cfg.conductor.cost.clone();
        let block = cfg.conductor.block_tokens.max(1);
        let cache_blocks = (cfg.cache_tokens / u64::from(block)) as usize;
        let np = cfg.conductor.prefill_instances as usize;
        let nd = cfg.conductor.decode_instances as usize;
        let (prefill, decode, coupled) = match &cfg.coupled {
            None => (
                (0..np)
                    .map(|_| PrefillNode {
                        queue: VecDeque::new(),
                        busy: false,
                        current: None,
                        cache: LruSet::new(cache_blocks),
                        queued_s: 0.0,
                    })
                    .collect(),
                (0..nd).map(|_| DecodeNode::default()).collect(),
                Vec::new(),
            ),
            Some(c) => (
                Vec::new(),
                Vec::new(),
                (0..c.instances.max(1))
                    .map(|_| CoupledNode {
                        waiting: VecDeque::new(),
                        running: Vec::new(),
                        chunking: None,
                        kv_tokens: 0,
                        cache: LruSet::new((c.prefix_cache_tokens / u64::from(block)) as usize),
                        busy: false,
                        in_prefill: Vec::new(),
                    })
                    .collect(),
            ),
        };
        let net = Network::new(np + nd, cost.nic_bytes_per_s);
        let speed = if cfg.speed > 0.0 { cfg.speed } else { 1.0 };
        let t0 = trace.requests.first().map_or(0, |r| r.timestamp);
        let records = trace
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| RequestRecord {
                id: i as u64,
                arrival_s: (r.timestamp - t0) as f64 / 1000.0 / speed,
                input_tokens: r.input_length,
                output_tokens: cfg.force_output.unwrap_or(r.output_length),
                prefill: None,
                decode: None,
                rejected: None,
                prefill_start_s: None,
                prefill_end_s: None,
                prefill_gpu_s: 0.0,
                reused_tokens: 0,
                fetched_tokens: 0,
                kv_transfer_s: None,
                ttft_s: None,
                tbt_s: None,
                end_s: None,
            })
            .collect();
        Self {
            cost,
            trace,
            scheduler,
            heap: BinaryHeap::new(),
            seq: 0,
            now: 0.0,
            monotonic: true,
            events: 0,
            records,
            reqs: vec![ReqState::default(); trace.requests.len()],
            hashes: Vec::new(),
            prefill,
            decode,
            coupled,
            net,
            net_version: 0,
            flows: BlockMap::default(),
            block,
            arrived: 0,
            done: 0,
            rr: 0,
            load_series: Vec::new(),
            replica_series: Vec::new(),
            scratch: Vec::new(),
            cfg,
        }
    }

    fn push(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn prefix_tokens(&self, r: usize, blocks: u32) -> u64 {
        (u64::from(blocks) * u64::from(self.block))
            .min(u64::from(self.records[r].input_tokens).saturating_sub(1))
    }

    /// Starts a transfer of `bytes` from node `src` to node `dst` now.
    fn start_flow(&mut self, src: usize, dst: usize, bytes: f64, kind: FlowKind) {
        let id: FlowId = self.net.start(self.now, src, dst, bytes);
        self.flows.insert(id, kind);
        self.reschedule_net();
    }

    /// Schedules the network's next completion (older schedules become stale).
    fn reschedule_net(&mut self) {
        self.net_version += 1;
        if let Some(t) = self.net.next_completion() {
            let v = self.net_version;
            self.push(t.max(self.now), Ev::Net(v));
        }
    }

    fn on_net(&mut self, version: u64) {
        if version != self.net_version {
            return;
        }
        let done = self.net.finish(self.now);
        let latency = self.cost.nic_latency_s;
        for id in done {
            match self.flows.remove(&id) {
                Some(FlowKind::Fetch(i)) => self.push(self.now + latency, Ev::FetchArrived(i)),
                Some(FlowKind::Stream(i)) => {
                    self.reqs[i].stream_end_s = Some(self.now);
                    self.records[i].kv_transfer_s = Some(self.now - self.reqs[i].stream_start_s);
                    self.schedule_kv_arrival(i);
                }
                None => {}
            }
        }
        self.reschedule_net();
    }

    /// Once both the stream and the prefill are done: the KV is at the decode node when the
    /// stream is through and the last layer (computed at the prefill's end) has been sent.
    fn schedule_kv_arrival(&mut self, i: usize) {
        let (Some(stream), Some(pf)) = (self.reqs[i].stream_end_s, self.reqs[i].prefill_end_s)
        else {
            return;
        };
        let bytes = self.cost.kv_bytes(u64::from(self.records[i].input_tokens));
        let layer = bytes / self.cost.nic_bytes_per_s / f64::from(self.cost.layers.max(1));
        let t = stream.max(pf + layer) + self.cost.nic_latency_s;
        self.push(t, Ev::KvArrived(i));
    }

    /// Runs to completion. `progress(done, total)` is called every few hundred finished
    /// requests and once at the end.
    pub fn run(self, progress: &mut dyn FnMut(usize, usize)) -> SimResult {
        self.run_keeping_scheduler(progress).0
    }

    /// Like [`Self::run`], also handing back the scheduler (to inspect its final state).
    pub fn run_keeping_scheduler(
        mut self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> (SimResult, S) {
        let n = self.trace.requests.len();
        self.hashes = self
            .trace
            .requests
            .iter()
            .map(|r| r.hash_ids.clone())
            .collect();
        for i in 0..n {
            let t = self.records[i].arrival_s;
            self.push(t, Ev::Arrival(i));
        }
        if self.cfg.load_sample_s > 0.0 && self.cfg.coupled.is_none() {
            self.push(0.0, Ev::Sample);
        }
        if self.cfg.replica_sample_s > 0.0
            && !self.cfg.replica_keys.is_empty()
            && self.cfg.coupled.is_none()
        {
            self.push(0.0, Ev::ReplicaSample);
        }
        let mut last_report = 0;
        while let Some(Timed { t, ev, .. }) = self.heap.pop() {
            if t < self.now {
                self.monotonic = false;
            }
            self.now = self.now.max(t);
            self.events += 1;
            match ev {
                Ev::Arrival(i) => self.on_arrival(i),
                Ev::PrefillDone(p) => self.on_prefill_done(p),
                Ev::Net(v) => self.on_net(v),
                Ev::FetchArrived(i) => {
                    self.reqs[i].fetch_pending = false;
                    if let Some(p) = self.records[i].prefill {
                        self.try_start_prefill(p);
                    }
                }
                Ev::KvArrived(i) => self.on_kv_arrived(i),
                Ev::Loaded(i) => self.on_loaded(i),
                Ev::DecodeStep(d) => self.on_decode_step_end(d),
                Ev::CoupledStep(c) => self.on_coupled_step_end(c),
                Ev::Sample => self.on_sample(),
                Ev::ReplicaSample => self.on_replica_sample(),
            }
            if self.done >= last_report + 256 {
                last_report = self.done;
                progress(self.done, n);
            }
        }
        progress(self.done, n);
        self.finish()
    }

    fn finish(self) -> (SimResult, S) {
        let c = &self.cfg.conductor;
        let summary = summarize(&self.records, c.ttft_slo_s, c.tbt_slo_s);
        let n = self.records.len().max(1) as f64;
        let effective = self
            .records
            .iter()
            .filter(|r| r.effective(c.ttft_slo_s, c.tbt_slo_s))
            .count() as f64
            / n;
        let result = SimResult {
            summary,
            effective_attainment: effective,
            load_series: self.load_series,
            replica_series: self.replica_series,
            events: self.events,
            clock_monotonic: self.monotonic,
            makespan_s: self.now,
            records: self.records,
        };
        (result, self.scheduler)
    }

    fn on_sample(&mut self) {
        let c = &self.cfg.conductor;
        let now = self.now;
        let pl = self
            .prefill
            .iter()
            .map(|p| p.queued_s / c.ttft_slo_s)
            .sum::<f64>()
            / self.prefill.len().max(1) as f64;
        let dl = self
            .decode
            .iter()
            .map(|d| {
                let ctx: u64 = d.running.iter().map(|r| r.context).sum();
                (self.cost.decode_step(d.running.len() as u64, ctx) / c.tbt_slo_s)
                    .max(d.kv_tokens as f64 / self.cost.vram_tokens as f64)
            })
            .sum::<f64>()
            / self.decode.len().max(1) as f64;
        self.load_series.push(LoadSample {
            t_s: now,
            prefill_load: pl,
            decode_load: dl,
        });
        // Keep sampling while anything else is pending (never on an otherwise empty queue).
        if !self.heap.is_empty() {
            self.push(now + self.cfg.load_sample_s, Ev::Sample);
        }
    }

    fn on_replica_sample(&mut self) {
        let replicas = self
            .cfg
            .replica_keys
            .iter()
            .map(|&k| self.prefill.iter().filter(|p| p.cache.contains(k)).count() as u8)
            .collect();
        self.replica_series.push(ReplicaSample {
            t_s: self.now,
            replicas,
        });
        if !self.heap.is_empty() {
            self.push(self.now + self.cfg.replica_sample_s, Ev::ReplicaSample);
        }
    }

    fn finish_request(&mut self) {
        self.done += 1;
    }

    fn on_arrival(&mut self, i: usize) {
        self.arrived += 1;
        if self.cfg.coupled.is_some() {
            self.coupled_arrival(i);
            return;
        }
        let rec = &self.records[i];
        let req = ScheduleRequest {
            id: i as u64,
            input_tokens: rec.input_tokens,
            output_tokens: rec.output_tokens,
            block_hashes: std::mem::take(&mut self.hashes[i]),
        };
        let decision = self.scheduler.schedule(&req, self.now);
        self.hashes[i] = req.block_hashes;
        match decision {
            Decision::Reject(_) => {
                self.records[i].rejected = Some(RejectStage::Arrival);
                self.finish_request();
            }
            Decision::Accept(pl) => {
                let p = pl.prefill as usize;
                let np = self.prefill.len();
                assert!(
                    p < np && (pl.decode as usize) < self.decode.len(),
                    "scheduler placed request {i} on a nonexistent instance"
                );
                self.records[i].prefill = Some(pl.prefill);
                self.records[i].decode = Some(pl.decode);
                if let Some(f) = pl.fetch
                    && (f.source as usize) < np
                    && f.source != pl.prefill
                {
                    let tokens = self
                        .prefix_tokens(i, f.blocks)
                        .saturating_sub(self.prefix_tokens(i, f.local_blocks));
                    let bytes = self.cost.kv_bytes(tokens);
                    self.reqs[i].fetch = Some(f);
                    self.reqs[i].fetch_pending = true;
                    self.start_flow(f.source as usize, p, bytes, FlowKind::Fetch(i));
                }
                let predicted = self
                    .cost
                    .prefill_exec_time(u64::from(self.records[i].input_tokens), pl.reused_tokens);
                self.reqs[i].booked_s = predicted;
                let node = &mut self.prefill[p];
                node.queue.push_back(i);
                node.queued_s += predicted;
                self.try_start_prefill(pl.prefill);
            }
        }
    }

    fn try_start_prefill(&mut self, p: u32) {
        let pi = p as usize;
        if self.prefill[pi].busy {
            return;
        }
        let Some(&i) = self.prefill[pi].queue.front() else {
            return;
        };
        if self.reqs[i].fetch_pending {
            // Starts when the fetch arrives (FetchArrived).
            return;
        }
        self.prefill[pi].queue.pop_front();
        // Local match now (the cache may have changed since the decision), touching hits.
        let hashes = std::mem::take(&mut self.hashes[i]);
        let mut local = 0u32;
        for &h in &hashes {
            if !self.prefill[pi].cache.touch(h) {
                break;
            }
            local += 1;
        }
        let fetched_blocks = self.reqs[i].fetch.map_or(0, |f| f.blocks);
        let prefix_blocks = local.max(fetched_blocks);
        let n = u64::from(self.records[i].input_tokens);
        let reused = self.prefix_tokens(i, prefix_blocks);
        let fetched = if fetched_blocks > local {
            reused.saturating_sub(self.prefix_tokens(i, local))
        } else {
            0
        };
        let dur = self.cost.prefill_exec_time(n, reused);
        let node = &mut self.prefill[pi];
        node.busy = true;
        node.current = Some(i);
        node.queued_s = (node.queued_s - self.reqs[i].booked_s).max(0.0);
        let now = self.now;
        let rec = &mut self.records[i];
        rec.prefill_start_s = Some(now);
        rec.prefill_gpu_s = dur;
        rec.reused_tokens = reused;
        rec.fetched_tokens = fetched;
        self.scheduler.observe(
            ClusterEvent::PrefillStarted {
                request: i as u64,
                instance: p,
            },
            now,
        );
        // The KV stream to the decode node overlaps the prefill layer by layer.
        let d = self.records[i].decode.unwrap_or(0) as usize;
        let bytes = self.cost.kv_bytes(n);
        let np = self.prefill.len();
        self.reqs[i].stream_start_s = now;
        self.hashes[i] = hashes;
        self.push(now + dur, Ev::PrefillDone(p));
        self.start_flow(pi, np + d, bytes, FlowKind::Stream(i));
    }

    fn on_prefill_done(&mut self, p: u32) {
        let pi = p as usize;
        let i = self.prefill[pi]
            .current
            .take()
            .expect("prefill in progress");
        self.prefill[pi].busy = false;
        let now = self.now;
        self.records[i].prefill_end_s = Some(now);
        // Store the request's blocks (fetched ones only with replication).
        let hashes = std::mem::take(&mut self.hashes[i]);
        let skip = match self.reqs[i].fetch {
            Some(f) if !self.cfg.replicate => f.blocks.min(hashes.len() as u32) as usize,
            _ => 0,
        };
        let mut evicted = std::mem::take(&mut self.scratch);
        evicted.clear();
        for &h in &hashes[skip..] {
            self.prefill[pi].cache.insert(h, |k| evicted.push(k));
        }
        // A request longer than the cache evicts its own first blocks: report net changes.
        if !evicted.is_empty() {
            self.scheduler.observe(
                ClusterEvent::BlocksRemoved {
                    instance: p,
                    block_hashes: &evicted,
                },
                now,
            );
        }
        let stored: Vec<u64> = hashes[skip..]
            .iter()
            .copied()
            .filter(|&h| self.prefill[pi].cache.contains(h))
            .collect();
        self.scheduler.observe(
            ClusterEvent::BlocksStored {
                instance: p,
                block_hashes: &stored,
            },
            now,
        );
        self.scratch = evicted;
        self.hashes[i] = hashes;
        self.scheduler.observe(
            ClusterEvent::PrefillFinished {
                request: i as u64,
                instance: p,
            },
            now,
        );
        self.reqs[i].prefill_end_s = Some(now);
        self.schedule_kv_arrival(i);
        self.try_start_prefill(p);
    }

    fn on_kv_arrived(&mut self, i: usize) {
        let now = self.now;
        let d = self.records[i].decode.unwrap_or(0);
        let di = d as usize;
        let n = u64::from(self.records[i].input_tokens);
        let out = u64::from(self.records[i].output_tokens);
        if self.cfg.decode_check {
            let node = &self.decode[di];
            let ctx: u64 = node.running.iter().map(|r| r.context).sum::<u64>() + n;
            let step = self.cost.decode_step(node.running.len() as u64 + 1, ctx);
            let fits = node.kv_tokens + node.waiting_tokens + n + out <= self.cost.vram_tokens;
            if !fits || step > self.cfg.conductor.tbt_slo_s {
                let rec = &mut self.records[i];
                rec.rejected = Some(RejectStage::Decode);
                self.scheduler
                    .observe(ClusterEvent::Dropped { request: i as u64 }, now);
                self.finish_request();
                return;
            }
        }
        if out <= 1 {
            // The prefill's token is the whole output: delivered as the KV arrives.
            self.records[i].ttft_s = Some(now - self.records[i].arrival_s);
            self.scheduler.observe(
                ClusterEvent::DecodeStarted {
                    request: i as u64,
                    instance: d,
                },
                now,
            );
            self.records[i].end_s = Some(now);
            self.scheduler.observe(
                ClusterEvent::DecodeFinished {
                    request: i as u64,
                    instance: d,
                },
                now,
            );
            self.finish_request();
            return;
        }
        let node = &mut self.decode[di];
        node.waiting.push_back(i);
        node.waiting_tokens += n + out;
        self.admit_waiting(d);
    }

    /// Gives HBM to waiting requests in arrival order while they fit (or the node is empty)
    /// and starts their loads DRAM → HBM, one after the other on the node's host link.
    fn admit_waiting(&mut self, d: u32) {
        let di = d as usize;
        let vram = self.cost.vram_tokens;
        while let Some(&i) = self.decode[di].waiting.front() {
            let n = u64::from(self.records[i].input_tokens);
            let need = n + u64::from(self.records[i].output_tokens);
            let node = &mut self.decode[di];
            if node.kv_tokens + need > vram && node.kv_tokens > 0 {
                break;
            }
            node.waiting.pop_front();
            node.waiting_tokens -= need;
            node.kv_tokens += need;
            let start = node.h2d_free.max(self.now);
            let end = start + self.cost.prefix_load_time(n);
            node.h2d_free = end;
            self.push(end, Ev::Loaded(i));
        }
    }

    fn on_loaded(&mut self, i: usize) {
        let d = self.records[i].decode.unwrap_or(0);
        self.decode[d as usize].ready.push(i);
        if !self.decode[d as usize].stepping {
            self.start_decode_step(d);
        }
    }

    fn start_decode_step(&mut self, d: u32) {
        let di = d as usize;
        let now = self.now;
        let mut joined_tokens = 0u64;
        let ready = std::mem::take(&mut self.decode[di].ready);
        for &i in &ready {
            let n = u64::from(self.records[i].input_tokens);
            let remaining = self.records[i].output_tokens - 1;
            self.records[i].ttft_s = Some(now - self.records[i].arrival_s);
            self.decode[di].running.push(Running {
                req: i,
                remaining,
                last_token_s: now,
                context: n + 1,
                intervals: Vec::with_capacity(remaining as usize),
            });
            joined_tokens += n;
            self.scheduler.observe(
                ClusterEvent::DecodeStarted {
                    request: i as u64,
                    instance: d,
                },
                now,
            );
        }
        let mut ready = ready;
        ready.clear();
        let node = &mut self.decode[di];
        node.ready = ready;
        if node.running.is_empty() {
            node.stepping = false;
            return;
        }
        let ctx: u64 = node.running.iter().map(|r| r.context).sum();
        let dur = self.cost.decode_step(node.running.len() as u64, ctx)
            + self.cost.join_stall(joined_tokens);
        node.stepping = true;
        self.push(now + dur, Ev::DecodeStep(d));
    }

    fn on_decode_step_end(&mut self, d: u32) {
        let di = d as usize;
        let now = self.now;
        let mut finished = Vec::new();
        let node = &mut self.decode[di];
        node.running.retain_mut(|r| {
            r.intervals.push((now - r.last_token_s) as f32);
            r.last_token_s = now;
            r.remaining -= 1;
            r.context += 1;
            if r.remaining == 0 {
                finished.push((r.req, std::mem::take(&mut r.intervals)));
                false
            } else {
                true
            }
        });
        for (i, mut iv) in finished {
            let need =
                u64::from(self.records[i].input_tokens) + u64::from(self.records[i].output_tokens);
            self.decode[di].kv_tokens -= need;
            let rec = &mut self.records[i];
            rec.tbt_s = tbt_of(&mut iv);
            rec.end_s = Some(now);
            self.scheduler.observe(
                ClusterEvent::DecodeFinished {
                    request: i as u64,
                    instance: d,
                },
                now,
            );
            self.finish_request();
        }
        self.admit_waiting(d);
        self.start_decode_step(d);
    }

    // ----- coupled baseline -----

    fn coupled_arrival(&mut self, i: usize) {
        // Route to the instance with the fewest requests in flight (ties rotate).
        let nc = self.coupled.len() as u32;
        let start = self.rr % nc;
        self.rr = self.rr.wrapping_add(1);
        let mut best = (start, usize::MAX);
        for k in 0..nc {
            let c = (start + k) % nc;
            let node = &self.coupled[c as usize];
            let load = node.waiting.len()
                + node.running.len()
                + node.in_prefill.len()
                + usize::from(node.chunking.is_some());
            if load < best.1 {
                best = (c, load);
            }
        }
        let c = best.0;
        self.records[i].prefill = Some(c);
        self.records[i].decode = Some(c);
        self.coupled[c as usize].waiting.push_back(i);
        if !self.coupled[c as usize].busy {
            self.start_coupled_step(c);
        }
    }

    /// Local prefix match on a coupled instance's HBM cache, touching hits; reused tokens.
    fn coupled_prefix(&mut self, c: usize, i: usize) -> u64 {
        let mut blocks = 0u32;
        for &h in &self.hashes[i] {
            if !self.coupled[c].cache.touch(h) {
                break;
            }
            blocks += 1;
        }
        self.prefix_tokens(i, blocks)
    }

    fn coupled_store(&mut self, c: usize, i: usize) {
        let hashes = std::mem::take(&mut self.hashes[i]);
        for &h in &hashes {
            self.coupled[c].cache.insert(h, |_| {});
        }
        self.hashes[i] = hashes;
    }

    fn start_coupled_step(&mut self, c: u32) {
        let ci = c as usize;
        let now = self.now;
        let vram = self.cost.vram_tokens;
        let chunk = self.cfg.coupled.as_ref().and_then(|x| x.chunk_tokens);
        let budget = self
            .cfg
            .coupled
            .as_ref()
            .map_or(131_072, |x| x.prefill_batch_tokens);
        let need = |s: &Self, i: usize| {
            u64::from(s.records[i].input_tokens) + u64::from(s.records[i].output_tokens)
        };
        let decode_cost = |s: &Self| {
            let node = &s.coupled[ci];
            let ctx: u64 = node.running.iter().map(|r| r.context).sum();
            s.cost.decode_step(node.running.len() as u64, ctx)
        };
        let mut dur;
        match chunk {
            None => {
                // Prefill-first: batch waiting prompts that fit, else decode.
                let mut tokens = 0u64;
                let mut pf = 0.0;
                while let Some(&i) = self.coupled[ci].waiting.front() {
                    let nd = need(self, i);
                    let n = u64::from(self.records[i].input_tokens);
                    let node = &self.coupled[ci];
                    let empty = node.running.is_empty() && node.in_prefill.is_empty();
                    if (node.kv_tokens + nd > vram && !empty)
                        || (tokens + n > u64::from(budget) && !node.in_prefill.is_empty())
                    {
                        break;
                    }
                    self.coupled[ci].waiting.pop_front();
                    self.coupled[ci].kv_tokens += nd;
                    let reused = self.coupled_prefix(ci, i);
                    let t = self.cost.prefill_exec_time(n, reused);
                    let rec = &mut self.records[i];
                    rec.prefill_start_s = Some(now);
                    rec.prefill_gpu_s = t;
                    rec.reused_tokens = reused;
                    pf += t;
                    tokens += n;
                    self.coupled[ci].in_prefill.push(i);
                }
                dur = if self.coupled[ci].in_prefill.is_empty() {
                    decode_cost(self)
                } else {
                    pf
                };
            }
            Some(chunk) => {
                dur = decode_cost(self);
                let mut room =
                    u64::from(chunk).saturating_sub(self.coupled[ci].running.len() as u64);
                if room == 0 && self.coupled[ci].running.is_empty() {
                    room = u64::from(chunk.max(1));
                }
                if self.coupled[ci].chunking.is_none()
                    && let Some(&i) = self.coupled[ci].waiting.front()
                {
                    let nd = need(self, i);
                    let node = &self.coupled[ci];
                    if node.kv_tokens + nd <= vram || node.running.is_empty() {
                        self.coupled[ci].waiting.pop_front();
                        self.coupled[ci].kv_tokens += nd;
                        let reused = self.coupled_prefix(ci, i);
                        self.records[i].prefill_start_s = Some(now);
                        self.records[i].reused_tokens = reused;
                        self.coupled[ci].chunking = Some((i, reused, reused));
                    }
                }
                if room > 0
                    && let Some((i, done, reused)) = self.coupled[ci].chunking
                {
                    let n = u64::from(self.records[i].input_tokens);
                    let upto = (done + room).min(n);
                    let mut t = self.cost.prefill_time(upto, done);
                    if done == reused {
                        t = t.max(self.cost.prefix_load_time(reused));
                    }
                    self.records[i].prefill_gpu_s += t;
                    dur += t;
                    self.coupled[ci].chunking = Some((i, upto, reused));
                }
            }
        }
        let node = &mut self.coupled[ci];
        if node.running.is_empty() && node.in_prefill.is_empty() && node.chunking.is_none() {
            node.busy = false;
            return;
        }
        node.busy = true;
        self.push(now + dur, Ev::CoupledStep(c));
    }

    fn on_coupled_step_end(&mut self, c: u32) {
        let ci = c as usize;
        let now = self.now;
        // Decodes advance only in decode iterations (unchunked) or every iteration (chunked).
        let chunked = self
            .cfg
            .coupled
            .as_ref()
            .is_some_and(|x| x.chunk_tokens.is_some());
        let prefilled: Vec<usize> = std::mem::take(&mut self.coupled[ci].in_prefill);
        let mut newly: Vec<usize> = prefilled;
        if chunked
            && let Some((i, done, _)) = self.coupled[ci].chunking
            && done >= u64::from(self.records[i].input_tokens)
        {
            self.coupled[ci].chunking = None;
            newly.push(i);
        }
        if chunked || newly.is_empty() {
            let mut finished = Vec::new();
            self.coupled[ci].running.retain_mut(|r| {
                r.intervals.push((now - r.last_token_s) as f32);
                r.last_token_s = now;
                r.remaining -= 1;
                r.context += 1;
                if r.remaining == 0 {
                    finished.push((r.req, std::mem::take(&mut r.intervals)));
                    false
                } else {
                    true
                }
            });
            for (i, mut iv) in finished {
                let nd = u64::from(self.records[i].input_tokens)
                    + u64::from(self.records[i].output_tokens);
                self.coupled[ci].kv_tokens -= nd;
                let rec = &mut self.records[i];
                rec.tbt_s = tbt_of(&mut iv);
                rec.end_s = Some(now);
                self.finish_request();
            }
        }
        for i in newly {
            self.coupled_store(ci, i);
            let out = self.records[i].output_tokens;
            let rec = &mut self.records[i];
            rec.prefill_end_s = Some(now);
            rec.ttft_s = Some(now - rec.arrival_s);
            if out <= 1 {
                rec.end_s = Some(now);
                let nd = u64::from(rec.input_tokens) + u64::from(out);
                self.coupled[ci].kv_tokens -= nd;
                self.finish_request();
            } else {
                let n = u64::from(self.records[i].input_tokens);
                self.coupled[ci].running.push(Running {
                    req: i,
                    remaining: out - 1,
                    last_token_s: now,
                    context: n + 1,
                    intervals: Vec::with_capacity(out as usize - 1),
                });
            }
        }
        self.start_coupled_step(c);
    }
}

/// Aggregates per-request records into the `--json` summary.
pub fn summarize(records: &[RequestRecord], ttft_slo_s: f64, tbt_slo_s: f64) -> Summary {
    let n = records.len();
    let completed: Vec<&RequestRecord> = records.iter().filter(|r| r.completed()).collect();
    let ttfts: Vec<f64> = completed.iter().filter_map(|r| r.ttft_s).collect();
    let tbts: Vec<f64> = completed.iter().filter_map(|r| r.tbt_s).collect();
    let prefilled: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.prefill_end_s.is_some())
        .collect();
    let input: u64 = prefilled.iter().map(|r| u64::from(r.input_tokens)).sum();
    let reused: u64 = prefilled.iter().map(|r| r.reused_tokens).sum();
    let denom = n.max(1) as f64;
    Summary {
        requests: n,
        completed: completed.len(),
        rejected: records.iter().filter(|r| r.rejected.is_some()).count(),
        mean_ttft_s: crate::trace::mean(&ttfts),
        p90_ttft_s: percentile(&ttfts, 0.9),
        mean_tbt_ms: crate::trace::mean(&tbts) * 1000.0,
        ttft_slo_attainment: completed
            .iter()
            .filter(|r| r.ttft_s.is_some_and(|t| t <= ttft_slo_s))
            .count() as f64
            / denom,
        tbt_slo_attainment: completed
            .iter()
            .filter(|r| r.tbt_s.is_none_or(|t| t <= tbt_slo_s))
            .count() as f64
            / denom,
        token_hit_ratio: if input == 0 {
            0.0
        } else {
            reused as f64 / input as f64
        },
        mean_prefill_gpu_s: if prefilled.is_empty() {
            0.0
        } else {
            prefilled.iter().map(|r| r.prefill_gpu_s).sum::<f64>() / prefilled.len() as f64
        },
        wasted_prefill_s: records
            .iter()
            .filter(|r| r.rejected == Some(RejectStage::Decode))
            .map(|r| r.prefill_gpu_s)
            .sum::<f64>()
            + 0.0,
    }
}

/// Replays `trace` under `cfg` with a [`mooncake_scheduler::Conductor`] built from `cfg.conductor`.
pub fn simulate(
    cfg: &SimConfig,
    trace: &Trace,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SimResult, mooncake_scheduler::ScheduleError> {
    let conductor = mooncake_scheduler::Conductor::new(cfg.conductor.clone())?;
    Ok(Simulator::new(cfg.clone(), trace, conductor).run(progress))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRequest;
    use mooncake_scheduler::{Admission, Policy};

    fn trace(reqs: &[(u64, u32, u32, std::ops::Range<u64>)]) -> Trace {
        Trace {
            requests: reqs
                .iter()
                .map(|(t, i, o, h)| TraceRequest {
                    timestamp: *t,
                    input_length: *i,
                    output_length: *o,
                    hash_ids: h.clone().collect(),
                })
                .collect(),
        }
    }

    fn cfg(np: u32, nd: u32) -> SimConfig {
        let mut c = SimConfig::default();
        c.conductor.prefill_instances = np;
        c.conductor.decode_instances = nd;
        c.conductor.policy = Policy::Mooncake;
        c
    }

    fn run(c: &SimConfig, t: &Trace) -> SimResult {
        simulate(c, t, &mut |_, _| {}).unwrap()
    }

    #[test]
    fn summary_json_keys_are_the_issues() {
        let r = run(&cfg(1, 1), &trace(&[(0, 1000, 3, 0..2)]));
        let v = serde_json::to_value(&r.summary).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        let mut expected = [
            "requests",
            "completed",
            "rejected",
            "mean_ttft_s",
            "p90_ttft_s",
            "mean_tbt_ms",
            "ttft_slo_attainment",
            "tbt_slo_attainment",
            "token_hit_ratio",
            "mean_prefill_gpu_s",
            "wasted_prefill_s",
        ];
        expected.sort_unstable();
        assert_eq!(sorted, expected);
        assert_eq!(v["wasted_prefill_s"].to_string(), "0.0");
    }

    #[test]
    fn tbt_is_mean_of_longest_tenth() {
        assert_eq!(tbt_of(&mut []), None);
        assert_eq!(tbt_of(&mut [0.5]), Some(0.5));
        let mut v: Vec<f32> = (1..=20).map(|x| x as f32).collect();
        assert_eq!(tbt_of(&mut v), Some(19.5));
        let mut v: Vec<f32> = (1..=11).map(|x| x as f32).collect();
        assert_eq!(tbt_of(&mut v), Some(10.5));
    }

    #[test]
    fn single_request_timeline_follows_cost_model() {
        let t = trace(&[(0, 8192, 5, 0..16)]);
        let c = cfg(1, 1);
        let r = run(&c, &t);
        let cost = &c.conductor.cost;
        let pf = cost.prefill_time(8192, 0);
        let x = cost.transfer_time(8192);
        let layer = (x - cost.nic_latency_s) / 80.0;
        // The stream (shorter than the prefill) is done when the last layer has been sent;
        // then one latency, then the load into the decode node's HBM.
        let kv_at_decode = pf.max(x) + layer + cost.nic_latency_s;
        let ttft = kv_at_decode + cost.prefix_load_time(8192);
        let rec = &r.records[0];
        assert!((rec.ttft_s.unwrap() - ttft).abs() < 1e-9, "{rec:?}");
        assert!((rec.kv_transfer_s.unwrap() - x + cost.nic_latency_s).abs() < 1e-9);
        assert!((rec.prefill_gpu_s - pf).abs() < 1e-12);
        // Four decode steps with batch 1 and context 8193..8196.
        let steps: f64 = (0..4).map(|k| cost.decode_step(1, 8193 + k)).sum();
        assert!((rec.end_s.unwrap() - (ttft + steps)).abs() < 1e-9);
        assert!((rec.tbt_s.unwrap() - cost.decode_step(1, 8196)).abs() < 1e-6);
        assert_eq!(r.summary.completed, 1);
        assert_eq!(r.summary.token_hit_ratio, 0.0);
        assert!(r.clock_monotonic);
    }

    #[test]
    fn second_turn_reuses_cached_prefix() {
        // Same 16 blocks 100 s later, plus 4 new ones.
        let t = trace(&[(0, 8192, 2, 0..16), (100_000, 10_240, 2, 0..20)]);
        let r = run(&cfg(2, 1), &t);
        let b = &r.records[1];
        assert_eq!(b.prefill, r.records[0].prefill);
        assert_eq!(b.reused_tokens, 8192);
        assert_eq!(b.fetched_tokens, 0);
        let cost = CostModel::default();
        assert!((b.prefill_gpu_s - cost.prefill_exec_time(10_240, 8192)).abs() < 1e-12);
        let hit = 8192.0 / (8192.0 + 10_240.0);
        assert!((r.summary.token_hit_ratio - hit).abs() < 1e-12);
    }

    #[test]
    fn busy_holder_makes_mooncake_fetch_and_replicate() {
        // r0 caches blocks 0..60 on one instance; r1 extends that prefix to 400 blocks and
        // follows it there (≈ 15 s of prefill); r2 shares the 60-block prefix and arrives
        // while the holder is busy, so it fetches the prefix to the idle instance.
        let mut t = trace(&[
            (0, 60 * 512, 1, 0..60),
            (20_000, 400 * 512, 1, 0..400),
            (20_100, 64 * 512, 1, 0..0),
        ]);
        t.requests[2].hash_ids = (0..60).chain(9000..9004).collect();
        let c2 = cfg(2, 1);
        let conductor = mooncake_scheduler::Conductor::new(c2.conductor.clone()).unwrap();
        let (r, conductor) =
            Simulator::new(c2.clone(), &t, conductor).run_keeping_scheduler(&mut |_, _| {});
        // Hot-block replication: the fetched prefix now lives on both instances.
        assert_eq!(conductor.index().holders(0).count_ones(), 2);
        assert_eq!(conductor.index().holders(59).count_ones(), 2);
        assert_eq!(conductor.index().holders(100).count_ones(), 1);
        let mut no_rep = c2.clone();
        no_rep.replicate = false;
        let conductor = mooncake_scheduler::Conductor::new(no_rep.conductor.clone()).unwrap();
        let (_, conductor) =
            Simulator::new(no_rep, &t, conductor).run_keeping_scheduler(&mut |_, _| {});
        assert_eq!(conductor.index().holders(0).count_ones(), 1);
        assert_eq!(conductor.index().holders(9000).count_ones(), 1);
        let (a, b, c) = (&r.records[0], &r.records[1], &r.records[2]);
        assert_eq!(a.prefill, b.prefill, "r1 follows its cached prefix");
        assert_ne!(c.prefill, b.prefill, "r2 avoids the busy holder");
        assert_eq!(c.reused_tokens, 60 * 512);
        assert_eq!(c.fetched_tokens, 60 * 512);
        // Local-cache recomputes instead.
        let mut lc = cfg(2, 1);
        lc.conductor.policy = Policy::LocalCache;
        let r = run(&lc, &t);
        assert_eq!(r.records[2].fetched_tokens, 0);
    }

    #[test]
    fn decode_check_rejects_after_prefill_and_counts_waste() {
        let t = trace(&[(0, 8192, 50, 0..16), (10, 8192, 50, 100..116)]);
        let mut c = cfg(2, 1);
        c.conductor.cost.vram_tokens = 10_000;
        c.decode_check = true;
        let r = run(&c, &t);
        assert_eq!(r.summary.rejected, 1);
        assert_eq!(r.summary.completed, 1);
        let late = r.records.iter().find(|x| x.rejected.is_some()).unwrap();
        assert_eq!(late.rejected, Some(RejectStage::Decode));
        assert!((r.summary.wasted_prefill_s - late.prefill_gpu_s).abs() < 1e-12);
        assert!(late.prefill_gpu_s > 0.5);
        // Without the check the second waits for HBM instead.
        c.decode_check = false;
        let r = run(&c, &t);
        assert_eq!(r.summary.completed, 2);
        // They decode one after the other: the ends are at least 49 bare steps apart.
        let ends: Vec<f64> = r.records.iter().map(|x| x.end_s.unwrap()).collect();
        assert!((ends[0] - ends[1]).abs() >= 49.0 * 0.026, "{ends:?}");
    }

    #[test]
    fn arrival_rejection_is_recorded() {
        let t = trace(&[(0, 100_000, 2, 0..196)]);
        let mut c = cfg(1, 1);
        c.conductor.admission = Admission::Slo;
        c.conductor.ttft_slo_s = 1.0;
        let r = run(&c, &t);
        assert_eq!(r.records[0].rejected, Some(RejectStage::Arrival));
        assert_eq!(r.summary.rejected, 1);
        assert_eq!(r.summary.wasted_prefill_s, 0.0);
        assert!(r.records[0].prefill_start_s.is_none());
    }

    #[test]
    fn coupled_prefill_stalls_decodes_and_chunking_interleaves() {
        // A decoding request, then a long prompt arrives: unchunked, one interval of the first
        // request spans the whole 27 s prefill; chunked, its intervals stay short.
        let t = trace(&[(0, 1024, 40, 0..2), (500, 131_072, 2, 10..266)]);
        let mut c = cfg(1, 1);
        let mut v = CoupledConfig {
            instances: 1,
            ..CoupledConfig::default()
        };
        c.coupled = Some(v.clone());
        let r = run(&c, &t);
        let a = &r.records[0];
        let cost = CostModel::default();
        assert!((a.ttft_s.unwrap() - cost.prefill_time(1024, 0)).abs() < 1e-9);
        // TBT = mean of the longest 4 of 39 intervals, one of which spans the 27.6 s prefill.
        assert!(a.tbt_s.unwrap() > 27.0 / 4.0, "{a:?}");
        v.chunk_tokens = Some(2048);
        c.coupled = Some(v);
        let r = run(&c, &t);
        assert!(r.records[0].tbt_s.unwrap() < 1.0, "{:?}", r.records[0]);
        assert!(r.records[1].ttft_s.unwrap() > 27.0);
        assert_eq!(r.summary.completed, 2);
    }

    #[test]
    fn coupled_prefix_cache_hits_hbm() {
        let t = trace(&[(0, 8192, 2, 0..16), (60_000, 8192, 2, 0..16)]);
        let mut c = cfg(1, 1);
        c.coupled = Some(CoupledConfig {
            instances: 1,
            prefix_cache_tokens: 100_000,
            ..CoupledConfig::default()
        });
        let r = run(&c, &t);
        assert_eq!(r.records[1].reused_tokens, 8191);
        c.coupled.as_mut().unwrap().prefix_cache_tokens = 0;
        let r = run(&c, &t);
        assert_eq!(r.records[1].reused_tokens, 0);
    }
}
