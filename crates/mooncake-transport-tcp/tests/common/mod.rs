//! Shared helpers of the TCP transport's integration tests.
#![allow(dead_code, unused_imports, reason = "each test binary uses a subset")]

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{EngineContext, MetadataStore, Transport};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

/// An engine named `name` with a TCP transport, on `store`.
pub fn engine(name: &str, store: &Arc<dyn MetadataStore>, cfg: TcpConfig) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(store.clone())
        .with_timeout(Duration::from_secs(2))
        .with_transport(cfg)
        .build()
        .expect("engine starts")
}

/// Like [`engine`], also returning the TCP transport itself (for its stats).
pub fn engine_with_transport(
    name: &str,
    store: &Arc<dyn MetadataStore>,
    cfg: TcpConfig,
    timeout: Duration,
) -> (TransferEngine, Arc<TcpTransport>) {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let engine = TransferEngine::builder(name)
        .with_metadata(store.clone())
        .with_timeout(timeout)
        .with_transport(
            move |ctx: &EngineContext| -> mooncake_core::Result<Arc<dyn Transport>> {
                let t = Arc::new(TcpTransport::start(cfg, ctx)?);
                *s2.lock().unwrap() = Some(t.clone());
                Ok(t)
            },
        )
        .build()
        .expect("engine starts");
    let t = slot.lock().unwrap().take().expect("transport built");
    (engine, t)
}

pub use mooncake_testkit::pattern;
pub use mooncake_testkit::transport::{buffer, store};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use mooncake_core::{MetadataKeys, SegmentDescriptor, block_on};
use mooncake_transport_tcp::wire::{FrameKind, HEADER_LEN, Header, Hello};

/// A TCP forwarder for one connection at a time, that can hold back what the initiator
/// sends (to model a path that stalls) and release it later.
pub struct Proxy {
    pub addr: SocketAddr,
    hold: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<u8>>>,
    upstream: Arc<Mutex<Vec<TcpStream>>>,
    /// Set when the upstream (target) side of a forwarded connection closed.
    pub upstream_closed: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let ups = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let (h2, held2, ups2, c2) = (hold.clone(), held.clone(), ups.clone(), closed.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut client) = c else { return };
                let Ok(up) = TcpStream::connect(upstream) else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = client.set_nodelay(true);
                ups2.lock().unwrap().push(up.try_clone().unwrap());
                let (mut up_r, mut client_w) =
                    (up.try_clone().unwrap(), client.try_clone().unwrap());
                let c3 = c2.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 65536];
                    loop {
                        match up_r.read(&mut b) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if client_w.write_all(&b[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    c3.store(true, Ordering::Release);
                    let _ = client_w.shutdown(std::net::Shutdown::Both);
                });
                let (h3, held3) = (h2.clone(), held2.clone());
                let mut up_w = up;
                std::thread::spawn(move || {
                    let mut b = [0u8; 65536];
                    loop {
                        match client.read(&mut b) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if h3.load(Ordering::Acquire) {
                                    held3.lock().unwrap().extend_from_slice(&b[..n]);
                                } else if up_w.write_all(&b[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // The initiator side is gone; keep the upstream side open (as a
                    // network path that has not noticed yet would) until released.
                    while h3.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
        });
        Self {
            addr,
            hold,
            held,
            upstream: ups,
            upstream_closed: closed,
        }
    }

    /// From now on, what the initiator sends is held back.
    pub fn hold(&self) {
        self.hold.store(true, Ordering::Release);
    }

    /// Sends everything held back to the target (on every forwarded connection, best
    /// effort) and stops holding. Returns how many bytes were held.
    pub fn release(&self) -> usize {
        let bytes = std::mem::take(&mut *self.held.lock().unwrap());
        for up in self.upstream.lock().unwrap().iter_mut() {
            let _ = up.write_all(&bytes);
        }
        self.hold.store(false, Ordering::Release);
        bytes.len()
    }
}

/// Publishes `d` under its segment key (e.g. a descriptor rewritten to go through a proxy).
pub fn publish(md: &Arc<dyn MetadataStore>, d: &SegmentDescriptor) {
    let key = MetadataKeys::from_env().segment(&d.name);
    block_on(md.put(&key, d.to_json())).unwrap();
}

/// A raw client connection to a target, past the hello.
pub fn raw_client(addr: &str, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let payload = Hello {
        target: target.to_string(),
        initiator: "raw-client".to_string(),
        initiator_generation: 7,
        epoch: 1,
        nonce: [7; 16],
    }
    .encode();
    s.write_all(&Header::new(FrameKind::Hello, 1, 0, payload.len() as u64).encode())
        .unwrap();
    s.write_all(&payload).unwrap();
    let h = read_header(&mut s);
    assert_eq!(h.kind, FrameKind::HelloAck, "{h:?}");
    s
}

/// Reads one header.
pub fn read_header(s: &mut TcpStream) -> Header {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).unwrap();
    Header::decode(&b, 1 << 30).unwrap()
}
