//! TLS under the frame protocol: what reaches the wire, who may talk to whom, and that the
//! cluster secret's proofs are bound to the TLS session (a relay that terminates TLS on both
//! sides, and so sees every byte in the clear, is refused).
#![cfg(feature = "tls")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{buffer, pattern, publish, store};
use mooncake_core::{ClusterSecret, MemorySegment, MetadataStore};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;
use mooncake_transport_tcp::wire::{FrameKind, Header, Hello};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

fn secret() -> Option<ClusterSecret> {
    Some(ClusterSecret::from_bytes(b"tls-test-cluster-secret").unwrap())
}

fn engine(
    name: &str,
    md: &Arc<dyn MetadataStore>,
    tls: bool,
    secret: Option<ClusterSecret>,
) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(2))
        .with_cluster_secret(secret)
        .with_transport(TcpConfig::new().with_conns_per_path(2).with_tls(tls))
        .build()
        .unwrap()
}

#[test]
fn bytes_move_both_ways_over_tls() {
    let md = store();
    let target = engine("tls-target", &md, true, secret());
    let init = engine("tls-init", &md, true, secret());
    assert_eq!(
        target
            .local_descriptor()
            .extra
            .get(mooncake_transport_tcp::TLS_FIELD),
        Some(&serde_json::Value::Bool(true))
    );
    let len = 3 << 20;
    let tbuf = buffer(&target, len, 0x11);
    let src = buffer(&init, len, 0x22);
    let dst = buffer(&init, len, 0);
    init.transfer_sync_write("tls-target", src.base(), tbuf.base(), len as u64)
        .unwrap();
    assert_eq!(tbuf.to_vec(), pattern(len, 0x22));
    init.transfer_sync_read("tls-target", dst.base(), tbuf.base(), len as u64)
        .unwrap();
    assert_eq!(dst.to_vec(), pattern(len, 0x22));
}

#[test]
fn tls_and_plain_ends_refuse_each_other_with_a_reason() {
    let md = store();
    let tls_target = engine("mix-tls-target", &md, true, None);
    let plain_target = engine("mix-plain-target", &md, false, None);
    let tls_init = engine("mix-tls-init", &md, true, None);
    let plain_init = engine("mix-plain-init", &md, false, None);
    let t1 = buffer(&tls_target, 4096, 0x33);
    let t2 = buffer(&plain_target, 4096, 0x33);
    let a = buffer(&tls_init, 4096, 0x44);
    let b = buffer(&plain_init, 4096, 0x44);
    let e = plain_init
        .transfer_sync_write("mix-tls-target", b.base(), t1.base(), 4096)
        .unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");
    let e = tls_init
        .transfer_sync_write("mix-plain-target", a.base(), t2.base(), 4096)
        .unwrap_err();
    assert!(e.to_string().contains("does not offer TLS"), "{e}");
    assert_eq!(t1.to_vec(), pattern(4096, 0x33));
    assert_eq!(t2.to_vec(), pattern(4096, 0x33));
}

#[test]
fn a_plain_client_gets_nothing_from_a_tls_port() {
    let md = store();
    let target = engine("tls-raw-target", &md, true, None);
    let tbuf = buffer(&target, 4096, 0x55);
    let addr = target.local_descriptor().tcp_data_addrs[0].clone();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload = Hello {
        target: "tls-raw-target".into(),
        initiator: "raw".into(),
        initiator_generation: 1,
        epoch: 1,
        nonce: [1; 16],
    }
    .encode();
    s.write_all(&Header::new(FrameKind::Hello, 1, 0, payload.len() as u64).encode())
        .unwrap();
    s.write_all(&payload).unwrap();
    // A TLS alert at most, never a frame: the connection closes.
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "a plain hello got an answer: {got:?}"
    );
    assert_eq!(tbuf.to_vec(), pattern(4096, 0x55));
}

/// Accepts any certificate and any signature: a relay in the middle.
#[derive(Debug)]
struct AcceptAll;

impl ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A relay that terminates TLS towards the initiator (with its own certificate) and opens
/// its own TLS session to the target, passing the plaintext through. Returns its address
/// and the plaintext it saw from initiators.
fn start_relay(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(down) = c else { return };
            let seen = seen2.clone();
            std::thread::spawn(move || relay(down, upstream, &seen));
        }
    });
    (addr, seen)
}

