//! The conformance suite every metadata backend passes.
//!
//! A backend provides a [`Harness`] that makes independent *nodes* (a store each, as separate
//! processes would have). Each case is an `async fn(&dyn Harness)`; [`run`] drives it under
//! one of the [`Rt`]s, and `tests/conformance.rs` runs every case under all of them.
//!
//! Values are real segment descriptors whose buffers all carry the descriptor's generation,
//! so a reader can check it never sees two generations mixed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rt::{Rt, run};
use crate::unique;
use mooncake_core::{
    BufferDesc, Error, ErrorKind, MetadataKeys, MetadataStore, Result, SegmentDescriptor,
    WatchEvent, WatchStream,
};

/// How a backend notices a dead node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Not applicable (in-process store).
    None,
    /// The node's keys expire within this TTL once it stops refreshing them.
    Ttl(Duration),
    /// A dead node is unreachable (peer handshake): reads fail with
    /// [`ErrorKind::PeerUnreachable`] or return nothing.
    Unreachable,
}

/// One node under test.
pub struct Node {
    /// Its store (the only strong reference the suite holds: dropping the node kills it).
    pub store: Arc<dyn MetadataStore>,
    /// The segment name this node may publish.
    pub segment: String,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("segment", &self.segment)
            .field("scheme", &self.store.scheme())
            .finish()
    }
}

/// A backend under test.
pub trait Harness: Send + Sync {
    /// The backend's name, for messages.
    fn name(&self) -> &str;
    /// A fresh node. `hint` is unique per call and may be used as the segment name.
    fn node(&self, hint: &str) -> Result<Node>;
    /// How dead nodes are noticed.
    fn liveness(&self) -> Liveness;
    /// Whether a node sees changes made by other nodes through `watch` (false: only its own).
    fn remote_watch(&self) -> bool {
        true
    }
}

/// A descriptor of `name` at `generation` with `buffers` buffers, each carrying the generation
/// in its address and rkey.
pub fn descriptor(name: &str, generation: u64, buffers: usize) -> SegmentDescriptor {
    SegmentDescriptor {
        name: name.to_string(),
        protocol: "tcp".into(),
        generation,
        tcp_data_port: 1,
        buffers: (0..buffers)
            .map(|i| BufferDesc {
                name: "cpu:0".into(),
                addr: (generation << 32) | (i as u64 * 4096),
                length: 4096,
                rkey: vec![generation as u32],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Reads and parses the descriptor at `key` (as the engine does) and checks its buffers
/// all belong to its generation.
pub async fn read_descriptor(
    store: &dyn MetadataStore,
    key: &str,
) -> Result<Option<SegmentDescriptor>> {
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    let d = SegmentDescriptor::from_json(&bytes, key)?;
    for b in &d.buffers {
        if b.addr >> 32 != d.generation || b.rkey != [d.generation as u32] {
            return Err(Error::new(
                ErrorKind::Metadata,
                format!(
                    "descriptor at {key} mixes generations: buffer {b:?} in generation {}",
                    d.generation
                ),
            ));
        }
    }
    Ok(Some(d))
}

/// Fails unless a required service is configured. Returns the URL from `var`, or `None`
/// (after printing why) when the test should be skipped.
///
/// With `MOONCAKE_REQUIRE_SERVICES=1` (set by `cargo xtask test`) a missing variable panics.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("MOONCAKE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!(
                    "{var} is not set but MOONCAKE_REQUIRE_SERVICES=1: start the services (cargo xtask test does)"
                );
            }
            eprintln!("skipped: set {var} (cargo xtask test does)");
            None
        }
    }
}

async fn next_event(w: &mut WatchStream, what: &str) -> WatchEvent {
    let ev = futures_lite::future::or(async { Some(w.next().await) }, async {
        async_io::Timer::after(Duration::from_secs(10)).await;
        None
    })
    .await;
    match ev {
        Some(Some(e)) => e,
        Some(None) => panic!("{what}: the watch stream ended"),
        None => panic!("{what}: no watch event within 10 s"),
    }
}

