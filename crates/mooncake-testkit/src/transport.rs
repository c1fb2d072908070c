//! The conformance suite every transport passes.
//!
//! A transport provides a [`TransportHarness`] (how to build it into an engine, whether it
//! reaches other processes); [`transport_suite!`](crate::transport_suite) generates one
//! `#[test]` per case. The cases, all with every byte checked:
//!
//! - [`random_batches`]: random mixed read/write batches (1 B to 3 MiB, any offsets) under
//!   every runtime, checked against a model of both buffers.
//! - [`refusals_keep_guard_bytes`]: out-of-range, unregistered, wrapping, read-only and
//!   local-only targets fail alone, with the right error kind, and no byte outside what a
//!   valid request names changes (guard bytes around the regions are checked).
//! - [`unregister_during_transfers`]: the target unregisters a region while a batch writes
//!   into it; once `unregister_memory` returns no byte lands there any more.
//! - [`initiator_dropped_mid_transfer`] and [`target_dropped_mid_transfer`]: every task of a
//!   batch in flight finishes (completed or failed) within the deadline, nothing hangs.
//! - [`dead_peer_fails_within_deadline`]: a peer process killed (SIGKILL) or frozen
//!   (SIGSTOP) mid-batch fails the batch within three timeouts; new requests fail fast; the
//!   initiator keeps working with another peer.
//! - [`restarted_peer_is_reached_again`]: a peer that restarts under the same name (new
//!   generation) is reached by the next request, in-process and as a new process.
//!
//! Peers in other processes are this test binary re-executed: the generated, ignored
//! `child_peer` test runs the harness's transport in a child and prints its descriptor.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{
    Access, EmbeddedMetadataStore, ErrorKind, ForeignMemory, LocalBuffer, Location, MemorySegment,
    MetadataKeys, MetadataStore, Opcode, SegmentDescriptor, TransferRequest, TransferStatus,
    TransportBuilder, block_on,
};
use mooncake_engine::TransferEngine;

use crate::checks::{
    EMPTY_PROBE, REFUSED_PROBES, alternating, assert_done_within, check_outcomes, forge_descriptor,
    probe_requests, range_probes,
};
use crate::rt::on_all_runtimes;
use crate::{pattern, unique};

/// A transport under test.
pub trait TransportHarness: Send + Sync {
    /// The transport's name, for messages.
    fn name(&self) -> &str;
    /// A builder of the transport, as a user would configure it.
    fn builder(&self) -> Box<dyn TransportBuilder>;
    /// Whether engines in other processes are reachable (the loopback transport: no).
    fn cross_process(&self) -> bool {
        true
    }
    /// The engine timeout the suite uses: a dead peer must fail tasks within a few of these.
    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// Whether moving bytes needs the peer's CPU (TCP: yes; one-sided RDMA: no — a frozen
    /// peer's NIC still serves it). When it does, a request to a frozen or killed peer must
    /// fail; otherwise it must only finish within the deadline.
    fn needs_peer_cpu(&self) -> bool {
        true
    }
    /// The cluster secret every engine of the suite (and its child peers) uses.
    fn secret(&self) -> Option<mooncake_core::ClusterSecret> {
        None
    }
}

/// An engine named `name` on `store` with the harness's transport.
pub fn engine(
    h: &dyn TransportHarness,
    name: &str,
    store: &Arc<dyn MetadataStore>,
) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(store.clone())
        .with_timeout(h.timeout())
        .with_cluster_secret(h.secret())
        .with_boxed_transport(h.builder())
        .build()
        .unwrap_or_else(|e| panic!("{}: engine {name} does not start: {e}", h.name()))
}

/// A fresh embedded metadata store.
pub fn store() -> Arc<dyn MetadataStore> {
    Arc::new(EmbeddedMetadataStore::new())
}

/// A registered buffer of `len` bytes filled with [`pattern`]`(len, seed)`.
pub fn buffer(engine: &TransferEngine, len: usize, seed: u64) -> Arc<LocalBuffer> {
    let b = Arc::new(LocalBuffer::new(len).expect("buffer"));
    b.write_at(0, &pattern(len, seed)).expect("fill");
    engine.register(b.clone()).expect("register");
    b
}

