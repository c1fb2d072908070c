//! The conformance cases for device memory (GPU VRAM), for transports that move it.
//!
//! A device runtime's test provides a [`DeviceHarness`]: which transports an engine gets,
//! which locations the machine has (`cpu`, `cuda:0`, `cuda:1`, …), and how to allocate and
//! read back memory at each. [`device_suite!`](crate::device_suite) generates one `#[test]`
//! per case; the cases, all with every byte checked:
//!
//! - [`device_round_trips`]: writes then reads back pieces of 1 B to 2 MiB between every
//!   pair of locations: between two engines of this process, within one engine (requests
//!   to its own segment), and with a peer in another process (whose initial bytes are
//!   read and checked first).
//! - [`device_refusals`]: out-of-range requests to a device region (before it, past its
//!   end, one byte too long, wrapping, empty) fail alone with the right error kind and no
//!   byte of the guard areas around the region (same allocation) changes; then through a
//!   forged descriptor that widens the region over its guards, for transports where the
//!   target checks ranges itself.
//! - [`device_peer_exits_mid_copy`]: a target process killed while a batch moves device
//!   memory fails (or finishes) every task within the deadline and new requests to it fail;
//!   the initiator's device memory stays usable (its own copies and another peer work). An
//!   initiator process killed while it writes into this process's device memory leaves
//!   that memory usable: it unregisters within the deadline and takes new transfers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{
    Batch, ErrorKind, LocalBuffer, Location, MemorySegment, MetadataKeys, MetadataStore, Opcode,
    SegmentDescriptor, SegmentHandle, TransferRequest, TransferStatus, TransportBuilder, block_on,
};
use mooncake_engine::TransferEngine;

use crate::checks::{
    EMPTY_PROBE, REFUSED_PROBES, alternating, assert_done_within, check_outcomes, forge_descriptor,
    probe_requests, range_probes,
};
use crate::transport::store;
use crate::{pattern, unique};

/// Memory a device harness allocates: registrable, and readable and writable from the test
/// (through the device runtime's copies for device memory).
pub trait TestMemory: MemorySegment {
    /// Copies `data` in at `offset`.
    fn write(&self, offset: usize, data: &[u8]);
    /// Copies `len` bytes at `offset` out.
    fn read(&self, offset: usize, len: usize) -> Vec<u8>;
}

/// Host memory for device suites (a [`LocalBuffer`]).
impl TestMemory for LocalBuffer {
    fn write(&self, offset: usize, data: &[u8]) {
        self.write_at(offset, data).expect("in range");
    }
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_at(offset, &mut v).expect("in range");
        v
    }
}

/// A device runtime under test (see the module docs).
pub trait DeviceHarness: Send + Sync {
    /// A name for messages.
    fn name(&self) -> &str;
    /// The transports of every engine of the suite, in routing order.
    fn builders(&self) -> Vec<Box<dyn TransportBuilder>>;
    /// Runs in every process of the suite (the test and its child peers) before engines are
    /// built: install the device runtime here.
    fn setup(&self) {}
    /// The locations to cover: `cpu:0` and each GPU.
    fn locations(&self) -> Vec<Location>;
    /// `len` bytes at `location`.
    fn alloc(&self, location: &Location, len: usize) -> Arc<dyn TestMemory>;
    /// `len` bytes at `offset` of `mem`, as a segment of its own (keeps `mem` alive).
    fn sub(&self, mem: &Arc<dyn TestMemory>, offset: usize, len: usize) -> Arc<dyn MemorySegment>;
    /// The engine timeout the suite uses.
    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// The target's CPU takes no part in a transfer (CUDA IPC): nothing on the target can
    /// refuse a range a forged descriptor names inside an exported allocation, and a frozen
    /// target still serves.
    fn one_sided(&self) -> bool {
        false
    }
}

/// An engine named `name` with the harness's transports.
pub fn engine(h: &dyn DeviceHarness, name: &str, md: &Arc<dyn MetadataStore>) -> TransferEngine {
    let mut b = TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(h.timeout())
        .with_cluster_secret(None);
    for t in h.builders() {
        b = b.with_boxed_transport(t);
    }
    b.build()
        .unwrap_or_else(|e| panic!("{}: engine {name} does not start: {e}", h.name()))
}