fn keys() -> MetadataKeys {
    MetadataKeys::new(Some(&unique("c")))
}

/// put, get from another node, delete, get again.
pub async fn put_get_delete(h: &dyn Harness) {
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    assert_eq!(
        read_descriptor(&*b.store, &key).await.unwrap(),
        None,
        "{}: fresh key must be absent",
        h.name()
    );
    let d = descriptor(&a.segment, 1, 3);
    a.store.put(&key, d.to_json()).await.unwrap();
    assert_eq!(
        read_descriptor(&*b.store, &key).await.unwrap(),
        Some(d.clone()),
        "{}",
        h.name()
    );
    assert_eq!(
        read_descriptor(&*a.store, &key).await.unwrap(),
        Some(d),
        "{}: own read",
        h.name()
    );
    a.store.delete(&key).await.unwrap();
    assert_eq!(
        read_descriptor(&*b.store, &key).await.unwrap(),
        None,
        "{}: deleted key",
        h.name()
    );
    a.store
        .delete(&key)
        .await
        .expect("deleting an absent key succeeds");
}

/// A second put replaces the first, whole.
pub async fn overwrite(h: &dyn Harness) {
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    a.store
        .put(&key, descriptor(&a.segment, 1, 5).to_json())
        .await
        .unwrap();
    a.store
        .put(&key, descriptor(&a.segment, 2, 7).to_json())
        .await
        .unwrap();
    let d = read_descriptor(&*b.store, &key)
        .await
        .unwrap()
        .expect("present");
    assert_eq!((d.generation, d.buffers.len()), (2, 7), "{}", h.name());
}

/// A watch delivers every change under its prefix after it was created, in order, and
/// nothing outside the prefix.
pub async fn watch_in_order(h: &dyn Harness) {
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let watcher = if h.remote_watch() { &b } else { &a };
    let key = k.segment(&a.segment);
    let before = descriptor(&a.segment, 9, 1).to_json();
    a.store.put(&key, before).await.unwrap();
    let mut w = watcher.store.watch(&k.segment_prefix()).await.unwrap();
    let (d1, d2) = (
        descriptor(&a.segment, 1, 1).to_json(),
        descriptor(&a.segment, 2, 2).to_json(),
    );
    a.store.put(&key, d1.clone()).await.unwrap();
    a.store
        .put(
            &k.rpc_meta(&a.segment),
            b"{\"ip_or_host_name\":\"h\",\"rpc_port\":1}".to_vec(),
        )
        .await
        .unwrap();
    a.store.put(&key, d2.clone()).await.unwrap();
    a.store.delete(&key).await.unwrap();
    let name = h.name().to_string();
    assert_eq!(
        next_event(&mut w, &name).await,
        WatchEvent::Put {
            key: key.clone(),
            value: d1
        },
        "{name}: watch event 1 (the first put) missing or out of order"
    );
    assert_eq!(
        next_event(&mut w, &name).await,
        WatchEvent::Put {
            key: key.clone(),
            value: d2
        },
        "{name}: watch event 2 (the second put) missing or out of order"
    );
    assert_eq!(
        next_event(&mut w, &name).await,
        WatchEvent::Delete { key: key.clone() },
        "{name}: watch event 3 (the delete) missing or out of order"
    );
    a.store.delete(&k.rpc_meta(&a.segment)).await.unwrap();
}

