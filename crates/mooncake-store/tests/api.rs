//! The client API against an in-process master and storage node over TCP: put/get forms,
//! batches, multi-buffers, sessions, exists, remove, upsert, error codes, and every async form
//! under tokio (both flavours), smol and a plain block_on.

mod common;

use std::sync::Arc;

use common::*;
use mooncake_core::MemorySegment;
use mooncake_store::{BufferRange, ReplicateConfig, StoreErrorCode};
use mooncake_testkit::{Rt, on_all_runtimes, pattern};

fn rc() -> ReplicateConfig {
    ReplicateConfig::default()
}

#[test]
fn copying_put_get_and_existing_key_keeps_value() {
    let m = master(master_cfg());
    let _node = client(&m, 64 << 20);
    let c = client(&m, 0);
    let v1 = pattern(10_000, 1);
    c.put("k", &v1, &rc()).unwrap();
    assert_eq!(c.get("k").unwrap(), v1);
    // A second put of the same key succeeds and keeps the old value.
    c.put("k", &pattern(10_000, 2), &rc()).unwrap();
    assert_eq!(c.get("k").unwrap(), v1);
    // upsert replaces it (other size too).
    let v3 = pattern(5_000, 3);
    c.upsert("k", &v3, &rc()).unwrap();
    assert_eq!(c.get("k").unwrap(), v3);
    // put_parts concatenates.
    c.put_parts("parts", &[b"abc", b"", b"defg"], &rc())
        .unwrap();
    assert_eq!(c.get("parts").unwrap(), b"abcdefg");
    assert_eq!(c.get("missing").unwrap_err().code(), -704);
    assert!(c.is_exist("k").unwrap());
    assert!(!c.is_exist("missing").unwrap());
    c.health_check().unwrap();
    c.close().unwrap();
}

