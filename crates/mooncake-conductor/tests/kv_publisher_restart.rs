//! A vLLM KV-event publisher restarted on the same endpoints, over real ZMQ sockets (the
//! crate's pure-Rust `zeromq`): the in-test publisher speaks vLLM's wire format (PUB of
//! `[topic, seq as 8 bytes big-endian, msgpack KVEventBatch]`, a ROUTER replay socket answering
//! `[identity, "", start]` with `[identity, "", seq, payload]…` and `seq = −1`). The Conductor's
//! subscriber must reconnect, tell a publisher that started over from one that resumed its
//! numbering, and recover by replay, so that its index equals the publisher's cache.
//!
//! Waits are polls with generous deadlines; nothing relies on a fixed sleep.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mooncake_conductor::events::{HashEncoding, OutEvent, encode_batch};
use mooncake_conductor::hash::digest_to_u64;
use mooncake_conductor::state::{Role, StateConfig};
use mooncake_conductor::zmq::publisher;
use mooncake_conductor::{Registration, RunningService, Service, ServiceConfig};
use tokio::sync::{mpsc, oneshot};
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend};

/// What a publisher keeps across a restart when it resumes: its numbering, its replay buffer
/// and its engine's cache.
#[derive(Default)]
struct History {
    seq: u64,
    buffer: VecDeque<(u64, Bytes)>,
    /// Block hashes the engine holds (as the Conductor names them).
    held: HashSet<u64>,
}

enum Cmd {
    Publish(Vec<OutEvent>, oneshot::Sender<()>),
    Stop(oneshot::Sender<History>),
}

/// A publisher task bound on `kv` and `replay`.
struct Publisher {
    tx: mpsc::UnboundedSender<Cmd>,
    kv: String,
    replay: String,
}

/// Binds, retrying while the port of a just-closed socket is not free yet.
async fn bind_retry<S: Socket>(mk: impl Fn() -> S, ep: &str) -> (S, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = mk();
        match s.bind(ep).await {
            Ok(bound) => return (s, bound.to_string()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {ep}: {e}"),
        }
    }
}

impl Publisher {
    async fn start(kv: &str, replay: &str, mut h: History) -> Self {
        let (mut pubs, kv) = bind_retry(PubSocket::new, kv).await;
        let (mut router, replay) = bind_retry(RouterSocket::new, replay).await;
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Publish(events, done)) => {
                            for e in &events {
                                match e {
                                    OutEvent::Stored { hashes, .. } => {
                                        h.held.extend(hashes.iter().map(|d| digest_to_u64(d)));
                                    }
                                    OutEvent::Removed { hashes } => {
                                        for d in hashes {
                                            h.held.remove(&digest_to_u64(d));
                                        }
                                    }
                                    OutEvent::Cleared => h.held.clear(),
                                }
                            }
                            let payload = Bytes::from(encode_batch(0.0, &events, HashEncoding::Int, 0));
                            let _ = pubs.send(publisher::event(h.seq, payload.clone())).await;
                            h.buffer.push_back((h.seq, payload));
                            h.seq += 1;
                            let _ = done.send(());
                        }
                        Some(Cmd::Stop(back)) => {
                            let _ = pubs.close().await;
                            let _ = router.close().await;
                            let _ = back.send(h);
                            return;
                        }
                        None => return,
                    },
                    m = router.recv() => {
                        let Ok(m) = m else { continue };
                        let Some(answer) = publisher::replay(m, &h.buffer) else {
                            continue;
                        };
                        for msg in answer {
                            let _ = router.send(msg).await;
                        }
                    }
                }
            }
        });
        Self { tx, kv, replay }
    }

    async fn publish(&self, events: Vec<OutEvent>) {
        let (done, wait) = oneshot::channel();
        assert!(self.tx.send(Cmd::Publish(events, done)).is_ok(), "running");
        wait.await.expect("published");
    }

    /// Closes both sockets; returns the history.
    async fn stop(self) -> History {
        let (back, wait) = oneshot::channel();
        assert!(self.tx.send(Cmd::Stop(back)).is_ok(), "running");
        wait.await.expect("stopped")
    }
}

fn digest(n: u64) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[24..].copy_from_slice(&n.to_be_bytes());
    d[0] = 0xab;
    d
}

fn stored(range: std::ops::Range<u64>) -> OutEvent {
    OutEvent::Stored {
        hashes: range.map(digest).collect(),
        parent: None,
        token_ids: vec![],
        block_size: 16,
    }
}

fn removed(range: std::ops::Range<u64>) -> OutEvent {
    OutEvent::Removed {
        hashes: range.map(digest).collect(),
    }
}

/// Whether the Conductor's index holds exactly `truth` on `name` among the blocks `universe`.
fn index_equals(svc: &Service, name: &str, truth: &HashSet<u64>, universe: u64) -> bool {
    svc.with_state(|s| {
        let slot = s.instance(name).unwrap().prefill_slot.unwrap();
        let bit = 1u128 << slot;
        let ix = s.conductor().index();
        (0..universe).all(|n| {
            let h = digest_to_u64(&digest(n));
            (ix.holders(h) & bit != 0) == truth.contains(&h)
        }) && ix.count_instance(slot) == truth.len()
    })
}