/// A node that dies (is dropped without deleting its keys) disappears for the others:
/// its keys expire within the TTL, or it becomes unreachable.
pub async fn dead_node_expires(h: &dyn Harness) {
    let liveness = h.liveness();
    if liveness == Liveness::None {
        return;
    }
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    a.store
        .put(&key, descriptor(&a.segment, 1, 1).to_json())
        .await
        .unwrap();
    // Outlive one TTL first: the keepalive must keep the key.
    if let Liveness::Ttl(ttl) = liveness {
        async_io::Timer::after(ttl + ttl / 2).await;
        assert!(
            read_descriptor(&*b.store, &key).await.unwrap().is_some(),
            "{}: a live node's key expired despite the keepalive",
            h.name()
        );
    }
    assert!(
        read_descriptor(&*b.store, &key).await.unwrap().is_some(),
        "{}",
        h.name()
    );
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read_descriptor(&*b.store, &key).await {
            Ok(None) => return,
            Err(e)
                if liveness == Liveness::Unreachable && e.kind() == ErrorKind::PeerUnreachable =>
            {
                return;
            }
            Err(e) => panic!("{}: reading a dead node's key: {e}", h.name()),
            Ok(Some(_)) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{}: a dead node's key is still there after 10 s",
            h.name()
        );
        async_io::Timer::after(Duration::from_millis(100)).await;
    }
}

/// A watcher on another node sees a dead node's key go (as a delete), after its put.
pub async fn watch_sees_expiry(h: &dyn Harness) {
    if !matches!(h.liveness(), Liveness::Ttl(_)) || !h.remote_watch() {
        return;
    }
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    let mut w = b.store.watch(&k.segment_prefix()).await.unwrap();
    let d = descriptor(&a.segment, 1, 1).to_json();
    a.store.put(&key, d.clone()).await.unwrap();
    drop(a);
    let name = h.name().to_string();
    assert_eq!(
        next_event(&mut w, &name).await,
        WatchEvent::Put {
            key: key.clone(),
            value: d
        },
        "{name}"
    );
    assert_eq!(
        next_event(&mut w, &name).await,
        WatchEvent::Delete { key },
        "{name}: expiry not watched"
    );
}

/// Many writers race on one key while readers read it: every read is one whole descriptor
/// of one generation, and the final value is one that was written.
pub async fn concurrent_writers(h: &dyn Harness) {
    const WRITERS: u64 = 4;
    const ROUNDS: u64 = 20;
    let k = keys();
    let owner = h.node(&unique("a")).unwrap();
    let key = k.segment(&owner.segment);
    let reader = h.node(&unique("r")).unwrap();
    // Shared backends: writers are separate nodes. Peer handshake: only the owner may publish
    // its segment, so the writers share its store.
    let writers: Vec<Arc<dyn MetadataStore>> = (0..WRITERS)
        .map(|i| {
            if h.remote_watch() && i > 0 {
                h.node(&unique("w")).unwrap().store
            } else {
                owner.store.clone()
            }
        })
        .collect();
    let seg = owner.segment.clone();
    let write_all = writers.iter().enumerate().map(|(i, w)| {
        let seg = seg.clone();
        let key = key.clone();
        async move {
            for r in 0..ROUNDS {
                let generation = 1 + i as u64 * ROUNDS + r;
                w.put(
                    &key,
                    descriptor(&seg, generation, 1 + (generation % 17) as usize).to_json(),
                )
                .await
                .unwrap();
            }
        }
    });
    let reads = async {
        let mut seen = 0;
        for _ in 0..ROUNDS * 2 {
            if let Some(d) = read_descriptor(&*reader.store, &key).await.unwrap() {
                assert_eq!(
                    d.buffers.len(),
                    1 + (d.generation % 17) as usize,
                    "{}: torn descriptor",
                    h.name()
                );
                seen += 1;
            }
        }
        seen
    };
    let mut all: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>> = write_all
        .map(|f| Box::pin(f) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>)
        .collect();
    let (_, seen) = futures_lite::future::zip(join_all(&mut all), reads).await;
    let _ = seen;
    let d = read_descriptor(&*reader.store, &key)
        .await
        .unwrap()
        .expect("present after the writes");
    assert!(
        (1..=WRITERS * ROUNDS).contains(&d.generation),
        "{}",
        h.name()
    );
    assert!(
        (0..WRITERS).any(|i| d.generation == (i + 1) * ROUNDS),
        "{}: the final value (generation {}) is not any writer's last write",
        h.name(),
        d.generation
    );
}