/// `len` bytes at `location` filled with [`pattern`]`(len, seed)`, registered with `e`.
pub fn registered(
    h: &dyn DeviceHarness,
    e: &TransferEngine,
    location: &Location,
    len: usize,
    seed: u64,
) -> Arc<dyn TestMemory> {
    let m = h.alloc(location, len);
    m.write(0, &pattern(len, seed));
    e.register(m.clone())
        .unwrap_or_else(|err| panic!("{}: register {location}: {err}", h.name()));
    m
}

fn device_locations(h: &dyn DeviceHarness) -> Vec<Location> {
    h.locations().into_iter().filter(|l| !l.is_host()).collect()
}

/// Bytes of each buffer of the round-trip cases.
const LEN: usize = 8 << 20;
/// Pieces `(offset, len)` of a round trip, inside the first half of a buffer, disjoint.
const PIECES: [(usize, usize); 5] = [
    (0, 1),
    (4096 + 5, 4099),
    (64 << 10, (64 << 10) + 17),
    (256 << 10, (1 << 20) + 3),
    ((1536 << 10) + 1, (2 << 20) + 5),
];

fn wait_ok(h: &dyn DeviceHarness, batch: &Batch, n: usize, what: &str) {
    batch
        .wait_blocking(Some(Instant::now() + 10 * h.timeout()))
        .unwrap_or_else(|e| panic!("{}: {what}: {e}", h.name()));
    assert!(
        (0..n).all(|i| batch.status(i) == TransferStatus::Completed),
        "{}: {what}: a task did not complete",
        h.name()
    );
}

/// Writes [`PIECES`] of `local` (freshly stamped with `seed`) to `remote` of segment `seg`,
/// reads them back into the second half of `local`, and checks every byte; also checks
/// the remote bytes directly when `remote_mem` is given.
/// Where a round trip goes: a segment, an address in it, and the memory when it is in this
/// process (checked directly too).
struct To<'a> {
    seg: SegmentHandle,
    addr: u64,
    mem: Option<&'a Arc<dyn TestMemory>>,
}

fn round_trip(
    h: &dyn DeviceHarness,
    init: &TransferEngine,
    local: &Arc<dyn TestMemory>,
    to: To<'_>,
    seed: u64,
    what: &str,
) {
    let (seg, remote, remote_mem) = (to.seg, to.addr, to.mem);
    let half = LEN / 2;
    let data = pattern(half, seed);
    local.write(0, &data);
    local.write(half, &vec![0xee; half]);
    let req = |opcode, off: usize, len: usize, local_off: usize| TransferRequest {
        opcode,
        source: local.base() + local_off as u64,
        target_id: seg,
        target_offset: remote + off as u64,
        length: len as u64,
    };
    let writes: Vec<_> = PIECES
        .iter()
        .map(|&(o, l)| req(Opcode::Write, o, l, o))
        .collect();
    wait_ok(
        h,
        &init.submit_batch(&writes).unwrap(),
        writes.len(),
        &format!("{what}: writes"),
    );
    if let Some(r) = remote_mem {
        for &(o, l) in &PIECES {
            assert!(
                r.read(o, l) == data[o..o + l],
                "{}: {what}: written piece at {o}+{l} differs at the target",
                h.name()
            );
        }
    }
    let reads: Vec<_> = PIECES
        .iter()
        .map(|&(o, l)| req(Opcode::Read, o, l, half + o))
        .collect();
    wait_ok(
        h,
        &init.submit_batch(&reads).unwrap(),
        reads.len(),
        &format!("{what}: reads"),
    );
    let back = local.read(half, half);
    for &(o, l) in &PIECES {
        assert!(
            back[o..o + l] == data[o..o + l],
            "{}: {what}: piece at {o}+{l} read back differs",
            h.name()
        );
    }
    // Bytes between the pieces were not touched by the reads.
    let mut expect = vec![0xee; half];
    for &(o, l) in &PIECES {
        expect[o..o + l].copy_from_slice(&data[o..o + l]);
    }
    assert!(
        back == expect,
        "{}: {what}: bytes outside the pieces changed",
        h.name()
    );
}

