//! Backend-specific behaviour beyond the shared suite: wire compatibility with Mooncake's
//! HTTP API and handshake framing, size limits, error messages, re-publishing.
#![allow(unused_imports)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{ErrorKind, MetadataKeys, MetadataStore, block_on};
use mooncake_testkit::metadata::descriptor;
use mooncake_testkit::{Rt, run, unique};

/// Sends raw bytes and reads until `done(reply)` or EOF.
#[allow(dead_code)]
fn raw(addr: std::net::SocketAddr, request: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while !done(&out) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[cfg(feature = "http-server")]
mod http {
    use super::*;
    use mooncake_metadata::http::{HttpMetadataServer, HttpServerConfig};
    use mooncake_metadata::{HttpConfig, HttpMetadataStore};

    fn ends_response(r: &[u8]) -> bool {
        let s = String::from_utf8_lossy(r);
        s.contains("\r\n\r\n")
            && s.split("\r\n\r\n").nth(1).is_some_and(|b| {
                let len: usize = s
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                b.len() >= len
            })
    }

    /// The reference API, spoken raw as Mooncake's C++ (curl) and Python clients do.
    #[test]
    fn speaks_mooncakes_api() {
        let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
        let a = server.local_addr();
        let body = br#"{"name":"n","protocol":"tcp","buffers":[]}"#;
        let put = [
            format!("PUT /metadata?key=mooncake/ram/n HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
            body,
        ]
        .concat();
        assert!(raw(a, &put, ends_response).starts_with(b"HTTP/1.1 200"));
        let got = raw(
            a,
            b"GET /metadata?key=mooncake%2Fram%2Fn HTTP/1.1\r\nHost: x\r\n\r\n",
            ends_response,
        );
        assert!(
            got.starts_with(b"HTTP/1.1 200") && got.ends_with(body),
            "{}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            raw(
                a,
                b"DELETE /metadata?key=mooncake/ram/n HTTP/1.1\r\nHost: x\r\n\r\n",
                ends_response
            )
            .starts_with(b"HTTP/1.1 200")
        );
        assert!(
            raw(
                a,
                b"GET /metadata?key=mooncake/ram/n HTTP/1.1\r\nHost: x\r\n\r\n",
                ends_response
            )
            .starts_with(b"HTTP/1.1 404")
        );
        assert!(
            raw(
                a,
                b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n",
                ends_response
            )
            .starts_with(b"HTTP/1.1 400")
        );
        assert!(raw(a, b"GARBAGE\r\n\r\n", ends_response).starts_with(b"HTTP/1.1 400"));
    }

    /// curl sends `Expect: 100-continue` before large bodies.
    #[test]
    fn answers_expect_continue() {
        let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PUT /metadata?key=k HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n").unwrap();
        let mut buf = [0u8; 25];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"abc").unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        let store = HttpMetadataStore::new(&server.url(), HttpConfig::default()).unwrap();
        assert_eq!(block_on(store.get("k")).unwrap(), Some(b"abc".to_vec()));
    }

    /// Bodies over the limit get 413 before they are read, through the client too.
    #[test]
    fn refuses_large_bodies() {
        let server = HttpMetadataServer::bind(
            "127.0.0.1:0",
            HttpServerConfig::default().with_max_body(1024),
        )
        .unwrap();
        let r = raw(
            server.local_addr(),
            b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
            ends_response,
        );
        assert!(
            r.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&r)
        );
        let store = HttpMetadataStore::new(&server.url(), HttpConfig::default()).unwrap();
        for rt in Rt::ALL {
            let e = run(rt, store.put("k", vec![b'x'; 2048])).unwrap_err();
            assert!(e.to_string().contains("413"), "{e}");
            run(rt, store.put("k", vec![b'x'; 1024])).unwrap();
        }
        assert_eq!(server.len(), 1);
    }

    /// After a server restart (which loses every key, as Mooncake's servers do) the client's
    /// keepalive finds its lease gone and re-publishes its keys.
    #[test]
    fn republishes_after_server_restart() {
        let server = HttpMetadataServer::bind("127.0.0.1:0", HttpServerConfig::default()).unwrap();
        let addr = server.local_addr();
        let store = HttpMetadataStore::new(
            &server.url(),
            HttpConfig::default().with_ttl(Some(Duration::from_millis(600))),
        )
        .unwrap();
        block_on(store.put("mooncake/ram/x", b"v".to_vec())).unwrap();
        server.shutdown();
        let server = HttpMetadataServer::bind(addr, HttpServerConfig::default()).unwrap();
        assert!(server.is_empty());
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.is_empty() {
            assert!(
                Instant::now() < deadline,
                "keys not re-published within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            block_on(store.get("mooncake/ram/x")).unwrap(),
            Some(b"v".to_vec())
        );
    }

    /// A server that is not running gives a clear, temporary error.
    #[test]
    fn unreachable_server() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = HttpMetadataStore::new(
            &format!("http://127.0.0.1:{port}/metadata"),
            HttpConfig::default(),
        )
        .unwrap();
        let e = block_on(store.get("k")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
        assert!(e.to_string().contains("metadata-server"), "{e}");
        assert!(e.is_temporary());
    }
}

#[cfg(feature = "p2p")]
mod p2p {
    use super::*;
    use mooncake_metadata::p2p::{FRAME_METADATA, FRAME_PROBE, decode_frame, encode_frame};
    use mooncake_metadata::{P2pConfig, P2pHandshakeStore};

    fn node(cfg: P2pConfig) -> P2pHandshakeStore {
        P2pHandshakeStore::bind("127.0.0.1", 0, cfg).unwrap()
    }

    fn ends_frame(r: &[u8]) -> bool {
        matches!(decode_frame(r, 1 << 30), Ok(Some(_)))
    }