const RANDOM_LEN: usize = 8 << 20;

/// Random mixed batches (1 B to 3 MiB, any offsets, reads and writes), awaited under every
/// runtime; afterwards both buffers equal the model.
pub fn random_batches(h: &dyn TransportHarness) {
    let md = store();
    let tname = unique("rb-target");
    let target = engine(h, &tname, &md);
    let init = engine(h, &unique("rb-init"), &md);
    let tbuf = buffer(&target, RANDOM_LEN, 1);
    let lbuf = buffer(&init, RANDOM_LEN, 2);
    let mut tmodel = pattern(RANDOM_LEN, 1);
    let mut lmodel = pattern(RANDOM_LEN, 2);
    let seg = init.open_segment_blocking(&tname).unwrap();
    let mut rng = XorShift(0x5eed_1234_5678_9abc);
    let mut round = 0usize;
    on_all_runtimes(|rt| {
        // Requests of one batch touch disjoint ranges on both sides, so their effects don't
        // depend on order.
        let mut batches = Vec::new();
        for _ in 0..6 {
            round += 1;
            let n = rng.range(1, 24) as usize;
            let slot = RANDOM_LEN / n;
            let mut reqs = Vec::new();
            for i in 0..n {
                let len = rng.range(1, slot.min(3 << 20) as u64 + 1) as usize;
                let loff = i * slot + rng.range(0, (slot - len) as u64 + 1) as usize;
                let roff =
                    ((i + round) % n) * slot + rng.range(0, (slot - len) as u64 + 1) as usize;
                let opcode = if rng.next().is_multiple_of(2) {
                    Opcode::Read
                } else {
                    Opcode::Write
                };
                reqs.push(TransferRequest {
                    opcode,
                    source: lbuf.base() + loff as u64,
                    target_id: seg,
                    target_offset: tbuf.base() + roff as u64,
                    length: len as u64,
                });
                match opcode {
                    Opcode::Read => {
                        let src = tmodel[roff..roff + len].to_vec();
                        lmodel[loff..loff + len].copy_from_slice(&src);
                    }
                    Opcode::Write => {
                        let src = lmodel[loff..loff + len].to_vec();
                        tmodel[roff..roff + len].copy_from_slice(&src);
                    }
                }
            }
            batches.push(reqs);
        }
        let init = &init;
        let name = h.name().to_string();
        async move {
            for reqs in batches {
                let batch = init.submit_batch(&reqs).unwrap();
                batch
                    .wait()
                    .await
                    .unwrap_or_else(|e| panic!("{name} under {rt:?}: {e}"));
                assert!(
                    (0..reqs.len()).all(|i| batch.status(i) == TransferStatus::Completed),
                    "{name} under {rt:?}: a task did not complete"
                );
            }
        }
    });
    assert!(
        tbuf.to_vec() == tmodel,
        "{}: target buffer differs from the model",
        h.name()
    );
    assert!(
        lbuf.to_vec() == lmodel,
        "{}: initiator buffer differs from the model",
        h.name()
    );
}

const GUARD: usize = 64 << 10;

/// A target region of `GUARD` bytes between two unregistered guard areas.
struct Guarded {
    backing: Arc<LocalBuffer>,
    base: u64,
}

impl Guarded {
    fn new(engine: &TransferEngine, access: Access, seed: u64) -> Self {
        let backing = Arc::new(LocalBuffer::new(3 * GUARD).unwrap());
        backing.write_at(0, &pattern(3 * GUARD, seed)).unwrap();
        let base = backing.base() + GUARD as u64;
        // SAFETY: the middle third of `backing`, which the caller keeps alive (it is held
        // here) for as long as the engine can reach it.
        let mem = unsafe { ForeignMemory::new(base, GUARD, Location::Cpu(0), access) };
        engine.register(Arc::new(mem)).unwrap();
        Self { backing, base }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.backing.to_vec()
    }
}

