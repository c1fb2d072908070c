//! Helpers of the attacker suites (issue 14): many slow connections against a server, a
//! legitimate client working meanwhile, and waiting for a condition.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Raises the soft descriptor limit to the hard one (1,000 slow connections need ~2,000
/// descriptors in this process) and says how many slow connections fit.
pub fn slow_connections_that_fit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if let Some(hard) = l.maximum {
        l.current = Some(hard.min(1 << 20));
        let _ = setrlimit(Resource::Nofile, l);
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20) as usize;
    // Two descriptors per connection, two such tests at once, and headroom for the rest.
    let n = ((soft.saturating_sub(512)) / 4).min(1000);
    if n < 1000 {
        eprintln!("only {n} slow connections fit under RLIMIT_NOFILE {soft}");
    }
    n
}

/// Connections that trickle `prefix` and then one byte of `drip` every 100 ms, or idle.
pub struct SlowClients {
    stop: Arc<AtomicBool>,
    /// How many trickling connections the server closed so far.
    pub closed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowClients {
    /// `n` connections, half trickling and half idle.
    pub fn start(addr: SocketAddr, n: usize, prefix: Vec<u8>, drip: u8) -> Self {
        Self::start_with(addr, n, prefix, drip, 2)
    }

    /// `n` connections, all trickling.
    pub fn all_trickling(addr: SocketAddr, n: usize, prefix: Vec<u8>, drip: u8) -> Self {
        Self::start_with(addr, n, prefix, drip, 1)
    }

    fn start_with(addr: SocketAddr, n: usize, prefix: Vec<u8>, drip: u8, every: usize) -> Self {
        let mut trickle = Vec::new();
        let mut idle = Vec::new();
        for i in 0..n {
            let s = TcpStream::connect(addr).unwrap();
            if i % every == 0 {
                s.set_nonblocking(true).unwrap();
                let _ = (&s).write(&prefix);
                trickle.push(s);
            } else {
                idle.push(s);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicUsize::new(0));
        let (st, cl) = (stop.clone(), closed.clone());
        let thread = std::thread::spawn(move || {
            let _idle = idle;
            let mut open = vec![true; trickle.len()];
            while !st.load(Ordering::SeqCst) {
                for (s, o) in trickle.iter().zip(open.iter_mut()) {
                    if *o && (&*s).write(&[drip]).is_err() {
                        *o = false;
                        cl.fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            closed,
            thread: Some(thread),
        }
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `op` in a loop on another thread until the returned guard is finished; reports the
/// slowest call and the number of calls.
pub struct Legit {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, usize)>,
}

impl Legit {
    /// Starts calling `op(i)` for i = 0, 1, … every 5 ms; a panic in `op` fails [`Legit::finish`].
    pub fn start(op: impl Fn(usize) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut worst, mut i) = (Duration::ZERO, 0);
            while !st.load(Ordering::SeqCst) {
                let t = Instant::now();
                op(i);
                worst = worst.max(t.elapsed());
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (worst, i)
        });
        Self { stop, thread }
    }

    /// Stops the loop: the slowest call and the number of calls.
    pub fn finish(self) -> (Duration, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("a legitimate operation failed")
    }
}

/// Waits until `f` holds, up to `limit`; returns how long it took.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}
