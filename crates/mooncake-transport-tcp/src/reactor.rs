//! The I/O threads: a fixed, process-wide set of epoll loops that drive every connection of
//! every TCP transport in the process, whatever the number of peers.
//!
//! Each loop owns its connections (a slab of [`Entry`]s); other threads reach a loop only by
//! posting a command (a closure run on the loop) and waking it through its eventfd. A loop
//! waits in `epoll_wait`, handles ready sockets (edge-triggered, with a per-turn budget so
//! one busy connection cannot starve the others), runs posted commands, and ticks its
//! connections' deadlines every [`TICK`].
//!
//! The number of loops is `MC_TCP_IO_THREADS` if set, else the number of CPUs, at most 16.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::client::ClientIo;
use crate::server::{ListenerIo, ServerConn};
use crate::sys::{Epoll, Event, EventFd};

/// How often a loop checks its connections' deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// Token of the eventfd in every loop's epoll set.
const WAKE_TOKEN: u64 = u64::MAX;

/// A connection's place in its loop: slab index and a generation that changes on reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Token {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl Token {
    fn pack(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    fn unpack(v: u64) -> Self {
        Self {
            index: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

/// What a handler asks its loop to do after handling an event.
pub(crate) enum Next {
    /// Nothing more now (the socket would block, or the work is done).
    Idle,
    /// Hit the per-turn budget with work left: call again on the next turn.
    More,
    /// Close and drop the connection.
    Close,
    /// Move the connection to another loop (it continues there on its next event).
    Move(Arc<LoopHandle>),
}

/// Everything a loop can drive.
pub(crate) enum Entry {
    /// An initiator connection.
    Client(ClientIo),
    /// A target connection.
    Server(Box<ServerConn>),
    /// A listening socket.
    Listener(ListenerIo),
}

impl Entry {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Self::Client(c) => c.fd(),
            Self::Server(s) => s.fd(),
            Self::Listener(l) => l.fd(),
        }
    }

    fn on_event(&mut self, cx: &mut Cx<'_>, readable: bool, writable: bool) -> Next {
        match self {
            Self::Client(c) => c.on_event(cx, readable, writable),
            Self::Server(s) => s.on_event(cx, readable, writable),
            Self::Listener(l) => l.on_event(cx),
        }
    }

    fn on_tick(&mut self, cx: &mut Cx<'_>, now: Instant) -> Next {
        match self {
            Self::Client(c) => c.on_tick(now),
            Self::Server(s) => s.on_tick(cx, now),
            // Retries an accept that failed for lack of descriptors (no edge would).
            Self::Listener(_) => Next::More,
        }
    }

    fn on_close(self, cx: &mut Cx<'_>) {
        match self {
            Self::Client(c) => c.on_close(),
            Self::Server(s) => s.on_close(cx),
            Self::Listener(_) => {}
        }
    }
}

type Cmd = Box<dyn FnOnce(&mut Cx<'_>) + Send>;

/// The shared half of a loop: how other threads reach it.
pub(crate) struct LoopHandle {
    pub(crate) index: usize,
    epoll: Epoll,
    wake: EventFd,
    cmds: Mutex<Vec<Cmd>>,
    woken: AtomicBool,
}

impl LoopHandle {
    /// Runs `cmd` on the loop thread (soon; in posting order).
    pub(crate) fn post(&self, cmd: impl FnOnce(&mut Cx<'_>) + Send + 'static) {
        self.cmds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(cmd));
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.wake.notify();
        }
    }

    /// Runs `cmd` on the loop thread and waits until it has run (only posts it when called
    /// from a loop thread, which must never block on another loop).
    pub(crate) fn post_and_wait(&self, cmd: impl FnOnce(&mut Cx<'_>) + Send + 'static) {
        if ON_LOOP.with(|c| c.get()) {
            self.post(cmd);
            return;
        }
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = done.clone();
        self.post(move |cx| {
            cmd(cx);
            *d.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            d.1.notify_all();
        });
        let mut g = done.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            g = done.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// A loop's view passed to handlers and commands: the slab, the epoll set, the clock.
pub(crate) struct Cx<'a> {
    pub(crate) handle: &'a Arc<LoopHandle>,
    slab: &'a mut Vec<Slot>,
    free: &'a mut Vec<u32>,
    ready: &'a mut VecDeque<Token>,
    closing: &'a mut Vec<Token>,
    /// The token of the entry being called (handlers learn their own token from it).
    pub(crate) current: Token,
    /// The time this turn started.
    pub(crate) now: Instant,
}

impl Cx<'_> {
    /// Adds `entry` to this loop and its epoll set; returns its token.
    pub(crate) fn add(&mut self, entry: Entry, write_interest: bool) -> std::io::Result<Token> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(Slot {
                    generation: 0,
                    entry: None,
                });
                (self.slab.len() - 1) as u32
            }
        };
        let slot = &mut self.slab[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let token = Token {
            index,
            generation: slot.generation,
        };
        if let Err(e) = self
            .handle
            .epoll
            .add(entry.fd(), token.pack(), write_interest)
        {
            self.free.push(index);
            return Err(e);
        }
        slot.entry = Some(entry);
        // Edge-triggered: data may already be waiting; look once.
        self.ready.push_back(token);
        Ok(token)
    }

    /// The entry behind `token`, if it is still there.
    pub(crate) fn get(&mut self, token: Token) -> Option<&mut Entry> {
        self.slab
            .get_mut(token.index as usize)
            .filter(|s| s.generation == token.generation)
            .and_then(|s| s.entry.as_mut())
    }

    /// Every live entry with its token (for commands that scan the loop).
    pub(crate) fn entries(&mut self) -> impl Iterator<Item = (Token, &mut Entry)> {
        self.slab.iter_mut().enumerate().filter_map(|(i, s)| {
            let generation = s.generation;
            s.entry.as_mut().map(|e| {
                (
                    Token {
                        index: i as u32,
                        generation,
                    },
                    e,
                )
            })
        })
    }

    /// Closes the entry at the end of this turn.
    pub(crate) fn close(&mut self, token: Token) {
        self.closing.push(token);
    }

    /// Marks the entry ready to be called again this turn or the next.
    pub(crate) fn wake(&mut self, token: Token) {
        self.ready.push_back(token);
    }

    /// Closes the entry now (not at the end of the turn): its leases are dropped when this
    /// returns. Does nothing if the entry is gone or is the one being called.
    pub(crate) fn close_now(&mut self, token: Token) {
        if let Some(entry) = self.take(token) {
            let was = self.current;
            self.current = token;
            entry.on_close(self);
            self.current = was;
        }
    }

    /// Removes the entry from the loop without closing it (it moves to another loop).
    pub(crate) fn take(&mut self, token: Token) -> Option<Entry> {
        let slot = self
            .slab
            .get_mut(token.index as usize)
            .filter(|s| s.generation == token.generation)?;
        let entry = slot.entry.take()?;
        let _ = self.handle.epoll.delete(entry.fd());
        self.free.push(token.index);
        Some(entry)
    }
}