    /// The reference's framing: 8-byte length (counting the type byte), type, JSON; the reply
    /// to a Metadata request is the callee's descriptor; probes are answered.
    #[test]
    fn speaks_the_handshake_framing() {
        let a = node(P2pConfig::default());
        let keys = MetadataKeys::default();
        let d = descriptor(a.local_name(), 5, 3);
        block_on(a.put(&keys.segment(a.local_name()), d.to_json())).unwrap();
        let me = descriptor("127.0.0.1:1", 1, 0).to_json();
        let reply = raw(
            a.local_addr(),
            &encode_frame(FRAME_METADATA, &me),
            ends_frame,
        );
        assert_eq!(
            u64::from_le_bytes(reply[..8].try_into().unwrap()) as usize,
            reply.len() - 8
        );
        let (f, _) = decode_frame(&reply, 1 << 20).unwrap().unwrap();
        assert_eq!((f.kind, f.body), (FRAME_METADATA, d.to_json()));
        let reply = raw(
            a.local_addr(),
            &encode_frame(FRAME_PROBE, b"{}"),
            ends_frame,
        );
        assert_eq!(
            decode_frame(&reply, 1 << 20).unwrap().unwrap().0.kind,
            FRAME_PROBE
        );
    }

    /// The engine's name is host:port; only that segment may be published; the rpc_meta of a
    /// peer comes from its name.
    #[test]
    fn names_are_host_and_port() {
        let a = node(P2pConfig::default());
        assert_eq!(a.local_name(), format!("127.0.0.1:{}", a.rpc_port()));
        let keys = MetadataKeys::default();
        let e = block_on(a.put(&keys.segment("other"), b"{}".to_vec())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let meta = block_on(a.get(&keys.rpc_meta("10.1.2.3:777")))
            .unwrap()
            .unwrap();
        let meta: mooncake_core::RpcMeta = serde_json::from_slice(&meta).unwrap();
        assert_eq!(
            (meta.ip_or_host_name.as_str(), meta.rpc_port),
            ("10.1.2.3", 777)
        );
        let e = block_on(a.get(&keys.segment("not-a-host-port"))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    }

    /// A reply over the reader's limit is refused with an error that says how to raise it.
    #[test]
    fn oversized_descriptors_are_refused() {
        let a = node(P2pConfig::default());
        let b = node(P2pConfig::default().with_max_message(64 * 1024));
        let key = MetadataKeys::default().segment(a.local_name());
        block_on(a.put(&key, descriptor(a.local_name(), 1, 5000).to_json())).unwrap();
        for rt in Rt::ALL {
            let e = run(rt, b.get(&key)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(e.to_string().contains("MC_HANDSHAKE_MAX_LENGTH"), "{e}");
        }
        // The default 1 MiB limit takes it.
        let c = node(P2pConfig::default());
        assert_eq!(
            block_on(c.get(&key)).unwrap().unwrap().len(),
            descriptor(a.local_name(), 1, 5000).to_json().len()
        );
    }

    /// A peer that is gone is reported as unreachable, naming it.
    #[test]
    fn dead_peers_are_unreachable() {
        let a = node(P2pConfig::default());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = block_on(a.get(&MetadataKeys::default().segment(&format!("127.0.0.1:{port}"))))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}

#[cfg(feature = "redis")]
mod redis_backend {
    use super::*;
    use mooncake_metadata::{RedisConfig, RedisMetadataStore};

    /// A key deleted behind a live node's back (eviction, restart) is put back by its keepalive.
    #[test]
    fn republishes_vanished_keys() {
        let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_REDIS") else {
            return;
        };
        let a = RedisMetadataStore::connect(
            &url,
            RedisConfig::default().with_ttl(Some(Duration::from_secs(1))),
        )
        .unwrap();
        let other =
            RedisMetadataStore::connect(&url, RedisConfig::default().with_ttl(None)).unwrap();
        let key = MetadataKeys::new(Some(&unique("r"))).segment("n");
        block_on(a.put(&key, b"v".to_vec())).unwrap();
        block_on(other.delete(&key)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while block_on(other.get(&key)).unwrap().is_none() {
            assert!(Instant::now() < deadline, "not re-published within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Keys are plain strings at Mooncake's key names, readable by any redis client.
    #[test]
    fn keys_are_plain_strings() {
        let Some(url) = mooncake_testkit::metadata::service_url("MOONCAKE_TEST_REDIS") else {
            return;
        };
        let a = RedisMetadataStore::connect(&url, RedisConfig::default()).unwrap();
        let key = MetadataKeys::new(Some(&unique("r"))).segment("n");
        block_on(a.put(&key, b"{\"name\":\"n\"}".to_vec())).unwrap();
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_connection().unwrap();
        let v: String = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert_eq!(v, "{\"name\":\"n\"}");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut c).unwrap();
        assert!(ttl > 0 && ttl <= 10_000, "ttl {ttl}");
    }

    #[test]
    fn unreachable_server_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = mooncake_metadata::connect(&format!("redis://127.0.0.1:{port}"))
            .err()
            .expect("nobody listens");
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{e}");
        assert!(
            e.to_string().contains("cannot reach the metadata service"),
            "{e}"
        );
    }
}

#[cfg(feature = "etcd")]
mod etcd_backend {
    use super::*;

    #[test]
    fn unreachable_server_says_so() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = mooncake_metadata::connect(&format!("etcd://127.0.0.1:{port}"))
            .err()
            .expect("nobody listens");
        assert!(
            matches!(e.kind(), ErrorKind::PeerUnreachable | ErrorKind::Timeout),
            "{e}"
        );
        assert!(
            e.to_string().contains("cannot reach the metadata service"),
            "{e}"
        );
    }
}
