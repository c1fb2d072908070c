//! Completion of transfers: a [`Batch`] of task slots that transports complete from their own
//! threads, and futures or blocking waits that any executor (or none) can use.
//!
//! A transport receives one [`TaskCompleter`] per task. It must call
//! [`TaskCompleter::complete`] exactly once; dropping it unfinished fails the task, so a
//! transport bug can never leave a waiter hanging. Large tasks cut into slices use
//! [`TaskCompleter::into_slices`]: the task completes when its last slice does, with the
//! first error any slice reported.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use event_listener::{Event, EventListener, Listener};

use crate::error::{Error, ErrorKind, Result};

/// How long a blocking waiter yields before it parks.
const SPIN_BEFORE_PARK: std::time::Duration = std::time::Duration::from_micros(50);

/// Status of one task, with Mooncake's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransferStatus {
    /// Slot allocated, nothing submitted.
    Waiting = 0,
    /// Submitted, not finished.
    Pending = 1,
    /// The slot does not exist.
    Invalid = 2,
    /// Cancelled before it ran.
    Canceled = 3,
    /// The bytes are at the destination.
    Completed = 4,
    /// Failed because the peer made no progress before the deadline.
    Timeout = 5,
    /// Failed for another reason; see [`Batch::error`].
    Failed = 6,
}

impl TransferStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Waiting,
            1 => Self::Pending,
            3 => Self::Canceled,
            4 => Self::Completed,
            5 => Self::Timeout,
            6 => Self::Failed,
            _ => Self::Invalid,
        }
    }

    /// True once the task will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Timeout | Self::Failed | Self::Canceled
        )
    }
}

struct TaskSlot {
    status: AtomicU8,
    error: OnceLock<Error>,
}

struct BatchState {
    tasks: Box<[TaskSlot]>,
    /// Submitted tasks (high 32 bits) and pending ones (low 32 bits), changed together so a
    /// waiter never sees tasks submitted but not pending, and no reservation is rolled back.
    counts: AtomicU64,
    failed: AtomicUsize,
    done: Event,
}

const PENDING_MASK: u64 = 0xffff_ffff;

impl BatchState {
    fn submitted(&self) -> usize {
        (self.counts.load(Ordering::Acquire) >> 32) as usize
    }

    fn pending(&self) -> usize {
        (self.counts.load(Ordering::Acquire) & PENDING_MASK) as usize
    }
}

/// A batch of up to `capacity` transfer tasks. Cloning shares the same batch.
#[derive(Clone)]
pub struct Batch {
    state: Arc<BatchState>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("capacity", &self.capacity())
            .field("submitted", &self.len())
            .field("pending", &self.state.pending())
            .finish()
    }
}