/// Round trips between every pair of locations: two engines of this process, one engine's
/// own segment, and a peer process. See the module docs.
pub fn device_round_trips(h: &dyn DeviceHarness, module_path: &str) {
    h.setup();
    let locs = h.locations();
    assert!(
        locs.iter().any(|l| !l.is_host()),
        "{}: the harness offers no device location",
        h.name()
    );
    let md = store();
    let tname = unique("dv-target");
    let target = engine(h, &tname, &md);
    let init = engine(h, &unique("dv-init"), &md);
    let tbufs: Vec<_> = locs
        .iter()
        .enumerate()
        .map(|(i, l)| registered(h, &target, l, LEN, 10 + i as u64))
        .collect();
    let lbufs: Vec<_> = locs
        .iter()
        .enumerate()
        .map(|(i, l)| registered(h, &init, l, LEN, 20 + i as u64))
        .collect();
    let seg = init.open_segment_blocking(&tname).unwrap();
    let mut seed = 100;
    for (i, a) in locs.iter().enumerate() {
        for (j, b) in locs.iter().enumerate() {
            seed += 1;
            round_trip(
                h,
                &init,
                &lbufs[i],
                To {
                    seg,
                    addr: tbufs[j].base(),
                    mem: Some(&tbufs[j]),
                },
                seed,
                &format!("in-process {a} -> {b}"),
            );
            if i != j {
                round_trip(
                    h,
                    &init,
                    &lbufs[i],
                    To {
                        seg: SegmentHandle::LOCAL,
                        addr: lbufs[j].base(),
                        mem: Some(&lbufs[j]),
                    },
                    seed,
                    &format!("own segment {a} -> {b}"),
                );
            }
        }
    }

    let child = DeviceChild::spawn(module_path, &unique("dv-child"), &locs, None);
    child.publish(&md);
    let seg = init.open_segment_blocking(child.name()).unwrap();
    let remote = child.buffers();
    assert_eq!(
        remote.len(),
        locs.len(),
        "the child published every location"
    );
    for (j, (addr, loc)) in remote.iter().enumerate() {
        // The child's initial bytes, read into each local location in turn.
        let i = j % lbufs.len();
        let batch = init
            .submit_batch(&[TransferRequest {
                opcode: Opcode::Read,
                source: lbufs[i].base(),
                target_id: seg,
                target_offset: *addr,
                length: LEN as u64,
            }])
            .unwrap();
        wait_ok(h, &batch, 1, &format!("initial read of the child's {loc}"));
        assert!(
            lbufs[i].read(0, LEN) == pattern(LEN, child_seed(j)),
            "{}: the child's {loc} buffer read into {} differs",
            h.name(),
            locs[i]
        );
    }
    for (i, a) in locs.iter().enumerate() {
        for (addr, b) in &remote {
            seed += 1;
            round_trip(
                h,
                &init,
                &lbufs[i],
                To {
                    seg,
                    addr: *addr,
                    mem: None,
                },
                seed,
                &format!("cross-process {a} -> {b}"),
            );
        }
    }
}

const GUARD: usize = 1 << 20;

/// Out-of-range requests to a device region fail alone and leave its guards alone. See the
/// module docs.
pub fn device_refusals(h: &dyn DeviceHarness) {
    h.setup();
    let Some(dev) = device_locations(h).into_iter().next_back() else {
        panic!("{}: the harness offers no device location", h.name());
    };
    let md = store();
    let tname = unique("dr-target");
    let target = engine(h, &tname, &md);
    let alloc = h.alloc(&dev, 3 * GUARD);
    let before = pattern(3 * GUARD, 77);
    alloc.write(0, &before);
    let region = h.sub(&alloc, GUARD, GUARD);
    let base = region.base();
    target.register(region).unwrap();
    let init = engine(h, &unique("dr-init"), &md);
    let local = registered(h, &init, &device_locations(h)[0], 4 * GUARD, 78);
    let seg = init.open_segment_blocking(&tname).unwrap();
    let g = GUARD as u64;
    let mut probes = range_probes(base, g);
    probes.extend([
        (base - g, 4096, Opcode::Read),  // 7: reads the guard below
        (base + g, 4096, Opcode::Write), // 8: writes the guard above
    ]);
    let reqs = probe_requests(seg, local.base(), &probes);
    let mut refused = REFUSED_PROBES.to_vec();
    refused.extend([7, 8]);
    let phases: &[&str] = if h.one_sided() {
        &["honest descriptor"]
    } else {
        &["honest descriptor", "forged descriptor"]
    };
    for phase in phases {
        if *phase == "forged descriptor" {
            let widen = |b: &mut mooncake_core::BufferDesc| {
                if b.addr == base {
                    b.addr -= g;
                    b.length += 2 * g;
                }
            };
            forge_descriptor(&md, &target, &tname, &init, seg, widen, &[]);
        }
        let batch = init.submit_batch(&reqs).unwrap();
        assert!(
            batch
                .wait_blocking(Some(Instant::now() + 10 * h.timeout()))
                .is_err()
        );
        check_outcomes(
            h.name(),
            phase,
            &batch,
            reqs.len(),
            &refused,
            Some(EMPTY_PROBE),
        );
        let mut expect = before.clone();
        expect[GUARD..GUARD + 4096].copy_from_slice(&pattern(4 * GUARD, 78)[..4096]);
        assert!(
            alloc.read(0, 3 * GUARD) == expect,
            "{} ({phase}): device bytes outside request 0 changed",
            h.name()
        );
        let read_back = local.read(4 * 8192, 4096);
        assert!(
            read_back == before[GUARD + 8192..GUARD + 8192 + 4096],
            "{} ({phase}): request 4 read the wrong bytes",
            h.name()
        );
    }
}

