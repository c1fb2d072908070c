//! The data path: writing and reading replicas, through a same-host shared mapping (a
//! memcpy) or the transfer engine (one engine batch per round for the whole RPC batch).

use std::time::Instant;

use async_io::Timer;
use mooncake_core::{Batch, Opcode, Requester, SegmentHandle, TransferRequest, TransferStatus};

use super::Inner;
use super::conn::Io;
use crate::types::{ReplicaDesc, StoreError, StoreErrorCode, StoreResult};

/// One contiguous piece of an object and the local (registered) memory it comes from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Offset inside the object.
    pub(crate) obj_off: u64,
    /// Local address (inside memory registered with the client's engine).
    pub(crate) local: u64,
    /// Bytes.
    pub(crate) len: u64,
}

/// Writes every piece to every replica.
#[derive(Debug)]
pub(crate) struct WriteJob {
    pub(crate) replicas: Vec<ReplicaDesc>,
    pub(crate) pieces: Vec<Piece>,
    pub(crate) error: Option<StoreError>,
}

/// Reads every piece from the first replica that works.
#[derive(Debug)]
pub(crate) struct ReadJob {
    pub(crate) replicas: Vec<ReplicaDesc>,
    pub(crate) pieces: Vec<Piece>,
    /// The read lease ends here (computed from when the lookup was sent).
    pub(crate) deadline: Instant,
    pub(crate) next: usize,
    pub(crate) result: Option<StoreResult<()>>,
}

fn transfer_err(msg: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorCode::TransferFail, msg)
}

impl Inner {
    /// Waits until every task of `batch` finished. Past `transfer_deadline` it logs and keeps
    /// waiting: returning earlier would let a late read land in the caller's buffer after
    /// the call returned. The engine's transports bound the wait (they fail every task within
    /// the no-progress timeout plus its whole-request deadline).
    async fn wait_batch(&self, io: Io, batch: &Batch) {
        let deadline = self.cfg.transfer_deadline;
        match io {
            Io::Blocking => {
                let _ = batch.wait_blocking(Some(Instant::now() + deadline));
                if !batch.is_done() {
                    tracing::warn!(
                        ?deadline,
                        "a store transfer runs past its deadline; waiting for the engine to end it"
                    );
                    let _ = batch.wait_blocking(None);
                }
            }
            Io::Async => {
                let done = futures_lite::future::or(
                    async {
                        let _ = batch.wait().await;
                        true
                    },
                    async {
                        Timer::after(deadline).await;
                        false
                    },
                )
                .await;
                if !done {
                    tracing::warn!(
                        ?deadline,
                        "a store transfer runs past its deadline; waiting for the engine to end it"
                    );
                    let _ = batch.wait().await;
                }
            }
        }
    }

    async fn handle(&self, io: Io, segment: &str) -> StoreResult<SegmentHandle> {
        if let Some(h) = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(segment)
        {
            return Ok(*h);
        }
        let h = match io {
            Io::Blocking => self.engine.open_segment_blocking(segment),
            Io::Async => self.engine.open_segment(segment).await,
        }
        .map_err(|e| transfer_err(format!("cannot open segment {segment:?}: {e}")))?;
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(segment.to_string(), h);
        Ok(h)
    }

