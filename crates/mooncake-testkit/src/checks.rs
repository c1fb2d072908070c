//! Pieces the host-memory suite (`transport`) and the device-memory suite (`device`) share:
//! the range probes sent to a guarded region, the check of each request's outcome, the forged
//! descriptor that widens regions over their guards, and batch helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{
    Batch, BufferDesc, ErrorKind, MetadataKeys, MetadataStore, Opcode, SegmentHandle,
    TransferRequest, block_on,
};
use mooncake_engine::TransferEngine;

/// The probes every refusal check sends to a region of `len` bytes at `base` with at least
/// `len` guard bytes on each side, as (target offset, length, opcode), in this order:
/// 0 fine write at the start, 1 starts in the guard below, 2 runs into the guard above,
/// 3 one byte too long, 4 fine read at +8 KiB, 5 empty, 6 wraps around the address space.
pub(crate) fn range_probes(base: u64, len: u64) -> Vec<(u64, u64, Opcode)> {
    vec![
        (base, 4096, Opcode::Write),
        (base - 1, 4096, Opcode::Write),
        (base + len - 100, 4096, Opcode::Write),
        (base, len + 1, Opcode::Read),
        (base + 8192, 4096, Opcode::Read),
        (base, 0, Opcode::Write),
        (u64::MAX - 100, 4096, Opcode::Read),
    ]
}

/// The probe indexes of [`range_probes`] that the target must refuse.
pub(crate) const REFUSED_PROBES: [usize; 4] = [1, 2, 3, 6];

/// The probe index of [`range_probes`] that is empty (refused as an invalid argument).
pub(crate) const EMPTY_PROBE: usize = 5;

/// Turns (target offset, length, opcode) triples into requests to `seg`, each with its own
/// 8 KiB of local memory from `local`, so that reads and writes of one batch never touch the
/// same local bytes.
pub(crate) fn probe_requests(
    seg: SegmentHandle,
    local: u64,
    probes: &[(u64, u64, Opcode)],
) -> Vec<TransferRequest> {
    probes
        .iter()
        .enumerate()
        .map(|(i, &(at, length, opcode))| TransferRequest {
            opcode,
            source: local + i as u64 * 8192,
            target_id: seg,
            target_offset: at,
            length,
        })
        .collect()
}

/// Checks a finished batch of `n` requests: those in `refused` failed with `RemoteAccess`,
/// `empty` (if any) with `InvalidArgument`, every other one succeeded.
pub(crate) fn check_outcomes(
    name: &str,
    phase: &str,
    batch: &Batch,
    n: usize,
    refused: &[usize],
    empty: Option<usize>,
) {
    for i in 0..n {
        let err = batch.error(i);
        if refused.contains(&i) {
            let e = err.unwrap_or_else(|| panic!("{name} ({phase}): request {i} was not refused"));
            assert_eq!(
                e.kind(),
                ErrorKind::RemoteAccess,
                "{name} ({phase}): request {i}: {e}"
            );
        } else if Some(i) == empty {
            assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
        } else {
            assert!(err.is_none(), "{name} ({phase}): request {i}: {err:?}");
        }
    }
}

/// Publishes a forged descriptor of `target` (named `tname`) in which `widen` may change
/// each buffer (to reach over its guards, drop its read-only flag) and `extra` buffers are
/// added, then makes `init` re-read it for `seg`: every request then passes the initiator's
/// own checks, so only the target can refuse it.
pub(crate) fn forge_descriptor(
    md: &Arc<dyn MetadataStore>,
    target: &TransferEngine,
    tname: &str,
    init: &TransferEngine,
    seg: SegmentHandle,
    widen: impl Fn(&mut BufferDesc),
    extra: &[BufferDesc],
) {
    let mut forged = target.local_descriptor();
    forged.buffers.iter_mut().for_each(widen);
    forged.buffers.extend_from_slice(extra);
    let key = MetadataKeys::from_env().segment(tname);
    block_on(md.put(&key, forged.to_json())).unwrap();
    block_on(init.refresh_segment(seg)).unwrap();
}

/// Waits for `batch` (up to `limit` + 5 s) and asserts it finished within `limit`.
pub(crate) fn assert_done_within(name: &str, batch: &Batch, limit: Duration, what: &str) {
    let t0 = Instant::now();
    let _ = batch.wait_blocking(Some(t0 + limit + Duration::from_secs(5)));
    let took = t0.elapsed();
    assert!(
        batch.is_done(),
        "{name}: {what}: tasks still pending after {took:?}"
    );
    assert!(
        took <= limit,
        "{name}: {what}: the batch took {took:?} to finish (limit {limit:?})"
    );
}

/// `n` requests of `block` bytes, alternating write and read, from consecutive blocks at
/// `local` to consecutive blocks at `remote` of `seg`.
pub(crate) fn alternating(
    seg: SegmentHandle,
    local: u64,
    remote: u64,
    n: u64,
    block: u64,
) -> Vec<TransferRequest> {
    (0..n)
        .map(|i| TransferRequest {
            opcode: if i % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            },
            source: local + i * block,
            target_id: seg,
            target_offset: remote + i * block,
            length: block,
        })
        .collect()
}