fn relay(down: TcpStream, upstream: SocketAddr, seen: &Mutex<Vec<u8>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::generate_simple_self_signed(vec!["relay".to_string()]).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(key.cert.der().to_vec())],
            PrivateKeyDer::try_from(key.key_pair.serialize_der()).unwrap(),
        )
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll))
        .with_no_client_auth();
    let Ok(up) = TcpStream::connect(upstream) else {
        return;
    };
    let mut s: rustls::Connection = rustls::ServerConnection::new(Arc::new(server))
        .unwrap()
        .into();
    let mut c: rustls::Connection =
        rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("m").unwrap())
            .unwrap()
            .into();
    let (mut down, mut up) = (down, up);
    down.set_nonblocking(true).unwrap();
    up.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut progress = false;
        match s.read_tls(&mut down) {
            Ok(0) => return,
            Ok(_) => progress = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        if s.process_new_packets().is_err() {
            return;
        }
        match c.read_tls(&mut up) {
            Ok(0) => return,
            Ok(_) => progress = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        if c.process_new_packets().is_err() {
            return;
        }
        while let Ok(n) = s.reader().read(&mut buf) {
            if n == 0 {
                return;
            }
            seen.lock().unwrap().extend_from_slice(&buf[..n]);
            c.writer().write_all(&buf[..n]).unwrap();
            progress = true;
        }
        while let Ok(n) = c.reader().read(&mut buf) {
            if n == 0 {
                return;
            }
            s.writer().write_all(&buf[..n]).unwrap();
            progress = true;
        }
        if flush_to(&mut s, &mut down).is_err() || flush_to(&mut c, &mut up).is_err() {
            return;
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn flush_to(conn: &mut rustls::Connection, sock: &mut TcpStream) -> std::io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs a write through a TLS-terminating relay; returns its result, the target buffer
/// afterwards, and the plaintext the relay saw.
fn through_relay(prefix: &str, secret: Option<ClusterSecret>) -> (bool, Vec<u8>, Vec<u8>) {
    let md = store();
    let tname = format!("{prefix}-target");
    let target = engine(&tname, &md, true, secret.clone());
    let tbuf = buffer(&target, 64 << 10, 0x66);
    let mut d = target.local_descriptor();
    let (relay_addr, seen) = start_relay(d.tcp_data_addrs[0].parse().unwrap());
    d.tcp_data_addrs = vec![relay_addr.to_string()];
    publish(&md, &d);
    let init = engine(&format!("{prefix}-init"), &md, true, secret);
    let src = buffer(&init, 64 << 10, 0x77);
    let ok = init
        .transfer_sync_write(&tname, src.base(), tbuf.base(), 64 << 10)
        .is_ok();
    let seen = seen.lock().unwrap().clone();
    (ok, tbuf.to_vec(), seen)
}

#[test]
fn a_tls_terminating_relay_cannot_pass_the_secret_proofs() {
    // Without a secret, TLS authenticates nobody: the relay works and sees the bytes. This
    // shows the relay is a working man in the middle.
    let (ok, after, seen) = through_relay("relay-open", None);
    assert!(ok, "the relay forwards");
    assert_eq!(after, pattern(64 << 10, 0x77));
    assert!(
        seen.windows(16)
            .any(|w| w == &pattern(64 << 10, 0x77)[..16])
    );

    // With the secret, each proof covers its own TLS session's exported value: the relay's
    // two sessions differ, so the proofs fail and nothing is written or sent in the clear.
    let (ok, after, seen) = through_relay("relay-secret", secret());
    assert!(!ok, "a relayed connection was accepted");
    assert_eq!(
        after,
        pattern(64 << 10, 0x66),
        "the target's memory changed"
    );
    assert!(
        !seen.is_empty(),
        "the relay saw the hello (it did terminate TLS)"
    );
    assert!(
        !seen
            .windows(16)
            .any(|w| w == &pattern(64 << 10, 0x77)[..16]),
        "payload bytes reached the relay"
    );
}