#[test]
fn zero_copy_batches_and_multi_buffers() {
    let m = master(master_cfg());
    let _node = client(&m, 64 << 20);
    let c = client(&m, 0);
    let n = 16;
    let len = 64 << 10;
    let src = buffer(&c, n * len);
    let dst = buffer(&c, n * len);
    let keys: Vec<String> = (0..n).map(|i| format!("zk{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for i in 0..n {
        src.write_at(i * len, &pattern(len, i as u64)).unwrap();
    }
    let addrs: Vec<u64> = (0..n).map(|i| src.base() + (i * len) as u64).collect();
    let sizes = vec![len as u64; n];
    for r in c.batch_put_from(&keys, &addrs, &sizes, &rc()) {
        r.unwrap();
    }
    let daddrs: Vec<u64> = (0..n).map(|i| dst.base() + (i * len) as u64).collect();
    for r in c.batch_get_into(&keys, &daddrs, &sizes) {
        assert_eq!(r.unwrap(), len as u64);
    }
    assert_eq!(dst.to_vec(), src.to_vec());
    // Buffer too small: -600.
    let e = c.get_into("zk0", dst.base(), 100).unwrap_err();
    assert_eq!(e.error_code(), StoreErrorCode::InvalidParams);
    // Unregistered destination: refused, not written.
    let e = c.get_into("zk0", 0x1000, len as u64).unwrap_err();
    assert_eq!(e.code(), -600);

    // One key ↔ many scattered buffers.
    let parts = [
        (src.base(), 1000u64),
        (src.base() + 5000, 3000),
        (src.base() + 9000, 96),
    ];
    let r = c.batch_put_from_multi_buffers(&["mb"], &[parts.to_vec()], &rc());
    r.into_iter().for_each(|r| r.unwrap());
    let mut whole = Vec::new();
    let all = src.to_vec();
    for (a, l) in parts {
        let o = (a - src.base()) as usize;
        whole.extend_from_slice(&all[o..o + l as usize]);
    }
    assert_eq!(c.get("mb").unwrap(), whole);
    let outs = [(dst.base(), 2000u64), (dst.base() + 10_000, 5000)];
    let r = c.batch_get_into_multi_buffers(&["mb"], &[outs.to_vec()]);
    assert_eq!(r[0].as_ref().unwrap(), &4096);
    let d = dst.to_vec();
    assert_eq!(&d[..2000], &whole[..2000]);
    assert_eq!(&d[10_000..12_096], &whole[2000..]);

    // Exists: per key, no lease.
    let ex = c.batch_is_exist(&["zk0", "nope", "mb"]);
    let ex: Vec<bool> = ex.into_iter().map(Result::unwrap).collect();
    assert_eq!(ex, vec![true, false, true]);
    // Remove.
    c.remove("zk1", false).unwrap_err(); // leased by the get above
    c.remove("zk1", true).unwrap();
    assert!(!c.is_exist("zk1").unwrap());
    assert_eq!(c.remove("zk1", true).unwrap_err().code(), -704);
    let rem = c.batch_remove(&["zk2", "zk3"], true);
    rem.into_iter().for_each(|r| r.unwrap());
    assert!(c.remove_all(true).unwrap() >= 12);
    assert!(!c.is_exist("zk0").unwrap());
}

#[test]
fn sessions_write_and_read_ranges_with_two_master_round_trips() {
    let m = master(master_cfg());
    let _node = client(&m, 64 << 20);
    let c = client(&m, 0);
    let layers = 4u64;
    let page = 8192u64;
    let src = buffer(&c, (2 * layers * page) as usize);
    let data = pattern((2 * layers * page) as usize, 7);
    src.write_at(0, &data).unwrap();
    let keys = ["s0", "s1"];
    let calls_before = m.with_master(|mm| mm.stats().objects);
    assert_eq!(calls_before, 0);
    let mut s = c
        .batch_put_session_start(&keys, &[layers * page, layers * page], &rc())
        .unwrap();
    assert!(s.start_results().iter().all(|r| *r.as_ref().unwrap()));
    // Layer by layer: one range per key per call, no master RPC.
    for l in 0..layers {
        let ranges: Vec<Vec<BufferRange>> = (0..2)
            .map(|k| {
                vec![BufferRange {
                    addr: src.base() + k * layers * page + l * page,
                    len: page,
                    offset: l * page,
                }]
            })
            .collect();
        for r in c.batch_put_from_multi_buffer_ranges(&mut s, &keys, &ranges) {
            r.unwrap();
        }
        // Not visible before the session ends.
        assert!(!c.is_exist("s0").unwrap());
    }
    for r in c.batch_put_session_end(s) {
        r.unwrap();
    }
    assert_eq!(c.get("s0").unwrap(), &data[..(layers * page) as usize]);
    assert_eq!(c.get("s1").unwrap(), &data[(layers * page) as usize..]);

    let dst = buffer(&c, (2 * layers * page) as usize);
    let gs = c.batch_get_session_start(&keys).unwrap();
    assert_eq!(gs.size("s1"), Some(layers * page));
    for l in (0..layers).rev() {
        let ranges: Vec<Vec<BufferRange>> = (0..2)
            .map(|k| {
                vec![BufferRange {
                    addr: dst.base() + k * layers * page + l * page,
                    len: page,
                    offset: l * page,
                }]
            })
            .collect();
        for r in c.batch_get_into_multi_buffer_ranges(&gs, &keys, &ranges) {
            assert_eq!(r.unwrap(), page);
        }
    }
    c.batch_get_session_end(gs).unwrap();
    assert_eq!(dst.to_vec(), data);

    // A revoked session leaves nothing and the keys are writable again.
    let s = c.batch_put_session_start(&["r0"], &[100], &rc()).unwrap();
    c.batch_put_session_revoke(s).unwrap();
    assert!(!c.is_exist("r0").unwrap());
    c.put("r0", b"again", &rc()).unwrap();
}

#[test]
fn errors_carry_reference_codes() {
    let m = master(master_cfg());
    let c = client(&m, 0);
    // No segment at all: the pool is empty.
    let e = c.put("k", b"v", &rc()).unwrap_err();
    assert_eq!(e.code(), -200);
    let _node = client(&m, 1 << 20);
    // Larger than any segment.
    assert_eq!(
        c.put("big", &vec![0u8; 2 << 20], &rc()).unwrap_err().code(),
        -200
    );
    // Larger than the local staging buffer.
    assert_eq!(
        c.put("huge", &vec![0u8; 17 << 20], &rc())
            .unwrap_err()
            .code(),
        -600
    );
    c.put("k", b"v", &rc()).unwrap();
    let _ = c.get("k").unwrap();
    assert_eq!(c.remove("k", false).unwrap_err().code(), -706);
    assert_eq!(c.get("nope").unwrap_err().code(), -704);
}

#[test]
fn replicas_and_failover_inside_one_get() {
    let m = master(master_cfg());
    let a = client(&m, 16 << 20);
    let b = client(&m, 16 << 20);
    let c = client(&m, 0);
    let cfg = rc().with_replica_num(2);
    let v = pattern(100_000, 5);
    c.put("r", &v, &cfg).unwrap();
    let desc = c.batch_get_replica_desc(&["r"]).remove(0).unwrap();
    assert_eq!(desc.len(), 2);
    assert_ne!(desc[0].segment, desc[1].segment);
    // Kill the engine serving one replica (without telling the master): the get fails over.
    let first = desc[0].segment.clone();
    let victim = if a.get_hostname() == first { a } else { b };
    victim.engine().transports()[0].shutdown();
    assert_eq!(c.get("r").unwrap(), v);
}

#[test]
fn every_async_form_runs_on_every_runtime() {
    let m = master(master_cfg());
    let _node = client(&m, 32 << 20);
    let c = Arc::new(client(&m, 0));
    let buf = buffer(&c, 1 << 20);
    on_all_runtimes(|rt: Rt| {
        let c = c.clone();
        let buf = buf.clone();
        async move {
            let key = format!("async-{rt:?}");
            let v = pattern(50_000, rt as u64);
            c.put_async(&key, &v, &rc()).await.unwrap();
            assert_eq!(c.get_async(&key).await.unwrap(), v);
            assert!(c.is_exist_async(&key).await.unwrap());
            buf.write_at(0, &v).unwrap();
            let k2 = format!("{key}-z");
            c.put_from_async(&k2, buf.base(), 50_000, &rc())
                .await
                .unwrap();
            let n = c
                .get_into_async(&k2, buf.base() + 100_000, 50_000)
                .await
                .unwrap();
            assert_eq!(n, 50_000);
            assert_eq!(buf.to_vec()[100_000..150_000], v[..]);
            let ex = c.batch_is_exist_async(&[key.as_str(), "nope"]).await;
            assert_eq!(ex[0].as_ref().unwrap(), &true);
            assert_eq!(ex[1].as_ref().unwrap(), &false);
            c.remove_async(&k2, true).await.unwrap();
            c.health_check_async().await.unwrap();
        }
    });
}