/// The process-wide set of loops.
pub(crate) struct Reactor {
    loops: Vec<Arc<LoopHandle>>,
    /// The loop the next connection (initiator or target side) goes to.
    next: AtomicUsize,
}

impl Reactor {
    /// The reactor, started on first use.
    pub(crate) fn global() -> std::io::Result<&'static Reactor> {
        static R: OnceLock<Result<Reactor, String>> = OnceLock::new();
        R.get_or_init(|| Reactor::start(thread_count()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))
    }

    fn start(n: usize) -> std::io::Result<Self> {
        let mut loops = Vec::with_capacity(n);
        for index in 0..n {
            let handle = Arc::new(LoopHandle {
                index,
                epoll: Epoll::new()?,
                wake: EventFd::new()?,
                cmds: Mutex::new(Vec::new()),
                woken: AtomicBool::new(false),
            });
            handle.epoll.add(handle.wake.raw(), WAKE_TOKEN, false)?;
            let h = handle.clone();
            std::thread::Builder::new()
                .name(format!("mooncake-tcp-io-{index}"))
                .spawn(move || run(h))?;
            loops.push(handle);
        }
        Ok(Self {
            loops,
            next: AtomicUsize::new(0),
        })
    }

    /// Loop `i % len`.
    pub(crate) fn at(&self, i: usize) -> &Arc<LoopHandle> {
        &self.loops[i % self.loops.len()]
    }

    /// The loop for a new connection: the loops in turn, shared by initiator and target
    /// connections, so that both ends of connections within one process land on different
    /// loops too.
    pub(crate) fn next(&self) -> &Arc<LoopHandle> {
        self.at(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Every loop.
    pub(crate) fn all(&self) -> &[Arc<LoopHandle>] {
        &self.loops
    }
}

fn thread_count() -> usize {
    std::env::var("MC_TCP_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| (1..=64).contains(&n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(16)
        })
}