/// Out-of-range, unregistered, wrapping, read-only and local-only targets fail alone with
/// the right error kind; valid requests of the same batch complete; no byte outside the
/// valid requests' ranges changes.
///
/// Two phases: first through the target's honest descriptor (the initiator refuses most
/// requests itself), then through a forged one that widens every buffer over its guards,
/// marks the read-only region writable and adds the local-only and unregistered regions —
/// so every request reaches the target, which must refuse it on its own.
pub fn refusals_keep_guard_bytes(h: &dyn TransportHarness) {
    let md = store();
    let tname = unique("rf-target");
    let target = engine(h, &tname, &md);
    let rw = Guarded::new(&target, Access::ReadWrite, 90);
    let ro = Guarded::new(&target, Access::ReadOnly, 91);
    let lo = Guarded::new(&target, Access::LocalOnly, 92);
    let gone = Guarded::new(&target, Access::ReadWrite, 93);
    let init = engine(h, &unique("rf-init"), &md);
    let lbuf = buffer(&init, 4 * GUARD, 7);
    let seg = init.open_segment_blocking(&tname).unwrap();
    let gone_desc = target
        .local_descriptor()
        .buffers
        .into_iter()
        .find(|b| b.addr == gone.base)
        .expect("the region is published");
    target.unregister_memory(gone.base).unwrap();
    block_on(init.refresh_segment(seg)).unwrap();
    let g = GUARD as u64;
    let mut probes = range_probes(rw.base, g);
    probes.extend([
        (ro.base, 4096, Opcode::Write),    // 7: read-only
        (ro.base, 4096, Opcode::Read),     // 8: fine
        (lo.base, 4096, Opcode::Read),     // 9: local only
        (lo.base, 4096, Opcode::Write),    // 10: local only
        (gone.base, 4096, Opcode::Write),  // 11: unregistered
        (rw.base - g, 4096, Opcode::Read), // 12: reads the guard below
    ]);
    let reqs = probe_requests(seg, lbuf.base(), &probes);
    let mut refused = REFUSED_PROBES.to_vec();
    refused.extend([7, 9, 10, 11, 12]);
    let mut before = [rw.snapshot(), ro.snapshot(), lo.snapshot(), gone.snapshot()];
    for phase in ["honest descriptor", "forged descriptor"] {
        if phase == "forged descriptor" {
            // Widen what the initiator believes: every request now passes its own checks.
            let mut lo_desc = gone_desc.clone();
            lo_desc.addr = lo.base;
            let widen = |b: &mut mooncake_core::BufferDesc| {
                if b.addr == rw.base || b.addr == ro.base {
                    b.addr -= g;
                    b.length += 2 * g;
                    b.read_only = false;
                }
            };
            forge_descriptor(
                &md,
                &target,
                &tname,
                &init,
                seg,
                widen,
                &[lo_desc, gone_desc.clone()],
            );
        }
        let batch = init.submit_batch(&reqs).unwrap();
        assert!(batch.wait_blocking(None).is_err());
        check_outcomes(
            h.name(),
            phase,
            &batch,
            reqs.len(),
            &refused,
            Some(EMPTY_PROBE),
        );
        // Only request 0 wrote: the first 4 KiB of the read-write region.
        let mut expect = before[0].clone();
        expect[GUARD..GUARD + 4096].copy_from_slice(&pattern(4 * GUARD, 7)[..4096]);
        assert!(
            rw.snapshot() == expect,
            "{} ({phase}): bytes outside request 0 changed",
            h.name()
        );
        for (name, region, was) in [
            ("read-only", &ro, &before[1]),
            ("local-only", &lo, &before[2]),
            ("unregistered", &gone, &before[3]),
        ] {
            assert!(
                region.snapshot() == *was,
                "{} ({phase}): a {name} region was written",
                h.name()
            );
        }
        // Reads 4 and 8 brought the right bytes; refused reads brought none.
        let l = lbuf.to_vec();
        let at = |i: usize| i * 8192..i * 8192 + 4096;
        assert!(l[at(4)] == pattern(3 * GUARD, 90)[GUARD + 8192..GUARD + 8192 + 4096]);
        assert!(l[at(8)] == pattern(3 * GUARD, 91)[GUARD..GUARD + 4096]);
        for i in [3, 6, 9, 12] {
            assert!(
                l[at(i)] == pattern(4 * GUARD, 7)[at(i)],
                "{} ({phase}): refused read {i} changed local memory",
                h.name()
            );
        }
        before[0] = rw.snapshot();
    }

    // An unregistered local source fails before anything is sent.
    let stray = LocalBuffer::new(4096).unwrap();
    let e = init
        .transfer_sync_write(&tname, stray.base(), rw.base, 4096)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotRegistered, "{}: {e}", h.name());
    // The peer still serves valid requests.
    init.transfer_sync_read(&tname, lbuf.base(), rw.base, 4096)
        .unwrap();
}