/// Peers that exit mid-copy, as target and as initiator. See the module docs.
pub fn device_peer_exits_mid_copy(h: &dyn DeviceHarness, module_path: &str) {
    h.setup();
    let devs = device_locations(h);
    let (near, far) = (
        devs.first().cloned().expect("a device location"),
        devs.last().cloned().expect("a device location"),
    );
    let limit = 3 * h.timeout();
    let md = store();
    let init = engine(h, &unique("dx-init"), &md);
    let local = registered(h, &init, &near, CHILD_LEN, 2);

    // The target process exits while a batch moves its device memory.
    let mut child = DeviceChild::spawn(
        module_path,
        &unique("dx-target"),
        std::slice::from_ref(&far),
        None,
    );
    child.publish(&md);
    let seg = init.open_segment_blocking(child.name()).unwrap();
    let (remote, _) = child.buffers()[0].clone();
    let n = (CHILD_LEN >> 20) as u64;
    let healthy = init
        .submit_batch(&alternating(seg, local.base(), remote, n, 1 << 20))
        .unwrap();
    wait_ok(h, &healthy, n as usize, "healthy round");
    let batch = if h.one_sided() {
        let b = init
            .submit_batch(&alternating(seg, local.base(), remote, n, 1 << 20))
            .unwrap();
        child.signal(libc::SIGKILL);
        b
    } else {
        // Freeze first so that the whole batch is surely in flight when the peer dies.
        child.signal(libc::SIGSTOP);
        let b = init
            .submit_batch(&alternating(seg, local.base(), remote, n, 1 << 20))
            .unwrap();
        child.signal(libc::SIGKILL);
        b
    };
    assert_done_within(h.name(), &batch, limit, "target killed mid-copy");
    if !h.one_sided() {
        assert_eq!(
            batch.failed(),
            n as usize,
            "{}: tasks to a killed peer completed",
            h.name()
        );
    }
    for i in 0..n as usize {
        if let Some(e) = batch.error(i) {
            assert!(
                matches!(e.kind(), ErrorKind::PeerUnreachable | ErrorKind::Timeout),
                "{}: task {i} to a killed peer: {e}",
                h.name()
            );
        }
    }
    if h.one_sided() {
        // kill(2) returns before the process is gone, and a dying process's device memory
        // stays mapped (and writable) by its peers until it has exited: a one-sided
        // transport can only tell once it has.
        child.wait_exit();
    }
    let again = init
        .submit_batch(&alternating(seg, local.base(), remote, 1, 1 << 20))
        .unwrap();
    assert_done_within(h.name(), &again, limit, "new request to a killed peer");
    assert_eq!(
        again.failed(),
        1,
        "{}: a write to a killed peer succeeded",
        h.name()
    );
    drop(child);

    // The initiator's device memory is still usable: its own copies, and another peer.
    let spare = registered(h, &init, &far, LEN, 3);
    round_trip(
        h,
        &init,
        &spare,
        To {
            seg: SegmentHandle::LOCAL,
            addr: local.base(),
            mem: Some(&local),
        },
        4,
        "own segment after a peer died",
    );
    let other = engine(h, &unique("dx-other"), &md);
    let obuf = registered(h, &other, &far, LEN, 5);
    let oseg = init.open_segment_blocking(other.local_name()).unwrap();
    round_trip(
        h,
        &init,
        &local,
        To {
            seg: oseg,
            addr: obuf.base(),
            mem: Some(&obuf),
        },
        6,
        "another peer after a peer died",
    );

    // An initiator process exits while it writes into our device memory.
    let tname = unique("dx-target2");
    let target = engine(h, &tname, &md);
    let tbuf = registered(h, &target, &near, CHILD_LEN, 7);
    let desc = String::from_utf8(target.local_descriptor().to_json()).expect("UTF-8");
    let mut writer = DeviceChild::spawn(module_path, &unique("dx-writer"), &[far], Some(&desc));
    writer.wait_ready();
    writer.signal(libc::SIGKILL);
    drop(writer);
    let t0 = Instant::now();
    let base = tbuf.base();
    let t2 = target.clone();
    let unreg = std::thread::spawn(move || t2.unregister_memory(base));
    while !unreg.is_finished() && t0.elapsed() < limit + Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        unreg.is_finished() && t0.elapsed() <= limit,
        "{}: unregistering device memory a killed initiator wrote into took {:?}",
        h.name(),
        t0.elapsed()
    );
    unreg.join().unwrap().unwrap();
    target.register(tbuf.clone()).unwrap();
    let tseg = init.open_segment_blocking(&tname).unwrap();
    block_on(init.refresh_segment(tseg)).unwrap();
    round_trip(
        h,
        &init,
        &local,
        To {
            seg: tseg,
            addr: tbuf.base(),
            mem: Some(&tbuf),
        },
        8,
        "device memory a killed initiator wrote into",
    );
}