impl Batch {
    /// A new batch with room for `capacity` tasks (at most `u32::MAX`).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(u32::MAX as usize);
        let tasks = (0..capacity)
            .map(|_| TaskSlot {
                status: AtomicU8::new(TransferStatus::Waiting as u8),
                error: OnceLock::new(),
            })
            .collect();
        Self {
            state: Arc::new(BatchState {
                tasks,
                counts: AtomicU64::new(0),
                failed: AtomicUsize::new(0),
                done: Event::new(),
            }),
        }
    }

    /// How many tasks the batch can hold.
    pub fn capacity(&self) -> usize {
        self.state.tasks.len()
    }

    /// How many tasks were submitted.
    pub fn len(&self) -> usize {
        self.state.submitted()
    }

    /// True when nothing was submitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reserves `n` task slots and returns one completer for each, in order.
    ///
    /// Fails with [`ErrorKind::InvalidArgument`] if the batch would exceed its capacity.
    pub fn add_tasks(&self, n: usize) -> Result<Vec<TaskCompleter>> {
        let s = &self.state;
        let mut cur = s.counts.load(Ordering::Acquire);
        let start = loop {
            let start = (cur >> 32) as usize;
            let end = start
                .checked_add(n)
                .filter(|&e| e <= s.tasks.len())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "batch capacity {} exceeded: {start} submitted, {n} more requested",
                        s.tasks.len()
                    ))
                })?;
            // Both counts move in one step: submitted to `end`, pending up by `n`.
            let next = ((end as u64) << 32) | ((cur & PENDING_MASK) + n as u64);
            match s
                .counts
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break start,
                Err(now) => cur = now,
            }
        };
        Ok((start..start + n)
            .map(|i| {
                s.tasks[i]
                    .status
                    .store(TransferStatus::Pending as u8, Ordering::Release);
                TaskCompleter {
                    state: Some(self.state.clone()),
                    index: i,
                }
            })
            .collect())
    }

    /// Status of task `index`.
    pub fn status(&self, index: usize) -> TransferStatus {
        self.state
            .tasks
            .get(index)
            .map_or(TransferStatus::Invalid, |t| {
                TransferStatus::from_u8(t.status.load(Ordering::Acquire))
            })
    }

    /// The error of a failed task.
    pub fn error(&self, index: usize) -> Option<Error> {
        self.state
            .tasks
            .get(index)
            .and_then(|t| t.error.get().cloned())
    }

    /// True when every submitted task has finished.
    pub fn is_done(&self) -> bool {
        self.state.pending() == 0
    }

    /// Number of tasks that failed so far.
    pub fn failed(&self) -> usize {
        self.state.failed.load(Ordering::Acquire)
    }

    /// The overall status: `Pending` while any task runs, `Failed` (or `Timeout`) if any task
    /// failed, `Completed` when all completed, `Waiting` when nothing was submitted.
    pub fn overall_status(&self) -> TransferStatus {
        if self.is_empty() {
            return TransferStatus::Waiting;
        }
        if !self.is_done() {
            return TransferStatus::Pending;
        }
        (0..self.len())
            .map(|i| self.status(i))
            .find(|s| *s != TransferStatus::Completed)
            .unwrap_or(TransferStatus::Completed)
    }

    /// The batch result once done: `Ok` if every task completed, else the first error.
    fn result(&self) -> Result<()> {
        if self.state.failed.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        Err((0..self.len())
            .find_map(|i| self.error(i))
            .unwrap_or_else(|| Error::new(ErrorKind::Io, "a task failed without an error")))
    }

    /// A future that resolves when every task submitted so far has finished.
    ///
    /// Works under any executor: completions come from engine threads through a waker.
    /// Dropping it cancels nothing.
    pub fn wait(&self) -> BatchWait {
        BatchWait {
            batch: self.clone(),
            listener: None,
        }
    }

    /// Blocks the calling thread until done, or until `deadline`.
    ///
    /// Returns [`ErrorKind::Timeout`] if the deadline passes first; the tasks keep running.
    pub fn wait_blocking(&self, deadline: Option<Instant>) -> Result<()> {
        // Small transfers finish within tens of microseconds: yield-spin that long before
        // parking, which saves a futex wake-up on the completion path.
        let spin_until = Instant::now() + SPIN_BEFORE_PARK;
        while !self.is_done() && Instant::now() < spin_until {
            std::thread::yield_now();
        }
        loop {
            if self.is_done() {
                return self.result();
            }
            let listener = self.state.done.listen();
            if self.is_done() {
                return self.result();
            }
            match deadline {
                None => listener.wait(),
                Some(d) => {
                    if listener.wait_deadline(d).is_none() && !self.is_done() {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            "batch did not finish before the deadline",
                        ));
                    }
                }
            }
        }
    }
}

/// The future returned by [`Batch::wait`].
#[must_use = "futures do nothing unless polled"]
pub struct BatchWait {
    batch: Batch,
    listener: Option<EventListener>,
}

impl Future for BatchWait {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            if self.batch.is_done() {
                return Poll::Ready(self.batch.result());
            }
            match self.listener.as_mut() {
                None => self.listener = Some(self.batch.state.done.listen()),
                Some(l) => {
                    if Pin::new(l).poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.listener = None;
                }
            }
        }
    }
}

/// Completes one task. Exactly one call to [`complete`](Self::complete); dropping it first
/// fails the task.
pub struct TaskCompleter {
    state: Option<Arc<BatchState>>,
    index: usize,
}

impl std::fmt::Debug for TaskCompleter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskCompleter({})", self.index)
    }
}

impl TaskCompleter {
    /// The task's index in its batch.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Finishes the task with `result`.
    pub fn complete(mut self, result: Result<()>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<()>) {
        let Some(state) = self.state.take() else {
            return;
        };
        let slot = &state.tasks[self.index];
        let status = match result {
            Ok(()) => TransferStatus::Completed,
            Err(e) => {
                let st = if e.kind() == ErrorKind::Timeout {
                    TransferStatus::Timeout
                } else {
                    TransferStatus::Failed
                };
                let _ = slot.error.set(e);
                state.failed.fetch_add(1, Ordering::AcqRel);
                st
            }
        };
        slot.status.store(status as u8, Ordering::Release);
        // Pending is > 0 here (this task is counted), so the low half never borrows.
        if state.counts.fetch_sub(1, Ordering::AcqRel) & PENDING_MASK == 1 {
            state.done.notify(usize::MAX);
        }
    }

    /// Splits the task into `n` slices (n ≥ 1); the task completes when all have.
    pub fn into_slices(self, n: usize) -> Vec<SliceCompleter> {
        let n = n.max(1);
        let group = Arc::new(SliceGroup {
            remaining: AtomicUsize::new(n),
            error: Mutex::new(None),
            task: Mutex::new(Some(self)),
        });
        (0..n)
            .map(|_| SliceCompleter {
                group: Some(group.clone()),
            })
            .collect()
    }
}

