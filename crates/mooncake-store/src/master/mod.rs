//! The master's state machine: clients, segments, objects, leases, placement, eviction.
//!
//! [`Master`] holds metadata only, never values. It does no I/O, starts no thread and reads no
//! clock: every call that depends on time takes `now_ms`, the caller's clock in milliseconds
//! (use wall-clock Unix milliseconds if soft pin deadlines should survive a master restart through
//! [`HeldObject::soft_pin_deadline_ms`]). The RPC server wraps it in a `Mutex` and calls
//! [`Master::tick`] periodically (every 10 ms to 1 s).
//!
//! # Memory layout
//!
//! An object is one 56-byte `Slot` in a slab (`Vec`), its key a `Box<str>`, and one `u32` in a
//! per-tenant `hashbrown::HashTable` keyed by a 32-bit hash stored in the slot. The first replica
//! lives inline as `(segment, allocator handle)`; more replicas, groups, soft pins and in-flight
//! puts live in side tables keyed by slot, populated only for objects that use them. The
//! allocator node of each replica carries the slot as its tag, which is how eviction goes from
//! a range of a segment to its object. Per object with a 40-byte key and one replica: slot 56 B,
//! key 48 B (malloc chunk), index ≈ 8.4 B (5 B per bucket at 10 M), allocator node 24 B: about
//! 136 B, which is what `benches/master_mem.rs` measures at 10 M objects.
//!
//! # Eviction
//!
//! A CLOCK (second chance) per segment, in address order, driven by the allocator's cursor:
//! `get_replicas` sets a reference bit, the hand clears it once before it may evict the object.
//! Leased, in-flight and hard-pinned objects are never evicted; soft-pinned ones only in a last
//! pass; a group goes all together or not at all. Sweeping in address order means the objects
//! evicted for a put are physical neighbours, so a contiguous extent forms after evicting about
//! the size asked for (LRU order across a segment frees scattered holes instead).

#![forbid(unsafe_code)]

mod config;
mod evict;
mod placement;
#[cfg(test)]
mod tests;

use std::hash::BuildHasher;

use hashbrown::{HashMap, HashTable};
use serde::{Deserialize, Serialize};

pub use config::MasterConfig;

use crate::alloc::{NO_TAG, OffsetAllocator};
use crate::types::{
    ReplicaDesc, ReplicaKind, ReplicateConfig, SoftPinAction, StoreError, StoreErrorCode,
    StoreResult,
};

/// A client of the master (requester and/or storage node). Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub u64);

/// A mounted segment. Ids are never reused, not even for a remount of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentId(pub u32);

/// What a heartbeat tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientStatus {
    /// Known and live.
    Ok,
    /// The master does not know this client (it expired, or the master restarted): register
    /// again and remount the segments, re-reporting what they hold.
    NeedRemount,
}

/// Reply to [`Master::heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Whether the client must re-register and remount.
    pub status: ClientStatus,
}

/// An object a storage node holds in a segment, as it re-reports it after a master restart
/// (and as the journal tells it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldObject {
    /// Tenant namespace.
    pub tenant: String,
    /// Key.
    pub key: String,
    /// Offset from the segment base.
    pub offset: u64,
    /// Object length in bytes.
    pub len: u64,
    /// Hard-pinned.
    pub hard_pin: bool,
    /// Soft pin deadline on the master's clock, if soft-pinned.
    pub soft_pin_deadline_ms: Option<u64>,
    /// Group, if any.
    pub group: Option<String>,
    /// The reference's data type.
    pub data_type: u8,
}

/// Arguments of [`Master::mount_segment`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    /// The transfer engine segment name.
    pub name: String,
    /// Base address of the segment in the owner's address space.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host of the storage node (for `prefer_alloc_in_same_node`).
    pub host: String,
    /// What the segment already holds (after a master restart); empty for a fresh segment.
    pub held: Vec<HeldObject>,
}

/// One journal record for a storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    /// The object now lives at `offset` of the segment.
    Committed(HeldObject),
    /// The range at `offset` no longer holds an object.
    Freed {
        /// Offset from the segment base.
        offset: u64,
    },
}

/// What [`Master::drain_journal`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalDrain {
    /// Records since the last drain, in order. A `Freed` may name an offset the node never saw
    /// committed; ignore it.
    Entries(Vec<JournalEntry>),
    /// The journal overflowed: this is everything the segment holds; replace the node's view.
    Resync(Vec<HeldObject>),
}

/// Reply to [`Master::get_replicas`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReply {
    /// COMPLETE replicas; replicas on healthy segments first.
    pub replicas: Vec<ReplicaDesc>,
    /// How long the read lease lasts from now.
    pub lease_ttl_ms: u64,
}

/// Lifecycle state of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectState {
    /// Being written (between `put_start` and `put_end`); invisible to readers.
    Processing,
    /// Written and readable.
    Complete,
}

/// What [`Master::query_key`] reports (grants no lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Object size.
    pub size: u64,
    /// Lifecycle state.
    pub state: ObjectState,
    /// All replicas (in whatever state the object is).
    pub replicas: Vec<ReplicaDesc>,
    /// End of the read lease (0 if never leased).
    pub lease_until_ms: u64,
    /// Hard-pinned.
    pub hard_pin: bool,
    /// Soft pin deadline, once the object is COMPLETE and soft-pinned.
    pub soft_pin_deadline_ms: Option<u64>,
    /// Group.
    pub group: Option<String>,
    /// The writer, while PROCESSING.
    pub writer: Option<ClientId>,
    /// The reference's data type.
    pub data_type: u8,
}

/// What one [`Master::tick`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickReport {
    /// Clients expired (silent past `client_live_ttl_ms`).
    pub expired_clients: Vec<ClientId>,
    /// Segments dropped with them.
    pub dropped_segments: Vec<SegmentId>,
    /// Objects deleted because their last replica went with a segment.
    pub lost_objects: u64,
    /// In-flight puts revoked (writer expired or past `put_start_discard_timeout_ms`).
    pub revoked_puts: u64,
    /// Objects evicted by the watermark pass.
    pub evicted_objects: u64,
    /// Bytes those objects held (object sizes × replicas).
    pub evicted_bytes: u64,
    /// Deferred ranges (force-removed or replaced while leased) returned to their allocators.
    pub deferred_freed: u64,
}

/// One segment, for the admin port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentStatus {
    /// Id.
    pub id: SegmentId,
    /// Transfer engine segment name.
    pub name: String,
    /// Host of the storage node.
    pub host: String,
    /// Owning client.
    pub owner: ClientId,
    /// Base address.
    pub base: u64,
    /// Usable capacity (rounded down to the alignment).
    pub capacity: u64,
    /// Bytes allocated.
    pub used: u64,
    /// Largest free contiguous range.
    pub largest_free_extent: u64,
    /// Live allocations (replicas, in-flight and deferred included).
    pub allocations: u32,
    /// In-flight allocations (puts not yet ended).
    pub inflight: u32,
    /// The owner's control connection closed: no new allocations.
    pub suspect: bool,
    /// Reported failing: no new allocations until the owner's next heartbeat after the
    /// exclusion period.
    pub excluded: bool,
    /// Share of its normal placement probability the ramp grants now, in `[0, 1]`.
    pub ramp: f64,
}

/// Totals, for the admin port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MasterStats {
    /// Registered clients.
    pub clients: usize,
    /// Mounted segments.
    pub segments: usize,
    /// Tenants seen.
    pub tenants: usize,
    /// Objects (any state).
    pub objects: u64,
    /// Puts in flight.
    pub inflight_puts: usize,
    /// Pool capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes allocated in the pool.
    pub used_bytes: u64,
    /// Read leases granted or extended since start.
    pub lease_grants: u64,
    /// Objects evicted since start (watermark passes and put-time eviction).
    pub evicted_objects: u64,
    /// Bytes evicted since start (object sizes × replicas).
    pub evicted_bytes: u64,
    /// Puts revoked since start (by the writer, on disconnect, on timeout).
    pub revoked_puts: u64,
    /// Clients expired since start.
    pub expired_clients: u64,
    /// Ranges waiting for a lease to end before they are freed.
    pub deferred_frees: usize,
    /// Bytes of the object slab and side tables (not keys, not the allocators).
    pub slab_bytes: usize,
}