/// Environment variable naming the segment the generated `device_child` test serves.
pub const DEVICE_CHILD_ENV: &str = "MOONCAKE_TESTKIT_DEVICE_CHILD";
const LOCATIONS_ENV: &str = "MOONCAKE_TESTKIT_DEVICE_LOCATIONS";
const PEER_ENV: &str = "MOONCAKE_TESTKIT_DEVICE_PEER";

/// Bytes of each child buffer and of the exit cases' buffers.
const CHILD_LEN: usize = 64 << 20;

fn child_seed(i: usize) -> u64 {
    300 + i as u64
}

/// Body of the generated, ignored `device_child` test. As a target (no peer given): one
/// buffer per location, filled with [`pattern`]`(LEN, 300 + i)` (the first one `CHILD_LEN`
/// long), descriptor printed. As an initiator (a peer descriptor given): writes into the
/// peer's first buffer until killed, printing `READY` after the first batch.
pub fn device_child(h: &dyn DeviceHarness) {
    let Ok(name) = std::env::var(DEVICE_CHILD_ENV) else {
        return;
    };
    // SAFETY: prctl with integer arguments only. The child dies with the test thread that
    // started it, even if the test process crashes.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    h.setup();
    let locs: Vec<Location> = std::env::var(LOCATIONS_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a location"))
        .collect();
    let md = store();
    let e = engine(h, &name, &md);
    if let Ok(peer) = std::env::var(PEER_ENV) {
        let d = SegmentDescriptor::from_json(peer.as_bytes(), "parent").expect("descriptor");
        let key = MetadataKeys::from_env().segment(&d.name);
        block_on(md.put(&key, d.to_json())).expect("publish the peer");
        let buf = registered(h, &e, &locs[0], CHILD_LEN, 9);
        let seg = e.open_segment_blocking(&d.name).expect("open the peer");
        let remote = d.buffers[0].addr;
        let reqs: Vec<_> = (0..(CHILD_LEN >> 20) as u64)
            .map(|i| TransferRequest {
                opcode: Opcode::Write,
                source: buf.base() + (i << 20),
                target_id: seg,
                target_offset: remote + (i << 20),
                length: 1 << 20,
            })
            .collect();
        let mut first = true;
        loop {
            let b = e.submit_batch(&reqs).expect("submit");
            let _ = b.wait_blocking(None);
            if first {
                println!("READY");
                first = false;
            }
        }
    }
    let _bufs: Vec<_> = locs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let len = if i == 0 { CHILD_LEN } else { LEN };
            registered(h, &e, l, len, child_seed(i))
        })
        .collect();
    println!(
        "DESC {}",
        String::from_utf8(e.local_descriptor().to_json()).expect("UTF-8")
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A device peer in a child process (this test binary re-executed).
pub struct DeviceChild {
    child: Child,
    descriptor: Option<SegmentDescriptor>,
    out: Option<BufReader<std::process::ChildStdout>>,
    locations: Vec<Location>,
}

impl DeviceChild {
    /// Starts the `device_child` test next to `module_path` serving `name` with buffers at
    /// `locations` (as a target), or writing into `peer` (a descriptor's JSON).
    pub fn spawn(
        module_path: &str,
        name: &str,
        locations: &[Location],
        peer: Option<&str>,
    ) -> Self {
        let suite = module_path.split_once("::").map_or(module_path, |(_, m)| m);
        let test = format!("{suite}::device_child");
        let locs = locations
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
        cmd.args([
            "--exact",
            &test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DEVICE_CHILD_ENV, name)
        .env(LOCATIONS_ENV, locs)
        .stdout(Stdio::piped());
        if let Some(p) = peer {
            cmd.env(PEER_ENV, p);
        }
        let mut child = cmd.spawn().expect("re-execute the test binary");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut me = Self {
            child,
            descriptor: None,
            out: Some(out),
            locations: locations.to_vec(),
        };
        if peer.is_none() {
            let line = me.line_with("DESC ");
            let json = line.split_once("DESC ").expect("checked").1;
            me.descriptor =
                Some(SegmentDescriptor::from_json(json.as_bytes(), "child").expect("descriptor"));
        }
        me
    }

    fn line_with(&mut self, marker: &str) -> String {
        let out = self.out.as_mut().expect("stdout");
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.contains(marker) => return line.trim_end().to_string(),
                Ok(_) => {}
            }
        }
        let _ = self.child.kill();
        let status = self.child.wait();
        panic!("the device child exited before printing {marker:?}: {status:?}");
    }

    /// Waits until a writer child finished its first batch.
    pub fn wait_ready(&mut self) {
        self.line_with("READY");
    }

    /// Publishes the child's descriptor in `md`.
    pub fn publish(&self, md: &Arc<dyn MetadataStore>) {
        let d = self.descriptor.as_ref().expect("a target child");
        block_on(md.put(&MetadataKeys::from_env().segment(&d.name), d.to_json())).unwrap();
    }

    /// The child's segment name.
    pub fn name(&self) -> &str {
        &self.descriptor.as_ref().expect("a target child").name
    }

    /// The child's buffers, `(address, location)`, in the order of its locations.
    pub fn buffers(&self) -> Vec<(u64, Location)> {
        let d = self.descriptor.as_ref().expect("a target child");
        let mut bufs: Vec<(u64, Location, u64)> = d
            .buffers
            .iter()
            .map(|b| (b.addr, b.name.parse().unwrap_or_default(), b.length))
            .collect();
        // Published in address order: put them back in location order (the first one is
        // the long one; the others are matched by location, in order).
        let mut out = Vec::new();
        for (i, loc) in self.locations.iter().enumerate() {
            let want = if i == 0 { CHILD_LEN } else { LEN } as u64;
            let k = bufs
                .iter()
                .position(|(_, l, len)| l == loc && *len == want)
                .expect("the child published a buffer per location");
            let (a, l, _) = bufs.remove(k);
            out.push((a, l));
        }
        out
    }

    /// Waits until the child has exited (and reaps it).
    pub fn wait_exit(&mut self) {
        let _ = self.child.wait();
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }
}