thread_local! {
    static ON_LOOP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn run(handle: Arc<LoopHandle>) {
    ON_LOOP.with(|c| c.set(true));
    let mut slab: Vec<Slot> = Vec::new();
    let mut free: Vec<u32> = Vec::new();
    let mut ready: VecDeque<Token> = VecDeque::new();
    let mut closing: Vec<Token> = Vec::new();
    let mut events: Vec<Event> = Vec::with_capacity(256);
    let mut next_tick = Instant::now() + TICK;
    loop {
        let now = Instant::now();
        let timeout = if ready.is_empty() {
            Some(next_tick.saturating_duration_since(now))
        } else {
            Some(Duration::ZERO)
        };
        events.clear();
        if let Err(e) = handle.epoll.wait(&mut events, timeout) {
            warn!("tcp io loop {}: epoll_wait failed: {e}", handle.index);
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut cx = Cx {
            handle: &handle,
            slab: &mut slab,
            free: &mut free,
            ready: &mut ready,
            closing: &mut closing,
            current: Token {
                index: u32::MAX,
                generation: 0,
            },
            now: Instant::now(),
        };
        // Socket events first, then whatever is still ready from the last turn.
        let mut turn: Vec<(Token, bool, bool)> = Vec::with_capacity(events.len() + 8);
        for ev in &events {
            if ev.token == WAKE_TOKEN {
                handle.wake.drain();
                handle.woken.store(false, Ordering::Release);
                let cmds =
                    std::mem::take(&mut *handle.cmds.lock().unwrap_or_else(|p| p.into_inner()));
                for cmd in cmds {
                    cmd(&mut cx);
                }
            } else {
                turn.push((Token::unpack(ev.token), ev.readable, ev.writable));
            }
        }
        while let Some(t) = cx.ready.pop_front() {
            turn.push((t, true, true));
        }
        for (token, readable, writable) in turn {
            let Some(mut entry) = cx
                .slab
                .get_mut(token.index as usize)
                .filter(|s| s.generation == token.generation)
                .and_then(|s| s.entry.take())
            else {
                continue;
            };
            cx.current = token;
            let next = entry.on_event(&mut cx, readable, writable);
            // The handler may have been closed by a command it ran; put it back first.
            let slot = &mut cx.slab[token.index as usize];
            slot.entry = Some(entry);
            match next {
                Next::Idle => {}
                Next::More => cx.ready.push_back(token),
                Next::Close => cx.closing.push(token),
                Next::Move(to) => {
                    if let Some(entry) = cx.take(token) {
                        to.post(move |cx| {
                            if let Err(e) = cx.add(entry, true) {
                                warn!(
                                    "tcp io loop {}: cannot adopt a connection: {e}",
                                    cx.handle.index
                                );
                            }
                        });
                    }
                }
            }
        }
        if cx.now >= next_tick {
            next_tick = cx.now + TICK;
            let now = cx.now;
            let tokens: Vec<Token> = cx.entries().map(|(t, _)| t).collect();
            for t in tokens {
                let Some(mut entry) = cx
                    .slab
                    .get_mut(t.index as usize)
                    .and_then(|s| s.entry.take())
                else {
                    continue;
                };
                cx.current = t;
                let next = entry.on_tick(&mut cx, now);
                cx.slab[t.index as usize].entry = Some(entry);
                match next {
                    Next::Idle | Next::Move(_) => {}
                    Next::More => cx.ready.push_back(t),
                    Next::Close => cx.closing.push(t),
                }
            }
        }
        while let Some(t) = cx.closing.pop() {
            let Some(slot) = cx
                .slab
                .get_mut(t.index as usize)
                .filter(|s| s.generation == t.generation)
            else {
                continue;
            };
            if let Some(entry) = slot.entry.take() {
                let _ = handle.epoll.delete(entry.fd());
                cx.free.push(t.index);
                cx.current = t;
                entry.on_close(&mut cx);
            }
        }
    }
}