/// Many 1 MiB writes into one region while the target unregisters it: every task
/// finishes, and once `unregister_memory` has returned no byte lands in the region.
pub fn unregister_during_transfers(h: &dyn TransportHarness) {
    const LEN: usize = 32 << 20;
    let md = store();
    let tname = unique("ud-target");
    let target = engine(h, &tname, &md);
    let init = engine(h, &unique("ud-init"), &md);
    let lbuf = buffer(&init, LEN, 5);
    for round in 0..4u64 {
        let tbuf = buffer(&target, LEN, 6);
        let seg = init.open_segment_blocking(&tname).unwrap();
        block_on(init.refresh_segment(seg)).unwrap();
        let reqs: Vec<TransferRequest> = (0..(LEN >> 20) as u64)
            .map(|i| TransferRequest {
                opcode: Opcode::Write,
                source: lbuf.base() + (i << 20),
                target_id: seg,
                target_offset: tbuf.base() + (i << 20),
                length: 1 << 20,
            })
            .collect();
        let batch = init.submit_batch(&reqs).unwrap();
        // Let a varying part of the batch through before unregistering.
        std::thread::sleep(Duration::from_micros(200 * round));
        target.unregister_memory(tbuf.base()).unwrap();
        let after_unregister = tbuf.to_vec();
        let _ = batch.wait_blocking(Some(Instant::now() + 3 * h.timeout()));
        assert!(
            batch.is_done(),
            "{}: tasks still pending after unregister",
            h.name()
        );
        assert!(
            tbuf.to_vec() == after_unregister,
            "{}: bytes landed after unregister_memory returned (round {round})",
            h.name()
        );
        // Every 1 MiB block is either untouched or fully written when its task completed.
        let model = pattern(LEN, 5);
        for i in 0..LEN >> 20 {
            let r = i << 20..(i + 1) << 20;
            if batch.status(i) == TransferStatus::Completed {
                assert!(
                    after_unregister[r.clone()] == model[r],
                    "{}: block {i} completed but its bytes are not there",
                    h.name()
                );
            }
        }
    }
}

/// The initiator engine is dropped while a batch is in flight: every task still finishes
/// (completed or failed) within the deadline.
pub fn initiator_dropped_mid_transfer(h: &dyn TransportHarness) {
    let md = store();
    let tname = unique("id-target");
    let target = engine(h, &tname, &md);
    let tbuf = buffer(&target, 64 << 20, 1);
    let init = engine(h, &unique("id-init"), &md);
    let lbuf = buffer(&init, 64 << 20, 2);
    let seg = init.open_segment_blocking(&tname).unwrap();
    let batch = init
        .submit_batch(&alternating(seg, lbuf.base(), tbuf.base(), 64, 1 << 20))
        .unwrap();
    drop(init);
    assert_done_within(h.name(), &batch, 3 * h.timeout(), "initiator dropped");
    // The target serves a new initiator.
    let again = engine(h, &unique("id-init2"), &md);
    let b2 = buffer(&again, 1 << 20, 3);
    again
        .transfer_sync_write(&tname, b2.base(), tbuf.base(), 1 << 20)
        .unwrap();
    assert_eq!(tbuf.to_vec()[..1 << 20], pattern(1 << 20, 3)[..]);
}