impl Drop for DeviceChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generates one `#[test]` per device case for a harness, plus the ignored `device_child`
/// helper test that the cases re-execute.
///
/// ```ignore
/// mooncake_testkit::device_suite!(cuda_ipc, || Some(CudaIpc), #[ignore = "needs GPUs"]);
/// ```
#[macro_export]
macro_rules! device_suite {
    ($m:ident, $make:expr $(, #[$attr:meta])* $(,)?) => {
        mod $m {
            #[allow(unused_imports)]
            use super::*;
            fn harness() -> Option<impl $crate::device::DeviceHarness> {
                let make = $make;
                make()
            }
            #[test]
            $(#[$attr])*
            fn device_round_trips() {
                if let Some(h) = harness() {
                    $crate::device::device_round_trips(&h, module_path!())
                }
            }
            #[test]
            $(#[$attr])*
            fn device_refusals() {
                if let Some(h) = harness() {
                    $crate::device::device_refusals(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn device_peer_exits_mid_copy() {
                if let Some(h) = harness() {
                    $crate::device::device_peer_exits_mid_copy(&h, module_path!())
                }
            }
            #[test]
            #[ignore = "helper process of the device suite, started by its cases"]
            fn device_child() {
                if let Some(h) = harness() {
                    $crate::device::device_child(&h)
                }
            }
        }
    };
}
