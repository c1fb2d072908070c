//! Peers that trickle bytes: a request answered one byte at a time fails by its whole-request
//! deadline; a remote write trickling into a region that is unregistered, or into an engine
//! that is dropped, stops landing the moment `unregister_memory` (or the drop) returns.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{buffer, engine, publish, raw_client, read_header, store};
use mooncake_core::{BufferDesc, ErrorKind, LocalBuffer, MemorySegment, SegmentDescriptor};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;
use mooncake_transport_tcp::wire::{FrameKind, HEADER_LEN, Header};

/// A fake target that acknowledges the hello, then answers a read by trickling its data.
fn trickling_target() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut h = [0u8; HEADER_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let hello = Header::decode(&h, 1 << 20).unwrap();
        let mut p = vec![0u8; hello.len as usize];
        s.read_exact(&mut p).unwrap();
        s.write_all(&Header::new(FrameKind::HelloAck, 0, 0, 0).encode())
            .unwrap();
        s.read_exact(&mut h).unwrap();
        let req = Header::decode(&h, 1 << 30).unwrap();
        s.write_all(&Header::new(FrameKind::ReadData, req.request_id, req.addr, req.len).encode())
            .unwrap();
        for _ in 0..req.len {
            if s.write_all(&[0x5A]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    addr
}

#[test]
fn a_trickled_response_fails_by_the_whole_request_deadline() {
    let md = store();
    let addr = trickling_target();
    publish(
        &md,
        &SegmentDescriptor {
            name: "trickler".into(),
            protocol: "tcp".into(),
            tcp_data_addrs: vec![addr],
            buffers: vec![BufferDesc {
                name: "cpu:0".into(),
                addr: 0x10_0000,
                length: 1 << 20,
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let init = TransferEngine::builder("trickle-init")
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(1))
        .with_transport(TcpConfig::new())
        .build()
        .unwrap();
    let local = buffer(&init, 64 << 10, 1);
    let seg = init.open_segment_blocking("trickler").unwrap();
    let batch = init
        .submit_batch(&[mooncake_core::TransferRequest {
            opcode: mooncake_core::Opcode::Read,
            source: local.base(),
            target_id: seg,
            target_offset: 0x10_0000,
            length: 64 << 10,
        }])
        .unwrap();
    // One byte every 20 ms keeps "progress" going for 20 minutes: only a whole-request
    // deadline (1 s + 64 KiB at the 1 MiB/s minimum rate) ends it.
    let t0 = Instant::now();
    let r = batch.wait_blocking(Some(t0 + Duration::from_secs(15)));
    assert!(
        batch.is_done(),
        "the trickled read was still pending after {:?}",
        t0.elapsed()
    );
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
}

/// A raw client that writes `len` bytes at `addr` of `target`, one byte every 10 ms, until
/// told to stop or the connection breaks.
fn trickle_write(addr: &str, target: &str, at: u64, len: u64, stop: Arc<AtomicBool>) {
    let mut s = raw_client(addr, target);
    s.write_all(&Header::new(FrameKind::Write, 9, at, len).encode())
        .unwrap();
    std::thread::spawn(move || {
        for _ in 0..len {
            if stop.load(Ordering::Acquire) || s.write_all(&[0xEE]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = read_header(&mut s);
    });
}

fn wait_for_first_byte(buf: &LocalBuffer) {
    let t0 = Instant::now();
    while buf.to_vec()[0] != 0xEE {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the trickled write never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn unregister_stops_a_trickling_remote_write() {
    let md = store();
    let target = engine("tw-target", &md, TcpConfig::new());
    let buf = Arc::new(LocalBuffer::new(64 << 10).unwrap());
    target.register(buf.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = target.local_descriptor().tcp_data_addrs[0].clone();
    trickle_write(&addr, "tw-target", buf.base(), 64 << 10, stop.clone());
    wait_for_first_byte(&buf);
    let t0 = Instant::now();
    target.unregister_memory(buf.base()).unwrap();
    let took = t0.elapsed();
    let after = buf.to_vec();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    assert!(
        buf.to_vec() == after,
        "bytes of a remote write landed after unregister_memory returned"
    );
    assert!(
        took < Duration::from_secs(5),
        "unregister waited {took:?} for a trickling peer"
    );
}

#[test]
fn dropping_the_engine_stops_a_trickling_remote_write() {
    let md = store();
    let target = engine("td-target", &md, TcpConfig::new());
    let buf = Arc::new(LocalBuffer::new(64 << 10).unwrap());
    target.register(buf.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let addr = target.local_descriptor().tcp_data_addrs[0].clone();
    trickle_write(&addr, "td-target", buf.base(), 64 << 10, stop.clone());
    wait_for_first_byte(&buf);
    drop(target);
    let after = buf.to_vec();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    assert!(
        buf.to_vec() == after,
        "bytes of a remote write landed after the engine was dropped"
    );
}