impl Drop for TaskCompleter {
    fn drop(&mut self) {
        if self.state.is_some() {
            self.finish(Err(Error::new(
                ErrorKind::Closed,
                "the transport dropped the task unfinished",
            )));
        }
    }
}

struct SliceGroup {
    remaining: AtomicUsize,
    error: Mutex<Option<Error>>,
    task: Mutex<Option<TaskCompleter>>,
}

/// Completes one slice of a task; see [`TaskCompleter::into_slices`].
pub struct SliceCompleter {
    group: Option<Arc<SliceGroup>>,
}

impl std::fmt::Debug for SliceCompleter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SliceCompleter")
    }
}

impl SliceCompleter {
    /// Finishes this slice.
    pub fn complete(mut self, result: Result<()>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<()>) {
        let Some(group) = self.group.take() else {
            return;
        };
        if let Err(e) = result {
            let mut slot = group.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
        if group.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let err = group.error.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(task) = group.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
                task.complete(err.map_or(Ok(()), Err));
            }
        }
    }
}

impl Drop for SliceCompleter {
    fn drop(&mut self) {
        if self.group.is_some() {
            self.finish(Err(Error::new(
                ErrorKind::Closed,
                "the transport dropped a slice unfinished",
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn completes_from_another_thread_under_every_executor() {
        for runner in 0..4 {
            let batch = Batch::new(4);
            let tasks = batch.add_tasks(3).unwrap();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                for t in tasks {
                    t.complete(Ok(()));
                }
            });
            let r = match runner {
                0 => smol::block_on(batch.wait()),
                1 => tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(batch.wait()),
                2 => futures_lite::future::block_on(batch.wait()),
                _ => batch.wait_blocking(None),
            };
            r.unwrap();
            t.join().unwrap();
            assert_eq!(batch.overall_status(), TransferStatus::Completed);
        }
    }

    #[test]
    fn capacity_is_enforced_and_drop_fails() {
        let batch = Batch::new(2);
        assert!(batch.add_tasks(3).is_err());
        let mut t = batch.add_tasks(2).unwrap();
        assert!(batch.add_tasks(1).is_err());
        drop(t.pop());
        t.pop().unwrap().complete(Ok(()));
        assert_eq!(batch.status(0), TransferStatus::Completed);
        assert_eq!(batch.status(1), TransferStatus::Failed);
        assert_eq!(batch.error(1).unwrap().kind(), ErrorKind::Closed);
        assert!(batch.wait_blocking(None).is_err());
        assert_eq!(batch.status(7), TransferStatus::Invalid);
    }

    #[test]
    fn slices_complete_the_task_once_with_first_error() {
        let batch = Batch::new(1);
        let task = batch.add_tasks(1).unwrap().pop().unwrap();
        let mut slices = task.into_slices(3);
        slices.pop().unwrap().complete(Ok(()));
        assert_eq!(batch.status(0), TransferStatus::Pending);
        slices
            .pop()
            .unwrap()
            .complete(Err(Error::new(ErrorKind::Timeout, "slow")));
        slices
            .pop()
            .unwrap()
            .complete(Err(Error::new(ErrorKind::Io, "second")));
        assert_eq!(batch.status(0), TransferStatus::Timeout);
        assert_eq!(batch.error(0).unwrap().message(), "slow");
    }

    /// Reservations that race (one succeeds, another is refused for capacity) and tasks that
    /// complete meanwhile never leave a waiter asleep with every task done. The counts move
    /// in one atomic step, so there is no rollback that could swallow the last wake-up.
    #[test]
    fn racing_reservations_never_lose_the_last_wake_up() {
        for _ in 0..2_000 {
            let batch = Batch::new(2);
            let first = batch.add_tasks(1).unwrap().pop().unwrap();
            let (b1, b2) = (batch.clone(), batch.clone());
            let grab = std::thread::spawn(move || b1.add_tasks(1).ok());
            let refuse = std::thread::spawn(move || b2.add_tasks(2).is_err());
            let waiter = {
                let b = batch.clone();
                std::thread::spawn(move || {
                    b.wait_blocking(Some(Instant::now() + Duration::from_secs(10)))
                })
            };
            first.complete(Ok(()));
            assert!(
                refuse.join().unwrap(),
                "two more tasks never fit a batch of two"
            );
            if let Some(t) = grab.join().unwrap() {
                t.into_iter().for_each(|t| t.complete(Ok(())));
            }
            waiter
                .join()
                .unwrap()
                .expect("the waiter saw every task finish");
            assert!(batch.is_done());
        }
    }

    #[test]
    fn blocking_wait_honours_deadline() {
        let batch = Batch::new(1);
        let _t = batch.add_tasks(1).unwrap();
        let e = batch
            .wait_blocking(Some(Instant::now() + Duration::from_millis(10)))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
    }
}
