//! The TCP target checks every range itself: a client that skips the initiator's checks
//! (raw frames) is refused, and no byte outside the registered range changes. The
//! engine-level refusals (out of range, read-only, local-only, unregistered) are in the
//! conformance suite (`tests/conformance.rs`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::{buffer, engine, pattern, store};
use mooncake_core::{Access, ErrorKind, ForeignMemory, LocalBuffer, Location, MemorySegment};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;
use mooncake_transport_tcp::wire::{FrameKind, HEADER_LEN, Header, Hello, Status};

const GUARD: usize = 64 << 10;

/// A target whose registered region sits between two unregistered guard areas.
struct Guarded {
    engine: TransferEngine,
    backing: Arc<LocalBuffer>,
    base: u64,
}

impl Guarded {
    fn new(name: &str, md: &Arc<dyn mooncake_core::MetadataStore>, access: Access) -> Self {
        let engine = engine(name, md, TcpConfig::new());
        let backing = Arc::new(LocalBuffer::new(3 * GUARD).unwrap());
        backing.write_at(0, &pattern(3 * GUARD, 99)).unwrap();
        let base = backing.base() + GUARD as u64;
        // SAFETY: the middle third of `backing`, which outlives the engine in every test.
        let mem = unsafe { ForeignMemory::new(base, GUARD, Location::Cpu(0), access) };
        engine.register(Arc::new(mem)).unwrap();
        Self {
            engine,
            backing,
            base,
        }
    }

    fn guards_intact(&self) -> bool {
        let now = self.backing.to_vec();
        let was = pattern(3 * GUARD, 99);
        now[..GUARD] == was[..GUARD] && now[2 * GUARD..] == was[2 * GUARD..]
    }

    fn addr(&self) -> String {
        self.engine.local_descriptor().tcp_data_addrs[0].clone()
    }
}

#[test]
fn after_unregister_the_target_refuses() {
    let md = store();
    let t = Guarded::new("ur-target", &md, Access::ReadWrite);
    let init = engine("ur-init", &md, TcpConfig::new());
    let lbuf = buffer(&init, GUARD, 8);
    // Open (and cache the descriptor) while the region is registered, then unregister it.
    init.transfer_sync_write("ur-target", lbuf.base(), t.base, 4096)
        .unwrap();
    let mut raw = TcpStream::connect(t.addr()).unwrap();
    assert_eq!(hello(&mut raw, "ur-target").kind, FrameKind::HelloAck);
    t.engine.unregister_memory(t.base).unwrap();
    let before = t.backing.to_vec();
    // Through the engine: refused (by the initiator's refreshed descriptor or the target).
    let e = init
        .transfer_sync_write("ur-target", lbuf.base(), t.base, 4096)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RemoteAccess, "{e}");
    // A client that ignores descriptors entirely: the target itself refuses.
    raw.write_all(&Header::new(FrameKind::Write, 9, t.base, 4096).encode())
        .unwrap();
    raw.write_all(&[0xAB; 4096]).unwrap();
    let (st, msg) = read_error(&mut raw);
    assert_eq!(st, Status::OutOfRange);
    assert!(msg.contains("not inside registered memory"), "{msg}");
    assert_eq!(
        t.backing.to_vec(),
        before,
        "an unregistered region was written"
    );
    // The connection survives a refused request.
    let other = buffer(&t.engine, GUARD, 9);
    let h = init.open_segment_blocking("ur-target").unwrap();
    futures_lite::future::block_on(init.refresh_segment(h)).unwrap();
    init.transfer_sync_write("ur-target", lbuf.base(), other.base(), 4096)
        .unwrap();
    assert_eq!(other.to_vec()[..4096], pattern(GUARD, 8)[..4096]);
}

fn hello_bytes(target: &str) -> Vec<u8> {
    let payload = Hello {
        target: target.to_string(),
        initiator: "raw-client".to_string(),
        initiator_generation: 1,
        epoch: 1,
        nonce: [7; 16],
    }
    .encode();
    let mut v = Header::new(FrameKind::Hello, 1, 0, payload.len() as u64)
        .encode()
        .to_vec();
    v.extend_from_slice(&payload);
    v
}

fn hello(s: &mut TcpStream, name: &str) -> Header {
    s.write_all(&hello_bytes(name)).unwrap();
    read_header(s)
}

fn read_header(s: &mut TcpStream) -> Header {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).unwrap();
    Header::decode(&b, 1 << 30).unwrap()
}

fn read_error(s: &mut TcpStream) -> (Status, String) {
    let h = read_header(s);
    assert_eq!(h.kind, FrameKind::Error, "{h:?}");
    let mut m = vec![0u8; h.len as usize];
    s.read_exact(&mut m).unwrap();
    (h.status, String::from_utf8(m).unwrap())
}

/// A hostile client that skips every client-side check still can't touch memory outside
/// what was registered.
#[test]
fn forged_frames_are_refused_by_the_target() {
    let md = store();
    let t = Guarded::new("fg-target", &md, Access::ReadWrite);
    let mut s = TcpStream::connect(t.addr()).unwrap();

    // Wrong segment name: refused at hello.
    let mut w = TcpStream::connect(t.addr()).unwrap();
    w.write_all(&hello_bytes("other")).unwrap();
    assert_eq!(read_error(&mut w).0, Status::WrongSegment);
    // A hello whose payload does not parse.
    let mut m = TcpStream::connect(t.addr()).unwrap();
    m.write_all(&Header::new(FrameKind::Hello, 1, 0, 5).encode())
        .unwrap();
    m.write_all(b"other").unwrap();
    assert_eq!(read_error(&mut m).0, Status::BadRequest);

    assert_eq!(hello(&mut s, "fg-target").kind, FrameKind::HelloAck);
    // A write into the guard below the region: the payload is swallowed, an error comes back.
    let evil = vec![0xEEu8; 8192];
    s.write_all(&Header::new(FrameKind::Write, 2, t.base - 4096, 8192).encode())
        .unwrap();
    s.write_all(&evil).unwrap();
    let (st, msg) = read_error(&mut s);
    assert_eq!(st, Status::OutOfRange);
    assert!(msg.contains("not inside registered memory"), "{msg}");
    // Wrap-around and a read of the guard above.
    s.write_all(&Header::new(FrameKind::Write, 3, u64::MAX - 10, 64).encode())
        .unwrap();
    s.write_all(&evil[..64]).unwrap();
    assert_eq!(read_error(&mut s).0, Status::OutOfRange);
    s.write_all(&Header::new(FrameKind::Read, 4, t.base + GUARD as u64, 16).encode())
        .unwrap();
    assert_eq!(read_error(&mut s).0, Status::OutOfRange);
    // The same connection still serves a valid write, acknowledged after it is applied.
    s.write_all(&Header::new(FrameKind::Write, 5, t.base, 4).encode())
        .unwrap();
    s.write_all(b"okay").unwrap();
    assert_eq!(read_header(&mut s).kind, FrameKind::WriteAck);
    assert_eq!(&t.backing.to_vec()[GUARD..GUARD + 4], b"okay");
    // A frame longer than the limit: refused, and the connection is closed.
    s.write_all(&Header::new(FrameKind::Write, 6, t.base, 1 << 40).encode())
        .unwrap();
    let (st, _) = read_error(&mut s);
    assert_eq!(st, Status::BadRequest);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);
    // Garbage instead of a header: closed without harm.
    let mut g = TcpStream::connect(t.addr()).unwrap();
    g.write_all(&[0x41; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = g.read_to_end(&mut rest);
    assert!(t.guards_intact());
}
