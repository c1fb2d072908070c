//! The [`MetadataStore`] trait, where segments publish their descriptors, and the embedded
//! in-process store that is the default and the reference for every other backend.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures_channel::mpsc;
use futures_core::Stream;

use crate::error::Result;

/// A boxed, `Send` future: what the object-safe async traits of core return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A change seen by [`MetadataStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` now holds `value`.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
    },
    /// `key` was deleted (or expired).
    Delete {
        /// The key.
        key: String,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// A stream of [`WatchEvent`]s in the order the store applied them.
pub struct WatchStream {
    inner: Pin<Box<dyn Stream<Item = WatchEvent> + Send>>,
}

impl WatchStream {
    /// Wraps any stream of events.
    pub fn new(stream: impl Stream<Item = WatchEvent> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(stream),
        }
    }

    /// The next event; `None` when the store closed the watch.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx)).await
    }
}

impl Stream for WatchStream {
    type Item = WatchEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchStream")
    }
}

/// Where segments publish their descriptors.
///
/// # Behavior
/// - Values are opaque bytes (the engine stores JSON descriptors).
/// - Futures are runtime-agnostic: they complete under tokio, smol or a plain `block_on`.
/// - A backend with liveness (etcd leases, redis TTLs) expires the keys a process `put` when
///   that process dies, and keeps them alive while it runs.
/// - `watch` delivers every change under `prefix` made after the watch was created, in the
///   order the store applied them.
pub trait MetadataStore: Send + Sync + 'static {
    /// The URL scheme of this backend (`embedded`, `http`, `etcd`, `redis`, `p2phandshake`).
    fn scheme(&self) -> &'static str;
    /// Reads `key`; `Ok(None)` when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>>;
    /// Writes `key`.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>>;
    /// Deletes `key`; deleting an absent key succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Watches every key that starts with `prefix`.
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>>;
}

/// Runs a future to completion on the calling thread (for the synchronous API).
pub fn block_on<F: Future>(f: F) -> F::Output {
    futures_lite_block_on(f)
}

fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
    use std::sync::Arc as StdArc;
    use std::task::{Wake, Waker};
    use std::thread::Thread;

    struct Unparker(Thread);
    impl Wake for Unparker {
        fn wake(self: StdArc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &StdArc<Self>) {
            self.0.unpark();
        }
    }
    let mut f = std::pin::pin!(f);
    let waker = Waker::from(StdArc::new(Unparker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[derive(Default)]
struct EmbeddedInner {
    map: BTreeMap<String, Vec<u8>>,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
}

/// The in-process metadata store: the default backend, for one process with several engines
/// and for tests. Clones share the same map.
#[derive(Clone, Default)]
pub struct EmbeddedMetadataStore {
    inner: Arc<Mutex<EmbeddedInner>>,
}

impl std::fmt::Debug for EmbeddedMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedMetadataStore")
            .field("keys", &self.len())
            .finish()
    }
}

impl EmbeddedMetadataStore {
    /// A new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide store used when no metadata URL is given.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<EmbeddedMetadataStore> = OnceLock::new();
        GLOBAL.get_or_init(Self::new).clone()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All keys starting with `prefix`, in order.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.lock()
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EmbeddedInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(inner: &mut EmbeddedInner, ev: &WatchEvent) {
        inner.watchers.retain(|(prefix, tx)| {
            if ev.key().starts_with(prefix.as_str()) {
                tx.unbounded_send(ev.clone()).is_ok()
            } else {
                !tx.is_closed()
            }
        });
    }

    /// Synchronous get.
    pub fn get_now(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().map.get(key).cloned()
    }

    /// Synchronous put.
    pub fn put_now(&self, key: &str, value: Vec<u8>) {
        let mut inner = self.lock();
        inner.map.insert(key.to_string(), value.clone());
        Self::notify(
            &mut inner,
            &WatchEvent::Put {
                key: key.to_string(),
                value,
            },
        );
    }

    /// Synchronous delete.
    pub fn delete_now(&self, key: &str) {
        let mut inner = self.lock();
        if inner.map.remove(key).is_some() {
            Self::notify(
                &mut inner,
                &WatchEvent::Delete {
                    key: key.to_string(),
                },
            );
        }
    }

    /// Synchronous watch.
    pub fn watch_now(&self, prefix: &str) -> WatchStream {
        let (tx, rx) = mpsc::unbounded();
        self.lock().watchers.push((prefix.to_string(), tx));
        WatchStream::new(rx)
    }
}

impl MetadataStore for EmbeddedMetadataStore {
    fn scheme(&self) -> &'static str {
        "embedded"
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        Box::pin(std::future::ready(Ok(self.get_now(key))))
    }
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        self.put_now(key, value);
        Box::pin(std::future::ready(Ok(())))
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        self.delete_now(key);
        Box::pin(std::future::ready(Ok(())))
    }
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        Box::pin(std::future::ready(Ok(self.watch_now(prefix))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_delete_watch() {
        let s = EmbeddedMetadataStore::new();
        let mut w = block_on(s.watch("mooncake/ram/")).unwrap();
        block_on(s.put("mooncake/ram/a", b"1".to_vec())).unwrap();
        block_on(s.put("other", b"x".to_vec())).unwrap();
        block_on(s.put("mooncake/ram/a", b"2".to_vec())).unwrap();
        assert_eq!(
            block_on(s.get("mooncake/ram/a")).unwrap(),
            Some(b"2".to_vec())
        );
        block_on(s.delete("mooncake/ram/a")).unwrap();
        assert_eq!(block_on(s.get("mooncake/ram/a")).unwrap(), None);
        let evs: Vec<_> = (0..3).map(|_| smol::block_on(w.next()).unwrap()).collect();
        assert_eq!(
            evs,
            vec![
                WatchEvent::Put {
                    key: "mooncake/ram/a".into(),
                    value: b"1".to_vec()
                },
                WatchEvent::Put {
                    key: "mooncake/ram/a".into(),
                    value: b"2".to_vec()
                },
                WatchEvent::Delete {
                    key: "mooncake/ram/a".into()
                },
            ]
        );
    }
}
