//! TCP-specific transfer tests: concurrent batches from threads, the sync calls and batch
//! ids, and metadata round trips. Random batches, refusals and failures are in the
//! conformance suite (`tests/conformance.rs`).

mod common;

use std::sync::Arc;

use common::{buffer, engine, engine_with_transport, pattern, store};
use mooncake_core::{MemorySegment, Opcode, TransferRequest, TransferStatus};
use mooncake_transport_tcp::TcpConfig;

const LEN: usize = 8 << 20;

/// Several threads submit batches at once to the same peer, each on its own ranges.
#[test]
fn concurrent_batches_from_threads() {
    let md = store();
    let target = engine("cc-target", &md, TcpConfig::new().with_conns_per_path(2));
    let init = Arc::new(engine(
        "cc-init",
        &md,
        TcpConfig::new().with_conns_per_path(2),
    ));
    let tbuf = buffer(&target, LEN, 3);
    let lbuf = buffer(&init, LEN, 4);
    let seg = init.open_segment_blocking("cc-target").unwrap();
    let threads = 4;
    let part = LEN / threads;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (init, lbuf, tbuf) = (init.clone(), lbuf.clone(), tbuf.clone());
            s.spawn(move || {
                let base = t * part;
                for round in 0..20u64 {
                    // Write the first half of the part, read the second half back.
                    let blk = part / 16;
                    let reqs: Vec<_> = (0..8)
                        .map(|i| TransferRequest {
                            opcode: if round % 2 == 0 {
                                Opcode::Write
                            } else {
                                Opcode::Read
                            },
                            source: lbuf.base() + (base + i * blk) as u64,
                            target_id: seg,
                            target_offset: tbuf.base()
                                + (base + (i + 8 * (round as usize % 2)) * blk) as u64,
                            length: blk as u64,
                        })
                        .collect();
                    init.submit_batch(&reqs)
                        .unwrap()
                        .wait_blocking(None)
                        .unwrap();
                }
            });
        }
    });
    // Even rounds wrote local[base..base+part/2] to target[base..base+part/2]; odd rounds
    // read target[base+part/2..base+part] into local[base..base+part/2] (last round odd).
    let t = pattern(LEN, 3);
    let l0 = pattern(LEN, 4);
    let tv = tbuf.to_vec();
    let lv = lbuf.to_vec();
    for th in 0..threads {
        let base = th * part;
        let half = part / 2;
        assert!(
            lv[base..base + half] == t[base + half..base + part],
            "thread {th}: read-back differs"
        );
        assert!(
            tv[base + half..base + part] == t[base + half..base + part],
            "thread {th}: untouched half changed"
        );
        // The first half of the target holds what the last even round wrote: the local half
        // as it was before round 1 overwrote it.
        assert!(
            tv[base..base + half] == l0[base..base + half]
                || tv[base..base + half] == t[base + half..base + part]
        );
        assert!(lv[base + half..base + part] == l0[base + half..base + part]);
    }
}

/// Python-shaped one-shot calls, and the batch-id API with its pure status query.
#[test]
fn sync_calls_and_batch_ids() {
    let md = store();
    let target = engine("sy-target", &md, TcpConfig::new());
    let (init, tcp) = engine_with_transport(
        "sy-init",
        &md,
        TcpConfig::new(),
        std::time::Duration::from_secs(2),
    );
    let tbuf = buffer(&target, 1 << 20, 5);
    let lbuf = buffer(&init, 1 << 20, 6);
    init.transfer_sync_write("sy-target", lbuf.base(), tbuf.base() + 100, 5000)
        .unwrap();
    assert_eq!(tbuf.to_vec()[100..5100], pattern(1 << 20, 6)[..5000]);
    init.batch_transfer_sync_read(
        "sy-target",
        &[lbuf.base(), lbuf.base() + 8192],
        &[tbuf.base(), tbuf.base() + 65536],
        &[4096, 4096],
    )
    .unwrap();
    assert_eq!(
        lbuf.to_vec()[8192..12288],
        pattern(1 << 20, 5)[65536..69632]
    );

    let seg = init.open_segment_blocking("sy-target").unwrap();
    let id = init.allocate_batch(2);
    let req = TransferRequest {
        opcode: Opcode::Write,
        source: lbuf.base(),
        target_id: seg,
        target_offset: tbuf.base(),
        length: 64,
    };
    init.submit(id, &[req]).unwrap();
    init.submit(id, &[req]).unwrap();
    assert!(
        init.submit(id, &[req]).is_err(),
        "a third task overflows the batch"
    );
    futures_lite::future::block_on(init.wait(id)).unwrap();
    assert_eq!(init.transfer_status(id, 1), TransferStatus::Completed);
    assert_eq!(init.transfer_status(id, 2), TransferStatus::Invalid);
    init.free_batch(id).unwrap();
    assert!(init.batch(id).is_err());

    // Connections are pooled: many transfers, few connects.
    for _ in 0..50 {
        init.transfer_sync_read("sy-target", lbuf.base(), tbuf.base(), 4096)
            .unwrap();
    }
    let connects = tcp.stats().connects;
    assert!(connects <= 4, "{connects} connects for 53 transfers");
}

/// A metadata store that counts reads.
struct CountingStore {
    inner: mooncake_core::EmbeddedMetadataStore,
    gets: std::sync::atomic::AtomicUsize,
}

impl mooncake_core::MetadataStore for CountingStore {
    fn scheme(&self) -> &'static str {
        "counting"
    }
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> mooncake_core::BoxFuture<'a, mooncake_core::Result<Option<Vec<u8>>>> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.get(key)
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
    ) -> mooncake_core::BoxFuture<'a, mooncake_core::Result<()>> {
        self.inner.put(key, value)
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
    ) -> mooncake_core::BoxFuture<'a, mooncake_core::Result<()>> {
        self.inner.delete(key)
    }
    fn watch<'a>(
        &'a self,
        prefix: &'a str,
    ) -> mooncake_core::BoxFuture<'a, mooncake_core::Result<mooncake_core::WatchStream>> {
        self.inner.watch(prefix)
    }
}

/// Opening a segment is one metadata read; transfers to an opened segment make none.
#[test]
fn transfers_to_an_opened_segment_make_no_metadata_reads() {
    let counting = Arc::new(CountingStore {
        inner: mooncake_core::EmbeddedMetadataStore::new(),
        gets: 0.into(),
    });
    let md: Arc<dyn mooncake_core::MetadataStore> = counting.clone();
    let target = engine("mr-target", &md, TcpConfig::new());
    let init = engine("mr-init", &md, TcpConfig::new());
    let tbuf = buffer(&target, 1 << 20, 1);
    let lbuf = buffer(&init, 1 << 20, 2);
    let gets = || counting.gets.load(std::sync::atomic::Ordering::SeqCst);
    let before = gets();
    let seg = init.open_segment_blocking("mr-target").unwrap();
    assert_eq!(gets() - before, 1, "opening is one round trip");
    let before = gets();
    for i in 0..20u64 {
        let req = TransferRequest {
            opcode: if i % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            },
            source: lbuf.base() + i * 4096,
            target_id: seg,
            target_offset: tbuf.base() + i * 4096,
            length: 4096,
        };
        init.submit_batch(&[req])
            .unwrap()
            .wait_blocking(None)
            .unwrap();
        init.transfer_sync_write("mr-target", lbuf.base(), tbuf.base(), 4096)
            .unwrap();
    }
    assert_eq!(
        gets(),
        before,
        "transfers to an opened segment read no metadata"
    );
}