async fn join_all(futs: &mut [std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>]) {
    let mut done = vec![false; futs.len()];
    std::future::poll_fn(|cx| {
        for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
            if !*d && f.as_mut().poll(cx).is_ready() {
                *d = true;
            }
        }
        if done.iter().all(|d| *d) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A descriptor with thousands of buffers round-trips intact.
pub async fn large_descriptor(h: &dyn Harness) {
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    let d = descriptor(&a.segment, 3, 5000);
    let json = d.to_json();
    assert!(json.len() > 300_000, "descriptor is {} bytes", json.len());
    a.store.put(&key, json).await.unwrap();
    assert_eq!(
        read_descriptor(&*b.store, &key).await.unwrap(),
        Some(d),
        "{}",
        h.name()
    );
}

/// Malformed JSON from a peer is a clear error naming the key or the peer.
pub async fn malformed_json(h: &dyn Harness) {
    let k = keys();
    let (a, b) = (h.node(&unique("a")).unwrap(), h.node(&unique("b")).unwrap());
    let key = k.segment(&a.segment);
    a.store
        .put(&key, b"{\"name\": not json".to_vec())
        .await
        .unwrap();
    let e = read_descriptor(&*b.store, &key)
        .await
        .expect_err("malformed JSON must not parse");
    assert!(
        matches!(e.kind(), ErrorKind::Metadata | ErrorKind::Protocol),
        "{}: {e}",
        h.name()
    );
    let s = e.to_string();
    assert!(s.contains("malformed"), "{}: {s}", h.name());
    assert!(
        s.contains(&key) || s.contains(&a.segment),
        "{}: the error must name the key or peer: {s}",
        h.name()
    );
}

/// Every case, by name.
pub const CASES: &[&str] = &[
    "put_get_delete",
    "overwrite",
    "watch_in_order",
    "dead_node_expires",
    "watch_sees_expiry",
    "concurrent_writers",
    "large_descriptor",
    "malformed_json",
];

/// Runs case `name` under `rt`.
pub fn run_case(h: &dyn Harness, name: &str, rt: Rt) {
    match name {
        "put_get_delete" => run(rt, put_get_delete(h)),
        "overwrite" => run(rt, overwrite(h)),
        "watch_in_order" => run(rt, watch_in_order(h)),
        "dead_node_expires" => run(rt, dead_node_expires(h)),
        "watch_sees_expiry" => run(rt, watch_sees_expiry(h)),
        "concurrent_writers" => run(rt, concurrent_writers(h)),
        "large_descriptor" => run(rt, large_descriptor(h)),
        "malformed_json" => run(rt, malformed_json(h)),
        other => panic!("unknown conformance case {other}"),
    }
}

/// Generates one `#[test]` per case for a harness expression, each run under every [`Rt`].
///
/// `metadata_suite!(http, || HttpHarness::new())` — the closure returns
/// `Option<impl Harness>`; `None` skips (a service is not configured).
#[macro_export]
macro_rules! metadata_suite {
    ($m:ident, $make:expr) => {
        mod $m {
            #[allow(unused_imports)]
            use super::*;
            fn case(name: &str) {
                let make = $make;
                let Some(h) = make() else { return };
                for rt in $crate::rt::Rt::ALL {
                    eprintln!("{} under {rt:?}", name);
                    $crate::metadata::run_case(&h, name, rt);
                }
            }
            #[test]
            fn put_get_delete() {
                case("put_get_delete")
            }
            #[test]
            fn overwrite() {
                case("overwrite")
            }
            #[test]
            fn watch_in_order() {
                case("watch_in_order")
            }
            #[test]
            fn dead_node_expires() {
                case("dead_node_expires")
            }
            #[test]
            fn watch_sees_expiry() {
                case("watch_sees_expiry")
            }
            #[test]
            fn concurrent_writers() {
                case("concurrent_writers")
            }
            #[test]
            fn large_descriptor() {
                case("large_descriptor")
            }
            #[test]
            fn malformed_json() {
                case("malformed_json")
            }
        }
    };
}