// ---------------------------------------------------------------------------------------------
// Internal representation.

const NIL: u32 = u32::MAX;

const ST_MASK: u8 = 0b11;
const ST_FREE: u8 = 0;
const ST_PROCESSING: u8 = 1;
const ST_COMPLETE: u8 = 2;
/// CLOCK reference bit: read since the hand last passed.
const F_REF: u8 = 1 << 2;
const F_HARD: u8 = 1 << 3;
/// Has an entry in `soft` (a TTL while PROCESSING, a deadline once COMPLETE).
const F_SOFT: u8 = 1 << 4;
/// Has an entry in `slot_group`.
const F_GROUP: u8 = 1 << 5;
/// Has an entry in `extra` (replicas beyond the first).
const F_EXTRA: u8 = 1 << 6;

/// One object. 56 bytes; free slots chain through `handle`.
#[derive(Debug)]
struct Slot {
    key: Box<str>,
    size: u64,
    /// End of the read lease (COMPLETE objects).
    lease_until: u64,
    epoch: u64,
    /// First replica: segment (`NIL` when the object has none left).
    seg: u32,
    /// First replica: allocator handle. Free slots: next free slot.
    handle: u32,
    hash: u32,
    tenant: u16,
    flags: u8,
    data_type: u8,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 56);