/// The target engine is dropped while a batch is in flight: every task finishes within the
/// deadline, and new requests to it fail within the deadline.
pub fn target_dropped_mid_transfer(h: &dyn TransportHarness) {
    let md = store();
    let tname = unique("td-target");
    let target = engine(h, &tname, &md);
    let tbuf = buffer(&target, 64 << 20, 1);
    let init = engine(h, &unique("td-init"), &md);
    let lbuf = buffer(&init, 64 << 20, 2);
    let seg = init.open_segment_blocking(&tname).unwrap();
    let batch = init
        .submit_batch(&alternating(seg, lbuf.base(), tbuf.base(), 64, 1 << 20))
        .unwrap();
    drop(target);
    assert_done_within(h.name(), &batch, 3 * h.timeout(), "target dropped");
    // A new request (a bounded wait: a transport that never fails it must not hang the suite).
    let again = init
        .submit_batch(&alternating(seg, lbuf.base(), tbuf.base(), 1, 1 << 20))
        .unwrap();
    assert_done_within(
        h.name(),
        &again,
        3 * h.timeout(),
        "request to a dropped target",
    );
    assert_eq!(
        again.failed(),
        1,
        "{}: a write to a dropped target succeeded",
        h.name()
    );
}

/// Environment variable that makes the generated `child_peer` test serve as a peer.
pub const CHILD_ENV: &str = "MOONCAKE_TESTKIT_CHILD_PEER";

/// Size of the child peer's registered buffer.
const CHILD_LEN: usize = 64 << 20;

