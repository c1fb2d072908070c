//! The conformance suite must fail on broken backends: each test wraps the embedded store
//! with one defect and expects the matching case to panic.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{
    BoxFuture, EmbeddedMetadataStore, MetadataStore, Result, SegmentDescriptor, WatchStream,
};
use mooncake_testkit::Rt;
use mooncake_testkit::metadata::{self as conformance, Harness, Liveness, Node};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Defect {
    /// Claims a TTL but never expires anything.
    NoExpiry,
    /// Watch streams lose their first event.
    LosesFirstEvent,
    /// Reads come back with another generation than the buffers were written with.
    MixesGenerations,
    /// Deletes are ignored.
    IgnoresDeletes,
}

struct Broken {
    inner: EmbeddedMetadataStore,
    defect: Defect,
}

impl MetadataStore for Broken {
    fn scheme(&self) -> &'static str {
        "broken"
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>>> {
        let v = self.inner.get_now(key);
        let v = match (self.defect, v) {
            (Defect::MixesGenerations, Some(bytes)) => {
                match SegmentDescriptor::from_json(&bytes, key) {
                    Ok(mut d) => {
                        d.generation += 1;
                        Some(d.to_json())
                    }
                    Err(_) => Some(bytes),
                }
            }
            (_, v) => v,
        };
        Box::pin(std::future::ready(Ok(v)))
    }
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        self.inner.put(key, value)
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        if self.defect == Defect::IgnoresDeletes {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.inner.delete(key)
    }
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<WatchStream>> {
        let mut w = self.inner.watch_now(prefix);
        if self.defect != Defect::LosesFirstEvent {
            return Box::pin(std::future::ready(Ok(w)));
        }
        let stream = futures_lite::stream::unfold((w, true), |(mut w, first)| async move {
            if first {
                w.next().await?;
            }
            let e = w.next().await?;
            Some((e, (w, false)))
        });
        w = WatchStream::new(stream);
        Box::pin(std::future::ready(Ok(w)))
    }
}

struct BrokenHarness {
    store: EmbeddedMetadataStore,
    defect: Defect,
}

impl Harness for BrokenHarness {
    fn name(&self) -> &str {
        "broken"
    }
    fn node(&self, hint: &str) -> Result<Node> {
        Ok(Node {
            store: Arc::new(Broken {
                inner: self.store.clone(),
                defect: self.defect,
            }),
            segment: hint.into(),
        })
    }
    fn liveness(&self) -> Liveness {
        if self.defect == Defect::NoExpiry {
            Liveness::Ttl(Duration::from_millis(500))
        } else {
            Liveness::None
        }
    }
}

fn broken(defect: Defect, case: &str) {
    let h = BrokenHarness {
        store: EmbeddedMetadataStore::new(),
        defect,
    };
    conformance::run_case(&h, case, Rt::BlockOn);
}

#[test]
#[should_panic(expected = "still there")]
fn a_store_without_expiry_fails_the_liveness_case() {
    broken(Defect::NoExpiry, "dead_node_expires");
}

#[test]
#[should_panic(expected = "watch event 1 (the first put) missing or out of order")]
fn a_lossy_watch_fails_the_watch_case() {
    broken(Defect::LosesFirstEvent, "watch_in_order");
}

#[test]
#[should_panic(expected = "mixes generations")]
fn mixed_generations_fail_the_concurrency_case() {
    broken(Defect::MixesGenerations, "concurrent_writers");
}

#[test]
#[should_panic(expected = "deleted key")]
fn ignored_deletes_fail_the_crud_case() {
    broken(Defect::IgnoresDeletes, "put_get_delete");
}

/// The same cases pass on the healthy store (so the panics above come from the defects).
#[test]
fn the_healthy_store_passes() {
    let h = BrokenHarness {
        store: EmbeddedMetadataStore::new(),
        defect: Defect::NoExpiry,
    };
    for case in ["watch_in_order", "concurrent_writers", "put_get_delete"] {
        conformance::run_case(&h, case, Rt::BlockOn);
    }
}