async fn conductor(p: &Publisher) -> RunningService {
    let mut state = StateConfig::default();
    // Only events count: no expected blocks from decisions.
    state.conductor.expected_ttl_s = None;
    let cfg = ServiceConfig::default()
        .with_health_interval(None)
        .with_state(state);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg = Registration {
        name: "p0".into(),
        role: Role::Prefill,
        url: None,
        kv_events_endpoint: Some(p.kv.clone()),
        kv_replay_endpoint: Some(p.replay.clone()),
        kv_topic: None,
        kv_capacity_tokens: None,
    };
    mooncake_conductor::start(cfg, l, vec![reg]).await.unwrap()
}

/// Publishes `next()` batches one at a time until the index equals the publisher's cache
/// (ZMQ drops what is published before a subscription or a reconnection is live; the
/// batches published meanwhile sit in the replay buffer). Each publish is followed by a poll
/// of up to 2 s; the whole wait is bounded by 60 s.
async fn publish_until_equal(
    svc: &Service,
    p: &Publisher,
    mut next: impl FnMut() -> Vec<OutEvent>,
    truth: impl Fn() -> HashSet<u64>,
    universe: &dyn Fn() -> u64,
) -> HashSet<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        p.publish(next()).await;
        let t = truth();
        for _ in 0..100 {
            if index_equals(svc, "p0", &t, universe()) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("the index never matched the publisher's cache");
}

/// A shared view of the publisher's cache for the test's truth: the test applies the same
/// events to its own set.
#[derive(Clone, Default)]
struct Truth(Arc<std::sync::Mutex<HashSet<u64>>>);

impl Truth {
    fn apply(&self, events: &[OutEvent]) {
        let mut t = self.0.lock().unwrap();
        for e in events {
            match e {
                OutEvent::Stored { hashes, .. } => {
                    t.extend(hashes.iter().map(|d| digest_to_u64(d)));
                }
                OutEvent::Removed { hashes } => {
                    for d in hashes {
                        t.remove(&digest_to_u64(d));
                    }
                }
                OutEvent::Cleared => t.clear(),
            }
        }
    }

    fn get(&self) -> HashSet<u64> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs one restart: `resume` keeps the publisher's numbering, buffer and cache; otherwise it
/// starts over from sequence 0 with an empty cache (a restarted engine), after `burst`
/// batches published at once on the new sockets.
async fn restart_case(resume: bool, burst: u64) {
    let p = Publisher::start("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", History::default()).await;
    let (kv, replay) = (p.kv.clone(), p.replay.clone());
    let c = conductor(&p).await;
    let truth = Truth::default();
    let next_block = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A batch of 4 new blocks, and every third batch removes two of the oldest ones.
    let mk = {
        let truth = truth.clone();
        let next_block = next_block.clone();
        move || {
            let b = next_block.fetch_add(4, std::sync::atomic::Ordering::Relaxed);
            let mut evs = vec![stored(b..b + 4)];
            if (b / 4) % 3 == 2 {
                evs.push(removed(b - 8..b - 6));
            }
            truth.apply(&evs);
            evs
        }
    };
    let universe = {
        let next_block = next_block.clone();
        move || next_block.load(std::sync::atomic::Ordering::Relaxed)
    };
    let t0 = publish_until_equal(&c.svc, &p, mk.clone(), || truth.get(), &universe).await;
    assert!(!t0.is_empty());
    // Ten more batches while subscribed, then the publisher goes away.
    for _ in 0..10 {
        p.publish(mk.clone()()).await;
    }
    let before = c.svc.with_state(|s| s.instance("p0").unwrap().clone());
    let history = p.stop().await;
    assert_eq!(
        history.held,
        truth.get(),
        "the test's truth follows the publisher"
    );
    let history = if resume {
        history
    } else {
        // A restarted engine: empty cache, numbering from 0, empty replay buffer.
        *truth.0.lock().unwrap() = HashSet::new();
        History::default()
    };
    let p = Publisher::start(&kv, &replay, history).await;
    assert_eq!(
        (p.kv.as_str(), p.replay.as_str()),
        (kv.as_str(), replay.as_str())
    );
    // Batches published before the subscriber is back are lost on PUB but kept for replay.
    for _ in 0..burst {
        p.publish(mk.clone()()).await;
    }
    publish_until_equal(&c.svc, &p, mk.clone(), || truth.get(), &universe).await;
    let after = c.svc.with_state(|s| s.instance("p0").unwrap().clone());
    if resume {
        // Recovered by replay: the view was never cleared.
        assert_eq!(after.kv_rebuilds, before.kv_rebuilds, "{after:?}");
    } else {
        // The old engine's blocks left the view (the index equals the new cache).
        assert!(after.kv_rebuilds > before.kv_rebuilds, "{after:?}");
    }
    let history = p.stop().await;
    assert_eq!(history.held, truth.get());
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_publisher_numbering_from_zero_is_rebuilt() {
    // Fewer batches than before the restart: the live numbering goes back.
    restart_case(false, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_publisher_numbering_past_the_old_one_is_rebuilt() {
    // More batches than before the restart: the numbering does not go back, only the
    // replay's history (checked against the last batch applied) tells the publishers apart.
    restart_case(false, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_publisher_is_recovered_by_replay() {
    restart_case(true, 5).await;
}