/// Body of the generated, ignored `child_peer` test: when [`CHILD_ENV`] names a segment,
/// serve it with the harness's transport until killed, after printing the descriptor.
pub fn child_peer(h: &dyn TransportHarness) {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let md = store();
    let e = engine(h, &name, &md);
    let _buf = buffer(&e, CHILD_LEN, 1);
    println!(
        "DESC {}",
        String::from_utf8(e.local_descriptor().to_json()).expect("descriptor is UTF-8")
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A peer in a child process (this test binary re-executed).
pub struct ChildPeer {
    child: Child,
    descriptor: SegmentDescriptor,
}

impl ChildPeer {
    /// Starts `test_path` (the libtest name of the generated `child_peer` test) serving
    /// segment `name`, and waits for its descriptor.
    pub fn spawn(test_path: &str, name: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([
                "--exact",
                test_path,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, name)
            .stdout(Stdio::piped())
            .spawn()
            .expect("re-execute the test binary");
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        for line in out.lines() {
            let Ok(line) = line else { break };
            // libtest prints "test … " before the test's own output.
            if let Some((_, json)) = line.split_once("DESC ") {
                let descriptor = SegmentDescriptor::from_json(json.as_bytes(), "child")
                    .expect("the child's descriptor parses");
                return Self { child, descriptor };
            }
        }
        let _ = child.kill();
        let status = child.wait();
        panic!("the child peer {test_path} exited before publishing: {status:?}");
    }

    /// Publishes the child's descriptor in `md` (the child runs its own embedded store).
    pub fn publish(&self, md: &Arc<dyn MetadataStore>) {
        let key = MetadataKeys::from_env().segment(&self.descriptor.name);
        block_on(md.put(&key, self.descriptor.to_json())).expect("publish");
    }

    /// Address of the child's registered buffer (filled with `pattern(64 MiB, 1)`).
    pub fn base(&self) -> u64 {
        self.descriptor.buffers[0].addr
    }

    /// The child's segment name.
    pub fn name(&self) -> &str {
        &self.descriptor.name
    }

    /// Sends `sig` to the child. For `SIGSTOP`, returns once every thread of the child is
    /// stopped (delivery is asynchronous: the child may run on briefly after `kill`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
        if sig == libc::SIGSTOP {
            let t0 = Instant::now();
            while !self.all_threads_stopped() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the child did not stop"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// True when every thread of the child is in the stopped state (`T` in its stat).
    fn all_threads_stopped(&self) -> bool {
        let dir = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(&dir) else {
            return false;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                // The state follows the command name in parentheses.
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
                    == Some('T')
            })
        })
    }
}

impl Drop for ChildPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The libtest name of the `child_peer` test generated next to the calling case, from the
/// case's `module_path!()` (`<test crate>::<suite module>`).
pub fn child_test_path(module_path: &str) -> String {
    let suite = module_path.split_once("::").map_or(module_path, |(_, m)| m);
    format!("{suite}::child_peer")
}

/// A peer process killed (SIGKILL) and one frozen (SIGSTOP) mid-batch: the batch finishes
/// within three timeouts, a new request finishes within that limit (and fails, for the killed
/// peer), and the initiator keeps working with another peer. Skipped (with a message) for
/// in-process-only transports.
pub fn dead_peer_fails_within_deadline(h: &dyn TransportHarness, module_path: &str) {
    if !h.cross_process() {
        eprintln!(
            "{}: in-process only; dead peers are covered by target_dropped_mid_transfer",
            h.name()
        );
        return;
    }
    for sig in [libc::SIGKILL, libc::SIGSTOP] {
        let md = store();
        let child = ChildPeer::spawn(&child_test_path(module_path), &unique("dp-target"));
        child.publish(&md);
        let init = engine(h, &unique("dp-init"), &md);
        let local = buffer(&init, CHILD_LEN, 2);
        let seg = init.open_segment_blocking(child.name()).unwrap();
        // A healthy round first: the peer works and connections are warm.
        init.submit_batch(&alternating(seg, local.base(), child.base(), 64, 1 << 20))
            .unwrap()
            .wait_blocking(None)
            .unwrap_or_else(|e| panic!("{}: healthy round: {e}", h.name()));
        let limit = 3 * h.timeout();
        let what = if sig == libc::SIGKILL {
            "killed"
        } else {
            "frozen"
        };
        let batch = if h.needs_peer_cpu() {
            // Freeze first, so the whole batch is surely in flight when the peer dies (or
            // stays frozen): every task must fail.
            child.signal(libc::SIGSTOP);
            let b = init
                .submit_batch(&alternating(seg, local.base(), child.base(), 64, 1 << 20))
                .unwrap();
            if sig == libc::SIGKILL {
                child.signal(libc::SIGKILL);
            }
            b
        } else {
            let b = init
                .submit_batch(&alternating(seg, local.base(), child.base(), 64, 1 << 20))
                .unwrap();
            child.signal(sig);
            b
        };
        assert_done_within(h.name(), &batch, limit, &format!("{what} peer"));
        if h.needs_peer_cpu() {
            assert_eq!(
                batch.failed(),
                64,
                "{}: requests to a {what} peer completed",
                h.name()
            );
        }
        let kinds: Vec<ErrorKind> = (0..64)
            .filter_map(|i| batch.error(i))
            .map(|e| e.kind())
            .collect();
        assert!(
            kinds
                .iter()
                .all(|k| matches!(k, ErrorKind::PeerUnreachable | ErrorKind::Timeout)),
            "{}: {what} peer: unexpected error kinds {kinds:?}",
            h.name()
        );
        // A new request finishes within the limit; to a killed peer (or a frozen one, when
        // moving bytes needs its CPU) it fails.
        let again = init
            .submit_batch(&alternating(seg, local.base(), child.base(), 1, 1 << 20))
            .unwrap();
        assert_done_within(
            h.name(),
            &again,
            limit,
            &format!("new request to a {what} peer"),
        );
        if sig == libc::SIGKILL || h.needs_peer_cpu() {
            assert_eq!(
                again.failed(),
                1,
                "{}: a write to a {what} peer succeeded",
                h.name()
            );
        }
        // The engine keeps working with another peer.
        let other = engine(h, &unique("dp-other"), &md);
        let obuf = buffer(&other, 1 << 20, 3);
        init.transfer_sync_read(other.local_name(), local.base(), obuf.base(), 1 << 20)
            .unwrap_or_else(|e| panic!("{}: another peer after signal {sig}: {e}", h.name()));
        assert_eq!(local.to_vec()[..1 << 20], pattern(1 << 20, 3)[..]);
    }
}

/// A peer that restarts under the same name (a new engine, new generation, new addresses)
/// is reached by the next request: first in-process, then as a new process.
pub fn restarted_peer_is_reached_again(h: &dyn TransportHarness, module_path: &str) {
    let md = store();
    let name = unique("rs-target");
    let init = engine(h, &unique("rs-init"), &md);
    let local = buffer(&init, 1 << 20, 4);

    let first = engine(h, &name, &md);
    let fbuf = buffer(&first, 1 << 20, 5);
    init.transfer_sync_write(&name, local.base(), fbuf.base(), 4096)
        .unwrap();
    drop(first);
    assert!(
        init.transfer_sync_write(&name, local.base(), fbuf.base(), 4096)
            .is_err(),
        "{}: a write to a dropped peer succeeded",
        h.name()
    );
    let second = engine(h, &name, &md);
    let sbuf = buffer(&second, 1 << 20, 6);
    init.transfer_sync_write(&name, local.base(), sbuf.base(), 4096)
        .unwrap_or_else(|e| panic!("{}: restarted in-process peer: {e}", h.name()));
    assert_eq!(sbuf.to_vec()[..4096], pattern(1 << 20, 4)[..4096]);
    drop(second);

    if !h.cross_process() {
        return;
    }
    let pname = unique("rs-proc");
    let first = ChildPeer::spawn(&child_test_path(module_path), &pname);
    first.publish(&md);
    init.transfer_sync_write(&pname, local.base(), first.base(), 4096)
        .unwrap();
    drop(first);
    assert!(
        init.transfer_sync_write(&pname, local.base(), 0x1000, 4096)
            .is_err()
    );
    let second = ChildPeer::spawn(&child_test_path(module_path), &pname);
    second.publish(&md);
    init.transfer_sync_write(&pname, local.base(), second.base(), 4096)
        .unwrap_or_else(|e| panic!("{}: restarted peer process: {e}", h.name()));
}

/// Deterministic xorshift64 for the random cases (no dependency on `rand`'s streams).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Generates one `#[test]` per conformance case for a harness, plus the ignored
/// `child_peer` helper test that cross-process cases re-execute.
///
/// ```ignore
/// mooncake_testkit::transport_suite!(tcp, || Some(TcpHarness));
/// ```
/// The closure returns `Option<impl TransportHarness>`; `None` skips every case. Attributes
/// after the closure are put on every case, e.g. an `ignore` for hosts without the hardware:
/// `transport_suite!(rdma, || Some(Rdma), #[cfg_attr(not(has_nics), ignore = "…")])`.
#[macro_export]
macro_rules! transport_suite {
    ($m:ident, $make:expr $(, #[$attr:meta])* $(,)?) => {
        mod $m {
            #[allow(unused_imports)]
            use super::*;
            fn harness() -> Option<impl $crate::transport::TransportHarness> {
                let make = $make;
                make()
            }
            #[test]
            $(#[$attr])*
            fn random_batches() {
                if let Some(h) = harness() {
                    $crate::transport::random_batches(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn refusals_keep_guard_bytes() {
                if let Some(h) = harness() {
                    $crate::transport::refusals_keep_guard_bytes(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn unregister_during_transfers() {
                if let Some(h) = harness() {
                    $crate::transport::unregister_during_transfers(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn initiator_dropped_mid_transfer() {
                if let Some(h) = harness() {
                    $crate::transport::initiator_dropped_mid_transfer(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn target_dropped_mid_transfer() {
                if let Some(h) = harness() {
                    $crate::transport::target_dropped_mid_transfer(&h)
                }
            }
            #[test]
            $(#[$attr])*
            fn dead_peer_fails_within_deadline() {
                if let Some(h) = harness() {
                    $crate::transport::dead_peer_fails_within_deadline(&h, module_path!())
                }
            }
            #[test]
            $(#[$attr])*
            fn restarted_peer_is_reached_again() {
                if let Some(h) = harness() {
                    $crate::transport::restarted_peer_is_reached_again(&h, module_path!())
                }
            }
            #[test]
            #[ignore = "helper process of the conformance suite, started by its cases"]
            fn child_peer() {
                if let Some(h) = harness() {
                    $crate::transport::child_peer(&h)
                }
            }
        }
    };
}