    /// Writes each job's pieces to all its replicas; a job with any failed transfer gets an
    /// error, and the segments that failed are appended to `failed` (once each).
    #[expect(
        clippy::needless_range_loop,
        reason = "jobs[j] is borrowed anew around each await"
    )]
    pub(crate) async fn write_objects(
        &self,
        io: Io,
        jobs: &mut [WriteJob],
        failed: &mut Vec<String>,
    ) {
        let mut reqs = Vec::new();
        let mut owners: Vec<(usize, usize)> = Vec::new();
        for j in 0..jobs.len() {
            for r in 0..jobs[j].replicas.len() {
                let rep = &jobs[j].replicas[r];
                if let Some(map) = self.local_map(&rep.segment) {
                    let mut res = Ok(());
                    for p in &jobs[j].pieces {
                        res = (|| {
                            let off = rep
                                .addr
                                .checked_sub(map.remote_base)
                                .and_then(|o| o.checked_add(p.obj_off))
                                .ok_or_else(|| transfer_err("replica outside its segment"))?;
                            let src = self
                                .engine
                                .registry()
                                .lease(p.local, p.len, Requester::Local)
                                .map_err(|e| {
                                    StoreError::new(StoreErrorCode::InvalidParams, e.to_string())
                                })?;
                            if !src.region().location().is_host() {
                                // Device memory (VRAM): copied by the device runtime.
                                return map
                                    .device_copy(off, src, true, self.cfg.transfer_deadline)
                                    .map_err(|e| transfer_err(e.to_string()));
                            }
                            map.mem
                                .copy_in(off, &src)
                                .map_err(|e| transfer_err(e.to_string()))
                        })();
                        if res.is_err() {
                            break;
                        }
                    }
                    if let Err(e) = res {
                        jobs[j].error.get_or_insert(e);
                    }
                    continue;
                }
                let seg = rep.segment.clone();
                let h = match self.handle(io, &seg).await {
                    Ok(h) => h,
                    Err(e) => {
                        jobs[j].error.get_or_insert(e);
                        push_once(failed, &seg);
                        continue;
                    }
                };
                let rep = &jobs[j].replicas[r];
                for p in &jobs[j].pieces {
                    reqs.push(TransferRequest {
                        opcode: Opcode::Write,
                        source: p.local,
                        target_id: h,
                        target_offset: rep.addr + p.obj_off,
                        length: p.len,
                    });
                    owners.push((j, r));
                }
            }
        }
        if reqs.is_empty() {
            return;
        }
        let batch = match self.engine.submit_batch(&reqs) {
            Ok(b) => b,
            Err(e) => {
                for &(j, _) in &owners {
                    jobs[j].error.get_or_insert(transfer_err(e.to_string()));
                }
                return;
            }
        };
        self.wait_batch(io, &batch).await;
        for (i, &(j, r)) in owners.iter().enumerate() {
            if batch.status(i) != TransferStatus::Completed {
                let why = batch
                    .error(i)
                    .map_or_else(|| "transfer did not finish".to_string(), |e| e.to_string());
                let code = match batch.error(i).map(|e| e.kind()) {
                    Some(mooncake_core::ErrorKind::NotRegistered) => StoreErrorCode::InvalidParams,
                    _ => StoreErrorCode::TransferFail,
                };
                if code == StoreErrorCode::TransferFail {
                    push_once(failed, &jobs[j].replicas[r].segment);
                }
                jobs[j]
                    .error
                    .get_or_insert(StoreError::new(code, format!("write: {why}")));
            }
        }
    }

    /// Reads each job from its replicas in order, failing over to the next one when a read
    /// fails; then refuses every read that finished after its lease (`LEASE_EXPIRED`).
    #[expect(
        clippy::needless_range_loop,
        reason = "jobs[j] is borrowed anew around each await"
    )]
    pub(crate) async fn read_objects(
        &self,
        io: Io,
        jobs: &mut [ReadJob],
        failed: &mut Vec<String>,
    ) {
        loop {
            let mut reqs = Vec::new();
            let mut owners: Vec<usize> = Vec::new();
            let mut pending = false;
            for j in 0..jobs.len() {
                if jobs[j].result.is_some() {
                    continue;
                }
                let Some(rep) = jobs[j].replicas.get(jobs[j].next).cloned() else {
                    jobs[j].result = Some(Err(transfer_err(format!(
                        "every replica failed ({} tried)",
                        jobs[j].replicas.len()
                    ))));
                    continue;
                };
                if let Some(map) = self.local_map(&rep.segment) {
                    let mut res = Ok(());
                    for p in &jobs[j].pieces {
                        res = (|| {
                            let off = rep
                                .addr
                                .checked_sub(map.remote_base)
                                .and_then(|o| o.checked_add(p.obj_off))
                                .ok_or_else(|| transfer_err("replica outside its segment"))?;
                            let dst = self
                                .engine
                                .registry()
                                .lease(p.local, p.len, Requester::Local)
                                .map_err(|e| {
                                    StoreError::new(StoreErrorCode::InvalidParams, e.to_string())
                                })?;
                            if !dst.region().location().is_host() {
                                return map
                                    .device_copy(off, dst, false, self.cfg.transfer_deadline)
                                    .map_err(|e| transfer_err(e.to_string()));
                            }
                            map.mem
                                .copy_out(off, &dst)
                                .map_err(|e| transfer_err(e.to_string()))
                        })();
                        if res.is_err() {
                            break;
                        }
                    }
                    match res {
                        Ok(()) => jobs[j].result = Some(Ok(())),
                        Err(e) if e.error_code() == StoreErrorCode::InvalidParams => {
                            jobs[j].result = Some(Err(e))
                        }
                        Err(_) => {
                            jobs[j].next += 1;
                            pending = true;
                        }
                    }
                    continue;
                }
                let h = match self.handle(io, &rep.segment).await {
                    Ok(h) => h,
                    Err(_) => {
                        push_once(failed, &rep.segment);
                        jobs[j].next += 1;
                        pending = true;
                        continue;
                    }
                };
                for p in &jobs[j].pieces {
                    reqs.push(TransferRequest {
                        opcode: Opcode::Read,
                        source: p.local,
                        target_id: h,
                        target_offset: rep.addr + p.obj_off,
                        length: p.len,
                    });
                    owners.push(j);
                }
            }
            if !reqs.is_empty() {
                pending = true;
                match self.engine.submit_batch(&reqs) {
                    Ok(batch) => {
                        self.wait_batch(io, &batch).await;
                        let mut bad = vec![None; jobs.len()];
                        for (i, &j) in owners.iter().enumerate() {
                            if batch.status(i) != TransferStatus::Completed {
                                bad[j] = Some(batch.error(i).map(|e| e.kind()));
                            }
                        }
                        let mut seen = vec![false; jobs.len()];
                        for &j in &owners {
                            if std::mem::replace(&mut seen[j], true) {
                                continue;
                            }
                            match bad[j] {
                                None => jobs[j].result = Some(Ok(())),
                                Some(Some(mooncake_core::ErrorKind::NotRegistered)) => {
                                    jobs[j].result = Some(Err(StoreError::new(
                                        StoreErrorCode::InvalidParams,
                                        "the destination is not inside registered memory",
                                    )))
                                }
                                Some(_) => {
                                    push_once(failed, &jobs[j].replicas[jobs[j].next].segment);
                                    jobs[j].next += 1;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        for &j in &owners {
                            jobs[j]
                                .result
                                .get_or_insert(Err(transfer_err(e.to_string())));
                        }
                    }
                }
            }
            if !pending || jobs.iter().all(|j| j.result.is_some()) {
                break;
            }
        }
        let now = Instant::now();
        for j in jobs.iter_mut() {
            if matches!(j.result, Some(Ok(()))) && now >= j.deadline {
                j.result = Some(Err(StoreError::new(
                    StoreErrorCode::LeaseExpired,
                    "the read finished after its lease ended; its bytes may have been reclaimed",
                )));
            }
        }
    }
}

fn push_once(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
    }
}