impl Slot {
    fn state(&self) -> u8 {
        self.flags & ST_MASK
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rep {
    seg: u32,
    handle: u32,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    writer: u64,
    started_ms: u64,
}

#[derive(Debug)]
struct Tenant {
    name: Box<str>,
    index: HashTable<u32>,
    groups: HashMap<Box<str>, u32>,
}

#[derive(Debug)]
struct Group {
    name: Box<str>,
    tenant: u16,
    members: Vec<u32>,
}

#[derive(Debug)]
struct Client {
    host: Box<str>,
    last_seen_ms: u64,
    connected: bool,
    segments: Vec<u32>,
}

/// Journal records are kept compact and materialised at drain time.
#[derive(Debug, Clone, Copy)]
enum JournalRec {
    Committed { slot: u32, epoch: u64 },
    Freed { offset: u64 },
}

#[derive(Debug)]
struct Segment {
    name: Box<str>,
    host: Box<str>,
    owner: u64,
    base: u64,
    alloc: OffsetAllocator,
    /// Ramp-in ends at this time (0: not ramping).
    ramp_end_ms: u64,
    suspect: bool,
    excluded_at_ms: Option<u64>,
    inflight: u32,
    journal: Vec<JournalRec>,
    journal_overflow: bool,
    /// Bumped whenever an object here may have become evictable or a range was freed.
    evict_version: u64,
    /// Negative cache of eviction walks, per pass (without / with soft pins): nothing was found
    /// for `need` bytes at these versions, and nothing unblocks before `until_ms`.
    futile: [Option<Futile>; 2],
}

/// A futile eviction walk, remembered so a storm of puts against a pool where everything is
/// leased or pinned does not walk every segment once per put.
#[derive(Debug, Clone, Copy)]
struct Futile {
    seg_version: u64,
    group_version: u64,
    until_ms: u64,
    need: u64,
}

impl Segment {
    fn eligible(&self) -> bool {
        !self.suspect && self.excluded_at_ms.is_none()
    }

    /// Share of its normal placement probability the ramp grants at `now`, in `[0, 1]`.
    fn ramp_share(&self, now_ms: u64, ramp_up_ms: u64) -> f64 {
        if self.ramp_end_ms <= now_ms || ramp_up_ms == 0 {
            1.0
        } else {
            1.0 - (self.ramp_end_ms - now_ms) as f64 / ramp_up_ms as f64
        }
    }
}

#[derive(Debug)]
struct Deferred {
    seg: u32,
    handle: u32,
    until_ms: u64,
}

#[derive(Debug, Default)]
struct Counters {
    lease_grants: u64,
    evicted_objects: u64,
    evicted_bytes: u64,
    revoked_puts: u64,
    expired_clients: u64,
}

/// SplitMix64: small, fast, seedable.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Spreads the 32-bit key hash over the 64 bits hashbrown uses (low bits pick the bucket, the
/// top 7 the tag).
fn table_hash(h: u32) -> u64 {
    (h as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn err(code: StoreErrorCode, msg: impl Into<String>) -> StoreError {
    StoreError::new(code, msg)
}

/// The master's state machine. See the [module docs](self).
///
/// ```
/// use mooncake_store::{DEFAULT_TENANT, Master, MasterConfig, MountRequest, ReplicateConfig};
///
/// let mut m = Master::new(MasterConfig::default());
/// let node = m.register_client("host-a", 0);
/// let req = MountRequest {
///     name: "host-a:12345".into(),
///     base: 0x7f00_0000_0000,
///     size: 1 << 30,
///     host: "host-a".into(),
///     held: vec![],
/// };
/// m.mount_segment(node, req, 0)?;
/// let rc = ReplicateConfig::default();
/// let where_to_write = m.put_start(node, DEFAULT_TENANT, "k", 4096, &rc, 1)?;
/// // ... the client writes the bytes there with the transfer engine ...
/// m.put_end(node, DEFAULT_TENANT, "k", 2)?;
/// let got = m.get_replicas(DEFAULT_TENANT, "k", 3)?;
/// assert_eq!(got.replicas, where_to_write);
/// # Ok::<(), mooncake_store::StoreError>(())
/// ```
#[derive(Debug)]
pub struct Master {
    cfg: MasterConfig,
    rng: Rng,
    hasher: foldhash::fast::FixedState,
    next_client: u64,
    clients: HashMap<u64, Client>,
    segments: Vec<Option<Box<Segment>>>,
    seg_by_name: HashMap<Box<str>, u32>,
    /// Segments new allocations may go to.
    eligible: Vec<u32>,
    /// How many of `eligible` are still ramping, and when the first ramp ends.
    eligible_ramping: usize,
    next_ramp_end_ms: u64,
    tenants: Vec<Tenant>,
    tenant_by_name: HashMap<Box<str>, u16>,
    slots: Vec<Slot>,
    free_slot: u32,
    live_objects: u64,
    extra: HashMap<u32, Vec<Rep>>,
    inflight: HashMap<u32, InFlight>,
    soft: HashMap<u32, u64>,
    slot_group: HashMap<u32, u32>,
    groups: Vec<Option<Group>>,
    free_groups: Vec<u32>,
    deferred: Vec<Deferred>,
    next_epoch: u64,
    counters: Counters,
    /// Bumped with every segment's `evict_version`, and when segments come or go.
    evict_version: u64,
    /// Bumped whenever group membership changes or a group member completes.
    group_version: u64,
    /// A watermark pass that could not reach its target: (evict_version, group_version,
    /// until_ms). Skipped until one changes or the time passes.
    watermark_futile: Option<(u64, u64, u64)>,
    /// Nodes visited by eviction walks and sweeps (tests check the negative cache with it).
    #[cfg(test)]
    walk_steps: u64,
}

impl Master {
    /// A master with no clients, segments or objects.
    pub fn new(cfg: MasterConfig) -> Self {
        let seed = cfg.seed;
        Self {
            rng: Rng(seed),
            hasher: foldhash::fast::FixedState::with_seed(seed ^ 0x5851_f42d_4c95_7f2d),
            cfg,
            next_client: 1,
            clients: HashMap::new(),
            segments: Vec::new(),
            seg_by_name: HashMap::new(),
            eligible: Vec::new(),
            eligible_ramping: 0,
            next_ramp_end_ms: u64::MAX,
            tenants: Vec::new(),
            tenant_by_name: HashMap::new(),
            slots: Vec::new(),
            free_slot: NIL,
            live_objects: 0,
            extra: HashMap::new(),
            inflight: HashMap::new(),
            soft: HashMap::new(),
            slot_group: HashMap::new(),
            groups: Vec::new(),
            free_groups: Vec::new(),
            deferred: Vec::new(),
            next_epoch: 1,
            counters: Counters::default(),
            evict_version: 0,
            group_version: 0,
            watermark_futile: None,
            #[cfg(test)]
            walk_steps: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MasterConfig {
        &self.cfg
    }

    /// The segments `client` has mounted (empty for an unknown client).
    pub fn client_segments(&self, client: ClientId) -> Vec<SegmentId> {
        self.clients
            .get(&client.0)
            .map(|c| c.segments.iter().map(|&s| SegmentId(s)).collect())
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // Clients.

    /// Registers a client on `host`; its first heartbeat is `now_ms`.
    pub fn register_client(&mut self, host: &str, now_ms: u64) -> ClientId {
        let id = self.next_client;
        self.next_client += 1;
        self.clients.insert(
            id,
            Client {
                host: host.into(),
                last_seen_ms: now_ms,
                connected: true,
                segments: Vec::new(),
            },
        );
        ClientId(id)
    }

    /// A heartbeat of `client`.
    ///
    /// # Behavior
    ///
    /// - Unknown (expired, or never registered with this master): `NeedRemount`.
    /// - Otherwise refreshes liveness; a client marked disconnected is connected again and its
    ///   segments stop being suspect; a segment reported failing at least
    ///   `failure_exclusion_ms` ago rejoins placement.
    pub fn heartbeat(&mut self, client: ClientId, now_ms: u64) -> StoreResult<HeartbeatReply> {
        if !self.clients.contains_key(&client.0) {
            return Ok(HeartbeatReply {
                status: ClientStatus::NeedRemount,
            });
        }
        self.touch_client(client.0, now_ms);
        let exclusion = self.cfg.failure_exclusion_ms;
        let mut changed = false;
        for &s in &self.clients[&client.0].segments {
            let seg = self.segments[s as usize]
                .as_deref_mut()
                .expect("client segment");
            if seg
                .excluded_at_ms
                .is_some_and(|at| now_ms >= at.saturating_add(exclusion))
            {
                seg.excluded_at_ms = None;
                changed = true;
            }
        }
        if changed {
            self.refresh_eligible(now_ms);
        }
        Ok(HeartbeatReply {
            status: ClientStatus::Ok,
        })
    }

    /// Refreshes liveness and reconnects a disconnected client.
    fn touch_client(&mut self, client: u64, now_ms: u64) -> bool {
        let Some(c) = self.clients.get_mut(&client) else {
            return false;
        };
        c.last_seen_ms = c.last_seen_ms.max(now_ms);
        if !c.connected {
            c.connected = true;
            for &s in &c.segments {
                if let Some(seg) = self.segments[s as usize].as_deref_mut() {
                    seg.suspect = false;
                }
            }
            self.refresh_eligible(now_ms);
        }
        true
    }

    fn require_client(&mut self, client: ClientId, now_ms: u64) -> StoreResult<()> {
        if self.touch_client(client.0, now_ms) {
            Ok(())
        } else {
            Err(err(
                StoreErrorCode::ClientNotFound,
                format!("client {} is not registered", client.0),
            ))
        }
    }

    /// The control connection of `client` closed.
    ///
    /// Its in-flight puts are revoked at once (their keys are writable again, with fresh space:
    /// the old ranges are quarantined for `inflight_quarantine_ms`, since the dead writer's
    /// transfers may still land) and its segments
    /// become suspect: no new allocations, but their objects stay readable until the client
    /// comes back (any call or heartbeat) or expires. Returns the puts revoked.
    pub fn client_disconnected(&mut self, client: ClientId, now_ms: u64) -> u64 {
        let Some(c) = self.clients.get_mut(&client.0) else {
            return 0;
        };
        c.connected = false;
        for &s in &c.segments {
            if let Some(seg) = self.segments[s as usize].as_deref_mut() {
                seg.suspect = true;
            }
        }
        self.refresh_eligible(now_ms);
        self.revoke_puts_of(client.0, now_ms)
    }

    fn revoke_puts_of(&mut self, writer: u64, now_ms: u64) -> u64 {
        let slots: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.writer == writer)
            .map(|(&s, _)| s)
            .collect();
        let keep = self.quarantine_until(now_ms);
        for &s in &slots {
            self.delete_object(s, now_ms, keep);
        }
        self.counters.revoked_puts += slots.len() as u64;
        slots.len() as u64
    }

    /// Periodic work: expire silent clients (dropping their segments, every replica there and
    /// objects left with none, and revoking their puts), revoke puts older than
    /// `put_start_discard_timeout_ms`, free deferred ranges whose lease ended, and run the
    /// watermark eviction pass.
    pub fn tick(&mut self, now_ms: u64) -> TickReport {
        let mut report = TickReport::default();
        let ttl = self.cfg.client_live_ttl_ms;
        let mut expired: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.last_seen_ms.saturating_add(ttl) <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        expired.sort_unstable();
        for id in expired {
            report.revoked_puts += self.revoke_puts_of(id, now_ms);
            let c = self.clients.remove(&id).expect("expired client");
            for s in c.segments {
                report.lost_objects += self.drop_segment(s);
                report.dropped_segments.push(SegmentId(s));
            }
            report.expired_clients.push(ClientId(id));
            self.counters.expired_clients += 1;
        }
        if !report.dropped_segments.is_empty() {
            self.refresh_eligible(now_ms);
        }

        let discard = self.cfg.put_start_discard_timeout_ms;
        let stale: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.started_ms.saturating_add(discard) <= now_ms)
            .map(|(&s, _)| s)
            .collect();
        let keep = self.quarantine_until(now_ms);
        for &s in &stale {
            self.delete_object(s, now_ms, keep);
        }
        report.revoked_puts += stale.len() as u64;
        self.counters.revoked_puts += stale.len() as u64;

        report.deferred_freed = self.free_deferred(now_ms);

        let (objects, bytes) = self.watermark_pass(now_ms);
        report.evicted_objects = objects;
        report.evicted_bytes = bytes;
        report
    }

    fn free_deferred(&mut self, now_ms: u64) -> u64 {
        let mut freed = 0;
        let mut i = 0;
        while i < self.deferred.len() {
            if self.deferred[i].until_ms <= now_ms {
                let d = self.deferred.swap_remove(i);
                if let Some(seg) = self.segments[d.seg as usize].as_deref_mut() {
                    seg.alloc.free(d.handle);
                    self.bump(d.seg);
                }
                freed += 1;
            } else {
                i += 1;
            }
        }
        freed
    }

    // -----------------------------------------------------------------------------------------
    // Segments.

    /// Mounts a segment of `client`.
    ///
    /// # Behavior
    ///
    /// - Idempotent: the same owner mounting the same name, base and size gets the same id.
    /// - `SEGMENT_ALREADY_EXISTS` if another live client has the name mounted; a disconnected
    ///   owner's segment is replaced (its replicas dropped).
    /// - `held` (after a master restart) is re-adopted: the allocator is rebuilt from the
    ///   reported ranges (`INVALID_PARAMS` if they overlap or leave the segment), each object
    ///   becomes COMPLETE with a replica here, a key already known elsewhere with the same
    ///   size gains a replica. A held range that conflicts with a known object (different size,
    ///   still being written, same segment twice) is freed and journalled as `Freed`.
    /// - A segment mounted empty is ramped into placement over `ramp_up_ms`.
    pub fn mount_segment(
        &mut self,
        client: ClientId,
        req: MountRequest,
        now_ms: u64,
    ) -> StoreResult<SegmentId> {
        self.require_client(client, now_ms)?;
        if req.name.is_empty() {
            return Err(err(StoreErrorCode::InvalidParams, "empty segment name"));
        }
        if req.size == 0 || req.base.checked_add(req.size).is_none() {
            return Err(err(
                StoreErrorCode::InvalidParams,
                format!("bad segment range base={} size={}", req.base, req.size),
            ));
        }
        let mut takeover = None;
        if let Some(&old) = self.seg_by_name.get(req.name.as_str()) {
            let seg = self.segments[old as usize]
                .as_deref()
                .expect("named segment");
            let owner_connected = self.clients.get(&seg.owner).is_some_and(|c| c.connected);
            if seg.owner == client.0 {
                if seg.base == req.base && seg.alloc.capacity() == self.usable(req.size) {
                    return Ok(SegmentId(old));
                }
                return Err(err(
                    StoreErrorCode::SegmentAlreadyExists,
                    format!("segment {} is mounted with another geometry", req.name),
                ));
            }
            if owner_connected {
                return Err(err(
                    StoreErrorCode::SegmentAlreadyExists,
                    format!("segment {} is mounted by client {}", req.name, seg.owner),
                ));
            }
            takeover = Some((old, seg.owner));
        }
        let ranges: Vec<(u64, u64)> = req.held.iter().map(|h| (h.offset, h.len)).collect();
        let (alloc, handles) =
            OffsetAllocator::from_allocations(req.size, self.cfg.alloc_align, &ranges)?;
        let id = u32::try_from(self.segments.len())
            .ok()
            .filter(|&id| id != NIL)
            .ok_or_else(|| err(StoreErrorCode::InternalError, "segment ids exhausted"))?;
        // Only now that the mount cannot fail: replace the disconnected owner's segment.
        if let Some((old, owner)) = takeover {
            self.drop_segment(old);
            if let Some(c) = self.clients.get_mut(&owner) {
                c.segments.retain(|&s| s != old);
            }
        }
        let ramp_end_ms = if req.held.is_empty() && self.cfg.ramp_up_ms > 0 {
            now_ms.saturating_add(self.cfg.ramp_up_ms)
        } else {
            0
        };
        self.segments.push(Some(Box::new(Segment {
            name: req.name.as_str().into(),
            host: req.host.as_str().into(),
            owner: client.0,
            base: req.base,
            alloc,
            ramp_end_ms,
            suspect: false,
            excluded_at_ms: None,
            inflight: 0,
            journal: Vec::new(),
            journal_overflow: false,
            evict_version: 0,
            futile: [None; 2],
        })));
        self.evict_version += 1;
        self.seg_by_name.insert(req.name.as_str().into(), id);
        self.clients
            .get_mut(&client.0)
            .expect("checked")
            .segments
            .push(id);
        for (held, handle) in req.held.into_iter().zip(handles) {
            self.adopt(id, handle, held, now_ms);
        }
        self.refresh_eligible(now_ms);
        Ok(SegmentId(id))
    }

    fn usable(&self, size: u64) -> u64 {
        size & !(self.cfg.alloc_align.max(1) - 1)
    }

    fn adopt(&mut self, seg: u32, handle: u32, held: HeldObject, now_ms: u64) {
        let conflict = |m: &mut Self| {
            m.seg_mut(seg).alloc.free(handle);
            m.journal(
                seg,
                JournalRec::Freed {
                    offset: held.offset,
                },
            );
        };
        if held.key.is_empty() || held.tenant.is_empty() {
            return conflict(self);
        }
        let Some(t) = self.tenant_or_create(&held.tenant) else {
            return conflict(self);
        };
        let h = self.hash_key(&held.key);
        if let Some(s) = self.find(t, &held.key, h) {
            let slot = &self.slots[s as usize];
            let ok = slot.state() == ST_COMPLETE
                && slot.size == held.len
                && !self.replicas(s).any(|r| r.seg == seg);
            if !ok {
                return conflict(self);
            }
            self.add_replica(s, Rep { seg, handle });
            self.seg_mut(seg).alloc.set_tag(handle, s);
            self.bump(seg);
            return;
        }
        let epoch = self.bump_epoch();
        let s = self.new_slot(Slot {
            key: held.key.as_str().into(),
            size: held.len,
            lease_until: 0,
            epoch,
            seg,
            handle,
            hash: h,
            tenant: t,
            flags: ST_COMPLETE | if held.hard_pin { F_HARD } else { 0 },
            data_type: held.data_type,
        });
        self.index_insert(t, s);
        self.seg_mut(seg).alloc.set_tag(handle, s);
        self.bump(seg);
        if let Some(deadline) = held.soft_pin_deadline_ms.filter(|&d| d > now_ms) {
            self.soft.insert(s, deadline);
            self.slots[s as usize].flags |= F_SOFT;
        }
        if let Some(g) = held.group.as_deref() {
            self.join_group(s, t, g);
        }
    }

    /// Unmounts a segment of `client`: every replica there is dropped, objects left with none
    /// are deleted. `SEGMENT_NOT_FOUND` / `ILLEGAL_CLIENT` (not the owner).
    pub fn unmount_segment(
        &mut self,
        client: ClientId,
        id: SegmentId,
        now_ms: u64,
    ) -> StoreResult<()> {
        self.require_client(client, now_ms)?;
        let Some(seg) = self.segments.get(id.0 as usize).and_then(|s| s.as_deref()) else {
            return Err(err(
                StoreErrorCode::SegmentNotFound,
                format!("segment {}", id.0),
            ));
        };
        if seg.owner != client.0 {
            return Err(err(
                StoreErrorCode::IllegalClient,
                format!("segment {} belongs to client {}", id.0, seg.owner),
            ));
        }
        self.drop_segment(id.0);
        self.clients
            .get_mut(&client.0)
            .expect("checked")
            .segments
            .retain(|&s| s != id.0);
        self.refresh_eligible(now_ms);
        Ok(())
    }

    /// A client saw transfers to segment `name` fail: it leaves placement at once, until a
    /// heartbeat of its owner at least `failure_exclusion_ms` later. Its replicas stay readable
    /// (listed after healthy ones).
    pub fn report_failure(&mut self, segment_name: &str, now_ms: u64) -> StoreResult<()> {
        let Some(&s) = self.seg_by_name.get(segment_name) else {
            return Err(err(
                StoreErrorCode::SegmentNotFound,
                format!("segment {segment_name}"),
            ));
        };
        self.seg_mut(s).excluded_at_ms = Some(now_ms);
        self.refresh_eligible(now_ms);
        Ok(())
    }

    /// Removes a segment and every replica on it; returns the objects deleted for lack of
    /// replicas. The caller fixes the owner's segment list and the eligible set.
    fn drop_segment(&mut self, s: u32) -> u64 {
        let Some(seg) = self.segments[s as usize].take() else {
            return 0;
        };
        self.seg_by_name.remove(&*seg.name);
        self.evict_version += 1;
        let mut lost = 0;
        for (_, _, _, tag) in seg.alloc.iter_used() {
            if tag == NO_TAG || self.slots[tag as usize].state() == ST_FREE {
                continue;
            }
            if self.detach_replica(tag, s) {
                self.delete_object(tag, 0, 0);
                lost += 1;
            }
        }
        self.deferred.retain(|d| d.seg != s);
        lost
    }

    fn refresh_eligible(&mut self, now_ms: u64) {
        self.eligible.clear();
        self.eligible_ramping = 0;
        self.next_ramp_end_ms = u64::MAX;
        for (i, seg) in self.segments.iter_mut().enumerate() {
            let Some(seg) = seg.as_deref_mut() else {
                continue;
            };
            if seg.ramp_end_ms != 0 && seg.ramp_end_ms <= now_ms {
                seg.ramp_end_ms = 0;
            }
            if seg.eligible() {
                self.eligible.push(i as u32);
                if seg.ramp_end_ms != 0 {
                    self.eligible_ramping += 1;
                    self.next_ramp_end_ms = self.next_ramp_end_ms.min(seg.ramp_end_ms);
                }
            }
        }
    }

    fn seg(&self, s: u32) -> &Segment {
        self.segments[s as usize].as_deref().expect("live segment")
    }

    fn seg_mut(&mut self, s: u32) -> &mut Segment {
        self.segments[s as usize]
            .as_deref_mut()
            .expect("live segment")
    }

    /// Journal records for the owner of `segment`, drained. See [`JournalDrain`].
    ///
    /// The journal holds at most `journal_max_entries` compact records per segment; past that
    /// it is dropped and the next drain returns a full [`JournalDrain::Resync`].
    pub fn drain_journal(&mut self, segment: SegmentId) -> StoreResult<JournalDrain> {
        let s = segment.0;
        let Some(seg) = self
            .segments
            .get_mut(s as usize)
            .and_then(|s| s.as_deref_mut())
        else {
            return Err(err(StoreErrorCode::SegmentNotFound, format!("segment {s}")));
        };
        if seg.journal_overflow {
            seg.journal_overflow = false;
            seg.journal = Vec::new();
            let seg = self.seg(s);
            let held = seg
                .alloc
                .iter_used()
                .filter(|&(_, _, _, tag)| {
                    tag != NO_TAG && self.slots[tag as usize].state() == ST_COMPLETE
                })
                .map(|(_, offset, _, tag)| self.held_object(tag, offset))
                .collect();
            return Ok(JournalDrain::Resync(held));
        }
        let recs = std::mem::take(&mut seg.journal);
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            match rec {
                JournalRec::Freed { offset } => out.push(JournalEntry::Freed { offset }),
                JournalRec::Committed { slot, epoch } => {
                    let sl = &self.slots[slot as usize];
                    if sl.state() != ST_COMPLETE || sl.epoch != epoch {
                        continue; // superseded; a Freed follows
                    }
                    if let Some(r) = self.replicas(slot).find(|r| r.seg == s) {
                        let offset = self.seg(s).alloc.offset(r.handle).expect("live replica");
                        out.push(JournalEntry::Committed(self.held_object(slot, offset)));
                    }
                }
            }
        }
        Ok(JournalDrain::Entries(out))
    }

    fn held_object(&self, s: u32, offset: u64) -> HeldObject {
        let sl = &self.slots[s as usize];
        HeldObject {
            tenant: self.tenants[sl.tenant as usize].name.to_string(),
            key: sl.key.to_string(),
            offset,
            len: sl.size,
            hard_pin: sl.flags & F_HARD != 0,
            soft_pin_deadline_ms: self.soft_deadline(s),
            group: self.group_name(s).map(str::to_string),
            data_type: sl.data_type,
        }
    }

    fn journal(&mut self, s: u32, rec: JournalRec) {
        let max = self.cfg.journal_max_entries;
        let seg = self.seg_mut(s);
        if seg.journal_overflow {
            return;
        }
        if seg.journal.len() >= max {
            seg.journal = Vec::new();
            seg.journal_overflow = true;
            return;
        }
        seg.journal.push(rec);
    }

    // -----------------------------------------------------------------------------------------
    // Objects: index, slab, side tables.

    fn hash_key(&self, key: &str) -> u32 {
        let h = self.hasher.hash_one(key);
        (h ^ (h >> 32)) as u32
    }

    fn tenant(&self, name: &str) -> Option<u16> {
        self.tenant_by_name.get(name).copied()
    }

    fn tenant_or_create(&mut self, name: &str) -> Option<u16> {
        if let Some(t) = self.tenant(name) {
            return Some(t);
        }
        let t = u16::try_from(self.tenants.len()).ok()?;
        self.tenants.push(Tenant {
            name: name.into(),
            index: HashTable::new(),
            groups: HashMap::new(),
        });
        self.tenant_by_name.insert(name.into(), t);
        Some(t)
    }

    fn find(&self, t: u16, key: &str, h: u32) -> Option<u32> {
        let slots = &self.slots;
        self.tenants[t as usize]
            .index
            .find(table_hash(h), |&s| {
                let sl = &slots[s as usize];
                sl.hash == h && *sl.key == *key
            })
            .copied()
    }

    fn lookup(&self, tenant: &str, key: &str) -> Option<u32> {
        let t = self.tenant(tenant)?;
        self.find(t, key, self.hash_key(key))
    }

    fn index_insert(&mut self, t: u16, s: u32) {
        let slots = &self.slots;
        let h = slots[s as usize].hash;
        self.tenants[t as usize]
            .index
            .insert_unique(table_hash(h), s, |&x| table_hash(slots[x as usize].hash));
    }

    fn new_slot(&mut self, slot: Slot) -> u32 {
        self.live_objects += 1;
        if self.free_slot != NIL {
            let s = self.free_slot;
            self.free_slot = self.slots[s as usize].handle;
            self.slots[s as usize] = slot;
            s
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        }
    }

    /// Something on segment `s` may have become evictable, or space was freed there.
    fn bump(&mut self, s: u32) {
        self.evict_version += 1;
        if let Some(seg) = self.segments[s as usize].as_deref_mut() {
            seg.evict_version += 1;
        }
    }

    fn bump_epoch(&mut self) -> u64 {
        let e = self.next_epoch;
        self.next_epoch += 1;
        e
    }

    /// The replicas of slot `s`: the inline one, then the overflow ones.
    fn replicas(&self, s: u32) -> impl Iterator<Item = Rep> + '_ {
        let sl = &self.slots[s as usize];
        let first = (sl.seg != NIL).then_some(Rep {
            seg: sl.seg,
            handle: sl.handle,
        });
        let rest = if sl.flags & F_EXTRA != 0 {
            self.extra.get(&s).map(|v| v.as_slice()).unwrap_or(&[])
        } else {
            &[]
        };
        first.into_iter().chain(rest.iter().copied())
    }

    fn add_replica(&mut self, s: u32, rep: Rep) {
        let sl = &mut self.slots[s as usize];
        if sl.seg == NIL {
            sl.seg = rep.seg;
            sl.handle = rep.handle;
        } else {
            sl.flags |= F_EXTRA;
            self.extra.entry(s).or_default().push(rep);
        }
    }

    /// Drops the replica of `s` on `seg` (without freeing it); true if none is left.
    fn detach_replica(&mut self, s: u32, seg: u32) -> bool {
        let sl = &mut self.slots[s as usize];
        if sl.seg == seg {
            if sl.flags & F_EXTRA != 0 {
                let v = self.extra.get_mut(&s).expect("extra replicas");
                let r = v.pop().expect("non-empty");
                sl.seg = r.seg;
                sl.handle = r.handle;
                if v.is_empty() {
                    self.extra.remove(&s);
                    sl.flags &= !F_EXTRA;
                }
            } else {
                sl.seg = NIL;
                sl.handle = NIL;
            }
        } else if sl.flags & F_EXTRA != 0 {
            let v = self.extra.get_mut(&s).expect("extra replicas");
            v.retain(|r| r.seg != seg);
            if v.is_empty() {
                self.extra.remove(&s);
                sl.flags &= !F_EXTRA;
            }
        }
        sl.seg == NIL
    }

    fn soft_deadline(&self, s: u32) -> Option<u64> {
        let sl = &self.slots[s as usize];
        (sl.flags & F_SOFT != 0 && sl.state() == ST_COMPLETE)
            .then(|| self.soft.get(&s).copied())
            .flatten()
    }

    fn group_name(&self, s: u32) -> Option<&str> {
        if self.slots[s as usize].flags & F_GROUP == 0 {
            return None;
        }
        let g = self.slot_group.get(&s)?;
        self.groups[*g as usize].as_ref().map(|g| &*g.name)
    }

    fn join_group(&mut self, s: u32, t: u16, name: &str) {
        let g = match self.tenants[t as usize].groups.get(name) {
            Some(&g) => g,
            None => {
                let group = Group {
                    name: name.into(),
                    tenant: t,
                    members: Vec::new(),
                };
                let g = match self.free_groups.pop() {
                    Some(g) => {
                        self.groups[g as usize] = Some(group);
                        g
                    }
                    None => {
                        self.groups.push(Some(group));
                        (self.groups.len() - 1) as u32
                    }
                };
                self.tenants[t as usize].groups.insert(name.into(), g);
                g
            }
        };
        self.groups[g as usize]
            .as_mut()
            .expect("live group")
            .members
            .push(s);
        self.slot_group.insert(s, g);
        self.slots[s as usize].flags |= F_GROUP;
        self.group_version += 1;
    }

    fn leave_group(&mut self, s: u32) {
        if self.slots[s as usize].flags & F_GROUP == 0 {
            return;
        }
        self.slots[s as usize].flags &= !F_GROUP;
        self.group_version += 1;
        let g = self.slot_group.remove(&s).expect("group entry");
        let group = self.groups[g as usize].as_mut().expect("live group");
        if let Some(i) = group.members.iter().position(|&m| m == s) {
            group.members.swap_remove(i);
        }
        if group.members.is_empty() {
            let group = self.groups[g as usize].take().expect("live group");
            self.tenants[group.tenant as usize]
                .groups
                .remove(&*group.name);
            self.free_groups.push(g);
        }
    }

    /// Deletes object `s`: index, side tables, slot. Its ranges are freed now, or kept until
    /// `keep_until_ms` (a lease or a possibly still writing writer) when that is after `now_ms`.
    fn delete_object(&mut self, s: u32, now_ms: u64, keep_until_ms: u64) {
        let (state, t, h) = {
            let sl = &self.slots[s as usize];
            (sl.state(), sl.tenant, sl.hash)
        };
        debug_assert_ne!(state, ST_FREE);
        if let Ok(e) = self.tenants[t as usize]
            .index
            .find_entry(table_hash(h), |&x| x == s)
        {
            e.remove();
        }
        if state == ST_PROCESSING {
            self.inflight.remove(&s);
        }
        self.leave_group(s);
        self.soft.remove(&s);
        let sl = &self.slots[s as usize];
        let first = (sl.seg != NIL).then_some(Rep {
            seg: sl.seg,
            handle: sl.handle,
        });
        let extra = if sl.flags & F_EXTRA != 0 {
            self.extra.remove(&s).unwrap_or_default()
        } else {
            Vec::new()
        };
        for rep in first.into_iter().chain(extra) {
            self.release(rep, state, now_ms, keep_until_ms);
        }
        self.live_objects -= 1;
        let free_next = self.free_slot;
        let sl = &mut self.slots[s as usize];
        sl.key = Box::default();
        sl.flags = ST_FREE;
        sl.seg = NIL;
        sl.handle = free_next;
        self.free_slot = s;
    }

    fn release(&mut self, rep: Rep, state: u8, now_ms: u64, keep_until_ms: u64) {
        let defer = keep_until_ms > now_ms;
        let Some(seg) = self.segments[rep.seg as usize].as_deref_mut() else {
            return;
        };
        if state == ST_PROCESSING {
            seg.inflight -= 1;
        }
        let offset = seg.alloc.offset(rep.handle);
        if defer {
            seg.alloc.set_tag(rep.handle, NO_TAG);
            self.deferred.push(Deferred {
                seg: rep.seg,
                handle: rep.handle,
                until_ms: keep_until_ms,
            });
        } else {
            seg.alloc.free(rep.handle);
            self.bump(rep.seg);
        }
        if state == ST_COMPLETE
            && let Some(offset) = offset
        {
            self.journal(rep.seg, JournalRec::Freed { offset });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Objects: the API.

    /// Starts a put: allocates `cfg.replica_num` replicas of `size` bytes on distinct segments
    /// (best effort: one suffices) and returns where to write them. The object is PROCESSING,
    /// invisible to readers and owned by `client` until [`put_end`](Self::put_end).
    ///
    /// # Behavior
    ///
    /// - `OBJECT_ALREADY_EXISTS` if the key is COMPLETE (the old value stays; the client layer
    ///   maps this to success) or being written by a live writer within
    ///   `put_start_discard_timeout_ms`; a stale in-flight put is revoked and the key taken.
    /// - When no segment has room, evicts synchronously (never a leased, in-flight or
    ///   hard-pinned object) until the object fits; `NO_AVAILABLE_HANDLE` only when no segment
    ///   can be made to fit.
    /// - `CLIENT_NOT_FOUND`, `INVALID_KEY` (empty), `INVALID_PARAMS` (size 0, `replica_num` 0 or
    ///   above `max_replicas`).
    pub fn put_start(
        &mut self,
        client: ClientId,
        tenant: &str,
        key: &str,
        size: u64,
        cfg: &ReplicateConfig,
        now_ms: u64,
    ) -> StoreResult<Vec<ReplicaDesc>> {
        self.start_write(client, tenant, key, size, cfg, now_ms, false)
    }

    /// Insert-or-update. Absent key: as `put_start`. COMPLETE key, same size, not leased: the
    /// buffers are reused in place (replicas back to PROCESSING, new epoch). Otherwise the old
    /// ranges are released (kept until its read lease ends if leased) and new ones allocated
    /// (if that allocation fails the key is gone). `OBJECT_REPLICA_BUSY` while another put of
    /// the key is in flight. Finish with [`put_end`](Self::put_end) or
    /// [`put_revoke`](Self::put_revoke) (a revoked upsert deletes the key).
    pub fn upsert_start(
        &mut self,
        client: ClientId,
        tenant: &str,
        key: &str,
        size: u64,
        cfg: &ReplicateConfig,
        now_ms: u64,
    ) -> StoreResult<Vec<ReplicaDesc>> {
        self.start_write(client, tenant, key, size, cfg, now_ms, true)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "private; the two public wrappers are narrow"
    )]
    fn start_write(
        &mut self,
        client: ClientId,
        tenant: &str,
        key: &str,
        size: u64,
        cfg: &ReplicateConfig,
        now_ms: u64,
        upsert: bool,
    ) -> StoreResult<Vec<ReplicaDesc>> {
        self.require_client(client, now_ms)?;
        if key.is_empty() {
            return Err(err(StoreErrorCode::InvalidKey, "empty key"));
        }
        if size == 0 {
            return Err(err(StoreErrorCode::InvalidParams, "object size 0"));
        }
        if cfg.replica_num == 0 || cfg.replica_num > self.cfg.max_replicas {
            return Err(err(
                StoreErrorCode::InvalidParams,
                format!(
                    "replica_num {} out of 1..={}",
                    cfg.replica_num, self.cfg.max_replicas
                ),
            ));
        }
        let t = self
            .tenant_or_create(tenant)
            .ok_or_else(|| err(StoreErrorCode::InvalidParams, "too many tenants (65536)"))?;
        let h = self.hash_key(key);
        // Soft pin carried over by an upsert with `Preserve`: the remaining lifetime.
        let mut preserved_soft_ttl = None;
        if let Some(s) = self.find(t, key, h) {
            match self.slots[s as usize].state() {
                ST_COMPLETE if !upsert => {
                    return Err(err(
                        StoreErrorCode::ObjectAlreadyExists,
                        format!("{key} exists"),
                    ));
                }
                ST_COMPLETE => {
                    preserved_soft_ttl = self
                        .soft_deadline(s)
                        .map(|d| d.saturating_sub(now_ms))
                        .filter(|&ttl| ttl > 0);
                    let sl = &self.slots[s as usize];
                    let leased = sl.lease_until > now_ms;
                    if !leased && sl.size == size {
                        return Ok(self.upsert_in_place(
                            s,
                            client,
                            cfg,
                            preserved_soft_ttl,
                            now_ms,
                        ));
                    }
                    let keep = sl.lease_until;
                    self.delete_object(s, now_ms, keep);
                }
                _ => {
                    let f = self.inflight[&s];
                    let writer_alive = self.clients.get(&f.writer).is_some_and(|c| c.connected);
                    let fresh = f
                        .started_ms
                        .saturating_add(self.cfg.put_start_discard_timeout_ms)
                        > now_ms;
                    if writer_alive && fresh {
                        return Err(if upsert {
                            err(
                                StoreErrorCode::ObjectReplicaBusy,
                                format!("{key} is being written"),
                            )
                        } else {
                            err(
                                StoreErrorCode::ObjectAlreadyExists,
                                format!("{key} is being written"),
                            )
                        });
                    }
                    let keep = self.quarantine_until(now_ms);
                    self.delete_object(s, now_ms, keep);
                    self.counters.revoked_puts += 1;
                }
            }
        }

        let placed = self.place(client.0, cfg, size, now_ms);
        if placed.is_empty() {
            return Err(err(
                StoreErrorCode::NoAvailableHandle,
                format!("no segment can hold {size} bytes"),
            ));
        }
        let epoch = self.bump_epoch();
        let mut flags = ST_PROCESSING;
        if cfg.with_hard_pin {
            flags |= F_HARD;
        }
        let s = self.new_slot(Slot {
            key: key.into(),
            size,
            lease_until: 0,
            epoch,
            seg: placed[0].seg,
            handle: placed[0].handle,
            hash: h,
            tenant: t,
            flags,
            data_type: cfg.data_type,
        });
        self.index_insert(t, s);
        self.inflight.insert(
            s,
            InFlight {
                writer: client.0,
                started_ms: now_ms,
            },
        );
        for (i, p) in placed.iter().enumerate() {
            if i > 0 {
                self.add_replica(
                    s,
                    Rep {
                        seg: p.seg,
                        handle: p.handle,
                    },
                );
            }
            let seg = self.seg_mut(p.seg);
            seg.alloc.set_tag(p.handle, s);
            seg.inflight += 1;
        }
        self.set_soft_pin(s, cfg, preserved_soft_ttl);
        if let Some(g) = cfg.group_id.as_deref() {
            self.join_group(s, t, g);
        }
        Ok(placed
            .iter()
            .map(|p| {
                let seg = self.seg(p.seg);
                ReplicaDesc {
                    segment: seg.name.to_string(),
                    addr: seg.base + p.offset,
                    len: size,
                    kind: ReplicaKind::Memory,
                    epoch,
                }
            })
            .collect())
    }

    /// Records the soft pin TTL of a PROCESSING object (turned into a deadline at `put_end`).
    fn set_soft_pin(&mut self, s: u32, cfg: &ReplicateConfig, preserved_ttl: Option<u64>) {
        let ttl = match cfg.soft_pin_action {
            SoftPinAction::Enable => Some(
                cfg.soft_pin_ttl_ms
                    .unwrap_or(self.cfg.default_soft_pin_ttl_ms),
            ),
            SoftPinAction::Preserve => preserved_ttl,
            SoftPinAction::Disable => None,
        };
        match ttl {
            Some(ttl) => {
                self.soft.insert(s, ttl);
                self.slots[s as usize].flags |= F_SOFT;
            }
            None => {
                self.soft.remove(&s);
                self.slots[s as usize].flags &= !F_SOFT;
            }
        }
    }

    fn upsert_in_place(
        &mut self,
        s: u32,
        client: ClientId,
        cfg: &ReplicateConfig,
        preserved_soft_ttl: Option<u64>,
        now_ms: u64,
    ) -> Vec<ReplicaDesc> {
        let epoch = self.bump_epoch();
        let reps: Vec<Rep> = self.replicas(s).collect();
        for rep in &reps {
            let seg = self.seg_mut(rep.seg);
            seg.inflight += 1;
            let offset = seg.alloc.offset(rep.handle).expect("live replica");
            self.journal(rep.seg, JournalRec::Freed { offset });
        }
        let t = {
            let sl = &mut self.slots[s as usize];
            sl.flags = (sl.flags & !(ST_MASK | F_REF | F_HARD)) | ST_PROCESSING;
            if cfg.with_hard_pin {
                sl.flags |= F_HARD;
            }
            sl.epoch = epoch;
            sl.lease_until = 0;
            sl.data_type = cfg.data_type;
            sl.tenant
        };
        self.inflight.insert(
            s,
            InFlight {
                writer: client.0,
                started_ms: now_ms,
            },
        );
        self.set_soft_pin(s, cfg, preserved_soft_ttl);
        if self.group_name(s) != cfg.group_id.as_deref() {
            self.leave_group(s);
            if let Some(g) = cfg.group_id.as_deref() {
                self.join_group(s, t, g);
            }
        }
        self.descs(s)
    }

    fn descs(&self, s: u32) -> Vec<ReplicaDesc> {
        let sl = &self.slots[s as usize];
        self.replicas(s)
            .map(|r| self.desc(r, sl.size, sl.epoch))
            .collect()
    }

    fn desc(&self, r: Rep, len: u64, epoch: u64) -> ReplicaDesc {
        let seg = self.seg(r.seg);
        ReplicaDesc {
            segment: seg.name.to_string(),
            addr: seg.base + seg.alloc.offset(r.handle).expect("live replica"),
            len,
            kind: ReplicaKind::Memory,
            epoch,
        }
    }

    /// Ends a put: the object becomes COMPLETE and visible; its soft pin clock starts.
    ///
    /// # Behavior
    ///
    /// - Only the writer: `ILLEGAL_CLIENT` otherwise.
    /// - `OBJECT_NOT_FOUND` if the put was revoked (writer disconnected, timed out, force
    ///   removed).
    /// - Idempotent: `Ok` if the object is already COMPLETE (a retried RPC).
    pub fn put_end(
        &mut self,
        client: ClientId,
        tenant: &str,
        key: &str,
        now_ms: u64,
    ) -> StoreResult<()> {
        self.require_client(client, now_ms)?;
        let Some(s) = self.lookup(tenant, key) else {
            return Err(err(
                StoreErrorCode::ObjectNotFound,
                format!("{key} not found"),
            ));
        };
        if self.slots[s as usize].state() == ST_COMPLETE {
            return Ok(());
        }
        let f = self.inflight[&s];
        if f.writer != client.0 {
            return Err(err(
                StoreErrorCode::IllegalClient,
                format!("{key} is being written by client {}", f.writer),
            ));
        }
        self.inflight.remove(&s);
        let epoch = {
            let sl = &mut self.slots[s as usize];
            sl.flags = (sl.flags & !ST_MASK) | ST_COMPLETE;
            sl.lease_until = 0;
            sl.epoch
        };
        if let Some(ttl) = self.soft.get_mut(&s) {
            *ttl = now_ms.saturating_add(*ttl);
        }
        let (first, has_extra) = {
            let sl = &self.slots[s as usize];
            (sl.seg, sl.flags & F_EXTRA != 0)
        };
        if self.slots[s as usize].flags & F_GROUP != 0 {
            self.group_version += 1;
        }
        if first != NIL {
            self.bump(first);
            self.seg_mut(first).inflight -= 1;
            self.journal(first, JournalRec::Committed { slot: s, epoch });
        }
        if has_extra {
            let n = self.extra[&s].len();
            for i in 0..n {
                let seg = self.extra[&s][i].seg;
                self.bump(seg);
                self.seg_mut(seg).inflight -= 1;
                self.journal(seg, JournalRec::Committed { slot: s, epoch });
            }
        }
        Ok(())
    }

    /// The writer aborts its put (or upsert): the object is gone and the key writable again;
    /// its ranges are quarantined for `inflight_quarantine_ms` (a failed transfer may still
    /// land).
    /// `ILLEGAL_CLIENT` if not the writer, `OBJECT_NOT_FOUND`, `INVALID_PARAMS` if COMPLETE.
    pub fn put_revoke(
        &mut self,
        client: ClientId,
        tenant: &str,
        key: &str,
        now_ms: u64,
    ) -> StoreResult<()> {
        self.require_client(client, now_ms)?;
        let Some(s) = self.lookup(tenant, key) else {
            return Err(err(
                StoreErrorCode::ObjectNotFound,
                format!("{key} not found"),
            ));
        };
        if self.slots[s as usize].state() == ST_COMPLETE {
            return Err(err(
                StoreErrorCode::InvalidParams,
                format!("{key} is complete; use remove"),
            ));
        }
        if self.inflight[&s].writer != client.0 {
            return Err(err(
                StoreErrorCode::IllegalClient,
                format!("{key} is being written by another client"),
            ));
        }
        let keep = self.quarantine_until(now_ms);
        self.delete_object(s, now_ms, keep);
        self.counters.revoked_puts += 1;
        Ok(())
    }

    /// Until when the ranges of a revoked in-flight put stay quarantined.
    fn quarantine_until(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.cfg.inflight_quarantine_ms)
    }

    /// The COMPLETE replicas of a key, granting (or extending) a read lease
    /// `max(old, now + default_kv_lease_ttl_ms)` that keeps the object from eviction and from
    /// non-force removal; also marks it recently used.
    ///
    /// `OBJECT_NOT_FOUND`; `REPLICA_IS_NOT_READY` while PROCESSING.
    pub fn get_replicas(&mut self, tenant: &str, key: &str, now_ms: u64) -> StoreResult<GetReply> {
        let Some(s) = self.lookup(tenant, key) else {
            return Err(err(
                StoreErrorCode::ObjectNotFound,
                format!("{key} not found"),
            ));
        };
        let ttl = self.cfg.default_kv_lease_ttl_ms;
        let sl = &mut self.slots[s as usize];
        if sl.state() != ST_COMPLETE {
            return Err(err(
                StoreErrorCode::ReplicaIsNotReady,
                format!("{key} is being written"),
            ));
        }
        sl.lease_until = sl.lease_until.max(now_ms.saturating_add(ttl));
        sl.flags |= F_REF;
        let lease_ttl_ms = sl.lease_until - now_ms;
        self.counters.lease_grants += 1;
        let mut replicas = self.descs(s);
        if replicas.len() > 1 {
            let healthy = |d: &ReplicaDesc| {
                self.seg_by_name
                    .get(d.segment.as_str())
                    .is_some_and(|&s| self.seg(s).eligible())
            };
            replicas.sort_by_key(|d| !healthy(d));
        }
        Ok(GetReply {
            replicas,
            lease_ttl_ms,
        })
    }

    /// Whether the key is COMPLETE. Grants no lease and does not mark the object recently used
    /// (probing a key must not keep it alive: Mooncake #2187).
    pub fn exists(&self, tenant: &str, key: &str) -> bool {
        self.lookup(tenant, key)
            .is_some_and(|s| self.slots[s as usize].state() == ST_COMPLETE)
    }

    /// Removes a key.
    ///
    /// # Behavior
    ///
    /// - Without `force`: `OBJECT_HAS_LEASE` while leased, `REPLICA_IS_NOT_READY` while
    ///   PROCESSING.
    /// - With `force` the key goes at once, but its ranges are only reused after the lease ends
    ///   (or, for an in-flight put, after `inflight_quarantine_ms`), so a reader or writer
    ///   still transferring never touches someone else's bytes.
    pub fn remove(&mut self, tenant: &str, key: &str, force: bool, now_ms: u64) -> StoreResult<()> {
        let Some(s) = self.lookup(tenant, key) else {
            return Err(err(
                StoreErrorCode::ObjectNotFound,
                format!("{key} not found"),
            ));
        };
        let keep = self.removable(s, force, now_ms)?;
        self.delete_object(s, now_ms, keep);
        Ok(())
    }

    /// Whether `s` may be removed; returns until when its ranges must be kept.
    fn removable(&self, s: u32, force: bool, now_ms: u64) -> StoreResult<u64> {
        let sl = &self.slots[s as usize];
        if sl.state() == ST_PROCESSING {
            if !force {
                return Err(err(
                    StoreErrorCode::ReplicaIsNotReady,
                    format!("{} is being written", sl.key),
                ));
            }
            return Ok(self.quarantine_until(now_ms));
        }
        if sl.lease_until > now_ms {
            if !force {
                return Err(err(
                    StoreErrorCode::ObjectHasLease,
                    format!("{} is leased", sl.key),
                ));
            }
            return Ok(sl.lease_until);
        }
        Ok(0)
    }

    /// Removes every key of `tenant`, skipping leased and in-flight ones unless `force`.
    /// Returns how many were removed.
    pub fn remove_all(&mut self, tenant: &str, force: bool, now_ms: u64) -> u64 {
        let Some(t) = self.tenant(tenant) else {
            return 0;
        };
        let all: Vec<u32> = self.tenants[t as usize].index.iter().copied().collect();
        let mut n = 0;
        for s in all {
            if let Ok(keep) = self.removable(s, force, now_ms) {
                self.delete_object(s, now_ms, keep);
                n += 1;
            }
        }
        n
    }

    // -----------------------------------------------------------------------------------------
    // Introspection.

    /// Everything about a key, without granting a lease.
    pub fn query_key(&self, tenant: &str, key: &str) -> Option<ObjectInfo> {
        let s = self.lookup(tenant, key)?;
        let sl = &self.slots[s as usize];
        let processing = sl.state() == ST_PROCESSING;
        Some(ObjectInfo {
            size: sl.size,
            state: if processing {
                ObjectState::Processing
            } else {
                ObjectState::Complete
            },
            replicas: self.descs(s),
            lease_until_ms: sl.lease_until,
            hard_pin: sl.flags & F_HARD != 0,
            soft_pin_deadline_ms: self.soft_deadline(s),
            group: self.group_name(s).map(str::to_string),
            writer: processing.then(|| ClientId(self.inflight[&s].writer)),
            data_type: sl.data_type,
        })
    }

    /// Every mounted segment.
    pub fn segments(&self, now_ms: u64) -> Vec<SegmentStatus> {
        self.segments
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_deref()?)))
            .map(|(i, seg)| SegmentStatus {
                id: SegmentId(i as u32),
                name: seg.name.to_string(),
                host: seg.host.to_string(),
                owner: ClientId(seg.owner),
                base: seg.base,
                capacity: seg.alloc.capacity(),
                used: seg.alloc.used_bytes(),
                largest_free_extent: seg.alloc.largest_free_extent(),
                allocations: seg.alloc.live_allocations(),
                inflight: seg.inflight,
                suspect: seg.suspect,
                excluded: seg.excluded_at_ms.is_some(),
                ramp: seg.ramp_share(now_ms, self.cfg.ramp_up_ms),
            })
            .collect()
    }

    /// Totals and counters.
    pub fn stats(&self) -> MasterStats {
        let (used_bytes, capacity_bytes) = self.pool_usage();
        MasterStats {
            clients: self.clients.len(),
            segments: self.segments.iter().flatten().count(),
            tenants: self.tenants.len(),
            objects: self.live_objects,
            inflight_puts: self.inflight.len(),
            capacity_bytes,
            used_bytes,
            lease_grants: self.counters.lease_grants,
            evicted_objects: self.counters.evicted_objects,
            evicted_bytes: self.counters.evicted_bytes,
            revoked_puts: self.counters.revoked_puts,
            expired_clients: self.counters.expired_clients,
            deferred_frees: self.deferred.len(),
            slab_bytes: self.slots.capacity() * std::mem::size_of::<Slot>()
                + self
                    .tenants
                    .iter()
                    .map(|t| t.index.capacity() * 5)
                    .sum::<usize>(),
        }
    }

    fn pool_usage(&self) -> (u64, u64) {
        self.segments.iter().flatten().fold((0, 0), |(u, c), s| {
            (u + s.alloc.used_bytes(), c + s.alloc.capacity())
        })
    }
}
