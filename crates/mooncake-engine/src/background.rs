//! One process-wide thread, `mooncake-engine-bg`, that runs every engine's background work:
//! metadata watches and descriptor refreshes. Its cost does not grow with the number of
//! engines or peers in the process.
//!
//! It is a small executor: tasks are boxed futures, woken through `std::task::Wake`, and
//! [`sleep`] registers a deadline the thread parks until. Tasks must not block.

use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Exec {
    state: Mutex<State>,
    thread: OnceLock<Thread>,
}

#[derive(Default)]
struct State {
    tasks: Vec<Option<Task>>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    timers: BinaryHeap<Timer>,
}

struct Timer {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest first in the max-heap.
        o.at.cmp(&self.at)
    }
}

struct TaskWaker {
    id: usize,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let e = exec();
        e.lock().ready.push_back(self.id);
        if let Some(t) = e.thread.get() {
            t.unpark();
        }
    }
}

impl Exec {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn exec() -> &'static Exec {
    static EXEC: OnceLock<Exec> = OnceLock::new();
    static STARTED: OnceLock<()> = OnceLock::new();
    let e = EXEC.get_or_init(|| Exec {
        state: Mutex::new(State::default()),
        thread: OnceLock::new(),
    });
    STARTED.get_or_init(|| {
        let t = std::thread::Builder::new()
            .name("mooncake-engine-bg".into())
            .spawn(run)
            .expect("spawn the engine background thread");
        let _ = e.thread.set(t.thread().clone());
    });
    e
}

/// Runs `fut` on the background thread.
pub(crate) fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    let e = exec();
    let mut st = e.lock();
    let id = match st.free.pop() {
        Some(i) => {
            st.tasks[i] = Some(Box::pin(fut));
            i
        }
        None => {
            st.tasks.push(Some(Box::pin(fut)));
            st.tasks.len() - 1
        }
    };
    st.ready.push_back(id);
    drop(st);
    if let Some(t) = e.thread.get() {
        t.unpark();
    }
}

/// A future that resolves `d` from now (only on the background thread's executor).
pub(crate) fn sleep(d: Duration) -> impl Future<Output = ()> {
    let at = Instant::now() + d;
    let mut armed = false;
    std::future::poll_fn(move |cx| {
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        if !armed {
            armed = true;
            exec().lock().timers.push(Timer {
                at,
                waker: cx.waker().clone(),
            });
        }
        Poll::Pending
    })
}

fn run() {
    let e = exec();
    loop {
        let due: Vec<Waker> = {
            let mut st = e.lock();
            let now = Instant::now();
            let mut due = Vec::new();
            while st.timers.peek().is_some_and(|t| t.at <= now) {
                due.push(st.timers.pop().expect("peeked").waker);
            }
            due
        };
        // Woken outside the lock: a task's waker takes it.
        for w in due {
            w.wake();
        }
        let (next, park_until) = {
            let mut st = e.lock();
            match st.ready.pop_front() {
                Some(id) => (
                    st.tasks.get_mut(id).and_then(Option::take).map(|t| (id, t)),
                    None,
                ),
                None => (None, Some(st.timers.peek().map(|t| t.at))),
            }
        };
        if let Some((id, mut task)) = next {
            let waker = Waker::from(Arc::new(TaskWaker { id }));
            let mut cx = Context::from_waker(&waker);
            let done = task.as_mut().poll(&mut cx).is_ready();
            let mut st = e.lock();
            if done {
                st.free.push(id);
            } else {
                st.tasks[id] = Some(task);
            }
            continue;
        }
        match park_until {
            Some(Some(at)) => {
                std::thread::park_timeout(at.saturating_duration_since(Instant::now()))
            }
            Some(None) => std::thread::park(),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_tasks_and_sleeps() {
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let n = n.clone();
            spawn(async move {
                sleep(Duration::from_millis(5)).await;
                n.fetch_add(1, Ordering::SeqCst);
            });
        }
        let t0 = Instant::now();
        while n.load(Ordering::SeqCst) < 10 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "tasks did not finish"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
